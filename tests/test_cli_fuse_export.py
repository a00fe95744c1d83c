"""`normcli fuse-export`: through the real entry point, Typer's CliRunner and a subprocess.

Every written ONNX file is checked independently of normcli's own parity report: the test opens it in
onnxruntime itself and compares with the original torch model evaluated in float64.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from samples.models import MODELS
from tests.conftest import STAGE_LINE, error_line

ROOT = Path(__file__).resolve().parent.parent
MODELS_PY = ROOT / "samples" / "models.py"


def calibrated(name: str, seed: int = 0) -> nn.Module:
    """A sample model with non-trivial norm statistics, so that a fold actually changes the weights."""
    factory, _ = MODELS[name]
    torch.manual_seed(seed)
    model = factory()
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            if m.affine:
                m.weight.data.copy_(1 + 0.3 * torch.randn(c, generator=g))
                m.bias.data.copy_(0.3 * torch.randn(c, generator=g))
    return model.eval()


def save_state_dict(name: str, folder: Path) -> Path:
    path = folder / f"{name}.pt"
    torch.save(calibrated(name).state_dict(), path)
    return path


def onnx_vs_float64_torch(onnx_path: Path, model: nn.Module, shape) -> float:
    """Max abs error of the ONNX file (run by the test's own session) against the model in float64."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(123))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
    want = torch.utils._pytree.tree_flatten(want)[0]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-3, atol=1e-4)
    return max(float(np.abs(a - b.numpy()).max()) for a, b in zip(got, want))


def batchnorm_nodes_in(path: Path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".partial")]


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_sample_model_passes_parity(cli, tmp_path, name, exporter):
    ckpt = save_state_dict(name, tmp_path)
    out = tmp_path / f"{name}.onnx"
    shape = MODELS[name][1]

    code, stdout, err = cli("fuse-export", ckpt, "--arch", f"{MODELS_PY}:{name}", "-o", out,
                            "--input-shape", ",".join(map(str, shape)), "--exporter", exporter,
                            "--samples", "2", "--json")

    assert code == 0, err
    report = json.loads(stdout)
    assert report["parity"]["passed"] and report["output"] == str(out)
    assert report["exporter"] == exporter
    onnx_vs_float64_torch(out, calibrated(name), shape)
    assert report["onnx"]["batchnorm_nodes"] == batchnorm_nodes_in(out)
    if not report["unfolded"]:
        assert report["onnx"]["batchnorm_nodes"] == 0
    norms = [n for n, m in calibrated(name).named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert sorted([f["norm"] for f in report["folded"]] + [u["norm"] for u in report["unfolded"]]) == sorted(norms)


@pytest.mark.slow
def test_json_follows_the_contract_and_dynamic_batch_runs_two_batch_sizes(tmp_path):
    from typer.testing import CliRunner

    from normcli.cli import app

    ckpt = save_state_dict("resnet_tiny", tmp_path)
    out = tmp_path / "net.onnx"
    result = CliRunner().invoke(app, ["fuse-export", str(ckpt), "--arch", f"{MODELS_PY}:resnet_tiny", "-o", str(out),
                                      "--input-shape", "2,3,32,32", "--dynamic-batch", "--samples", "4", "--json"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stdout is exactly one JSON object
    assert {"output", "opset", "exporter", "folded", "unfolded", "parity", "onnx"} <= set(report)
    assert report["output"] == str(out) and report["exporter"] == "dynamo" and report["opset"] == 18
    assert isinstance(report["opset"], int)
    assert all(set(f) >= {"norm", "into"} for f in report["folded"]) and len(report["folded"]) == 11
    assert report["unfolded"] == []
    parity = report["parity"]
    assert parity["passed"] is True and parity["atol"] == 1e-4 and parity["rtol"] == 1e-3 and parity["samples"] == 4
    for o in parity["outputs"]:
        assert set(o) >= {"name", "max_abs", "max_rel", "mean_abs"}
        assert all(isinstance(o[k], float) for k in ("max_abs", "max_rel", "mean_abs"))
    assert report["onnx"]["nodes"] == len(onnx.load(str(out)).graph.node)
    assert report["onnx"]["batchnorm_nodes"] == 0
    model = calibrated("resnet_tiny")
    for batch in (1, 7):  # the symbolic batch takes sizes the export never saw
        onnx_vs_float64_torch(out, model, (batch, 3, 32, 32))


def test_a_broken_fold_fails_parity_with_exit_1_and_writes_nothing(cli, tmp_path, monkeypatch):
    import normcli.fold

    real_fold = normcli.fold.fold_batchnorm

    def corrupting_fold(model, *args, **kwargs):
        folded, report = real_fold(model, *args, **kwargs)
        with torch.no_grad():
            conv = next(m for m in folded.modules() if isinstance(m, nn.Conv2d))
            conv.weight[0].mul_(1.5)  # a wrong fold scale on one output channel
        return folded, report

    monkeypatch.setattr(normcli.fold, "fold_batchnorm", corrupting_fold)
    ckpt = save_state_dict("small_cnn", tmp_path)
    out, fused = tmp_path / "broken.onnx", tmp_path / "broken.ts"
    args = ["fuse-export", ckpt, "--arch", f"{MODELS_PY}:small_cnn", "-o", out, "--input-shape", "2,1,8,8",
            "--exporter", "torchscript", "--save-fused", fused]

    code, stdout, err = cli(*args, "--json")

    assert code == 1
    assert error_line(err).startswith("error: parity failed") and "Traceback" not in err
    report = json.loads(stdout)
    assert report["output"] is None and report["parity"]["passed"] is False
    assert report["fold_check"]["passed"] is False
    assert not out.exists() and not fused.exists() and not leftovers(tmp_path)

    code, stdout, err = cli(*args, "--keep-on-fail")
    assert code == 1 and out.exists() and fused.exists()
    assert "error: parity failed" in err and "written anyway" in err


def test_an_existing_output_is_not_clobbered_without_force(cli, tmp_path):
    ckpt = save_state_dict("mlp_head", tmp_path)
    out = tmp_path / "head.onnx"
    out.write_bytes(b"keep me")
    args = ["fuse-export", ckpt, "--arch", f"{MODELS_PY}:mlp_head", "-o", out, "--exporter", "torchscript"]

    code, stdout, err = cli(*args)
    assert code == 2 and err.startswith("error:") and "--force" in err
    assert out.read_bytes() == b"keep me" and stdout == ""

    code, _, err = cli(*args, "--force")
    assert code == 0, err
    onnx_vs_float64_torch(out, calibrated("mlp_head"), (1, 32))  # inferred from the first Linear


def test_input_shape_is_inferred_from_the_first_conv_and_reported(cli, tmp_path):
    ckpt = save_state_dict("conv1d_net", tmp_path)
    out = tmp_path / "c1.onnx"
    code, stdout, err = cli("fuse-export", ckpt, "--arch", f"{MODELS_PY}:conv1d_net", "-o", out,
                            "--exporter", "torchscript", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    in_channels = MODELS["conv1d_net"][1][1]
    assert report["input_shapes"] == [[1, in_channels, 64]]
    assert "Conv1d" in report["input_source"] and "64" in report["input_source"]
    # the guessed length is not baked into the ONNX: the model runs at other lengths, so that dim is symbolic
    assert report["input_shape_guessed"] is True and report["dynamic_dims"] == [[2]]
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[:2]] == [1, in_channels] and not dims[2].HasField("dim_value")


def test_input_file_drives_parity_and_the_human_report_names_every_step(cli, tmp_path):
    ckpt = save_state_dict("two_consumers", tmp_path)
    data = tmp_path / "batch.npy"
    np.save(data, np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "tc.onnx"

    code, stdout, err = cli("fuse-export", ckpt, "--arch", f"{MODELS_PY}:two_consumers", "-o", out,
                            "--input", data, "--exporter", "torchscript")

    assert code == 0, err
    assert "3,3,16,16 (--input)" in stdout
    assert "unfolded norm" in stdout and "BatchNormalization" in stdout and f"wrote {out}" in stdout
    unfolded = [line for line in stdout.splitlines() if line.startswith("bn")]
    assert unfolded, "the BN with two consumers is listed with its reason"


LOAD_WITHOUT_NORMCLI = """
import sys
sys.modules["normcli"] = None  # any attempt to import normcli or the model's source now fails
sys.modules["samples"] = None
import numpy as np, torch
folder = sys.argv[1]
x = torch.from_numpy(np.load(folder + "/x.npy"))
programs = {"pt2": torch.export.load(folder + "/fused.pt2").module(), "ts": torch.jit.load(folder + "/fused.ts")}
for name, model in programs.items():
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()), name
    with torch.no_grad():
        np.save(folder + "/y_" + name + ".npy", model(x).numpy())
"""


@pytest.mark.slow
def test_save_fused_writes_models_that_load_with_plain_torch_and_no_normcli(cli, tmp_path):
    ckpt = save_state_dict("resnet_tiny", tmp_path)
    for suffix in (".pt2", ".ts"):
        fused = tmp_path / f"fused{suffix}"
        code, stdout, err = cli("fuse-export", ckpt, "--arch", f"{MODELS_PY}:resnet_tiny", "-o",
                                tmp_path / f"r{suffix}.onnx", "--input-shape", "2,3,32,32", "--dynamic-batch",
                                "--exporter", "torchscript", "--save-fused", fused, "--json")
        assert code == 0, err
        report = json.loads(stdout)
        assert report["save_fused"] == str(fused)
        assert report["save_fused_format"].startswith({".pt2": "pt2", ".ts": "torchscript"}[suffix])

    x = torch.randn(3, 3, 32, 32)  # another batch size than the export's
    np.save(tmp_path / "x.npy", x.numpy())
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_NORMCLI, str(tmp_path)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        want = copy.deepcopy(calibrated("resnet_tiny")).double()(x.double()).numpy()
    for name in ("pt2", "ts"):
        np.testing.assert_allclose(np.load(tmp_path / f"y_{name}.npy"), want, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_pt2_example_inputs_are_used_under_unsafe_load(cli, tmp_path):
    out = tmp_path / "from_pt2.onnx"
    code, stdout, err = cli("fuse-export", ROOT / "samples" / "resnet_tiny.pt2", "-o", out, "--unsafe-load",
                            "--exporter", "dynamo", "--samples", "1", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert ".pt2" in report["input_source"]
    program = torch.export.load(str(ROOT / "samples" / "resnet_tiny.pt2"))
    assert report["input_shapes"] == [list(t.shape) for t in program.example_inputs[0]]


@pytest.mark.parametrize("args, message", [
    (["--input-shape", "1,3,x"], "--input-shape"),
    (["--input-shape", "1,3,0,8"], "--input-shape"),
    (["--input-shape", "1,5,16,16"], "does not run on inputs of shapes 1,5,16,16"),
    (["--exporter", "onnxscript"], "--exporter"),
    (["--samples", "0"], "--samples"),
    (["--exporter", "dynamo", "--opset", "13"], "torchscript"),
    (["--atol", "nan"], "--atol and --rtol must be finite"),
    (["--input-shape", "100000,3,1000,1000"], "give smaller input shapes"),
])
def test_bad_invocations_exit_2_with_one_error_line_and_no_file(cli, tmp_path, args, message):
    ckpt = save_state_dict("small_cnn", tmp_path)
    out = tmp_path / "x.onnx"
    code, stdout, err = cli("fuse-export", ckpt, "--arch", f"{MODELS_PY}:small_cnn", "-o", out, *args)
    assert code == 2
    assert message in error_line(err)
    assert not out.exists() and not leftovers(tmp_path)


def test_cli_defaults_mirror_the_library():
    from normcli import fuse_export, parity
    from normcli.cli import fuse_export as command

    assert (command.DEFAULT_ATOL, command.DEFAULT_RTOL) == (parity.DEFAULT_ATOL, parity.DEFAULT_RTOL)
    assert command.DEFAULT_SAMPLES == fuse_export.DEFAULT_SAMPLES


def test_the_command_module_does_not_import_torch():
    code = "import sys, normcli.cli.fuse_export; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.mark.slow
def test_python_dash_m_subprocess_writes_a_file_and_keeps_stdout_json_only(tmp_path):
    ckpt = save_state_dict("mobilenetv2_tiny", tmp_path)
    out = tmp_path / "m.onnx"
    done = subprocess.run([sys.executable, "-m", "normcli", "fuse-export", str(ckpt), "--arch",
                           f"{MODELS_PY}:mobilenetv2_tiny", "-o", str(out), "--input-shape", "1,3,32,32",
                           "--dynamic-batch", "--json"],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(),
                          timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # the dynamo exporter's progress lines did not reach stdout
    assert report["parity"]["passed"] and "[torch.onnx]" not in done.stdout + done.stderr
    onnx_vs_float64_torch(out, calibrated("mobilenetv2_tiny"), (4, 3, 32, 32))

    done = subprocess.run([sys.executable, "-m", "normcli", "fuse-export", str(ckpt), "-o", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(),
                          timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("error:") and "Traceback" not in done.stderr


# --- never bless a broken model -------------------------------------------------------------------------------

UNHEALTHY = ROOT / "samples" / "unhealthy.pt"


def error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in stderr, stderr
    assert sum(line.startswith("error:") for line in lines) == 1
    return lines[-1]


def test_findings_stop_fuse_export_before_folding(tmp_path):
    out = tmp_path / "u.onnx"
    cmd = [sys.executable, "-m", "normcli", "fuse-export", str(UNHEALTHY), "--arch", f"{MODELS_PY}:unhealthy_net",
           "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and not out.exists() and not leftovers(tmp_path)
    line = error_line(proc.stderr)
    assert "bn_stale stale-stats, bn_nan non-finite, bn_negative_var negative-var" in line
    assert "--fail-on never" in line and "nothing was written" in line
    proc = subprocess.run(cmd + ["--json"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and not out.exists()
    doc = json.loads(proc.stdout)
    assert doc["output"] is None and doc["parity"] is None
    assert sorted(f["code"] for f in doc["findings"] if f["stops"]) == ["negative-var", "non-finite", "stale-stats"]


@pytest.mark.slow
def test_a_non_finite_reference_fails_parity_and_names_the_layers(tmp_path):
    out = tmp_path / "u.onnx"
    cmd = [sys.executable, "-m", "normcli", "fuse-export", str(UNHEALTHY), "--arch", f"{MODELS_PY}:unhealthy_net",
           "-o", str(out), "--fail-on", "never"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and not out.exists() and not leftovers(tmp_path)
    line = error_line(proc.stderr)
    assert "NaN/Inf" in line and "non-finite statistics: bn_nan" in line and "nothing was written" in line
    # the parity table's rows, without its header (whose columns depend on the width)
    rows = [row for row in proc.stdout.splitlines() if row.startswith("output ") and "max abs" not in row]
    assert len(rows) == 1 and "non-finite" in rows[0] and not rows[0].rstrip().endswith("ok")
    assert not any(row.rstrip().endswith(" ok") for row in proc.stdout.splitlines()), proc.stdout

    proc = subprocess.run(cmd + ["--json"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and not out.exists()
    doc = json.loads(proc.stdout)
    assert doc["parity"]["passed"] is False and doc["output"] is None
    assert doc["parity"]["outputs"][0]["problem"].startswith("non-finite")
    assert doc["fold_check"]["passed"] is False and doc["fold_check"]["problem"] == "non-finite"
    assert doc["nonfinite"] == {"norms": ["bn_nan"], "first": "bn_nan"}


# --- errors that are true --------------------------------------------------------------------------------------

@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_an_opset_the_installed_exporter_lacks_is_a_clean_usage_error(tmp_path, exporter):
    from normcli.export import supported_opsets

    low, high = supported_opsets(exporter)
    # what the installed packages say, independently of normcli
    if exporter == "torchscript":
        from torch.onnx import _constants

        assert (low, high) == (_constants.ONNX_MIN_OPSET, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    else:
        assert high == onnx.defs.onnx_opset_version() and low >= 18
    ckpt = save_state_dict("small_cnn", tmp_path)
    out = tmp_path / "x.onnx"
    for opset in (low - 1, high + 1):
        proc = subprocess.run([sys.executable, "-m", "normcli", "fuse-export", str(ckpt), "--arch",
                               f"{MODELS_PY}:small_cnn", "-o", str(out), "--exporter", exporter, "--opset",
                               str(opset)], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2 and not out.exists()
        assert proc.stderr.strip().splitlines() == [error_line(proc.stderr)]  # nothing else on stderr
        assert f"opset {opset}" in proc.stderr and f"writes opsets {low} to {high}" in proc.stderr


@pytest.mark.slow
def test_the_highest_opset_exports_without_log_noise(tmp_path):
    from normcli.export import supported_opsets

    _, high = supported_opsets("dynamo")
    ckpt = save_state_dict("small_cnn", tmp_path)
    out = tmp_path / "x.onnx"
    proc = subprocess.run([sys.executable, "-m", "normcli", "fuse-export", str(ckpt), "--arch",
                           f"{MODELS_PY}:small_cnn", "-o", str(out), "--opset", str(high), "--input-shape", "2,1,8,8"],
                          capture_output=True, text=True, cwd=ROOT,
                          # no COLUMNS: a piped table is then as wide as it needs, with no note on stderr
                          env={k: v for k, v in os.environ.items() if k != "COLUMNS"})
    assert proc.returncode == 0, proc.stderr
    # nothing but normcli's own stage lines: no exporter chatter
    assert all(STAGE_LINE.match(line) for line in proc.stderr.splitlines()) and out.exists(), proc.stderr
    assert onnx.load(str(out)).opset_import[0].version == high


def test_a_missing_input_is_reported_before_an_existing_output(cli, tmp_path):
    out = tmp_path / "exists.onnx"
    out.write_bytes(b"keep")
    code, _, err = cli("fuse-export", tmp_path / "missing.pt", "-o", out, "--arch", f"{MODELS_PY}:small_cnn")
    assert code == 2 and "missing.pt: no such file" in err and "--force" not in err
    assert out.read_bytes() == b"keep"


def test_more_samples_than_one_run_can_hold_is_a_usage_error_before_any_allocation(run_normcli, tmp_path):
    out = tmp_path / "r.onnx"
    done = run_normcli("fuse-export", ROOT / "samples" / "resnet_tiny.pt", "--arch", f"{MODELS_PY}:resnet_tiny",
                       "-o", out, "--input-shape", "1,3,32,32", "--samples", "100000000")
    assert done.returncode == 2 and not out.exists() and not list(tmp_path.iterdir())
    line = error_line(done.stderr)
    assert "100000000 samples of 3072 input elements" in line and "give fewer --samples" in line


# --- several inputs ----------------------------------------------------------------------------------------------

def two_input_checkpoint(folder: Path) -> Path:
    from samples.models import image_and_features

    model = image_and_features()
    g = torch.Generator().manual_seed(0)
    for bn in (model.bn_image, model.bn_features):
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64).float() * 0.5)
        bn.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64).float() + 0.5)
    path = folder / "two.pt"
    torch.save(model.state_dict(), path)
    return path


def test_two_inputs_one_shape_each(cli, tmp_path):
    ckpt = two_input_checkpoint(tmp_path)
    arch = f"{MODELS_PY}:image_and_features"
    out = tmp_path / "two.onnx"
    code, stdout, err = cli("fuse-export", ckpt, "--arch", arch, "-o", out, "--input-shape", "2,3,16,16",
                            "--input-shape", "2,6", "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["parity"]["passed"] and doc["input_shapes"] == [[2, 3, 16, 16], [2, 6]] and out.exists()
    assert [i.name for i in ort.InferenceSession(str(out)).get_inputs()] == ["image", "features"]
    # one shape for two inputs: say so, without asking for an option that was given
    code, _, err = cli("fuse-export", ckpt, "--arch", arch, "-o", tmp_path / "x.onnx", "--input-shape", "2,3,16,16")
    assert code == 2 and "1 --input-shape given" in err and "takes 2 positional inputs (image, features)" in err
    # no shape at all: the guess fits one input; the error names both
    code, _, err = cli("fuse-export", ckpt, "--arch", arch, "-o", tmp_path / "x.onnx")
    assert code == 2 and "(image, features): give one --input-shape per input" in err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
def test_more_shapes_are_more_configurations(cli, tmp_path):
    ckpt = save_state_dict("small_cnn", tmp_path)
    out = tmp_path / "x.onnx"
    args = ["fuse-export", ckpt, "--arch", f"{MODELS_PY}:small_cnn", "-o", out, "--samples", "1"]
    code, stdout, err = cli(*args, "--input-shape", "1,1,8,8", "--input-shape", "3,1,8,8", "--dynamic-batch",
                            "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    # the first configuration at two batch sizes (--dynamic-batch), and the second configuration
    assert doc["parity"]["samples"] == 3 and doc["parity"]["passed"]
    # a second resolution: the dims that differ are exported symbolic, and both resolutions are checked
    code, stdout, err = cli(*args, "--input-shape", "1,1,8,8", "--input-shape", "1,1,16,16", "--force", "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["dynamic_dims"] == [[2, 3]] and doc["checked_shapes"] == [[[1, 1, 8, 8]], [[1, 1, 16, 16]]]
