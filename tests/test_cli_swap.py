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
    assert meta["options"]["input_shapes"] == [[1, 3, 32, 32]]
    swapped_again, _ = swap_norms(original, to, **meta["options"])
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


# --- findings first (--fail-on) ----------------------------------------------------------------------------

UNHEALTHY_ARCH = "samples/models.py:unhealthy_net"


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and stderr.rstrip().splitlines()[-1] == lines[0], stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_mabn_swap_of_broken_statistics_stops_before_swapping(run_normcli, samples, tmp_path):
    out = tmp_path / "u.pt"
    proc = run_normcli("swap", samples / "unhealthy.pt", "--to", "mabn", "-o", out, "--arch", UNHEALTHY_ARCH)
    assert proc.returncode == 1 and not out.exists()
    line = one_error_line(proc.stderr)
    assert "--fail-on error" in line and "nothing was written" in line
    for name, code in (("bn_stale", "stale-stats"), ("bn_nan", "non-finite"), ("bn_negative_var", "negative-var")):
        assert f"{name} {code}" in line
        assert any(name in row and code in row and "stops swap" in row for row in proc.stderr.splitlines())

    proc = run_normcli("swap", samples / "unhealthy.pt", "--to", "mabn", "-o", out, "--arch", UNHEALTHY_ARCH,
                       "--json")
    assert proc.returncode == 1 and not out.exists()
    doc = json.loads(proc.stdout)
    assert doc["output"] is None
    stopping = {(f["layer"], f["code"]) for f in doc["findings"] if f["stops"]}
    assert stopping == {("bn_stale", "stale-stats"), ("bn_nan", "non-finite"), ("bn_negative_var", "negative-var")}
    # warnings are reported too, below the default --fail-on level
    assert {"tiny-var", "dead-channels"} <= {f["code"] for f in doc["findings"] if not f["stops"]}


def test_fail_on_warning_and_never(cli, samples, tmp_path):
    out = tmp_path / "u.pt"
    code, stdout, err = cli("swap", samples / "unhealthy.pt", "--to", "frn", "-o", out, "--arch", UNHEALTHY_ARCH,
                            "--fail-on", "warning", "--json")
    # frn keeps weight and bias: dead channels (a weight finding) stop it at --fail-on warning
    assert code == 1 and not out.exists()
    assert {(f["layer"], f["code"]) for f in json.loads(stdout)["findings"] if f["stops"]} == {
        ("bn_dead", "dead-channels")}
    code, stdout, err = cli("swap", samples / "unhealthy.pt", "--to", "mabn", "-o", out, "--arch", UNHEALTHY_ARCH,
                            "--fail-on", "never", "--json")
    # mabn goes on, and then its own check fails: the broken statistics make the eval output NaN
    assert code == 1 and not out.exists() and "drifted" in err
    assert not any(f["stops"] for f in json.loads(stdout)["findings"])
    code, _, err = cli("swap", samples / "unhealthy.pt", "--to", "frn", "-o", out, "--arch", UNHEALTHY_ARCH,
                       "--fail-on", "sometimes")
    assert code == 2 and "--fail-on must be error, warning or never" in err


@pytest.mark.slow
def test_frn_is_stopped_only_by_statistics_it_keeps(run_normcli, samples, tmp_path):
    out = tmp_path / "u.pt"
    # every BatchNorm becomes FRN, which drops running statistics: their findings are shown, and it goes on
    proc = run_normcli("swap", samples / "unhealthy.pt", "--to", "frn", "-o", out, "--arch", UNHEALTHY_ARCH,
                       "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["output"] == str(out) and out.exists() and len(doc["replaced"]) == 8
    errors = [f for f in doc["findings"] if f["severity"] == "error"]
    assert len(errors) == 3 and not any(f["stops"] for f in errors)
    assert all(f["about"] == "statistics" and "running statistics" in f["note"] for f in errors)
    # the original's NaN output shows as a NaN drift, never as none
    assert doc["eval_drift"]["max_abs"] == "nan"
    # a swap that leaves bn_stale a BatchNorm keeps its stale statistics: stopped
    out2 = tmp_path / "u2.pt"
    proc = run_normcli("swap", samples / "unhealthy.pt", "--to", "frn", "-o", out2, "--arch", UNHEALTHY_ARCH,
                       "--include", "bn_nan")
    assert proc.returncode == 1 and not out2.exists()
    line = one_error_line(proc.stderr)
    assert "bn_stale stale-stats" in line and "bn_negative_var negative-var" in line and "bn_nan" not in line


def test_a_non_finite_weight_stops_frn(cli, tmp_path):
    from samples.models import unhealthy_net

    model = unhealthy_net()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # trained-looking statistics everywhere
            m.running_var.fill_(2.0)
            m.running_mean.fill_(0.5)
            m.num_batches_tracked.fill_(10)
    with torch.no_grad():
        model.bn_dead.weight[3] = float("inf")
    ckpt = tmp_path / "w.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "o.pt"
    code, _, err = cli("swap", ckpt, "--to", "frn", "-o", out, "--arch", UNHEALTHY_ARCH)
    assert code == 1 and not out.exists() and "bn_dead non-finite" in err.splitlines()[-1]


# --- a swap that changes nothing --------------------------------------------------------------------------

@pytest.mark.parametrize("selection, reason", [(["--include", "layer9.*"], "not matched by include layer9.*"),
                                               (["--exclude", "*"], "matched by exclude *")])
def test_a_swap_that_replaces_nothing_exits_2(run_normcli, samples, tmp_path, selection, reason):
    out = tmp_path / "o.pt"
    proc = run_normcli("swap", samples / "resnet_tiny.pt", "--to", "frn", "-o", out, "--arch", ARCH, *selection,
                       "--json")
    assert proc.returncode == 2 and not out.exists() and proc.stdout == ""
    line = one_error_line(proc.stderr)
    assert "would replace no layer" in line and reason in line and "nothing was written" in line
    skipped = [row for row in proc.stderr.splitlines() if row.startswith("skipped ")]
    assert len(skipped) == 11 and all(row.endswith(reason) for row in skipped)


def test_a_model_without_batchnorm_exits_2_naming_its_norms(cli, tmp_path):
    from samples.models import small_cnn

    ckpt = tmp_path / "frn_cnn.pt"
    torch.save(small_cnn(norm="frn").state_dict(), ckpt)
    out = tmp_path / "o.pt"
    code, _, err = cli("swap", ckpt, "--to", "mabn", "-o", out, "--arch", "samples/models.py:small_cnn",
                       "--arch-kwargs", '{"norm": "frn"}')
    assert code == 2 and not out.exists()
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: swap to mabn would replace no layer") and "bn1, bn2, bn3" in line
    assert "FilterResponseNorm2d, not a BatchNorm" in line


# --- the stored options rebuild the swapped model -------------------------------------------------------------

@pytest.mark.parametrize("to", ["frn", "mabn"])
def test_stored_options_rebuild_a_partial_swap(cli, samples, tmp_path, to):
    from normcli.swap import swap_norms

    out = tmp_path / f"{to}.pt"
    code, _, err = cli("swap", samples / "resnet_tiny.pt", "--to", to, "-o", out, "--arch", ARCH,
                       "--include", "layer1.*", "--exclude", "*.bn2")
    assert code == 0, err
    saved = torch.load(out, weights_only=True)
    meta = saved["normcli_swap"]
    assert meta["options"]["include"] == ["layer1.*"] and meta["options"]["exclude"] == ["*.bn2"]
    rebuilt, report = swap_norms(resnet_tiny().eval(), meta["to"], **meta["options"])
    rebuilt.load_state_dict(saved["state_dict"], strict=True)
    assert [r["name"] for r in report.replaced] == ["layer1.0.bn1", "layer1.1.bn1"]
    # normcli's own loader rebuilds it the same way
    code, stdout, err = cli("inspect", out, "--arch", ARCH, "--json")
    assert code == 0, err
    kinds = {x["name"]: x["kind"] for x in json.loads(stdout)["layers"]}
    new_kind = "FilterResponseNorm2d" if to == "frn" else "MABN2d"
    assert kinds["layer1.0.bn1"] == new_kind
    assert kinds["layer1.0.bn2"] == "BatchNorm2d" and kinds["bn1"] == "BatchNorm2d"


def test_a_crafted_probe_shape_in_a_swap_file_is_refused_and_older_files_still_load(cli, samples, tmp_path):
    out = tmp_path / "frn.pt"
    assert cli("swap", samples / "resnet_tiny.pt", "--to", "frn", "-o", out, "--arch", ARCH, "--include",
               "layer1.*")[0] == 0
    saved = torch.load(out, weights_only=True)
    # files written before the options held the selection kept it beside them
    options = saved["normcli_swap"]["options"]
    legacy = {"state_dict": saved["state_dict"], "normcli_swap": {
        **saved["normcli_swap"], "include": options.pop("include"), "exclude": options.pop("exclude"),
        "input_shape": options.pop("input_shapes")[0], "options": options}}
    torch.save(legacy, tmp_path / "legacy.pt")
    code, stdout, err = cli("inspect", tmp_path / "legacy.pt", "--arch", ARCH, "--json")
    assert code == 0, err
    kinds = {x["name"]: x["kind"] for x in json.loads(stdout)["layers"]}
    assert kinds["layer1.0.bn1"] == "FilterResponseNorm2d" and kinds["bn1"] == "BatchNorm2d"
    saved = torch.load(out, weights_only=True)
    saved["normcli_swap"]["options"]["input_shapes"] = [[100000, 3, 10000, 10000]]
    crafted = tmp_path / "crafted.pt"
    torch.save(saved, crafted)
    code, _, err = cli("inspect", crafted, "--arch", ARCH)
    assert code == 2 and "normcli_swap.options.input_shapes" in err and "elements" in err
    assert err.count("\n") == 1 and "Traceback" not in err


# --- several inputs ----------------------------------------------------------------------------------------------

TWO_ARCH = "samples/models.py:image_and_features"


@pytest.fixture
def two_input_ckpt(tmp_path):
    from samples.models import image_and_features

    model = image_and_features()
    g = torch.Generator().manual_seed(0)
    for bn in (model.bn_image, model.bn_features):
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64).float() * 0.5)
        bn.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64).float() + 0.5)
        bn.num_batches_tracked.fill_(10)
    path = tmp_path / "two.pt"
    torch.save(model.state_dict(), path)
    return path


def test_swap_probes_every_input(run_normcli, two_input_ckpt, tmp_path):
    out = tmp_path / "o.pt"
    proc = run_normcli("swap", two_input_ckpt, "--to", "frn", "-o", out, "--arch", TWO_ARCH, "--learnable-eps",
                       "--input-shape", "2,3,16,16", "--input-shape", "2,6", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    # the BatchNorm1d on the features input is seen at rank 2, so the learnable-eps FRN takes it
    assert {r["name"]: r["to"] for r in doc["replaced"]} == {"bn_image": "FilterResponseNorm2d",
                                                             "bn_features": "FilterResponseNorm1d"}
    assert doc["input_shapes"] == [[2, 3, 16, 16], [2, 6]]
    assert doc["train_check"]["passed"] and isinstance(doc["eval_drift"]["max_abs"], float)
    # without learnable eps the rank-2 BatchNorm1d stays, for the reason the probe found
    proc = run_normcli("swap", two_input_ckpt, "--to", "frn", "-o", tmp_path / "p.pt", "--arch", TWO_ARCH,
                       "--input-shape", "2,3,16,16", "--input-shape", "2,6", "--json")
    skipped = {s["name"]: s["reason"] for s in json.loads(proc.stdout)["skipped"]}
    assert "(N, C)" in skipped["bn_features"]


def test_swap_shapes_beyond_the_inputs_are_more_configurations(cli, two_input_ckpt, tmp_path):
    from normcli.swap import swap_norms
    from samples.models import image_and_features

    out = tmp_path / "o.pt"
    shapes = ["2,3,16,16", "2,6", "3,3,8,8", "3,6"]
    code, stdout, err = cli("swap", two_input_ckpt, "--to", "mabn", "-o", out, "--arch", TWO_ARCH,
                            *[a for s in shapes for a in ("--input-shape", s)], "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["input_shapes"] == [[2, 3, 16, 16], [2, 6], [3, 3, 8, 8], [3, 6]]
    assert doc["eval_drift"]["max_rel"] <= 1e-5  # mabn keeps the eval output on both configurations
    saved = torch.load(out, weights_only=True)
    rebuilt, _ = swap_norms(image_and_features().eval(), "mabn", **saved["normcli_swap"]["options"])
    rebuilt.load_state_dict(saved["state_dict"], strict=True)

    code, _, err = cli("swap", two_input_ckpt, "--to", "mabn", "-o", out.with_name("x.pt"), "--arch", TWO_ARCH,
                       "--input-shape", "2,3,16,16", "--input-shape", "2,6", "--input-shape", "2,3,16,16")
    assert code == 2 and "3 --input-shape given" in err and "takes 2 positional inputs (image, features)" in err
    assert not out.with_name("x.pt").exists()


def test_swap_runs_on_input_files(cli, two_input_ckpt, tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    image, features = tmp_path / "image.npy", tmp_path / "features.npy"
    np.save(image, rng.standard_normal((1, 3, 8, 8)).astype(np.float32))
    np.save(features, rng.standard_normal((1, 6)).astype(np.float32))
    out = tmp_path / "o.pt"
    code, stdout, err = cli("swap", two_input_ckpt, "--to", "frn", "--learnable-eps", "-o", out, "--arch", TWO_ARCH,
                            "--input", image, "--input", features, "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["input_shapes"] == [[1, 3, 8, 8], [1, 6]] and doc["input_source"] == "inputs"
    assert doc["train_check"]["passed"] and doc["train_check"]["batch_size"] == 2
    code, _, err = cli("swap", two_input_ckpt, "--to", "frn", "-o", tmp_path / "x.pt", "--arch", TWO_ARCH,
                       "--input", image)
    assert code == 2 and "1 --input given" in err and "(image, features)" in err


def test_a_missing_input_is_reported_before_an_existing_output(cli, tmp_path):
    out = tmp_path / "exists.pt"
    out.write_bytes(b"keep")
    code, _, err = cli("swap", tmp_path / "missing.pt", "--to", "frn", "-o", out, "--arch", ARCH)
    assert code == 2 and "missing.pt: no such file" in err and "--force" not in err
    assert out.read_bytes() == b"keep"
