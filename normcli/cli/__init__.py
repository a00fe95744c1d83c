"""The normcli command line: one Typer app, one module per command.

Nothing here imports torch at module level, so that ``normcli --help`` starts fast.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from normcli._version import __version__
from normcli.cli import fuse_export as fuse_export_cmd
from normcli.cli import inspect as inspect_cmd
from normcli.cli import parity as parity_cmd
from normcli.cli import recalibrate as recalibrate_cmd
from normcli.cli import scan as scan_cmd
from normcli.cli import swap as swap_cmd

from normcli.cli.help import NormcliCommand, NormcliGroup

app = typer.Typer(
    name="normcli",
    cls=NormcliGroup,
    help="Inspect, swap and fold the normalization layers of PyTorch checkpoints.",
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command
    no_args_is_help=True,
    rich_markup_mode="rich",  # option panels (Input, Model, Output, Checks, Safety); help texts escape [ ]
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"normcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version_callback, is_eager=True,
                                           help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks on errors (also after the "
                                                      "command, or NORMCLI_DEBUG=1)."),
) -> None:
    """Inspect, swap and fold the normalization layers of PyTorch checkpoints."""



def _command(name: str, function) -> None:
    """Register a command with its docstring's whole first line as the summary `normcli --help` lists
    (Click would cut it at 45 characters)."""
    summary = (function.__doc__ or "").strip().splitlines()[0]
    app.command(name, short_help=summary, cls=NormcliCommand)(function)


_command("inspect", inspect_cmd.inspect)
_command("scan", scan_cmd.scan)
_command("swap", swap_cmd.swap)
_command("fuse-export", fuse_export_cmd.fuse_export)
_command("parity", parity_cmd.parity)
_command("recalibrate", recalibrate_cmd.recalibrate)


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("NORMCLI_DEBUG", "") not in ("", "0")


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: maps errors to the exit codes of the contract, one ``error:`` line each."""
    from normcli.errors import CheckFailed, NormcliError

    args = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(args)
    try:
        try:
            result = app(args=args, prog_name="normcli", standalone_mode=False)
        finally:
            from normcli.cli.output import abort_active

            abort_active()  # a live progress line must not share the error's line
    except NormcliError as e:
        if debug:
            raise
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        sys.exit(2)
    except CheckFailed as e:
        if debug:
            raise
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        code = _cli_framework_exit(e)
        if code is not None:
            sys.exit(code)
        if debug:
            raise
        # a bug or an input we did not foresee: still one line, still exit 2
        print(f"error: unexpected {type(e).__name__}: {_one_line(str(e))} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) else 0)


def _cli_framework_exit(e: Exception) -> int | None:
    """Exit code for Typer/Click's own exceptions (usage errors, --help, --version), printing usage errors
    as one ``error:`` line. Matched by shape because Typer may bundle its own copy of Click."""
    module = type(e).__module__
    if not (module.startswith("click") or module.startswith("typer")):
        return None
    name = type(e).__name__
    if name == "Exit":
        return getattr(e, "exit_code", 0)
    if name == "Abort":
        print("error: aborted", file=sys.stderr)
        return 130
    if name == "NoArgsIsHelpError":  # bare `normcli` or `normcli inspect`: show the help, nothing failed
        print(e.format_message() if hasattr(e, "format_message") else "", file=sys.stderr)
        return 2
    if hasattr(e, "format_message"):
        ctx = getattr(e, "ctx", None)
        command = f"normcli {ctx.info_name} --help" if ctx is not None and ctx.parent is not None else "normcli --help"
        # Click ends its sentences with a period; the pointer to --help follows as a clause of the same line
        message = _one_line(e.format_message()).rstrip(".")
        print(f"error: {message}; see '{command}'", file=sys.stderr)
        return 2
    return None


def _one_line(text: str) -> str:
    """One line of an error message; names from the file in it cannot drive the terminal."""
    from normcli.cli.common import safe_text

    return safe_text(" ".join(text.split()))
