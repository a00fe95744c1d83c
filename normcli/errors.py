"""Errors that the CLI turns into exit codes; the library raises them with user-facing messages."""

import re

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class NormcliError(Exception):
    """Bad invocation or bad input: the CLI prints ``error: <message>`` and exits 2."""


class CheckFailed(Exception):
    """A check ran and failed (parity out of tolerance, findings at --fail-on): exit 1."""


def first_line(error: BaseException | Warning | str) -> str:
    """The first line of an error's message (colour codes removed, at most 300 characters), for one-line
    messages; the error's type name when it has no message."""
    text = _ANSI_ESCAPE.sub("", str(error)).strip()
    line = text.splitlines()[0].strip() if text else ""
    if not line:
        line = type(error).__name__ if isinstance(error, BaseException) else "no message"
    return line if len(line) <= 300 else line[:297] + "..."


def describe(error: BaseException) -> str:
    """``TypeName: first line of the message``."""
    line = first_line(error)
    return line if line == type(error).__name__ else f"{type(error).__name__}: {line}"
