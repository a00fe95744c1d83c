"""Run every benchmark and print one table: what was measured, normcli's figure, the baseline measured in the
same run, the ratio, the bar and pass/fail.

A benchmark is any ``benchmarks/bench_<name>.py`` that defines ``run(quick: bool) -> list[dict]`` returning
rows ``{"name", "normcli", "baseline", "ratio", "bar", "passed"}``, and where the ratio is the median of repeated
runs, ``ratio_min``/``ratio_max``: the spread, shown beside it so that a noisy row looks noisy. Every timing
bar is a ratio against a baseline measured in the same run (an absolute time says more about what else the
machine was doing than about normcli); memory bars are absolute. A module that fails to import or raises is
reported as one failed row carrying the error, and the others still run. The exit code is 0 whether or not
the bars pass; the last line counts passes and failures.

    python benchmarks/run.py                  # everything, full size
    python benchmarks/run.py --quick          # short versions (what the tests run)
    python benchmarks/run.py --only inspect   # just bench_inspect.py (repeatable)
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
COLUMNS = ("benchmark", "measure", "normcli", "baseline", "ratio", "min", "max", "bar", "result")


def discover() -> list[str]:
    """Names of the benchmark modules (``bench_layers.py`` -> ``layers``), sorted."""
    return sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))


def failed_row(name: str, error: str) -> dict:
    return {"name": f"error: {error}", "normcli": None, "baseline": None, "ratio": None, "bar": "runs",
            "passed": False}


def run_module(name: str, quick: bool) -> list[dict]:
    """The rows of ``bench_<name>.run(quick)``, or one failed row saying why there are none."""
    try:
        module = importlib.import_module(f"bench_{name}")
    except Exception as exc:  # a broken benchmark must not hide the others
        return [failed_row(name, f"import failed: {type(exc).__name__}: {exc}")]
    if not callable(getattr(module, "run", None)):
        return [failed_row(name, "defines no run(quick) function")]
    try:
        rows = module.run(quick=quick)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        return [failed_row(name, f"{type(exc).__name__}: {exc}")]
    if not rows:
        return [failed_row(name, "run() returned no rows")]
    return rows


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3g}" if abs(value) >= 1000 or (value != 0 and abs(value) < 0.001) else f"{value:.3f}"
    return str(value)


def render(results: list[tuple[str, dict]]) -> str:
    """One aligned text table of (benchmark name, row) pairs."""
    cells = [COLUMNS]
    for bench, row in results:
        cells.append((bench, str(row.get("name", "?")), fmt(row.get("normcli")), fmt(row.get("baseline")),
                      fmt(row.get("ratio")), fmt(row.get("ratio_min")), fmt(row.get("ratio_max")),
                      str(row.get("bar", "-")), "pass" if row.get("passed") else "FAIL"))
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    numeric = {2, 3, 4, 5, 6}
    lines = []
    for index, line in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                               for i, (c, w) in enumerate(zip(line, widths))).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run normcli's benchmarks and print one table.")
    parser.add_argument("--quick", action="store_true", help="short versions of every benchmark")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only bench_NAME.py (repeatable); default: every bench_*.py")
    args = parser.parse_args(argv)

    # the benchmarks import each other and normcli by plain name
    for path in (str(BENCH_DIR), str(ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)
    available = discover()
    names = available
    if args.only:
        unknown = sorted(set(args.only) - set(available))
        if unknown:
            parser.error(f"no benchmark named {', '.join(unknown)}; choose from {', '.join(available)}")
        names = [n for n in available if n in args.only]

    results: list[tuple[str, dict]] = []
    for name in names:
        start = time.perf_counter()
        print(f"running bench_{name}.py{' --quick' if args.quick else ''} ...", file=sys.stderr, flush=True)
        results += [(name, row) for row in run_module(name, args.quick)]
        print(f"  done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    print(render(results))
    passed = sum(1 for _, row in results if row.get("passed"))
    print(f"\n{passed} passed, {len(results) - passed} failed ({len(results)} measures from {len(names)} benchmarks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
