"""Paths, directories and globs -> the checkpoints to read, and running one function over them in parallel.

Shared by ``normcli scan`` and ``normcli inspect``. Files inside a directory or matched by a glob are kept only
when their first bytes say they are a checkpoint (never the extension); a file named explicitly is always
kept, so that a file that is not a checkpoint gets its own ``unreadable`` row. No torch, no numpy.
"""

from __future__ import annotations

import glob
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from normcli.errors import NormcliError

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Target:
    """One checkpoint to read: a file, or a directory that is one checkpoint (``kind`` says which)."""

    path: str
    kind: str = "file"        # file | dcp | sharded


# ------------------------------------------------------------------ directories that are ONE checkpoint
#
# A directory for which checkpoint_directory() returns a kind is one entry (one row, one verdict, one inspect
# report): its files are never listed on their own. The recognition is the multi-file reader's own
# (normcli.sharded.checkpoint_kind), so that what discover lists as one checkpoint is exactly what the reader
# opens as one; normcli.trust.checkpoint_members lists the files a verdict on it walks.

def checkpoint_directory(directory: Path) -> str | None:
    """``"dcp"`` for a torch.distributed.checkpoint directory (a ``.metadata`` pickle of DCP's records),
    ``"sharded"`` for a directory holding a sharded checkpoint's index, else None."""
    from normcli.sharded import checkpoint_kind

    try:
        return checkpoint_kind(directory) if directory.is_dir() else None
    except OSError:
        return None


# --------------------------------------------------------------------------------------- recognising files

def looks_like_checkpoint(path: Path, include_pickles: bool = True) -> bool:
    """Whether the file's first bytes (and, for a zip, its entry names) are those of a checkpoint."""
    from normcli.trust import sniff

    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    kind = sniff(head)
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError):
            return False
        return any(n.endswith(("data.pkl", "archive_format", "constants.pkl")) for n in names)
    if kind == "pickle":
        return include_pickles
    if kind is None and include_pickles and head[:1] in (b"(", b"c", b"]", b"}", b"i"):
        # a protocol 0/1 pickle has no signature: it counts when its opcodes parse and name a global
        from normcli.trust import pickle_uses

        try:
            with open(path, "rb") as f:
                uses, _problem = pickle_uses(f.read(16 * 1024 * 1024))
        except OSError:
            return False
        return bool(uses)
    if kind == "onnx":
        return path.suffix.lower() == ".onnx" or _onnx_plausible(head)
    return kind is not None


def _onnx_plausible(head: bytes) -> bool:
    # two bytes are a weak signature: in a directory, also ask for the producer/graph fields ONNX writes next
    return len(head) > 4 and head[2] in (0x12, 0x1A, 0x3A, 0x42)


def discover(paths: Sequence[str], include_pickles: bool = True) -> list[Target]:
    """Expand ``paths`` (files, directories searched recursively, globs) into checkpoints, in order, once each.

    A directory that is itself one checkpoint (see :func:`checkpoint_directory`) stays one entry. A path that
    does not exist is kept as given, so that the caller reports it in its own row. Finding nothing at all is
    an error.
    """
    out: list[Target] = []
    seen: set[str] = set()

    def add(target: Target) -> None:
        key = os.path.realpath(target.path)
        if key not in seen:
            seen.add(key)
            out.append(target)

    for raw in paths:
        p = Path(raw)
        try:
            is_dir, exists = p.is_dir(), p.exists()
        except OSError:  # a path that cannot even be looked at: the reader reports it in its own row
            add(Target(str(p)))
            continue
        if is_dir:
            _walk_directory(p, add, include_pickles)
        elif exists or not (_GLOB_CHARS & set(raw)):
            add(Target(str(p)))
        else:
            matches = sorted(glob.glob(raw, recursive=True))
            found_before = len(out)
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    _walk_directory(mp, add, include_pickles)
                elif looks_like_checkpoint(mp, include_pickles):
                    add(Target(m))
            if len(out) == found_before and not matches:
                raise NormcliError(f"{raw!r} matches no file; check the pattern (quote it so that the shell "
                                   "leaves it to normcli, and use ** for subdirectories)")
    if not out:
        raise NormcliError(f"{paths[0]} is a directory with no checkpoint in it (searched recursively, files "
                           "recognised by content); give a checkpoint file or another directory"
                           if len(paths) == 1 and os.path.isdir(paths[0])
                           else f"no checkpoint found in {', '.join(paths)}")
    return out


def _walk_directory(root: Path, add: Callable[[Target], None], include_pickles: bool) -> None:
    kind = checkpoint_directory(root)
    if kind is not None:
        add(Target(str(root), kind))
        return
    # os.walk does not follow symlinked directories, so a link loop cannot make this run forever
    for current, dirs, files in os.walk(root, onerror=None):
        here = Path(current)
        dirs.sort()
        keep = []
        for d in dirs:
            sub = here / d
            sub_kind = None if sub.is_symlink() else checkpoint_directory(sub)
            if sub_kind is not None:
                add(Target(str(sub), sub_kind))
            else:
                keep.append(d)
        dirs[:] = keep
        for name in sorted(files):
            fp = here / name
            if fp.is_file() and looks_like_checkpoint(fp, include_pickles):
                add(Target(str(fp)))


# ---------------------------------------------------------------------------------------------- parallel

def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def run_all(func: Callable, items: list, jobs: int | None, on_crash: Callable) -> list:
    """``[func(item) for item in items]``, over ``jobs`` worker processes when there is more than one item.

    Workers are forked where the platform allows (no re-import of normcli, so they start in milliseconds). A
    worker that dies (a crash in a native library) does not take the others' results with it: each item it
    left unfinished gets ``on_crash(item, message)``.
    """
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise NormcliError(f"--jobs must be at least 1, not {jobs}")
    if len(items) <= 1 or jobs == 1:
        return [func(item) for item in items]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    results: list = [None] * len(items)
    with ProcessPoolExecutor(max_workers=min(jobs, len(items)),
                             mp_context=multiprocessing.get_context(method)) as pool:
        futures = [pool.submit(func, item) for item in items]
        for i, fut in enumerate(futures):
            try:
                results[i] = fut.result()
            except BrokenProcessPool:
                results[i] = on_crash(items[i], "the worker process reading it died (a crash in a native "
                                                "library); rerun it alone with --jobs 1")
    return results
