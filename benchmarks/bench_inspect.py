"""Start-up and inspect benchmarks (issue: foundation).

Each figure is the median of several runs interleaved with its baseline, `python -c "import torch"`, measured
in the same run, because the machine is shared and noisy. Prints one row per bar:

    python benchmarks/bench_inspect.py           # full: includes a 1.5 GB synthetic checkpoint
    python benchmarks/bench_inspect.py --quick   # a 20 MB checkpoint, one repeat: a smoke run
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "_work"
NORMCLI = [sys.executable, "-m", "normcli"]


# `python -m normcli` that, on exit, records its own peak RSS (VmHWM). The kernel's ru_maxrss of a child
# starts from its parent's at fork and survives exec, so it would count the benchmark's own memory (torch,
# when benchmarks/run.py has loaded other benchmarks); VmHWM belongs to the exec'd process alone.
NORMCLI_RSS = [sys.executable, "-c", """
import atexit, os, sys
def _report():
    with open('/proc/self/status') as f:
        hwm = next(line for line in f if line.startswith('VmHWM'))
    with open(os.environ['NORMCLI_BENCH_RSS'], 'w') as out:
        out.write(hwm.split()[1])
atexit.register(_report)
from normcli.cli import main
main(sys.argv[1:])
"""]


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MB (for NORMCLI_RSS commands, else 0) and exit code of one run of ``cmd``."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".rss") as rss_file:
        env = {**os.environ, "NORMCLI_BENCH_RSS": rss_file.name}
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
        wall = time.perf_counter() - start
        text = Path(rss_file.name).read_text().strip()
    return wall, (int(text) / 1024 if text else 0.0), proc.returncode


def interleaved(cmd: list[str], baseline: list[str], repeats: int) -> tuple[float, float, float, int]:
    """Median wall of cmd, median wall of baseline, max peak RSS of cmd (MB), and cmd's last exit code."""
    t = timed_pairs(cmd, baseline, repeats)
    return t["normcli"], t["baseline"], t["rss"], t["code"]


def timed_pairs(cmd: list[str], baseline: list[str], repeats: int) -> dict:
    """Run cmd and baseline alternately ``repeats`` times; the ratio of each pair, so that load from other
    processes hits both sides of a ratio alike. Returns medians of both walls, the median ratio and the
    ratios' min and max (the row's spread), cmd's max peak RSS (MB) and last exit code."""
    ours, base, ratios, rss, code = [], [], [], 0.0, 0
    timed(cmd)  # warm the page cache
    for _ in range(repeats):
        w, r, code = timed(cmd)
        b = timed(baseline)[0]
        ours.append(w)
        base.append(b)
        ratios.append(w / b)
        rss = max(rss, r)
    return {"normcli": statistics.median(ours), "baseline": statistics.median(base),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "rss": rss, "code": code}


def ratio_row(name: str, t: dict, bar: float, extra_ok: bool = True, bar_text: str | None = None) -> dict:
    """A table row for a ratio against a baseline measured in the same run, with its spread."""
    return {"name": name, "normcli": t["normcli"], "baseline": t["baseline"], "ratio": t["ratio"],
            "ratio_min": t["ratio_min"], "ratio_max": t["ratio_max"], "bar": bar_text or f"<= {bar:g}",
            "passed": t["ratio"] <= bar and extra_ok}


def make_large_checkpoint(path: Path, gigabytes: float) -> None:
    """A ResNet-shaped state dict whose conv weights fill ``gigabytes``; BN statistics are realistic."""
    import torch

    if path.exists() and path.stat().st_size >= gigabytes * 1e9 * 0.98:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    sd = {}
    per_layer = 256 * 256 * 3 * 3 * 4  # bytes of one 256->256 3x3 conv weight
    layers = max(1, int(gigabytes * 1e9 / per_layer / 4))
    for i in range(layers):
        # four convs per block keep the file large while the norm layers stay numerous
        for j in range(4):
            sd[f"blocks.{i}.conv{j}.weight"] = torch.randn(256, 256, 3, 3, generator=g)
            sd[f"blocks.{i}.bn{j}.weight"] = torch.rand(256, generator=g) + 0.5
            sd[f"blocks.{i}.bn{j}.bias"] = torch.randn(256, generator=g) * 0.1
            sd[f"blocks.{i}.bn{j}.running_mean"] = torch.randn(256, generator=g)
            sd[f"blocks.{i}.bn{j}.running_var"] = torch.rand(256, generator=g) + 0.1
            sd[f"blocks.{i}.bn{j}.num_batches_tracked"] = torch.tensor(1000)
    tmp = path.with_suffix(".partial")
    torch.save(sd, tmp)
    os.replace(tmp, path)


def run(quick: bool = False) -> list[dict]:
    repeats = 1 if quick else 7  # --quick only keeps the script from rotting; its figures are not the bar
    torch_import = [sys.executable, "-c", "import torch"]
    rows = []

    t = timed_pairs([*NORMCLI, "--help"], torch_import, repeats)
    assert t["code"] == 0
    rows.append(ratio_row("normcli --help / import torch", t, 0.25))

    size = 0.02 if quick else 1.6
    big = WORK / f"large_{size:g}gb.pt"
    # made in a child process, so that this process never holds torch's memory
    subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                    "from bench_inspect import make_large_checkpoint as m; from pathlib import Path; "
                    "m(Path(sys.argv[2]), float(sys.argv[3]))", str(Path(__file__).parent), str(big), str(size)],
                   check=True)
    t = timed_pairs([*NORMCLI_RSS, "inspect", str(big), "--json"], torch_import, repeats)
    assert t["code"] == 0, f"inspect exited {t['code']}"
    gb = big.stat().st_size / 1e9
    rows.append(ratio_row(f"inspect {gb:.2f} GB checkpoint / import torch", t, 1.25))
    # memory does not depend on what else runs on the machine: an absolute bar
    rows.append({"name": f"inspect {gb:.2f} GB checkpoint, peak RSS (MB)", "normcli": t["rss"], "baseline": None,
                 "ratio": None, "bar": "<= 350 MB", "passed": t["rss"] <= 350})

    for sample in ("resnet_tiny.safetensors", "resnet_tiny.onnx"):
        cmd = [sys.executable, "-c",
               "import sys\nfrom normcli.cli import main\ntry:\n    main(['inspect', sys.argv[1], '--json'])\n"
               "except SystemExit as e:\n    code = e.code\nsys.exit(3 if 'torch' in sys.modules else code)",
               str(ROOT / "samples" / sample)]
        t = timed_pairs(cmd, torch_import, repeats)
        # was an absolute 0.6 s when import torch took ~2 s here; a ratio holds whatever else runs
        rows.append(ratio_row(f"inspect {sample} / import torch; imports no torch", t, 0.3,
                              extra_ok=t["code"] == 0, bar_text="<= 0.3, no torch"))
    return rows


def print_rows(rows: list[dict]) -> None:
    def fmt(x):
        return "-" if x is None else f"{x:.3f}"

    print(f"{'measure':<58} {'normcli':>9} {'baseline':>9} {'ratio':>7}  {'bar':<20} result")
    for r in rows:
        print(f"{r['name']:<58} {fmt(r['normcli']):>9} {fmt(r['baseline']):>9} {fmt(r['ratio']):>7}  "
              f"{r['bar']:<20} {'pass' if r['passed'] else 'FAIL'}")


if __name__ == "__main__":
    print_rows(run(quick="--quick" in sys.argv))
