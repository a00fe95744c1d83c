"""normcli swap through the real entry point: outputs keep the input's flavour and round-trip."""

from __future__ import annotations

import json

import pytest
import torch

from samples.models import resnet_tiny
from tests.conftest import sha256

ARCH = "samples/models.py:resnet_tiny"


def test_help_names_exactly_the_registry(cli):
    from normcli.cli.swap import TO_HELP
    from normcli.swap import SWAP_TARGETS

    for name, target in SWAP_TARGETS.items():
        assert f"{name}: {target.summary}" in TO_HELP
    code, _, err = cli("swap", "x.pt", "--to", "bogus", "-o", "/tmp/never.pt")
    assert code == 2 and "frn" in err and "mabn" in err


@pytest.mark.parametrize("to, options", [("frn", []), ("mabn", ["--B", "4", "--real-B", "32"])])
def test_state_dict_round_trip(cli, samples, tmp_path, to, options):
    from normcli.swap import swap_norms

    out = tmp_path / f"{to}.pt"
    code, stdout, err = cli("swap", samples / "resnet_tiny.pt", "--to", to, "-o", out, "--arch", ARCH,
                            "--input-shape", "1,3,32,32", "--json", *options)
    assert code == 0, err
    doc = json.loads(stdout)
    assert set(doc) >= {"to", "output", "replaced", "skipped", "absorbed_activations", "eval_drift"}
    assert doc["output"] == str(out) and len(doc["replaced"]) == 11
    saved = torch.load(out, weights_only=True)
    meta = saved["normcli_swap"]
    assert meta["to"] == to and meta["arch"] == ARCH
    # rebuild: the same arch, swap_norms with the stored options, then load the file's state dict strictly
    rebuilt, _ = swap_norms(resnet_tiny().eval(), meta["to"], **meta["options"])
    rebuilt.load_state_dict(saved["state_dict"], strict=True)
    original = resnet_tiny().eval()
    original.load_state_dict(torch.load(samples / "resnet_tiny.pt", weights_only=True))
    swapped_again, _ = swap_norms(original, to, input_shape=[1, 3, 32, 32], **meta["options"])
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(rebuilt.eval()(x), swapped_again.eval()(x))
    if to == "mabn":  # the statistics transfer keeps the eval output
        assert doc["eval_drift"]["max_rel"] <= 1e-5
        torch.testing.assert_close(rebuilt(x), original(x), rtol=1e-5, atol=1e-5)
    else:  # FRN + TLU replaces BN + ReLU: the first ReLU of each block is absorbed, the second stays
        assert "layer1.0.relu (after layer1.0.bn1)" in doc["absorbed_activations"]
        assert len(doc["absorbed_activations"]) == 5


def test_full_module_in_full_module_out(cli, samples, tmp_path, monkeypatch):
    monkeypatch.chdir(samples.parent)
    out = tmp_path / "full_frn.pt"
    code, _, err = cli("swap", samples / "resnet_tiny_full.pt", "--to", "frn", "-o", out)
    assert code == 2 and "--unsafe-load" in err and "samples.models" in err and not out.exists()
    code, _, err = cli("swap", samples / "resnet_tiny_full.pt", "--to", "frn", "-o", out, "--unsafe-load")
    assert code == 0, err
    model = torch.load(out, weights_only=False)
    assert isinstance(model, torch.nn.Module)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "FilterResponseNorm2d" in kinds and "BatchNorm2d" not in kinds


def test_include_exclude_and_skips(cli, samples, tmp_path):
    out = tmp_path / "part.pt"
    code, stdout, _ = cli("swap", samples / "resnet_tiny.pt", "--to", "mabn", "-o", out, "--arch", ARCH,
                          "--include", "layer1.*", "--exclude", "*.bn2", "--json")
    assert code == 0
    doc = json.loads(stdout)
    assert [r["name"] for r in doc["replaced"]] == ["layer1.0.bn1", "layer1.1.bn1"]
    reasons = {s["name"]: s["reason"] for s in doc["skipped"]}
    assert "exclude" in reasons["layer1.0.bn2"] and "include" in reasons["bn1"]


def test_refusals_write_nothing(cli, samples, tmp_path):
    out = tmp_path / "o.pt"
    code, _, err = cli("swap", samples / "resnet_tiny.pt", "--to", "frn", "-o", out)
    assert code == 2 and "--arch" in err and not out.exists()
    code, _, err = cli("swap", samples / "resnet_tiny.pt", "--to", "frn", "-o", out, "--arch", ARCH, "--B", "4")
    assert code == 2 and "does not take" in err and not out.exists()
    out.write_bytes(b"keep me")
    before = sha256(out)
    code, _, err = cli("swap", samples / "resnet_tiny.pt", "--to", "frn", "-o", out, "--arch", ARCH)
    assert code == 2 and "--force" in err and sha256(out) == before
    code, _, err = cli("swap", samples / "resnet_tiny.pt", "--to", "frn", "-o", samples / "resnet_tiny.pt",
                       "--arch", ARCH, "--force")
    assert code == 2 and "input" in err


def test_swap_through_installed_command(run_normcli, samples, tmp_path):
    out = tmp_path / "m.pt"
    proc = run_normcli("swap", samples / "mobilenetv2_tiny.pt", "--to", "mabn", "-o", out,
                       "--arch", "samples/models.py:mobilenetv2_tiny", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert len(doc["replaced"]) == 16 and doc["eval_drift"]["max_rel"] <= 1e-5 and out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("to, folded", [("frn", 0), ("mabn", 11)])
def test_fuse_export_takes_a_swapped_file(cli, samples, tmp_path, to, folded):
    swapped = tmp_path / f"{to}.pt"
    assert cli("swap", samples / "resnet_tiny.pt", "--to", to, "-o", swapped, "--arch", ARCH)[0] == 0
    onnx_path = tmp_path / f"{to}.onnx"
    # the file says how it was swapped; --arch names the original architecture
    code, out, err = cli("fuse-export", swapped, "-o", onnx_path, "--arch", ARCH, "--input-shape", "1,3,32,32",
                         "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["parity"]["passed"] and doc["onnx"]["batchnorm_nodes"] == 0
    assert len(doc["folded"]) == folded  # MABN in eval is an affine map and folds; FRN exports as plain ops
    assert onnx_path.exists()
    code, _, err = cli("fuse-export", swapped, "-o", tmp_path / "x.onnx")
    assert code == 2 and "normcli swap wrote it from --arch" in err


@pytest.mark.parametrize("to, kind, inferred_kind", [("frn", "FilterResponseNorm2d", "FilterResponseNorm"),
                                                     ("mabn", "MABN2d", "MABN2d")])
def test_inspect_knows_normcli_layers(cli, samples, tmp_path, to, kind, inferred_kind):
    swapped = tmp_path / f"{to}.pt"
    assert cli("swap", samples / "resnet_tiny.pt", "--to", to, "-o", swapped, "--arch", ARCH)[0] == 0
    code, out, err = cli("inspect", swapped, "--json")
    assert code == 0, err
    layers = json.loads(out)["layers"]
    assert len(layers) == 11 and {(x["kind"], x["inferred"]) for x in layers} == {(inferred_kind, True)}
    code, out, err = cli("inspect", swapped, "--arch", ARCH, "--json")
    assert code == 0, err
    assert {(x["kind"], x["inferred"]) for x in json.loads(out)["layers"]} == {(kind, False)}
