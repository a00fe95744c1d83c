"""Accuracy of the BatchNorm fold (issue: fuse-export), measured against a float64 evaluation of the ORIGINAL
model on the same inputs.

For each sample model and each statistics regime, three float32 models are run on the same inputs:
normcli's folded model, the unfolded original, and ``torch.fx.experimental.optimization.fuse``'s folded model.
Error metric: max |out - ref| / max |ref| over the batch (ref = the original model in float64), the median over
several input batches. Regimes:

- calibrated: statistics from train-mode forwards on data (cumulative averages over several batches);
- extreme:    a third of the channels before each norm get a large DC offset (|mean| up to ~100) and weights
              shrunk 10-300x so that their variance falls to ~1e-5 and below, gamma is large (|gamma| up to ~30); then the
              statistics are calibrated on data as above, so that each norm sees exactly these extremes.

Bars: geometric mean over cases of (folded f32 error / unfolded f32 error) <= 1.0, and of
(normcli folded error / fx fuse folded error) <= 1.0.

    python benchmarks/bench_fold_precision.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from normcli.fold import fold_batchnorm  # noqa: E402
from samples.models import MODELS  # noqa: E402

FULL_MODELS = ["resnet_tiny", "resnet_bottleneck_tiny", "mobilenetv2_tiny", "densenet_tiny",
               "convtranspose_decoder", "conv1d_net", "conv3d_net", "mlp_head", "small_cnn"]
QUICK_MODELS = ["resnet_tiny", "mobilenetv2_tiny", "convtranspose_decoder", "mlp_head"]
NORMS = (nn.modules.batchnorm._BatchNorm,)
PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
             nn.Linear)


def batch(shape: tuple[int, ...], seed: int, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, *shape[1:], generator=g) * 1.5 + 0.3


def calibrate(model: nn.Module, shape: tuple[int, ...], batches: int = 6) -> nn.Module:
    """Running statistics as the cumulative average of train-mode batch statistics over data."""
    for m in model.modules():
        if isinstance(m, NORMS):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(batches):
            model(batch(shape, 1000 + i, size=16))
    return model.eval()


def make_extreme(model: nn.Module, seed: int) -> None:
    """Large means, tiny variances and large gamma, placed where each norm will see them."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    # pair each producer with the norm it feeds by tracing, so that the extremes land on the right channels
    from torch import fx

    graph = fx.symbolic_trace(model).graph
    with torch.no_grad():
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(modules[node.target], NORMS):
                continue
            norm = modules[node.target]
            if norm.affine:
                sign = torch.where(torch.rand(norm.num_features, generator=g) < 0.5, -1.0, 1.0)
                norm.weight.copy_(sign * 10 ** (torch.rand(norm.num_features, generator=g) * 1.5))
                norm.bias.copy_(torch.randn(norm.num_features, generator=g) * 3)
            src = node.args[0]
            producer = modules.get(src.target) if src.op == "call_module" else None
            if not isinstance(producer, PRODUCERS):
                continue
            out_dim = 1 if isinstance(producer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
            channels = producer.weight.shape[out_dim] if out_dim == 0 else norm.num_features
            picked = torch.rand(channels, generator=g) < 0.34
            shrink = torch.where(picked, 10 ** (-1.0 - 1.5 * torch.rand(channels, generator=g)), torch.ones(channels))
            if out_dim == 0:
                producer.weight.mul_(shrink.reshape(-1, *([1] * (producer.weight.dim() - 1))))
            else:
                groups = producer.groups
                w = producer.weight
                w.copy_((w.reshape(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
                         * shrink.reshape(groups, 1, w.shape[1], *([1] * (w.dim() - 2)))).reshape(w.shape))
            offset = torch.where(picked, torch.randn(channels, generator=g) * 50, torch.zeros(channels))
            if producer.bias is None:
                producer.bias = nn.Parameter(torch.zeros(channels))
            producer.bias.mul_(shrink).add_(offset)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def case_errors(model: nn.Module, shape: tuple[int, ...], seeds: list[int]) -> dict[str, float]:
    from torch.fx.experimental.optimization import fuse

    reference = copy.deepcopy(model).double()
    folded, report = fold_batchnorm(model, example_inputs=(batch(shape, seeds[0]),))
    try:
        fx_fused = fuse(model)
    except Exception:  # fx fuse cannot trace it: its "folded" model is the original
        fx_fused = model
    errors: dict[str, list[float]] = {"folded": [], "unfolded": [], "fx_fuse": []}
    with torch.no_grad():
        for seed in seeds:
            x = batch(shape, seed)
            ref = reference(x.double())
            errors["folded"].append(relative_error(folded(x), ref))
            errors["unfolded"].append(relative_error(model(x), ref))
            errors["fx_fuse"].append(relative_error(fx_fused(x), ref))
    result = {k: statistics.median(v) for k, v in errors.items()}
    result["n_folded"] = len(report.folded)
    result["fx_fused"] = sum(isinstance(m, NORMS) for m in model.modules()) - sum(
        isinstance(m, NORMS) for m in fx_fused.modules())
    result["min_var"] = min(m.running_var.min().item() for m in model.modules()
                            if isinstance(m, NORMS) and m.running_var is not None)
    return result


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def run(quick: bool = False) -> list[dict]:
    torch.manual_seed(0)
    names = QUICK_MODELS if quick else FULL_MODELS
    seeds = list(range(3 if quick else 7))
    cases = []
    print(f"{'model':<26}{'stats':<12}{'folded f32':>12}{'unfolded f32':>14}{'fx fuse f32':>13}"
          f"{'folded/unf':>12}{'folded/fx':>11}{'min var':>10}  folds (normcli/fx)")
    for name in names:
        factory, shape = MODELS[name]
        for regime in ("calibrated", "extreme"):
            torch.manual_seed(len(name))
            model = factory()
            if regime == "extreme":
                make_extreme(model, seed=len(name))
            calibrate(model, shape)
            e = case_errors(model, shape, seeds)
            e["regime"] = regime
            cases.append(e)
            print(f"{name:<26}{regime:<12}{e['folded']:>12.3e}{e['unfolded']:>14.3e}{e['fx_fuse']:>13.3e}"
                  f"{e['folded'] / e['unfolded']:>12.3f}{e['folded'] / e['fx_fuse']:>11.3f}{e['min_var']:>10.1e}"
                  f"  {e['n_folded']}/{e['fx_fused']}")
    rows = [
        {"name": "fold precision: folded f32 err / unfolded f32 err (geomean)",
         "normcli": geomean([c["folded"] for c in cases]), "baseline": geomean([c["unfolded"] for c in cases]),
         "ratio": geomean([c["folded"] / c["unfolded"] for c in cases]), "bar": 1.0},
        {"name": "fold precision: normcli folded err / fx fuse folded err (geomean)",
         "normcli": geomean([c["folded"] for c in cases]), "baseline": geomean([c["fx_fuse"] for c in cases]),
         "ratio": geomean([c["folded"] / c["fx_fuse"] for c in cases]), "bar": 1.0},
    ]
    spreads = ([c["folded"] / c["unfolded"] for c in cases], [c["folded"] / c["fx_fuse"] for c in cases])
    for row, per_case in zip(rows, spreads):
        row["passed"] = row["ratio"] <= row["bar"]
        row["ratio_min"], row["ratio_max"] = min(per_case), max(per_case)  # over the models and regimes
    print()
    subsets = {"calibrated only": [c for c in cases if c["regime"] == "calibrated"],
               "extreme only": [c for c in cases if c["regime"] == "extreme"],
               "cases where fx fuse folds as many norms": [c for c in cases if c["fx_fused"] == c["n_folded"]]}
    for label, subset in subsets.items():
        print(f"  ({label}, {len(subset)} cases: folded/unfolded "
              f"{geomean([c['folded'] / c['unfolded'] for c in subset]):.3f}, folded/fx fuse "
              f"{geomean([c['folded'] / c['fx_fuse'] for c in subset]):.3f})")
    for row in rows:
        print(f"{row['name']}: normcli {row['normcli']:.3e}  baseline {row['baseline']:.3e}  "
              f"ratio {row['ratio']:.3f}  bar <= {row['bar']}  {'PASS' if row['passed'] else 'FAIL'}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer models and input batches")
    run(quick=parser.parse_args().quick)
