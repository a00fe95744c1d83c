"""fuse-export against the plain way of doing the same thing (issue: fuse-export, performance).

1. End to end: ``python -m normcli fuse-export CKPT --arch ... -o OUT.onnx`` against a plain script that builds
   the same model, loads the same state dict, exports it with the same exporter via ``torch.onnx.export`` and
   runs it once in onnxruntime. Both are fresh processes (imports included), run interleaved; figures are
   medians of wall time. Bar: ratio <= 1.3.
2. Inference: onnxruntime median latency of the ONNX normcli writes (BatchNorm folded) against a plain
   ``torch.onnx.export`` of the unfolded model with the same exporter. One thread per session, the two
   sessions timed in interleaved rounds. Bar: ratio <= 1.02.

    python benchmarks/bench_fuse_export.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS_PY = ROOT / "samples" / "models.py"

# (model, input shape) pairs; the shapes are those of samples.models.MODELS
FULL_CASES = [("resnet_tiny", (1, 3, 32, 32)), ("mobilenetv2_tiny", (1, 3, 32, 32))]
QUICK_CASES = [("resnet_tiny", (1, 3, 32, 32))]
EXPORTERS = ("dynamo", "torchscript")

# The CLI entry point, registering fuse-export first if this checkout's app does not list it yet.
NORMCLI = ("from normcli.cli import app, main\n"
           "from normcli.cli import fuse_export as command\n"
           "if not any(c.name == 'fuse-export' for c in app.registered_commands):\n"
           "    app.command('fuse-export')(command.fuse_export)\n"
           "main()\n")

PLAIN = """
import importlib.util, sys
import numpy as np, onnxruntime as ort, torch
models_py, name, ckpt, out, exporter, shape = sys.argv[1:7]
spec = importlib.util.spec_from_file_location("models", models_py)
models = importlib.util.module_from_spec(spec); spec.loader.exec_module(models)
model = getattr(models, name)()
model.load_state_dict(torch.load(ckpt, weights_only=True))
model.eval()
x = torch.randn(tuple(int(d) for d in shape.split(",")))
torch.onnx.export(model, (x,), out, dynamo=exporter == "dynamo", external_data=False)
session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
session.run(None, {session.get_inputs()[0].name: x.numpy()})
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=_env())
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed:\n{done.stderr[-2000:]}")
    return elapsed


def _checkpoint(name: str, folder: Path) -> Path:
    import torch

    sys.path.insert(0, str(ROOT))
    from samples.models import MODELS

    torch.manual_seed(0)
    model = MODELS[name][0]()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():  # non-trivial statistics, as a trained model has
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.3)
    path = folder / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return path


def end_to_end(name: str, shape, exporter: str, folder: Path, runs: int) -> dict:
    ckpt = _checkpoint(name, folder)
    shape_arg = ",".join(map(str, shape))
    normcli_cmd = [sys.executable, "-c", NORMCLI, "fuse-export", str(ckpt), "--arch", f"{MODELS_PY}:{name}",
                   "-o", str(folder / f"{name}-normcli.onnx"), "--exporter", exporter, "--input-shape", shape_arg,
                   "--force", "--json"]
    plain_cmd = [sys.executable, "-c", PLAIN, str(MODELS_PY), name, str(ckpt), str(folder / f"{name}-plain.onnx"),
                 exporter, shape_arg]
    _timed(normcli_cmd, folder)  # warm the file cache for both
    _timed(plain_cmd, folder)
    ours, base = [], []
    for _ in range(runs):
        ours.append(_timed(normcli_cmd, folder))
        base.append(_timed(plain_cmd, folder))
    normcli_s, baseline_s = statistics.median(ours), statistics.median(base)
    ratios = [o / b for o, b in zip(ours, base)]  # each run against the baseline run beside it
    ratio = statistics.median(ratios)
    return {"name": f"end-to-end {name} {exporter} (s)", "normcli": normcli_s, "baseline": baseline_s,
            "ratio": ratio, "ratio_min": min(ratios), "ratio_max": max(ratios), "bar": 1.3, "passed": ratio <= 1.3}


def session_latencies(ours: Path, base: Path, shape, rounds: int, per_round: int) -> tuple[list, list, list]:
    """onnxruntime latency of two ONNX files on one seeded input, one thread each: (ratios of medians per session
    pair, every call's seconds for ``ours``, for ``base``)."""
    import numpy as np
    import onnxruntime as ort

    def session(path: Path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    # Sessions are built afresh several times: where a session's buffers land in memory shifts its speed by
    # a percent or two, which is about the session, not the file. The ratio is the median over session pairs.
    pairs = 5
    all_times: dict[str, list[float]] = {"ours": [], "base": []}
    ratios = []
    for pair in range(pairs):
        order = ("ours", "base") if pair % 2 == 0 else ("base", "ours")  # which session is built first
        files = {"ours": ours, "base": base}
        sessions = {k: session(files[k]) for k in order}
        feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
        for k, s in sessions.items():  # warm-up
            for _ in range(20):
                s.run(None, feeds[k])
        times = {"ours": [], "base": []}
        # alternate call by call (in both orders), so that drift in the machine's speed hits both alike
        for r in range(rounds * per_round // pairs):
            for k in (("ours", "base") if r % 2 == 0 else ("base", "ours")):
                start = time.perf_counter()
                sessions[k].run(None, feeds[k])
                times[k].append(time.perf_counter() - start)
        ratios.append(statistics.median(times["ours"]) / statistics.median(times["base"]))
        for k in times:
            all_times[k].extend(times[k])
    return ratios, all_times["ours"], all_times["base"]


def latency(name: str, shape, exporter: str, folder: Path, rounds: int, per_round: int) -> dict:
    """The ONNX files end_to_end wrote: normcli's (folded) against the plain export of the unfolded model."""
    ratios, ours, base = session_latencies(folder / f"{name}-normcli.onnx", folder / f"{name}-plain.onnx", shape,
                                           rounds, per_round)
    ratio = statistics.median(ratios)
    return {"name": f"ort latency {name} {exporter} (ms)", "normcli": statistics.median(ours) * 1e3,
            "baseline": statistics.median(base) * 1e3,
            "ratio": ratio, "ratio_min": min(ratios), "ratio_max": max(ratios), "bar": 1.02, "passed": ratio <= 1.02}


def run(quick: bool = False) -> list[dict]:
    cases = QUICK_CASES if quick else FULL_CASES
    runs = 2 if quick else 5
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-fuse-export-") as tmp:
        folder = Path(tmp)
        for name, shape in cases:
            for exporter in EXPORTERS:
                rows.append(end_to_end(name, shape, exporter, folder, runs))
                rows.append(latency(name, shape, exporter, folder, rounds=10 if quick else 30,
                                    per_round=20 if quick else 50))
                _print(rows[-2:])
    return rows


def _print(rows: list[dict]) -> None:
    for r in rows:
        print(f"{r['name']:<45} normcli {r['normcli']:9.4f}  baseline {r['baseline']:9.4f}  "
              f"ratio {r['ratio']:.3f}  bar <= {r['bar']}  {'PASS' if r['passed'] else 'FAIL'}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model, fewer runs")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON at the end")
    args = parser.parse_args()
    result = run(quick=args.quick)
    if args.json:
        print(json.dumps(result, indent=2))
    sys.exit(0 if all(r["passed"] for r in result) else 1)
