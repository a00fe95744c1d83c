"""fuse-export --lower-unfolded: onnxruntime latency of the leftover norms as Mul + Add against BatchNormalization.

The samples whose BatchNorms the fold cannot fold (densenet_tiny: BN -> ReLU -> conv in every layer and after
the last pooling; bn_before_conv: BN in front of a zero-padded conv; two_consumers: a BN output read twice) are
exported once by normcli's pipeline with ``--lower-unfolded keep``; a copy gets ``normcli.lower.lower_unfolded``
("mul-add"). Both files hold the same folded graph but for those nodes. One thread per session, sessions
rebuilt several times, calls alternated. "normcli" is the default form (``normcli.lower.DEFAULT_LOWER``),
"baseline" the other; the ratio default / other is the median over session pairs. The bar, ratio <= 1.02,
says the default is the faster form (or within 2% of it): a failing row means the default should flip.

    python benchmarks/bench_lower_unfolded.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BAR = 1.02

FULL_CASES = [("densenet_tiny", (1, 3, 32, 32)), ("densenet_tiny", (8, 3, 32, 32)),
              ("bn_before_conv", (1, 4, 16, 16)), ("bn_before_conv", (8, 4, 64, 64)),
              ("two_consumers", (1, 3, 16, 16))]
QUICK_CASES = [("densenet_tiny", (1, 3, 32, 32))]


def _model(name: str):
    import torch

    sys.path.insert(0, str(ROOT))
    from samples.models import MODELS

    torch.manual_seed(0)
    model = MODELS[name][0]()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():  # non-trivial statistics, as a trained model has
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.3)
    return model.eval()


def _files(name: str, shape, folder: Path) -> tuple[Path, Path, int]:
    from normcli.fuse_export import fuse_export
    from normcli.lower import lower_unfolded

    keep = folder / f"{name}-{shape[0]}-keep.onnx"
    report = fuse_export(_model(name), keep, input_shapes=[shape], lower_unfolded="keep", force=True)
    if not report.parity.passed or not report.onnx["batchnorm_nodes"]:
        raise RuntimeError(f"{name}: parity {report.parity.passed}, {report.onnx['batchnorm_nodes']} BN nodes left")
    lowered = folder / f"{name}-{shape[0]}-mul-add.onnx"
    shutil.copyfile(keep, lowered)
    done = lower_unfolded(lowered, "mul-add")
    return lowered, keep, len(done.lowered)


def latency(name: str, shape, folder: Path, rounds: int, per_round: int) -> dict:
    if str(Path(__file__).parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).parent))
    from bench_fuse_export import session_latencies

    from normcli.lower import DEFAULT_LOWER

    lowered, kept, count = _files(name, shape, folder)
    default_file, other_file = (kept, lowered) if DEFAULT_LOWER == "keep" else (lowered, kept)
    other = "mul-add" if DEFAULT_LOWER == "keep" else "keep"
    ratios, ours, base = session_latencies(default_file, other_file, shape, rounds, per_round)
    ratio = statistics.median(ratios)
    shape_text = "x".join(map(str, shape))
    label = f"{count} leftover norms, {DEFAULT_LOWER} (default) vs {other}"
    return {"name": f"ort latency {name} {shape_text}, {label} (ms)",
            "normcli": statistics.median(ours) * 1e3, "baseline": statistics.median(base) * 1e3,
            "ratio": ratio, "ratio_min": min(ratios), "ratio_max": max(ratios), "bar": BAR, "passed": ratio <= BAR}


def run(quick: bool = False) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-lower-") as tmp:
        for name, shape in QUICK_CASES if quick else FULL_CASES:
            rows.append(latency(name, shape, Path(tmp), rounds=10 if quick else 30, per_round=20 if quick else 50))
            r = rows[-1]
            print(f"{r['name']:<85} default {r['normcli']:8.4f}  other {r['baseline']:8.4f}  ratio {r['ratio']:.3f} "
                  f"({r['ratio_min']:.3f}-{r['ratio_max']:.3f})  bar <= {BAR}  {'PASS' if r['passed'] else 'FAIL'}",
                  flush=True)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model, fewer runs")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON at the end")
    args = parser.parse_args()
    result = run(quick=args.quick)
    if args.json:
        print(json.dumps(result, indent=2))
    sys.exit(0 if all(r["passed"] for r in result) else 1)
