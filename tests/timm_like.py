"""Classes with the structure and the qualified names of timm's norm+activation layers, and small nets using
them (timm itself cannot be installed beside the CPU torch here).

``BatchNormAct2d`` copies timm's forward (BatchNorm's, via F.batch_norm, then ``drop``, then ``act``);
``SyncBatchNormAct`` calls SyncBatchNorm's forward and then ``drop``/``act`` when present; ``FrozenBatchNormAct2d``
is a plain module with four buffers, like timm's. Their ``__module__`` is timm's, so normcli sees the
qualified names a timm model has; :func:`install` registers that module so ``torch.save(model)`` can name
them in a pickle. Also usable as ``--arch tests/timm_like.py:timm_like_net``.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

TIMM_MODULE = "timm.layers.norm_act"


class BatchNormAct2d(nn.BatchNorm2d):
    __module__ = TIMM_MODULE

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 act_layer=nn.ReLU, drop_layer=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x):
        assert x.ndim == 4, f"expected 4D input (got {x.ndim}D input)"
        bn_training = True if self.training else (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, 0.0 if self.momentum is None else self.momentum,
                         self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


class SyncBatchNormAct(nn.SyncBatchNorm):
    __module__ = TIMM_MODULE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


class FrozenBatchNormAct2d(nn.Module):
    __module__ = TIMM_MODULE

    def __init__(self, num_features, eps=1e-5, act_layer=nn.ReLU):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.drop = nn.Identity()
        self.act = act_layer()

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        bias = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return self.act(self.drop(x * scale + bias))


class NotTimmBatchNormAct2d(BatchNormAct2d):
    """The same forward under a name no registry knows: an opaque BatchNorm subclass."""

    __module__ = "mylib.layers"


def install() -> None:
    """Make ``timm.layers.norm_act`` importable in this process (pickle looks classes up by module name)."""
    for name in ("timm", "timm.layers", TIMM_MODULE, "mylib", "mylib.layers"):
        sys.modules.setdefault(name, types.ModuleType(name))
    for cls in (BatchNormAct2d, SyncBatchNormAct, FrozenBatchNormAct2d):
        setattr(sys.modules[TIMM_MODULE], cls.__name__, cls)
    sys.modules["mylib.layers"].NotTimmBatchNormAct2d = NotTimmBatchNormAct2d


class TimmLikeNet(nn.Module):
    """conv -> BatchNormAct2d(SiLU, dropout) -> conv -> SyncBatchNormAct(PReLU, no drop) -> conv ->
    FrozenBatchNormAct2d(ReLU) -> pool -> linear."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(width, act_layer=nn.SiLU, drop_layer=lambda: nn.Dropout(0.2))
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = SyncBatchNormAct(width)
        self.bn2.act = nn.PReLU(width)
        self.conv3 = nn.Conv2d(width, width, 1)
        self.bn3 = FrozenBatchNormAct2d(width)
        self.fc = nn.Linear(width, 5)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = self.bn2(self.conv2(x))
        x = self.bn3(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


def randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-default statistics and affine values from a seeded float64 generator; returns the model in eval."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None and getattr(m, "running_var", None) is not None:
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    return model.eval()


def timm_like_net(width: int = 8) -> TimmLikeNet:
    torch.manual_seed(0)
    return TimmLikeNet(width)


class FunctionalBN(nn.Module):
    """A conv followed by ``F.batch_norm`` on statistics this module holds (no BatchNorm module)."""

    def __init__(self, cin: int = 3, cout: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.register_buffer("running_mean", torch.zeros(cout))
        self.register_buffer("running_var", torch.ones(cout))
        self.weight = nn.Parameter(torch.ones(cout))
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=1e-3)


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = FunctionalBN(3, 6)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.block(x)))


def functional_net() -> FunctionalNet:
    torch.manual_seed(0)
    return FunctionalNet()
