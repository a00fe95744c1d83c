"""Importing the user's own code named on the command line (``--arch``, ``--data``, ``--call``).

``package.module:name`` is imported with the working directory on ``sys.path`` (so that a user's package is
found where they stand); ``path/to/file.py:name`` is executed from that file. This runs the user's code, which
is the point: it is never code carried by a checkpoint.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

from normcli.errors import NormcliError, describe


@contextlib.contextmanager
def cwd_on_path():
    """The working directory on ``sys.path`` for the duration (removed again only if it was added)."""
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        yield
    finally:
        if added and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())


def import_callable(spec: str, option: str) -> Callable:
    """The callable ``package.module:name`` or ``path/to/file.py:name`` that ``option`` names."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise NormcliError(f"{option} {spec!r} is not of the form package.module:callable or "
                           "path/to/file.py:callable")
    try:
        if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
            file = Path(module_name)
            if not file.is_file():
                raise NormcliError(f"{option} {spec!r}: no such file {file}")
            mod_spec = importlib.util.spec_from_file_location(f"_normcli_user_{file.stem}", file)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
        else:
            with cwd_on_path():
                module = importlib.import_module(module_name)
    except NormcliError:
        raise
    except ImportError as e:
        raise NormcliError(f"{option} {spec!r}: cannot import {module_name} ({e}); check the module path") from None
    except Exception as e:
        raise NormcliError(f"{option} {spec!r}: importing {module_name} raised {describe(e)}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise NormcliError(f"{option} {spec!r}: {module_name} has no callable named {attr!r}")
    return fn
