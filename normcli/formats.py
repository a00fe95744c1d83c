"""Recognise a checkpoint's format from its bytes, never from its extension. No torch needed."""

from __future__ import annotations

import mmap
import os
import stat
import struct
from pathlib import Path

from normcli.errors import NormcliError
from normcli.limits import DEFAULT_LIMITS, Limits

# torch.save's legacy (non-zip) files start with a pickle of this magic number.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PREFIX = b"\x80\x02\x8a\x0a" + LEGACY_MAGIC.to_bytes(10, "little")

FORMATS = ("torch-zip", "torch-legacy", "torchscript", "pt2", "safetensors", "onnx", "sharded", "dcp")


def check_readable(path: str | os.PathLike) -> Path:
    """Fail with a clear message for a path that is missing, a directory, empty or unreadable."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise NormcliError(f"{p}: no such file; check the path") from None
    except PermissionError:
        raise NormcliError(f"{p}: permission denied (a directory on the path is not accessible); "
                           "check its permissions") from None
    except OSError as e:
        raise NormcliError(f"{p}: cannot access the file ({e.strerror})") from None
    if p.is_dir():
        raise NormcliError(f"{p} is a directory; give a checkpoint file inside it")
    if not os.access(p, os.R_OK):
        raise NormcliError(f"{p}: permission denied; make the file readable")
    if st.st_size == 0:
        raise NormcliError(f"{p} is empty (0 bytes); the file was not written completely")
    return p


def zip_prefix(names: list[str]) -> str:
    """The single top-level folder torch writes every entry under (``archive/`` or the file stem)."""
    first = names[0] if names else ""
    return first.split("/", 1)[0] + "/" if "/" in first else ""


class CheckpointFile:
    """A checkpoint file opened once: one descriptor, mapped read-only; every later read goes through the map.

    ``format`` is one of FORMATS, recognised from the content; ``archive`` is the checked
    :class:`normcli.ziparchive.ZipArchive` for the zip formats (torch-zip, torchscript, pt2), else None.
    ``str()`` and ``os.fspath()`` give the path, for messages and for code that still needs a name (ONNX,
    and ``--unsafe-load``'s torch loaders). Use it as a context manager, or keep it alive while arrays read
    from it are in use; :meth:`close` releases the map once nothing refers to it.
    """

    def __init__(self, path: str | os.PathLike, limits: Limits = DEFAULT_LIMITS, *, detect: bool = True):
        p = check_readable(path)
        self.path = p
        self.limits = limits
        try:
            # O_NONBLOCK: a FIFO named like a checkpoint must not hang the open; it is refused below
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise NormcliError(f"{p}: cannot open the file ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NormcliError(f"{p} is not a regular file; give a checkpoint file")
            if st.st_size == 0:
                raise NormcliError(f"{p} is empty (0 bytes); the file was not written completely")
            self.mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)  # keeps its own handle on the open file
        finally:
            os.close(fd)
        self.size = len(self.mm)
        self.head = self.mm[:64]
        self.archive = None
        self.format = self._detect() if detect else None

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __repr__(self) -> str:
        return f"CheckpointFile({str(self.path)!r}, format={self.format!r})"

    def __enter__(self) -> "CheckpointFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the map; while arrays or views of it are alive it stays open until they are gone."""
        self.archive = None
        try:
            self.mm.close()
        except BufferError:
            pass

    def view(self, offset: int, length: int) -> memoryview:
        """``length`` bytes at ``offset``, checked against the file's real size."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise NormcliError(f"{self.path}: bytes {offset}..{offset + length} lie outside the file "
                               f"({self.size} bytes); the file is truncated or corrupt")
        return memoryview(self.mm)[offset:offset + length]

    def _detect(self) -> str:
        p, head, size = self.path, self.head, self.size
        if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
            from normcli.ziparchive import ZipArchive

            self.archive = ZipArchive(self.mm, str(p), self.limits)
            return _zip_kind(p, self.archive, self.limits)
        if head.startswith(LEGACY_PREFIX):
            return "torch-legacy"
        if len(head) >= 8 and _looks_like_safetensors(p, head, size):
            return "safetensors"
        if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
            raise NormcliError(f"{p} is a plain Python pickle, not a torch checkpoint; normcli reads files written "
                               "by torch.save, TorchScript, torch.export, safetensors and ONNX")
        if _looks_like_onnx(head):
            return "onnx"
        if head.lstrip()[:1] == b"{" and size <= self.limits.max_index_bytes and self.mm.find(b'"weight_map"') >= 0:
            return "sharded"  # a JSON object naming a weight_map: a sharded checkpoint's index (normcli.sharded)
        if self.mm.rfind(b"PK\x05\x06", max(0, size - 0x10000 - 22)) >= 0:
            # a zip archive that does not start at offset 0: say why it is refused (prepended data)
            from normcli.ziparchive import ZipArchive

            ZipArchive(self.mm, str(p), self.limits)
        raise NormcliError(f"{p}: unrecognised file format (not a torch, safetensors or ONNX file); "
                           "check that the download is complete")


def open_checkpoint(path: str | os.PathLike | CheckpointFile, limits: Limits = DEFAULT_LIMITS) -> CheckpointFile:
    """Open ``path`` once and recognise its format (an already opened CheckpointFile is returned as is). A
    directory that is one sharded or DCP checkpoint gives a :class:`normcli.sharded.CheckpointSet`."""
    from normcli.sharded import CheckpointSet, open_directory

    if isinstance(path, (CheckpointFile, CheckpointSet)):
        return path
    if os.path.isdir(path):
        return open_directory(path, limits)
    return CheckpointFile(path, limits)


def detect_format(path: str | os.PathLike | CheckpointFile, limits: Limits = DEFAULT_LIMITS) -> str:
    """Return one of FORMATS for the file at ``path``, or raise NormcliError naming what it looks like."""
    from normcli.sharded import CheckpointSet

    if isinstance(path, (CheckpointFile, CheckpointSet)):
        return path.format
    with open_checkpoint(path, limits) as ck:
        return ck.format


def _zip_kind(p: Path, z, limits: Limits) -> str:
    from normcli.ziparchive import SMALL_RECORD_BYTES

    names = z.names
    if not names:
        raise NormcliError(f"{p} is an empty zip archive, not a checkpoint")
    prefix = z.prefix
    if f"{prefix}archive_format" in z:
        fmt = z.read(f"{prefix}archive_format", SMALL_RECORD_BYTES, "archive_format", limit_name="")[:16].strip()
        if fmt == b"pt2":
            return "pt2"
    if f"{prefix}constants.pkl" in z and any(n.startswith(f"{prefix}code/") for n in names):
        return "torchscript"
    if f"{prefix}data.pkl" in z:
        return "torch-zip"
    raise NormcliError(f"{p} is a zip archive but not a torch checkpoint (no data.pkl, TorchScript code or "
                       "torch.export archive inside)")


def _looks_like_safetensors(p: Path, head: bytes, size: int) -> bool:
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or head[8:9] != b"{":
        return False
    if 8 + n > size:
        raise NormcliError(f"{p}: safetensors header says it is {n} bytes but the file has only {size}; "
                           "the file is truncated or corrupt")
    return True


def _looks_like_onnx(head: bytes) -> bool:
    # ONNX ModelProto: field 1 (ir_version, varint) is written first by every exporter; be strict enough
    # that random bytes are not taken for ONNX, then let the onnx parser decide.
    return len(head) >= 2 and head[0] == 0x08 and 1 <= head[1] <= 20


def read_safetensors_header(p: Path | CheckpointFile) -> tuple[dict, int]:
    """Parse and validate a safetensors header; returns (entries, data_start)."""
    ck = p if isinstance(p, CheckpointFile) else CheckpointFile(p, detect=False)
    size = ck.size
    (n,) = struct.unpack("<Q", ck.view(0, 8))
    if n > min(size - 8, 100 * 1024 * 1024):
        raise NormcliError(f"{p}: safetensors header length {n} is larger than the file allows; "
                           "the file is corrupt")
    from normcli.safe_json import load_json

    header = load_json(bytes(ck.view(8, n)), f"{p}: the safetensors header", ck.limits)
    if not isinstance(header, dict):
        raise NormcliError(f"{p}: safetensors header is not a JSON object; the file is corrupt")
    return header, 8 + n
