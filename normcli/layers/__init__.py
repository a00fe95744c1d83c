"""normcli's own norm layers: FRN + TLU and MABN (with the centred convolution it expects).

Importing this package imports torch; the CLI imports it only inside the commands that need it.
"""

from normcli.layers.frn import FilterResponseNorm1d, FilterResponseNorm2d, FilterResponseNorm3d
from normcli.layers.mabn import MABN2d, CenConv2d

__all__ = [
    "FilterResponseNorm1d",
    "FilterResponseNorm2d",
    "FilterResponseNorm3d",
    "MABN2d",
    "CenConv2d",
]
