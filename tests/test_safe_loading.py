"""swap and fuse-export load state dicts through the safe reader: torch's loaders are never entered without
--unsafe-load, the tensors are the file's (dtypes, views and shared storages as torch.load gives them), and a
state dict's module versions (`_metadata`) survive every reader path, so version-dependent loading behaves
as under torch.load."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLES

ARCH = "samples/models.py:resnet_tiny"

GUARD = textwrap.dedent("""
    import sys
    from pathlib import Path
    marker = Path(sys.argv[1])

    def entered(*args, **kwargs):
        marker.write_text("torch's loader was entered")
        raise SystemExit(99)

    import torch, torch.serialization, torch.jit, torch.export
    torch.load = torch.serialization.load = entered
    torch.jit.load = entered
    torch.export.load = entered
    from normcli.cli import main
    main(sys.argv[2:])
""")


def run_guarded(tmp_path: Path, *args) -> tuple[subprocess.CompletedProcess, Path]:
    """The real CLI in a child whose torch.load / torch.jit.load / torch.export.load leave a marker and exit."""
    marker = tmp_path / "entered"
    proc = subprocess.run([sys.executable, "-c", GUARD, str(marker), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    return proc, marker


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [
    ("resnet_tiny.pt", []), ("resnet_tiny_legacy.pt", []), ("resnet_tiny.safetensors", []),
    ("resnet_tiny.ckpt", []), ("resnet_tiny_dp.pt", []), ("resnet_tiny_full.pt", ["--unsafe-load"]),
])
def test_swap_never_enters_torch_load(tmp_path, name, extra):
    proc, marker = run_guarded(tmp_path, "swap", SAMPLES / name, "--to", "frn", "-o", tmp_path / "out.pt",
                               "--arch", ARCH, *extra)
    assert not marker.exists(), proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.pt").exists()


@pytest.mark.slow
def test_fuse_export_never_enters_torch_load(tmp_path):
    proc, marker = run_guarded(tmp_path, "fuse-export", SAMPLES / "resnet_tiny.pt", "-o", tmp_path / "m.onnx",
                               "--arch", ARCH, "--input-shape", "1,3,32,32")
    assert not marker.exists(), proc.stderr
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_swap_input_files_never_enter_torch_load(tmp_path):
    import torch

    g = torch.Generator().manual_seed(0)
    torch.save(torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64).float(), tmp_path / "x.pt")
    proc, marker = run_guarded(tmp_path, "swap", SAMPLES / "resnet_tiny.pt", "--to", "frn", "-o",
                               tmp_path / "out.pt", "--arch", ARCH, "--input", tmp_path / "x.pt")
    assert not marker.exists(), proc.stderr
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_the_guard_sees_torch_load_under_unsafe_load(tmp_path):
    """The control: a full pickle without --arch is torch.load'ed under --unsafe-load, and the guard sees it."""
    proc, marker = run_guarded(tmp_path, "swap", SAMPLES / "resnet_tiny_full.pt", "--to", "frn", "-o",
                               tmp_path / "out.pt", "--unsafe-load")
    assert marker.exists() and proc.returncode == 99


# ---------------------------------------------------------------------------------- tensors as torch gives

@pytest.mark.parametrize("zipfile_format", [True, False], ids=["torch-zip", "legacy"])
def test_tensors_match_torch_load_with_views_shared_storages_and_dtypes(tmp_path, zipfile_format):
    import torch

    from normcli.loading import _torch_state_dict
    from normcli.reader import read_tensors

    g = torch.Generator().manual_seed(0)
    base = torch.randn(24, generator=g, dtype=torch.float64).float()
    sd = {"a": base[:6], "b": base[4:16].view(3, 4), "c": base[4:16].view(3, 4).t(), "bf": base.to(torch.bfloat16),
          "half": base.half(), "long": torch.arange(12).reshape(3, 4)[:, 1], "scalar": torch.tensor(7),
          "flag": torch.tensor([True, False]), "empty": torch.zeros(0, 3),
          "broadcast": torch.ones(1).expand(5, 4)}
    path = tmp_path / "t.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=zipfile_format)
    ref = torch.load(path, weights_only=True)
    got = _torch_state_dict(read_tensors(path))
    assert list(got) == list(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype, k
        assert got[k].shape == ref[k].shape and got[k].stride() == ref[k].stride(), k
        assert torch.equal(got[k], ref[k]), k
    # one storage per file storage: views of one tensor still share it, as under torch.load
    assert got["a"].untyped_storage().data_ptr() == got["b"].untyped_storage().data_ptr()
    assert got["b"].untyped_storage().data_ptr() == got["c"].untyped_storage().data_ptr()
    assert got["broadcast"].stride() == (0, 0)  # repeated, not materialised


# ------------------------------------------------------------------------------------------ module versions

VERSIONED = textwrap.dedent('''
    import torch
    from torch import nn


    class Gain(nn.Module):
        """Version 1 called its parameter `gain`; version 2 `scale`. A state dict without a version is refused."""

        _version = 2

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
            version = local_metadata.get("version")
            if version is None:
                raise ValueError("state dict without module versions")
            if version < 2 and prefix + "gain" in state_dict:
                state_dict[prefix + "scale"] = state_dict.pop(prefix + "gain")
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


        def forward(self, x):
            return x * self.scale.view(1, -1, 1, 1)


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Gain()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return torch.relu(self.bn(self.body(x)))


    def net():
        return Net()
''')


def _old_state_dict(module, prefix: str = ""):
    """``module.state_dict()`` as version 1 wrote it: `gain` for `scale`, BatchNorm version 1 (no
    num_batches_tracked), the metadata kept."""
    import torch

    sd = module.state_dict()
    meta = sd._metadata
    out = collections.OrderedDict()
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        out[k.replace("body.scale", "body.gain")] = v.detach().clone() + (1.0 if k.endswith("scale") else 0.0)
    out._metadata = collections.OrderedDict((k, dict(v)) for k, v in meta.items())
    for k in out._metadata:
        if k.endswith("body") or k.endswith("bn"):
            out._metadata[k]["version"] = 1
    return out


def _trained(net):
    """Running statistics as training leaves them (seeded, float64-drawn), so inspect's findings pass."""
    import torch

    g = torch.Generator().manual_seed(5)
    net.bn.running_mean.copy_(torch.randn(3, generator=g, dtype=torch.float64).float())
    net.bn.running_var.copy_((torch.rand(3, generator=g, dtype=torch.float64) + 0.5).float())
    return net


def _files(tmp_path: Path) -> dict[str, tuple[Path, str | None]]:
    """name -> (file, prefix the reader strips): every torch reader path with a state dict that has metadata."""
    import torch
    from torch import nn

    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        versioned = importlib.import_module("versioned")
    finally:
        sys.path.remove(str(tmp_path))
    plain = _old_state_dict(_trained(versioned.net()))
    dp = _old_state_dict(nn.DataParallel(_trained(versioned.net())))
    files = {}
    torch.save(plain, tmp_path / "zip.pt")
    files["torch-zip"] = tmp_path / "zip.pt"
    torch.save(plain, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    files["legacy"] = tmp_path / "legacy.pt"
    torch.save({"state_dict": dp, "epoch": 3}, tmp_path / "nested_dp.ckpt")
    files["nested-dataparallel"] = tmp_path / "nested_dp.ckpt"
    compiled = collections.OrderedDict((f"_orig_mod.{k}", v) for k, v in plain.items())
    compiled._metadata = collections.OrderedDict(
        (f"_orig_mod.{k}" if k else "_orig_mod", v) for k, v in plain._metadata.items())
    compiled._metadata[""] = {"version": 1}
    compiled._metadata.move_to_end("", last=False)
    torch.save(compiled, tmp_path / "compiled.pt")
    files["compiled"] = tmp_path / "compiled.pt"
    return files


@pytest.fixture
def versioned(tmp_path):
    (tmp_path / "versioned.py").write_text(VERSIONED)
    return tmp_path


@pytest.mark.parametrize("kind", ["torch-zip", "legacy", "nested-dataparallel", "compiled"])
def test_module_versions_survive_every_reader_path(versioned, kind):
    import torch
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    from normcli.loading import load_model
    from normcli.reader import read_tensors

    path = _files(versioned)[kind]
    tf = read_tensors(path)
    assert tf.metadata is not None
    assert tf.metadata["body"]["version"] == 1 and tf.metadata["bn"]["version"] == 1
    assert "" in tf.metadata and not any(k.startswith(("module", "_orig_mod")) for k in tf.metadata)

    loaded = load_model(path, arch=f"{versioned}/versioned.py:net")
    # the same file through torch.load and torch's own prefix removal
    sys.path.insert(0, str(versioned))
    try:
        import versioned as module
    finally:
        sys.path.remove(str(versioned))
    raw = torch.load(path, weights_only=True)
    raw = raw["state_dict"] if "state_dict" in raw else raw
    for prefix in ("module.", "_orig_mod."):
        consume_prefix_in_state_dict_if_present(raw, prefix)
    reference = module.net()
    reference.load_state_dict(raw)
    got, want = loaded.model.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert torch.equal(got["body.scale"], torch.full((3,), 2.0))  # the renamed parameter's values
    assert "bn.num_batches_tracked" in got  # BatchNorm version 1: added on load, as torch does


def test_without_metadata_the_version_check_sees_none(versioned, tmp_path):
    """The control: the same weights with `_metadata` removed fail in the module's own loading, so the tests
    above pass only because the metadata was kept."""
    import torch

    from normcli.errors import NormcliError
    from normcli.loading import load_model

    path = _files(versioned)["torch-zip"]
    sd = torch.load(path, weights_only=True)
    del sd._metadata
    torch.save(sd, tmp_path / "no_meta.pt")
    with pytest.raises(NormcliError, match="state dict without module versions"):
        load_model(tmp_path / "no_meta.pt", arch=f"{versioned}/versioned.py:net")


# swap and fuse-export, through the installed normcli, honour the versions the same way

VERSIONED_ARCH = "versioned.py:net"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["torch-zip", "legacy", "nested-dataparallel", "compiled"])
def test_swap_and_fuse_export_load_old_module_versions_on_every_reader_path(versioned, run_normcli, kind):
    """A state dict written by older module versions (a renamed parameter; BatchNorm version 1, before
    num_batches_tracked existed) loads as torch.load + load_state_dict loads it, so the commands run."""
    import torch

    path = _files(versioned)[kind]
    out = versioned / f"{kind}-mabn.pt"
    swap = run_normcli("swap", path, "--to", "mabn", "-o", out, "--arch", VERSIONED_ARCH,
                       "--input-shape", "2,3,8,8", "--fail-on", "warning", "--json", cwd=versioned)
    assert swap.returncode == 0, swap.stderr
    assert json.loads(swap.stdout)["findings"] == []  # BatchNorm's upgrade on load adds no finding
    saved = torch.load(out, weights_only=True)
    state = saved["state_dict"]
    assert torch.equal(state["body.scale"], torch.full((3,), 2.0))  # `gain` of version 1, renamed on load
    assert state._metadata["body"]["version"] == 2  # written by today's modules: today's versions
    if kind in ("nested-dataparallel", "compiled"):  # the prefixes stripped from keys and versions alike
        onnx_out = versioned / f"{kind}.onnx"
        export = run_normcli("fuse-export", path, "-o", onnx_out, "--arch", VERSIONED_ARCH, "--input-shape",
                             "2,3,8,8", "--samples", "1", "--exporter", "torchscript", "--json", cwd=versioned)
        assert export.returncode == 0, export.stderr
        report = json.loads(export.stdout)
        assert report["parity"]["passed"] and onnx_out.is_file()
        assert [r["norm"] for r in report["folded"] + report["unfolded"]] == ["bn"]


def test_the_commands_read_the_versions_a_file_states(versioned, cli, tmp_path):
    """The controls, through the real entry point: the same BatchNorm weights stated as today's version lack
    num_batches_tracked (refused as torch refuses them), and without any versions the module's own check
    refuses the file; each is one error line, never an unexpected ValueError."""
    import torch

    path = _files(versioned)["torch-zip"]
    sd = torch.load(path, weights_only=True)
    sd._metadata["bn"]["version"] = 2
    torch.save(sd, tmp_path / "v2.pt")
    del sd._metadata
    torch.save(sd, tmp_path / "none.pt")
    cwd = os.getcwd()
    os.chdir(versioned)
    try:
        code, _, err = cli("swap", tmp_path / "v2.pt", "--to", "mabn", "-o", tmp_path / "o.pt", "--arch",
                           VERSIONED_ARCH, "--input-shape", "2,3,8,8")
        assert code == 2 and "bn.num_batches_tracked" in err and "missing" in err
        assert err.count("\n") == 1 and err.startswith("error:")
        code, _, err = cli("fuse-export", tmp_path / "none.pt", "-o", tmp_path / "o.onnx", "--arch",
                           VERSIONED_ARCH, "--input-shape", "2,3,8,8")
        assert code == 2 and "state dict without module versions" in err and "unexpected" not in err
        assert err.count("\n") == 1 and err.startswith("error:")
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "o.pt").exists() and not (tmp_path / "o.onnx").exists()
