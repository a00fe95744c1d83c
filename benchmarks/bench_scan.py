"""Scan and many-file inspect benchmarks (issue: trust at scanner grade).

Two bars, each a ratio against a baseline measured in the same run, run alternately with it because the
machine is shared and noisy. Each row gives the median of the per-pair ratios, with their min and max.

- ``normcli scan`` of one checkpoint (its verdict, no torch import) against ``python -c "import torch"``:
  <= 0.25.
- ``normcli inspect`` of 100 sample checkpoints in one call against 100 separate ``normcli inspect`` calls
  of the same files: <= 0.15.

    python benchmarks/bench_scan.py           # full
    python benchmarks/bench_scan.py --quick   # one repeat, 20 files: a smoke run
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "_work"
NORMCLI = [sys.executable, "-m", "normcli"]
# the sample formats inspect reads without --unsafe-load and without a model's code
SAMPLE_FILES = ("resnet_tiny.pt", "resnet_tiny.ckpt", "resnet_tiny_legacy.pt", "resnet_tiny.safetensors",
                "resnet_tiny.onnx", "resnet_tiny.pt2", "resnet_tiny_full.pt", "resnet_tiny_script.pt",
                "mobilenetv2_tiny.pt", "mobilenetv2_tiny_ema.pth", "resnet_tiny_dp.pt", "unhealthy.pt")


def wall(cmd: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - start, proc.returncode


def many_samples(count: int) -> list[Path]:
    """``count`` distinct sample checkpoint files (copies of the samples, cycling through the formats)."""
    folder = WORK / f"many_{count}"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        src = ROOT / "samples" / SAMPLE_FILES[i % len(SAMPLE_FILES)]
        dst = folder / f"{i:03d}_{src.name}"
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copy(src, dst)
        files.append(dst)
    return files


def _row(name: str, ours: list[float], base: list[float], bar: float) -> dict:
    """The median of the per-pair ratios, with their min and max as the row's spread (see run.py)."""
    ratios = [o / b for o, b in zip(ours, base)]
    ratio = statistics.median(ratios)
    return {"name": f"{name} (n={len(ratios)})", "normcli": statistics.median(ours),
            "baseline": statistics.median(base), "ratio": ratio, "ratio_min": min(ratios),
            "ratio_max": max(ratios), "bar": f"<= {bar}", "passed": ratio <= bar}


def run(quick: bool = False) -> list[dict]:
    rows = []
    repeats = 1 if quick else 7
    torch_import = [sys.executable, "-c", "import torch"]
    sample = ROOT / "samples" / "resnet_tiny.pt"
    scan = [*NORMCLI, "scan", str(sample)]
    wall(scan)  # warm the page cache
    wall(torch_import)
    ours, base = [], []
    for _ in range(repeats):
        w, code = wall(scan)
        assert code == 0, f"scan exited {code}"
        ours.append(w)
        base.append(wall(torch_import)[0])
    rows.append(_row("scan one checkpoint / import torch", ours, base, 0.25))

    count = 20 if quick else 100
    files = many_samples(count)
    one_call = [*NORMCLI, "inspect", "--fail-on", "never", *map(str, files)]
    wall(one_call)
    ours, base = [], []
    for _ in range(1 if quick else 3):
        w, code = wall(one_call)
        assert code == 0, f"inspect of {count} files exited {code}"
        ours.append(w)
        total = 0.0
        for f in files:
            w1, code = wall([*NORMCLI, "inspect", "--fail-on", "never", str(f)])
            assert code == 0, f"inspect {f} exited {code}"
            total += w1
        base.append(total)
    rows.append(_row(f"inspect {count} samples in one call / {count} calls", ours, base, 0.15))
    return rows


if __name__ == "__main__":
    from bench_inspect import print_rows

    print_rows(run(quick="--quick" in sys.argv))
