"""`normcli parity` against golden files: start-up without torch (issue: parity that finds the culprit).

The bar: `normcli parity` on the sample ONNX <= 0.4x `python -c "import torch"`, both measured in this run,
interleaved, median of several runs.

    python benchmarks/bench_parity.py [--quick]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench_inspect import ROOT, ratio_row, timed_pairs


def write_golden(folder: Path) -> tuple[Path, Path]:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(ROOT / "samples" / "resnet_tiny.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.savez(folder / "inputs.npz", input=x)
    np.savez(folder / "expected.npz", logits=session.run(None, {"input": x})[0])
    return folder / "inputs.npz", folder / "expected.npz"


def run(quick: bool = False) -> list[dict]:
    repeats = 1 if quick else 7
    torch_import = [sys.executable, "-c", "import torch"]
    with tempfile.TemporaryDirectory() as tmp:
        inputs, expected = write_golden(Path(tmp))
        # exit 3 if torch was imported after all, so that the row fails instead of hiding it
        cmd = [sys.executable, "-c",
               "import sys\nfrom normcli.cli import main\ntry:\n    main(sys.argv[1:])\n"
               "except SystemExit as e:\n    code = e.code\nsys.exit(3 if 'torch' in sys.modules else code)",
               "parity", str(ROOT / "samples" / "resnet_tiny.onnx"), "--inputs", str(inputs),
               "--expected", str(expected)]
        t = timed_pairs(cmd, torch_import, repeats)
    return [ratio_row("normcli parity resnet_tiny.onnx / import torch; imports no torch", t, 0.4,
                      extra_ok=t["code"] == 0, bar_text="<= 0.4, no torch")]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_inspect import print_rows

    print_rows(run(quick="--quick" in sys.argv))
