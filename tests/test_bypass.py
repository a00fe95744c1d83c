"""The bypass classes published against block-list scanners (picklescan, modelscan, fickling), built at test
time. For each: the payload is live (a plain unpickler creates its marker file), and through the installed
``normcli scan`` and ``normcli inspect`` nothing runs, the verdict is ``unsafe`` or ``unreadable`` (never
``safe``), and there is no traceback."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.hostile_payloads import rewrite_zip_entry


def _v(text: str) -> bytes:
    """A protocol-0 unicode argument line."""
    return text.replace("\\", "\\u005c").replace("\n", "\\u000a").encode() + b"\n"


def _touch(marker: Path) -> str:
    return f"touch '{marker}'"


# ------------------------------------------------------------------------------------ raw pickle payloads

def memo_confusion(marker: Path) -> bytes:
    # os.system memoised, the stack cleared, then fetched back by BINGET: nothing names it at the call site
    return b"\x80\x02cos\nsystem\nq\x000h\x00(V" + _v(_touch(marker)) + b"tR."


def stack_global_from_memo(marker: Path) -> bytes:
    # module and name pushed once, memoised, popped, and fetched back from the memo for STACK_GLOBAL
    return (b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94" + b"00" + b"h\x00h\x01\x93"
            + b"\x8c" + bytes([len(_touch(marker))]) + _touch(marker).encode() + b"\x85R.")


def inst(marker: Path) -> bytes:
    return b"(V" + _v(_touch(marker)) + b"ios\nsystem\n."


def obj(marker: Path) -> bytes:
    return b"(cos\nsystem\nV" + _v(_touch(marker)) + b"o."


def newobj(marker: Path) -> bytes:
    # functools.partial.__new__(partial, os.system, cmd) builds a call; REDUCE with () makes it
    return (b"\x80\x02cfunctools\npartial\ncos\nsystem\nV" + _v(_touch(marker)) + b"\x86\x81)R.")


def newobj_ex(marker: Path) -> bytes:
    return (b"\x80\x04cfunctools\npartial\ncos\nsystem\nV" + _v(_touch(marker)) + b"\x86}\x92)R.")


EXT_CODE = 0xF1


def extension(marker: Path) -> bytes:
    # EXT1 names a global only through copyreg's registry of the loading process
    return b"\x80\x02\x82" + bytes([EXT_CODE]) + b"(V" + _v(_touch(marker)) + b"tR."


def nested_loads(marker: Path) -> bytes:
    inner = b"cos\nsystem\n(V" + _v(_touch(marker)) + b"tR."
    return b"\x80\x02c_pickle\nloads\nC" + bytes([len(inner)]) + inner + b"\x85R."


def getattr_chain(marker: Path) -> bytes:
    return (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V" + _v(_touch(marker)) + b"tR.")


def attrgetter_chain(marker: Path) -> bytes:
    return (b"coperator\nattrgetter\n(Vsystem\ntR(cbuiltins\n__import__\n(Vos\ntRtR(V" + _v(_touch(marker))
            + b"tR.")


def methodcaller_chain(marker: Path) -> bytes:
    return (b"coperator\nmethodcaller\n(Vsystem\nV" + _v(_touch(marker)) + b"tR(cbuiltins\n__import__\n(Vos\ntRtR.")


def resolve_name(marker: Path) -> bytes:
    return b"cpkgutil\nresolve_name\n(Vos:system\ntR(V" + _v(_touch(marker)) + b"tR."


RAW = {f.__name__: f for f in (memo_confusion, stack_global_from_memo, inst, obj, newobj, newobj_ex, extension,
                               nested_loads, getattr_chain, attrgetter_chain, methodcaller_chain, resolve_name)}


def persistent_id(marker: Path) -> bytes:
    """A torch data.pkl whose storage persistent id is built by a call to os.system: any unpickler that
    resolves the id runs the call first."""
    return (b"\x80\x02}X\x01\x00\x00\x00w(X\x07\x00\x00\x00storagecos\nsystem\n(V" + _v(_touch(marker))
            + b"tRX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQs.")


# ------------------------------------------------------------------------------------------- containers

@pytest.fixture(scope="module")
def base_zip(tmp_path_factory) -> Path:
    import torch

    path = tmp_path_factory.mktemp("base") / "base.pt"
    torch.save({"w": torch.arange(4.0)}, path)
    return path


def torch_zip_with(base: Path, dst: Path, data_pkl: bytes) -> Path:
    rewrite_zip_entry(base, dst, "data.pkl", data_pkl)
    return dst


def _local_and_central(data: bytes, suffix: str):
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    name = info.filename.encode()
    central = 0
    while True:
        central = data.index(b"PK\x01\x02", central)
        (nlen,) = struct.unpack_from("<H", data, central + 28)
        if data[central + 46:central + 46 + nlen] == name:
            return info.header_offset, central
        central += 4


def flag_bit(base: Path, dst: Path, marker: Path) -> Path:
    """data.pkl carries the payload and its local header claims encryption and patched data (flag bits 0, 5
    and 6) while the central directory does not: torch's reader ignores the local flags and loads it."""
    torch_zip_with(base, dst, memo_confusion(marker))
    data = bytearray(dst.read_bytes())
    local, _central = _local_and_central(bytes(data), "data.pkl")
    data[local + 6] |= 0x61
    dst.write_bytes(bytes(data))
    return dst


def bad_crc(base: Path, dst: Path, marker: Path) -> Path:
    """The payload's data.pkl with a wrong CRC: a scanner that trusts zipfile errors out, torch loads it."""
    torch_zip_with(base, dst, memo_confusion(marker))
    data = bytearray(dst.read_bytes())
    local, central = _local_and_central(bytes(data), "data.pkl")
    for at in (local + 14, central + 16):
        data[at] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


def duplicate_entry(base: Path, dst: Path, marker: Path) -> Path:
    """Two data.pkl entries: a clean one first, the payload second (readers disagree on which counts)."""
    import warnings

    with zipfile.ZipFile(base) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
            if info.filename.endswith("data.pkl"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    zout.writestr(info.filename, memo_confusion(marker))
    return dst


def odd_extension(base: Path, dst: Path, marker: Path) -> Path:
    """A torch zip with a payload, named like a text file."""
    return torch_zip_with(base, dst.with_suffix(".txt"), getattr_chain(marker))


def pid_trick(base: Path, dst: Path, marker: Path) -> Path:
    return torch_zip_with(base, dst, persistent_id(marker))


CONTAINERS = {f.__name__: f for f in (flag_bit, bad_crc, duplicate_entry, odd_extension, pid_trick)}


def _live_under_pickle(payload: bytes, marker: Path, register_ext: bool = False) -> bool:
    """Run the payload with plain pickle.loads in a child process; True if the marker appeared."""
    prelude = f"import copyreg; copyreg.add_extension('os', 'system', {EXT_CODE})\n" if register_ext else ""
    code = prelude + "import pickle, sys\ntry:\n    pickle.loads(sys.stdin.buffer.read())\nexcept Exception:\n    pass\n"
    subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, timeout=60)
    live = marker.exists()
    if live:
        marker.unlink()
    return live


@pytest.mark.parametrize("name", sorted(RAW))
def test_raw_payload_is_live_under_plain_pickle(name, tmp_path):
    marker = tmp_path / "marker"
    assert _live_under_pickle(RAW[name](marker), marker, register_ext=name == "extension"), name


def test_persistent_id_payload_is_live(tmp_path):
    marker = tmp_path / "marker"
    code = ("import pickle, sys\nclass U(pickle.Unpickler):\n    def persistent_load(self, pid): return pid\n"
            "import io\nU(io.BytesIO(sys.stdin.buffer.read())).load()\n")
    subprocess.run([sys.executable, "-c", code], input=persistent_id(marker), capture_output=True, timeout=60)
    assert marker.exists()


def test_zip_tricks_still_load_in_torch(base_zip, tmp_path):
    """The flag-bit and CRC files are not merely broken: torch's own reader still loads them (so the payload
    would run under weights_only=False)."""
    for name in ("flag_bit", "bad_crc"):
        marker = tmp_path / f"marker_{name}"
        path = CONTAINERS[name](base_zip, tmp_path / f"{name}.pt", marker)
        code = f"import torch\ntry:\n    torch.load({str(path)!r}, weights_only=False)\nexcept Exception as e:\n    print(e)\n"
        subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
        assert marker.exists(), name


def _check(run_normcli, target: Path, marker: Path, case: str) -> None:
    scan = run_normcli("scan", "--json", target)
    assert "Traceback" not in scan.stderr, (case, scan.stderr)
    rows = json.loads(scan.stdout)
    assert rows and all(r["verdict"] in ("unsafe", "unreadable") for r in rows), (case, rows)
    assert scan.returncode in (1, 2), case
    assert scan.stderr.startswith("error:"), case
    inspect = run_normcli("inspect", "--json", target)
    assert "Traceback" not in inspect.stderr, (case, inspect.stderr)
    assert inspect.returncode in (1, 2), (case, inspect.returncode, inspect.stderr)
    if inspect.returncode == 1:   # read: the verdict is in the report
        report = json.loads(inspect.stdout)
        assert report["trust"]["verdict"] == "unsafe", case
        assert any(f["code"] == "unsafe-globals" for f in report["file_findings"]), case
    else:
        assert inspect.stderr.startswith("error:"), case
    assert not marker.exists(), case


@pytest.mark.parametrize("name", sorted(RAW))
def test_raw_pickle_bypass_is_caught(run_normcli, tmp_path, name):
    marker = tmp_path / "marker"
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(RAW[name](marker))
    _check(run_normcli, path, marker, name)


@pytest.mark.parametrize("name", sorted(RAW))
def test_bypass_as_a_torch_checkpoint_is_caught(run_normcli, tmp_path, base_zip, name):
    marker = tmp_path / "marker"
    path = torch_zip_with(base_zip, tmp_path / f"{name}.pt", RAW[name](marker))
    _check(run_normcli, path, marker, name)


@pytest.mark.parametrize("name", sorted(CONTAINERS))
def test_container_bypass_is_caught(run_normcli, tmp_path, base_zip, name):
    marker = tmp_path / "marker"
    path = CONTAINERS[name](base_zip, tmp_path / f"{name}.pt", marker)
    _check(run_normcli, path, marker, name)


def test_a_payload_hidden_in_a_directory_is_found_by_content(run_normcli, tmp_path, base_zip):
    marker = tmp_path / "marker"
    d = tmp_path / "upload" / "nested"
    d.mkdir(parents=True)
    shutil.copy(base_zip, d / "clean.bin")
    odd_extension(base_zip, d / "notes", marker)
    proc = run_normcli("scan", "--json", tmp_path / "upload")
    rows = {Path(r["path"]).name: r["verdict"] for r in json.loads(proc.stdout)}
    assert rows == {"clean.bin": "safe", "notes.txt": "unsafe"}
    assert proc.returncode == 1 and not marker.exists()
