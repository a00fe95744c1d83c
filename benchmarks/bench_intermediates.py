"""fuse-export --compare-intermediates against a plain parity run (issue: parity that finds the culprit).

On the sample ResNet and MobileNet, folded and exported once: the time of comparing every module's output
(``normcli.diverge.find_divergence``: onnxruntime with every intermediate value exposed, torch with forward
hooks) against the time of the plain parity check (``normcli.parity.check_parity``: onnxruntime and torch on
the same samples), both on the same ONNX file and samples, run interleaved in this process, median of the
pairs' ratios. Bar: <= 3.

    python benchmarks/bench_intermediates.py [--quick]
"""

from __future__ import annotations

import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = [("resnet_tiny", (1, 3, 32, 32)), ("mobilenetv2_tiny", (1, 3, 32, 32))]
SAMPLES = 3
BAR = 3.0


def _prepared(name: str, shape: tuple, folder: Path):
    """The folded sample model with non-trivial statistics, its ONNX export, and parity samples."""
    import torch

    sys.path.insert(0, str(ROOT))
    from normcli.export import export_onnx
    from normcli.fold import fold_batchnorm
    from normcli.inputs import make_inputs
    from samples.models import MODELS

    torch.manual_seed(0)
    model = MODELS[name][0]()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    model.eval()
    samples = make_inputs([shape], SAMPLES, seed=0)
    folded, _ = fold_batchnorm(model, example_inputs=samples[0])
    path = folder / f"{name}.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        export_onnx(folded, samples[0], path, exporter="dynamo")
    return folded, path, samples


def run(quick: bool = False) -> list[dict]:
    from normcli.diverge import find_divergence
    from normcli.parity import check_parity

    repeats = 1 if quick else 7
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in CASES[:1] if quick else CASES:
            folded, path, samples = _prepared(name, shape, Path(tmp))

            def plain():
                return check_parity(folded, path, samples).passed

            def intermediates():
                return find_divergence(folded, path, samples, atol=1e-4, rtol=1e-3)

            plain(), intermediates()  # warm: first session creation, lazy imports
            ours, base, ratios = [], [], []
            matched = 0
            for _ in range(repeats):
                start = time.perf_counter()
                result = intermediates()
                ours.append(time.perf_counter() - start)
                start = time.perf_counter()
                plain()
                base.append(time.perf_counter() - start)
                ratios.append(ours[-1] / base[-1])
                matched = len(result.modules)
            ratio = statistics.median(ratios)
            rows.append({"name": f"--compare-intermediates {name} ({matched} modules) / plain parity",
                         "normcli": statistics.median(ours), "baseline": statistics.median(base),
                         "ratio": ratio, "ratio_min": min(ratios), "ratio_max": max(ratios), "bar": f"<= {BAR:g}",
                         "passed": ratio <= BAR and matched > 0})
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_inspect import print_rows

    print_rows(run(quick="--quick" in sys.argv))
