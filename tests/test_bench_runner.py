"""benchmarks/run.py: one table over the benchmark modules, failures reported as rows, a final count line."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "benchmarks" / "run.py"
COUNT_LINE = re.compile(r"^(\d+) passed, (\d+) failed \((\d+) measures from (\d+) benchmarks\)$")


def load_runner():
    spec = importlib.util.spec_from_file_location("bench_runner_under_test", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(out: str) -> list[str]:
    lines = out.strip().splitlines()
    return [line for line in lines[2:] if line.strip() and not COUNT_LINE.match(line)]


@pytest.mark.slow
def test_quick_inspect_prints_one_table_and_the_count_line():
    proc = subprocess.run([sys.executable, str(RUNNER), "--quick", "--only", "inspect"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ["benchmark", "measure", "normcli", "baseline", "ratio", "min", "max", "bar", "result"]
    rows = table_rows(proc.stdout)
    assert any("--help" in row for row in rows)
    assert any("peak RSS" in row for row in rows)
    assert all(row.startswith("inspect ") and row.rstrip().endswith(("pass", "FAIL")) for row in rows)
    assert not any("error:" in row for row in rows), proc.stdout
    # every timing row is a ratio against import torch, with its spread; only memory stays absolute
    for row in rows:
        if "RSS" not in row:
            assert "/ import torch" in row, row
            ratio, low, high = (float(x) for x in re.split(r"\s{2,}", row.strip())[4:7])
            assert low <= ratio <= high, row
    passed, failed, measures, benchmarks = map(int, COUNT_LINE.match(lines[-1]).groups())
    assert benchmarks == 1
    assert measures == len(rows) == passed + failed
    assert passed == sum(row.rstrip().endswith("pass") for row in rows)


def test_a_module_that_raises_is_a_failed_row_and_the_others_still_count(tmp_path, monkeypatch):
    (tmp_path / "bench_broken_fixture.py").write_text("def run(quick=False):\n    raise RuntimeError('disk full')\n")
    (tmp_path / "bench_good_fixture.py").write_text(
        "def run(quick=False):\n"
        "    return [{'name': 'thing / base', 'normcli': 1.0, 'baseline': 4.0, 'ratio': 0.25, 'bar': '<= 0.5',"
        " 'passed': True}, {'name': 'other', 'normcli': 3.0, 'baseline': None, 'ratio': None, 'bar': '<= 2',"
        " 'passed': False}]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = load_runner()

    broken = runner.run_module("broken_fixture", quick=True)
    assert len(broken) == 1 and broken[0]["passed"] is False
    assert "RuntimeError: disk full" in broken[0]["name"]

    good = runner.run_module("good_fixture", quick=True)
    assert [row["passed"] for row in good] == [True, False]

    text = runner.render([("broken_fixture", broken[0])] + [("good_fixture", row) for row in good])
    lines = text.splitlines()
    assert len(lines) == 2 + 3
    assert "disk full" in lines[2] and lines[2].endswith("FAIL")
    assert "0.250" in lines[3] and lines[3].endswith("pass")
    assert lines[4].endswith("FAIL") and " - " in lines[4]  # missing baseline and ratio print as "-"


def test_unknown_only_name_is_refused_with_the_choices():
    proc = subprocess.run([sys.executable, str(RUNNER), "--only", "no_such_bench"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "no benchmark named no_such_bench" in proc.stderr and "inspect" in proc.stderr
