"""Hostile zip archives and JSON bombs (issues 10 and 15): every case of tests/test_zip_hostile.py, run through
`normcli inspect`, must end within 10 s and 300 MB peak RSS. Prints the slowest case and the largest peak.

    python benchmarks/bench_zip_hostile.py           # every case, 3 runs each (the worst run counts)
    python benchmarks/bench_zip_hostile.py --quick   # every case once
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(quick: bool = False) -> list[dict]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.test_zip_hostile import HOSTILE, hostile_path, run_measured

    repeats = 1 if quick else 3
    walls: dict[str, float] = {}
    peaks: dict[str, float] = {}
    clean = True
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        for name in HOSTILE:
            path = hostile_path(work, name)
            for _ in range(repeats):
                start = time.perf_counter()
                result = run_measured(work, "inspect", path)
                wall = time.perf_counter() - start
                walls[name] = max(walls.get(name, 0.0), wall)
                peaks[name] = max(peaks.get(name, 0.0), result.rss_mb)
                lines = result.err.strip().splitlines()
                clean &= result.signal == 0 and result.code == 2 and len(lines) == 1 \
                    and lines[0].startswith("error: ") and not lines[0].startswith("error: unexpected")
    slowest = max(walls, key=walls.get)
    largest = max(peaks, key=peaks.get)
    return [
        {"name": f"hostile zips ({len(HOSTILE)}), slowest inspect (s): {slowest}", "normcli": walls[slowest],
         "baseline": None, "ratio": None, "bar": "<= 10 s", "passed": walls[slowest] <= 10},
        {"name": f"hostile zips ({len(HOSTILE)}), largest peak RSS (MB): {largest}", "normcli": peaks[largest],
         "baseline": None, "ratio": None, "bar": "<= 300 MB", "passed": peaks[largest] <= 300},
        {"name": f"hostile zips ({len(HOSTILE)}): exit 2, one error line, no signal", "normcli": None,
         "baseline": None, "ratio": None, "bar": "every case", "passed": clean},
    ]


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        value = "-" if row["normcli"] is None else f"{row['normcli']:.3f}"
        print(f"{row['name']:<80} {value:>9}  {row['bar']:<12} {'pass' if row['passed'] else 'FAIL'}")
