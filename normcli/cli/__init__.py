"""The normcli command line: one Typer app, one module per command.

Nothing here imports torch at module level, so that ``normcli --help`` starts fast.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import click
import typer

from normcli._version import __version__
from normcli.cli import inspect as inspect_cmd

app = typer.Typer(
    name="normcli",
    help="Inspect, swap and fold the normalization layers of PyTorch checkpoints.",
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
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
) -> None:
    """Inspect, swap and fold the normalization layers of PyTorch checkpoints."""


app.command("inspect")(inspect_cmd.inspect)


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("NORMCLI_DEBUG", "") not in ("", "0")


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: maps errors to the exit codes of the contract, one ``error:`` line each."""
    from normcli.errors import CheckFailed, NormcliError

    args = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(args)
    try:
        app(args=args, prog_name="normcli", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except click.exceptions.UsageError as e:
        hint = f"; see 'normcli {e.ctx.info_name} --help'" if e.ctx is not None and e.ctx.parent is not None else \
            "; see 'normcli --help'"
        print(f"error: {e.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.ClickException as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
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
    except Exception as e:  # a bug or an input we did not foresee: still one line, still exit 2
        if debug:
            raise
        print(f"error: unexpected {type(e).__name__}: {_one_line(str(e))} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(2)


def _one_line(text: str) -> str:
    return " ".join(text.split())
