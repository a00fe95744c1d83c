"""A verdict on every file: which globals its pickles name, and what loading it with a real unpickler would run.

Every pickle a checkpoint carries (``data.pkl``, TorchScript's ``constants.pkl`` and ``code/`` debug pickles,
a ``.pt2``'s pickled sample inputs and constants, a torch.distributed.checkpoint ``.metadata``, the pickles of
a legacy file) is walked opcode by opcode with a symbolic stack by :mod:`normcli.pickle_walk`, the same
checked walk the reader runs before it unpickles (depth, memo, object budget, opcodes; its limits named when
hit): nothing is built, nothing is imported, and the walk is linear in the stream. Each global is classified from an ALLOW-list, never a block-list:

``tensor``  torch's own rebuild functions, storage and tensor types, dtypes, layouts, ``torch.Size``,
            ``torch.device``, plain containers (``collections.OrderedDict``, ``builtins.set`` ...), and the
            data records torch's own formats need (``torch.distributed.checkpoint`` metadata). What
            ``torch.load(weights_only=True)`` accepts.
``class``   a model or library class. Loading imports its module (running that module's top-level code)
            and constructs it. The rule for an unknown name (see :func:`classify`): its last component is
            CapWords (``ResNet``, ``BatchNorm2d``, not ``system`` or ``EVAL``), its module is neither in the
            standard library nor one of :data:`CODE_MODULES` (a few standard-library data classes such as
            ``argparse.Namespace`` are listed in :data:`STDLIB_CLASSES`), and the pickle only uses it the way
            torch.save uses a class: instantiated by NEWOBJ/NEWOBJ_EX (``copyreg.__newobj__``, how
            ``torch.save(model)`` writes every module), constructed by REDUCE/INST/OBJ, or kept as a value;
            and it never calls what it built, nor sets state on the class object itself.
``code``    everything else: anything that can run code (``os``, ``subprocess``, ``builtins.eval``/``exec``/
            ``getattr``/``__import__``, ``importlib``, ``functools.partial``, ``operator.attrgetter``/
            ``methodcaller``, ``pkgutil.resolve_name``, ``runpy``, ``pickle.loads``), any function (a name
            that is not CapWords), any standard-library name not listed as data, a global whose name the
            pickle computes at load time, and any extension-registry reference.

The verdict is ``safe`` (only tensor globals), ``needs-classes`` (classes, no code) or ``unsafe`` (any code
global). A pickle that torch's unpickler could not finish is still judged on what it names up to the point of
failure, because a real unpickler runs each REDUCE as it reaches it; if it names no code it is ``unreadable``.

No torch, no numpy: ``normcli scan`` imports only this module, :mod:`normcli.discover` and the standard
library.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

VERDICTS = ("safe", "needs-classes", "unsafe", "unreadable")
KINDS = ("tensor", "class", "code")

# ------------------------------------------------------------------------------------------- the allow-list

_STORAGES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
             "ComplexFloat", "ComplexDouble", "QInt32", "QInt8", "QUInt2x4", "QUInt4x2", "QUInt8")
_TENSOR_TYPES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
_DTYPES = ("float32", "float", "float64", "double", "float16", "half", "bfloat16", "complex32", "complex64",
           "complex128", "cfloat", "cdouble", "chalf", "int64", "long", "int32", "int", "int16", "short",
           "int8", "uint8", "uint16", "uint32", "uint64", "bool", "qint8", "quint8", "qint32", "quint4x2",
           "quint2x4", "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16", "float8_e4m3fn", "float8_e5m2",
           "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2",
           *(f"int{i}" for i in range(1, 8)), *(f"uint{i}" for i in range(1, 8)))
_LAYOUTS = ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn",
            "jagged", "contiguous_format", "channels_last", "channels_last_3d", "preserve_format",
            "per_tensor_affine", "per_channel_affine", "per_channel_affine_float_qparams", "per_tensor_symmetric",
            "per_channel_symmetric")
_REBUILDERS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
               "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor",
               "_rebuild_nested_tensor", "_rebuild_meta_tensor_no_storage", "_rebuild_wrapper_subclass",
               "_rebuild_device_tensor_from_cpu_tensor", "_rebuild_device_tensor_from_numpy")
_DCP = "torch.distributed.checkpoint"

TENSOR_GLOBALS: frozenset[str] = frozenset({
    "collections.OrderedDict", "collections.Counter",
    "builtins.set", "builtins.frozenset", "builtins.complex", "builtins.slice", "builtins.bytearray",
    "__builtin__.set", "__builtin__.frozenset", "__builtin__.complex", "__builtin__.slice",
    "__builtin__.bytearray",
    "_codecs.encode",
    "torch.Size", "torch.device", "torch.Tensor", "torch.nn.parameter.Parameter",
    "torch._tensor._rebuild_from_type_v2", "torch.serialization._get_layout",
    "torch.storage.TypedStorage", "torch.storage.UntypedStorage",
    *(f"torch._utils.{f}" for f in _REBUILDERS),
    *(f"torch.{s}Storage" for s in _STORAGES),
    *(f"torch.cuda.{s}Storage" for s in _STORAGES[:12]),
    *(f"torch.{t}Tensor" for t in _TENSOR_TYPES),
    *(f"torch.cuda.{t}Tensor" for t in _TENSOR_TYPES),
    *(f"torch.{d}" for d in _DTYPES),
    *(f"torch.{layout}" for layout in _LAYOUTS),
    # TorchScript's pickler wraps lists and tags types with these
    *(f"torch.jit._pickle.{f}" for f in ("build_intlist", "build_tensorlist", "build_doublelist",
                                         "build_boollist", "build_list", "restore_type_tag")),
    # torch.distributed.checkpoint's .metadata: plain records torch's own DCP reader unpickles
    *(f"{_DCP}.metadata.{c}" for c in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                       "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                       "StorageMeta", "_MEM_FORMAT_ENCODING")),
    f"{_DCP}.filesystem._StorageInfo",
    # paths are plain data (DCP metadata stores one); constructing them touches nothing
    "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath",
    "pathlib.Path",
})

# Standard-library classes that hold data and whose construction runs nothing of the file's choosing.
STDLIB_CLASSES: frozenset[str] = frozenset({
    "argparse.Namespace", "types.SimpleNamespace", "collections.defaultdict", "collections.deque",
    "datetime.datetime", "datetime.date", "datetime.time", "datetime.timedelta", "datetime.timezone",
    "decimal.Decimal", "fractions.Fraction", "uuid.UUID", "enum.Enum",
})

# Modules whose every name counts as code, named here for the messages (the rule needs no list: all
# standard-library modules not listed above are code anyway). Third-party modules that run code are here too.
CODE_MODULES: frozenset[str] = frozenset({
    "os", "posix", "nt", "subprocess", "builtins", "__builtin__", "importlib", "functools", "operator",
    "pkgutil", "runpy", "pickle", "_pickle", "marshal", "sys", "shutil", "socket", "ctypes", "code", "codeop",
    "types", "pty", "webbrowser", "multiprocessing", "asyncio", "threading", "signal", "io", "_io", "codecs",
    "_codecs", "copyreg", "inspect", "shelve", "tempfile", "glob", "urllib", "http", "ftplib", "smtplib",
    "numpy.testing", "numpy.f2py", "numpy.distutils", "torch.hub", "torch.utils.cpp_extension",
    "torch.serialization", "torch.jit", "torch._C", "torch.ops", "torch.library", "torch._dynamo",
    "torch._inductor", "setuptools", "distutils", "pip", "IPython", "dill", "cloudpickle", "joblib",
})

_STDLIB = frozenset(getattr(sys, "stdlib_module_names", ())) | {"__builtin__", "copy_reg", "_codecs"}
_CAPWORDS = re.compile(r"^_?[A-Z][A-Za-z0-9_]*[a-z][A-Za-z0-9_]*$")
# What a class may do in a pickle (see classify); anything else makes the name code.
CLASS_USES = frozenset({"value", "newobj", "reduce", "inst", "build"})


@dataclass(frozen=True)
class Global:
    """One global a pickle names, its kind, and why it got that kind."""

    name: str
    kind: str
    reason: str = ""


@dataclass
class Trust:
    """The verdict on one file and the globals it rests on."""

    verdict: str
    globals: list[Global] = field(default_factory=list)
    reason: str | None = None   # why a file is unreadable

    def names(self, kind: str) -> list[str]:
        return [g.name for g in self.globals if g.kind == kind]

    def as_json(self) -> dict:
        return {"verdict": self.verdict, "globals": [{"name": g.name, "kind": g.kind} for g in self.globals]}


def _top_module(module: str) -> str:
    return module.split(".", 1)[0]


def _in_code_module(module: str) -> bool:
    parts = module.split(".")
    return any(".".join(parts[:i]) in CODE_MODULES for i in range(1, len(parts) + 1))


def python3_name(name: str) -> str:
    """The global a Python 3 unpickler really loads for ``name``: protocol 0-2 pickles may spell it the
    Python 2 way (``__builtin__.eval``, ``commands.Popen`` -> ``subprocess.Popen``), which pickle maps back
    (``fix_imports``). Classifying the written name alone would let a Python 2 spelling pass as a class."""
    import _compat_pickle

    module, _, last = name.rpartition(".")
    if (module, last) in _compat_pickle.NAME_MAPPING:
        module, last = _compat_pickle.NAME_MAPPING[(module, last)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{last}" if module else name


def classify(name: str, uses: frozenset[str] | set[str] = frozenset()) -> Global:
    """Kind of the global ``module.qualname`` given how the pickle uses it (see the module docstring)."""
    loaded = python3_name(name)
    if loaded != name and loaded not in TENSOR_GLOBALS:
        g = classify(loaded, uses)
        return Global(name, g.kind, f"loads as {loaded}: {g.reason}")
    if name in TENSOR_GLOBALS and "build-global" not in uses:
        # (torch never sets state on a function or class object itself: that rewrites it for the whole process)
        return Global(name, "tensor", "torch tensor data or a plain container")
    module, _, last = name.rpartition(".")
    if not module or not last:
        return Global(name, "code", "not a module-level name: loading resolves it at run time")
    if "build-global" in uses:
        return Global(name, "code", "state is set on the global itself")
    if _in_code_module(module):
        return Global(name, "code", f"module {module} can run code")
    if name.startswith("torch.") and name.rsplit(".", 1)[0] == "torch":
        return Global(name, "code", "a torch function, not on the allow-list")
    bad_use = set(uses) - CLASS_USES
    if bad_use:
        how = {"called-result": "what it returns is called", "build-global": "state is set on the global itself",
               "dynamic": "its name is computed at load time"}
        return Global(name, "code", "; ".join(how.get(u, u) for u in sorted(bad_use)))
    if name in STDLIB_CLASSES:
        return Global(name, "class", "a standard-library data class")
    if _top_module(module) in _STDLIB:
        return Global(name, "code", "a standard-library callable not on the allow-list")
    if not _CAPWORDS.match(last) or not all(p.isidentifier() for p in name.split(".")):
        return Global(name, "code", "a function (not a CapWords class name): loading calls it")
    return Global(name, "class", "a class: loading imports its module and constructs it")


def verdict_of(globals_: list[Global]) -> str:
    kinds = {g.kind for g in globals_}
    return "unsafe" if "code" in kinds else "needs-classes" if "class" in kinds else "safe"


def trust_from_uses(uses: dict[str, set[str]], reason: str | None = None) -> Trust:
    """Classify every named global; ``reason`` marks a pickle that cannot be read to its end."""
    globals_ = [classify(n, u) for n, u in uses.items()]
    verdict = verdict_of(globals_)
    if reason is not None and verdict != "unsafe":
        return Trust("unreadable", globals_, reason)
    return Trust(verdict, globals_)


def trust_from_names(names: list[str]) -> Trust:
    """Classify names whose uses are not known (from a reader that lists names only)."""
    return trust_from_uses({n: set() for n in names})


# ------------------------------------------------------------------------------------------ the opcode walk

class PickleProblem(Exception):
    """A pickle stream that a real unpickler would stop on."""


# The walk is normcli.pickle_walk's, the same checked walk the reader runs before unpickling (depth, memo,
# object budget, opcodes), here with the uses of every global recorded. Its limits are the file's: the ones
# given to assess_path / the opened file (``--limit``), else the defaults.
DYNAMIC = "<computed global>"
_limits: list = [None]


def _current_limits():
    from normcli.limits import DEFAULT_LIMITS

    return _limits[0] or DEFAULT_LIMITS


def walk_pickle(stream, uses: dict[str, set[str]], limits=None) -> None:
    """Walk one pickle from ``stream``'s position to its STOP, adding each global and its uses to ``uses``.

    Raises PickleProblem (with the walk's message, which names the limit a stream hit) for a stream the
    reader refuses or a real unpickler would stop on; what was named before that point is already in ``uses``.
    """
    from normcli.errors import NormcliError
    from normcli.pickle_walk import walk_pickle as checked_walk

    try:
        checked_walk(stream, limits or _current_limits(), uses=uses)
    except NormcliError as e:  # PickleRefused, LimitExceeded
        raise PickleProblem(" ".join(str(e).split())) from None


def pickle_uses(data: bytes, limits=None) -> tuple[dict[str, set[str]], str | None]:
    """Globals named by the one pickle in ``data`` with their uses, and the problem that stopped it, if any."""
    uses: dict[str, set[str]] = {}
    try:
        walk_pickle(io.BytesIO(data), uses, limits)
    except PickleProblem as e:
        return uses, str(e)
    return uses, None


# --------------------------------------------------------------------------------------------- containers

LEGACY_PREFIX = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
# A pickle entry is read up to the reader's limit max_record_bytes (normcli.limits); code entries up to this.
MAX_CODE_BYTES = 64 * 1024 * 1024
MAX_NESTED_ZIP_DEPTH = 3
_SCRIPT_REF = re.compile(rb"__torch__(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
_CUSTOM_OP = re.compile(rb"\bops\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")
_BUILTIN_OP_NAMESPACES = {b"aten", b"prim", b"quantized", b"_quantized", b"profiler", b"_test"}


class Unreadable(Exception):
    """The file is not a checkpoint normcli can judge, or is malformed in a way a second reader could
    interpret differently; the message says why."""


@dataclass
class ScanResult:
    """One row of ``normcli scan``."""

    path: str
    format: str | None
    verdict: str
    globals: list[Global] = field(default_factory=list)
    reason: str | None = None

    def as_json(self) -> dict:
        return {"path": self.path, "format": self.format, "verdict": self.verdict,
                "globals": [{"name": g.name, "kind": g.kind} for g in self.globals], "reason": self.reason}


def sniff(head: bytes) -> str | None:
    """A cheap guess of the format from a file's first bytes (``None``: not something normcli reads)."""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(LEGACY_PREFIX):
        return "torch-legacy"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] >= 2:
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 2 and head[0] == 0x08 and 1 <= head[1] <= 20:
        return "onnx"
    return None


def assess_opened(ck) -> ScanResult:
    """The verdict on a :class:`normcli.formats.CheckpointFile` that is already open (inspect's), read through
    its map and checked archive: the file is not opened a second time. The walk's limits are the file's."""
    _limits[0] = getattr(ck, "limits", None)
    uses: dict[str, set[str]] = {}
    fmt = ck.format
    if fmt in ("sharded", "dcp"):  # several files, one checkpoint: the worst of its files' verdicts
        return _assess_directory(Path(ck.path), fmt)
    try:
        if ck.archive is not None:
            _walk_zip(ck.archive, uses, depth=0)
        elif fmt == "torch-legacy":
            stream = _MapReader(ck.mm, 0)
            try:
                _walk_pickle_sequence(stream, uses, fmt)
            finally:
                stream.mv.release()
    except Unreadable as e:
        return ScanResult(str(ck), fmt, "unreadable", [], str(e))
    except _Problem as e:
        trust = trust_from_uses(e.uses, e.reason)
        return ScanResult(str(ck), fmt, trust.verdict, trust.globals, trust.reason)
    trust = trust_from_uses(uses)
    return ScanResult(str(ck), fmt, trust.verdict, trust.globals, None)


def assess_path(path: str | Path, _member: bool = False, limits=None) -> ScanResult:
    """The verdict on the file at ``path`` from its pickles' opcodes alone (no tensor is built). A directory
    or index file that is one multi-file checkpoint gets the worst verdict of its files (``_member``: ``path``
    is one of those files, which may not be such a checkpoint again)."""
    p = Path(path)
    if limits is not None:
        _limits[0] = limits
    fmt = None
    try:
        if p.is_dir():
            if _member:
                raise Unreadable("a shard that is a directory")
            return _assess_directory(p)
        with open(p, "rb") as f:
            head = f.read(64)
            if not head:
                raise Unreadable("the file is empty (0 bytes)")
            fmt = sniff(head)
            uses: dict[str, set[str]] = {}
            if fmt == "zip":
                found: list[str] = []
                try:
                    _walk_zip(_open_zip(f, p), uses, depth=0, found=found)
                finally:
                    fmt = found[0] if found else None
            elif fmt in ("torch-legacy", "pickle"):
                with _mapped(f) as stream:  # walked over a map of the file: nothing is read into memory
                    _walk_pickle_sequence(stream, uses, fmt)
            elif fmt == "safetensors":
                _check_safetensors(f, p.stat().st_size)
            elif fmt is None and _is_sharded_index(p):
                if _member:
                    raise Unreadable("a shard that is itself a sharded index")
                return _assess_directory(p, "sharded")
            elif fmt is None:
                # torch.load unpickles any non-zip file (its legacy path reads a pickle first), so a
                # protocol 0/1 pickle without a signature is judged too
                try:
                    with _mapped(f) as stream:
                        walk_pickle(stream, uses)
                except PickleProblem:
                    if not uses:
                        raise Unreadable("not a checkpoint (no torch, safetensors, ONNX or pickle "
                                         "signature)") from None
                    fmt = "pickle"
                    raise _Problem(uses, "a damaged pickle") from None
                fmt = "pickle"
    except Unreadable as e:
        return ScanResult(str(path), fmt if fmt != "zip" else None, "unreadable", [], str(e))
    except _Problem as e:
        trust = trust_from_uses(e.uses, e.reason)
        return ScanResult(str(path), fmt, trust.verdict, trust.globals, trust.reason)
    except OSError as e:
        return ScanResult(str(path), fmt, "unreadable", [], f"cannot read the file ({e.strerror or e})")
    trust = trust_from_uses(uses)
    return ScanResult(str(path), fmt, trust.verdict, trust.globals, None)


def _is_sharded_index(p: Path) -> bool:
    from normcli.sharded import checkpoint_kind

    return checkpoint_kind(p) == "sharded"


@contextlib.contextmanager
def _mapped(f):
    """A read-only stream over a map of the open file ``f``, from its start."""
    import mmap

    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        stream = _MapReader(mm, 0)
        try:
            yield stream
        finally:
            stream.mv.release()


class _Problem(Exception):
    """A pickle stopped part way; carries what it named so far."""

    def __init__(self, uses: dict[str, set[str]], reason: str):
        super().__init__(reason)
        self.uses, self.reason = uses, reason


def _walk_bytes(data: bytes, uses: dict[str, set[str]], where: str) -> None:
    try:
        walk_pickle(io.BytesIO(data), uses)
    except PickleProblem as e:
        raise _Problem(uses, f"{where}: {e}") from None


def _walk_pickle_sequence(f, uses: dict[str, set[str]], fmt: str) -> None:
    """A legacy torch file (magic, protocol, sys info, the object, storage keys) or a plain pickle: up to
    five pickles back to back, as torch.load's legacy path reads them."""
    f.seek(0)
    for i in range(5):
        try:
            walk_pickle(f, uses)
        except PickleProblem as e:
            raise _Problem(uses, f"pickle {i + 1}: {e}") from None
        if fmt == "pickle":
            # torch.load reads a non-zip file as a sequence of pickles: judge the ones that follow too
            nxt = f.read(2)
            f.seek(-len(nxt), 1)
            if not (len(nxt) == 2 and nxt[0] == 0x80 and 2 <= nxt[1] <= 5):
                break


def _check_safetensors(f, size: int) -> None:
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(size - 8, 100 * 1024 * 1024):
        raise Unreadable(f"safetensors header length {n} is larger than the file allows")
    try:
        header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError):
        raise Unreadable("safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise Unreadable("safetensors header is not a JSON object")


def _open_zip(f, p: Path):
    """A checked ZipArchive over a read-only map of the open file (the map lives as long as the archive)."""
    import mmap

    from normcli.errors import NormcliError
    from normcli.ziparchive import ZipArchive

    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return ZipArchive(mm, str(p))
    except NormcliError as e:
        raise Unreadable(" ".join(str(e).split())) from None


def _walk_zip(z, uses: dict[str, set[str]], depth: int, found: list | None = None) -> str:
    """Walk every pickle in a checked torch zip (normcli.ziparchive: an archive two readers could see
    differently is refused there) and in the zips nested in a .pt2; returns the format found."""
    from normcli.errors import NormcliError

    try:
        names = z.names
        if not names:
            raise Unreadable("an empty zip archive, not a checkpoint")
        prefix = z.prefix
        fmt = None
        if f"{prefix}archive_format" in z:
            fmt = "pt2"
        elif f"{prefix}constants.pkl" in z and any(n.startswith(f"{prefix}code/") for n in names):
            fmt = "torchscript"
        elif any(n.endswith("data.pkl") for n in names):
            fmt = "torch-zip"
        if fmt is None:
            raise Unreadable("a zip archive but not a torch checkpoint (no data.pkl, TorchScript code or "
                             "torch.export archive inside)")
        if found is not None:
            found.append(fmt)
        for n in names:
            if n.endswith("/"):
                continue
            label = f"{z.where}:{n}" if depth else n
            if n.endswith(".pkl") or n.endswith(".debug_pkl"):
                _walk_bytes(z.read(n, z.limits.max_record_bytes), uses, label)
            elif fmt == "torchscript" and "/code/" in f"/{n}" and n.endswith(".py"):
                _script_refs(z.read(n, MAX_CODE_BYTES, limit_name=""), uses)
            elif fmt == "pt2" and (n.endswith(".pt") or "/constants/" in n or "/sample_inputs/" in n):
                entry = z.entry(n)
                head = bytes(z.read_prefix(n, min(4, entry.size))) if entry.size else b""
                if head.startswith(b"PK"):
                    if depth + 1 >= MAX_NESTED_ZIP_DEPTH:
                        raise Unreadable(f"{label}: zip archives nested more than {MAX_NESTED_ZIP_DEPTH} deep")
                    _walk_zip(z.nested(n, z.limits.max_record_bytes), uses, depth + 1)
                elif head[:1] == b"\x80":
                    _walk_bytes(z.read(n, z.limits.max_record_bytes), uses, label)
    except NormcliError as e:  # the archive's checks and caps: unreadable, with the reason
        raise Unreadable(" ".join(str(e).split())) from None
    return fmt


def _script_refs(code: bytes, uses: dict[str, set[str]]) -> None:
    """Classes a TorchScript source file refers to, and operators outside torch's own namespaces."""
    for m in _SCRIPT_REF.finditer(code):
        uses.setdefault(m.group(0).decode(), set()).add("value")
    for m in _CUSTOM_OP.finditer(code):
        if m.group(1) not in _BUILTIN_OP_NAMESPACES:
            # a custom operator runs native code from a library the loading process must have loaded
            uses.setdefault(f"torch.ops.{m.group(1).decode()}.{m.group(2).decode()}", set()).add("reduce")


def _assess_directory(p: Path, kind: str | None = None) -> ScanResult:
    """A checkpoint made of several files (a directory that is one checkpoint, or a sharded index file; see
    normcli.sharded.checkpoint_kind): the worst verdict of the files it is made of."""
    from normcli.discover import checkpoint_directory

    kind = kind or checkpoint_directory(p)
    if kind is None:
        return ScanResult(str(p), None, "unreadable", [], "a directory, not a checkpoint")
    try:
        members = checkpoint_members(p, kind)
    except Unreadable as e:
        return ScanResult(str(p), kind, "unreadable", [], str(e))
    merged: dict[str, Global] = {}
    worst, reasons = "safe", []
    order = {v: i for i, v in enumerate(("safe", "needs-classes", "unreadable", "unsafe"))}
    for member in members:
        if not member.exists():
            continue  # a missing shard holds nothing to judge (the reader reports it: shard-missing)
        if member.suffix == ".distcp":
            r = _distcp_result(member)
        else:
            r = assess_path(member, _member=True)
        for g in r.globals:
            if g.name not in merged or g.kind == "code":
                merged[g.name] = g
        if r.reason:
            reasons.append(f"{member.name}: {r.reason}")
        if order[r.verdict] > order[worst]:
            worst = r.verdict
    return ScanResult(str(p), kind, worst, list(merged.values()), "; ".join(reasons) or None)


def _distcp_result(member: Path) -> ScanResult:
    uses: dict[str, set[str]] = {}
    try:
        _assess_distcp(member, uses)
    except Unreadable as e:
        return ScanResult(str(member), "dcp", "unreadable", [], str(e))
    except _Problem as e:
        trust = trust_from_uses(e.uses, e.reason)
        return ScanResult(str(member), "dcp", trust.verdict, trust.globals, trust.reason)
    except OSError as e:
        return ScanResult(str(member), "dcp", "unreadable", [], f"cannot read the file ({e.strerror or e})")
    trust = trust_from_uses(uses)
    return ScanResult(str(member), "dcp", trust.verdict, trust.globals)


def checkpoint_members(p: Path, kind: str) -> list[Path]:
    """The files whose pickles make up a multi-file checkpoint (``p`` a directory, or a sharded index file;
    the JSON index itself holds no pickle). An index the shards reader would refuse is :class:`Unreadable`."""
    if kind == "dcp":
        # the .metadata pickle; the .distcp files hold torch.save'd zips for non-tensor values
        return [p / ".metadata", *sorted(p.glob("*.distcp"))]
    if kind == "sharded":
        from normcli.errors import NormcliError
        from normcli.limits import DEFAULT_LIMITS
        from normcli.sharded import find_index, index_shards, read_index

        index = p if p.is_file() else find_index(p)
        if index is None:
            raise Unreadable("no sharded index in the directory")
        try:
            # checked as the shards reader checks it (a name that leaves the directory is refused), and
            # every shard the index names, a repeated tensor's other copies included
            _, _, _, names = index_shards(read_index(index, DEFAULT_LIMITS), index, DEFAULT_LIMITS)
            return [index.parent / n for n in names]
        except NormcliError as e:
            raise Unreadable(" ".join(str(e).split())) from None
    return []


def _assess_distcp(path: Path, uses: dict[str, set[str]]) -> None:
    """A .distcp file: tensor bytes and, for non-tensor values, torch.save zips written back to back. Every
    embedded ``data.pkl`` is found by its local header and walked (the pickle ends itself at STOP)."""
    import mmap

    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos = mm.find(b"PK\x03\x04")
            while pos >= 0 and pos + 30 <= len(mm):
                flags, method = struct.unpack_from("<HH", mm, pos + 6)
                name_len, extra_len = struct.unpack_from("<HH", mm, pos + 26)
                name = bytes(mm[pos + 30:pos + 30 + name_len])
                if name.endswith(b"/data.pkl") or name == b"data.pkl":
                    if method != 0:
                        raise Unreadable(f"{path.name}: a compressed data.pkl at offset {pos}")
                    stream = _MapReader(mm, pos + 30 + name_len + extra_len)
                    try:
                        walk_pickle(stream, uses)
                    except PickleProblem as e:
                        raise _Problem(uses, f"{path.name} at offset {pos}: {e}") from None
                    finally:
                        stream.mv.release()
                pos = mm.find(b"PK\x03\x04", pos + 4)


class _MapReader(io.RawIOBase):
    """A read-only stream over part of a map, returning views (no copy of the bytes a pickle skips over)."""

    def __init__(self, mm, pos: int):
        self.mm, self.mv, self.pos = mm, memoryview(mm), pos

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        end = len(self.mv) if n is None or n < 0 else min(len(self.mv), self.pos + n)
        out = bytes(self.mv[self.pos:end])
        self.pos = end
        return out

    def readline(self, size: int = -1) -> bytes:
        end = self.mm.find(b"\n", self.pos)
        end = len(self.mv) if end < 0 else end + 1
        if size is not None and size >= 0:
            end = min(end, self.pos + size)
        return self.read(end - self.pos)

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else len(self.mv) + pos)
        return self.pos


def describe_globals(result, kind: str, limit: int = 6) -> str:
    """``os.system, builtins.eval and 3 more``: the names of one kind, for messages."""
    names = [g.name for g in result.globals if g.kind == kind]
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "") if names else "(none)"
