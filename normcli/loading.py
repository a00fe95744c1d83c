"""Turn a checkpoint into a live ``nn.Module``: a state dict loaded strictly into ``--arch``, or, only with
``unsafe_load=True``, the module the file itself carries (full pickle, TorchScript, torch.export archive).

Shared by swap and fuse-export. The safe path never runs code from the file: the globals its pickle names are
checked first (by reading opcodes), and the tensors are then read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normcli.errors import NormcliError, describe, first_line
from normcli.formats import detect_format
from normcli.reader import TensorFile, read_tensors, _strip_wrapper_prefixes

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

    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise NormcliError(f"--arch {spec!r} is not of the form package.module:callable or path/to/file.py:callable")
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            file = Path(module_name)
            if not file.is_file():
                raise NormcliError(f"--arch {spec!r}: no such file {file}")
            mod_spec = importlib.util.spec_from_file_location(f"_normcli_arch_{file.stem}", file)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
        else:
            with _cwd_on_path():
                module = importlib.import_module(module_name)
    except NormcliError:
        raise
    except ImportError as e:
        raise NormcliError(f"--arch {spec!r}: cannot import {module_name} ({e}); check the module path") from None
    except Exception as e:
        raise NormcliError(f"--arch {spec!r}: importing {module_name} raised {type(e).__name__}: {e}") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise NormcliError(f"--arch {spec!r}: {module_name} has no callable named {attr!r}")
    try:
        model = factory(**(kwargs or {}))
    except Exception as e:
        raise NormcliError(f"--arch {spec!r} raised {type(e).__name__}: {e}; check --arch-kwargs") from None
    if not isinstance(model, torch.nn.Module):
        raise NormcliError(f"--arch {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


@contextlib.contextmanager
def _cwd_on_path():
    # `normcli ... --arch samples.models:resnet_tiny` should find the user's package where they stand
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        yield
    finally:
        if added and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())


def load_model(path: str | os.PathLike, *, arch: str | None = None, arch_kwargs: dict | None = None,
               unsafe_load: bool = False, key: str | None = None) -> LoadedModel:
    """Load ``path`` as a module; see the module docstring for what is safe and what needs ``unsafe_load``."""
    fmt = detect_format(path)
    if fmt == "onnx":
        raise NormcliError(f"{path} is an ONNX model; swap and fuse-export need a PyTorch checkpoint")
    if arch is None:
        if unsafe_load:
            return _load_live(path, fmt, key)
        tf = read_tensors(path, key=key)
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
    tf = read_tensors(path, key=key)
    if tf.unsafe_globals and not unsafe_load:
        raise NormcliError(f"{path} needs --unsafe-load because it contains the classes or functions "
                           f"{_names(tf.unsafe_globals)}, which loading would run; only use it on files you trust")
    model = build_arch(arch, arch_kwargs)
    if tf.swap_options is not None:
        model = _apply_swap(model, tf.swap_options, path)
    state_dict = _torch_state_dict(path, tf, unsafe_load)
    load_strict(model, state_dict, str(path), arch, tf.stripped_prefixes)
    return LoadedModel(model, tf.format, "state_dict", tf.state_dict_key, None, arch, dict(arch_kwargs or {}),
                       file_findings=list(tf.file_findings))


def _apply_swap(model, meta: dict, path):
    """A file written by `normcli swap` holds the swapped model's state dict: rebuild that model first."""
    from normcli.swap import SWAP_TARGETS, swap_norms

    to = meta.get("to")
    if to not in SWAP_TARGETS or not isinstance(meta.get("options"), dict):
        raise NormcliError(f"{path}: its normcli_swap entry names no known swap target ({to!r})")
    swapped, _ = swap_norms(model.eval(), to, include=meta.get("include"), exclude=meta.get("exclude"),
                            input_shape=meta.get("input_shape"), **meta["options"])
    return swapped


def _names(globals_: list[str], limit: int = 6) -> str:
    shown = ", ".join(globals_[:limit])
    return shown + (f" and {len(globals_) - limit} more" if len(globals_) > limit else "") if globals_ else "(none)"


def _torch_state_dict(path, tf: TensorFile, unsafe_load: bool) -> dict:
    """The state dict as torch tensors, read with weights_only=True (memory-mapped where the format allows)."""
    import numpy as np
    import torch

    if tf.container == "safetensors":
        from safetensors.torch import load_file

        try:
            return _strip_wrapper_prefixes(load_file(os.fspath(path)))[0]
        except Exception as e:
            raise NormcliError(f"{path}: cannot read the safetensors file ({e})") from None
    if tf.container in ("torch-zip", "torch-legacy"):
        with _without_env("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
            try:
                root = torch.load(os.fspath(path), map_location="cpu", weights_only=True,
                                  mmap=tf.container == "torch-zip")
            except Exception as e:
                if unsafe_load:
                    root = torch.load(os.fspath(path), map_location="cpu", weights_only=False)
                else:
                    raise NormcliError(f"{path}: torch.load(weights_only=True) refused the file "
                                       f"({first_line(e)}); pass --unsafe-load only if you trust it") from None
        obj = _at_key(root, tf.state_dict_key)
        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
        return _strip_wrapper_prefixes(dict(obj))[0]
    # full pickles, TorchScript and .pt2 with --arch --unsafe-load: the safe reader already has the bytes
    return {k: torch.from_numpy(np.array(v.load())) for k, v in tf.tensors.items()}


def _at_key(root, key: str | None):
    """The entry the safe reader chose (``a/b`` for nested keys) in what torch.load returned."""
    for part in key.split("/") if key else ():
        root = root[part]
    return root


@contextlib.contextmanager
def _without_env(name: str):
    # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD must never turn normcli's safe loads into full unpickling
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


def load_strict(model, state_dict: dict, path: str, arch: str, stripped: list[str] | None = None) -> None:
    """``model.load_state_dict(strict=True)`` with an error that lists what does not fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {list(state_dict[k].shape)} vs {list(expected[k].shape)}" for k in expected
              if k in state_dict and hasattr(state_dict[k], "shape") and state_dict[k].shape != expected[k].shape]
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
    model.load_state_dict(state_dict, strict=True)


def _load_live(path, fmt: str, key: str | None) -> LoadedModel:
    """Only under --unsafe-load: let torch rebuild the module the file carries (this runs the file's code)."""
    import torch

    tf = read_tensors(path, key=key)
    if tf.format not in LIVE_FORMATS:
        raise NormcliError(f"{path} holds only a state dict; pass --arch to say which model it belongs to")
    try:
        with _cwd_on_path():
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
