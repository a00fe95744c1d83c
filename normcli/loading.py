"""Turn a checkpoint into a live ``nn.Module``: a state dict loaded strictly into ``--arch``, or, only with
``unsafe_load=True``, the module the file itself carries (full pickle, TorchScript, torch.export archive).

Shared by swap and fuse-export. The safe path never runs code from the file and never hands it to torch's
loaders: the file is read once by the same reader inspect uses (``normcli.reader.read_tensors``: checked
opcodes, allow-listed records, tensors checked against their storages), and the tensors are materialised as
torch tensors over those checked bytes. ``torch.load``, ``torch.jit.load`` and ``torch.export.load`` run only
with ``unsafe_load=True`` and no ``arch``.
"""

from __future__ import annotations

import collections
import math
import os
from dataclasses import dataclass, field
from typing import Any

from normcli.errors import NormcliError, describe
from normcli.reader import TensorFile, read_tensors
from normcli.formats import detect_format
from normcli.user_code import cwd_on_path, import_callable

LIVE_FORMATS = ("full-pickle", "torchscript", "pt2")


@dataclass
class LoadedModel:
    """A model ready for a transform, and where it came from."""

    model: Any                           # torch.nn.Module, as loaded; the caller chooses eval/train
    format: str                          # state-dict | checkpoint | full-pickle | torchscript | pt2 | safetensors
    flavour: str                         # "state_dict" (built with --arch) or "module" (the file's own module)
    state_dict_key: str | None = None
    example_inputs: tuple | None = None  # from a .pt2 archive, when present
    arch: str | None = None
    arch_kwargs: dict = field(default_factory=dict)
    file_findings: list = field(default_factory=list)  # what the reader found about the file (shards)


def build_arch(spec: str, kwargs: dict | None = None):
    """Call the model factory named by ``package.module:callable`` or ``path/to/file.py:callable``."""
    import torch

    factory = import_callable(spec, "--arch")
    try:
        model = factory(**(kwargs or {}))
    except Exception as e:
        raise NormcliError(f"--arch {spec!r} raised {type(e).__name__}: {e}; check --arch-kwargs") from None
    if not isinstance(model, torch.nn.Module):
        raise NormcliError(f"--arch {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_model(path: str | os.PathLike, *, arch: str | None = None, arch_kwargs: dict | None = None,
               unsafe_load: bool = False, key: str | None = None, limits=None) -> LoadedModel:
    """Load ``path`` as a module; see the module docstring for what is safe and what needs ``unsafe_load``.

    The file is recognised and read once, by :func:`normcli.reader.read_tensors`; with ``arch`` its tensors are
    materialised from those checked bytes. Only ``unsafe_load`` without ``arch`` hands the file to torch.
    """
    if not unsafe_load:
        refuse_code(path, getattr(path, "format", None) or detect_format(path))
    tf = read_tensors(path, key=key, limits=limits)
    if arch is None:
        if unsafe_load:
            return _load_live(path, tf)
        if tf.format in LIVE_FORMATS:
            raise NormcliError(f"{path} holds a {tf.format} model; loading it needs --unsafe-load because it "
                               f"contains the classes {_names(tf.unsafe_globals)}; only use it on files you trust "
                               "(or pass --arch to load just its weights into your own model code)")
        hint = ""
        if tf.swap_options is not None and isinstance(tf.swap_options.get("arch"), str):
            hint = f" (normcli swap wrote it from --arch {tf.swap_options['arch']})"
        raise NormcliError(f"{path} holds only a state dict ({len(tf.tensors)} tensors); pass --arch "
                           "package.module:callable (or path/to/file.py:callable) to say which model it belongs "
                           f"to{hint}")
    if tf.unsafe_globals and not unsafe_load:
        raise NormcliError(f"{path} needs --unsafe-load because it contains the classes or functions "
                           f"{_names(tf.unsafe_globals)}, which loading would run; only use it on files you trust")
    swap = check_swap_options(tf.swap_options, path) if tf.swap_options is not None else None
    model = build_arch(arch, arch_kwargs)
    if swap is not None:
        model = _apply_swap(model, swap, path)
    state_dict = _torch_state_dict(tf)
    if tf.metadata is not None:
        state_dict._metadata = collections.OrderedDict((k, dict(v)) for k, v in tf.metadata.items())
    elif tf.format in LIVE_FORMATS:
        # torch.load of a pickled module gives a module whose state_dict() carries its classes' versions:
        # the same classes as --arch's, so the versions are the arch model's own
        state_dict._metadata = getattr(model.state_dict(), "_metadata", None)
    load_strict(model, state_dict, str(path), arch, tf.stripped_prefixes)
    return LoadedModel(model, tf.format, "state_dict", tf.state_dict_key, None, arch, dict(arch_kwargs or {}),
                       file_findings=list(tf.file_findings))


# Stored swap options (a file written by `normcli swap`) are checked like the command line's: these are the
# entries it writes, and what each may hold.
_SWAP_FIELDS = ("to", "options", "arch", "arch_kwargs", "include", "exclude", "input_shape")
_MAX_GLOBS = 1000
# what swap_norms takes besides the target's options (SwapReport.rebuild_options): the selection, the probe shapes
_SELECTION_KEYS = ("include", "exclude", "input_shape", "input_shapes")


def _check_selection(label: str, name: str, value, refuse) -> None:
    """A stored selection (include/exclude globs) or probe shape(s), held to the command line's limits."""
    from normcli.swap import MAX_PROBE_SHAPES, check_probe_shape

    if value is None:
        return
    if name in ("include", "exclude"):
        if not isinstance(value, list) or len(value) > _MAX_GLOBS \
                or not all(isinstance(g, str) and 0 < len(g) <= 1000 for g in value):
            raise refuse(label, f"is not a list of at most {_MAX_GLOBS} name patterns")
        return
    shapes = [value] if name == "input_shape" else value
    if not isinstance(shapes, list) or not 1 <= len(shapes) <= MAX_PROBE_SHAPES:
        raise refuse(label, f"is not a list of 1 to {MAX_PROBE_SHAPES} shapes")
    for shape in shapes:
        if not isinstance(shape, list) or not all(type(d) is int for d in shape):
            raise refuse(label, "is not a list of integers" if name == "input_shape" else
                         "holds a shape that is not a list of integers")
        try:
            check_probe_shape(shape)
        except NormcliError as e:
            raise refuse(label, f"is refused: {e}") from None


def check_swap_options(meta, path) -> dict:
    """The ``normcli_swap`` entry of a file, validated exactly like the same swap options on the command line
    (same types, same limits); refused with the stored option's name otherwise."""
    from normcli.swap import SWAP_TARGETS

    def refuse(name: str, why: str):
        return NormcliError(f"{path}: its stored swap option normcli_swap.{name} {why}; the file was not written "
                            "by normcli swap or was altered (refusing it)")

    if not isinstance(meta, dict):
        raise refuse("", "is not a dict")
    extra = [k for k in meta if k not in _SWAP_FIELDS]
    if extra:
        raise refuse(str(extra[0])[:40], "is not an option normcli swap writes")
    to = meta.get("to")
    if to not in SWAP_TARGETS:
        raise refuse("to", f"names no known swap target ({str(to)[:40]!r}; known: {', '.join(SWAP_TARGETS)})")
    options = meta.get("options")
    if not isinstance(options, dict):
        raise refuse("options", "is not a dict")
    defaults = SWAP_TARGETS[to].defaults
    for name, value in options.items():
        if name in _SELECTION_KEYS:
            _check_selection(f"options.{name}", name, value, refuse)
            continue
        if name not in defaults:
            raise refuse(f"options.{str(name)[:40]}", f"is not an option of --to {to} (it takes "
                                                      f"{', '.join([*defaults, *_SELECTION_KEYS])})")
        want = type(defaults[name])
        ok = (type(value) is bool) if want is bool else (type(value) is int) if want is int else \
            (type(value) in (int, float) and math.isfinite(value)) if want is float else isinstance(value, want)
        if not ok:
            raise refuse(f"options.{name}", f"is {str(value)[:40]!r}, not a {want.__name__} like the command "
                                             "line's")
    if options.get("input_shape") is not None and options.get("input_shapes") is not None:
        raise refuse("options.input_shapes", "is given together with options.input_shape (swap writes one)")
    for name in ("include", "exclude", "input_shape"):  # where older files kept the selection and probe shape
        _check_selection(name, name, meta.get(name), refuse)
    for name in ("arch",):
        if meta.get(name) is not None and (not isinstance(meta[name], str) or len(meta[name]) > 1000):
            raise refuse(name, "is not a short string")
    if meta.get("arch_kwargs") is not None and not isinstance(meta["arch_kwargs"], dict):
        raise refuse("arch_kwargs", "is not a dict")
    try:
        from normcli.swap import resolve_options

        resolve_options(to, {k: v for k, v in options.items() if k not in _SELECTION_KEYS})
    except NormcliError as e:
        raise refuse("options", f"is refused: {e}") from None
    return meta


def refuse_code(path, fmt: str) -> None:
    """Stop before anything else is tried when the file's pickles name callables that run code (or cannot
    be judged): the error lists them. Only ``--unsafe-load`` goes past this."""
    if fmt in ("onnx", "safetensors"):
        return
    from normcli.formats import CheckpointFile
    from normcli.trust import assess_opened, assess_path, describe_globals

    # through the caller's open file when it has one (no second open), else by name
    result = assess_opened(path) if isinstance(path, CheckpointFile) else assess_path(path)
    if result.verdict == "unsafe":
        raise NormcliError(f"{path} is unsafe: its pickles name callables that run code when loaded "
                           f"({describe_globals(result, 'code')}); refusing to load it. Inspect it with "
                           "normcli inspect (which never runs them); --unsafe-load would run them")
    if result.verdict == "unreadable":
        raise NormcliError(f"{path}: {result.reason}; the file is damaged or built to confuse readers")


def _apply_swap(model, meta: dict, path):
    """A file written by `normcli swap` holds the swapped model's state dict: rebuild that model first."""
    from normcli.swap import swap_norms

    options = dict(meta["options"])
    if not set(_SELECTION_KEYS) & set(options):  # written before the options held the selection and the probe shape
        options.update(include=meta.get("include"), exclude=meta.get("exclude"), input_shape=meta.get("input_shape"))
    swapped, _ = swap_norms(model.eval(), meta["to"], **options)
    return swapped


def _names(globals_: list[str], limit: int = 6) -> str:
    shown = ", ".join(globals_[:limit])
    return shown + (f" and {len(globals_) - limit} more" if len(globals_) > limit else "") if globals_ else "(none)"


def _torch_state_dict(tf: TensorFile) -> "collections.OrderedDict":
    """The state dict as torch tensors over the reader's checked bytes (memory-mapped where the file is):
    one torch storage per file storage, so shared storages and views stay shared; dtypes as stored."""
    import torch

    bases: dict[int, Any] = {}
    out = collections.OrderedDict()
    for name, lazy in tf.tensors.items():
        out[name] = tensor_from_lazy(lazy, bases)
    return out


def tensor_from_lazy(lazy, bases: dict | None = None):
    """A torch tensor for a LazyArray: a strided view of its storage's checked bytes (no copy; a zero stride
    stays a zero stride). ``bases`` caches one torch storage per StorageRef."""
    import warnings

    import numpy as np
    import torch

    if lazy.array_ is not None:
        return torch.from_numpy(np.array(lazy.array_))
    ref = lazy.storage
    if ref is None:
        raise NormcliError("a tensor of the file has no storage")
    bases = {} if bases is None else bases
    raw = bases.get(id(ref))
    if raw is None:
        arr = ref.array().reshape(-1).view(np.uint8)
        with warnings.catch_warnings():  # the map is read-only: torch warns, and only ever reads it
            warnings.simplefilter("ignore")
            raw = torch.from_numpy(arr)
        bases[id(ref)] = raw = (ref, raw)
    raw = raw[1]
    dtype = getattr(torch, lazy.dtype)
    typed = raw.view(dtype) if raw.numel() else torch.empty(0, dtype=dtype)
    return torch.as_strided(typed, lazy.shape, lazy.stride, lazy.offset)


def load_strict(model, state_dict: dict, path: str, arch: str, stripped: list[str] | None = None) -> None:
    """``model.load_state_dict(strict=True)`` with an error that lists what does not fit. Missing and unexpected
    keys are counted after the modules' own ``_load_from_state_dict`` ran (a module may upgrade an older
    version's keys, as under torch.load)."""
    expected = model.state_dict()
    shapes = [f"{k} {list(state_dict[k].shape)} vs {list(expected[k].shape)}" for k in expected
              if k in state_dict and hasattr(state_dict[k], "shape") and state_dict[k].shape != expected[k].shape]
    missing, unexpected = [], []
    if not shapes:
        try:
            result = model.load_state_dict(state_dict, strict=False)
        except NormcliError:
            raise
        except Exception as e:
            raise NormcliError(f"the state dict in {path} does not load into --arch {arch} ({describe(e)}); "
                               "check --arch and --arch-kwargs") from None
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_names(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_names(shapes, 3)}")
        hint = f" (prefixes {', '.join(stripped)} were removed from the file's keys)" if stripped else ""
        raise NormcliError(f"the state dict in {path} does not fit --arch {arch}: {'; '.join(parts)}{hint}; "
                           "check --arch and --arch-kwargs")


def _load_live(path, tf: TensorFile) -> LoadedModel:
    """Only under --unsafe-load: let torch rebuild the module the file carries (this runs the file's code)."""
    fmt = tf.container
    if tf.format not in LIVE_FORMATS:  # said before torch is imported: a usage error is quick
        raise NormcliError(f"{path} holds only a state dict; pass --arch to say which model it belongs to")

    import torch
    try:
        with cwd_on_path():
            if fmt == "torchscript":
                return LoadedModel(torch.jit.load(os.fspath(path), map_location="cpu"), "torchscript", "module")
            if fmt == "pt2":
                program = torch.export.load(os.fspath(path))
                example = program.example_inputs[0] if program.example_inputs else None
                return LoadedModel(program.module(), "pt2", "module", example_inputs=tuple(example) if example else None)
            root = torch.load(os.fspath(path), map_location="cpu", weights_only=False)
    except NormcliError:
        raise
    except Exception as e:
        raise NormcliError(f"{path}: loading the {tf.format} failed ({describe(e)})") from None
    obj = _at_key(root, tf.state_dict_key)
    if not isinstance(obj, torch.nn.Module):
        raise NormcliError(f"{path}: expected a pickled torch.nn.Module, found {type(obj).__name__}")
    return LoadedModel(obj, "full-pickle", "module", tf.state_dict_key)


def module_tensor_file(loaded: LoadedModel) -> TensorFile:
    """Describe a live module the way the safe reader describes a file, so inspect treats both alike."""
    import torch

    from normcli.safe_pickle import LazyArray

    model = loaded.model
    tensors = {}
    for k, v in model.state_dict().items():
        arr = v.detach().cpu()
        arr = (arr.float() if arr.dtype in (torch.float16, torch.bfloat16) else arr).numpy()
        tensors[k] = LazyArray(None, 0, tuple(arr.shape), (), str(v.dtype).replace("torch.", ""), array_=arr)
    types, eps = {}, {}
    for name, m in model.named_modules():
        cls = type(m)
        types[name] = getattr(m, "original_name", None) or f"{cls.__module__}.{cls.__qualname__}"
        value = getattr(m, "eps", None)
        if isinstance(value, float):
            eps[name] = value
    return TensorFile(str(loaded.format), loaded.format, loaded.format, tensors, module_types=types,
                      module_eps=eps, state_dict_key=loaded.state_dict_key,
                      file_findings=list(loaded.file_findings))


def _at_key(root, key: str | None):
    """The entry the safe reader chose (``a/b`` for nested keys) in what torch.load returned."""
    for part in key.split("/") if key else ():
        root = root[part]
    return root
