"""recalibrate: throughput against a plain no-grad train-mode loop, and peak memory against a plain eval loop.

- Throughput: ``recalibrate(model, batches)`` end to end (held-out batch, the float64 statistics of every
  norm, findings before and after) against ``with torch.no_grad(): model.train(); for b in batches: model(b)``
  on the same model and the same batches, timed alternately, median of the repeats. Bar: >= 0.8x.
- Peak memory: the peak RSS (VmHWM) of a process that recalibrates, minus that of a process that runs the
  same batches through the model in eval; both build the same model and batches, first recalibrate a tiny
  model (same code loaded), and run with glibc's mmap threshold fixed (freed activations are returned, so
  the peak is live memory rather than heap retention, which varied by +-8 MB between identical runs). Bar: <= the model's
  bytes + two batches' bytes.

    python benchmarks/bench_recalibrate.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"widths": (32, 64, 128), "layers": (2, 2, 2), "batch": 32, "size": 48, "batches": 24}
QUICK = {"widths": (16, 32, 64), "layers": (1, 1, 1), "batch": 16, "size": 32, "batches": 6}

_CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[3])
torch.set_num_threads(1)
from benchmarks.bench_recalibrate import build
from normcli.recalibrate import recalibrate
cfg = json.loads(sys.argv[2])
# Both processes first recalibrate a tiny model: the same modules imported and the same kernels' code paged
# in, so that the difference measured is the pass's data, not code (a few MB of libtorch pages).
tiny, few = build({**cfg, "batch": 2, "size": 8, "batches": 2})
recalibrate(tiny, few)
model, batches = build(cfg)
if sys.argv[1] == "eval":
    with torch.no_grad():
        model.eval()
        for b in batches:
            model(b)
else:
    recalibrate(model, batches)
with open("/proc/self/status") as f:
    print(next(line for line in f if line.startswith("VmHWM")).split()[1])
"""


def build(cfg: dict):
    import torch

    sys.path.insert(0, str(ROOT))
    from samples.models import resnet_tiny

    torch.manual_seed(0)
    model = resnet_tiny(widths=tuple(cfg["widths"]), layers=tuple(cfg["layers"])).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], generator=gen) for _ in range(cfg["batches"])]
    return model, batches


def throughput(cfg: dict, repeats: int) -> tuple[float, float]:
    """Median seconds of recalibrate() and of the plain train-mode loop over the same batches."""
    import torch

    from normcli.recalibrate import recalibrate

    model, batches = build(cfg)

    def plain():
        with torch.no_grad():
            model.train()
            for b in batches:
                model(b)
        model.eval()

    ours, base = [], []
    plain()
    recalibrate(model, batches[:3])    # warm-up of both paths
    for _ in range(repeats):
        start = time.perf_counter()
        recalibrate(model, batches)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        plain()
        base.append(time.perf_counter() - start)
    return statistics.median(ours), statistics.median(base)


def peak_kib(mode: str, cfg: dict) -> int:
    # glibc's dynamic mmap threshold otherwise keeps freed activations in its heap in run-to-run varying
    # patterns (+-8 MB between identical runs); a fixed threshold makes the peak the memory actually live
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode, json.dumps(cfg), str(ROOT)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed: {proc.stderr.strip().splitlines()[-1:]}")
    return int(proc.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    cfg = QUICK if quick else CONFIG
    ours, base = throughput(cfg, 1 if quick else 5)
    samples = cfg["batch"] * cfg["batches"]
    ratio = base / ours
    rows = [{"name": f"throughput, samples/s ({cfg['batches']} batches of {cfg['batch']}x3x{cfg['size']}^2, "
                     "vs no-grad train-mode loop)",
             "normcli": samples / ours, "baseline": samples / base, "ratio": ratio, "bar": ">= 0.8",
             "passed": ratio >= 0.8}]

    model, batches = build(cfg)
    model_mib = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2 ** 20
    batch_mib = batches[0].numel() * batches[0].element_size() / 2 ** 20
    allowed = model_mib + 2 * batch_mib
    eval_peak = min(peak_kib("eval", cfg) for _ in range(1 if quick else 2)) / 1024
    recal_peak = min(peak_kib("recalibrate", cfg) for _ in range(1 if quick else 2)) / 1024
    extra = recal_peak - eval_peak
    rows.append({"name": f"peak RSS above eval loop, MiB (bar: model {model_mib:.2f} + 2 batches "
                         f"{2 * batch_mib:.2f})",
                 "normcli": extra, "baseline": allowed, "ratio": extra / allowed if allowed else None,
                 "bar": "<= 1", "passed": extra <= allowed})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run import render

    print(render([("recalibrate", row) for row in run(args.quick)]))
