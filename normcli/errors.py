"""Errors that the CLI turns into exit codes; the library raises them with user-facing messages."""


class NormcliError(Exception):
    """Bad invocation or bad input: the CLI prints ``error: <message>`` and exits 2."""


class CheckFailed(Exception):
    """A check ran and failed (parity out of tolerance, findings at --fail-on): exit 1."""
