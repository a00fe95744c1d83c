"""An unpickler that never runs code carried by a file.

Every global a pickle names is looked up in a small allow-list of pure functions written here (tensor
rebuilders, plain containers). Anything else -- a model class, ``os.system``, ``builtins.eval`` -- becomes
an inert placeholder class that only records the arguments and state it is given. Calling a placeholder
(the pickle REDUCE opcode) builds another placeholder; nothing is imported and nothing is executed.

This is what lets ``normcli inspect`` read full pickled modules and TorchScript archives without
``--unsafe-load``, and it needs no torch at all: tensors come back as :class:`LazyArray` descriptions whose
bytes are read (memory-mapped) only when a caller asks for them.
"""

from __future__ import annotations

import collections
import io
import pickle
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

# torch storage class name -> (numpy dtype, element size). bfloat16 is read as uint16 and widened on load.
STORAGE_DTYPES: dict[str, tuple[str, int]] = {
    "FloatStorage": ("float32", 4),
    "DoubleStorage": ("float64", 8),
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "LongStorage": ("int64", 8),
    "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1),
    "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
    "ComplexFloatStorage": ("complex64", 8),
    "ComplexDoubleStorage": ("complex128", 16),
}

# torch.dtype attribute name -> storage class name (for _rebuild_tensor_v3 and dtype globals)
TORCH_DTYPE_STORAGE = {
    "float32": "FloatStorage", "float": "FloatStorage", "float64": "DoubleStorage", "double": "DoubleStorage",
    "float16": "HalfStorage", "half": "HalfStorage", "bfloat16": "BFloat16Storage", "int64": "LongStorage",
    "long": "LongStorage", "int32": "IntStorage", "int": "IntStorage", "int16": "ShortStorage",
    "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
}


class Placeholder:
    """Stand-in for any class or function a pickle names outside the allow-list. Records, never runs."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        object.__setattr__(obj, "_args", args)
        object.__setattr__(obj, "_state", None)
        object.__setattr__(obj, "_items", {})
        object.__setattr__(obj, "_list", [])
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        object.__setattr__(self, "_state", state)

    def __call__(self, *args, **kwargs):
        # a placeholder obtained from another (getattr(<builtins>, "eval")) is called by REDUCE: stay inert
        return _Result(self, args)

    def __setitem__(self, key, value):
        self._items[key] = value

    def append(self, value):
        self._list.append(value)

    def extend(self, values):
        self._list.extend(values)

    def __repr__(self):
        return f"<placeholder {self.qualname}>"


class _Result(Placeholder):
    """What calling a placeholder instance returns: a record of the call, nothing more."""

    qualname = "<call>"


class StorageType:
    """A torch storage class named in a pickle (``torch.FloatStorage``), kept as data."""

    def __init__(self, name: str):
        self.name = name


@dataclass
class StorageRef:
    """Where a storage's bytes live; ``reader(dtype, numel)`` returns them as a numpy array (lazily)."""

    key: str
    dtype: str
    numel: int
    reader: Callable[["StorageRef"], np.ndarray] | None = None

    def array(self) -> np.ndarray:
        if self.reader is None:
            raise ValueError(f"storage {self.key} has no data")
        return self.reader(self)


@dataclass
class LazyArray:
    """A tensor described by a file: shape, dtype and where its bytes are; read on ``load()``."""

    storage: StorageRef | None
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    array_: np.ndarray | None = None  # set when the bytes are already in memory

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def load(self) -> np.ndarray:
        """Read the tensor's values (a copy; bfloat16 widened to float32)."""
        if self.array_ is not None:
            return self.array_
        if self.storage is None:
            raise ValueError("tensor has no storage")
        base = self.storage.array()
        if self.numel == 0:
            return np.zeros(self.shape, dtype=_numpy_dtype(self.dtype))
        last = self.offset + sum((s - 1) * st for s, st in zip(self.shape, self.stride))
        if self.offset < 0 or last >= base.size or any(st < 0 for st in self.stride):
            raise ValueError("tensor extends past the end of its storage")
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset:], shape=self.shape, strides=tuple(st * item for st in self.stride), writeable=False)
        out = np.array(view)
        if self.dtype == "bfloat16":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out


def _numpy_dtype(name: str) -> np.dtype:
    return np.dtype("uint16" if name == "bfloat16" else name)


def _rebuild_tensor(storage, storage_offset, size, stride, *_rest):
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError("tensor without a storage")
    return LazyArray(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride),
                     storage.dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype=None,
                       metadata=None):
    tensor = _rebuild_tensor(storage, storage_offset, size, stride)
    if isinstance(dtype, str) and dtype in TORCH_DTYPE_STORAGE:
        tensor.dtype = STORAGE_DTYPES[TORCH_DTYPE_STORAGE[dtype]][0]
    return tensor


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_rest):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args) if callable(func) and not isinstance(func, type) else Placeholder(args)


def _identity(value, *_rest):
    return value


def _encode(text, encoding="latin1"):
    # protocol-2 pickles spell bytes as _codecs.encode(str, "latin1"); allow only that, not any codec lookup
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8") or not isinstance(text, str):
        raise pickle.UnpicklingError("unsupported codec in pickle")
    return text.encode(encoding)


def _build_set(items=()):
    try:
        return set(items)
    except TypeError:
        return list(items)


def _build_frozenset(items=()):
    try:
        return frozenset(items)
    except TypeError:
        return list(items)


def _torch_size(dims=()):
    return tuple(dims)


def _torch_device(*args):
    return ":".join(str(a) for a in args)


# (module, name) -> the pure function or marker that stands for it.
SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): _build_set,
    ("__builtin__", "set"): _build_set,
    ("builtins", "frozenset"): _build_frozenset,
    ("__builtin__", "frozenset"): _build_frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): _encode,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
}
# TorchScript's pickler wraps lists and tags types with these; they are identities for our purposes.
for _name in ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "build_list",
              "restore_type_tag"):
    SAFE_GLOBALS[("torch.jit._pickle", _name)] = _identity

class SafeUnpickler(pickle.Unpickler):
    """Unpickle with placeholders for every non-allow-listed global; collect what was named."""

    def __init__(self, file: io.BufferedIOBase, persistent_load: Callable[[Any], Any] | None = None):
        super().__init__(file)
        self.globals_seen: list[str] = []
        self._placeholders: dict[str, type] = {}
        self._persistent = persistent_load

    def find_class(self, module: str, name: str):
        qualname = f"{module}.{name}"
        if qualname not in self.globals_seen:
            self.globals_seen.append(qualname)
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name)
        if module == "torch" and name in TORCH_DTYPE_STORAGE:
            return name  # a torch.dtype object, kept as its name
        cls = self._placeholders.get(qualname)
        if cls is None:
            cls = type(name if name.isidentifier() else "Placeholder", (Placeholder,), {"qualname": qualname})
            self._placeholders[qualname] = cls
        return cls

    def persistent_load(self, pid):
        if self._persistent is None:
            raise pickle.UnpicklingError("pickle refers to external storage but the file has none")
        return self._persistent(pid)

    @property
    def unsafe_globals(self) -> list[str]:
        """Globals that a real unpickler would import and could run (classes, functions)."""
        return [g for g in self.globals_seen if is_unsafe_global(g)]


def is_unsafe_global(qualname: str) -> bool:
    """Whether a real unpickler would import, and could run, this global: anything this module does not
    stand in for itself (SAFE_GLOBALS, torch storage types and dtypes)."""
    module, _, name = qualname.rpartition(".")
    if (module, name) in SAFE_GLOBALS:
        return False
    return not (module == "torch" and (name in STORAGE_DTYPES or name in TORCH_DTYPE_STORAGE))


def storage_from_pid(pid, reader: Callable[[StorageRef], np.ndarray]) -> StorageRef:
    """Turn a torch persistent id ``('storage', type, key, location, numel[, view])`` into a StorageRef."""
    if not isinstance(pid, tuple) or len(pid) < 5:
        raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
    typename = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
    if typename != "storage":
        raise pickle.UnpicklingError(f"unsupported persistent id kind {typename!r:.40}")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if isinstance(storage_type, StorageType):
        dtype = STORAGE_DTYPES[storage_type.name][0]
    elif isinstance(storage_type, str) and storage_type in TORCH_DTYPE_STORAGE:
        dtype = STORAGE_DTYPES[TORCH_DTYPE_STORAGE[storage_type]][0]
    else:
        raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r:.60}")
    if not isinstance(numel, int) or numel < 0:
        raise pickle.UnpicklingError("storage with a bad element count")
    return StorageRef(str(key), dtype, numel, reader)


def element_size(dtype: str) -> int:
    return _numpy_dtype(dtype).itemsize
