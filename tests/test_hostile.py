"""Hostile files: every payload would create a marker file if loaded; no normcli command ever runs one.

Without --unsafe-load a command either inspects the file inertly (inspect: exit 0/1) or refuses with exit 2
and one `error:` line naming the offending globals and --unsafe-load. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
in the environment changes nothing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from normcli.cli import app
from tests.conftest import ROOT, SAMPLES, sha256
from tests.hostile_payloads import (ARCH, GLOBAL_NAMES, REDUCE_KINDS, legacy_checkpoint, nested_checkpoint,
                                    pt2_with_payload, raw_getattr_chain_pickle, reduce_payload)

REGISTERED = {c.name for c in app.registered_commands}


def _command(name: str, argv):
    marks = [] if name in REGISTERED else [pytest.mark.skipif(True, reason=f"normcli {name} is not registered yet")]
    return pytest.param(argv, id=name if not argv.__name__.endswith("arch") else f"{name}-arch", marks=marks)


def inspect_plain(path, out):
    return ["inspect", path]


def inspect_arch(path, out):
    return ["inspect", path, "--arch", ARCH]


def swap_arch(path, out):
    return ["swap", path, "--to", "frn", "-o", out / "out.pt", "--arch", ARCH]


def swap_plain(path, out):
    return ["swap", path, "--to", "frn", "-o", out / "out.pt"]


def fuse_export_arch(path, out):
    return ["fuse-export", path, "-o", out / "out.onnx", "--arch", ARCH, "--input-shape", "1,3,32,32"]


def fuse_export_plain(path, out):
    return ["fuse-export", path, "-o", out / "out.onnx", "--input-shape", "1,3,32,32"]


COMMANDS = [_command("inspect", inspect_plain), _command("inspect", inspect_arch), _command("swap", swap_arch),
            _command("swap", swap_plain), _command("fuse-export", fuse_export_arch),
            _command("fuse-export", fuse_export_plain)]

# (container, payload route); the route names the global the error message must show
CASE_LIST = ([("nested-ckpt", k) for k in REDUCE_KINDS]
             + [("legacy", "os.system"), ("legacy", "getattr-chain"),
                ("raw-pickle", "os.system"), ("raw-pickle", "raw-getattr-chain"),
                ("pt2-sample-inputs", "os.system"), ("pt2-sample-inputs", "builtins.exec"),
                ("torchscript", None)])
CASES = [pytest.param(c, k, id=f"{c}-{k}", marks=[])
         for c, k in CASE_LIST]


@pytest.fixture(scope="module")
def exported_pt2(tmp_path_factory):
    """A real torch.export archive of resnet_tiny, written with torch.export.save."""
    import torch

    from tests.hostile_payloads import resnet_state_dict
    from samples.models import resnet_tiny

    model = resnet_tiny().eval()
    model.load_state_dict(resnet_state_dict())
    path = tmp_path_factory.mktemp("pt2") / "resnet_tiny.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 32, 32),)), path)
    with zipfile.ZipFile(path) as z:
        assert any(n.endswith("data/sample_inputs/model.pt") for n in z.namelist())
    return path


def build(container: str, kind: str | None, tmp_path: Path, pt2: Path | None = None) -> tuple[Path, Path]:
    """Write the hostile file for (container, kind) into tmp_path; returns (file, marker)."""
    marker = tmp_path / "marker"
    if container == "nested-ckpt":
        return nested_checkpoint(tmp_path / "evil.ckpt", reduce_payload(kind, marker, tmp_path)), marker
    if container == "legacy":
        return legacy_checkpoint(tmp_path / "evil_legacy.pt", reduce_payload(kind, marker, tmp_path)), marker
    if container == "raw-pickle":
        import pickle

        path = tmp_path / "evil.pt"
        data = raw_getattr_chain_pickle(marker) if kind == "raw-getattr-chain" else \
            pickle.dumps(reduce_payload(kind, marker, tmp_path), protocol=4)
        path.write_bytes(data)
        return path, marker
    if container == "pt2-sample-inputs":
        return pt2_with_payload(pt2, tmp_path / "evil.pt2", reduce_payload(kind, marker, tmp_path)), marker
    if container == "torchscript":
        path = tmp_path / "script.pt"
        shutil.copy(SAMPLES / "resnet_tiny_script.pt", path)
        return path, marker
    raise ValueError(container)


def expected_name(container: str, kind: str | None) -> str:
    if container == "torchscript":
        return "__torch__"
    if kind == "raw-getattr-chain":
        return "getattr"
    return GLOBAL_NAMES[kind]


def assert_never_ran(marker: Path, kind: str | None) -> None:
    if kind == "subprocess.Popen":
        time.sleep(0.3)  # a spawned child would need a moment to create the marker
    assert not marker.exists(), "the file's payload ran"


def check_outcome(code: int, out: str, err: str, argv: list, container: str, kind: str | None) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if argv[0] == "inspect" and "--arch" not in argv and container != "raw-pickle":
        assert code in (0, 1), (code, err)
        assert "layers" in out or "norm layers" in out, out
        return
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    if container == "raw-pickle":
        # not a checkpoint format at all: refused before any unpickling, --unsafe-load would not change it
        assert "plain Python pickle" in lines[0] or "unrecognised file format" in lines[0], lines[0]
        return
    # swap/fuse-export, with or without --arch: the payload is refused by name before anything else is
    # tried (a state dict beside it is not a reason to ask for --arch first)
    assert "--unsafe-load" in lines[0], lines[0]
    if kind == "subprocess.run":  # pickled by the module that holds it (subprocess or a re-export)
        assert re.search(r"\w\.run\b", lines[0]), lines[0]
    else:
        assert expected_name(container, kind) in lines[0], lines[0]


@pytest.fixture(scope="module")
def hostile_file(tmp_path_factory, exported_pt2):
    """Build each hostile file once per module (own directory, own marker); returns (file, marker)."""
    built: dict = {}

    def get(container: str, kind: str | None) -> tuple[Path, Path]:
        if (container, kind) not in built:
            built[(container, kind)] = build(container, kind, tmp_path_factory.mktemp("hostile"), exported_pt2)
        return built[(container, kind)]

    return get


@pytest.mark.parametrize("force_env", [False, True], ids=["env-default", "env-force-no-weights-only"])
@pytest.mark.parametrize("argv", COMMANDS)
@pytest.mark.parametrize("container,kind", CASES)
def test_payload_never_runs_in_process(cli, tmp_path, monkeypatch, hostile_file, container, kind, argv, force_env):
    monkeypatch.chdir(ROOT)
    if force_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path, marker = hostile_file(container, kind)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = sha256(path)
    args = argv(path, out_dir)
    code, out, err = cli(*args, *(["--json"] if args[0] == "inspect" else []))
    assert_never_ran(marker, kind)
    check_outcome(code, out, err, args, container, kind)
    assert sha256(path) == before
    assert list(out_dir.iterdir()) == []


# (container, route, command, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1?)
SUBPROCESS_CASES = [("nested-ckpt", "os.system", inspect_plain, True),
                    ("nested-ckpt", "subprocess.Popen", swap_arch, False),
                    ("nested-ckpt", "os.system", swap_arch, True),
                    ("nested-ckpt", "getattr-chain", fuse_export_arch, True),
                    ("legacy", "os.system", swap_arch, True),
                    ("pt2-sample-inputs", "os.system", swap_plain, False),
                    ("pt2-sample-inputs", "os.system", inspect_arch, True),
                    ("raw-pickle", "raw-getattr-chain", inspect_plain, False),
                    ("torchscript", None, fuse_export_plain, False)]
SUBPROCESS_PARAMS = [pytest.param(c, k, a, f, id=f"{c}-{k}-{a.__name__}" + ("-env-force-no-weights-only" if f else ""))
                     for c, k, a, f in SUBPROCESS_CASES]


@pytest.mark.slow
@pytest.mark.parametrize("container,kind,argv,force_env", SUBPROCESS_PARAMS)
def test_payload_never_runs_in_the_installed_command(run_normcli, tmp_path, exported_pt2, container, kind, argv,
                                                     force_env):
    command = argv.__name__.split("_arch")[0].split("_plain")[0].replace("_", "-")
    if command not in REGISTERED:
        pytest.skip(f"normcli {command} is not registered yet")
    path, marker = build(container, kind, tmp_path, exported_pt2)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = sha256(path)
    args = argv(path, out_dir)
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"} if force_env else {}
    proc = run_normcli(*args, env=env)
    assert_never_ran(marker, kind)
    check_outcome(proc.returncode, proc.stdout, proc.stderr, args, container, kind)
    assert sha256(path) == before
    assert list(out_dir.iterdir()) == []


@pytest.mark.slow
def test_every_payload_is_live_under_unsafe_unpickling(tmp_path, exported_pt2):
    """The control: plain torch.load(weights_only=False) / pickle.load runs each payload, in a child process.
    Without this, a marker that never appears could mean a payload that never worked."""
    files = []
    for container, kind in CASE_LIST:
        if container == "torchscript":
            continue
        case_dir = tmp_path / f"{container}-{kind}"
        case_dir.mkdir()
        path, marker = build(container, kind, case_dir, exported_pt2)
        files.append((container, str(path), str(marker)))
    script = textwrap.dedent("""
        import io, pickle, sys, zipfile, torch
        for container, path, marker in eval(sys.argv[1]):
            try:
                if container == "raw-pickle":
                    pickle.loads(open(path, "rb").read())
                elif container == "pt2-sample-inputs":
                    with zipfile.ZipFile(path) as z:
                        entry = [n for n in z.namelist() if n.endswith("data/sample_inputs/model.pt")][0]
                        torch.load(io.BytesIO(z.read(entry)), weights_only=False)
                else:
                    torch.load(path, weights_only=False)
            except Exception:
                pass
    """)
    subprocess.run([sys.executable, "-c", script, repr(files)], cwd=ROOT, check=True, timeout=120,
                   env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 5
    while time.time() < deadline and not all(Path(m).exists() for _, _, m in files):
        time.sleep(0.1)
    assert [p for _, p, m in files if not Path(m).exists()] == []


def test_pt2_payload_is_in_a_real_export_archive(exported_pt2, tmp_path):
    """The hostile .pt2 is still recognised as a torch.export archive and its weights stay readable."""
    from normcli.formats import detect_format
    from normcli.reader import read_tensors

    path, _ = build("pt2-sample-inputs", "os.system", tmp_path, exported_pt2)
    assert detect_format(path) == "pt2"
    tf = read_tensors(path)
    assert "posix.system" in tf.unsafe_globals
    assert "bn1.running_var" in tf.tensors
