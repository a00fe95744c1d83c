"""fold_weight_norm and fuse-export of weight-normalized models: structure (no g, v or norm-of-v subgraph left)
and numbers (the folded weight is the float64 value rounded once; outputs against a float64 evaluation)."""

from __future__ import annotations

import contextlib
import io
import json
import textwrap
import warnings
from collections import Counter

import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations

from normcli.fuse_export import fuse_export
from normcli.weight_norm import copy_module, fold_weight_norm, weight_norm_value


def old_weight_norm(module, name="weight", dim=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, and still in many vocoders
        return torch.nn.utils.weight_norm(module, name=name, dim=dim)


FORMS = {"hook": old_weight_norm, "parametrize": parametrizations.weight_norm}
LAYERS = {
    "Conv1d": (lambda: nn.Conv1d(4, 6, 5, padding=2), (3, 4, 17)),
    "Conv2d": (lambda: nn.Conv2d(3, 5, 3), (2, 3, 7, 6)),
    "ConvTranspose1d": (lambda: nn.ConvTranspose1d(6, 4, 8, stride=4, padding=2), (2, 6, 9)),  # vocoder upsampling
    "Linear": (lambda: nn.Linear(7, 5), (4, 7)),
}
NORM_OPS = {"ReduceL2", "Sqrt", "Div", "ReduceSumSquare", "Pow", "ReduceSum"}


def seeded(layer: nn.Module, seed: int) -> nn.Module:
    """Float64 init from a seeded generator, with per-slice scales spread over decades, cast to float32."""
    g = torch.Generator().manual_seed(seed)
    layer = layer.double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        layer.weight.mul_(10 ** (2 * torch.rand(layer.weight.shape[0], generator=g, dtype=torch.float64) - 1)
                          .reshape(-1, *([1] * (layer.weight.dim() - 1))))
    return layer.float()


def weight_norm_free(model: nn.Module) -> bool:
    keys = set(model.state_dict())
    return (not any(k.endswith(("_g", "_v")) or "parametrizations" in k for k in keys)
            and not any(m._forward_pre_hooks for m in model.modules()))


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dim", [0, 1, None])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_fold_is_the_float64_weight_rounded_once_and_no_worse_than_the_original(form, dim, kind):
    factory, shape = LAYERS[kind]
    model = nn.Sequential(FORMS[form](seeded(factory(), seed=len(kind)), dim=dim), nn.Tanh()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, report = fold_weight_norm(model)

    assert report.folded == [{"norm": "0", "into": "0"}] and report.unfolded == []
    assert weight_norm_free(folded) and type(folded[0]) is type(factory())
    assert set(folded.state_dict()) == {"0.weight", "0.bias"}
    # the original is untouched and still runs as before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    g, v = (before["0.weight_g"], before["0.weight_v"]) if form == "hook" else \
        (before["0.parametrizations.weight.original0"], before["0.parametrizations.weight.original1"])
    exact = weight_norm_value(g, v, dim)
    assert torch.equal(folded[0].weight, exact.float())
    with torch.no_grad():  # elementwise, the once-rounded weight is the closest float32 to the float64 value
        if form == "hook":
            model(torch.zeros(shape))  # the hook computes its weight at each forward
        computed = model[0].weight
        assert ((folded[0].weight.double() - exact).abs() <= (computed.double() - exact).abs()).all()

    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        truth = copy_module(model).double()(x.double())
        folded_error = (folded(x).double() - truth).abs().max().item()
        original_error = (model(x).double() - truth).abs().max().item()
    # the same float32 conv on a weight at least as close: the error differs by at most accumulation order
    assert folded_error <= original_error + 2 * torch.finfo(torch.float32).eps * truth.abs().max().item()
    torch.testing.assert_close(folded(x), model(x))


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data(), seed=st.integers(0, 2**16))
def test_property_weight_norm_value_is_torchs_rule_in_float64(shape, data, seed):
    dim = data.draw(st.sampled_from([None, *range(len(shape))]))
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(shape, generator=gen, dtype=torch.float64) + 0.1
    g_shape = [1] * len(shape) if dim is not None else []
    if dim is not None:
        g_shape[dim] = shape[dim]
    g = torch.randn(g_shape, generator=gen, dtype=torch.float64)
    expected = torch._weight_norm(v, g, -1 if dim is None else dim)
    torch.testing.assert_close(weight_norm_value(g, v, dim), expected)  # float64 tolerances


def test_weight_norm_with_other_parametrizations_stays():
    class Scale(nn.Module):
        def forward(self, x):
            return 2 * x

    layer = parametrizations.weight_norm(nn.Conv1d(3, 4, 3))
    torch.nn.utils.parametrize.register_parametrization(layer, "bias", Scale())
    model = nn.Sequential(layer).eval()
    folded, report = fold_weight_norm(model)
    assert report.folded == [] and "other tensors of the layer are parametrized too (bias)" in \
        report.unfolded[0]["reason"]
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(folded(x), model(x))


def test_no_weight_norm_returns_the_model_itself():
    model = nn.Sequential(nn.Conv1d(3, 4, 3)).eval()
    folded, report = fold_weight_norm(model)
    assert folded is model and report.folded == report.unfolded == []


def test_rnn_weight_norm_folds_and_the_rnn_uses_the_plain_weights():
    lstm = old_weight_norm(parametrizations.weight_norm(nn.LSTM(3, 4), "weight_hh_l0"), "weight_ih_l0", dim=0)
    folded, report = fold_weight_norm(lstm.eval())
    assert {f["norm"] for f in report.folded} == {"weight_hh_l0", "weight_ih_l0"}
    assert weight_norm_free(folded)
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(folded(x)[0], lstm(x)[0])


# ---------------------------------------------------------------------------------------------------------
# fuse-export


class Vocoder(nn.Module):
    """HiFi-GAN-like: weight-normed convs, a transposed-conv upsampler, a BatchNorm after it, a dim=None head."""

    def __init__(self, form):
        super().__init__()
        wn = FORMS[form]
        self.pre = wn(seeded(nn.Conv1d(4, 8, 7, padding=3), 0))
        self.up = wn(seeded(nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1), 1), dim=1)
        self.bn = nn.BatchNorm1d(4)
        self.post = wn(seeded(nn.Conv1d(4, 1, 3, padding=1), 2), dim=None)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.randn(4, generator=g))
            self.bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)

    def forward(self, x):
        return torch.tanh(self.post(self.bn(self.up(nn.functional.leaky_relu(self.pre(x), 0.1)))))


def onnx_ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("form", list(FORMS))
def test_fuse_export_folds_weight_norm_and_the_onnx_has_no_norm_of_v(form, tmp_path):
    model = Vocoder(form).eval()
    # control: exported as it is, the graph computes ||v|| (so the check below can fail)
    control = tmp_path / "control.onnx"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 4, 16),), str(control), dynamo=False)
    assert onnx_ops(control).keys() & NORM_OPS

    out = tmp_path / "vocoder.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        report = fuse_export(model, out, input_shapes=[(2, 4, 16)], exporter="torchscript")
    assert report.passed and report.fold_check.passed
    assert report.folded == [{"norm": "pre", "into": "pre"}, {"norm": "up", "into": "up"},
                             {"norm": "post", "into": "post"}, {"norm": "bn", "into": "up"}]
    assert report.unfolded == []
    ops = onnx_ops(out)
    assert not ops.keys() & NORM_OPS, ops
    assert ops == Counter({"Conv": 2, "ConvTranspose": 1, "LeakyRelu": 1, "Tanh": 1})
    names = {i.name for i in onnx.load(str(out)).graph.initializer}
    assert not any(n.endswith(("_g", "_v")) or "original" in n for n in names)
    assert isinstance(model.up, nn.ConvTranspose1d) and weight_norm_free(model) is False  # input untouched


ARCH = textwrap.dedent("""
    import torch
    from torch import nn
    from torch.nn.utils import parametrizations


    def build():
        return nn.Sequential(parametrizations.weight_norm(nn.Conv1d(4, 8, 5, padding=2)), nn.LeakyReLU(0.1),
                             parametrizations.weight_norm(nn.ConvTranspose1d(8, 2, 4, stride=2, padding=1), dim=1))
""")


@pytest.mark.slow
def test_fuse_export_of_a_weight_normed_state_dict_through_the_installed_normcli(run_normcli, tmp_path):
    arch = tmp_path / "voc.py"
    arch.write_text(ARCH)
    namespace: dict = {}
    exec(compile(ARCH, str(arch), "exec"), namespace)
    model = namespace["build"]()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).float())
    ckpt = tmp_path / "voc.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "voc.onnx"
    result = run_normcli("fuse-export", ckpt, "-o", out, "--arch", f"{arch}:build", "--input-shape", "1,4,32",
                         "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["folded"] == [{"norm": "0", "into": "0"}, {"norm": "2", "into": "2"}]
    assert report["parity"]["passed"] and not onnx_ops(out).keys() & NORM_OPS
