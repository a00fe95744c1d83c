"""Nothing from a file runs without --unsafe-load: payloads are inspected inertly or refused by name."""

from __future__ import annotations

import os

import pytest
import torch

from samples.models import resnet_tiny


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil_ckpt(tmp_path):
    """A Lightning-style checkpoint with a valid state dict and a payload among its hyper-parameters."""
    marker = tmp_path / "marker"
    sd = resnet_tiny().state_dict()
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()},
                "hyper_parameters": {"cfg": _Payload(marker)}}, path)
    return path, marker


@pytest.mark.parametrize("force_env", [False, True])
def test_inspect_reads_the_weights_and_never_runs_the_payload(run_normcli, evil_ckpt, force_env):
    path, marker = evil_ckpt
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"} if force_env else {}
    proc = run_normcli("inspect", path, "--json", "--fail-on", "never", env=env)
    assert proc.returncode == 0, proc.stderr
    assert '"layers"' in proc.stdout
    assert not marker.exists()


@pytest.mark.parametrize("force_env", [False, True])
def test_loading_into_arch_refuses_and_names_the_global(run_normcli, evil_ckpt, force_env):
    path, marker = evil_ckpt
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"} if force_env else {}
    proc = run_normcli("inspect", path, "--arch", "samples/models.py:resnet_tiny", env=env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "--unsafe-load" in proc.stderr
    assert "system" in proc.stderr  # posix.system / os.system named
    assert not marker.exists()


def test_full_module_needs_unsafe_load_to_be_loaded(samples):
    from normcli.errors import NormcliError
    from normcli.loading import load_model

    with pytest.raises(NormcliError, match="--unsafe-load.*samples.models"):
        load_model(samples / "resnet_tiny_full.pt")
    with pytest.raises(NormcliError, match="--unsafe-load"):
        load_model(samples / "resnet_tiny_script.pt")
    with pytest.raises(NormcliError, match="--arch"):
        load_model(samples / "resnet_tiny.pt")


def test_unsafe_load_gives_the_live_modules(samples, monkeypatch):
    from normcli.loading import load_model

    monkeypatch.chdir(samples.parent)
    ref = torch.load(samples / "resnet_tiny.pt", weights_only=True)
    x = torch.randn(2, 3, 32, 32)
    expected = resnet_tiny().eval()
    expected.load_state_dict(ref)
    for name, flavour in (("resnet_tiny_full.pt", "full-pickle"), ("resnet_tiny_script.pt", "torchscript"),
                          ("resnet_tiny.pt2", "pt2")):
        loaded = load_model(samples / name, unsafe_load=True)
        assert loaded.format == flavour and loaded.flavour == "module"
        torch.testing.assert_close(loaded.model.eval()(x) if flavour != "pt2" else loaded.model(x), expected(x))
    assert load_model(samples / "resnet_tiny.pt2", unsafe_load=True).example_inputs[0].shape == (2, 3, 32, 32)


def test_arch_loading_matches_torch_load(samples):
    from normcli.loading import load_model

    ref = torch.load(samples / "resnet_tiny.pt", weights_only=True)
    for name in ("resnet_tiny.pt", "resnet_tiny_legacy.pt", "resnet_tiny.ckpt", "resnet_tiny_dp.pt",
                 "resnet_tiny.safetensors"):
        loaded = load_model(samples / name, arch="samples/models.py:resnet_tiny")
        assert loaded.flavour == "state_dict"
        for k, v in loaded.model.state_dict().items():
            torch.testing.assert_close(v, ref[k], msg=f"{name}: {k}")


def test_inspect_unsafe_load_uses_the_live_module(cli, samples, monkeypatch):
    import json

    monkeypatch.chdir(samples.parent)
    code, out, _ = cli("inspect", samples / "resnet_tiny_script.pt", "--unsafe-load", "--json")
    assert code == 0
    layers = json.loads(out)["layers"]
    # kinds come from the live modules (a traced archive keeps no eps attribute: it was inlined)
    assert layers and all(x["kind"] == "BatchNorm2d" and not x["inferred"] for x in layers)
