"""Rewrite every ``$ normcli ...`` example block in README.md with what the command prints today.

    python scripts/update_readme_examples.py          # rewrite README.md in place
    python scripts/update_readme_examples.py --check  # exit 1 if any block differs (tests/test_readme.py checks)

Each block is a fenced code block whose first line is ``$ normcli ARGS``; the lines after it are the
command's stdout and stderr as they interleave in a pipe (``2>&1``; no ``COLUMNS``, so piped tables are not
limited in width). A comment right above the block can shorten a long output:

    <!-- example: head=3 tail=4 -->

keeps the first 3 and the last 4 lines and puts one marked line in place of the rest:
``… (N lines elided)``. Run from the repository root, with the installed ``normcli`` on PATH. Timings
(``[swap 1.3s]``, ``in 2.6 s``, ``42.6 samples/s``) differ from run to run; the check compares the rest.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(?:<!-- example:(?P<directive>[^>]*)-->\n)?```\n(?P<command>\$ normcli[^\n]*)\n(?P<body>.*?)\n```",
                   re.S)
ELIDED = "… ({} lines elided)"
# what changes from run to run, masked when comparing
TIMINGS = [(re.compile(r"^(\[[a-z-]+ )\d+\.\ds\]", re.M), r"\1#s]"),
           (re.compile(r"\b\d+(\.\d+)? samples/s\b"), "# samples/s"),
           (re.compile(r"\bin \d+(\.\d+)? s\b"), "in # s"),
           (re.compile(r"\bdone in \d+\.\d+s\b"), "done in #s")]


def run(command: str) -> list[str]:
    """The command's stdout and stderr lines in the order it wrote them (``2>&1``)."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(["bash", "-c", command[2:]], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    return [line.rstrip() for line in proc.stdout.splitlines()]


def elide(lines: list[str], directive: str | None) -> list[str]:
    """Apply ``head=N tail=M`` from the block's comment: the lines in between become one marked line."""
    options = dict(re.findall(r"(\w+)=(\d+)", directive or ""))
    head, tail = int(options.get("head", 0)), int(options.get("tail", 0))
    if not options or len(lines) <= head + tail + 1:
        return lines
    return [*lines[:head], ELIDED.format(len(lines) - head - tail), *(lines[len(lines) - tail:] if tail else [])]


def block_text(directive: str | None, command: str, lines: list[str]) -> str:
    prefix = f"<!-- example:{directive}-->\n" if directive is not None else ""
    return prefix + "```\n" + command + "\n" + "\n".join(lines) + "\n```"


def examples(text: str) -> list[re.Match]:
    return list(BLOCK.finditer(text))


def expected_block(match: re.Match) -> str:
    """The block as today's output writes it."""
    return block_text(match.group("directive"), match.group("command"),
                      elide(run(match.group("command")), match.group("directive")))


def masked(text: str) -> str:
    for pattern, replacement in TIMINGS:
        text = pattern.sub(replacement, text)
    return text


def regenerate(text: str) -> str:
    return BLOCK.sub(expected_block, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether README.md is up to date")
    args = parser.parse_args(argv)
    readme = ROOT / "README.md"
    text = readme.read_text()
    if args.check:
        stale = [m.group("command") for m in examples(text) if masked(expected_block(m)) != masked(m.group(0))]
        for command in stale:
            print(f"README.md example differs from today's output: {command}", file=sys.stderr)
        if stale:
            print("run scripts/update_readme_examples.py", file=sys.stderr)
        return 1 if stale else 0
    readme.write_text(regenerate(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
