"""Parse JSON found inside a checkpoint (a .pt2's weight table and graph) with bounded memory and time.

``json.loads`` is linear in its input, but what it builds is not: ``[{},{},...]`` turns 3 bytes into a
~90-byte dict, ``[[[[...]]]]`` recurses once per level. Before parsing, one pass at C speed over the bytes
(strings blanked out) counts the values and measures the nesting; either past its limit ends in a
:class:`normcli.limits.LimitExceeded` naming it, before anything is built.
"""

from __future__ import annotations

import json
from typing import Any

from normcli.errors import NormcliError
from normcli.limits import DEFAULT_LIMITS, LimitExceeded, Limits

_STRUCTURE = bytes(range(256)).translate(None, delete=b"[]{}")  # every byte but the brackets


def load_json(data: bytes, where: str, limits: Limits = DEFAULT_LIMITS) -> Any:
    """``json.loads(data)`` once its size, number of values and nesting are known to be within ``limits``."""
    if len(data) > limits.max_json_bytes:
        raise LimitExceeded(f"{where} is {len(data)} bytes of JSON", "max_json_bytes", limits.max_json_bytes)
    skeleton = _skeleton(data)
    if skeleton is None:
        raise NormcliError(f"{where} is not valid JSON (an unterminated string); the file is corrupt")
    values = skeleton.count(b",") + skeleton.count(b"[") + skeleton.count(b"{") + 1
    if values > limits.max_json_nodes:
        raise LimitExceeded(f"{where} holds about {values} JSON values", "max_json_nodes", limits.max_json_nodes)
    depth = _depth(skeleton.translate(None, delete=_STRUCTURE))
    if depth > limits.max_json_depth:
        raise LimitExceeded(f"{where} nests JSON {depth} levels deep", "max_json_depth", limits.max_json_depth)
    try:
        return json.loads(data)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        text = " ".join(str(e).split())[:160]
        raise NormcliError(f"{where} is not valid JSON ({text}); the file is corrupt") from None


def _skeleton(data: bytes) -> bytes | None:
    """The JSON text outside its strings (None when a string is not closed). Escapes are removed first, so
    every remaining quote delimits a string; each step is one linear pass in C."""
    text = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    parts = text.split(b'"')
    if len(parts) % 2 == 0:
        return None
    return b"".join(parts[0::2])


def _depth(brackets: bytes) -> int:
    if not brackets:
        return 0
    import numpy as np

    a = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((a == ord("[")) | (a == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(steps, dtype=np.int64).max())
