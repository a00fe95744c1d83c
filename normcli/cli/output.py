"""What a command says on stderr while it works: its stages, their timing, notes; -q and -v.

* ``--quiet/-q``: nothing but errors on stderr (the result still goes to stdout).
* default: in a terminal, a live line with the stage and the elapsed time, gone when the command ends; when
  stderr is not a terminal (a CI log), one plain line per stage of the long commands (swap, fuse-export,
  recalibrate), printed as the stage starts: ``[swap 1.3s] swapping BatchNorm for frn``; reading the input
  is not announced there, so a bad input's ``error:`` line is the first on stderr.
* ``--verbose/-v``: every command's stages as plain lines, each one's duration when it ends, and a total.
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import Iterator, Mapping, Optional

import typer

from normcli.cli.common import err_console

_ACTIVE: list["Reporter"] = []

QuietOption = typer.Option(False, "--quiet", "-q", help="Print nothing but errors on stderr (the result still "
                                                        "goes to stdout).")
VerboseOption = typer.Option(False, "--verbose", "-v", help="Print each stage and its timing on stderr.")


class Reporter:
    """A command's stages and notes on stderr (see the module docstring). Use as a context manager."""

    def __init__(self, command: str, quiet: bool = False, verbose: bool = False, announce: bool = True,
                 console=None):
        from normcli.errors import NormcliError

        if quiet and verbose:
            raise NormcliError("--quiet and --verbose contradict each other; give one")
        self.command = command
        self.quiet = quiet
        self.verbose = verbose
        self.announce = announce
        self.console = console or err_console
        self.tty = bool(self.console.is_terminal)
        self.started = time.monotonic()
        self.stage_name: Optional[str] = None
        self.stage_started = self.started
        self.detail = ""
        self._live = None
        self._spinner = None
        _ACTIVE.append(self)

    # -------------------------------------------------------------------------------------------- stages
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def stage(self, name: str, log: bool = True) -> None:
        """Start a stage (ending the one before). ``log=False``: a stage that only reads and checks the input
        (loading) gets a plain line only under --verbose, so that a bad input's ``error:`` line comes first."""
        self._end_stage()
        self.stage_name = name
        self.stage_started = time.monotonic()
        self.detail = ""
        if self.quiet:
            return
        if self.tty:
            self._start_live()
        elif (self.announce and log) or self.verbose:
            self._plain(f"[{self.command} {self.elapsed():.1f}s] {name}")

    __call__ = stage  # a library's ``progress(message)`` callback can be the reporter itself

    def update(self, detail: str) -> None:
        """Progress inside the stage (batches done...): shown on the live line only."""
        self.detail = detail

    def _end_stage(self) -> None:
        if self.stage_name is not None and self.verbose and not self.quiet:
            took = time.monotonic() - self.stage_started
            self._plain(f"[{self.command} {self.elapsed():.1f}s] {self.stage_name}: done in {took:.2f}s")
        self.stage_name = None

    # --------------------------------------------------------------------------------------------- notes
    def note(self, message: str, style: Optional[str] = None) -> None:
        """A remark for the user (Rich markup allowed); not under --quiet."""
        if self.quiet:
            return
        self.console.print(message, style=style, soft_wrap=True)

    def info(self, message: str) -> None:
        """A detail only --verbose prints."""
        if self.verbose and not self.quiet:
            self._plain(f"[{self.command} {self.elapsed():.1f}s] {message}")

    def _plain(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    # ------------------------------------------------------------------------------------- live display
    def _start_live(self) -> None:
        if self._live is not None:
            return
        from rich.live import Live
        from rich.spinner import Spinner

        self._spinner = Spinner("dots", text="")
        self._live = Live(console=self.console, get_renderable=self._render, transient=True,
                          refresh_per_second=8, redirect_stdout=False, redirect_stderr=False)
        self._live.start()

    def _render(self):
        from rich.text import Text

        if self._spinner is None:
            return Text("")
        text = Text(f"{self.command}: {self.stage_name or ''}", style="bold")
        text.append(f"  {time.monotonic() - self.stage_started:.1f}s", style="cyan")
        if self.detail:
            text.append(f"  {self.detail}")
        text.append(f"  (total {self.elapsed():.1f}s)", style="dim")
        self._spinner.update(text=text)
        return self._spinner

    def close(self) -> None:
        """End the last stage and the live display (before the result is printed)."""
        if self not in _ACTIVE:
            return
        _ACTIVE.remove(self)
        self._end_stage()
        self._stop_live()
        if self.verbose and not self.quiet:
            self._plain(f"[{self.command} {self.elapsed():.1f}s] finished")

    @contextlib.contextmanager
    def section(self) -> Iterator["Reporter"]:
        """A stretch of stages: paused at its end so the command can print, aborted if it raises."""
        try:
            yield self
        except BaseException:
            self.abort()
            raise
        self.pause()

    def pause(self) -> None:
        """End the stage and the live display so that the command can print (the next stage resumes)."""
        self._end_stage()
        self._stop_live()

    def abort(self) -> None:
        """The command failed: clear the live display so the error line stands alone; no "done" lines."""
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self.stage_name = None
        self._stop_live()

    def _stop_live(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            self.abort()  # the error line follows; a failed stage gets no "done"
            return
        self.close()


def abort_active() -> None:
    """Stop every reporter still running (the command raised); called before the error line is printed."""
    for reporter in list(_ACTIVE):
        reporter.abort()


def spell_options(text: str, spelling: Mapping[str, str]) -> str:
    """``text`` with the library's keyword names written as the command line's options: ``learnable_eps=True``
    becomes ``--learnable-eps True``, ``real_B`` becomes ``--real-B``."""
    for name in sorted(spelling, key=len, reverse=True):
        text = re.sub(rf"(?<![\w-]){re.escape(name)}=", spelling[name] + " ", text)
        text = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", spelling[name], text)
    return text


@contextlib.contextmanager
def cli_spelling(spelling: Mapping[str, str]) -> Iterator[None]:
    """Re-raise a NormcliError from the library with its option names in the command line's spelling."""
    from normcli.errors import NormcliError

    try:
        yield
    except NormcliError as e:
        raise NormcliError(spell_options(str(e), spelling)) from None
