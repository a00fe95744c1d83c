"""Parse JSON found inside a checkpoint (a .pt2's weight table and graph) with bounded memory and time.

``json.loads`` is linear in its input, but what it builds is not: ``[{},{},...]`` turns 3 bytes into a
~90-byte dict, ``[[[[...]]]]`` recurses once per level. Before parsing, one vectorised pass over the bytes
counts the values and measures the nesting (structure outside strings only); either past its limit ends in
a :class:`normcli.limits.LimitExceeded` naming it, before anything is built.
"""

from __future__ import annotations

import json
from typing import Any

from normcli.errors import NormcliError
from normcli.limits import DEFAULT_LIMITS, LimitExceeded, Limits

_CHUNK = 1 << 20


def load_json(data: bytes, where: str, limits: Limits = DEFAULT_LIMITS) -> Any:
    """``json.loads(data)`` once its size, number of values and nesting are known to be within ``limits``."""
    if len(data) > limits.max_json_bytes:
        raise LimitExceeded(f"{where} is {len(data)} bytes of JSON", "max_json_bytes", limits.max_json_bytes)
    scanned = _scan(data, limits.max_json_nodes)
    if scanned is None:
        raise NormcliError(f"{where} is not valid JSON (an unterminated string); the file is corrupt")
    values, depth = scanned
    if values > limits.max_json_nodes:
        raise LimitExceeded(f"{where} holds more than {limits.max_json_nodes} JSON values", "max_json_nodes",
                            limits.max_json_nodes)
    if depth > limits.max_json_depth:
        raise LimitExceeded(f"{where} nests JSON {depth} levels deep", "max_json_depth", limits.max_json_depth)
    try:
        return json.loads(data)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        text = " ".join(str(e).split())[:160]
        raise NormcliError(f"{where} is not valid JSON ({text}); the file is corrupt") from None


def _scan(data: bytes, max_values: int) -> tuple[int, int] | None:
    """(number of values, nesting depth) of JSON text, counting only structure outside strings; None when a
    string is not closed. Escapes are removed first (one copy), so every remaining quote delimits a string;
    then numpy walks the bytes in 1 MiB chunks (an inside-string mask from the running parity of quotes, the
    depth from a running sum of brackets): linear time, a few MiB of memory, no per-string objects. Stops
    early once the values pass ``max_values``."""
    import numpy as np

    text = data.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in data else data
    everything = np.frombuffer(text, dtype=np.uint8)
    values, depth, deepest, parity = 1, 0, 0, 0
    for start in range(0, everything.size, _CHUNK):
        a = everything[start:start + _CHUNK]
        inside = np.bitwise_xor.accumulate((a == ord('"')).view(np.uint8)) ^ parity
        outside = inside == 0
        opens = ((a == ord("[")) | (a == ord("{"))) & outside
        closes = ((a == ord("]")) | (a == ord("}"))) & outside
        values += int(np.count_nonzero(opens)) + int(np.count_nonzero((a == ord(",")) & outside))
        levels = np.cumsum(opens.view(np.int8) - closes.view(np.int8), dtype=np.int64) + depth
        if levels.size:
            deepest = max(deepest, int(levels.max()))
            depth = int(levels[-1])
        parity = int(inside[-1]) if inside.size else parity
        if values > max_values:
            return values, deepest
    if parity:
        return None
    return values, deepest
