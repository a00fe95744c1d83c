"""Recognise a checkpoint's format from its bytes, never from its extension. No torch needed."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

from normcli.errors import NormcliError

# torch.save's legacy (non-zip) files start with a pickle of this magic number.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PREFIX = b"\x80\x02\x8a\x0a" + LEGACY_MAGIC.to_bytes(10, "little")

FORMATS = ("torch-zip", "torch-legacy", "torchscript", "pt2", "safetensors", "onnx")


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


def detect_format(path: str | os.PathLike) -> str:
    """Return one of FORMATS for the file at ``path``, or raise NormcliError naming what it looks like."""
    p = check_readable(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _zip_kind(p)
    if head.startswith(LEGACY_PREFIX):
        return "torch-legacy"
    if len(head) >= 8 and _looks_like_safetensors(p, head, size):
        return "safetensors"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        raise NormcliError(f"{p} is a plain Python pickle, not a torch checkpoint; normcli reads files written "
                           "by torch.save, TorchScript, torch.export, safetensors and ONNX")
    if _looks_like_onnx(head):
        return "onnx"
    raise NormcliError(f"{p}: unrecognised file format (not a torch, safetensors or ONNX file); "
                       "check that the download is complete")


def _zip_kind(p: Path) -> str:
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
            if not names:
                raise NormcliError(f"{p} is an empty zip archive, not a checkpoint")
            prefix = zip_prefix(names)
            nameset = set(names)
            if f"{prefix}archive_format" in nameset:
                fmt = z.read(f"{prefix}archive_format")[:16].strip()
                if fmt == b"pt2":
                    return "pt2"
            if f"{prefix}constants.pkl" in nameset and any(n.startswith(f"{prefix}code/") for n in names):
                return "torchscript"
            if f"{prefix}data.pkl" in nameset:
                return "torch-zip"
    except zipfile.BadZipFile as e:
        raise NormcliError(f"{p} is a damaged zip archive ({e}); the file is truncated or corrupt") from None
    except (OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as e:  # zipfile's many complaints
        raise NormcliError(f"{p}: cannot read the zip archive ({e}); the file is truncated or corrupt") from None
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


def read_safetensors_header(p: Path) -> tuple[dict, int]:
    """Parse and validate a safetensors header; returns (entries, data_start)."""
    size = p.stat().st_size
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, 100 * 1024 * 1024):
            raise NormcliError(f"{p}: safetensors header length {n} is larger than the file allows; "
                               "the file is corrupt")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise NormcliError(f"{p}: safetensors header is not valid JSON; the file is corrupt") from None
    if not isinstance(header, dict):
        raise NormcliError(f"{p}: safetensors header is not a JSON object; the file is corrupt")
    return header, 8 + n
