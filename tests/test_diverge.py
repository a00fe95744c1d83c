"""The first diverging layer: an ONNX export broken on purpose at a known module is caught at that module."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from normcli.diverge import _scopes, find_divergence
from normcli.fold import fold_batchnorm
from samples.models import MODELS


def export(model, x, path, dynamo: bool) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=["x"], output_names=["y"])


def break_conv(path, module: str, shift: float = 0.05) -> None:
    """Shift the bias of the Conv node exported for ``module``: the export is now wrong from there on (the
    weight stays, so the node can still be told by its weight's bytes)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    values = {init.name: init for init in model.graph.initializer}
    values.update({n.output[0]: values[n.input[0]] for n in model.graph.node
                   if n.op_type == "Identity" and n.input[0] in values})

    def is_the_module(node) -> bool:  # by the exporter's scope, or by the weight's values
        weight = values.get(node.input[1])
        return module in _scopes(node, {module}) or (
            weight is not None and np.array_equal(numpy_helper.to_array(weight), WEIGHTS[module]))

    (node,) = [n for n in model.graph.node if n.op_type == "Conv" and is_the_module(n)]
    init = values[node.input[2]]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(shift), init.name))
    onnx.save(model, str(path))


WEIGHTS: dict[str, np.ndarray] = {}


@pytest.fixture(scope="module")
def folded_resnet():
    torch.manual_seed(0)
    model = MODELS["resnet_tiny"][0]().eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # statistics off the 0/1 defaults, so every folded conv has its own bias
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    folded, _ = fold_batchnorm(model, example_inputs=(x,))
    WEIGHTS.update({n: m.weight.detach().numpy() for n, m in folded.named_modules() if hasattr(m, "weight")})
    return folded, x


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_a_faithful_export_has_no_divergence_and_matches_every_layer(folded_resnet, tmp_path, dynamo):
    model, x = folded_resnet
    path = tmp_path / "m.onnx"
    export(model, x, path, dynamo)
    result = find_divergence(model, path, [(x,)], atol=1e-4, rtol=1e-3)
    assert result.first is None
    matched = {m.module for m in result.modules}
    # every conv and the head are matched to an ONNX value (the folded model is a GraphModule: it calls its
    # leaf modules directly, so only they run)
    assert {"conv1", "layer1.0.conv1", "layer2.0.conv2", "layer3.0.downsample.0", "avgpool", "fc"} <= matched
    if dynamo:  # the exporter records module paths: parameter-free modules are matched too
        relu_calls = [m.call for m in result.modules if m.module == "layer1.0.relu"]
        assert relu_calls == [0, 1]  # torchvision's shared ReLU, both calls


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("culprit", ["layer2.0.conv1", "layer1.1.conv2"])
def test_the_module_broken_on_purpose_is_named_first(folded_resnet, tmp_path, dynamo, culprit):
    model, x = folded_resnet
    path = tmp_path / "m.onnx"
    export(model, x, path, dynamo)
    break_conv(path, culprit)
    result = find_divergence(model, path, [(x,)], atol=1e-4, rtol=1e-3)
    assert result.first is not None and result.first.module == culprit
    assert result.first.max_abs > 1e-3
    order = [m.module for m in result.modules]
    # everything before the culprit in execution order still agrees
    assert all(m.passed for m in result.modules[:order.index(culprit)])
