"""fuse-export of float16 and bfloat16 models: judged against a float32 run of the original, with tolerances
from the dtype, through the installed ``normcli``."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from normcli.fuse_export import HALF_EPS_MULTIPLE, dtype_tolerances
from normcli.parity import DEFAULT_ATOL, DEFAULT_RTOL
from tests.conftest import error_line

ARCH = textwrap.dedent("""
    import torch
    from torch import nn


    def build(dtype="float16"):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).to(getattr(torch, dtype))
""")
SHAPE = (2, 3, 16, 16)


def write_model(folder, dtype: torch.dtype):
    """A seeded float64 model with non-trivial statistics, cast once to ``dtype``: (arch file, state dict, model64)."""
    arch = folder / "net.py"
    arch.write_text(ARCH)
    namespace: dict = {}
    exec(compile(ARCH, str(arch), "exec"), namespace)
    model = namespace["build"]("float64").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(8, generator=g, dtype=torch.float64) * 0.5)
                m.running_var.copy_(torch.rand(8, generator=g, dtype=torch.float64) * 2 + 0.2)
                m.weight.copy_(1 + 0.3 * torch.randn(8, generator=g, dtype=torch.float64))
    ckpt = folder / "net.pt"
    torch.save({k: v.to(dtype) for k, v in model.state_dict().items()}, ckpt)
    model64 = namespace["build"]("float64").eval()  # the cast weights, evaluated in float64: the truth
    model64.load_state_dict({k: v.to(dtype).double() for k, v in model.state_dict().items()})
    return arch, ckpt, model64, namespace["build"]


def test_half_tolerances_come_from_the_dtype():
    assert dtype_tolerances(torch.float32) == (DEFAULT_ATOL, DEFAULT_RTOL)
    assert dtype_tolerances(torch.float64) == (DEFAULT_ATOL, DEFAULT_RTOL)
    assert dtype_tolerances(torch.float16) == (HALF_EPS_MULTIPLE * torch.finfo(torch.float16).eps,) * 2
    assert dtype_tolerances(torch.bfloat16) == (HALF_EPS_MULTIPLE * torch.finfo(torch.bfloat16).eps,) * 2


@pytest.mark.slow
def test_float16_model_passes_against_a_float32_run_through_the_installed_normcli(run_normcli, tmp_path):
    arch, ckpt, model64, build = write_model(tmp_path, torch.float16)
    out = tmp_path / "net.onnx"
    shape = ",".join(map(str, SHAPE))
    result = run_normcli("fuse-export", ckpt, "-o", out, "--arch", f"{arch}:build", "--input-shape", shape, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    atol, rtol = dtype_tolerances(torch.float16)
    assert (report["parity"]["atol"], report["parity"]["rtol"]) == (atol, rtol)
    assert "float32 run" in report["reference"] and "float16" in report["reference"]
    assert report["parity"]["passed"] and len(report["folded"]) == 2 and report["onnx"]["batchnorm_nodes"] == 0

    # independently: the ONNX file in our own session, against the float64 truth, is as close as the
    # float16 torch original is
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)).half()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].astype(np.float64)
    with torch.no_grad():
        truth = model64(x.double()).numpy()
        original16 = build("float16").eval()
        original16.load_state_dict(torch.load(ckpt, weights_only=True))
        torch16 = original16(x).double().numpy()
    onnx_error = np.abs(got - truth).max()
    torch_error = np.abs(torch16 - truth).max()
    assert onnx_error <= atol + rtol * np.abs(truth).max()
    assert onnx_error <= 4 * torch_error + torch.finfo(torch.float16).eps * np.abs(truth).max()

    # the same file with a float32 tolerance the user asks for: judged by it (and float16 cannot meet it)
    strict = run_normcli("fuse-export", ckpt, "-o", tmp_path / "strict.onnx", "--arch", f"{arch}:build",
                         "--input-shape", shape, "--atol", "1e-7", "--rtol", "1e-7")
    assert strict.returncode == 1 and strict.stderr.startswith("error: parity failed")
    assert "atol=1e-07" in strict.stderr and not (tmp_path / "strict.onnx").exists()


def test_bfloat16_graph_onnxruntime_cannot_load_is_a_one_line_error_naming_the_dtype(cli, tmp_path):
    arch, ckpt, _, _ = write_model(tmp_path, torch.bfloat16)
    out = tmp_path / "net.onnx"
    code, stdout, stderr = cli("fuse-export", ckpt, "-o", out, "--arch", f"{arch}:build",
                               "--arch-kwargs", '{"dtype": "bfloat16"}',
                               "--input-shape", ",".join(map(str, SHAPE)), "--exporter", "torchscript")
    line = error_line(stderr)
    assert code == 2 and line.startswith("error: onnxruntime cannot load")
    assert "export the model in float16 or float32" in line and "Traceback" not in stderr
    assert not out.exists()
