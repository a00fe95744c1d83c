"""FrozenBatchNorm: BatchNorm with fixed statistics and affine parameters, as detection codebases use it.

The layer computes BatchNorm's eval map and never changes: ``weight``, ``bias``, ``running_mean`` and
``running_var`` are buffers (no gradients, no statistics update, train and eval alike). Its state dict has
exactly those four keys, like torchvision's ``FrozenBatchNorm2d`` (``torchvision.ops.misc``) and detectron2's
``FrozenBatchNorm2d``, so a state dict moves between them and normcli's layer in both directions; a
``num_batches_tracked`` entry in a BatchNorm state dict is dropped on load, as torchvision does.

One class per input rank (channels in dim 1): FrozenBatchNorm1d takes (N, C) or (N, C, L), FrozenBatchNorm2d
(N, C, H, W), FrozenBatchNorm3d (N, C, D, H, W).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _FrozenBatchNorm(nn.Module):
    _ranks: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a BatchNorm's state dict carries num_batches_tracked; a frozen layer has no use for it
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def fold_scale_shift(self) -> tuple[Tensor, Tensor]:
        """The per-channel ``(scale, shift)`` of ``x * scale + shift``, in float64 (fold uses it)."""
        scale = self.weight.double() / torch.sqrt(self.running_var.double() + self.eps)
        return scale, self.bias.double() - self.running_mean.double() * scale

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in self._ranks:
            raise ValueError(f"{type(self).__name__} expects {' or '.join(f'{r}-d' for r in self._ranks)} input, "
                             f"got {x.dim()}-d")
        # computed in the input's dtype like torchvision's, with eps added before the square root
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.view(view) + shift.view(view)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    @torch.no_grad()
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> "_FrozenBatchNorm":
        """A frozen layer computing ``bn``'s eval output (its running statistics and affine parameters)."""
        ref = bn.running_var if bn.running_var is not None else bn.weight
        frozen = cls(bn.num_features, eps=bn.eps, device=ref.device if ref is not None else None,
                     dtype=ref.dtype if ref is not None else None)
        if bn.running_mean is not None:
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
        if bn.weight is not None:
            frozen.weight.copy_(bn.weight)
            frozen.bias.copy_(bn.bias)
        return frozen


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen BatchNorm on (N, C) or (N, C, L) inputs."""

    _ranks = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen BatchNorm on (N, C, H, W) inputs; state-dict compatible with torchvision's FrozenBatchNorm2d."""

    _ranks = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen BatchNorm on (N, C, D, H, W) inputs."""

    _ranks = (5,)
