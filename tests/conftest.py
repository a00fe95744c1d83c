"""Shared fixtures: the sample files, and an in-process runner of the real CLI entry point."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Every --json output the tests produce, in process or in a subprocess of the installed normcli, is checked
# against the command's schema (normcli/schemas): a key that drifts from the contract fails the test that saw it.
os.environ["NORMCLI_VALIDATE_JSON"] = "1"
# Piped tables fit COLUMNS when it is set, and pytest-xdist's workers set it to 80: the tests see what a CI log
# gets (no width limit) unless a test sets a width itself.
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)
SAMPLES = ROOT / "samples"


@pytest.fixture
def samples() -> Path:
    return SAMPLES


@pytest.fixture
def cli(capsys):
    """Run ``normcli ARGS`` through the real entry point (error mapping included); returns (code, out, err)."""
    from normcli.cli import main

    def run(*args: str):
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def normcli_executable() -> list[str]:
    exe = shutil.which("normcli", path=os.path.dirname(sys.executable)) or shutil.which("normcli")
    return [exe] if exe else [sys.executable, "-m", "normcli"]


@pytest.fixture
def run_normcli():
    """Run the installed ``normcli`` in a subprocess; returns CompletedProcess with text output."""

    def run(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
        full_env = {**os.environ, **(env or {})}
        return subprocess.run([*normcli_executable(), *map(str, args)], capture_output=True, text=True,
                              cwd=cwd or ROOT, env=full_env, timeout=timeout)

    return run


# a progress line a command prints on a non-terminal stderr as a stage starts (normcli.cli.output)
STAGE_LINE = re.compile(r"^\[[a-z-]+ \d+\.\ds\] \S")


def error_line(stderr: str) -> str:
    """The one ``error:`` line of a failed command's stderr, checked to be the last line with nothing before
    it but the progress lines of the stages that had started."""
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), stderr
    assert all(STAGE_LINE.match(line) for line in lines[:-1]), stderr
    return lines[-1]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_onnx_parity(model, x, tmp_path, atol=1e-4, rtol=1e-3):
    """Export ``model`` with torch.onnx.export and compare a real onnxruntime session with torch on ``x``."""
    import contextlib
    import io

    import numpy as np
    import onnxruntime as ort
    import torch

    path = tmp_path / "model.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)


_PEAK_RSS_RUNNER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"status": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}, f)
"""


def run_with_peak_rss(argv: list[str], cwd: Path = ROOT, timeout: float = 300) -> tuple[int, str, str, float, float]:
    """Run ``argv``; returns (exit status, stdout, stderr, the command's own peak RSS in MB, seconds).

    A death by signal is a negative status. The command is started by a small Python process: on Linux a
    child's peak-RSS counter starts from the memory of the process that forked it, so a child forked from this
    (large) test process would report this process's size, not its own.
    """
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "rss.json"
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", _PEAK_RSS_RUNNER, str(report), *map(str, argv)],
                              capture_output=True, text=True, cwd=cwd, timeout=timeout)
        seconds = time.monotonic() - start
        result = json.loads(report.read_text())
    return result["status"], proc.stdout, proc.stderr, result["maxrss_kb"] / 1024, seconds
