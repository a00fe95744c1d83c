"""Checkpoints written as several files: a sharded index (``model.safetensors.index.json``,
``pytorch_model.bin.index.json``, as transformers' ``save_pretrained`` writes them) and, through
:mod:`normcli.dcp`, torch.distributed.checkpoint directories. Each is ONE checkpoint for every command.

``checkpoint_kind(path)`` recognises them from content (an index is a JSON object with a ``weight_map``; a DCP
directory holds a ``.metadata`` pickle of DCP's records), never from a file name alone.
``read_checkpoint(path, kind)`` reads every shard with the single-file safe readers and merges them into one
:class:`normcli.reader.TensorFile`, with ``file_findings`` saying where the index and its shards disagree:

- ``shard-missing``: a shard the index names is not there;
- ``shard-stray``: a shard-like file in the directory that no index names (an earlier save's leftover);
- ``shard-duplicate``: a tensor the index maps twice, or that two shards both hold;
- ``shard-mismatch``: a tensor missing from the shard the index names, a tensor a shard holds that the index
  does not list, two copies that differ in dtype or shape, or a ``total_size`` that is not the shards' bytes.

The index is untrusted input: its size, number of values and nesting are capped before it is parsed, shard
names may not leave the index's directory (no ``..``, no absolute path, no symlink pointing outside), and the
number of shards is capped (``normcli.limits.Limits``). No torch.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from normcli.errors import NormcliError
from normcli.limits import DEFAULT_LIMITS, LimitExceeded, Limits

# transformers' names, tried first; any other JSON file holding a weight_map is found by content
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
DCP_METADATA = ".metadata"
SHARD_FINDINGS = ("shard-missing", "shard-stray", "shard-duplicate", "shard-mismatch")


# ------------------------------------------------------------------------------------------ recognition

def checkpoint_kind(path: str | os.PathLike, limits: Limits = DEFAULT_LIMITS) -> str | None:
    """``"sharded"`` for a sharded index file or a directory holding one, ``"dcp"`` for a
    torch.distributed.checkpoint directory, else None. Reads at most a few bytes of each candidate file
    (and an index only when it names a ``weight_map``)."""
    p = Path(path)
    try:
        if p.is_dir():
            if _is_dcp_metadata(p / DCP_METADATA) or ((p / DCP_METADATA).is_file() and any(p.glob("*.distcp"))):
                # DCP's .metadata pickle, or any .metadata beside .distcp files: what dcp.load would read
                return "dcp"
            return "sharded" if find_index(p, limits) is not None else None
        if p.is_file():
            return "sharded" if _is_index_file(p, limits) else None
    except OSError:
        return None
    return None


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory that is one checkpoint (sharded or DCP): list it as one entry."""
    return os.path.isdir(path) and checkpoint_kind(path) is not None


def _is_dcp_metadata(p: Path) -> bool:
    # DCP pickles a torch.distributed.checkpoint.metadata.Metadata: the class's module is the first string
    try:
        if not p.is_file():
            return False
        with open(p, "rb") as f:
            head = f.read(128)
    except OSError:
        return False
    return head[:1] == b"\x80" and b"torch.distributed.checkpoint.metadata" in head


def _is_index_file(p: Path, limits: Limits) -> bool:
    try:
        size = p.stat().st_size
        if size < 2 or size > limits.max_index_bytes:
            return False
        with open(p, "rb") as f:
            head = f.read(64)
            if head.lstrip()[:1] != b"{":
                return False
            raw = head + f.read()
    except OSError:
        return False
    # an object that names a weight_map; whether it is a well-formed index is the reader's to say
    return b'"weight_map"' in raw


def find_index(directory: Path, limits: Limits = DEFAULT_LIMITS) -> Path | None:
    """The index that makes ``directory`` one sharded checkpoint: transformers' names first (safetensors
    before .bin), then any other file whose content is a JSON object with a ``weight_map``."""
    for name in INDEX_NAMES:
        candidate = directory / name
        if candidate.is_file() and _is_index_file(candidate, limits):
            return candidate
    for candidate in sorted(directory.iterdir()):
        if candidate.name not in INDEX_NAMES and candidate.is_file() and _is_index_file(candidate, limits):
            return candidate
    return None


# ------------------------------------------------------------------------------------------------ reading

class CheckpointSet:
    """A directory that is one checkpoint (a sharded index's or a DCP one), as ``open_checkpoint`` returns
    it: the same ``format``/``path``/``str()``/``os.fspath()``/context-manager surface as
    :class:`normcli.formats.CheckpointFile`; each file in it is opened by its own reader."""

    archive = None

    def __init__(self, path: str | os.PathLike, kind: str, limits: Limits = DEFAULT_LIMITS):
        self.path = Path(path)
        self.format = kind
        self.limits = limits

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __repr__(self) -> str:
        return f"CheckpointSet({str(self.path)!r}, format={self.format!r})"

    def __enter__(self) -> "CheckpointSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass


def open_directory(path: str | os.PathLike, limits: Limits = DEFAULT_LIMITS) -> CheckpointSet:
    """The checkpoint a directory is, or the error for a directory that is none."""
    kind = checkpoint_kind(path, limits)
    if kind is None:
        raise NormcliError(f"{path} is a directory; give a checkpoint file inside it (a directory is read as one "
                           "checkpoint only when it holds a sharded index or a torch.distributed.checkpoint)")
    return CheckpointSet(path, kind, limits)


def read_checkpoint(ck, kind: str | None = None, key: str | None = None, limits: Limits = DEFAULT_LIMITS):
    """Read a multi-file checkpoint as one TensorFile: ``ck`` is a path, a CheckpointSet (a directory) or a
    CheckpointFile of an index (whose mapped bytes are the index: it is not opened again)."""
    kind = kind or getattr(ck, "format", None) or checkpoint_kind(ck, limits)
    p = Path(os.fspath(ck))
    if kind == "dcp":
        from normcli.dcp import read_dcp

        return read_dcp(p, key=key, limits=limits)
    if kind != "sharded":
        raise NormcliError(f"{p}: not a sharded or distributed checkpoint")
    if p.is_dir():
        index = find_index(p, limits)
        if index is None:
            raise NormcliError(f"{p}: no sharded index (a JSON object with a weight_map) in this directory")
        return read_sharded(index, key=key, limits=limits)
    mm = getattr(ck, "mm", None)
    return read_sharded(p, key=key, limits=limits, raw=None if mm is None else bytes(mm))


def _parse_index_json(raw: bytes, where: Path, limits: Limits) -> tuple[Any, dict]:
    """Parse an index with its values and nesting counted first; returns (value, duplicate keys of
    weight_map: name -> [shards])."""
    if len(raw) > limits.max_index_bytes:
        raise LimitExceeded(f"{where}: the index is {len(raw)} bytes", "max_index_bytes", limits.max_index_bytes)
    # counted over the raw text, strings included: an upper bound that needs no copy of the file (tensor
    # names with commas, colons or brackets are rare; the default limits leave a wide margin for them)
    brackets = raw.count(b"[") + raw.count(b"{")
    nodes = raw.count(b",") + raw.count(b":") + brackets + 1
    if nodes > limits.max_index_nodes:
        raise LimitExceeded(f"{where}: the index holds up to {nodes} JSON values", "max_index_nodes",
                            limits.max_index_nodes)
    if brackets > limits.max_index_depth:
        depth = deepest = 0
        for m in re.finditer(rb"[\[\]{}]", raw):
            depth += 1 if m.group() in (b"[", b"{") else -1
            deepest = max(deepest, depth)
        if deepest > limits.max_index_depth:
            raise LimitExceeded(f"{where}: the index nests {deepest} levels deep", "max_index_depth",
                                limits.max_index_depth)
    repeated: list[tuple[dict, str, Any]] = []

    def pairs_hook(pairs):
        out: dict = {}
        for k, v in pairs:
            if k in out:
                repeated.append((out, k, v))
            out[k] = v
        return out

    try:
        data = json.loads(raw, object_pairs_hook=pairs_hook)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise NormcliError(f"{where}: the sharded index is not valid JSON ({str(e)[:100]}); the file is "
                           "truncated or corrupt") from None
    dups: dict[str, list] = {}
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    for obj, k, v in repeated:
        if obj is weight_map:
            dups.setdefault(k, []).append(v)
    return data, dups


def read_index(index: Path, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The bytes of a sharded index file, capped at ``max_index_bytes``."""
    try:
        with open(index, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limits.max_index_bytes:
                raise LimitExceeded(f"{index}: the index is {size} bytes", "max_index_bytes",
                                    limits.max_index_bytes)
            return f.read(limits.max_index_bytes + 1)
    except OSError as e:
        raise NormcliError(f"{index}: cannot read the sharded index ({e.strerror})") from None


def index_shards(raw: bytes, index: Path, limits: Limits = DEFAULT_LIMITS) -> tuple[Any, dict, dict, list[str]]:
    """Parse and check an index: (the parsed JSON, its weight_map, the weight_map's repeated keys -> their
    other shards, every shard name it gives in order). Every name is checked to be a plain file name inside
    the index's directory before any shard is opened; refused with one error naming what is wrong."""
    data, repeated = _parse_index_json(raw, index, limits)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise NormcliError(f"{index}: the sharded index has no weight_map (tensor name -> shard file)")
    values = [*weight_map.values(), *(v for vs in repeated.values() for v in vs)]
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise NormcliError(f"{index}: the weight_map maps a tensor to {bad[0]!r:.60}, not a shard file name; the "
                           "index is corrupt")
    shard_names = list(dict.fromkeys(values))
    if len(shard_names) > limits.max_shards:
        raise LimitExceeded(f"{index}: the index names {len(shard_names)} shard files", "max_shards",
                            limits.max_shards)
    for name in shard_names:
        shard_path(index.parent, name, index)
    return data, weight_map, repeated, shard_names


def shard_path(directory: Path, name: Any, index: Path) -> Path:
    """The file a shard name denotes, refused when it could leave ``directory`` (``..``, an absolute
    path, a symlink pointing outside)."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise NormcliError(f"{index}: the index names a shard {name!r:.80} that is not a plain file name; the "
                           "index is corrupt or crafted")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or os.path.isabs(name) or ".." in parts:
        raise NormcliError(f"{index}: the index names a shard {name!r:.80} outside its directory; refusing to "
                           "read it (shard names must be relative to the index's directory)")
    full = directory / name
    root = os.path.realpath(directory)
    real = os.path.realpath(full)
    if os.path.commonpath([root, real]) != root:
        raise NormcliError(f"{index}: shard {name!r:.80} is a symlink to {real}, outside the checkpoint's "
                           "directory; refusing to follow it (copy the files with `cp -L` into one directory "
                           "if you trust them)")
    return full


def _finding(code: str, message: str):
    from normcli.inspection import Finding

    return Finding(code, "error", message)


def _names(items, limit: int = 6) -> str:
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def read_sharded(index: Path, key: str | None = None, limits: Limits = DEFAULT_LIMITS, raw: bytes | None = None):
    """Read the checkpoint a sharded index describes: every shard through the single-file reader, merged,
    with the findings of where the index and the shards disagree. ``raw``: the index's bytes, when the caller
    already holds them."""
    from normcli.reader import TensorFile, _strip_wrapper_prefixes, read_tensors

    index = Path(index)
    directory = index.parent
    if raw is None:
        raw = read_index(index, limits)
    data, weight_map, repeated, shard_names = index_shards(raw, index, limits)
    paths = {name: directory / name for name in shard_names}  # each name checked by index_shards
    findings = []
    for name, others in repeated.items():
        findings.append(_finding("shard-duplicate", f"the index maps tensor {name!r} more than once (to "
                                 f"{_names(dict.fromkeys([*others, weight_map[name]]))}); which copy a loader "
                                 "takes is unspecified"))

    tensors: dict[str, Any] = {}
    origin: dict[str, str] = {}     # tensor -> shard it was read from
    globals_seen: list[str] = []
    unsafe: list[str] = []
    formats: set[str] = set()
    missing = []
    listed: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        listed.setdefault(shard, set()).add(name)
    for shard in shard_names:
        p = paths[shard]
        if not p.is_file():
            missing.append(shard)
            held = listed.get(shard, set())
            shown = _names(sorted(held) if len(held) < 1000 else list(held), 3)
            findings.append(_finding("shard-missing", f"shard {shard!r} named by the index is missing "
                                     f"({len(held)} tensors: {shown})"))
            continue
        if checkpoint_kind(p, limits) is not None:  # an index naming an index (itself, say) would never end
            raise NormcliError(f"{index}: shard {shard!r} is itself a sharded index; a shard holds tensors only")
        tf = read_tensors(p, limits=limits)
        if tf.format not in ("safetensors", "state-dict", "checkpoint"):
            raise NormcliError(f"{index}: shard {shard!r} holds a {tf.format}, not a state dict; a shard holds "
                               "tensors only")
        formats.add(tf.container)
        globals_seen += [g for g in tf.globals if g not in globals_seen]
        unsafe += [g for g in tf.unsafe_globals if g not in unsafe]
        wanted = {_strip_like(n, tf.stripped_prefixes): n for n in listed.get(shard, ())}
        for k, t in tf.tensors.items():
            name = wanted.pop(k, None) or "".join(tf.stripped_prefixes) + k
            if name in origin:
                first = tensors[name]
                findings.append(_finding("shard-duplicate", f"tensor {name!r} is in both {origin[name]!r} and "
                                         f"{shard!r}"))
                if (first.dtype, tuple(first.shape)) != (t.dtype, tuple(t.shape)):
                    findings.append(_finding("shard-mismatch", f"the two copies of tensor {name!r} differ: "
                                             f"{first.dtype}{list(first.shape)} in {origin[name]!r}, "
                                             f"{t.dtype}{list(t.shape)} in {shard!r}"))
                if weight_map.get(name) != shard:
                    continue  # the shard the index names wins
            elif name not in weight_map:
                findings.append(_finding("shard-mismatch", f"shard {shard!r} holds tensor {name!r}, which the "
                                         "index does not list"))
            tensors[name] = t
            origin[name] = shard
        if wanted:
            findings.append(_finding("shard-mismatch", f"{len(wanted)} tensors the index maps to {shard!r} are "
                                     f"not in it: {_names(sorted(wanted.values()))}"))
    findings += _total_size_findings(data, weight_map, tensors, missing)
    findings += _stray_findings(directory, index, shard_names, formats, limits)
    if not tensors:
        raise NormcliError(f"{index}: none of the {len(shard_names)} shards the index names could be read "
                           f"({_names(missing)} missing)")
    sd = dict(tensors)
    state_key = None
    if key is not None:
        sd = {k[len(key) + 1:]: v for k, v in sd.items() if k.startswith(key + ".")}
        if not sd:
            raise NormcliError(f"{index}: no tensor names start with {key + '.'!r} (--key)")
        state_key = key
    sd, stripped = _strip_wrapper_prefixes(sd)
    fmt = "sharded-safetensors" if formats == {"safetensors"} else "sharded-bin" if "safetensors" not in formats \
        else "sharded-mixed"
    return TensorFile(str(index), fmt, "sharded", sd, state_dict_key=state_key, stripped_prefixes=stripped,
                      unsafe_globals=unsafe, globals=globals_seen, file_findings=findings)


def _strip_like(name: str, stripped: list[str]) -> str:
    """``name`` as the single-file reader reports it after removing ``stripped`` wrapper prefixes."""
    if "_orig_mod." in stripped:
        name = name.replace("_orig_mod.", "")
    for prefix in stripped:
        if prefix != "_orig_mod." and name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _total_size_findings(data: dict, weight_map: dict, tensors: dict, missing: list) -> list:
    meta = data.get("metadata")
    total = meta.get("total_size") if isinstance(meta, dict) else None
    if missing or isinstance(total, bool) or not isinstance(total, (int, float)):
        return []
    from normcli.safe_pickle import element_size

    actual = sum(t.numel * element_size(t.dtype) for name, t in tensors.items() if name in weight_map)
    if int(total) != actual:
        return [_finding("shard-mismatch", f"the index's metadata.total_size is {int(total)} bytes but the tensors "
                         f"it lists hold {actual} bytes in the shards")]
    return []


def _number_pattern(name: str) -> re.Pattern:
    """``model-00001-of-00008.safetensors`` -> a pattern matching the same name with any numbers."""
    return re.compile("".join(r"\d+" if part.isdigit() else re.escape(part)
                              for part in re.split(r"(\d+)", name)) + r"\Z")


def _stray_findings(directory: Path, index: Path, shard_names: list[str], formats: set[str],
                    limits: Limits) -> list:
    """Files in the index's directory that look like its shards but that no index there names: numbered
    like the shards (an earlier save's leftovers), or, next to safetensors shards, any other safetensors file
    (it holds only tensors, that no loader of this index reads)."""
    named = {os.path.normpath(n) for n in shard_names}
    others = []
    for entry in sorted(directory.iterdir()):
        if entry == index or not entry.is_file() or entry.is_symlink():
            continue
        if entry.name in INDEX_NAMES and _is_index_file(entry, limits):
            # transformers' other index (safetensors and .bin side by side): its shards are its own
            try:
                other, _ = _parse_index_json(entry.read_bytes(), entry, limits)
                named |= {os.path.normpath(str(v)) for v in (other.get("weight_map") or {}).values()}
            except (NormcliError, OSError, AttributeError):
                pass
            continue
        others.append(entry)
    patterns = [_number_pattern(n) for n in shard_names if re.search(r"\d", n)]
    stray = []
    for entry in others:
        if entry.name in named:
            continue
        if any(p.match(entry.name) for p in patterns):
            stray.append(entry.name)
            continue
        if formats == {"safetensors"}:
            try:
                with open(entry, "rb") as f:
                    head = f.read(9)
                    size = os.fstat(f.fileno()).st_size
            except OSError:
                continue
            if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
                stray.append(entry.name)
    if not stray:
        return []
    return [_finding("shard-stray", f"{len(stray)} shard files in {directory} are not named by the index: "
                     f"{_names(stray)}; they are left over from another save, or the index is incomplete")]
