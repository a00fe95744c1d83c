"""Train the same small CNN with BatchNorm, FRN + TLU and MABN at batch sizes 2 and 32 on scikit-learn's
digits, for the same number of samples seen, and report test accuracy for each.

BatchNorm estimates its statistics from each batch; with 2 samples a step those estimates are noisy and the
running averages used at test time drift from what training saw. FRN normalises each sample on its own; MABN
averages its statistics over the last ``real_B // B`` steps. This script measures what that does here.

    python examples/small_batch.py                      # the full run, seeds 0 1 2 (~6 minutes on one core)
    python examples/small_batch.py --quick --seeds 0    # a tiny run that only checks the script works
    python examples/small_batch.py --out-dir examples   # refresh the files the README shows

Writes ``small_batch.png`` (test accuracy vs batch size, one line per norm, min-max over the seeds) and
``small_batch.md`` (the table, naming the machine that measured it) into ``--out-dir`` (default:
./small_batch_out, never the tracked files). Needs the ``demo`` extra: scikit-learn, matplotlib.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from samples.models import small_cnn  # noqa: E402

NORMS = ("bn", "frn", "mabn")
NORM_LABELS = {"bn": "BatchNorm + ReLU", "frn": "FRN + TLU", "mabn": "MABN + ReLU"}
BATCH_SIZES = (2, 32)
MABN_REAL_B = 32  # MABN at batch B averages its statistics over real_B // B steps
BASE_LR, BASE_BATCH = 0.05, 32  # SGD learning rate at batch 32, scaled linearly with the batch size
SAMPLES_SEEN, QUICK_SAMPLES_SEEN = 8 * 1344, 128  # 8 passes over the 1347 training images


@dataclass
class Result:
    norm: str
    batch_size: int
    steps: int
    test_accuracy: float
    final_train_loss: float
    seconds: float


def load_digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits (1797 8x8 images, pixel values 0..16) scaled to [0, 1]; a fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    return (torch.from_numpy(x_train), torch.from_numpy(y_train).long(),
            torch.from_numpy(x_test), torch.from_numpy(y_test).long())


def train_one(norm: str, batch_size: int, samples_seen: int, data, seed: int) -> Result:
    """Train from the same initial weights and the same sample order; return test accuracy in eval mode."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    kwargs = {"B": batch_size, "real_B": max(MABN_REAL_B, batch_size)} if norm == "mabn" else None
    model = small_cnn(norm, norm_kwargs=kwargs)
    lr = BASE_LR * batch_size / BASE_BATCH
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    # One fixed stream of sample indices (epochs of permutations) shared by every run, cut into batches.
    order = torch.Generator().manual_seed(seed)
    n = len(x_train)
    stream = torch.cat([torch.randperm(n, generator=order) for _ in range(-(-samples_seen // n))])[:samples_seen]
    steps = samples_seen // batch_size
    losses = []
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = stream[step * batch_size:(step + 1) * batch_size]
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        predicted = model(x_test).argmax(dim=1)
    accuracy = (predicted == y_test).double().mean().item()
    tail = losses[-max(1, steps // 10):]
    return Result(norm, batch_size, steps, accuracy, float(np.mean(tail)), seconds)


def machine() -> str:
    """The CPU, core count and torch version, so a table says where its numbers were measured."""
    import os
    import platform

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, one thread"


def spread(values: list[float], digits: int = 4) -> str:
    """``mean (min-max)`` over seeds; just the value for one seed."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def markdown_table(results: list[Result], samples_seen: int, seeds: list[int]) -> str:
    lines = [
        f"Test accuracy on scikit-learn digits (450 test images), {samples_seen} training samples seen per run, "
        f"seeds {', '.join(map(str, seeds))} (mean, then min-max over the seeds), SGD momentum 0.9, "
        f"lr {BASE_LR} x batch / {BASE_BATCH}. Measured on {machine()}.",
        "",
        "| norm | batch size | steps | test accuracy | train loss (last 10% of steps) | train seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for norm in NORMS:
        for batch_size in BATCH_SIZES:
            mine = [r for r in results if r.norm == norm and r.batch_size == batch_size]
            lines.append(f"| {NORM_LABELS[norm]} | {batch_size} | {mine[0].steps} | "
                         f"{spread([r.test_accuracy for r in mine])} | "
                         f"{spread([r.final_train_loss for r in mine])} | "
                         f"{np.mean([r.seconds for r in mine]):.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[Result], path: Path, samples_seen: int, seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for shift, norm in zip((-0.06, 0.0, 0.06), NORMS):
        xs, means, below, above = [], [], [], []
        for batch_size in BATCH_SIZES:
            acc = [r.test_accuracy for r in results if r.norm == norm and r.batch_size == batch_size]
            xs.append(batch_size * 2 ** shift)  # side by side, so the seed ranges do not hide each other
            means.append(np.mean(acc))
            below.append(np.mean(acc) - min(acc))
            above.append(max(acc) - np.mean(acc))
        ax.errorbar(xs, means, yerr=[below, above], marker="o", capsize=3, label=NORM_LABELS[norm])
    ax.set_xscale("log", base=2)
    ax.set_xticks(BATCH_SIZES, [str(b) for b in BATCH_SIZES])
    ax.set_xlabel("batch size per training step")
    ax.set_ylabel("test accuracy (mean, bars: min-max over seeds)")
    # A fixed range rather than matplotlib's auto-zoom, which would blow up differences of one or two of the
    # 450 test images (0.0022 each) into a chart-high gap.
    lowest = min(r.test_accuracy for r in results)
    ax.set_ylim(min(0.9, lowest - 0.02), 1.0)
    ax.set_title(f"digits (450 test images), small CNN, {samples_seen} samples seen, {len(seeds)} seed(s)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SAMPLES_SEEN} samples seen per run")
    parser.add_argument("--samples-seen", type=int, default=None, help=f"default {SAMPLES_SEEN}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one run per seed (split, initial weights, sample order); default 0 1 2")
    parser.add_argument("--out-dir", type=Path, default=Path("small_batch_out"),
                        help="where small_batch.png and small_batch.md go (default: ./small_batch_out)")
    args = parser.parse_args(argv)

    # One thread: on tensors this small, a second thread costs more in hand-offs than it gains, and on a
    # busy 2-core machine its spin-waiting makes each step tens of times slower.
    torch.set_num_threads(1)
    samples_seen = args.samples_seen or (QUICK_SAMPLES_SEEN if args.quick else SAMPLES_SEEN)
    if samples_seen % max(BATCH_SIZES) != 0:
        parser.error(f"--samples-seen must be a multiple of {max(BATCH_SIZES)} so every run sees the same samples")
    results = []
    for seed in args.seeds:
        data = load_digits_split(seed)
        for norm in NORMS:
            for batch_size in BATCH_SIZES:
                r = train_one(norm, batch_size, samples_seen, data, seed)
                print(f"seed {seed} {NORM_LABELS[norm]:<18} batch {batch_size:>3}: test accuracy "
                      f"{r.test_accuracy:.4f} ({r.steps} steps, {r.seconds:.1f} s)", flush=True)
                results.append(r)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, samples_seen, args.seeds)
    (args.out_dir / "small_batch.md").write_text(table)
    plot(results, args.out_dir / "small_batch.png", samples_seen, args.seeds)
    print()
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
