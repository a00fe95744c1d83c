"""normcli: inspect, swap and fold the normalization layers of PyTorch models.

The public API is imported lazily, so that ``import normcli`` (and ``normcli --help``) never imports torch:

    from normcli import inspect_file, swap_norms, fold_batchnorm
"""

from __future__ import annotations

import importlib
from typing import Any

from normcli._version import __version__

_EXPORTS = {
    "inspect_file": "normcli.inspection",
    "InspectReport": "normcli.inspection",
    "Thresholds": "normcli.inspection",
    "read_tensors": "normcli.reader",
    "assess_path": "normcli.trust",
    "ScanResult": "normcli.trust",
    "discover": "normcli.discover",
    "load_model": "normcli.loading",
    "build_arch": "normcli.loading",
    "fold_batchnorm": "normcli.fold",
    "FoldReport": "normcli.fold",
    "fold_weight_norm": "normcli.weight_norm",
    "swap_norms": "normcli.swap",
    "SwapReport": "normcli.swap",
    "SWAP_TARGETS": "normcli.swap",
    "export_onnx": "normcli.export",
    "check_parity": "normcli.parity",
    "ParityResult": "normcli.parity",
    "FilterResponseNorm1d": "normcli.layers",
    "FilterResponseNorm2d": "normcli.layers",
    "FilterResponseNorm3d": "normcli.layers",
    "MABN2d": "normcli.layers",
    "CenConv2d": "normcli.layers",
    "NormcliError": "normcli.errors",
    "CheckFailed": "normcli.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'normcli' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
