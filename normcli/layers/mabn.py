"""Moving Average Batch Normalization (MABN) and the centred convolution it is meant to follow.

Yan, Wan, Zhang, Zhang, Wei & Sun, "Towards Stabilizing Batch Statistics in Backward Propagation of Batch
Normalization", ICLR 2020, https://arxiv.org/abs/2001.06838

MABN normalises by the second moment of x (no mean subtraction) and replaces both the forward statistic
mean(x^2) and the backward statistic mean(g * z) by simple moving averages over the last ``real_B // B``
steps, so that a step with batch ``B`` sees statistics of an effective batch ``real_B``. After 1000 steps
(or the warm-up, if longer) it also renormalises by ``r = clamp(sqrt(v + eps) / sqrt(running_var + eps),
1/5, 5)``. The exact semantics normcli implements are in NORM_LAYERS.md.

CenConv2d centres its weights per output channel, which keeps E[x] close to 0 after the convolution, so
that the second moment MABN uses stands in for the variance.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MABN2d", "CenConv2d"]

RENORM_START = 1000
R_MIN, R_MAX = 1.0 / 5.0, 5.0


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _uses_moving_average(t: int, m: int, warmup_iters: int) -> bool:
    return not (t <= m or t < warmup_iters)


class _MABNTrain(torch.autograd.Function):
    """One MABN training step; ``state`` carries t, the buffers and the options (never differentiated)."""

    @staticmethod
    def forward(ctx, x, weight, bias, state: dict):
        t, m, eps = state["t"], state["m"], state["eps"]
        acc = _accumulation_dtype(x.dtype)
        n, c = x.shape[0], x.shape[1]
        x3 = x.reshape(n, c, -1)
        count = n * x3.shape[2]
        # Per (n, c) norms over S, then over N: contiguous reductions, one pass, no x^2 temporary.
        chi = torch.linalg.vector_norm(x3, dim=2, dtype=acc).square_().sum(0).div_(count)
        buffer_x2, buffer_gz, running_var = state["buffer_x2"], state["buffer_gz"], state["running_var"]
        buffer_x2[t % m] = chi
        moving = _uses_moving_average(t, m, state["warmup_iters"])
        v = buffer_x2.to(acc).mean(0) if moving else chi
        std = torch.sqrt(v + eps)
        inv = 1.0 / std
        if t <= max(RENORM_START, state["warmup_iters"]):
            r = torch.ones_like(v)
        else:
            # running_var as it was before this step's update
            r = (std / torch.sqrt(running_var.to(acc) + eps)).clamp_(R_MIN, R_MAX)
        momentum = state["momentum"]
        running_var.mul_(momentum).add_((1.0 - momentum) * v.to(running_var.dtype))

        a = weight.to(acc) * r
        shape = (1, c) + (1,) * (x.dim() - 2)
        out = torch.addcmul(bias.to(x.dtype).view(shape), x, (a * inv).to(x.dtype).view(shape))
        ctx.save_for_backward(x, weight, r, inv)
        ctx.buffer_gz = buffer_gz
        ctx.t, ctx.m, ctx.moving, ctx.count = t, m, moving, count
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, r, inv = ctx.saved_tensors
        acc = inv.dtype
        n, c = x.shape[0], x.shape[1]
        grad_out = grad_out.contiguous()
        shape = (1, c) + (1,) * (x.dim() - 2)
        # g = grad_out * weight * r; z = x * inv; psi_t = mean(g * z) = weight * r * inv * sum(grad_out * x) / count
        a = weight.to(acc) * r
        grad_x = None
        if x.dtype == grad_out.dtype == acc:
            # BatchNorm's eval backward with mean 0, var 1, eps 0 and weight a * inv returns exactly
            # grad_out * a * inv, sum(grad_out * x) and sum(grad_out), in fewer passes than separate ops.
            ones = torch.ones(c, dtype=acc, device=x.device)
            grad_x, sum_gx, sum_g = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, a * inv, torch.zeros_like(ones), ones, None, None, False, 0.0,
                [ctx.needs_input_grad[0], True, True],
            )
        else:
            x3, g3 = x.reshape(n, c, -1).to(acc), grad_out.view(n, c, -1).to(acc)
            sum_gx = (g3 * x3).sum(dim=(0, 2))
            sum_g = g3.sum(dim=(0, 2))
            if ctx.needs_input_grad[0]:
                grad_x = grad_out * (a * inv).to(x.dtype).view(shape)

        psi_t = a * inv * sum_gx / ctx.count
        buffer_gz = ctx.buffer_gz
        with torch.no_grad():
            buffer_gz[ctx.t % ctx.m] = psi_t
        psi = buffer_gz.to(acc).mean(0) if ctx.moving else psi_t

        grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # (g - z * psi) / sqrt(v + eps) = grad_out * (a * inv) - x * (psi * inv^2)
            grad_x.addcmul_(x, (-psi * inv * inv).to(x.dtype).view(shape))
        if ctx.needs_input_grad[1]:
            grad_weight = (r * inv * sum_gx).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_g.to(weight.dtype)
        return grad_x, grad_weight, grad_bias, None


class MABN2d(nn.Module):
    """Moving Average Batch Normalization over (N, C, H, W) inputs.

    Args:
        num_features: C.
        B: the batch size one training step sees.
        real_B: the batch size whose statistics are emulated; a multiple of ``B``. ``real_B // B`` steps are
            averaged.
        eps: added to the second moment before the square root.
        momentum: weight of the OLD value in ``running_var = momentum * running_var + (1 - momentum) * v``.
        warmup_iters: steps during which the statistics of the current batch are used alone.

    Buffers: ``running_var`` (C,), ``iters`` (the number of training steps taken), ``buffer_x2`` and
    ``buffer_gz`` (``real_B // B``, C): the last steps' forward and backward statistics.

    Distributed training: each process keeps its own buffers, as in the reference training. Wrap the model
    in ``DistributedDataParallel(..., broadcast_buffers=False)``; with the default ``True`` DDP overwrites
    every rank's ``running_var``, ``iters`` and moving-average buffers with rank 0's at each forward.

    In eval mode the layer is the per-channel affine map ``weight * x / sqrt(running_var + eps) + bias``
    (see :meth:`fold_scale_shift`), so it folds into a preceding convolution exactly like BatchNorm.
    """

    def __init__(
        self,
        num_features: int,
        B: int,
        real_B: int,
        eps: float = 1e-5,
        momentum: float = 0.98,
        warmup_iters: int = 100,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if B < 1 or real_B < 1 or real_B % B != 0:
            raise ValueError(
                f"MABN2d needs real_B to be a positive multiple of B, got B={B}, real_B={real_B}"
            )
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.B = B
        self.real_B = real_B
        self.eps = eps
        self.momentum = momentum
        self.warmup_iters = warmup_iters
        m = real_B // B
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("iters", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("buffer_x2", torch.zeros(m, num_features, **factory))
        self.register_buffer("buffer_gz", torch.zeros(m, num_features, **factory))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, B={self.B}, real_B={self.real_B}, eps={self.eps}, "
            f"momentum={self.momentum}, warmup_iters={self.warmup_iters}"
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"MABN2d expects an (N, C, H, W) input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"MABN2d({self.num_features}) got an input with {x.shape[1]} channels (shape {tuple(x.shape)})"
            )
        if not self.training:
            shape = (1, -1, 1, 1)
            scale = self.weight * torch.rsqrt(self.running_var + self.eps)
            return x * scale.to(x.dtype).view(shape) + self.bias.to(x.dtype).view(shape)
        with torch.no_grad():
            self.iters += 1
        state = {
            "t": int(self.iters.item()),
            "m": self.buffer_x2.shape[0],
            "eps": self.eps,
            "momentum": self.momentum,
            "warmup_iters": self.warmup_iters,
            "running_var": self.running_var,
            "buffer_x2": self.buffer_x2,
            "buffer_gz": self.buffer_gz,
        }
        return _MABNTrain.apply(x, self.weight, self.bias, state)

    @torch.no_grad()
    def fold_scale_shift(self) -> tuple[Tensor, Tensor]:
        """The per-channel ``(scale, shift)`` of the eval map ``x * scale + shift``, in float64."""
        weight = self.weight.detach().double()
        scale = weight / torch.sqrt(self.running_var.double() + self.eps)
        return scale, self.bias.detach().double().clone()

    @classmethod
    @torch.no_grad()
    def from_batchnorm(
        cls,
        bn: nn.modules.batchnorm._BatchNorm,
        B: int,
        real_B: int,
        warmup_iters: int = 100,
        momentum: float = 0.98,
    ) -> "MABN2d":
        """An MABN2d whose eval output equals ``bn``'s eval output (up to rounding).

        ``running_var`` becomes the second moment ``sigma2 + mu^2``, and ``weight``/``bias`` absorb the mean
        BatchNorm subtracts, so the statistic MABN tracks in training starts where the data already is.
        """
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"{type(bn).__name__}({bn.num_features}) has no running statistics "
                "(track_running_stats=False): its eval output depends on the batch, so no MABN2d equals it"
            )
        ref = bn.running_var
        mabn = cls(
            bn.num_features, B, real_B, eps=bn.eps, momentum=momentum, warmup_iters=warmup_iters,
            device=ref.device, dtype=ref.dtype,
        )
        mu = bn.running_mean.double()
        sigma2 = bn.running_var.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mu)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mu)
        second_moment = sigma2 + mu * mu
        inv_std = torch.rsqrt(sigma2 + bn.eps)
        mabn.running_var.copy_(second_moment)
        mabn.weight.copy_(gamma * torch.sqrt(second_moment + bn.eps) * inv_std)
        mabn.bias.copy_(beta - gamma * mu * inv_std)
        if bn.weight is not None:
            mabn.weight.requires_grad_(bn.weight.requires_grad)
            mabn.bias.requires_grad_(bn.bias.requires_grad)
        mabn.train(bn.training)
        return mabn


class CenConv2d(nn.Conv2d):
    """A Conv2d that convolves with ``weight - mean(weight)``, the mean taken per output channel over the
    input channels and kernel dims and recomputed at every forward (the gradient flows through it).

    Same arguments as :class:`torch.nn.Conv2d`; the stored ``weight`` is the uncentred parameter.
    """

    def centred_weight(self) -> Tensor:
        return self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.centred_weight(), self.bias)

    @classmethod
    @torch.no_grad()
    def from_conv(cls, conv: nn.Conv2d) -> "CenConv2d":
        """A CenConv2d with ``conv``'s configuration and parameters (its function changes by the centring)."""
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
            padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
        )
        new.weight.copy_(conv.weight)
        new.weight.requires_grad_(conv.weight.requires_grad)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
            new.bias.requires_grad_(conv.bias.requires_grad)
        new.train(conv.training)
        return new
