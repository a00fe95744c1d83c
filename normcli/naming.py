"""Orders for layer names that read the way a model is built (no torch, no numpy)."""

from __future__ import annotations

import re

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that compares runs of digits as numbers: ``layer1.2`` before ``layer1.10``.

    Used for formats that do not keep a model's order (safetensors stores its keys sorted as strings).
    """
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in _DIGITS.split(name) if part)
