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
def test_small_batch_quick_writes_plot_and_one_row_per_norm_and_batch(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    png = (tmp_path / "small_batch.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert width >= 200 and height >= 200

    table = (tmp_path / "small_batch.md").read_text()
    samples_seen = int(re.search(r"(\d+) training samples seen", table).group(1))
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in table.splitlines() if re.match(r"\|\s*(BatchNorm|FRN|MABN)", line)]
    seen = {(row[0], int(row[1])) for row in rows}
    assert len(rows) == 6
    assert seen == {(norm, batch) for norm in ("BatchNorm + ReLU", "FRN + TLU", "MABN + ReLU") for batch in (2, 32)}
    for norm, batch, steps, accuracy, *_ in rows:
        # every run sees the same number of samples, so the step count is samples / batch
        assert int(steps) == samples_seen // int(batch)
        assert 0.0 <= float(accuracy) <= 1.0
    # the table on stdout is the table in the file
    assert table.strip() in proc.stdout
