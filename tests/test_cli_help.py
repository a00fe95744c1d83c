"""The command line's help and shell completion, as a user meets them (issue: a command line that feels like
the best typer/rich tools)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import normcli_executable

COMMANDS = ("inspect", "swap", "fuse-export", "parity")


def run(*args, env=None, **kwargs):
    return subprocess.run([*normcli_executable(), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120, **kwargs)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_dash_h_is_help_everywhere(command):
    args = [command] if command else []
    short, long = run(*args, "-h"), run(*args, "--help")
    assert short.returncode == long.returncode == 0, short.stderr
    assert short.stdout == long.stdout and short.stdout.strip().startswith("Usage: normcli")


def test_top_level_help_shows_each_commands_whole_summary():
    from normcli.cli import fuse_export, inspect, parity, swap

    listing = run("--help").stdout.split("Commands", 1)[1]
    text = " ".join(listing.replace("│", " ").split())  # the summaries wrap inside the panel; compare the words
    for function in (inspect.inspect, swap.swap, fuse_export.fuse_export, parity.parity):
        summary = function.__doc__.strip().splitlines()[0]
        assert " ".join(summary.split()) in text, summary
    assert "..." not in listing


def test_debug_before_the_command_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing.pt"
    plain = run("inspect", missing)
    assert plain.returncode == 2 and plain.stderr.startswith("error: ") and "Traceback" not in plain.stderr
    for args in (["--debug", "inspect", missing], ["inspect", missing, "--debug"]):
        done = run(*map(str, args))
        assert "Traceback" in done.stderr and "no such file" in done.stderr, args


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o default -F _normcli_completion normcli"),
                                           ("zsh", "#compdef normcli"),
                                           ("fish", "complete --command normcli")])
def test_show_completion_prints_each_shells_script(shell, marker):
    done = run("--show-completion", shell, env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert done.returncode == 0, done.stderr
    assert marker in done.stdout and "_NORMCLI_COMPLETE" in done.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_completes_commands_and_options(tmp_path):
    """Install the script into a scratch HOME, source it in a real bash and ask it to complete."""
    done = run("--install-completion", "bash", env={"HOME": str(tmp_path),
                                                    "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert done.returncode == 0, done.stderr
    assert "source" in (tmp_path / ".bashrc").read_text()
    script = tmp_path / ".bash_completions" / "normcli.sh"
    exe_dir = os.path.dirname(normcli_executable()[0])

    def complete(words: str) -> list[str]:
        line = (f"source {script}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); "
                "_normcli_completion normcli; printf '%s\\n' \"${COMPREPLY[@]}\"")
        out = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PATH": f"{exe_dir}{os.pathsep}{os.environ['PATH']}"})
        return out.stdout.split()

    assert "fuse-export" in complete("normcli fu")
    assert set(complete("normcli ''")) >= set(COMMANDS)
    assert "--to" in complete("normcli swap model.pt --t")
