"""Every bad input gets exit 2 and one `error:` line naming the file, and no traceback."""

from __future__ import annotations

import json
import os
import struct

import pytest

from tests.conftest import sha256


def assert_clean_error(result, *needles, code=2):
    rc, out, err = result
    assert rc == code, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_missing_directory_empty(cli, tmp_path):
    assert_clean_error(cli("inspect", tmp_path / "nope.pt"), "no such file")
    assert_clean_error(cli("inspect", tmp_path), "is a directory")
    (tmp_path / "empty.pt").write_bytes(b"")
    assert_clean_error(cli("inspect", tmp_path / "empty.pt"), "empty")


def test_unreadable(cli, tmp_path):
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from tests.conftest import normcli_executable

    p = tmp_path / "locked.pt"
    p.write_bytes(b"x" * 10)
    p.chmod(0)
    if os.geteuid() != 0:
        assert_clean_error(cli("inspect", p), "permission denied")
        return
    # root reads any file: run the installed command as an unprivileged user instead
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv is not available to drop privileges")
    def as_nobody(*args):
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               *normcli_executable(), *map(str, args)], capture_output=True, text=True)
        return proc.returncode, proc.stdout, proc.stderr

    # pytest's temporary directories are private to root: a path that cannot even be looked at
    assert_clean_error(as_nobody("inspect", p), "permission denied")
    # a readable directory holding a file without read permission
    shared = Path(tempfile.mkdtemp())
    try:
        shared.chmod(0o755)
        locked = shared / "locked.pt"
        locked.write_bytes(b"x" * 10)
        locked.chmod(0)
        assert_clean_error(as_nobody("inspect", locked), "permission denied; make the file readable")
    finally:
        shutil.rmtree(shared)


def test_random_bytes(cli, tmp_path):
    p = tmp_path / "random.pt"
    p.write_bytes(os.urandom(4096))
    assert_clean_error(cli("inspect", p), str(p))


@pytest.mark.parametrize("name", ["resnet_tiny.pt", "resnet_tiny_legacy.pt", "resnet_tiny.safetensors",
                                  "resnet_tiny.onnx", "resnet_tiny.pt2", "resnet_tiny_script.pt"])
@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.97])
def test_truncated_samples(cli, samples, tmp_path, name, fraction):
    data = (samples / name).read_bytes()
    p = tmp_path / name
    p.write_bytes(data[: int(len(data) * fraction)])
    before = sha256(p)
    rc, out, err = cli("inspect", p)
    assert_clean_error((rc, out, err), name)
    assert sha256(p) == before


def test_safetensors_header_lies(cli, tmp_path):
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}
    raw = json.dumps(header).encode()
    p = tmp_path / "lies.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    assert_clean_error(cli("inspect", p), "do not fit")
    p.write_bytes(struct.pack("<Q", 10_000_000) + raw)
    assert_clean_error(cli("inspect", p), "safetensors header")
    overlap = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    raw = json.dumps(overlap).encode()
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 12)
    assert_clean_error(cli("inspect", p), "overlap")


def test_plain_pickle_is_not_a_checkpoint(cli, tmp_path):
    import pickle

    p = tmp_path / "plain.pkl"
    p.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    assert_clean_error(cli("inspect", p), "plain Python pickle")


def test_arch_errors(cli, samples, tmp_path):
    sd = samples / "resnet_tiny.pt"
    assert_clean_error(cli("inspect", sd, "--arch", "nowhere.module:fn"), "cannot import")
    assert_clean_error(cli("inspect", sd, "--arch", "samples/models.py:no_such_fn"), "no callable")
    assert_clean_error(cli("inspect", sd, "--arch", "noseparator"), "not of the form")
    assert_clean_error(cli("inspect", sd, "--arch", "samples/models.py:resnet_tiny", "--arch-kwargs", "{bad"),
                       "not valid JSON")
    assert_clean_error(cli("inspect", sd, "--arch", "samples/models.py:resnet_tiny", "--arch-kwargs", "[1]"),
                       "JSON object")
    assert_clean_error(cli("inspect", sd, "--arch", "samples/models.py:mobilenetv2_tiny"),
                       "does not fit", "missing keys", "unexpected keys")
    bad = tmp_path / "archs.py"
    bad.write_text("def boom():\n    raise ValueError('no')\n\ndef notmodule():\n    return 3\n")
    assert_clean_error(cli("inspect", sd, "--arch", f"{bad}:boom"), "raised ValueError")
    assert_clean_error(cli("inspect", sd, "--arch", f"{bad}:notmodule"), "not a torch.nn.Module")


def test_bad_options(cli, samples):
    assert_clean_error(cli("inspect", samples / "resnet_tiny.pt", "--fail-on", "sometimes"), "--fail-on")
    assert_clean_error(cli("inspect", samples / "resnet_tiny.pt", "--no-such-option"), "No such option")
    assert_clean_error(cli("frobnicate"), "No such command")


def test_error_through_the_installed_command(run_normcli, tmp_path):
    proc = run_normcli("inspect", tmp_path / "missing.pt")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stdout == ""


def test_debug_shows_the_traceback(run_normcli, tmp_path):
    proc = run_normcli("inspect", tmp_path / "missing.pt", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["swap"], "error: Missing argument 'PATH'; see 'normcli swap --help'"),
    (["fuse-export", "x.pt"], "error: Missing option '-o' / '--output'; see 'normcli fuse-export --help'"),
    (["inspect", "x.pt", "--bogus"], "error: No such option: --bogus"),
])
def test_usage_errors_read_cleanly(run_normcli, argv, message):
    proc = run_normcli(*argv)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message) and ".;" not in lines[0], proc.stderr
