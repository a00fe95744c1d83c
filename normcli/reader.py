"""Read the tensors and module class names of any checkpoint, without torch and without running its code.

``read_tensors(path)`` returns a :class:`TensorFile`: the state dict found in the file (names -> lazily read
arrays), the class of each module where the file names it, and the globals a real unpickler would have
imported. Tensor bytes are memory-mapped and read only when a caller loads that tensor, so inspecting a
multi-GB checkpoint touches only the norm layers' few kilobytes.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from normcli.errors import NormcliError
from normcli.formats import LEGACY_MAGIC, CheckpointFile, open_checkpoint, read_safetensors_header
from normcli.limits import DEFAULT_LIMITS, LimitExceeded, Limits
from normcli.safe_json import load_json
from normcli.safe_pickle import (LazyArray, PickleRefused, Placeholder, SafeUnpickler, StorageRef, element_size,
                                 is_unsafe_global, safe_load, state_dict_metadata, storage_from_pid, walk_pickle,
                                 _numpy_dtype)

# Where training frameworks keep the weights, in the order we prefer them.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights",
                   "params", "model_state", "state_dict_ema", "model_ema", "ema_state_dict", "ema")
# Prefixes wrappers add to every key: DataParallel/DDP, torch.compile, Lightning's `self.model`.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
# Nodes any one walk over a file's structure may visit (state-dict search, module trees); real checkpoints
# stay far below (a ResNet-152 full pickle has ~500 modules), a file of shared references cannot multiply it.
WALK_BUDGET = 200_000

SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
# torch._export.serde.schema.ScalarType
PT2_DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float16", 7: "float32",
              8: "float64", 12: "bool", 13: "bfloat16"}


@dataclass
class TensorFile:
    """What a checkpoint holds, as far as it can be known without running it."""

    path: str
    format: str                 # state-dict | checkpoint | full-pickle | torchscript | pt2 | safetensors
    container: str              # torch-zip | torch-legacy | torchscript | pt2 | safetensors
    tensors: dict[str, LazyArray]
    module_types: dict[str, str] = field(default_factory=dict)   # module name -> class qualname
    module_eps: dict[str, float] = field(default_factory=dict)    # module name -> eps, where recorded
    state_dict_key: str | None = None
    stripped_prefixes: list[str] = field(default_factory=list)
    unsafe_globals: list[str] = field(default_factory=list)
    other_state_dicts: list[str] = field(default_factory=list)   # e.g. an EMA copy next to the chosen one
    swap_options: dict | None = None    # written by `normcli swap`: how to rebuild the swapped model
    globals: list[str] = field(default_factory=list)        # every global any pickle in the file names, in order
    metadata: dict | None = None        # the state dict's `_metadata` (module versions), as torch.load keeps it
    file_findings: list = field(default_factory=list)       # findings about the file itself (shards, trust)


def read_tensors(path: str | os.PathLike | CheckpointFile, key: str | None = None,
                 limits: Limits | None = None) -> TensorFile:
    """Read the state dict in ``path`` (any torch/safetensors format). ``key`` picks a nested entry.

    ``path`` may be a :class:`normcli.formats.CheckpointFile` already opened (and recognised) by the caller:
    then nothing is opened again. The returned arrays read from that file's map when loaded.
    """
    limits = limits or DEFAULT_LIMITS
    ck = open_checkpoint(path, limits)
    p = ck
    fmt = ck.format
    try:
        if fmt == "safetensors":
            return _read_safetensors(p)
        if fmt == "pt2":
            return _read_pt2(p, limits)
        if fmt == "onnx":
            raise NormcliError(f"{p} is an ONNX model; it holds no PyTorch state dict "
                               "(normcli inspect reads it; swap and fuse-export need a PyTorch checkpoint)")
        if fmt == "torch-legacy":
            root, unpickler, globals_ = _unpickle_legacy(p, limits)
        else:
            root, unpickler, globals_ = _unpickle_zip(p, limits)
        tf = _interpret(p, root, "torchscript" if fmt == "torchscript" else fmt, key)
    except (PickleRefused, LimitExceeded) as e:  # raised below the file level: say which file
        if not str(e.args[0]).startswith(str(p)):
            e.args = (f"{p}: {e.args[0]}",)
        raise
    except NormcliError:
        raise
    except RecursionError:
        raise LimitExceeded(f"{p}: the file's structure nests too deeply", "pickle_depth",
                            limits.pickle_depth) from None
    except Exception as e:  # any failure to parse what the file claims means the file is damaged
        raise NormcliError(f"{p}: cannot read the {fmt} file ({type(e).__name__}: {e}); "
                           "it is truncated or corrupt") from None
    tf.unsafe_globals = unpickler.unsafe_globals
    tf.globals = globals_
    if isinstance(root, dict) and isinstance(root.get("normcli_swap"), dict) and _plain_data(root["normcli_swap"]):
        tf.swap_options = root["normcli_swap"]
    return tf


def _plain_data(obj: Any, budget: list[int] | None = None, depth: int = 0) -> bool:
    """Only JSON-like values (no placeholders, no tensors) count as swap options; the walk visits at most a
    few thousand values, however many times the pickle repeats one by reference."""
    budget = [4096] if budget is None else budget
    budget[0] -= 1
    if depth > 8 or budget[0] < 0:
        return False
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain_data(v, budget, depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain_data(v, budget, depth + 1) for v in obj)
    return obj is None or isinstance(obj, (str, int, float, bool))


# ----------------------------------------------------------------------------------------------- containers

class _MappedFile:
    """A read-only memory map of the whole file; arrays are views into it (pages read on first touch).

    Built from an opened :class:`CheckpointFile` it shares that file's map; from a path it opens the file once.
    """

    def __init__(self, p: Path | CheckpointFile):
        ck = p if isinstance(p, CheckpointFile) else CheckpointFile(p, detect=False)
        self.size = ck.size
        self.mm = ck.mm

    def array(self, offset: int, dtype: str, count: int) -> np.ndarray:
        nbytes = count * element_size(dtype)
        if offset < 0 or offset + nbytes > self.size:
            raise NormcliError("a tensor's data lies outside the file; the file is truncated or corrupt")
        return np.frombuffer(self.mm, dtype=_numpy_dtype(dtype), count=count, offset=offset)


def _entry_reader(p, z, folder: str):
    """Storage reader over a checked archive: a map of stored entries, a capped inflate of compressed ones
    (capped at the bytes the pickle's tensors need)."""
    def read(ref: StorageRef) -> np.ndarray:
        nbytes = ref.numel * element_size(ref.dtype)
        data = z.read_prefix(f"{folder}{ref.key}", nbytes, what=f"storage {ref.key!r}")
        return np.frombuffer(data, dtype=_numpy_dtype(ref.dtype), count=ref.numel)
    return read


def _unpickle_zip(p: CheckpointFile, limits: Limits = DEFAULT_LIMITS) -> tuple[Any, SafeUnpickler, list[str]]:
    z = p.archive
    prefix = z.prefix
    reader = _entry_reader(p, z, f"{prefix}data/")
    data = z.read(f"{prefix}data.pkl", limits.max_record_bytes, "data.pkl")
    storages: dict[str, StorageRef] = {}

    def persistent_load(pid):
        ref = _one_storage(storages, storage_from_pid(pid, reader, limits))
        entry = z.get(f"{prefix}data/{ref.key}")
        if entry is None:
            raise PickleRefused(f"the pickle refers to storage {ref.key}, which the archive does not hold; the "
                                "file is corrupt")
        if entry.size < ref.nbytes:
            raise PickleRefused(f"storage {ref.key} holds {entry.size} bytes but the pickle says {ref.nbytes}; the "
                                "file is corrupt")
        return ref

    root, unpickler, walk = _checked_load(io.BytesIO(data), persistent_load, limits)
    found = list(walk.globals)
    if f"{prefix}constants.pkl" in z:  # TorchScript: its constants are a second pickle of the file
        constants = z.read(f"{prefix}constants.pkl", limits.max_record_bytes, "constants.pkl")
        more = walk_pickle(io.BytesIO(constants), limits, len(constants)).globals
        found += [g for g in more if g not in found]
        unpickler.globals_seen += [g for g in more if g not in unpickler.globals_seen]
    return root, unpickler, found


def _one_storage(storages: dict[str, StorageRef], ref: StorageRef) -> StorageRef:
    """The first record of a storage key; a later record of the same key must describe the same storage."""
    first = storages.setdefault(ref.key, ref)
    if first is not ref and (first.dtype != ref.dtype or first.numel != ref.numel):
        raise PickleRefused(f"the pickle describes storage {ref.key} twice, differently; the file is crafted")
    return first


def _checked_load(stream, persistent_load=None, limits: Limits = DEFAULT_LIMITS):
    """Unpickle the next pickle in ``stream`` once one walk over its opcodes accepted it (see
    ``safe_pickle.walk_pickle``): depth, memo, size budget, opcodes; returns (value, unpickler, walk)."""
    return safe_load(stream, persistent_load, limits, size=_stream_size(stream))


def _stream_size(stream) -> int | None:
    if isinstance(stream, io.BytesIO):
        return len(stream.getbuffer())
    if isinstance(stream, _MMapReader):
        return len(stream.mm)
    return None


def _unpickle_legacy(p: Path, limits: Limits = DEFAULT_LIMITS) -> tuple[Any, SafeUnpickler, list[str]]:
    mf = _MappedFile(p)
    f = _MMapReader(mf.mm)
    found: dict[str, None] = {}
    magic, _, walk = _checked_load(f, None, limits)
    found.update(dict.fromkeys(walk.globals))
    if magic != LEGACY_MAGIC:
        raise NormcliError(f"{p}: not a torch legacy file (bad magic number)")
    for _ in range(2):  # protocol version, sys info
        found.update(dict.fromkeys(_checked_load(f, None, limits)[2].globals))
    storages: dict[str, StorageRef] = {}
    offsets: dict[str, int] = {}

    def read(ref: StorageRef) -> np.ndarray:
        return mf.array(offsets[ref.key], ref.dtype, ref.numel)

    def persistent_load(pid):
        return _one_storage(storages, storage_from_pid(pid, read, limits))

    root, unpickler, walk = _checked_load(f, persistent_load, limits)
    found.update(dict.fromkeys(walk.globals))
    keys, _, walk = _checked_load(f, None, limits)
    found.update(dict.fromkeys(walk.globals))
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        raise NormcliError(f"{p}: the legacy file's storage key list is missing or malformed; the file is corrupt")
    pos = f.tell()
    for key in keys:
        if pos + 8 > mf.size:
            raise NormcliError(f"{p}: the file ends inside its tensor data; it is truncated")
        (count,) = struct.unpack("<q", mf.mm[pos:pos + 8])
        ref = storages.get(key)
        if ref is None:
            raise NormcliError(f"{p}: the legacy file stores data for storage {key}, which its pickle never "
                               "names; the file is corrupt")
        if count != ref.numel:
            raise NormcliError(f"{p}: storage {key} holds {count} elements but the pickle says {ref.numel}; "
                               "the file is corrupt")
        if pos + 8 + count * element_size(ref.dtype) > mf.size:
            raise NormcliError(f"{p}: the file ends inside its tensor data; it is truncated")
        offsets[key] = pos + 8
        pos += 8 + count * element_size(ref.dtype)
    missing = [k for k in storages if k not in offsets]
    if missing:
        # torch.load would leave these tensors uninitialised: whatever was in memory would become weights
        raise NormcliError(f"{p}: the pickle refers to storage {missing[0]}"
                           f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, which is missing "
                           "from the legacy file's key list; the file is corrupt")
    return root, unpickler, list(found)


class _MMapReader(io.RawIOBase):
    """A file object over an mmap that the unpickler can read and that reports its position."""

    def __init__(self, mm: mmap.mmap):
        self.mm = mm
        self.pos = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        end = len(self.mm) if n is None or n < 0 else min(len(self.mm), self.pos + n)
        out = self.mm[self.pos:end]
        self.pos = end
        return out

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def readline(self, size: int = -1) -> bytes:
        end = self.mm.find(b"\n", self.pos)
        end = len(self.mm) if end < 0 else end + 1
        if size is not None and size >= 0:
            end = min(end, self.pos + size)
        out = self.mm[self.pos:end]
        self.pos = end
        return out

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else len(self.mm) + pos)
        return self.pos


def _read_safetensors(p: Path | CheckpointFile) -> TensorFile:
    header, start = read_safetensors_header(p)
    mf = _MappedFile(p)
    data_size = mf.size - start
    tensors: dict[str, LazyArray] = {}
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[meta["dtype"]]
            shape = tuple(_count(s) for s in meta["shape"])
            begin, end = (_count(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise NormcliError(f"{p}: safetensors entry {_shown(name)} has a malformed or unsupported description "
                               "(dtype, shape and data_offsets must be a known dtype and non-negative integers)") \
                from None
        numel = _product(shape)
        if not 0 <= begin <= end <= data_size or end - begin != numel * element_size(dtype):
            raise NormcliError(f"{p}: safetensors entry {_shown(name)} claims bytes {begin}..{end} that do not fit "
                               f"its shape {_shown(list(shape))} or the file ({data_size} data bytes); the file is "
                               "corrupt")
        spans.append((begin, end, name))
        ref = StorageRef(name, dtype, numel, lambda r, off=start + begin: mf.array(off, r.dtype, r.numel))
        tensors[name] = LazyArray(ref, 0, shape, _contiguous_strides(shape), dtype)
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise NormcliError(f"{p}: safetensors entries {_shown(n0)} and {_shown(n1)} overlap; the file is corrupt")
    sd, stripped = _strip_wrapper_prefixes(tensors)
    return TensorFile(str(p), "safetensors", "safetensors", sd, stripped_prefixes=stripped)


# A dimension, stride, offset or byte count stored in a file: a JSON integer (not a float, not a bool), at
# least 0 and below 2**62, so sums and products of a few of them stay exact and fit numpy's int64.
_COUNT_MAX = 1 << 62


def _count(value: Any) -> int:
    if type(value) is not int or not 0 <= value < _COUNT_MAX:
        raise ValueError("not a count")
    return value


def _product(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _shown(value: Any, width: int = 80) -> str:
    """A value from the file, for a message: repr (so control characters are escaped), shortened; an int of
    thousands of digits or a deeply nested key is described, not converted."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except (ValueError, RecursionError, MemoryError):
        return f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= width else text[:width - 3] + "..."


def _key(value: Any) -> str:
    """A dict key from the file, for a message: strings as they are, anything else through :func:`_shown`."""
    return value[:80] if isinstance(value, str) else _shown(value)


def _pt2_tensor(p, fqn: str, meta: Any) -> tuple[str, str | None, tuple, tuple, int, bool]:
    """(entry name, dtype or None if unsupported, shape, stride, storage offset, use_pickle) of one weight."""
    try:
        path_name = meta["path_name"]
        tmeta = meta["tensor_meta"]
        code = tmeta["dtype"]
        if not isinstance(path_name, str) or type(code) is not int:
            raise TypeError
        shape = tuple(_count(s["as_int"]) for s in tmeta["sizes"])
        stride = tuple(_count(s["as_int"]) for s in tmeta["strides"])
        offset = _count(tmeta["storage_offset"]["as_int"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise NormcliError(f"{p}: weight {_shown(fqn)} has a malformed description in model_weights_config.json "
                           "(sizes, strides and storage_offset must be non-negative integers); the file is corrupt") \
            from None
    if len(shape) != len(stride) or len(shape) > 64:
        raise NormcliError(f"{p}: weight {_shown(fqn)} has {len(shape)} sizes and {len(stride)} strides; the file "
                           "is corrupt")
    return path_name, PT2_DTYPES.get(code), shape, stride, offset, bool(meta.get("use_pickle"))


def _read_pt2(p: CheckpointFile, limits: Limits = DEFAULT_LIMITS) -> TensorFile:
    """A torch.export archive: weights are raw entries described by JSON; module classes by node metadata."""
    z = p.archive
    prefix = z.prefix
    cfg_name = f"{prefix}data/weights/model_weights_config.json"
    if cfg_name not in z:
        raise NormcliError(f"{p}: torch.export archive without a weights description; this archive version is "
                           "not supported")
    config = _pt2_json(p, z, cfg_name, limits)
    config = config.get("config", {}) if isinstance(config, dict) else None
    if not isinstance(config, dict):
        raise NormcliError(f"{p}: model_weights_config.json holds no weight table; the file is corrupt")
    tensors: dict[str, LazyArray] = {}
    unsafe: list[str] = []
    found: list[str] = []
    for fqn, meta in config.items():
        path_name, dtype, shape, stride, offset, use_pickle = _pt2_tensor(p, fqn, meta)
        if dtype is None:
            continue
        entry = f"{prefix}data/weights/{path_name}"
        if use_pickle:
            # a torch.save'd tensor inside the archive: read it with the same safe unpickler
            inner = _read_inner_pickle(p, z, entry, prefix, limits)
            tensors[fqn] = inner
            continue
        e = z.entry(entry, f"weight {_shown(fqn)}")
        count = e.size // element_size(dtype)
        numel = _product(shape)
        last = offset + sum((s - 1) * st for s, st in zip(shape, stride)) if numel else -1
        if numel and last >= count:
            raise NormcliError(f"{p}: weight {_shown(fqn)} (shape {list(shape)}, strides {list(stride)}, offset "
                               f"{offset}) reaches past the {e.size} bytes of {path_name}; the file is corrupt")
        ref = StorageRef(entry, dtype, count, _entry_reader(p, z, ""))
        tensors[fqn] = LazyArray(ref, offset, shape, stride, dtype)
    module_types: dict[str, str] = {}
    model_json = f"{prefix}models/model.json"
    if model_json in z:
        module_types = _pt2_module_types(_pt2_json(p, z, model_json, limits))
    sample_inputs = f"{prefix}data/sample_inputs/model.pt"
    if sample_inputs in z:
        inner = z.nested(sample_inputs, limits.max_record_bytes, "the sample inputs")
        pkl = f"{inner.prefix}data.pkl"
        found = _pickle_globals(inner.read(pkl, limits.max_record_bytes, "the sample inputs' data.pkl")
                                if pkl in inner else b"", limits)
        unsafe = [g for g in found if is_unsafe_global(g)]
    sd, stripped = _strip_wrapper_prefixes(tensors)
    return TensorFile(str(p), "pt2", "pt2", sd, module_types=module_types, stripped_prefixes=stripped,
                      unsafe_globals=unsafe, globals=found)


def _pt2_json(p, z, name: str, limits: Limits) -> Any:
    short = name.rsplit("/", 1)[-1]
    data = z.read(name, limits.max_json_bytes, short, limit_name="max_json_bytes")
    return load_json(data, f"{p}: {short}", limits)


def _read_inner_pickle(p, z, entry: str, prefix: str, limits: Limits = DEFAULT_LIMITS) -> LazyArray:
    inner = z.nested(entry, limits.max_record_bytes)
    data = inner.read(f"{inner.prefix}data.pkl", limits.max_record_bytes, f"{entry}'s data.pkl")
    read = _entry_reader(p, inner, f"{inner.prefix}data/")
    value, _unpickler, _walk = _checked_load(io.BytesIO(data), lambda pid: storage_from_pid(pid, read, limits),
                                             limits)
    if not isinstance(value, LazyArray):
        raise NormcliError(f"{p}: weight entry {entry} does not hold a tensor")
    return value


def _pickle_globals(blob: bytes, limits: Limits = DEFAULT_LIMITS) -> list[str]:
    """Every global a pickle names, in order, found by the checked opcode walk (never executing); a pickle
    the walk refuses is refused here too."""
    if not blob:
        return []
    return walk_pickle(io.BytesIO(blob), limits, len(blob)).globals


def _pt2_module_types(model: Any) -> dict[str, str]:
    """Module path -> class from the graph nodes' nn_module_stack; anything not shaped so is skipped (the
    JSON's size and nesting were bounded when it was parsed, so this walk is linear in it)."""
    types: dict[str, str] = {}
    graph = _get(_get(model, "graph_module"), "graph")
    nodes = _get(graph, "nodes")
    for node in nodes if isinstance(nodes, list) else ():
        stack = _get(_get(node, "metadata"), "nn_module_stack")
        for item in stack.split(";") if isinstance(stack, str) else []:
            parts = item.split(",")
            if len(parts) >= 3:
                path, cls = parts[1], parts[-1]
                if path:
                    types.setdefault(_clean_module_path(path), cls)
    return types


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else None


def _clean_module_path(path: str) -> str:
    # torch.export writes paths like "layer1.0.bn1" or "L['self'].layer1[0]"; normalise the latter form
    for a, b in (("L['self'].", ""), ("L__self__.", ""), ("['", "."), ("']", ""), ("[", "."), ("]", "")):
        path = path.replace(a, b)
    return path.strip(".")


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


# ------------------------------------------------------------------------------------- finding the weights

def _is_module(obj: Any) -> bool:
    state = obj._state if isinstance(obj, Placeholder) else None
    return isinstance(state, dict) and "_modules" in state and ("_parameters" in state or "_buffers" in state)


def _is_script_module(obj: Any) -> bool:
    return isinstance(obj, Placeholder) and obj.qualname.startswith("__torch__.")


def _tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and \
        all(isinstance(k, str) for k in obj) and all(isinstance(v, LazyArray) for v in obj.values())


class _Budget:
    """Counts the nodes one walk over a file's structure visits; shared references cannot multiply it."""

    def __init__(self, p: Path, what: str, limit: int = WALK_BUDGET):
        self.p, self.what, self.left = p, what, limit

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise NormcliError(f"{self.p}: {self.what} visits more than {WALK_BUDGET} nodes; the file repeats "
                               "its structure by reference (crafted) or is not a checkpoint normcli knows")


def _interpret(p: Path, root: Any, container: str, key: str | None) -> TensorFile:
    if container == "torchscript":
        if not _is_script_module(root):
            raise NormcliError(f"{p}: TorchScript archive without a module; the file is corrupt")
        tensors: dict[str, LazyArray] = {}
        types: dict[str, str] = {}
        eps: dict[str, float] = {}
        _walk_script(root, "", tensors, types, eps, depth=0, budget=_Budget(p, "the TorchScript module tree"),
                     path=set())
        return TensorFile(str(p), "torchscript", "torchscript", tensors, module_types=types, module_eps=eps)
    if key is not None:
        return _from_key(p, root, container, key)
    if _is_module(root):
        return _from_module(p, root, container, None)
    if _tensor_dict(root):
        return _from_state_dict(p, root, "state-dict", container, None)
    if isinstance(root, dict):
        candidates = [k for k in STATE_DICT_KEYS if k in root and (_tensor_dict(root[k]) or _is_module(root[k]))]
        if candidates:
            tf = _from_key(p, root, container, candidates[0])
            tf.other_state_dicts = candidates[1:]
            return tf
        found = _largest_tensor_dict(root, "", depth=0, budget=_Budget(p, "the search for the state dict"),
                                     seen=set())
        if found is not None:
            return _from_key(p, root, container, found)
    raise NormcliError(f"{p}: no state dict found in this {container} file (top level is "
                       f"{_describe(root)}); if the weights are under an unusual key, pass --key")


def _from_key(p: Path, root: Any, container: str, key: str) -> TensorFile:
    obj = root
    for part in key.split("/"):
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        else:
            raise NormcliError(f"{p}: no entry {key!r} in the checkpoint; top-level keys: "
                               f"{', '.join(map(_key, list(root)[:12])) if isinstance(root, dict) else '-'}")
    if _is_module(obj):
        return _from_module(p, obj, container, key)
    if not _tensor_dict(obj):
        raise NormcliError(f"{p}: entry {key!r} is {_describe(obj)}, not a state dict")
    return _from_state_dict(p, obj, "checkpoint", container, key)


def _from_state_dict(p: Path, obj: dict, fmt: str, container: str, key: str | None) -> TensorFile:
    sd, stripped = _strip_wrapper_prefixes(dict(obj))
    metadata = state_dict_metadata(obj)
    if metadata is not None:
        metadata = _strip_metadata_prefixes(metadata, stripped)
    return TensorFile(str(p), fmt, container, sd, state_dict_key=key, stripped_prefixes=stripped,
                      metadata=metadata)


def _from_module(p: Path, module: Placeholder, container: str, key: str | None) -> TensorFile:
    tensors: dict[str, LazyArray] = {}
    types: dict[str, str] = {}
    eps: dict[str, float] = {}
    _walk_module(module, "", tensors, types, eps, depth=0, budget=_Budget(p, "the module tree"), path=set())
    return TensorFile(str(p), "full-pickle", container, tensors, module_types=types, module_eps=eps,
                      state_dict_key=key)


def _record_eps(state: dict, module: str, eps: dict) -> None:
    value = state.get("eps")
    if isinstance(value, float) and not isinstance(value, bool):
        eps[module] = value


def _enter(obj: Any, path: set, depth: int, budget: _Budget) -> None:
    if depth > 200:
        raise NormcliError(f"{budget.p}: module nesting is deeper than 200 levels; the file is corrupt or hostile")
    if id(obj) in path:
        raise NormcliError(f"{budget.p}: a module contains itself; the file is corrupt or hostile")
    budget.spend()


def _walk_module(obj: Placeholder, prefix: str, tensors: dict, types: dict, eps: dict, depth: int,
                 budget: _Budget, path: set) -> None:
    _enter(obj, path, depth, budget)
    types[prefix.rstrip(".")] = obj.qualname
    state = obj._state
    _record_eps(state, prefix.rstrip("."), eps)
    skip = state.get("_non_persistent_buffers_set") or ()
    if not isinstance(skip, (set, frozenset, list, tuple)):
        skip = ()
    for group in ("_parameters", "_buffers"):
        entries = state.get(group)
        for name, value in (entries.items() if isinstance(entries, dict) else ()):
            budget.spend()
            if isinstance(name, str) and isinstance(value, LazyArray) and not (group == "_buffers" and name in skip):
                tensors[prefix + name] = value
    children = state.get("_modules")
    path.add(id(obj))
    for name, child in (children.items() if isinstance(children, dict) else ()):
        budget.spend()
        if isinstance(name, str) and _is_module(child):
            _walk_module(child, f"{prefix}{name}.", tensors, types, eps, depth + 1, budget, path)
    path.discard(id(obj))


def _walk_script(obj: Placeholder, prefix: str, tensors: dict, types: dict, eps: dict, depth: int,
                 budget: _Budget, path: set) -> None:
    _enter(obj, path, depth, budget)
    types[prefix.rstrip(".")] = _script_class(obj.qualname)
    state = obj._state if isinstance(obj._state, dict) else {}
    _record_eps(state, prefix.rstrip("."), eps)
    path.add(id(obj))
    for name, value in state.items():
        budget.spend()
        if isinstance(value, LazyArray):
            tensors[prefix + str(name)] = value
        elif _is_script_module(value):
            _walk_script(value, f"{prefix}{name}.", tensors, types, eps, depth + 1, budget, path)
    path.discard(id(obj))


def _script_class(qualname: str) -> str:
    parts = [s for s in qualname.split(".") if not s.startswith("___torch_mangle")]
    if parts and parts[0] == "__torch__":
        parts = parts[1:]
    return ".".join(parts)


def _largest_tensor_dict(obj: Any, path: str, depth: int, budget: _Budget, seen: set) -> str | None:
    best, best_n = None, 0
    if depth > 6 or not isinstance(obj, dict) or id(obj) in seen:
        return None
    seen.add(id(obj))  # a dict reached again by another key holds nothing new
    for k, v in obj.items():
        budget.spend()
        if not isinstance(k, str):
            continue
        sub = f"{path}/{k}" if path else k
        if (_tensor_dict(v) and len(v) > best_n) or (_is_module(v) and best is None):
            best, best_n = sub, len(v) if isinstance(v, dict) else best_n
        elif isinstance(v, dict):
            inner = _largest_tensor_dict(v, sub, depth + 1, budget, seen)
            if inner is not None and best is None:
                best = inner
    return best


def _strip_wrapper_prefixes(sd: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Remove `module.`/`model.` prefixes that every key shares, and `_orig_mod.` wherever it appears."""
    stripped: list[str] = []
    if any("_orig_mod." in k for k in sd):
        sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}
        stripped.append("_orig_mod.")
    changed = True
    while changed and sd:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                stripped.append(prefix)
                changed = True
    return sd, stripped


def _strip_metadata_prefixes(metadata: dict, stripped: list[str]) -> dict:
    """Rename a state dict's ``_metadata`` keys as its tensor keys were renamed, the way torch's
    ``consume_prefix_in_state_dict_if_present`` does: for prefix ``module.``, ``module`` becomes ``""`` (the
    wrapped module's entry replaces the wrapper's) and ``module.x`` becomes ``x``; ``_orig_mod`` is dropped
    from every name, as it was from the tensor keys."""
    import collections

    out = collections.OrderedDict(metadata)
    for prefix in stripped:
        if prefix == "_orig_mod.":
            renamed = collections.OrderedDict()
            for key, value in out.items():
                renamed[".".join(part for part in key.split(".") if part != "_orig_mod")] = value
            out = renamed
            continue
        for key in list(out):
            if key and (key == prefix.replace(".", "") or key.startswith(prefix)):
                out[key[len(prefix):]] = out.pop(key)
    return out


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        return f"a dict with keys {', '.join(map(_key, list(obj)[:8]))}" if obj else "an empty dict"
    if isinstance(obj, Placeholder):
        return f"an object of class {obj.qualname}"
    return f"a {type(obj).__name__}"
