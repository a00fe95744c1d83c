"""Builders of hostile and broken files, made at test time (nothing hostile is committed).

Every payload, if a real unpickler ran it, creates a marker file; the tests check that the marker never
appears. ``payload_is_live`` in the tests proves each payload does create its marker under plain
``pickle.load`` / ``torch.load(weights_only=False)``, so a missing marker means normcli did not run it.
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import runpy
import struct
import subprocess
import zipfile
from pathlib import Path

ARCH = "samples/models.py:resnet_tiny"


class Reduce:
    """Pickles as ``func(*args)``: what a hostile ``__reduce__`` looks like."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


class _ImportBuiltins:
    def __reduce__(self):
        return (builtins.__import__, ("builtins",))


class _GetattrEval:
    """Unpickles to ``getattr(__import__("builtins"), "eval")``; callable so it can head a REDUCE."""

    def __reduce__(self):
        return (getattr, (_ImportBuiltins(), "eval"))

    def __call__(self, *args):  # never called at pickling time; pickle only checks callability
        raise AssertionError


def touch_code(marker: Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def reduce_payload(kind: str, marker: Path, workdir: Path):
    """An object whose unpickling creates ``marker``, by one of the classic routes."""
    code = touch_code(marker)
    if kind == "os.system":
        return Reduce(os.system, (f"touch '{marker}'",))
    if kind == "builtins.eval":
        return Reduce(builtins.eval, (code,))
    if kind == "builtins.exec":
        return Reduce(builtins.exec, (code,))
    if kind == "subprocess.Popen":
        return Reduce(subprocess.Popen, (["touch", str(marker)],))
    if kind == "subprocess.run":
        return Reduce(subprocess.run, (["touch", str(marker)],))
    if kind == "runpy.run_path":
        script = workdir / f"script_{marker.name}.py"
        script.write_text(code + "\n")
        return Reduce(runpy.run_path, (str(script),))
    if kind == "pickle.loads":
        return Reduce(pickle.loads, (pickle.dumps(Reduce(os.system, (f"touch '{marker}'",)), protocol=2),))
    if kind == "getattr-chain":
        return Reduce(_GetattrEval(), (code,))
    raise ValueError(kind)


# the name each route leaves in the pickle (what an error message must name)
GLOBAL_NAMES = {"os.system": "system", "builtins.eval": "eval", "builtins.exec": "exec",
                "subprocess.Popen": "Popen", "subprocess.run": "subprocess.run", "runpy.run_path": "run_path",
                "pickle.loads": "loads", "getattr-chain": "getattr"}
REDUCE_KINDS = tuple(GLOBAL_NAMES)


def raw_getattr_chain_pickle(marker: Path) -> bytes:
    """``getattr(__import__('builtins'), 'eval')(code)`` written opcode by opcode (protocol 0)."""
    code = touch_code(marker).replace("\\", "\\u005c").replace("\n", "\\u000a")
    return (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vbuiltins\ntRVeval\ntR(V" + code.encode()
            + b"\ntR.")


def resnet_state_dict():
    from samples.models import resnet_tiny
    import torch

    torch.manual_seed(0)
    return resnet_tiny().state_dict()


def nested_checkpoint(path: Path, payload) -> Path:
    """A Lightning-style checkpoint: a valid state dict under ``state_dict`` and the payload beside it."""
    import torch

    sd = resnet_state_dict()
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3,
                "hyper_parameters": {"cfg": payload}}, path)
    return path


def legacy_checkpoint(path: Path, payload) -> Path:
    import torch

    torch.save({"state_dict": resnet_state_dict(), "extra": payload}, path, _use_new_zipfile_serialization=False)
    return path


def rewrite_zip_entry(src: Path, dst: Path, suffix: str, data: bytes) -> str:
    """Copy the zip ``src`` to ``dst`` with the entry whose name ends in ``suffix`` replaced by ``data``."""
    replaced = None
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            body = zin.read(info.filename)
            if info.filename.endswith(suffix):
                body, replaced = data, info.filename
            zout.writestr(info.filename, body)
    if replaced is None:
        raise AssertionError(f"{src} has no entry ending in {suffix}")
    return replaced


def pt2_with_payload(pt2: Path, dst: Path, payload) -> Path:
    """A real torch.export archive whose pickled sample inputs carry ``payload`` (torch.export.load runs it)."""
    import torch

    buf = io.BytesIO()
    torch.save(((torch.zeros(1, 3, 32, 32),), {"x": payload}), buf)
    rewrite_zip_entry(pt2, dst, "data/sample_inputs/model.pt", buf.getvalue())
    return dst


# ------------------------------------------------------------------------------------------ broken files

def patch_zip_entry_size(data: bytes, name_suffix: str, compressed: int, size: int) -> bytes:
    """Make the local and central headers of one entry declare these compressed and uncompressed sizes."""
    buf = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(name_suffix))
    name = info.filename.encode()
    local = info.header_offset
    struct.pack_into("<II", buf, local + 18, compressed, size)
    central = 0
    while True:
        central = data.index(b"PK\x01\x02", central)
        (nlen,) = struct.unpack_from("<H", data, central + 28)
        if data[central + 46:central + 46 + nlen] == name:
            break
        central += 4
    struct.pack_into("<II", buf, central + 20, compressed, size)
    return bytes(buf)


def damage_central_directory(data: bytes) -> bytes:
    """Overwrite every central-directory record signature: the archive's table of contents is gone."""
    return data.replace(b"PK\x01\x02", b"XX\x01\x02")


def safetensors_bytes(header: dict, data_len: int, header_len: int | None = None) -> bytes:
    import json

    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + b"\0" * data_len
