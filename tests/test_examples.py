"""The small-batch demonstration runs end to end and writes its plot and table."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "small_batch.py"

pytest.importorskip("sklearn", reason="the small-batch demo needs the 'demo' extra (scikit-learn)")
pytest.importorskip("matplotlib", reason="the small-batch demo needs the 'demo' extra (matplotlib)")


@pytest.mark.slow
def test_small_batch_quick_writes_plot_and_one_row_per_norm_and_batch_with_the_spread_over_seeds(tmp_path):
    # no --out-dir: the files go to ./small_batch_out of where it runs, never over the tracked ones
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--seeds", "0", "1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out_dir = tmp_path / "small_batch_out"

    png = (out_dir / "small_batch.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert width >= 200 and height >= 200

    table = (out_dir / "small_batch.md").read_text()
    samples_seen = int(re.search(r"(\d+) training samples seen", table).group(1))
    assert "seeds 0, 1" in table and "Measured on " in table and "cores" in table
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in table.splitlines() if re.match(r"\|\s*(BatchNorm|FRN|MABN)", line)]
    seen = {(row[0], int(row[1])) for row in rows}
    assert len(rows) == 6
    assert seen == {(norm, batch) for norm in ("BatchNorm + ReLU", "FRN + TLU", "MABN + ReLU") for batch in (2, 32)}
    per_seed = re.findall(r"seed (\d) (.+?)\s+batch\s+(\d+): test accuracy ([\d.]+)", proc.stdout)
    assert len(per_seed) == 12
    for norm, batch, steps, accuracy, *_ in rows:
        # every run sees the same number of samples, so the step count is samples / batch
        assert int(steps) == samples_seen // int(batch)
        mean, low, high = map(float, re.fullmatch(r"([\d.]+) \(([\d.]+)-([\d.]+)\)", accuracy).groups())
        runs = [float(a) for _, n, b, a in per_seed if n.strip() == norm and int(b) == int(batch)]
        assert len(runs) == 2
        assert (low, high) == (min(runs), max(runs)) and low <= mean <= high
        assert abs(mean - sum(runs) / 2) < 1e-4
    # the table on stdout is the table in the file
    assert table.strip() in proc.stdout


SWA_SCRIPT = ROOT / "examples" / "recalibrate_swa.py"


@pytest.mark.slow
def test_recalibrate_swa_quick_writes_plot_and_table_with_every_variant_over_the_seeds(tmp_path):
    proc = subprocess.run([sys.executable, str(SWA_SCRIPT), "--quick", "--seeds", "0", "1", "--out-dir",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    png = (tmp_path / "out" / "recalibrate_swa.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "out" / "recalibrate_swa.md").read_text()
    assert "seeds 0, 1" in table and "Measured on " in table
    per_seed: dict = {}
    for seed, label, value in re.findall(r"seed (\d) \| (.+?) \| ([\d.]+)", proc.stdout):
        per_seed.setdefault(int(seed), {})[label] = value
    assert set(per_seed) == {0, 1}
    for label in ("last SGD model", "SWA, buffers kept by AveragedModel", "SWA + torch update_bn",
                  "SWA + normcli recalibrate"):
        values = [float(per_seed[s][label]) for s in (0, 1)]
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        mean, low, high = map(float, re.search(r"([\d.]+) \(([\d.]+)-([\d.]+)\)", row).groups())
        assert (low, high) == (min(values), max(values)) and abs(mean - sum(values) / 2) < 1e-4
    assert not (ROOT / "examples" / "recalibrate_swa_out").exists()
