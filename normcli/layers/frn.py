"""Filter Response Normalization with a Thresholded Linear Unit (FRN + TLU).

Singh & Krishnan, "Filter Response Normalization Layer: Eliminating Batch Dependence in the Training of
Deep Neural Networks", CVPR 2020, https://arxiv.org/abs/1911.09737

Per sample and channel, with reductions over the spatial dims only (no batch statistics, no mean)::

    nu2 = mean(x^2) over S
    y   = weight * x / sqrt(nu2 + eps) + bias
    z   = max(y, tau)

The TLU ``max(y, tau)`` is the activation: FRN + TLU replaces BatchNorm + ReLU together. The exact
semantics normcli implements are in NORM_LAYERS.md.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FilterResponseNorm1d", "FilterResponseNorm2d", "FilterResponseNorm3d"]

LEARNABLE_EPS_INIT = 1e-4


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # x^2 overflows float16 once |x| > ~256: reduce half types in float32.
    return torch.promote_types(dtype, torch.float32)


def _inverse_rms(x3: Tensor, eps: Tensor | float) -> Tensor:
    """1 / sqrt(mean(x^2) + eps) per sample and channel of an (N, C, S) tensor, in the accumulation dtype."""
    acc = _accumulation_dtype(x3.dtype)
    # One pass, no x^2 temporary; ||x||^2 / S is mean(x^2).
    nu2 = torch.linalg.vector_norm(x3, dim=2, keepdim=True, dtype=acc).square_().div_(x3.shape[2])
    return torch.rsqrt(nu2.add_(eps))


class _FilterResponseNormTLU(torch.autograd.Function):
    """FRN + TLU with a fused backward equal to autograd's on the formulas (including the 1/2 gradient split
    of ``torch.maximum`` at y == tau), in fewer passes over the tensor."""

    @staticmethod
    def forward(ctx, x3, weight, bias, tau, eps_l, eps_floor: float):
        acc = _accumulation_dtype(x3.dtype)
        eps = eps_floor if eps_l is None else eps_l.to(acc).abs() + eps_floor
        inv = _inverse_rms(x3, eps)  # (N, C, 1)
        scale = (weight.to(acc)[:, None] * inv).to(x3.dtype)
        y = torch.addcmul(bias.to(x3.dtype)[:, None], x3, scale)
        tau3 = tau.to(x3.dtype)[:, None]
        z = torch.maximum(y, tau3)
        ctx.save_for_backward(x3, y, weight, tau, inv, eps_l)
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gz):
        x3, y, weight, tau, inv, eps_l = ctx.saved_tensors
        acc = inv.dtype
        gz = gz.contiguous()
        size_s = x3.shape[2]
        n, c = x3.shape[0], x3.shape[1]
        w = weight.to(acc)[:, None]
        # d max(y, tau) / dy is 1 where y > tau, 1/2 where y == tau, 0 where y < tau (torch.maximum's rule):
        # that is (sign(y - tau) + 1) / 2, so gz + sign(y - tau) * gz is twice the gradient gy reaching y.
        gy2 = torch.sub(y, tau.to(y.dtype)[:, None]).sign_()
        torch.addcmul(gz, gy2, gz, out=gy2)
        sum_gz = gz.sum(dim=(0, 2), dtype=acc)
        needs_x = ctx.needs_input_grad[0]
        grad_x = None
        if gy2.dtype == acc:
            # BatchNorm's eval backward over the (1, N*C, S) view, with mean 0, var 1, eps 0 and weight
            # w * inv / 2, returns gy * w * inv, sum_S(gy2 * x) and sum_S(gy2) per (n, c) in one fused pass.
            ones = torch.ones(n * c, dtype=acc, device=x3.device)
            grad_x, sum_gy2x, sum_gy2 = torch.ops.aten.native_batch_norm_backward(
                gy2.view(1, n * c, -1), x3.view(1, n * c, -1), (w * inv * 0.5).flatten(), torch.zeros_like(ones),
                ones, None, None, False, 0.0, [needs_x, True, True],
            )
            gyx = (sum_gy2x * 0.5).view(n, c, 1)
            sum_gy = sum_gy2.view(n, c).sum(0) * 0.5
        else:
            gy = gy2.to(acc).mul_(0.5)
            gyx = (gy * x3.to(acc)).sum(dim=2, keepdim=True)
            sum_gy = gy.sum(dim=(0, 2))
            if needs_x:
                grad_x = gy.mul_(w * inv)
        # d inv / d x = -inv^3 x / S, d inv / d eps = -inv^3 / 2
        inv3_gyx = inv.pow(3).mul_(gyx).mul_(w)
        grad_weight = grad_bias = grad_tau = grad_eps_l = None
        if needs_x:
            grad_x = grad_x.view(x3.shape).addcmul_(x3.to(grad_x.dtype), inv3_gyx / -size_s).to(x3.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (inv * gyx).sum(dim=(0, 2)).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_gy.to(weight.dtype)
        if ctx.needs_input_grad[3]:
            grad_tau = (sum_gz - sum_gy).to(tau.dtype)
        if eps_l is not None and ctx.needs_input_grad[4]:
            grad_eps_l = (inv3_gyx.sum() * -0.5 * torch.sign(eps_l.to(acc))).to(eps_l.dtype)
        return grad_x, grad_weight, grad_bias, grad_tau, grad_eps_l, None


class _FilterResponseNormNd(nn.Module):
    """FRN + TLU over the spatial dims of an (N, C, *S) input; subclasses fix the number of spatial dims."""

    _spatial_dims: int

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-6,
        learnable_eps: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.learnable_eps = learnable_eps
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.tau = nn.Parameter(torch.zeros(num_features, **factory))
        if learnable_eps:
            # Exclude from weight decay: decay would pull |eps_l| to 0, back towards sign(x) on 1x1 maps.
            self.eps_l = nn.Parameter(torch.full((), LEARNABLE_EPS_INIT, **factory))
        else:
            self.register_parameter("eps_l", None)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, learnable_eps={self.learnable_eps}"

    def _check_input_dim(self, x: Tensor) -> None:
        want = self._spatial_dims + 2
        if x.dim() == want:
            pass
        elif x.dim() == 2 and self._spatial_dims == 1:
            if not self.learnable_eps:
                raise ValueError(
                    f"{type(self).__name__} got an (N, C) input {tuple(x.shape)}: without spatial dims "
                    "x / sqrt(x^2 + eps) is just sign(x). Build the layer with learnable_eps=True (the "
                    "paper's remedy for 1x1 feature maps) or keep BatchNorm1d there."
                )
        else:
            accepted = "(N, C, L) or (N, C) with learnable_eps=True" if self._spatial_dims == 1 else (
                "(N, C, H, W)" if self._spatial_dims == 2 else "(N, C, D, H, W)"
            )
            raise ValueError(
                f"{type(self).__name__} expects a {accepted} input, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got an input with {x.shape[1]} channels "
                f"(shape {tuple(x.shape)})"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        params = [p for p in (self.weight, self.bias, self.tau, self.eps_l) if p is not None]
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        if self.training and needs_grad:
            x3 = x.reshape(x.shape[0], x.shape[1], -1)
            if not x3.is_contiguous():
                x3 = x3.contiguous()
            z = _FilterResponseNormTLU.apply(x3, self.weight, self.bias, self.tau, self.eps_l, self.eps)
            return z.view(x.shape)
        return self._forward_plain(x)

    def _forward_plain(self, x: Tensor) -> Tensor:
        # Plain differentiable ops: used in eval and for export (ONNX sees Pow/ReduceMean/Sqrt/Max).
        acc = _accumulation_dtype(x.dtype)
        dims = tuple(range(2, x.dim()))
        xa = x.to(acc)
        nu2 = xa.square().mean(dim=dims, keepdim=True) if dims else xa.square()
        eps = self.eps if self.eps_l is None else self.eps_l.to(acc).abs() + self.eps
        shape = (1, -1) + (1,) * len(dims)
        y = (self.weight.to(acc).view(shape) * xa * torch.rsqrt(nu2 + eps)).to(x.dtype)
        y = y + self.bias.to(x.dtype).view(shape)
        return torch.maximum(y, self.tau.to(x.dtype).view(shape))


class FilterResponseNorm1d(_FilterResponseNormNd):
    """FRN + TLU over (N, C, L) inputs (or (N, C) inputs when ``learnable_eps=True``).

    Args:
        num_features: C.
        eps: the fixed epsilon; with ``learnable_eps`` it is the floor added to ``|eps_l|``.
        learnable_eps: learn ``eps = eps + |eps_l|`` with the scalar parameter ``eps_l`` initialised to 1e-4,
            as the paper does for 1x1 feature maps. Exclude ``eps_l`` from weight decay (put it in a parameter
            group with ``weight_decay=0``), as you would a bias.
    """

    _spatial_dims = 1


class FilterResponseNorm2d(_FilterResponseNormNd):
    """FRN + TLU over (N, C, H, W) inputs. Arguments as for :class:`FilterResponseNorm1d`."""

    _spatial_dims = 2


class FilterResponseNorm3d(_FilterResponseNormNd):
    """FRN + TLU over (N, C, D, H, W) inputs. Arguments as for :class:`FilterResponseNorm1d`."""

    _spatial_dims = 3
