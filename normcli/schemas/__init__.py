"""JSON Schemas of every command's ``--json`` output: the reference for scripts that read normcli's JSON.

``schema("inspect")`` returns the schema as a dict; ``validate("inspect", obj)`` raises ``ValueError`` with the
path of the first key that does not fit. Validation needs the ``jsonschema`` package (the ``test`` extra); it
runs on every ``--json`` output when ``NORMCLI_VALIDATE_JSON=1`` is set, as the test suite does.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

COMMANDS = ("inspect", "scan", "swap", "fuse-export", "recalibrate", "parity")
_HERE = Path(__file__).resolve().parent


def schema_path(command: str) -> Path:
    """Where the schema of ``command``'s --json output is installed."""
    if command not in COMMANDS:
        raise KeyError(f"no JSON schema for {command!r}; commands with --json: {', '.join(COMMANDS)}")
    return _HERE / f"{command}.schema.json"


@lru_cache(maxsize=None)
def schema(command: str) -> dict:
    return json.loads(schema_path(command).read_text())


def validate(command: str, obj: Any) -> None:
    """Raise ValueError naming the first place where ``obj`` breaks ``command``'s schema."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema(command))
    error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ValueError(f"{command} --json output breaks its schema at {where}: {error.message}")
