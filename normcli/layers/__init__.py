"""normcli's own norm layers: FRN + TLU, MABN (with the centred convolution it expects), FrozenBatchNorm.

Importing this package imports torch; the CLI imports it only inside the commands that need it.
"""

from normcli.layers.frn import FilterResponseNorm1d, FilterResponseNorm2d, FilterResponseNorm3d
from normcli.layers.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from normcli.layers.mabn import MABN2d, CenConv2d

__all__ = [
    "FilterResponseNorm1d",
    "FilterResponseNorm2d",
    "FilterResponseNorm3d",
    "MABN2d",
    "CenConv2d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
]
