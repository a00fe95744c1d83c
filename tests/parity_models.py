"""Models whose ONNX export is wrong on purpose at a known module, for fuse-export's diagnostics.

Each wrong module is a leaf to torch.fx (its ``__module__`` says torch.nn, like nn.Identity), so the fold keeps
it as one call and the folded torch model still runs it eagerly, correctly; only the exported graph differs.
"""

import torch
from torch import nn


class ShiftedWhenExported(nn.Identity):
    """The identity when torch runs it, +0.5 in an exported graph: an export that is wrong on purpose."""

    __module__ = "torch.nn.modules.linear"  # a leaf to torch.fx like nn.Identity: the fold keeps it one call

    def forward(self, x):
        if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
            return x + 0.5
        return x


class WrongAtCulprit(nn.Module):
    """conv-bn-relu twice, then ``culprit`` (wrong in the export), then conv, pool and a 10-class head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.culprit = ShiftedWhenExported()
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.culprit(self.relu(self.bn2(self.conv2(x))))
        return self.fc(torch.flatten(self.pool(self.conv3(x)), 1))


def wrong_at_culprit():
    return WrongAtCulprit()


class BatchScale(nn.Identity):
    """Scales by the batch size read as a Python number: a trace bakes in the example's batch size."""

    __module__ = "torch.nn.modules.linear"  # a leaf to torch.fx: the folded model calls it as it is

    def forward(self, x):
        return x * float(x.shape[0])


class BatchScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.scale = BatchScale()

    def forward(self, x):
        return self.scale(self.bn(self.conv(x)))


def batch_scaled():
    return BatchScaled()
