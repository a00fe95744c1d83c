"""The hostile suite's bar (issues 10 and 15): "every case within 10 s and 300 MB peak RSS (measured, not
assumed)" for any file up to 10 MB. Every case of tests/hostile_corpus.py -- crafted zip archives, JSON
bombs, crafted pickles and tensor records, pickles of 10 MB made of the costliest opcode streams, the bypass
payloads, hostile sharded indexes and DCP directories -- through the installed `normcli inspect` and
`normcli scan`, each in its own process: wall time and the command's own peak RSS (wait4). The rows give
the slowest case and the largest peak of each command, and whether every run ended with exit 1 or 2, one
`error:` line and no signal. The baseline column is the same command on the healthy sample, for scale.

    python benchmarks/run.py --only hostile_suite
    python benchmarks/bench_hostile_suite.py [--quick]     # --quick: sized pickles of 1 MB
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TIME_BAR_S = 10.0
RSS_BAR_MB = 300.0


def _normcli() -> list[str]:
    exe = Path(sys.executable).with_name("normcli")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "normcli"]


def run(quick: bool = False) -> list[dict]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests import hostile_corpus
    from tests.conftest import run_with_peak_rss

    size = 1_000_000 if quick else 10_000_000
    rows = []
    with tempfile.TemporaryDirectory() as d:
        cases = hostile_corpus.build(Path(d), size)
        for command in ("inspect", "scan"):
            _c, _o, _e, base_mb, base_s = run_with_peak_rss([*_normcli(), command, str(hostile_corpus.TEMPLATE)])
            walls, peaks, bad = {}, {}, []
            for name, path in cases.items():
                code, _out, err, mb, seconds = run_with_peak_rss([*_normcli(), command, str(path)], timeout=600)
                walls[name], peaks[name] = seconds, mb
                lines = err.strip().splitlines()
                if code == 0 and command == "scan":
                    continue  # a verdict (a JSON bomb holds no code), not a refusal
                if code not in (1, 2) or not lines or not lines[-1].startswith("error: ") or "Traceback" in err \
                        or lines[-1].startswith("error: unexpected"):
                    bad.append(f"{name} (exit {code})")
            slowest = max(walls, key=walls.get)
            largest = max(peaks, key=peaks.get)
            over = [n for n in cases if walls[n] > TIME_BAR_S or peaks[n] > RSS_BAR_MB]
            n = len(cases)
            rows += [
                {"name": f"hostile suite, {n} cases: slowest {command} (s): {slowest}", "normcli": walls[slowest],
                 "baseline": base_s, "ratio": walls[slowest] / base_s, "bar": f"<= {TIME_BAR_S:g} s",
                 "passed": walls[slowest] <= TIME_BAR_S},
                {"name": f"hostile suite, {n} cases: largest {command} peak RSS (MB): {largest}",
                 "normcli": peaks[largest], "baseline": base_mb, "ratio": peaks[largest] / base_mb,
                 "bar": f"<= {RSS_BAR_MB:g} MB", "passed": peaks[largest] <= RSS_BAR_MB},
                {"name": f"hostile suite, {n} cases: {command} cases over a bar"
                         + (f" ({', '.join(over[:4])})" if over else ""), "normcli": len(over), "baseline": None,
                 "ratio": None, "bar": "0", "passed": not over},
                {"name": f"hostile suite, {n} cases: {command} exit 1/2, one error line, no signal"
                         + (f" (not: {', '.join(bad[:4])})" if bad else ""), "normcli": len(bad), "baseline": None,
                 "ratio": None, "bar": "0 failures", "passed": not bad},
            ]
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(f"{row['name']:<100} {row['normcli']!s:>8} {row['bar']:<12} {'pass' if row['passed'] else 'FAIL'}")
