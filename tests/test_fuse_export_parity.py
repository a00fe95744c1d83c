"""fuse-export's parity report through the installed `normcli`: per-output metrics, the first diverging layer,
golden files checked by `normcli parity`, real input files, float16, execution providers.

The figures the report gives are checked against the test's own onnxruntime session and numpy, not against
normcli's own arithmetic.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from parity_models import batch_scaled, wrong_at_culprit  # noqa: E402
from test_cli_fuse_export import calibrated  # noqa: E402

HERE = Path(__file__).resolve().parent
PARITY_MODELS = HERE / "parity_models.py"
RESNET = "samples/models.py:resnet_tiny"


@pytest.fixture(scope="module")
def resnet_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "resnet.pt"
    torch.save(calibrated("resnet_tiny").state_dict(), path)
    return path


def seeded_state(factory, path: Path) -> Path:
    torch.manual_seed(0)
    model = factory()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # statistics away from the 0/1 defaults, so the fold changes the weights
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    torch.save(model.state_dict(), path)
    return path


def report_of(done) -> dict:
    assert done.stdout.strip(), done.stderr
    return json.loads(done.stdout)


# ------------------------------------------------------------------------------------- first divergence

@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_an_export_wrong_at_a_known_layer_names_that_layer(run_normcli, tmp_path, exporter):
    ckpt = seeded_state(wrong_at_culprit, tmp_path / "wrong.pt")
    out = tmp_path / "wrong.onnx"
    done = run_normcli("fuse-export", ckpt, "--arch", f"{PARITY_MODELS}:wrong_at_culprit", "--input-shape",
                       "2,3,16,16", "-o", out, "--exporter", exporter, "--json")
    assert done.returncode == 1
    # the one error line names the culprit, and nothing was written
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]  # progress lines may precede it
    assert done.stderr.strip().splitlines()[-1] == line
    assert line.startswith("error: parity failed") and "it starts at module culprit" in line
    assert not out.exists()
    parity = report_of(done)["parity"]
    assert parity["intermediates_reason"] == "parity failed"  # automatic: no --compare-intermediates given
    assert parity["first_divergence"]["module"] == "culprit"
    assert parity["first_divergence"]["max_abs"] == pytest.approx(0.5, abs=1e-3)  # the +0.5 put in on purpose
    order = [m["module"] for m in parity["intermediates"]]
    at = order.index("culprit")
    assert {"conv1", "conv2"} <= set(order[:at])  # the folded convs before it were matched and agree
    assert all(m["passed"] for m in parity["intermediates"][:at])


@pytest.mark.slow
def test_compare_intermediates_on_a_faithful_export_finds_no_divergence(run_normcli, resnet_ckpt, tmp_path):
    done = run_normcli("fuse-export", resnet_ckpt, "--arch", RESNET, "--input-shape", "2,3,32,32", "-o",
                       tmp_path / "r.onnx", "--compare-intermediates", "--provider", "cpu", "--json")
    assert done.returncode == 0, done.stderr
    parity = report_of(done)["parity"]
    assert parity["provider"] == "CPUExecutionProvider"
    assert parity["passed"] and parity["first_divergence"] is None
    assert parity["intermediates_reason"] == "--compare-intermediates"
    matched = {m["module"] for m in parity["intermediates"]}
    assert {"conv1", "layer1.0.conv1", "layer3.0.downsample.0", "fc"} <= matched
    assert all(m["passed"] for m in parity["intermediates"])
    # without the option and with parity passing, nothing is compared; the table says which provider ran
    done = run_normcli("fuse-export", resnet_ckpt, "--arch", RESNET, "--input-shape", "2,3,32,32", "-o",
                       tmp_path / "r2.onnx")
    assert done.returncode == 0 and "intermediate values" not in done.stdout
    assert "parity in onnxruntime (CPUExecutionProvider)" in done.stdout and "need atol" in done.stdout


@pytest.mark.slow
def test_a_dynamic_batch_export_wrong_at_another_batch_size_exits_1(run_normcli, tmp_path):
    """The TorchScript trace bakes the example's batch size into the graph; parity at the second batch size
    catches it, and the intermediates name the module that read the batch size."""
    ckpt = seeded_state(batch_scaled, tmp_path / "bs.pt")
    done = run_normcli("fuse-export", ckpt, "--arch", f"{PARITY_MODELS}:batch_scaled", "--input-shape", "2,3,8,8",
                       "--dynamic-batch", "--exporter", "torchscript", "-o", tmp_path / "bs.onnx", "--json")
    assert done.returncode == 1, done.stderr
    parity = report_of(done)["parity"]
    assert not parity["passed"] and parity["first_divergence"]["module"] == "scale"
    assert not (tmp_path / "bs.onnx").exists()
    # torch.export specialises on the batch size instead: an ONNX file with a fixed batch is refused, saying so
    done = run_normcli("fuse-export", ckpt, "--arch", f"{PARITY_MODELS}:batch_scaled", "--input-shape", "2,3,8,8",
                       "--dynamic-batch", "--exporter", "dynamo", "-o", tmp_path / "bs.onnx")
    assert done.returncode == 2 and "the dynamo exporter fixed dims 0 of input 0" in done.stderr
    assert not (tmp_path / "bs.onnx").exists()


# ----------------------------------------------------------------------- metrics, golden files, normcli parity

@pytest.mark.slow
def test_metrics_and_golden_files_agree_with_an_independent_onnxruntime_run(run_normcli, resnet_ckpt, tmp_path):
    out, inputs, expected = tmp_path / "r.onnx", tmp_path / "in.npz", tmp_path / "out.npz"
    done = run_normcli("fuse-export", resnet_ckpt, "--arch", RESNET, "--input-shape", "2,3,32,32", "-o", out,
                       "--save-inputs", inputs, "--save-outputs", expected, "--samples", "2", "--json")
    assert done.returncode == 0, done.stderr
    parity = report_of(done)["parity"]
    assert parity["saved_inputs"] == str(inputs) and parity["saved_outputs"] == str(expected)
    (entry,) = parity["outputs"]

    # the golden files hold every sample under the ONNX names, and the figures follow from them
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x, y = np.load(inputs), np.load(expected)
    in_name, out_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    assert sorted(x.files) == [f"{in_name}:0", f"{in_name}:1"] and sorted(y.files) == [f"{out_name}:0", f"{out_name}:1"]
    got = np.concatenate([session.run(None, {in_name: x[f"{in_name}:{i}"]})[0].ravel() for i in range(2)])
    want = np.concatenate([y[f"{out_name}:{i}"].ravel() for i in range(2)]).astype(np.float64)
    diff = np.abs(got.astype(np.float64) - want)
    assert entry["max_abs"] == pytest.approx(diff.max(), rel=1e-6, abs=1e-12)
    assert entry["median_abs"] == pytest.approx(np.median(diff), rel=1e-6, abs=1e-12)
    assert entry["elements"] == want.size and entry["mismatched"] == 0
    assert entry["cosine"] > 0.999999 and entry["top1_agreement"] == 1.0 and entry["top5_agreement"] == 1.0
    assert entry["required_atol"] <= parity["atol"]

    # the deployment check without torch: the same file passes, a tampered one fails with exit 1
    done = run_normcli("parity", out, "--inputs", inputs, "--expected", expected, "--json")
    assert done.returncode == 0, done.stderr
    assert report_of(done)["outputs"][0]["max_abs"] == pytest.approx(entry["max_abs"], rel=1e-6, abs=1e-12)
    np.savez(tmp_path / "off.npz", **{k: y[k] + 0.05 for k in y.files})
    done = run_normcli("parity", out, "--inputs", inputs, "--expected", tmp_path / "off.npz")
    assert done.returncode == 1 and "parity failed" in done.stderr


@pytest.mark.slow
def test_check_error_stat_chooses_what_must_be_within_tolerance(cli, tmp_path):
    """The same wrong export: with atol between the median and the max error, the median check passes and the
    max check fails (rtol 0: the relative statistic always exceeds it, so the absolute one decides)."""
    ckpt = seeded_state(wrong_at_culprit, tmp_path / "wrong.pt")
    base = ["fuse-export", ckpt, "--arch", f"{PARITY_MODELS}:wrong_at_culprit", "--input-shape", "4,3,16,16",
            "--json", "--force"]
    code, out, _ = cli(*base, "-o", tmp_path / "a.onnx")
    first = json.loads(out)["parity"]
    (entry,) = first["outputs"]
    assert code == 1 and entry["median_abs"] < entry["max_abs"]
    atol = (entry["median_abs"] + entry["max_abs"]) / 2
    tol = ["--atol", repr(atol), "--rtol", "0"]
    code, out, err = cli(*base, "-o", tmp_path / "m.onnx", *tol, "--check-error-stat", "median")
    assert code == 0, err
    assert json.loads(out)["parity"]["check_error_stat"] == "median" and (tmp_path / "m.onnx").exists()
    code, out, err = cli(*base, "-o", tmp_path / "x.onnx", *tol, "--check-error-stat", "max")
    assert code == 1 and "(max error)" in err and not (tmp_path / "x.onnx").exists()
    code, out, err = cli(*base, "-o", tmp_path / "q.onnx", *tol, "--check-error-stat", "quantile",
                         "--error-quantile", "0.1")
    assert code == 0 and json.loads(out)["parity"]["error_quantile"] == 0.1
    # the tolerance the report said would pass does pass, element by element
    code, _, err = cli(*base, "-o", tmp_path / "e.onnx", "--atol", repr(entry["required_atol"]), "--rtol",
                       repr(first["rtol"]))
    assert code == 0, err


def test_bad_stat_quantile_precision_and_provider_exit_2_before_loading(run_normcli, tmp_path):
    base = ["fuse-export", "samples/resnet_tiny.pt", "--arch", RESNET, "-o", tmp_path / "r.onnx"]
    for args, message in ((["--check-error-stat", "p50"], "--check-error-stat must be one of"),
                          (["--error-quantile", "1.5"], "--error-quantile must be between 0 and 1"),
                          (["--precision", "int8"], "--precision must be one of"),
                          (["--provider", "nosuch"], "available here: ")):
        done = run_normcli(*base, *args)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert "CPUExecutionProvider" in done.stderr  # the providers installed here are listed
    assert not (tmp_path / "r.onnx").exists()


# ------------------------------------------------------------------------------------------ real inputs

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["npz", "png"])  # .pt and .safetensors: tests/test_parity.py, same reader
def test_input_files_are_what_parity_runs_on(run_normcli, resnet_ckpt, tmp_path, kind):
    rng = np.random.default_rng(3)
    if kind == "png":
        from PIL import Image

        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "x.png")
        data = (pixels.transpose(2, 0, 1)[None] / 255.0).astype(np.float32)
        source = tmp_path / "x.png"
    else:
        data = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
        source = tmp_path / f"x.{kind}"
        if kind == "npz":
            np.savez(source, image=data)
        elif kind == "pt":
            torch.save({"image": torch.from_numpy(data)}, source)
        else:
            from safetensors.numpy import save_file

            save_file({"image": data}, str(source))
    saved = tmp_path / "in.npz"
    done = run_normcli("fuse-export", resnet_ckpt, "--arch", RESNET, "--input", source, "-o", tmp_path / "r.onnx",
                       "--save-inputs", saved, "--json")
    assert done.returncode == 0, done.stderr
    report = report_of(done)
    assert report["input_source"] == "--input" and report["input_shapes"] == [list(data.shape)]
    (stored,) = np.load(saved).values()
    np.testing.assert_allclose(stored, data, rtol=0, atol=1e-7)  # parity ran on the file's own values


# ---------------------------------------------------------------------------------------------- float16

@pytest.mark.slow
def test_fp16_export_is_half_precision_and_judged_against_float32(run_normcli, resnet_ckpt, tmp_path):
    out = tmp_path / "r16.onnx"
    done = run_normcli("fuse-export", resnet_ckpt, "--arch", RESNET, "--input-shape", "2,3,32,32", "-o", out,
                       "--precision", "fp16", "--json")
    assert done.returncode == 0, done.stderr
    report = report_of(done)
    parity = report["parity"]
    assert parity["precision"] == "fp16" and parity["atol"] == parity["rtol"] == 16 * 2.0 ** -10
    assert "float16" in report["reference"] and "0.000976562" in report["reference"]
    graph = onnx.load(str(out)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    # the layers that lose the most precision are named, from the model's own modules
    losses = parity["precision_losses"]
    modules = {name for name, _ in calibrated("resnet_tiny").named_modules()}
    assert losses and all(m["module"] in modules and m["added_rel_rms"] > 0 for m in losses)
    assert [m["added_rel_rms"] for m in losses] == sorted((m["added_rel_rms"] for m in losses), reverse=True)

    # the test's own check: the float16 ONNX against the float32 model in float64, within the stated tolerance
    model = calibrated("resnet_tiny").double()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9)).half()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x.double()).numpy()
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float64), want, atol=parity["atol"], rtol=parity["rtol"])
    # and it does differ from float32 arithmetic: float16 is really what ran
    assert np.abs(got.astype(np.float64) - want).max() > 1e-5


@pytest.mark.slow
def test_fp16_overflow_blocks_a_half_precision_export_unless_fail_on_never(run_normcli, tmp_path):
    torch.manual_seed(0)
    model = batch_scaled()
    with torch.no_grad():  # trained statistics, and one channel whose folded scale is 1e5 > float16's 65504
        model.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        model.bn.running_var.copy_(torch.tensor([1.5, 1.0, 0.7, 2.0]))
        model.bn.num_batches_tracked.fill_(100)
        model.bn.weight[1] = 1e5
    ckpt = tmp_path / "over.pt"
    torch.save(model.state_dict(), ckpt)
    base = ["fuse-export", ckpt, "--arch", f"{PARITY_MODELS}:batch_scaled", "--input-shape", "2,3,8,8", "--force"]
    # in float32 the same checkpoint exports (the finding is a warning)
    assert run_normcli(*base, "-o", tmp_path / "fp32.onnx").returncode == 0
    done = run_normcli(*base, "-o", tmp_path / "fp16.onnx", "--precision", "fp16")
    assert done.returncode == 1 and "bn fp16-overflow" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "fp16.onnx").exists()
    # going on anyway: the float16 export overflows, parity fails and names the folded conv as the first culprit
    done = run_normcli(*base, "-o", tmp_path / "fp16.onnx", "--precision", "fp16", "--fail-on", "never", "--json")
    assert done.returncode == 1
    parity = report_of(done)["parity"]
    assert parity["first_divergence"]["module"] == "conv" and parity["outputs"][0]["max_abs"] == "inf"
    assert "Warning" not in done.stderr


# ------------------------------------------------------------------------------------------ several shapes

@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_several_shapes_are_each_checked_and_the_dims_that_differ_are_symbolic(run_normcli, resnet_ckpt, tmp_path,
                                                                             exporter):
    out = tmp_path / "multi.onnx"
    done = run_normcli("fuse-export", resnet_ckpt, "--arch", RESNET, "--input-shape", "1,3,32,32", "--input-shape",
                       "7,3,48,48", "-o", out, "--exporter", exporter, "--samples", "2", "--json")
    assert done.returncode == 0, done.stderr
    report = report_of(done)
    assert report["checked_shapes"] == [[[1, 3, 32, 32]], [[7, 3, 48, 48]]]
    assert report["dynamic_dims"] == [[0, 2, 3]] and report["parity"]["samples"] == 4
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.HasField("dim_value") for d in dims] == [False, True, False, False]  # channels stay fixed
    # the test's own run: both shapes and one parity never saw, against the model in float64
    model = calibrated("resnet_tiny").double()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for shape in ((1, 3, 32, 32), (7, 3, 48, 48), (3, 3, 40, 40)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            want = model(x.double()).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_shapes_of_different_rank_for_one_input_exit_2(run_normcli, tmp_path):
    done = run_normcli("fuse-export", "samples/resnet_tiny.pt", "--arch", RESNET, "--input-shape", "1,3,32,32",
                       "--input-shape", "1,3,32", "-o", tmp_path / "r.onnx")
    assert done.returncode == 2 and "same rank" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r.onnx").exists()


def test_the_command_line_mirrors_of_library_constants_agree():
    """--help shows these without importing numpy or torch; they must say what the library does."""
    from normcli import metrics, parity_diagnostics
    from normcli.cli import common
    from normcli.cli import fuse_export as command

    # fuse-export and parity share these options (normcli.cli.common)
    assert common.DEFAULT_QUANTILE == metrics.DEFAULT_QUANTILE
    assert tuple(common.CHECK_STATS) == metrics.CHECK_STATS
    assert tuple(command.PRECISIONS) == parity_diagnostics.PRECISIONS
