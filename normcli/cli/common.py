"""Pieces every command shares: JSON rendering, stderr console, option types."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any, Optional

import typer
from rich.console import Console



class _Console(Console):
    """A Rich console whose piped output carries no trailing padding (Rich pads table cells to the column)."""

    def _render_buffer(self, buffer) -> str:
        text = super()._render_buffer(buffer)
        if self.is_terminal:
            return text
        return "\n".join(line.rstrip(" ") for line in text.split("\n"))


# Everything but the command's result goes to stderr, so that --json keeps stdout clean.
err_console = _Console(stderr=True, highlight=False)
# a pipe or a CI log gets a wide table instead of Rich's 80-column default (tables fit COLUMNS when it is set:
# normcli.cli.tables)
out_console = _Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def safe_text(text: Any) -> str:
    """Text that came from a file (layer, node and entry names, messages quoting them), fit for a terminal.

    Every character that is not printable -- C0/C1 control codes (so ANSI CSI and OSC escape sequences lose
    their ESC and BEL), bidi overrides and other format characters, line and paragraph separators, spaces other
    than ' ' -- is shown as a Python-style escape (``\\x1b``, ``\\u202e``). Printable text, accented and CJK
    letters included, is unchanged. JSON output does not use this: it carries names exactly.
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def cell(text: Any) -> str:
    """:func:`safe_text`, then escaped for Rich markup: how every name from a file enters a table or line."""
    from rich.markup import escape

    return escape(safe_text(text))


def jsonable(obj: Any) -> Any:
    """Turn library results into plain JSON values; NaN/Inf become the strings the contract names."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if hasattr(obj, "item"):  # numpy / torch scalars
        return jsonable(obj.item())
    return str(obj)


def print_json(obj: Any, schema: str) -> None:
    """Write ``obj`` as the command's one JSON object on stdout. ``schema`` names the command whose schema
    (normcli/schemas) it follows; it is checked against it when NORMCLI_VALIDATE_JSON=1, as the tests run."""
    import os

    value = jsonable(obj)
    if os.environ.get("NORMCLI_VALIDATE_JSON", "") not in ("", "0"):
        from normcli.schemas import validate

        validate(schema, value)
    sys.stdout.write(json.dumps(value, indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def parse_arch_kwargs(text: Optional[str]) -> dict:
    from normcli.errors import NormcliError

    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise NormcliError(f"--arch-kwargs is not valid JSON ({e.msg} at position {e.pos}); "
                           "pass an object such as '{\"num_classes\": 10}'") from None
    if not isinstance(value, dict):
        raise NormcliError(f"--arch-kwargs must be a JSON object, got {type(value).__name__}")
    return value


ArchOption = typer.Option(None, "--arch", metavar="SPEC",
                          help="Callable that builds the model: package.module:fn or path/to/file.py:fn.")
ArchKwargsOption = typer.Option(None, "--arch-kwargs", metavar="JSON",
                                help="JSON object of keyword arguments for --arch.")
UnsafeLoadOption = typer.Option(False, "--unsafe-load",
                                help="Allow running code carried by the file (full pickles, TorchScript, .pt2). "
                                     "Only for files you trust.")
JsonOption = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else.")
DebugOption = typer.Option(False, "--debug", help="Show Python tracebacks on errors.", hidden=False)
LimitOption = typer.Option(None, "--limit", metavar="NAME=VALUE",
                           help="Raise one of the reader's limits for a trusted, unusually large file (repeatable; "
                                "names and defaults in the README's safety model).")


def parse_shape(text: str, option: str = "--input-shape") -> tuple[int, ...]:
    """``1,3,224,224`` -> (1, 3, 224, 224), with an error that says what a shape looks like."""
    from normcli.errors import NormcliError

    parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise NormcliError(f"{option} {text!r} is not a shape; give positive integers separated by commas, "
                           f"e.g. {option} 1,3,224,224")
    return shape


FailOnOption = typer.Option("error", "--fail-on", metavar="error|warning|never", case_sensitive=False,
                            help="Stop with exit 1, writing nothing, when inspect's findings on the loaded model's "
                                 "norm layers reach this severity (never: report them and go on).")


def parse_fail_on(value: str) -> str:
    from normcli.errors import NormcliError

    value = value.lower()
    if value not in ("error", "warning", "never"):
        raise NormcliError(f"--fail-on must be error, warning or never, not {value!r}")
    return value


# What parity checks, for fuse-export and parity alike. normcli.metrics' CHECK_STATS and DEFAULT_QUANTILE,
# repeated so that --help imports no numpy (a test checks they agree).
CHECK_STATS = ("max", "mean", "median", "quantile")
DEFAULT_QUANTILE = 0.99
CheckErrorStatOption = typer.Option(
    None, "--check-error-stat", metavar="|".join(CHECK_STATS), case_sensitive=False,
    help="Check this statistic of each output's errors instead of every element: fails when it exceeds --atol "
         "(absolute error) and --rtol (relative error), as Polygraphy does.")
ErrorQuantileOption = typer.Option(DEFAULT_QUANTILE, "--error-quantile", metavar="Q",
                                   help="The quantile checked by --check-error-stat quantile.")
ProviderOption = typer.Option(None, "--provider", metavar="NAME",
                              help="onnxruntime execution provider (cpu, cuda, ...). Default: cpu.")


def parse_check_stat(value: Optional[str], quantile: float) -> Optional[str]:
    """--check-error-stat in lower case (None: every element), after checking it and --error-quantile."""
    from normcli.errors import NormcliError

    stat = value.lower() if value else None
    if stat is not None and stat not in CHECK_STATS:
        raise NormcliError(f"--check-error-stat must be one of {', '.join(CHECK_STATS)}, not {value!r}")
    if not 0.0 <= quantile <= 1.0:
        raise NormcliError(f"--error-quantile must be between 0 and 1, got {quantile}")
    return stat


def check_inputs_first(*paths) -> None:
    """Refuse a missing or unreadable input before anything looks at the output path. A directory that is
    one checkpoint (sharded or torch.distributed.checkpoint) is an input like a file."""
    import os

    from normcli.formats import check_readable
    from normcli.sharded import checkpoint_kind

    for path in paths:
        if os.path.isdir(path) and checkpoint_kind(path) is not None:
            continue
        check_readable(path)


def render_findings(findings, command: str, verbose: bool = False, quiet: bool = False) -> None:
    """inspect's findings on the loaded model on stderr, with whether each stops ``command``. A finding
    repeated in several layers with the same verdict is one line naming the layers, then the first layer's
    message (``verbose``: one line each). ``quiet``: only the findings that stop the command."""
    from normcli.cli.tables import join_names, output_width

    colors = {"error": "red", "warning": "yellow", "info": "cyan"}

    def verdict(f) -> str:
        return f" [red](stops {command})[/]" if f.stops else (f" (goes on: {cell(f.note)})" if f.note else "")

    groups: dict[tuple, list] = {}
    for f in findings:
        if quiet and not f.stops:
            continue
        groups.setdefault((f.severity, f.code, bool(f.stops), f.note), []).append(f)
    width = output_width(err_console)
    for (severity, code, _, _), members in groups.items():
        if len(members) == 1 or verbose:
            for f in members:
                err_console.print(f"[{colors[severity]}]{severity:<7}[/] {cell(f.layer)} [bold]{cell(f.code)}[/]: "
                                  f"{cell(f.message)}{verdict(f)}", soft_wrap=True)
            continue
        head = f"{severity:<7} {code} in {len(members)} layers: "
        names = join_names([f.layer for f in members], None if width is None else max(20, width - len(head)))
        err_console.print(f"[{colors[severity]}]{severity:<7}[/] [bold]{cell(code)}[/] in {len(members)} layers: "
                          f"{cell(names)}{verdict(members[0])}", soft_wrap=True)
        err_console.print(f"        {cell(members[0].layer)}: {cell(members[0].message)}", soft_wrap=True)


