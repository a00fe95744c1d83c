"""Outputs appear whole or not at all: a killed writer, a failed parity check or an existing file never
leaves a partial or clobbered destination."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from normcli.cli import app
from tests.conftest import ROOT, SAMPLES, sha256
from tests.hostile_payloads import ARCH

REGISTERED = {c.name for c in app.registered_commands}
MIB = 1024 * 1024
TOTAL_MIB = 300

# A writer that streams TOTAL_MIB MiB through normcli.atomic.atomic_output, in 1 MiB chunks of a fixed
# pattern. With "pause", it stops after PAUSE_AT chunks (flushed, inside the with-block) and waits to be killed.
WRITER = textwrap.dedent(f"""
    import sys
    from normcli.atomic import atomic_output

    dest, mode = sys.argv[1], sys.argv[2]
    chunk = bytes(range(256)) * 4096
    with atomic_output(dest) as tmp:
        with open(tmp, "wb") as f:
            for i in range({TOTAL_MIB}):
                f.write(chunk)
                if mode == "pause" and i == 16:
                    f.flush()
                    print("mid-write", flush=True)
                    sys.stdin.readline()
    print("done", flush=True)
""")


def _start_writer(dest: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(dest), mode], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def _temp_files(d: Path, dest: Path) -> list[Path]:
    return [p for p in d.iterdir() if p.name != dest.name and p.name != "other"]


def _expected_full_hash() -> str:
    h = hashlib.sha256()
    chunk = bytes(range(256)) * 4096
    for _ in range(TOTAL_MIB):
        h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize("existing", [False, True], ids=["new-destination", "existing-destination"])
def test_sigkill_in_the_middle_of_a_write(tmp_path, existing):
    dest = tmp_path / "model.out"
    old = b"previous good output\n" * 100
    if existing:
        dest.write_bytes(old)
    proc = _start_writer(dest, "pause")
    try:
        assert proc.stdout.readline().strip() == "mid-write", proc.stderr.read()
        temps = _temp_files(tmp_path, dest)
        # the bytes so far are in a temporary file beside the destination, not in the destination
        assert len(temps) == 1 and temps[0].stat().st_size >= 16 * MIB
        assert temps[0].parent == dest.parent
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if existing:
        assert dest.read_bytes() == old
    else:
        assert not dest.exists()
    # what SIGKILL leaves is only the hidden temporary file, never something under the destination's name
    assert all(p.name.startswith(f".{dest.name}.") and p.name.endswith(".partial")
               for p in _temp_files(tmp_path, dest))


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_mib", [8, 64, 200])
def test_sigkill_during_a_free_running_300_mib_write(tmp_path, kill_after_mib):
    """Killed whenever it happens to be, the destination holds the old bytes or the complete new file."""
    dest = tmp_path / "model.out"
    old = b"previous good output\n" * 100
    dest.write_bytes(old)
    proc = _start_writer(dest, "run")
    try:
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            temps = _temp_files(tmp_path, dest)
            try:
                if temps and temps[0].stat().st_size >= kill_after_mib * MIB:
                    break
            except FileNotFoundError:  # renamed between listing and stat: the write just finished
                pass
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code == -signal.SIGKILL and dest.stat().st_size != TOTAL_MIB * MIB:
        assert dest.read_bytes() == old
    else:  # the write and rename completed before the signal landed
        assert dest.stat().st_size == TOTAL_MIB * MIB and sha256(dest) == _expected_full_hash()
    assert all(p.name.endswith(".partial") for p in _temp_files(tmp_path, dest))


def test_a_failing_block_leaves_nothing_and_keeps_the_old_file(tmp_path):
    from normcli.atomic import atomic_output

    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(dest) as tmp:
            tmp.write_bytes(b"new but incomplete")
            raise RuntimeError("failed half-way")
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    with atomic_output(dest) as tmp:
        tmp.write_bytes(b"new")
    assert dest.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


# --------------------------------------------------------------------------------------- no clobbering

def _swap(path, out, *extra):
    return ["swap", path, "--to", "frn", "-o", out, "--arch", ARCH, *extra]


def _fuse(path, out, *extra):
    return ["fuse-export", path, "-o", out, "--arch", ARCH, "--input-shape", "1,3,32,32", *extra]


NO_FORCE = [pytest.param(_swap, "out.pt", id="swap",
                         marks=pytest.mark.skipif("swap" not in REGISTERED, reason="normcli swap not registered")),
            pytest.param(_fuse, "out.onnx", id="fuse-export",
                         marks=pytest.mark.skipif("fuse-export" not in REGISTERED,
                                                  reason="normcli fuse-export not registered"))]


@pytest.mark.parametrize("argv,name", NO_FORCE)
def test_existing_output_is_not_overwritten_without_force(cli, tmp_path, monkeypatch, argv, name):
    monkeypatch.chdir(ROOT)
    out = tmp_path / name
    out.write_bytes(b"somebody's earlier result")
    code, _, err = cli(*argv(SAMPLES / "resnet_tiny.pt", out))
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "--force" in lines[-1] and "Traceback" not in err
    assert out.read_bytes() == b"somebody's earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.skipif("swap" not in REGISTERED, reason="normcli swap not registered")
def test_force_replaces_the_output_with_a_complete_file(cli, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(ROOT)
    out = tmp_path / "out.pt"
    out.write_bytes(b"stale")
    code, _, err = cli(*_swap(SAMPLES / "resnet_tiny.pt", out, "--force"))
    assert code == 0, err
    saved = torch.load(out, weights_only=True)  # a complete, loadable checkpoint replaced the stale bytes
    sd = saved.get("state_dict", saved)
    assert sd and all(isinstance(v, torch.Tensor) for v in sd.values())
    assert "conv1.weight" in sd
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]


@pytest.mark.skipif("fuse-export" not in REGISTERED, reason="normcli fuse-export not registered")
def test_existing_save_fused_target_is_not_overwritten_without_force(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    fused = tmp_path / "fused.pt2"
    fused.write_bytes(b"keep me")
    code, _, err = cli(*_fuse(SAMPLES / "resnet_tiny.pt", tmp_path / "out.onnx", "--save-fused", fused))
    assert code == 2 and "--force" in err.strip().splitlines()[-1]
    assert fused.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.pt2"]


# ------------------------------------------------------------------------------------- parity failure

@pytest.mark.slow
@pytest.mark.skipif("fuse-export" not in REGISTERED, reason="normcli fuse-export not registered")
@pytest.mark.parametrize("existing", [False, True], ids=["new-destination", "existing-destination-with-force"])
def test_parity_failure_writes_nothing(cli, tmp_path, monkeypatch, existing):
    """With zero tolerance, parity fails (folding changes float rounding): exit 1 and no file is written or
    replaced, neither the ONNX nor --save-fused."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out.onnx"
    fused = tmp_path / "fused.pt2"
    if existing:
        out.write_bytes(b"last good export")
        fused.write_bytes(b"last good fused")
    extra = ["--atol", "0", "--rtol", "0", "--save-fused", fused] + (["--force"] if existing else [])
    code, _, err = cli(*_fuse(SAMPLES / "resnet_tiny.pt", out, *extra))
    assert code == 1, err
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    if existing:
        assert out.read_bytes() == b"last good export" and fused.read_bytes() == b"last good fused"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.pt2", "out.onnx"]
    else:
        assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif("swap" not in REGISTERED, reason="normcli swap not registered")
def test_sigkill_during_the_real_swap_write(tmp_path):
    """The installed `normcli swap` writing a ~67 MB checkpoint, killed once its temporary file is growing:
    the existing destination keeps its bytes."""
    import torch

    from samples.models import mlp_head

    kwargs = '{"in_features": 4096, "hidden": 4096}'
    src = tmp_path / "big.pt"
    torch.save(mlp_head(in_features=4096, hidden=4096).state_dict(), src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dest = out_dir / "swapped.pt"
    dest.write_bytes(b"last good swap\n")
    from tests.conftest import normcli_executable

    # --learnable-eps: FRN takes the BatchNorm1d on (N, C) features only with a learnable eps, and a swap that
    # replaces nothing writes nothing
    proc = subprocess.Popen([*normcli_executable(), "swap", src, "--to", "frn", "--learnable-eps", "-o", dest,
                             "--force", "--arch", "samples/models.py:mlp_head", "--arch-kwargs", kwargs], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_mid_write = False
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            temps = _temp_files(out_dir, dest)
            try:
                if temps and temps[0].stat().st_size > 4 * MIB:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_mid_write = True
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.001)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed_mid_write, "the write finished before it could be observed; the model is too small"
    assert dest.read_bytes() == b"last good swap\n"
    assert all(p.name.endswith(".partial") for p in _temp_files(out_dir, dest))


def test_outputs_get_the_usual_file_permissions(tmp_path):
    """A file written through atomic_output is readable like any file the user creates (umask applies)."""
    from normcli.atomic import atomic_output

    umask = os.umask(0o022)
    os.umask(umask)
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    dest = tmp_path / "out.bin"
    with atomic_output(dest) as tmp:
        tmp.write_bytes(b"x")
    assert (dest.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777) == (0o666 & ~umask)
