"""Norm + dropout + activation in one module: what ``swap`` makes of a norm+activation module (timm's
``BatchNormAct2d`` and kin), so that the activation the model applied inside the norm's module stays there.

Each class is a norm layer (``BatchNorm2dAct`` is an ``nn.BatchNorm2d``) with two children, ``drop`` and
``act``, applied after the norm in that order, as timm's norm+activation layers do. The norm's state-dict
keys are the base layer's, at the same place (``bn1.weight``, ``bn1.running_mean``); the activation's are
under ``act.``. normcli's fold knows these classes (``normcli.norm_act``) and folds the norm part, keeping
the activation.
"""

from __future__ import annotations

from torch import Tensor, nn

from normcli.layers.frn import FilterResponseNorm1d, FilterResponseNorm2d, FilterResponseNorm3d
from normcli.layers.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from normcli.layers.mabn import MABN2d

__all__ = ["with_followers", "NORM_ACT_BY_BASE"]


class _Followed:
    """Mixin: the base norm's forward, then ``self.drop``, then ``self.act``."""

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


def _define(base: type) -> type:
    name = f"{base.__name__}Act"
    doc = f"{base.__name__} followed by ``drop`` and ``act`` (children), as one module."
    return type(name, (_Followed, base), {"__module__": __name__, "__qualname__": name, "__doc__": doc})


BatchNorm1dAct = _define(nn.BatchNorm1d)
BatchNorm2dAct = _define(nn.BatchNorm2d)
BatchNorm3dAct = _define(nn.BatchNorm3d)
SyncBatchNormAct = _define(nn.SyncBatchNorm)
FrozenBatchNorm1dAct = _define(FrozenBatchNorm1d)
FrozenBatchNorm2dAct = _define(FrozenBatchNorm2d)
FrozenBatchNorm3dAct = _define(FrozenBatchNorm3d)
MABN2dAct = _define(MABN2d)
GroupNormAct = _define(nn.GroupNorm)
FilterResponseNorm1dAct = _define(FilterResponseNorm1d)
FilterResponseNorm2dAct = _define(FilterResponseNorm2d)
FilterResponseNorm3dAct = _define(FilterResponseNorm3d)

# exact base class -> its norm+activation class
NORM_ACT_BY_BASE: dict[type, type] = {
    cls.__mro__[2]: cls for cls in (
        BatchNorm1dAct, BatchNorm2dAct, BatchNorm3dAct, SyncBatchNormAct, FrozenBatchNorm1dAct,
        FrozenBatchNorm2dAct, FrozenBatchNorm3dAct, MABN2dAct, GroupNormAct, FilterResponseNorm1dAct,
        FilterResponseNorm2dAct, FilterResponseNorm3dAct)
}


def with_followers(norm: nn.Module, drop: nn.Module | None, act: nn.Module | None) -> nn.Module:
    """``norm`` (changed in place) as its norm+activation class, applying ``drop`` then ``act`` after it
    (an ``nn.Identity`` for a missing one)."""
    cls = NORM_ACT_BY_BASE.get(type(norm))
    if cls is None:
        raise TypeError(f"no norm+activation class for {type(norm).__name__}")
    norm.__class__ = cls
    norm.drop = drop if drop is not None else nn.Identity().train(norm.training)
    norm.act = act if act is not None else nn.Identity().train(norm.training)
    return norm
