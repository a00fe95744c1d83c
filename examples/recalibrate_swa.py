"""Stochastic weight averaging on scikit-learn's digits: the averaged weights with the BatchNorm buffers they
come with, against the same weights after ``normcli recalibrate``, for several seeds.

SWA averages the weights of the last epochs of training. The BatchNorm running statistics do not belong to
the averaged weights: ``torch.optim.swa_utils.AveragedModel`` keeps the buffers of the model it was created
from (when averaging started), and a model trained on keeps the last epoch's. Either way the statistics
describe another network. This script trains ``small_cnn`` with BatchNorm, averages its weights over the last
epochs, writes the averaged state dict to a file, recalibrates that file with normcli (the training images
as a .npy file, the same pipeline as ``normcli recalibrate swa.pt --data train.npy --arch ...``), and
compares test accuracy:

- the last SGD model (weights and statistics of the final epoch);
- the SWA weights with the buffers ``AveragedModel`` keeps;
- the SWA weights after ``torch.optim.swa_utils.update_bn`` (momentum=None: the average of per-batch
  variances, not the population variance);
- the SWA weights after ``normcli recalibrate`` (exact population statistics).

    python examples/recalibrate_swa.py                       # seeds 0 1 2 (about a minute on one core)
    python examples/recalibrate_swa.py --quick --seeds 0     # a tiny run that only checks the script works
    python examples/recalibrate_swa.py --out-dir examples    # refresh the files the README shows

Writes ``recalibrate_swa.png`` and ``recalibrate_swa.md`` into ``--out-dir`` (default ./recalibrate_swa_out,
never the tracked files). Needs the ``demo`` extra: scikit-learn, matplotlib.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.small_batch import load_digits_split, machine, spread  # noqa: E402
from samples.models import small_cnn  # noqa: E402

VARIANTS = ("last", "swa_stale", "swa_update_bn", "swa_normcli")
LABELS = {"last": "last SGD model", "swa_stale": "SWA, buffers kept by AveragedModel",
          "swa_update_bn": "SWA + torch update_bn", "swa_normcli": "SWA + normcli recalibrate"}
EPOCHS, SWA_START, QUICK_EPOCHS, QUICK_SWA_START = 12, 2, 2, 1
BATCH, LR, SWA_LR = 32, 0.05, 0.05


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def run_seed(seed: int, epochs: int, swa_start: int, work: Path) -> dict[str, float]:
    """Train, average, recalibrate; test accuracy of each variant."""
    from torch.optim.swa_utils import AveragedModel, update_bn

    from normcli.recalibrate import recalibrate_file

    x_train, y_train, x_test, y_test = load_digits_split(seed)
    torch.manual_seed(seed)
    model = small_cnn("bn")
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    swa = None
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        if epoch == swa_start:
            swa = AveragedModel(model)             # buffers: copied now, never updated (use_buffers=False)
            for group in optimizer.param_groups:
                group["lr"] = SWA_LR
        model.train()
        perm = torch.randperm(len(x_train), generator=order)
        for i in range(0, len(perm) - BATCH + 1, BATCH):
            idx = perm[i:i + BATCH]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if swa is not None:
            swa.update_parameters(model)
    results = {"last": accuracy(model, x_test, y_test)}
    averaged = swa.module
    results["swa_stale"] = accuracy(averaged, x_test, y_test)

    with_update_bn = copy.deepcopy(averaged)
    update_bn([x_train[i:i + BATCH] for i in range(0, len(x_train), BATCH)], with_update_bn)
    results["swa_update_bn"] = accuracy(with_update_bn, x_test, y_test)

    # the normcli path: a state dict file and a data file in, a recalibrated state dict file out
    ckpt, data, out = work / f"swa_{seed}.pt", work / f"train_{seed}.npy", work / f"swa_{seed}_recal.pt"
    torch.save(averaged.state_dict(), ckpt)
    np.save(data, x_train.numpy())
    report = recalibrate_file(ckpt, str(data), out, arch="samples.models:small_cnn", batch_size=BATCH, force=True)
    recalibrated = small_cnn("bn")
    recalibrated.load_state_dict(torch.load(out, weights_only=True))
    results["swa_normcli"] = accuracy(recalibrated, x_test, y_test)
    results["eval_change"] = report.eval_change["max_rel"]
    return results


def markdown_table(per_seed: dict[int, dict[str, float]], epochs: int, swa_start: int) -> str:
    seeds = sorted(per_seed)
    lines = [
        f"Test accuracy on scikit-learn digits (450 test images), small_cnn with BatchNorm, {epochs} epochs of "
        f"SGD (batch {BATCH}, lr {LR}, momentum 0.9), weights averaged over epochs {swa_start + 1}-{epochs}; "
        f"seeds {', '.join(map(str, seeds))} (mean, then min-max over the seeds). Measured on {machine()}.",
        "",
        "| model | test accuracy |",
        "|---|---:|",
    ]
    for v in VARIANTS:
        lines.append(f"| {LABELS[v]} | {spread([per_seed[s][v] for s in seeds])} |")
    return "\n".join(lines) + "\n"


def plot(per_seed: dict[int, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    seeds = sorted(per_seed)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for i, v in enumerate(VARIANTS):
        values = [per_seed[s][v] for s in seeds]
        ax.errorbar([np.mean(values)], [i], xerr=[[np.mean(values) - min(values)], [max(values) - np.mean(values)]],
                    fmt="o", capsize=3)
        ax.scatter(values, [i] * len(values), s=10, color="grey", zorder=3)
    ax.set_yticks(range(len(VARIANTS)), [LABELS[v] for v in VARIANTS])
    ax.invert_yaxis()
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
    ax.set_xlabel("test accuracy (dot: mean; bar: min-max; grey: each seed)")
    ax.set_title(f"SWA on digits: BatchNorm statistics as kept vs recalibrated, {len(seeds)} seeds", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs instead of {EPOCHS}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default 0 1 2")
    parser.add_argument("--out-dir", type=Path, default=Path("recalibrate_swa_out"),
                        help="where recalibrate_swa.png and .md go (default: ./recalibrate_swa_out)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epochs, swa_start = (QUICK_EPOCHS, QUICK_SWA_START) if args.quick else (EPOCHS, SWA_START)
    per_seed = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            per_seed[seed] = r = run_seed(seed, epochs, swa_start, Path(tmp))
            for v in VARIANTS:
                print(f"seed {seed} | {LABELS[v]} | {r[v]:.4f}", flush=True)
            print(f"seed {seed}: recalibration changed the eval output by up to {r['eval_change']:.3g} "
                  "(relative, on the held-out batch)", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(per_seed, epochs, swa_start)
    (args.out_dir / "recalibrate_swa.md").write_text(table)
    plot(per_seed, args.out_dir / "recalibrate_swa.png")
    print()
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
