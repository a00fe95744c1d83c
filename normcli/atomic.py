"""Write outputs so that a reader never sees a partial file and a failure leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from normcli.errors import NormcliError


def check_output_path(output: str | os.PathLike, *, inputs: tuple[str | os.PathLike, ...] = (),
                      force: bool = False) -> Path:
    """Refuse an output path that cannot be written or would clobber something, before any work is done."""
    out = Path(output)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise NormcliError(f"cannot write {out}: the directory {parent} does not exist; create it first")
    if out.is_dir():
        raise NormcliError(f"cannot write {out}: it is a directory; give a file name")
    for src in inputs:
        if out.exists() and Path(src).exists() and os.path.samefile(out, src) or out.resolve() == Path(src).resolve():
            raise NormcliError(f"output {out} is the input file; normcli never modifies its input, choose another path")
    if out.exists() and not force:
        raise NormcliError(f"{out} already exists; pass --force to overwrite it")
    if not os.access(parent, os.W_OK):
        raise NormcliError(f"cannot write {out}: no write permission on {parent}")
    return out


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    dest = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent if str(dest.parent) else ".")
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes it 0600; outputs get the usual permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
