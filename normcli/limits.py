"""The limits that bound what a file can make normcli's reader allocate, read or loop on.

Each limit has a default that real checkpoints never reach (a 2 GB state dict, a ResNet-152 full pickle, a
100-shard index), an error message that names it, and can be raised from the command line with
``--limit NAME=VALUE``. No torch, no numpy: the reader and the CLI both import this.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from normcli.errors import NormcliError


@dataclass(frozen=True)
class Limits:
    """Defaults are documented in the README's safety model section."""

    # Zip archives (normcli.ziparchive). A record is any entry that is not a tensor storage: data.pkl,
    # constants.pkl, a nested torch.save'd entry of a .pt2. The largest real data.pkl (a 100k-tensor state
    # dict, a ResNet-152 full pickle) is tens of MB.
    max_record_bytes: int = 512 * 1024 * 1024
    # Compressed entries (torch writes none; a re-zipped file has them) may inflate, all together, to
    # max_inflated_bytes + max_inflate_ratio x the file's size: a re-zipped 2 GB checkpoint (float weights
    # deflate to ~0.9 of their size) reads, a bomb that inflates a few MB into GBs stops before allocating them.
    max_inflated_bytes: int = 32 * 1024 * 1024
    max_inflate_ratio: int = 4
    # JSON inside a .pt2 (model_weights_config.json, models/model.json): size, values (every object, array,
    # string, number) and nesting. A real export of a 17k-node graph stays under 2M values (~40 MB of JSON);
    # nesting is ~10 levels.
    max_json_bytes: int = 64 * 1024 * 1024
    max_json_nodes: int = 2_000_000
    max_json_depth: int = 200
    # pickles (checked by one walk over the opcodes before any unpickler sees the stream)
    pickle_depth: int = 500                 # nesting of containers, tuples and marks
    pickle_items_per_byte: int = 4          # objects and references a pickle may build, per byte of pickle
    pickle_items_base: int = 1_000_000      # ... plus this many, so small pickles are never refused
    # tensors
    tensor_dims: int = 64                   # dimensions of one tensor
    tensor_expand_bytes: int = 256 * 1024 * 1024  # bytes a tensor may span beyond its storage's (zero strides)
    # Sharded checkpoints (normcli.sharded): the index JSON (size, values, nesting) and the shard files it may
    # name. The largest real indexes (a 671B-parameter MoE: 163 shards, ~90k tensors, ~9 MB) stay far below.
    max_index_bytes: int = 64 * 1024 * 1024
    max_index_nodes: int = 1_000_000
    max_index_depth: int = 64
    max_shards: int = 4096
    # torch.distributed.checkpoint directories (normcli.dcp): the .metadata pickle and the tensor chunks it
    # describes (one per tensor per rank that holds a piece of it).
    max_dcp_metadata_bytes: int = 256 * 1024 * 1024
    max_dcp_chunks: int = 1_000_000


DEFAULT_LIMITS = Limits()


class LimitExceeded(NormcliError):
    """A file asked for more than a limit allows; the message names the limit and how to raise it."""

    def __init__(self, what: str, name: str, value: int | float):
        super().__init__(f"{what}: over the limit {name}={value}; if the file is trusted and really this large, "
                         f"raise it with --limit {name}=N")
        self.name = name


def parse_limits(items: list[str] | None, base: Limits = DEFAULT_LIMITS) -> Limits:
    """``["pickle_depth=5000", ...]`` -> Limits, with an error that lists the known names."""
    names = {f.name: f.type for f in dataclasses.fields(Limits)}
    changes = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in names:
            known = ", ".join(sorted(names)) or "none"
            raise NormcliError(f"--limit {item!r} is not NAME=VALUE with a known limit name ({known})")
        try:
            number = float(value) if "float" in str(names[name]) else int(value)
        except ValueError:
            raise NormcliError(f"--limit {item!r}: {value!r} is not a number") from None
        if number <= 0:
            raise NormcliError(f"--limit {item!r}: a limit must be positive")
        changes[name] = number
    return dataclasses.replace(base, **changes)
