"""FilterResponseNorm1d/2d/3d against a plain float64 reference written here from NORM_LAYERS.md."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from normcli.layers import FilterResponseNorm1d, FilterResponseNorm2d, FilterResponseNorm3d
from tests.conftest import assert_onnx_parity

CLASSES = {1: FilterResponseNorm1d, 2: FilterResponseNorm2d, 3: FilterResponseNorm3d}
SPATIAL = {1: (7,), 2: (5, 6), 3: (3, 4, 5)}


def reference_frn(x, gamma, beta, tau, eps):
    """FRN + TLU from the formulas, in float64; eps may be a float or a 0-dim tensor."""
    x = x.double()
    dims = tuple(range(2, x.dim()))
    nu2 = (x * x).mean(dim=dims, keepdim=True) if dims else x * x
    shape = (1, -1) + (1,) * len(dims)
    y = gamma.double().view(shape) * x / torch.sqrt(nu2 + eps) + beta.double().view(shape)
    return torch.maximum(y, tau.double().view(shape))


def randomise(layer, generator):
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.num_features, generator=generator) + 0.5)
        layer.bias.copy_(torch.rand(layer.num_features, generator=generator) - 0.5)
        layer.tau.copy_(torch.rand(layer.num_features, generator=generator) - 0.5)
        # channel 0: beta == tau, so inputs that are exactly 0 sit on the TLU's kink
        layer.tau[0] = layer.bias[0]


def compare_with_reference(layer, x, atol, rtol):
    """Forward and all gradients of ``layer`` against autograd through the float64 reference."""
    x = x.clone().requires_grad_(True)
    z = layer(x)
    grad_out = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z.backward(grad_out.to(z.dtype))

    params = {name: p.detach().double().clone().requires_grad_(True) for name, p in layer.named_parameters()}
    x_ref = x.detach().double().clone().requires_grad_(True)
    eps = layer.eps if "eps_l" not in params else layer.eps + params["eps_l"].abs()
    z_ref = reference_frn(x_ref, params["weight"], params["bias"], params["tau"], eps)
    z_ref.backward(grad_out)

    torch.testing.assert_close(z.double(), z_ref.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, atol=atol, rtol=rtol)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad.double(), params[name].grad, atol=atol * 10, rtol=rtol, msg=name)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("learnable_eps", [False, True])
def test_forward_and_gradients_match_reference(rank, training, learnable_eps):
    gen = torch.Generator().manual_seed(rank)
    layer = CLASSES[rank](4, learnable_eps=learnable_eps, dtype=torch.float64).train(training)
    randomise(layer, gen)
    x = torch.randn((3, 4) + SPATIAL[rank], generator=gen, dtype=torch.float64)
    x[:, 0].view(3, -1)[:, :2] = 0.0  # ties y == tau: torch.maximum gives each side half the gradient
    x[1, 1] = 0.0  # an all-zero map: x / sqrt(0 + eps) = 0
    compare_with_reference(layer, x, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_float32_layer_matches_float64_reference(rank):
    gen = torch.Generator().manual_seed(10 + rank)
    layer = CLASSES[rank](6, learnable_eps=True)
    randomise(layer, gen)
    x = torch.randn((2, 6) + SPATIAL[rank], generator=gen) * 3
    compare_with_reference(layer, x, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("learnable_eps", [False, True])
def test_gradcheck(rank, learnable_eps):
    gen = torch.Generator().manual_seed(20 + rank)
    layer = CLASSES[rank](3, learnable_eps=learnable_eps, dtype=torch.float64)
    randomise(layer, gen)
    with torch.no_grad():
        layer.tau[0] -= 1.0  # keep away from the kink, where finite differences are meaningless
        if learnable_eps:
            layer.eps_l.fill_(0.3)  # large enough for finite differences in eps to register
    x = torch.randn((2, 3) + SPATIAL[rank], generator=gen, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in layer.named_parameters()]

    def fn(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    inputs = (x,) + tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_nc_input_needs_learnable_eps():
    layer = FilterResponseNorm1d(5)
    with pytest.raises(ValueError, match="learnable_eps=True"):
        layer(torch.randn(4, 5))

    gen = torch.Generator().manual_seed(3)
    learnable = FilterResponseNorm1d(5, learnable_eps=True, dtype=torch.float64)
    randomise(learnable, gen)
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    compare_with_reference(learnable, x, atol=1e-10, rtol=1e-10)
    # not sign(x): |x| small against sqrt(eps) gives outputs strictly between the sign values
    with torch.no_grad():
        out = FilterResponseNorm1d(5, learnable_eps=True)(torch.full((1, 5), 1e-3))
    assert torch.all(out < 0.5)


def test_learnable_eps_parameter():
    layer = FilterResponseNorm2d(8, learnable_eps=True)
    assert layer.eps_l.shape == () and layer.eps_l.item() == pytest.approx(1e-4)
    assert "weight decay" in FilterResponseNorm1d.__doc__
    assert FilterResponseNorm2d(8).eps_l is None
    assert {n for n, _ in FilterResponseNorm2d(8).named_parameters()} == {"weight", "bias", "tau"}


@pytest.mark.parametrize(
    "cls, shape",
    [(FilterResponseNorm1d, (2, 3, 4, 4)), (FilterResponseNorm2d, (2, 3, 4)), (FilterResponseNorm3d, (2, 3, 4, 4)),
     (FilterResponseNorm2d, (2, 5, 4, 4))],
)
def test_bad_input_shapes_raise(cls, shape):
    with pytest.raises(ValueError, match=cls.__name__):
        cls(3)(torch.randn(shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_half_input_reduces_in_float32(dtype, training):
    gen = torch.Generator().manual_seed(4)
    layer = FilterResponseNorm2d(4).train(training)
    randomise(layer, gen)
    # |x| ~ 1000: x^2 overflows float16
    x = (torch.randn(2, 4, 6, 6, generator=gen) * 1000).to(dtype)
    x_leaf = x.clone().requires_grad_(True)
    z = layer(x_leaf)
    assert z.dtype == dtype
    z.float().sum().backward()
    expected = reference_frn(x, layer.weight, layer.bias, layer.tau, layer.eps)
    torch.testing.assert_close(z.double(), expected.detach(), atol=2e-2, rtol=2e-2)
    assert torch.isfinite(x_leaf.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_state_dict_round_trip():
    gen = torch.Generator().manual_seed(5)
    layer = FilterResponseNorm3d(4, learnable_eps=True)
    randomise(layer, gen)
    with torch.no_grad():
        layer.eps_l.fill_(0.02)
    clone = FilterResponseNorm3d(4, learnable_eps=True)
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 3, 3, 3, generator=gen)
    torch.testing.assert_close(clone(x), layer(x), atol=0, rtol=0)


@pytest.mark.slow
def test_onnx_export_parity(tmp_path):
    gen = torch.Generator().manual_seed(6)
    frn = FilterResponseNorm2d(8)
    randomise(frn, gen)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), frn, nn.Conv2d(8, 4, 1)).eval()
    assert_onnx_parity(model, torch.randn(2, 3, 10, 10, generator=gen) * 5, tmp_path)
