"""fuse-export --lower-unfolded mul-add|keep: BatchNormalization nodes the fold left become a per-channel
Mul + Add with scale and shift computed in float64, proved by onnxruntime parity; nodes that cannot be lowered
exactly stay, with the reason."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from normcli.lower import LowerReport, lower_model, lower_unfolded
from samples.models import MODELS


def seeded(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[name][0]()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
    return model.eval()


def ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def run(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("name, shape, left", [("bn_before_conv", "2,4,16,16", 1), ("two_consumers", "2,3,16,16", 1)])
def test_leftover_norms_become_mul_add_and_parity_passes(cli, tmp_path, name, shape, left):
    ckpt = tmp_path / "sd.pt"
    torch.save(seeded(name).state_dict(), ckpt)
    arch = f"samples/models.py:{name}"
    outs = {}
    for mode in ("keep", "mul-add"):
        outs[mode] = tmp_path / f"{mode}.onnx"
        code, out, err = cli("fuse-export", ckpt, "--arch", arch, "-o", outs[mode], "--input-shape", shape,
                             "--lower-unfolded", mode, "--json")
        assert code == 0, err
        report = json.loads(out)
        assert report["lower_unfolded"] == mode and report["parity"]["passed"] and len(report["unfolded"]) == left
        if mode == "keep":
            assert report["onnx"]["batchnorm_nodes"] == left and report["lowered"] == []
        else:
            assert report["onnx"]["batchnorm_nodes"] == 0 and len(report["lowered"]) == left
            assert report["lower_kept"] == []
    assert "BatchNormalization" not in ops(outs["mul-add"])
    assert ops(outs["mul-add"]).count("Mul") == ops(outs["keep"]).count("Mul") + left
    x = np.random.default_rng(0).standard_normal([int(d) for d in shape.split(",")]).astype(np.float32)
    np.testing.assert_allclose(run(outs["mul-add"], x), run(outs["keep"], x), rtol=1e-5, atol=1e-5)


def test_keep_is_the_default(cli, tmp_path):
    """bench_lower_unfolded.py measured BatchNormalization faster than Mul + Add in onnxruntime."""
    from normcli.cli.fuse_export import DEFAULT_LOWER as CLI_DEFAULT
    from normcli.lower import DEFAULT_LOWER

    assert DEFAULT_LOWER == CLI_DEFAULT == "keep"
    ckpt = tmp_path / "sd.pt"
    torch.save(seeded("bn_before_conv").state_dict(), ckpt)
    code, out, err = cli("fuse-export", ckpt, "--arch", "samples/models.py:bn_before_conv", "-o",
                         tmp_path / "m.onnx", "--input-shape", "1,4,16,16", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["lower_unfolded"] == "keep" and report["onnx"]["batchnorm_nodes"] == 1 and report["lowered"] == []


def bn_graph(shape, params_as_inputs: bool = False, training: bool = False, dtype=np.float32) -> onnx.ModelProto:
    """One BatchNormalization node on an input of ``shape`` (None: unknown rank), statistics from a seeded
    float64 generator."""
    c = 5
    g = np.random.default_rng(7)
    values = {"gamma": g.random(c) + 0.5, "beta": g.standard_normal(c), "mean": g.standard_normal(c),
              "var": g.random(c) + 0.1}
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    x = helper.make_tensor_value_info("x", elem, shape)
    y = helper.make_tensor_value_info("y", elem, shape)
    inits = [numpy_helper.from_array(v.astype(dtype), k) for k, v in values.items()]
    inputs = [x]
    if params_as_inputs:
        inputs += [helper.make_tensor_value_info(k, elem, [c]) for k in values]
        inits = []
    attrs = {"epsilon": 1e-3}
    if training:
        attrs["training_mode"] = 1
    node = helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["y"], name="bn", **attrs)
    graph = helper.make_graph([node], "g", inputs, [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return model, values


@pytest.mark.parametrize("shape", [[3, 5], [2, 5, 7], [2, 5, 4, 4], [1, 5, 2, 3, 3]])
def test_scale_and_shift_are_float64_rounded_once_at_every_rank(tmp_path, shape):
    model, v = bn_graph(shape)
    path = tmp_path / "bn.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = run(path, x)
    report = lower_unfolded(path, "mul-add")
    assert report.lowered == [{"node": "bn", "channels": 5}] and report.kept == []
    lowered = onnx.load(str(path))
    assert [n.op_type for n in lowered.graph.node] == ["Mul", "Add"]
    inits = {t.name: numpy_helper.to_array(t) for t in lowered.graph.initializer}
    assert sorted(inits) == ["bn_lowered_scale", "bn_lowered_shift"]  # the node's four tensors are gone
    eps = np.float64(np.float32(1e-3))
    scale64 = v["gamma"].astype(np.float32).astype(np.float64) / np.sqrt(v["var"].astype(np.float32) + eps)
    shift64 = v["beta"].astype(np.float32) - v["mean"].astype(np.float32).astype(np.float64) * scale64
    expect_shape = (5,) + (1,) * (len(shape) - 2)
    assert inits["bn_lowered_scale"].shape == expect_shape
    np.testing.assert_array_equal(inits["bn_lowered_scale"].ravel(), scale64.astype(np.float32))
    np.testing.assert_array_equal(inits["bn_lowered_shift"].ravel(), shift64.astype(np.float32))
    # float32 rounding of a multiply-add against onnxruntime's BatchNormalization kernel
    np.testing.assert_allclose(run(path, x), want, rtol=1e-5, atol=1e-5)


def test_float16_graph_keeps_its_dtype(tmp_path):
    model, _ = bn_graph([2, 5, 3, 3], dtype=np.float16)
    report = LowerReport("mul-add")
    assert lower_model(model, report)
    assert {t.data_type for t in model.graph.initializer} == {TensorProto.FLOAT16}


@pytest.mark.parametrize("kwargs, reason", [
    ({"shape": [2, 5, 4, 4], "training": True}, "it runs in training mode (batch statistics)"),
    ({"shape": [2, 5, 4, 4], "params_as_inputs": True},
     "its parameters gamma, beta, mean, var are computed in the graph, not stored"),
    ({"shape": None}, "the rank of its input is unknown after shape inference"),
])
def test_nodes_that_cannot_be_lowered_exactly_stay_with_the_reason(kwargs, reason):
    model, _ = bn_graph(**kwargs)
    before = model.SerializeToString()
    report = LowerReport("mul-add")
    assert not lower_model(model, report)
    assert report.kept == [{"node": "bn", "reason": reason}] and report.lowered == []
    assert model.SerializeToString() == before


def test_bad_mode_is_one_error_line(run_normcli, tmp_path):
    done = run_normcli("fuse-export", "samples/resnet_tiny.pt", "-o", tmp_path / "m.onnx", "--arch",
                       "samples/models.py:resnet_tiny", "--lower-unfolded", "fold")
    assert done.returncode == 2 and done.stderr.startswith("error: --lower-unfolded must be mul-add or keep")
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_benchmark_quick_run_gives_a_row_of_both_forms():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_lower_unfolded.py"
    spec = importlib.util.spec_from_file_location("bench_lower_unfolded_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (row,) = bench.run(quick=True)
    assert "6 leftover norms, keep (default) vs mul-add" in row["name"]
    assert row["normcli"] > 0 and row["baseline"] > 0 and row["bar"] == 1.02
    assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
