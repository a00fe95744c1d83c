"""Rewrite every ``$ normcli ...`` example block in README.md with what the command prints today.

    python scripts/update_readme_examples.py          # rewrite README.md in place
    python scripts/update_readme_examples.py --check  # exit 1 if any block differs (what tests/test_readme.py checks)

Each block is a fenced code block whose first line is ``$ normcli ARGS``; the lines after it are the
command's stdout then stderr, as a user sees them in a pipe. Run from the repository root, with the
installed ``normcli`` on PATH.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"```\n(\$ normcli[^\n]*)\n(.*?)\n```", re.S)


def run(command: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", command[2:]], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [line.rstrip() for line in (proc.stdout + proc.stderr).splitlines()]
    return "\n".join(lines)


def regenerate(text: str) -> str:
    return BLOCK.sub(lambda m: f"```\n{m.group(1)}\n{run(m.group(1))}\n```", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether README.md is up to date")
    args = parser.parse_args(argv)
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = regenerate(text)
    if args.check:
        if new != text:
            print("README.md examples differ from today's output; run scripts/update_readme_examples.py",
                  file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
