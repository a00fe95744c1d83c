"""MABN2d and CenConv2d against plain float64 references written here from NORM_LAYERS.md."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from normcli.layers import CenConv2d, MABN2d
from tests.conftest import assert_onnx_parity


class ReferenceMABN:
    """MABN training steps in float64 numpy, keeping its own parameters and buffers."""

    def __init__(self, weight, bias, B, real_B, eps, momentum, warmup_iters):
        c = len(weight)
        self.weight, self.bias = weight.copy(), bias.copy()
        self.m = real_B // B
        self.eps, self.momentum, self.warmup_iters = eps, momentum, warmup_iters
        self.running_var = np.ones(c)
        self.t = 0
        self.buffer_x2 = np.zeros((self.m, c))
        self.buffer_gz = np.zeros((self.m, c))
        self.r_seen = set()

    def _current_only(self):
        return self.t <= self.m or self.t < self.warmup_iters

    def forward(self, x):
        c = lambda a: a[None, :, None, None]  # noqa: E731
        self.t += 1
        t = self.t
        chi = (x * x).mean(axis=(0, 2, 3))
        self.buffer_x2[t % self.m] = chi
        v = chi if self._current_only() else self.buffer_x2.mean(axis=0)
        z = x / c(np.sqrt(v + self.eps))
        if t <= max(1000, self.warmup_iters):
            r = np.ones_like(v)
        else:
            r = np.clip(np.sqrt(v + self.eps) / np.sqrt(self.running_var + self.eps), 1 / 5, 5)
            self.r_seen.update(np.round(r, 12).tolist())
        out = c(self.weight) * (c(r) * z) + c(self.bias)
        self.running_var = self.momentum * self.running_var + (1 - self.momentum) * v
        self.saved = (z, v, r)
        return out

    def backward(self, grad_out):
        c = lambda a: a[None, :, None, None]  # noqa: E731
        z, v, r = self.saved
        g = grad_out * c(self.weight * r)
        psi_t = (g * z).mean(axis=(0, 2, 3))
        self.buffer_gz[self.t % self.m] = psi_t
        psi = psi_t if self._current_only() else self.buffer_gz.mean(axis=0)
        grad_x = (g - z * c(psi)) / c(np.sqrt(v + self.eps))
        grad_weight = (grad_out * c(r) * z).sum(axis=(0, 2, 3))
        grad_bias = grad_out.sum(axis=(0, 2, 3))
        return grad_x, grad_weight, grad_bias


def step_input(rng, t, shape):
    """Inputs whose scale drifts, jumps up (t in 1050..1052) and collapses (t in 1120..1140)."""
    scale = np.exp(np.sin(t / 40.0)) * (1 + 0.5 * rng.random(shape[1]))
    if 1050 <= t <= 1052:
        scale = scale * 30
    if 1120 <= t <= 1140:
        scale = scale * 0.01
    return rng.standard_normal(shape) * scale[None, :, None, None] + 0.3


@pytest.mark.parametrize(
    "B, real_B, warmup_iters, steps",
    [(2, 8, 100, 1200), (1, 3, 2, 1160), (2, 4, 1003, 1160)],
)
def test_training_matches_reference(B, real_B, warmup_iters, steps):
    rng = np.random.default_rng(B * 100 + warmup_iters)
    c, eps, momentum, lr = 3, 1e-5, 0.98, 0.05
    layer = MABN2d(c, B, real_B, eps=eps, momentum=momentum, warmup_iters=warmup_iters, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(rng.random(c) + 0.5))
        layer.bias.copy_(torch.from_numpy(rng.random(c) - 0.5))
    ref = ReferenceMABN(layer.weight.detach().numpy(), layer.bias.detach().numpy(), B, real_B, eps, momentum,
                        warmup_iters)
    optimiser = torch.optim.SGD(layer.parameters(), lr=lr)
    shape = (B, c, 4, 3)
    close = lambda a, b, what: np.testing.assert_allclose(  # noqa: E731
        a.detach().numpy(), b, rtol=1e-9, atol=1e-12, err_msg=f"{what} at step {t}"
    )
    for t in range(1, steps + 1):
        x_np = step_input(rng, t, shape)
        grad_out_np = rng.standard_normal(shape)
        x = torch.from_numpy(x_np).requires_grad_(True)
        out = layer(x)
        out.backward(torch.from_numpy(grad_out_np))
        ref_out = ref.forward(x_np)
        ref_gx, ref_gw, ref_gb = ref.backward(grad_out_np)

        close(out, ref_out, "output")
        close(x.grad, ref_gx, "grad_x")
        close(layer.weight.grad, ref_gw, "grad_weight")
        close(layer.bias.grad, ref_gb, "grad_bias")
        close(layer.running_var, ref.running_var, "running_var")
        close(layer.buffer_x2, ref.buffer_x2, "buffer_x2")
        close(layer.buffer_gz, ref.buffer_gz, "buffer_gz")
        assert layer.iters.item() == t

        optimiser.step()
        optimiser.zero_grad()
        ref.weight -= lr * ref_gw
        ref.bias -= lr * ref_gb
    # the run crossed the renormalisation switch and hit both ends of the clip
    assert {0.2, 5.0} <= ref.r_seen and len(ref.r_seen) > 10


def test_float32_layer_tracks_float64_reference():
    rng = np.random.default_rng(7)
    layer = MABN2d(4, 2, 4, warmup_iters=5)
    ref = ReferenceMABN(np.ones(4), np.zeros(4), 2, 4, 1e-5, 0.98, 5)
    for t in range(1, 30):
        x_np = step_input(rng, t, (2, 4, 5, 5))
        g_np = rng.standard_normal(x_np.shape)
        x = torch.from_numpy(x_np).float().requires_grad_(True)
        layer(x).backward(torch.from_numpy(g_np).float())
        ref.forward(x_np)
        ref_gx, _, _ = ref.backward(g_np)
    np.testing.assert_allclose(x.grad.numpy(), ref_gx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.running_var.numpy(), ref.running_var, rtol=1e-5)


def trained_layer(steps=12):
    torch.manual_seed(0)
    layer = MABN2d(3, 2, 4, warmup_iters=3)
    optimiser = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(steps):
        layer(torch.randn(2, 3, 5, 5) * 2 + 1).square().mean().backward()
        optimiser.step()
        optimiser.zero_grad()
    return layer


def test_eval_formula_and_no_buffer_update():
    layer = trained_layer().eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 3, 6, 6, dtype=torch.float32) * 3
    out = layer(x)
    c = lambda a: a.double()[None, :, None, None]  # noqa: E731
    expected = c(layer.weight.detach()) * x.double() / torch.sqrt(c(layer.running_var) + layer.eps) + c(
        layer.bias.detach()
    )
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)


def test_state_dict_round_trip_continues_identically():
    layer = trained_layer()
    clone = MABN2d(3, 2, 4, warmup_iters=3)
    clone.load_state_dict(layer.state_dict())
    assert clone.iters.item() == layer.iters.item() == 12
    x = torch.randn(2, 3, 5, 5)
    for module in (layer, clone):
        module.train()
    torch.testing.assert_close(clone(x), layer(x), atol=0, rtol=0)
    torch.testing.assert_close(clone.running_var, layer.running_var, atol=0, rtol=0)
    clone.eval(), layer.eval()
    torch.testing.assert_close(clone(x), layer(x), atol=0, rtol=0)


def test_bad_options_and_inputs_raise():
    with pytest.raises(ValueError, match="multiple of B"):
        MABN2d(3, 3, 4)
    with pytest.raises(ValueError, match="N, C, H, W"):
        MABN2d(3, 2, 4)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="no running statistics"):
        MABN2d.from_batchnorm(nn.BatchNorm2d(3, track_running_stats=False), 2, 4)


def test_docstring_states_ddp_setting():
    assert "broadcast_buffers=False" in MABN2d.__doc__


@settings(max_examples=25, deadline=None)
@given(
    channels=st.integers(1, 6),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    affine=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_from_batchnorm_keeps_eval_output(channels, eps, affine, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels, eps=eps, affine=affine, dtype=dtype).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=gen) * 3)
        bn.running_var.copy_(torch.rand(channels, generator=gen) * 4 + 1e-3)
        if affine:
            bn.weight.copy_(torch.randn(channels, generator=gen))
            bn.bias.copy_(torch.randn(channels, generator=gen))
    mabn = MABN2d.from_batchnorm(bn, B=2, real_B=8, warmup_iters=50, momentum=0.9)
    assert (mabn.B, mabn.real_B, mabn.warmup_iters, mabn.momentum, mabn.eps) == (2, 8, 50, 0.9, eps)
    assert not mabn.training and mabn.running_var.dtype == dtype
    torch.testing.assert_close(
        mabn.running_var.double(), bn.running_var.double() + bn.running_mean.double() ** 2
    )
    x = torch.randn(3, channels, 4, 4, generator=gen, dtype=torch.float64).to(dtype) * 5
    # the BatchNorm's eval output, written out in float64
    c = lambda a: a.double()[None, :, None, None]  # noqa: E731
    gamma = c(bn.weight.detach()) if affine else 1.0
    beta = c(bn.bias.detach()) if affine else 0.0
    expected = gamma * (x.double() - c(bn.running_mean)) / torch.sqrt(c(bn.running_var) + eps) + beta
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}
    with torch.no_grad():
        torch.testing.assert_close(mabn(x).double(), expected, **tol)


def test_fold_scale_shift_folds_into_conv():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
    mabn = trained_layer_for(4)
    mabn = mabn.double().eval()
    scale, shift = mabn.fold_scale_shift()
    assert scale.dtype == shift.dtype == torch.float64
    folded = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * scale[:, None, None, None])
        folded.bias.copy_(conv.bias * scale + shift)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), mabn(conv(x)), atol=1e-12, rtol=1e-12)


def trained_layer_for(channels):
    layer = MABN2d(channels, 1, 2, warmup_iters=1)
    for _ in range(5):
        layer(torch.randn(1, channels, 4, 4) * 2).sum().backward()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    return layer


@pytest.mark.parametrize("groups, bias, stride", [(1, True, 1), (2, False, 2)])
def test_cenconv_forward_and_gradient(groups, bias, stride):
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1, groups=groups, bias=bias, dtype=torch.float64)
    cen = CenConv2d.from_conv(conv)
    assert (cen.stride, cen.padding, cen.groups, cen.bias is None) == (conv.stride, conv.padding, groups, not bias)
    torch.testing.assert_close(cen.weight, conv.weight, atol=0, rtol=0)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    grad_out = torch.randn_like(conv(x))
    out = cen(x)
    out.backward(grad_out)

    w = conv.weight.detach().numpy()
    w_centred = torch.from_numpy(w - w.mean(axis=(1, 2, 3), keepdims=True)).requires_grad_(True)
    ref = F.conv2d(x, w_centred, None if conv.bias is None else conv.bias.detach(), stride, 1, 1, groups)
    ref.backward(grad_out)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    # the centring is linear: d/dW of conv(x, W - mean W) is G - mean(G), G the plain weight gradient
    g = w_centred.grad.numpy()
    expected_grad = g - g.mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(cen.weight.grad.numpy(), expected_grad, atol=1e-12, rtol=1e-10)
    # and the centred weights really have zero mean per output channel
    assert np.abs(cen.centred_weight().detach().numpy().mean(axis=(1, 2, 3))).max() < 1e-12


@pytest.mark.slow
def test_onnx_export_parity(tmp_path):
    torch.manual_seed(3)
    mabn = trained_layer_for(8).eval()
    model = nn.Sequential(CenConv2d(3, 8, 3, padding=1), mabn, nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    assert_onnx_parity(model, torch.randn(2, 3, 10, 10) * 3, tmp_path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_reduces_in_float32(dtype):
    # |x| ~ 300: x^2 overflows float16; the statistics must come out as in float32
    rng = np.random.default_rng(9)
    half, ref = MABN2d(4, 2, 4, warmup_iters=1), ReferenceMABN(np.ones(4), np.zeros(4), 2, 4, 1e-5, 0.98, 1)
    for t in range(1, 6):
        x = torch.from_numpy(rng.standard_normal((2, 4, 5, 5)) * 300).to(dtype)
        g_np = rng.standard_normal((2, 4, 5, 5))
        x_leaf = x.clone().requires_grad_(True)
        half.zero_grad()
        out = half(x_leaf)
        out.backward(torch.from_numpy(g_np).to(dtype))
        ref_out = ref.forward(x.double().numpy())
        _, ref_gw, _ = ref.backward(g_np)
    assert out.dtype == dtype and half.weight.grad.dtype == torch.float32
    np.testing.assert_allclose(half.running_var.numpy(), ref.running_var, rtol=1e-5)
    np.testing.assert_allclose(out.detach().double().numpy(), ref_out, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(half.weight.grad.numpy(), ref_gw, rtol=2e-2, atol=2e-2)
    assert torch.isfinite(x_leaf.grad).all()
