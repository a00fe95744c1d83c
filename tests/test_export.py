"""export_onnx: real torch.onnx.export with both exporters, checked by running the file in onnxruntime."""

from __future__ import annotations

import copy
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from normcli.errors import NormcliError
from normcli.export import DEFAULT_OPSET, count_nodes, export_onnx

EXPORTERS = ["dynamo", "torchscript"]


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, image):
        y = torch.relu(self.bn(self.conv(image)))
        return self.head(y.mean(dim=(2, 3)))


class TwoInTwoOut(nn.Module):
    """Two inputs of different ranks; a dict output whose keys are not in alphabetical order."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3)
        self.proj = nn.Linear(10, 6)

    def forward(self, signal, extra):
        features = self.conv(signal).amax(dim=2)
        return {"score": features + self.proj(extra), "map": self.conv(signal) * 2.0}


class InputNorm(nn.Module):
    """A BatchNorm with no conv before it: no exporter can fold it away."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(x)))


def randomize_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def float64_reference(model: nn.Module, *inputs):
    """The model evaluated in float64: the independent reference for what the ONNX file computes."""
    with torch.no_grad():
        out = copy.deepcopy(model).double()(*(t.double() for t in inputs))
    return out


def run_onnx(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {spec.name: t.numpy() for spec, t in zip(session.get_inputs(), inputs)}
    return session, session.run(None, feed)


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_export_runs_in_onnxruntime_and_matches_float64_torch(tmp_path, exporter):
    model = randomize_stats(ConvNet())
    x = torch.randn(2, 3, 12, 12)
    path = tmp_path / "net.onnx"

    result = export_onnx(model, (x,), path, exporter=exporter)

    proto = onnx.load(str(path))
    assert result.exporter == exporter
    assert result.opset == DEFAULT_OPSET[exporter]
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [result.opset]
    assert result.nodes == len(proto.graph.node)  # no functions in these graphs: plain count
    session, (got,) = run_onnx(path, x)
    assert result.input_names == [i.name for i in session.get_inputs()] == ["image"]
    assert result.output_names == [o.name for o in session.get_outputs()] == ["output"]
    np.testing.assert_allclose(got, float64_reference(model, x).numpy(), rtol=1e-4, atol=1e-5)
    assert not [p for p in os.listdir(tmp_path) if p != "net.onnx"], "no side files such as external data"


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_dynamic_batch_makes_dim0_symbolic_and_runs_other_batch_sizes(tmp_path, exporter):
    model = TwoInTwoOut().eval()
    path = tmp_path / "dyn.onnx"
    result = export_onnx(model, (torch.randn(2, 4, 9), torch.randn(2, 10)), path, exporter=exporter,
                         dynamic_batch=True)

    graph = onnx.load(str(path)).graph
    for value in [*graph.input, *graph.output]:
        assert isinstance(dims(value)[0], str), f"{value.name}: batch dim should be symbolic, got {dims(value)}"
        assert all(isinstance(d, int) for d in dims(value)[1:]), "only the batch dim is symbolic"
    assert result.dynamic_batch
    for batch in (1, 5):
        signal, extra = torch.randn(batch, 4, 9), torch.randn(batch, 10)
        _, got = run_onnx(path, signal, extra)
        want = float64_reference(model, signal, extra)
        np.testing.assert_allclose(got[0], want["score"].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[1], want["map"].numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_static_export_fixes_the_batch_size(tmp_path, exporter):
    path = tmp_path / "static.onnx"
    export_onnx(ConvNet().eval(), (torch.randn(2, 3, 8, 8),), path, exporter=exporter)
    graph = onnx.load(str(path)).graph
    assert dims(graph.input[0]) == [2, 3, 8, 8]
    with pytest.raises(Exception):  # onnxruntime refuses another batch size
        run_onnx(path, torch.randn(3, 3, 8, 8))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_multi_input_multi_output_names_follow_the_model(tmp_path, exporter):
    model = TwoInTwoOut().eval()
    signal, extra = torch.randn(3, 4, 9), torch.randn(3, 10)
    path = tmp_path / "multi.onnx"

    result = export_onnx(model, (signal, extra), path, exporter=exporter)

    session, got = run_onnx(path, signal, extra)
    assert result.input_names == ["signal", "extra"]
    assert result.output_names == [o.name for o in session.get_outputs()] == ["score", "map"]
    want = float64_reference(model, signal, extra)
    assert got[0].shape == (3, 6) and got[1].shape == (3, 6, 7)
    np.testing.assert_allclose(got[1], want["map"].numpy(), rtol=1e-4, atol=1e-5)


def test_tuple_outputs_get_numbered_names_and_explicit_names_win(tmp_path):
    class Pair(nn.Module):
        def forward(self, x):
            return x + 1, (x * 3).sum(dim=1)

    x = torch.randn(2, 4)
    auto = export_onnx(Pair().eval(), (x,), tmp_path / "a.onnx", exporter="torchscript")
    named = export_onnx(Pair().eval(), (x,), tmp_path / "b.onnx", exporter="torchscript",
                        input_names=["pixels"], output_names=["plus", "total"])
    assert auto.output_names == ["output_0", "output_1"]
    assert (named.input_names, named.output_names) == (["pixels"], ["plus", "total"])
    _, (plus, total) = run_onnx(tmp_path / "b.onnx", x)
    np.testing.assert_allclose(total, (x.double() * 3).sum(dim=1).numpy(), rtol=1e-5, atol=1e-5)


def test_dynamo_export_keeps_stdout_clean(tmp_path, capfd):
    os.write(1, b"before\n")
    result = export_onnx(ConvNet().eval(), (torch.randn(1, 3, 8, 8),), tmp_path / "quiet.onnx", exporter="dynamo")
    os.write(1, b"after\n")
    print("python-level print still works")

    out, _ = capfd.readouterr()
    assert out == "before\nafter\npython-level print still works\n"
    assert result.nodes > 0


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_batchnorm_nodes_are_counted_when_the_exporter_keeps_them(tmp_path, exporter):
    path = tmp_path / "bn.onnx"
    result = export_onnx(randomize_stats(InputNorm()), (torch.randn(4, 6),), path, exporter=exporter)
    graph = onnx.load(str(path)).graph
    assert result.batchnorm_nodes == sum(n.op_type == "BatchNormalization" for n in graph.node) == 1


def _batchnorm_function_model() -> onnx.ModelProto:
    """A graph that calls a local function (BatchNormalization + Relu) twice and has an If with a BN inside."""
    c = 3
    bn_inputs = ["x", "scale", "bias", "mean", "var"]
    block = helper.make_function(
        "local", "NormRelu", ["x", "scale", "bias", "mean", "var"], ["y"],
        [helper.make_node("BatchNormalization", bn_inputs, ["t"]), helper.make_node("Relu", ["t"], ["y"])],
        opset_imports=[helper.make_opsetid("", 18)])
    params = ["scale", "bias", "mean", "var"]
    branch_then = helper.make_graph(
        [helper.make_node("BatchNormalization", ["h2", *params], ["then_out"])], "then", [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [1, c, 2, 2])])
    branch_else = helper.make_graph(
        [helper.make_node("Identity", ["h2"], ["else_out"])], "else", [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [1, c, 2, 2])])
    nodes = [
        helper.make_node("NormRelu", ["input", *params], ["h1"], domain="local"),
        helper.make_node("NormRelu", ["h1", *params], ["h2"], domain="local"),
        helper.make_node("If", ["flag"], ["output"], then_branch=branch_then, else_branch=branch_else),
    ]
    inits = [helper.make_tensor(name, TensorProto.FLOAT, [c], [1.0] * c) for name in params]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, c, 2, 2]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, c, 2, 2])], initializer=inits)
    model = helper.make_model(graph, functions=[block],
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)])
    onnx.checker.check_model(model)
    return model


def test_count_nodes_sees_into_local_functions_and_subgraphs():
    model = _batchnorm_function_model()
    # two calls of a 2-node function, the If itself, and one node in each branch
    assert count_nodes(model) == 2 * 2 + 1 + 1 + 1
    assert count_nodes(model, op_type="BatchNormalization") == 2 + 1
    assert count_nodes(model, op_type="Relu") == 2
    # the top-level graph alone would have shown no BatchNormalization at all
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def test_torchscript_writes_an_older_opset_on_request(tmp_path):
    path = tmp_path / "old.onnx"
    result = export_onnx(ConvNet().eval(), (torch.randn(1, 3, 8, 8),), path, exporter="torchscript", opset=13)
    assert result.opset == 13
    assert [o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")] == [13]


@pytest.mark.parametrize("exporter, opset, hint", [("dynamo", 17, "torchscript"), ("torchscript", 21, "dynamo")])
def test_an_opset_the_exporter_cannot_write_is_refused_before_exporting(tmp_path, exporter, opset, hint):
    path = tmp_path / "never.onnx"
    with pytest.raises(NormcliError, match=f"{exporter}.*{opset}.*{hint}"):
        export_onnx(ConvNet().eval(), (torch.randn(1, 3, 8, 8),), path, exporter=exporter, opset=opset)
    assert not path.exists()


def test_a_model_dynamo_cannot_capture_names_the_exporter_and_suggests_the_other(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # control flow on values: torch.export cannot capture it
                return x * 2
            return x

    with pytest.raises(NormcliError) as info:
        export_onnx(DataDependent().eval(), (torch.randn(2, 3),), tmp_path / "dd.onnx", exporter="dynamo")
    message = str(info.value)
    assert "dynamo exporter" in message and "--exporter torchscript" in message
    assert "\n" not in message and "\x1b" not in message


def test_a_training_mode_model_is_refused(tmp_path):
    with pytest.raises(NormcliError, match="eval"):
        export_onnx(ConvNet().train(), (torch.randn(2, 3, 8, 8),), tmp_path / "t.onnx")


def test_unknown_exporter_is_refused(tmp_path):
    with pytest.raises(NormcliError, match="dynamo, torchscript"):
        export_onnx(ConvNet().eval(), (torch.randn(1, 3, 8, 8),), tmp_path / "t.onnx", exporter="jit")
