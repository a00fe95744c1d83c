"""Read torch's pickles without running anything a file carries, and without trusting its structure.

Two steps, in this order, for every pickle stream:

1. :func:`walk_pickle` makes one linear pass over the opcodes (like ``pickletools.genops``; nothing is
   built or executed). It checks the nesting depth, memo indices, the number of objects and references the
   stream would build (a budget that grows with the stream's length), the opcodes themselves (no extension
   registry, no out-of-band buffers, persistent ids only as torch writes them) and collects the globals the
   stream names, in order of first appearance. A stream that fails any check never reaches an unpickler.
2. :class:`SafeUnpickler` builds the value. Every global is looked up in a small allow-list of pure
   functions written here (tensor rebuilders, plain containers); anything else -- a model class,
   ``os.system``, ``builtins.eval`` -- becomes an inert :class:`Placeholder` that records the arguments and
   state it is given. What the allow-list builds are plain records (``__slots__``, immutable, no state can be
   set on them). The one piece of state torch's own files set on an allowed object, a state dict's
   ``_metadata`` (module versions), is accepted as validated plain data.

Tensors come back as :class:`LazyArray` records: shape, strides and dtype checked against the storage they
name, bytes read (memory-mapped) only when a caller asks for them. No torch is needed.
"""

from __future__ import annotations

import collections
import io
import pickle
from typing import Any, Callable

import numpy as np

from normcli.errors import NormcliError
from normcli.limits import DEFAULT_LIMITS, LimitExceeded, Limits
from normcli.pickle_walk import FORBIDDEN_OPCODES, PickleRefused, PickleWalk, walk_pickle  # noqa: F401

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

# A size, stride or offset above this is no real tensor's (and would overflow numpy's int64 arithmetic).
MAX_TENSOR_INT = 2 ** 48




# ------------------------------------------------------------------------------------------------ records

class Record:
    """Base of everything the allow-list builds: ``__slots__``, immutable, and no state can be set on it
    (the pickle BUILD opcode on a record is refused instead of giving it attributes)."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __setstate__(self, state):
        raise PickleRefused(f"the pickle sets state (BUILD) on a {type(self).__name__}, which torch never writes; "
                            "the file is crafted or corrupt")

    def _init(self, **fields):
        for name, value in fields.items():
            object.__setattr__(self, name, value)


class StorageType(Record):
    """A torch storage class named in a pickle (``torch.FloatStorage``), kept as data."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self._init(name=name)

    def __repr__(self):
        return f"torch.{self.name}"


class StorageRef(Record):
    """One storage of a file: its key, dtype and element count, and a ``reader`` that returns exactly its
    ``numel`` elements as a read-only numpy array over the file's checked bytes."""

    __slots__ = ("key", "dtype", "numel", "reader", "limits")

    def __init__(self, key: str, dtype: str, numel: int, reader: Callable[["StorageRef"], np.ndarray] | None = None,
                 limits: Limits = DEFAULT_LIMITS):
        self._init(key=key, dtype=dtype, numel=numel, reader=reader, limits=limits)

    @property
    def nbytes(self) -> int:
        return self.numel * element_size(self.dtype)

    def array(self) -> np.ndarray:
        if self.reader is None:
            raise NormcliError(f"storage {self.key} has no data")
        arr = self.reader(self)
        if arr.size != self.numel or arr.dtype != _numpy_dtype(self.dtype):  # a reader bug, never file data
            raise NormcliError(f"storage {self.key}: read {arr.size} elements, expected {self.numel}")
        return arr

    def __repr__(self):
        return f"<storage {self.key} {self.dtype}[{self.numel}]>"


class LazyArray(Record):
    """A tensor described by a file: shape, strides and dtype over a storage; read on ``load()``.

    ``array_`` holds values normcli computed itself (a live module's tensors); records built from a file
    never have it.
    """

    __slots__ = ("storage", "offset", "shape", "stride", "dtype", "array_")

    def __init__(self, storage: StorageRef | None, offset: int, shape: tuple[int, ...], stride: tuple[int, ...],
                 dtype: str, array_: np.ndarray | None = None):
        self._init(storage=storage, offset=offset, shape=tuple(shape), stride=tuple(stride), dtype=dtype,
                   array_=array_)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def extent(self) -> int:
        """Elements of the storage the tensor reaches (0 for an empty tensor)."""
        return tensor_extent(self.offset, self.shape, self.stride)

    def load(self) -> np.ndarray:
        """Read the tensor's values (a copy; bfloat16 widened to float32)."""
        if self.array_ is not None:
            return self.array_
        if self.storage is None:
            raise NormcliError("tensor has no storage")
        if self.numel == 0:
            return np.zeros(self.shape, dtype=np.float32 if self.dtype == "bfloat16" else _numpy_dtype(self.dtype))
        base = self.storage.array()
        if self.extent > base.size:
            raise NormcliError(f"a tensor extends past the end of its storage {self.storage.key}")
        item = base.itemsize
        nbytes = self.numel * item
        budget = self.storage.limits.tensor_expand_bytes
        if nbytes > max(base.size * item, budget):
            # legal in torch (a zero stride repeats elements), but materialising it is the file's choice of size
            raise LimitExceeded(f"a tensor of shape {list(self.shape)} repeats its {base.size * item} stored bytes "
                                f"into {nbytes} bytes", "tensor_expand_bytes", budget)
        view = np.lib.stride_tricks.as_strided(
            base[self.offset:], shape=self.shape, strides=tuple(st * item for st in self.stride), writeable=False)
        out = np.array(view)
        if self.dtype == "bfloat16":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out

    def __repr__(self):
        return f"<tensor {self.dtype}{list(self.shape)}>"


def tensor_extent(offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """offset + sum((size-1)*stride) + 1, in Python ints (no overflow); 0 when the tensor is empty."""
    if any(s == 0 for s in shape):
        return 0
    return offset + sum((s - 1) * st for s, st in zip(shape, stride)) + 1


def _numpy_dtype(name: str) -> np.dtype:
    return np.dtype("uint16" if name == "bfloat16" else name)


def element_size(dtype: str) -> int:
    return _numpy_dtype(dtype).itemsize


def _plain_ints(values, what: str, limits: Limits) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or len(values) > limits.tensor_dims:
        raise PickleRefused(f"a tensor record's {what} is not a list of at most {limits.tensor_dims} integers")
    for v in values:
        if type(v) is not int or not 0 <= v <= MAX_TENSOR_INT:
            raise PickleRefused(f"a tensor record's {what} holds {v!r:.40}, not a non-negative integer below "
                                f"2**48; the file is crafted or corrupt")
    return tuple(values)


def checked_tensor(storage, offset, size, stride, dtype: str | None = None) -> LazyArray:
    """A LazyArray for a tensor record, once its parts are known to describe bytes the storage holds."""
    if not isinstance(storage, StorageRef):
        raise PickleRefused("a tensor record names no storage of the file")
    limits = storage.limits
    (offset,) = _plain_ints((offset,), "storage offset", limits)
    shape = _plain_ints(size, "size", limits)
    stride = _plain_ints(stride, "stride", limits)
    if len(shape) != len(stride):
        raise PickleRefused(f"a tensor record has {len(shape)} sizes but {len(stride)} strides")
    if dtype is not None and dtype != storage.dtype:
        if element_size(dtype) != element_size(storage.dtype):
            raise PickleRefused(f"a tensor record reads {storage.dtype} storage {storage.key} as {dtype}")
    extent = tensor_extent(offset, shape, stride)
    if extent > storage.numel:
        raise PickleRefused(f"a tensor of shape {list(shape)}, strides {list(stride)} at offset {offset} needs "
                            f"{extent} elements of storage {storage.key}, which holds {storage.numel}; "
                            "the file is crafted or corrupt")
    return LazyArray(storage, offset, shape, stride, dtype or storage.dtype)


class Placeholder:
    """Stand-in for any class or function a pickle names outside the allow-list. Records, never runs.

    Slots only: a pickle cannot give it attributes (so nothing makes it array-like); BUILD stores the state
    once, as data, for inspect to read a module's tree, parameters and eps from.
    """

    __slots__ = ("_args", "_state", "_items", "_list")
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

    def __setattr__(self, name, value):
        raise AttributeError("placeholders are immutable")

    def __delattr__(self, name):
        raise AttributeError("placeholders are immutable")

    def __setstate__(self, state):
        if self._state is not None:
            raise PickleRefused(f"the pickle sets the state of one {self.qualname} twice; the file is crafted")
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

    __slots__ = ()
    qualname = "<call>"


class StateDict(collections.OrderedDict):
    """The OrderedDict the allow-list builds. torch sets one piece of state on a state dict, its
    ``_metadata`` (module name -> {"version": N}): that is accepted, as validated plain data, and nothing else."""

    def __setstate__(self, state):
        if not isinstance(state, dict) or set(state) != {"_metadata"} or "_metadata" in self.__dict__:
            raise PickleRefused("the pickle sets state (BUILD) other than _metadata on an OrderedDict; "
                                "torch never writes that: the file is crafted or corrupt")
        self.__dict__["_metadata"] = _checked_metadata(state["_metadata"])


def _checked_metadata(meta) -> collections.OrderedDict:
    if not isinstance(meta, dict):
        raise PickleRefused("a state dict's _metadata is not a dict")
    out = collections.OrderedDict()
    for name, local in meta.items():
        if not isinstance(name, str) or not isinstance(local, dict):
            raise PickleRefused("a state dict's _metadata maps something other than module names to dicts")
        entry = {}
        for k, v in local.items():
            if not isinstance(k, str) or not (v is None or type(v) in (bool, int, float, str)):
                raise PickleRefused(f"a state dict's _metadata for {name!r:.60} holds a value that is not plain "
                                    "data")
            entry[k] = v
        out[name] = entry
    return out


def state_dict_metadata(obj) -> dict | None:
    """The ``_metadata`` the pickle set on this state dict (validated), or None."""
    return obj.__dict__.get("_metadata") if isinstance(obj, StateDict) else None


class _Safe(Record):
    """An allow-listed global: an immutable callable around a pure function of this module."""

    __slots__ = ("fn", "qualname")

    def __init__(self, fn, qualname: str):
        self._init(fn=fn, qualname=qualname)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self):
        return f"<allowed {self.qualname}>"


# --------------------------------------------------------------------------------------------- allow-list

def _rebuild_tensor(storage, storage_offset, size, stride, *_rest):
    return checked_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       dtype=None, metadata=None):
    name = None
    if dtype is not None:
        if not (isinstance(dtype, str) and dtype in TORCH_DTYPE_STORAGE):
            raise PickleRefused(f"a tensor record names an unknown dtype {dtype!r:.40}")
        name = STORAGE_DTYPES[TORCH_DTYPE_STORAGE[dtype]][0]
    return checked_tensor(storage, storage_offset, size, stride, name)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_rest):
    if not isinstance(data, LazyArray):
        raise PickleRefused("a parameter record holds no tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if isinstance(func, _Safe) and isinstance(args, tuple):
        return func(*args)
    return _Result(func, args)


def _identity(value, *_rest):
    return value


def _encode(text, encoding="latin1"):
    # protocol-2 pickles spell bytes as _codecs.encode(str, "latin1"); allow only that, not any codec lookup
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8") or not isinstance(text, str):
        raise PickleRefused("unsupported codec in pickle")
    return text.encode(encoding)


def _build_set(items=()):
    if not isinstance(items, (list, tuple)):
        raise PickleRefused("a set built from something other than a list")
    try:
        return set(items)
    except TypeError:
        return list(items)


def _build_frozenset(items=()):
    if not isinstance(items, (list, tuple)):
        raise PickleRefused("a frozenset built from something other than a list")
    try:
        return frozenset(items)
    except TypeError:
        return list(items)


def _ordered_dict(items=()):
    if items != ():
        raise PickleRefused("an OrderedDict built with arguments; torch never writes that")
    return StateDict()


def _torch_size(dims=()):
    if not isinstance(dims, (tuple, list)) or not all(type(d) is int for d in dims):
        raise PickleRefused("a torch.Size of something other than integers")
    return tuple(dims)


def _torch_device(*args):
    if len(args) > 2 or not all(type(a) in (str, int) and len(str(a)) < 64 for a in args):
        raise PickleRefused("a torch.device of something other than a name and an index")
    return ":".join(str(a) for a in args)


def _slice(*args):
    if len(args) > 3 or not all(a is None or type(a) is int for a in args):
        raise PickleRefused("a slice of something other than integers")
    return slice(*args)


def _complex(real=0.0, imag=0.0):
    if type(real) not in (int, float) or type(imag) not in (int, float):
        raise PickleRefused("a complex number of something other than numbers")
    return complex(real, imag)


_ALLOWED: dict[tuple[str, str], Callable] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "set"): _build_set,
    ("__builtin__", "set"): _build_set,
    ("builtins", "frozenset"): _build_frozenset,
    ("__builtin__", "frozenset"): _build_frozenset,
    ("builtins", "slice"): _slice,
    ("builtins", "complex"): _complex,
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
    _ALLOWED[("torch.jit._pickle", _name)] = _identity

# (module, name) -> the immutable callable that stands for it
SAFE_GLOBALS: dict[tuple[str, str], _Safe] = {key: _Safe(fn, ".".join(key)) for key, fn in _ALLOWED.items()}


# ----------------------------------------------------------------------------------------- the opcode walk
# normcli.pickle_walk: one checked walk shared with the trust verdict (depth, memo, budget, opcodes, globals)

# ------------------------------------------------------------------------------------------- the unpickler

class SafeUnpickler(pickle.Unpickler):
    """Unpickle with placeholders for every non-allow-listed global; collect what was named. Only ever fed
    a stream that :func:`walk_pickle` accepted (see :func:`safe_load`)."""

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
            cls = type(name if name.isidentifier() else "Placeholder", (Placeholder,),
                       {"qualname": qualname, "__slots__": ()})
            self._placeholders[qualname] = cls
        return cls

    def persistent_load(self, pid):
        if self._persistent is None:
            raise PickleRefused("the pickle refers to external storage but the file has none")
        return self._persistent(pid)

    @property
    def unsafe_globals(self) -> list[str]:
        """Globals that a real unpickler would import and could run (classes, functions)."""
        return [g for g in self.globals_seen if is_unsafe_global(g)]


def safe_load(stream, persistent_load: Callable[[Any], Any] | None = None, limits: Limits = DEFAULT_LIMITS,
              size: int | None = None) -> tuple[Any, SafeUnpickler, PickleWalk]:
    """Walk the next pickle in ``stream``, then unpickle exactly those bytes; the stream ends after them."""
    walk = walk_pickle(stream, limits, size)
    stream.seek(walk.start)
    data = stream.read(walk.end - walk.start)
    stream.seek(walk.end)
    unpickler = SafeUnpickler(io.BytesIO(data), persistent_load)
    try:
        value = unpickler.load()
    except RecursionError:
        raise LimitExceeded("the pickle nests too deeply", "pickle_depth", limits.pickle_depth) from None
    return value, unpickler, walk


def is_unsafe_global(qualname: str) -> bool:
    """Whether a real unpickler would import, and could run, this global: anything this module does not
    stand in for itself (SAFE_GLOBALS, torch storage types and dtypes)."""
    module, _, name = qualname.rpartition(".")
    if (module, name) in SAFE_GLOBALS:
        return False
    return not (module == "torch" and (name in STORAGE_DTYPES or name in TORCH_DTYPE_STORAGE))


def storage_from_pid(pid, reader: Callable[[StorageRef], np.ndarray], limits: Limits = DEFAULT_LIMITS) -> StorageRef:
    """Turn a torch persistent id ``('storage', type, key, location, numel[, None])`` into a StorageRef;
    anything else is refused."""
    if not isinstance(pid, tuple) or len(pid) not in (5, 6):
        raise PickleRefused(f"the pickle uses a persistent id that is not a torch storage record ({pid!r:.80})")
    typename = pid[0].decode("latin1") if isinstance(pid[0], bytes) else pid[0]
    if typename != "storage":
        raise PickleRefused(f"the pickle uses a persistent id of kind {typename!r:.40}; torch writes only "
                            "storage records")
    storage_type, key, location, numel = pid[1], pid[2], pid[3], pid[4]
    if isinstance(storage_type, StorageType):
        dtype = STORAGE_DTYPES[storage_type.name][0]
    elif isinstance(storage_type, str) and storage_type in TORCH_DTYPE_STORAGE:
        dtype = STORAGE_DTYPES[TORCH_DTYPE_STORAGE[storage_type]][0]
    else:
        raise PickleRefused(f"a storage record names an unknown storage type {storage_type!r:.60}")
    if not isinstance(key, str) or not 0 < len(key) <= 64 or not isinstance(location, str) or len(location) > 64:
        raise PickleRefused(f"a storage record has a malformed key or location ({key!r:.40}, {location!r:.40})")
    if type(numel) is not int or not 0 <= numel <= MAX_TENSOR_INT:
        raise PickleRefused(f"storage {key} has a bad element count {numel!r:.40}")
    if len(pid) == 6 and pid[5] is not None:
        raise PickleRefused(f"storage {key} is a legacy storage view, which normcli does not read")
    return StorageRef(key, dtype, numel, reader, limits)
