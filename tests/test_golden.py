"""Error metrics (normcli.metrics) and `normcli parity` against golden files, without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from normcli.metrics import compare_output

SAMPLE_ONNX = "samples/resnet_tiny.onnx"


# ------------------------------------------------------------------------------------------------ metrics

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rtol=st.sampled_from([0.0, 1e-3, 0.1]), atol=st.sampled_from([0.0, 1e-4, 0.5]))
@example(seed=524287, rtol=0.1, atol=0.0)  # (d - r) + r rounded one ulp below d: the figure did not pass
def test_required_tolerances_are_the_smallest_that_pass(seed, rtol, atol):
    """The reported tolerance passes when given back as it is printed in JSON (exactly), and anything
    smaller fails."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal(50) * rng.uniform(0.1, 10)
    b[rng.integers(0, 50, 3)] = 0.0  # zeros in the reference must not break either figure
    a = b + rng.standard_normal(50) * rng.choice([1e-6, 1e-3, 1e-1])
    m = compare_output("y", [a], [b], atol=0.0, rtol=rtol)
    assert compare_output("y", [a], [b], atol=m.required_atol, rtol=rtol).mismatched == 0
    if m.required_atol > 0:
        assert compare_output("y", [a], [b], atol=m.required_atol * (1 - 1e-6), rtol=rtol).mismatched > 0
    m = compare_output("y", [a], [b], atol=atol, rtol=0.0)
    if np.isfinite(m.required_rtol):
        assert compare_output("y", [a], [b], atol=atol, rtol=m.required_rtol).mismatched == 0
    if m.required_rtol > 0 and np.isfinite(m.required_rtol):
        assert compare_output("y", [a], [b], atol=atol, rtol=m.required_rtol * (1 - 1e-6)).mismatched > 0


def test_statistics_over_all_samples_against_plain_numpy():
    rng = np.random.default_rng(1)
    ref = [rng.standard_normal((2, 7)), rng.standard_normal((5, 7))]
    got = [r + rng.standard_normal(r.shape) * 1e-3 for r in ref]
    m = compare_output("y", got, ref, atol=1e-4, rtol=1e-3)
    diff = np.abs(np.concatenate([g.ravel() for g in got]) - np.concatenate([r.ravel() for r in ref]))
    flat_ref = np.concatenate([r.ravel() for r in ref])
    assert m.elements == 49
    assert m.max_abs == pytest.approx(diff.max()) and m.mean_abs == pytest.approx(diff.mean())
    assert m.median_abs == pytest.approx(np.median(diff)) and m.p99_abs == pytest.approx(np.quantile(diff, 0.99))
    assert m.max_rel == pytest.approx((diff / np.abs(flat_ref)).max())
    flat_got = np.concatenate([g.ravel() for g in got])
    assert m.cosine == pytest.approx(flat_got @ flat_ref / np.linalg.norm(flat_got) / np.linalg.norm(flat_ref))
    assert m.mismatched == int((diff > 1e-4 + 1e-3 * np.abs(flat_ref)).sum()) > 0 and not m.passed


def test_top1_and_top5_agreement_count_rows_whose_classes_change():
    ref = np.tile(np.arange(10, dtype=np.float64), (4, 1))        # class 9 first, then 8, 7, ...
    got = ref.copy()
    got[0, [9, 8]] = got[0, [8, 9]]                                # row 0: top-1 changes, top-5 set stays
    got[1, [5, 4]] = got[1, [4, 5]]                                # row 1: the 5th class changes
    m = compare_output("logits", [got], [ref], atol=1e-4, rtol=1e-3)
    assert m.top1_agreement == pytest.approx(0.75)
    assert m.top5_agreement == pytest.approx(0.75)
    assert compare_output("y", [got[:, :4]], [ref[:, :4]], atol=0, rtol=0).top5_agreement is None
    assert compare_output("y", [got[:, :, None]], [ref[:, :, None]], atol=0, rtol=0).top1_agreement is None


def test_check_error_stat_follows_polygraphy_both_statistics_must_exceed():
    ref = np.ones(100)
    got = ref.copy()
    got[0] = 2.0  # one outlier: max abs 1, median abs 0
    assert not compare_output("y", [got], [ref], atol=1e-3, rtol=1e-3).passed
    assert not compare_output("y", [got], [ref], atol=1e-3, rtol=1e-3, check_stat="max").passed
    assert compare_output("y", [got], [ref], atol=1e-3, rtol=1e-3, check_stat="median").passed
    assert not compare_output("y", [got], [ref], atol=1e-3, rtol=1e-3, check_stat="mean").passed  # mean 0.01
    assert compare_output("y", [got], [ref], atol=0.02, rtol=0, check_stat="mean").passed
    assert compare_output("y", [got], [ref], atol=1e-3, rtol=1e-3, check_stat="quantile", quantile=0.98).passed
    assert not compare_output("y", [got], [ref], atol=1e-3, rtol=1e-3, check_stat="quantile", quantile=1.0).passed


def test_a_non_finite_reference_never_passes_and_nan_is_never_ok():
    ref = np.array([1.0, np.nan, 3.0])
    m = compare_output("y", [ref.copy()], [ref], atol=1.0, rtol=1.0)
    assert m.problem.startswith("non-finite") and m.nonfinite_reference == 1 and not m.passed
    got = np.array([1.0, np.nan, 3.0])
    m = compare_output("y", [got], [np.array([1.0, 2.0, 3.0])], atol=1.0, rtol=1.0)
    assert m.mismatched == 1 and not m.passed and np.isnan(m.cosine)


def test_shape_mismatch_is_a_problem_not_a_crash():
    m = compare_output("y", [np.zeros((2, 3))], [np.zeros((3, 2))], atol=1, rtol=1)
    assert not m.passed and "shape" in m.problem


# ---------------------------------------------------------------------------------------- normcli parity

@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """Inputs at two shapes (the sample ONNX has a fixed batch of 2) and onnxruntime's own outputs."""
    import onnxruntime as ort

    out = tmp_path_factory.mktemp("golden")
    session = ort.InferenceSession(SAMPLE_ONNX, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((2, 3, 32, 32)).astype(np.float32) for _ in range(2)]
    ys = [session.run(None, {"input": x})[0] for x in xs]
    np.savez(out / "inputs.npz", **{f"input:{i}": x for i, x in enumerate(xs)})
    np.savez(out / "expected.npz", **{f"logits:{i}": y for i, y in enumerate(ys)})
    np.savez(out / "off.npz", **{f"logits:{i}": y + 0.01 for i, y in enumerate(ys)})
    np.savez(out / "wrong_name.npz", output=ys[0])
    np.savez(out / "objects.npz", **{"logits": np.array([{"a": 1}], dtype=object)})
    return out


def test_parity_passes_on_onnxruntimes_own_outputs_and_reports_json(run_normcli, golden):
    done = run_normcli("parity", SAMPLE_ONNX, "--inputs", golden / "inputs.npz", "--expected",
                       golden / "expected.npz", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] is True and report["samples"] == 2 and report["provider"] == "CPUExecutionProvider"
    (out,) = report["outputs"]
    assert out["name"] == "logits" and out["max_abs"] == 0 and out["top1_agreement"] == 1.0


def test_parity_fails_with_exit_1_and_names_the_output(run_normcli, golden):
    done = run_normcli("parity", SAMPLE_ONNX, "--inputs", golden / "inputs.npz", "--expected", golden / "off.npz")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: parity failed on logits")
    assert "FAIL" in done.stdout and "need atol" in done.stdout
    # the same difference passes a tolerance the report said would pass
    done = run_normcli("parity", SAMPLE_ONNX, "--inputs", golden / "inputs.npz", "--expected", golden / "off.npz",
                       "--atol", "0.011")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("expected, message", [
    ("wrong_name.npz", "names no output of the model"),
    ("objects.npz", "Python objects"),
    ("missing.npz", "no such file"),
])
def test_bad_golden_files_exit_2_with_one_line(run_normcli, golden, expected, message):
    done = run_normcli("parity", SAMPLE_ONNX, "--inputs", golden / "inputs.npz", "--expected", golden / expected)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_unknown_provider_and_bad_stat_exit_2(run_normcli, golden):
    args = ["parity", SAMPLE_ONNX, "--inputs", golden / "inputs.npz", "--expected", golden / "expected.npz"]
    done = run_normcli(*args, "--provider", "nosuch")
    assert done.returncode == 2 and "available here: " in done.stderr and "CPUExecutionProvider" in done.stderr
    done = run_normcli(*args, "--check-error-stat", "p50")
    assert done.returncode == 2 and "--check-error-stat must be one of" in done.stderr


def test_parity_imports_no_torch(golden):
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['normcli', 'parity', {SAMPLE_ONNX!r}, '--inputs', {str(golden / 'inputs.npz')!r},"
        f" '--expected', {str(golden / 'expected.npz')!r}]\n"
        "try:\n    runpy.run_module('normcli', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "print('torch' in sys.modules, code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip().splitlines()[-1] == "False 0", done.stderr
