"""Models and data functions that the recalibrate tests name on the command line (path.py:callable)."""

from __future__ import annotations

import torch
from torch import nn


class TwoInputs(nn.Module):
    """A model whose forward takes two named inputs, as dict-batch models do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn_a = nn.BatchNorm2d(2)
        self.fc = nn.Linear(3, 4)
        self.bn_b = nn.BatchNorm1d(4)

    def forward(self, image, features):
        return self.conv(self.bn_a(image)).mean((2, 3)).sum(1, keepdim=True) + self.bn_b(self.fc(features))


def two_inputs():
    torch.manual_seed(0)
    return TwoInputs().eval()


def dict_batches(batch_size=4):
    gen = torch.Generator().manual_seed(7)
    for _ in range(4):
        yield {"image": torch.randn(batch_size, 2, 5, 5, generator=gen) * 3 + 1,
               "features": torch.randn(batch_size, 3, generator=gen).numpy()}


def call_dict(model, batch):
    return model(image=batch["image"], features=batch["features"])


def no_tracking():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())


def rgb_net():
    torch.manual_seed(0)
    return _RGB().eval()


class _RGB(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(x)
