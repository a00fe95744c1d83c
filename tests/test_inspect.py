"""inspect: norm layer discovery, each finding code with a positive and a negative case, JSON, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from normcli.inspection import Thresholds, add_findings, find_norm_layers, inspect_file
from normcli.safe_pickle import LazyArray


def arrays(**named) -> dict:
    return {k: LazyArray(None, 0, np.shape(v), (), str(np.asarray(v).dtype), array_=np.asarray(v))
            for k, v in named.items()}


def bn(prefix="bn", c=4, mean=None, var=None, weight=None, bias=None, nbt=10):
    rng = np.random.default_rng(0)
    d = {"running_mean": rng.normal(size=c) if mean is None else mean,
         "running_var": rng.uniform(0.5, 2, size=c) if var is None else var,
         "weight": rng.uniform(0.5, 1.5, size=c) if weight is None else weight,
         "bias": rng.normal(size=c) if bias is None else bias,
         "num_batches_tracked": np.array(nbt, dtype=np.int64)}
    return {f"{prefix}.{k}": np.asarray(v, dtype=np.float32 if k != "num_batches_tracked" else np.int64)
            for k, v in d.items()}


def findings(tensors: dict, thresholds=Thresholds()):
    layers = find_norm_layers(arrays(**tensors))
    add_findings(layers, thresholds)
    return {layer.name: {f.code: f.channels for f in layer.findings} for layer in layers}


def test_healthy_layer_has_no_findings():
    assert findings(bn()) == {"bn": {}}


@pytest.mark.parametrize("code, change, channels", [
    ("non-finite", {"mean": [0.1, np.nan, 0.2, 0.3]}, [1]),
    ("non-finite", {"weight": [1.0, 1.0, 1.0, np.inf]}, [3]),
    ("negative-var", {"var": [1.0, -0.5, 1.0, 1.0]}, [1]),
    ("tiny-var", {"var": [1e-9, 1.0, 1.0, 2e-6]}, [0, 3]),
    ("dead-channels", {"weight": [0.0, 1.0, 0.0, 1.0]}, [0, 2]),
    ("fp16-overflow", {"weight": [1.0, 1.0, 7e4, 1.0], "var": [1.0, 1.0, 1.0, 1.0]}, [2]),
    ("fp16-overflow", {"mean": [0.0, 7e4, 0.0, 0.0], "var": [1.0, 1.0, 1.0, 1.0], "weight": [1.0] * 4}, [1]),
])
def test_each_finding_and_its_channels(code, change, channels):
    assert findings(bn(**change))["bn"][code] == channels


def test_near_misses_are_not_findings():
    # just inside each threshold: nothing to report
    ok = bn(var=[1.01e-5, 1.0, 1.0, 1.0], weight=[1e-6, 1.0, 1.0, 6.5e4])
    assert findings(ok)["bn"] == {}


def test_stale_stats_needs_initial_values_and_no_tracking():
    stale = bn(mean=[0.0] * 4, var=[1.0] * 4, nbt=0)
    assert findings(stale)["bn"]["stale-stats"] == [0, 1, 2, 3]
    # old checkpoints load with num_batches_tracked = 0: with real statistics that is not stale
    assert "stale-stats" not in findings(bn(nbt=0))["bn"]
    # initial values but batches were tracked (e.g. momentum=0): not stale either
    assert "stale-stats" not in findings(bn(mean=[0.0] * 4, var=[1.0] * 4, nbt=5))["bn"]


def test_mixed_tracking_flags_the_odd_layer_out():
    tensors = {**bn("a", nbt=100), **bn("b", nbt=100), **bn("c", nbt=7)}
    result = findings(tensors)
    assert "mixed-tracking" in result["c"] and "mixed-tracking" not in result["a"]
    same = {**bn("a", nbt=100), **bn("b", nbt=100)}
    assert all("mixed-tracking" not in f for f in findings(same).values())


def test_thresholds_can_be_changed():
    t = bn(var=[1e-3, 1.0, 1.0, 1.0])
    assert "tiny-var" not in findings(t)["bn"]
    assert findings(t, Thresholds(tiny_var_ratio=1000.0))["bn"]["tiny-var"] == [0]


def test_kinds_inferred_from_buffer_names():
    tensors = {**bn("bn"), "frozen.weight": np.ones(3, np.float32), "frozen.bias": np.zeros(3, np.float32),
               "frozen.running_mean": np.zeros(3, np.float32), "frozen.running_var": np.full(3, 2, np.float32),
               "gn.weight": np.ones(5, np.float32), "gn.bias": np.zeros(5, np.float32),
               "conv.weight": np.ones((3, 3, 1, 1), np.float32), "conv.bias": np.zeros(3, np.float32)}
    layers = {x.name: x for x in find_norm_layers(arrays(**tensors))}
    assert layers["bn"].kind == "BatchNorm" and layers["bn"].inferred
    assert layers["frozen"].kind == "FrozenBatchNorm" and layers["frozen"].num_batches_tracked is None
    assert layers["gn"].kind == "AffineNorm"
    assert "conv" not in layers


def test_unhealthy_sample_carries_exactly_its_documented_problems(samples):
    report = inspect_file(samples / "unhealthy.pt")
    got = {x.name: {f.code: f.channels for f in x.findings} for x in report.layers}
    expected = {
        "bn_healthy": {}, "bn_stale": {"stale-stats": list(range(8))},
        "bn_nan": {"non-finite": [1, 5]}, "bn_negative_var": {"negative-var": [2, 6]},
        "bn_tiny_var": {"tiny-var": [0, 3]}, "bn_dead": {"dead-channels": [4, 7]},
        "bn_fp16_overflow": {"fp16-overflow": [2]}, "bn_mixed_tracking": {"mixed-tracking": []},
    }
    assert got == expected


def test_every_healthy_sample_is_clean(samples):
    for name in ("resnet_tiny.pt", "resnet_tiny.ckpt", "resnet_tiny_script.pt", "resnet_tiny.pt2",
                 "resnet_tiny.onnx", "mobilenetv2_tiny_ema.pth", "resnet_tiny.safetensors"):
        report = inspect_file(samples / name)
        assert report.layers and all(not x.findings for x in report.layers), name
        # a TorchScript archive names its classes: that is the file-level info finding needs-classes
        assert [f.code for f in report.file_findings] == (["needs-classes"] if name.endswith("script.pt") else [])
        assert report.worst_severity() == ("info" if name.endswith("script.pt") else None), name


def test_exact_kinds_with_arch(samples):
    report = inspect_file(samples / "resnet_tiny.pt", arch="samples/models.py:resnet_tiny")
    assert report.layers and all(x.kind == "BatchNorm2d" and not x.inferred for x in report.layers)
    assert all(x.eps == 1e-5 for x in report.layers)


def test_onnx_batchnorm_nodes_match_the_checkpoint(samples):
    onnx_layers = inspect_file(samples / "resnet_tiny.onnx").layers
    torch_layers = inspect_file(samples / "resnet_tiny.pt").layers
    assert [x.kind for x in onnx_layers] == ["BatchNormalization"] * len(torch_layers)
    for a, b in zip(onnx_layers, torch_layers):
        np.testing.assert_allclose(a.values["running_var"], b.values["running_var"], rtol=1e-6)
        np.testing.assert_allclose(a.values["bias"], b.values["bias"], rtol=1e-6)


# ------------------------------------------------------------------------------------------------- the CLI

def test_json_schema(cli, samples):
    code, out, err = cli("inspect", samples / "unhealthy.pt", "--json")
    assert code == 1 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    doc = json.loads(out)
    assert set(doc) >= {"path", "format", "layers", "summary"}
    assert doc["summary"]["layers"] == len(doc["layers"]) == 8
    assert doc["summary"]["error"] == 3 and doc["summary"]["warning"] == 4
    for layer in doc["layers"]:
        assert set(layer) >= {"name", "kind", "inferred", "num_features", "num_batches_tracked", "running_mean",
                              "running_var", "weight", "bias", "findings"}
        for f in layer["findings"]:
            assert f["severity"] in ("error", "warning", "info") and isinstance(f["channels"], list)
    nan_layer = next(x for x in doc["layers"] if x["name"] == "bn_nan")
    assert nan_layer["running_mean"]["max"] == "nan" or nan_layer["running_mean"]["mean"] == "nan"


@pytest.mark.parametrize("fail_on, code", [("error", 1), ("warning", 1), ("never", 0)])
def test_fail_on_levels(cli, samples, fail_on, code):
    assert cli("inspect", samples / "unhealthy.pt", "--fail-on", fail_on)[0] == code


def test_fail_on_warning_only_findings(cli, tmp_path):
    import torch

    sd = torch.nn.BatchNorm2d(4).state_dict()
    sd["running_mean"] += 0.5
    sd["num_batches_tracked"] += 3
    sd["weight"][1] = 0.0  # dead channel: a warning
    torch.save(sd, tmp_path / "w.pt")
    assert cli("inspect", tmp_path / "w.pt")[0] == 0
    assert cli("inspect", tmp_path / "w.pt", "--fail-on", "warning")[0] == 1


def test_table_and_layer_detail(cli, samples):
    code, out, _ = cli("inspect", samples / "unhealthy.pt", "--layer", "bn_nan", "--fail-on", "never")
    assert code == 0
    assert "bn_negative_var" in out and "non-finite" in out
    assert "bn_nan (BatchNorm, 8 channels)" in out  # the per-channel table
    code, _, err = cli("inspect", samples / "unhealthy.pt", "--layer", "nothing*")
    assert code == 2 and "matches no norm layer" in err


def test_installed_entry_point(run_normcli, samples):
    proc = run_normcli("inspect", samples / "resnet_tiny.ckpt", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["format"] == "checkpoint" and doc["state_dict_key"] == "state_dict"
    assert doc["summary"]["kinds"] == {"BatchNorm": 11}


@pytest.mark.parametrize("name", ["resnet_tiny.safetensors", "resnet_tiny.onnx", "resnet_tiny.pt",
                                  "resnet_tiny_full.pt"])
def test_inspect_does_not_import_torch(name, samples):
    code = ("import sys\nfrom normcli.cli import main\ntry:\n    main(['inspect', sys.argv[1], '--json'])\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\nassert 'torch' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code, str(samples / name)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_help_does_not_import_torch():
    code = ("import sys\nfrom normcli.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
