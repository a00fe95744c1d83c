"""check_parity against real onnxruntime sessions; the tolerance rule against numpy.isclose."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from normcli.errors import NormcliError
from normcli.export import export_onnx
from normcli.inputs import make_inputs
from normcli.data import read_input_tensors
from normcli.parity import check_parity, mismatch_mask

INF, NAN = float("inf"), float("nan")


# --- the tolerance rule, on plain arrays -------------------------------------------------------------

def test_rule_matches_numpy_isclose_on_the_edge_cases():
    atol, rtol = 0.25, 0.5  # powers of two: the boundary atol + rtol*|b| is exact in binary
    reference = np.array([1.0, 1.0, 1.0, -2.0, NAN, NAN, 1.0, INF, INF, -INF, 1e308, 0.0, 0.0])
    actual = np.array([1.75, 1.7500001, 0.25, -3.25, NAN, 1.0, NAN, INF, -INF, -INF, INF, 0.25, -0.2500001])
    #                  on the boundary | just over | boundary below | |b|=2: bound 1.25 | nan/nan | nan vs 1 ...
    want_fail = ~np.isclose(actual, reference, atol=atol, rtol=rtol, equal_nan=True)
    got_fail = mismatch_mask(actual, reference, atol, rtol)
    np.testing.assert_array_equal(got_fail, want_fail)
    # and the cases spelled out, so that a change in numpy cannot silently move the goalposts
    np.testing.assert_array_equal(got_fail, [False, True, False, False, False, True, True, False, True,
                                             False, True, False, True])


def test_rule_is_not_symmetric_the_torch_output_is_the_reference():
    # |a-b| = 1; bound with b=10 is 0 + 0.1*10 = 1 (passes), with b=9 it is 0.9 (fails)
    assert not mismatch_mask(np.array([9.0]), np.array([10.0]), 0.0, 0.1)[0]
    assert mismatch_mask(np.array([10.0]), np.array([9.0]), 0.0, 0.1)[0]


finite_or_special = st.one_of(st.floats(-1e6, 1e6), st.sampled_from([NAN, INF, -INF, 0.0, 1e-4, -1e-3]))


@settings(max_examples=200, deadline=None)
@given(pairs=hnp.arrays(np.float64, st.integers(1, 30), elements=finite_or_special).flatmap(
           lambda a: st.tuples(st.just(a), hnp.arrays(np.float64, a.shape, elements=finite_or_special))),
       atol=st.sampled_from([0.0, 1e-6, 1e-4, 0.5]), rtol=st.sampled_from([0.0, 1e-5, 1e-3, 0.25]))
def test_rule_matches_numpy_isclose_on_random_arrays(pairs, atol, rtol):
    actual, reference = pairs
    want = ~np.isclose(actual, reference, atol=atol, rtol=rtol, equal_nan=True)
    np.testing.assert_array_equal(mismatch_mask(actual, reference, atol, rtol), want)


# --- check_parity with real exports ----------------------------------------------------------------

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        features = torch.relu(self.bn(self.conv(x)))
        return self.fc(features.mean(dim=(2, 3))), features


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 2)

    def forward(self, a, b):
        return {"logits": self.fc(a) * b}


class Sqrt(nn.Module):
    def forward(self, x):
        return torch.sqrt(x)


@pytest.fixture(scope="module")
def block_files(tmp_path_factory):
    torch.manual_seed(0)
    model = Block().eval()
    folder = tmp_path_factory.mktemp("parity")
    files = {}
    for exporter in ("dynamo", "torchscript"):
        files[exporter] = folder / f"block-{exporter}.onnx"
        export_onnx(model, (torch.randn(2, 3, 6, 6),), files[exporter], exporter=exporter, dynamic_batch=True)
    return model, files


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_an_honest_export_passes_on_two_batch_sizes(block_files, exporter):
    model, files = block_files
    inputs = make_inputs([(2, 3, 6, 6)], samples=2) + make_inputs([(5, 3, 6, 6)], samples=1, seed=1)
    result = check_parity(model, files[exporter], inputs)
    assert result.passed
    assert (result.samples, result.atol, result.rtol) == (3, 1e-4, 1e-3)
    assert [o.name for o in result.outputs] == ["output_0", "output_1"]
    assert [o.elements for o in result.outputs] == [(2 + 2 + 5) * 3, (2 + 2 + 5) * 4 * 6 * 6]
    assert all(o.mismatched == 0 and o.max_abs < 1e-4 for o in result.outputs)


def test_a_changed_model_fails_on_exactly_the_changed_output_and_channel(block_files):
    model, files = block_files
    changed = copy.deepcopy(model)
    delta = 0.5
    with torch.no_grad():
        changed.fc.bias[1] += delta  # only output 0, channel 1 moves, by exactly delta

    inputs = make_inputs([(3, 3, 6, 6)], samples=2)
    result = check_parity(changed, files["dynamo"], inputs)

    logits, features = result.outputs
    assert not result.passed
    assert features.mismatched == 0
    assert logits.mismatched == 2 * 3  # one element per row, every sample
    assert logits.max_abs == pytest.approx(delta, abs=1e-5)
    assert logits.mean_abs == pytest.approx(delta / 3, abs=1e-5)  # 1 channel of 3 is off


def test_error_figures_match_float64_numpy(block_files):
    model, files = block_files
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.fc.weight.mul_(1.01)
    inputs = make_inputs([(2, 3, 6, 6)], samples=3, seed=7)

    result = check_parity(changed, files["torchscript"], inputs, atol=1e-3, rtol=1e-2)

    import onnxruntime as ort
    session = ort.InferenceSession(str(files["torchscript"]), providers=["CPUExecutionProvider"])
    a = np.concatenate([session.run(None, {"x": s[0].numpy()})[0] for s in inputs]).astype(np.float64)
    with torch.no_grad():
        b = torch.cat([changed(*s)[0] for s in inputs]).double().numpy()
    err = np.abs(a - b)
    logits = result.outputs[0]
    assert logits.max_abs == pytest.approx(err.max(), rel=1e-9)
    assert logits.mean_abs == pytest.approx(err.mean(), rel=1e-9)
    assert logits.max_rel == pytest.approx((err / np.abs(b)).max(), rel=1e-9)
    assert logits.mismatched == int((err > 1e-3 + 1e-2 * np.abs(b)).sum())


def test_multi_input_dict_output_model(tmp_path):
    model = TwoInputs().eval()
    path = tmp_path / "two.onnx"
    export_onnx(model, (torch.randn(4, 5), torch.randn(4, 2)), path, exporter="dynamo")
    result = check_parity(model, path, make_inputs([(4, 5), (4, 2)], samples=2))
    assert result.passed and [o.name for o in result.outputs] == ["logits"]

    with pytest.raises(NormcliError, match="takes 2 inputs"):
        check_parity(model, path, [(torch.randn(4, 5),)])


def test_nan_agrees_with_nan_but_a_nonfinite_reference_fails_and_nan_against_a_number_fails(tmp_path):
    path = tmp_path / "sqrt.onnx"
    inputs = [(torch.tensor([[-1.0, 4.0, 9.0, -2.0]]),)]  # negative entries give NaN on both sides
    export_onnx(Sqrt().eval(), inputs[0], path, exporter="torchscript")

    same = check_parity(Sqrt().eval(), path, inputs)
    # the elements agree, NaN with NaN, but a reference holding NaN proves nothing: the check fails
    assert same.outputs[0].mismatched == 0 and same.outputs[0].max_abs == 0.0
    assert not same.passed and same.outputs[0].problem.startswith("non-finite")
    assert same.outputs[0].nonfinite_reference == 2

    finite = [(torch.tensor([[1.0, 4.0, 9.0, 2.0]]),)]
    assert check_parity(Sqrt().eval(), path, finite).passed

    class SqrtOfAbs(nn.Module):
        def forward(self, x):
            return torch.sqrt(x.abs())

    differs = check_parity(SqrtOfAbs().eval(), path, inputs)
    assert not differs.passed
    assert differs.outputs[0].mismatched == 2
    assert np.isnan(differs.outputs[0].max_abs)  # the report shows that a NaN was involved


def test_a_file_onnxruntime_cannot_load_is_a_normcli_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(NormcliError, match="onnxruntime cannot load"):
        check_parity(Sqrt(), bad, [(torch.ones(1),)])


# --- inputs ----------------------------------------------------------------------------------------

def test_make_inputs_is_seeded_standard_normal():
    first = make_inputs([(64, 3, 8, 8), (64, 10)], samples=2, seed=3)
    again = make_inputs([(64, 3, 8, 8), (64, 10)], samples=2, seed=3)
    other = make_inputs([(64, 3, 8, 8), (64, 10)], samples=2, seed=4)
    assert len(first) == 2 and all(len(s) == 2 for s in first)
    assert first[0][0].shape == (64, 3, 8, 8) and first[0][1].shape == (64, 10)
    assert first[0][0].dtype == torch.float32
    for s, t in zip(first, again):
        assert all(torch.equal(x, y) for x, y in zip(s, t))
    assert not torch.equal(first[0][0], other[0][0])
    assert not torch.equal(first[0][0], first[1][0])  # samples differ from each other
    values = torch.cat([s[0].flatten() for s in first]).double()
    assert abs(values.mean().item()) < 0.05 and abs(values.std().item() - 1.0) < 0.05
    assert make_inputs([(2, 2)], samples=1, dtype=torch.float64)[0][0].dtype == torch.float64


def test_make_inputs_refuses_empty_shapes_and_no_samples():
    with pytest.raises(NormcliError, match="below 1"):
        make_inputs([(1, 0, 4)], samples=1)
    with pytest.raises(NormcliError, match="at least 1"):
        make_inputs([(1, 4)], samples=0)


def test_input_files_read_npy_npz_pt_safetensors_and_images_whatever_the_extension(tmp_path):
    """fuse-export --input reads through recalibrate's data readers (normcli.data): one module for both."""
    from PIL import Image
    from safetensors.numpy import save_file

    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    other = np.ones((2, 5), dtype=np.float32)
    np.save(tmp_path / "x.npy", array)
    (tmp_path / "x.npy").rename(tmp_path / "npy_named.pt")
    torch.save(torch.from_numpy(array), tmp_path / "zip.pt")
    torch.save(torch.from_numpy(array), tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    # same dtype, names in sorted order: safetensors stores its tensors sorted by alignment, then name
    np.savez(tmp_path / "two.npz", x0=array, x1=other)
    torch.save({"x0": torch.from_numpy(array), "x1": torch.from_numpy(other)}, tmp_path / "two.pt")
    save_file({"x0": array, "x1": other}, str(tmp_path / "two.safetensors"))

    for name in ("npy_named.pt", "zip.pt", "legacy.bin"):
        (loaded,) = read_input_tensors(tmp_path / name)
        assert isinstance(loaded, torch.Tensor)
        np.testing.assert_array_equal(loaded.numpy(), array)
    for name in ("two.npz", "two.pt", "two.safetensors"):
        image, features = read_input_tensors(tmp_path / name)  # each array one positional input, in order
        np.testing.assert_array_equal(image.numpy(), array)
        np.testing.assert_array_equal(features.numpy(), other)

    pixels = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    (image,) = read_input_tensors(tmp_path / "photo.png")
    assert image.shape == (1, 3, 6, 5) and image.dtype == torch.float32
    np.testing.assert_allclose(image[0].permute(1, 2, 0).numpy(), pixels / 255.0, rtol=0, atol=1e-7)


def test_input_files_never_run_torch_load(tmp_path, monkeypatch):
    """An input file is as untrusted as a checkpoint: it is read by the checked reader, never torch.load."""
    g = torch.Generator().manual_seed(0)
    tensor = torch.randn(2, 3, 5, generator=g, dtype=torch.float64).float()[:, 1:]  # a view, strides kept
    torch.save(tensor, tmp_path / "zip.pt")
    torch.save(tensor, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")

    def entered(*args, **kwargs):
        raise AssertionError("torch.load was entered")

    monkeypatch.setattr(torch, "load", entered)
    monkeypatch.setattr(torch.serialization, "load", entered)
    from normcli.data import read_input_tensors

    for name in ("zip.pt", "legacy.pt"):
        (loaded,) = read_input_tensors(tmp_path / name)
        assert loaded.dtype == tensor.dtype and torch.equal(loaded, tensor)
    with pytest.raises(NormcliError, match="does not hold a tensor"):
        read_input_tensors(tmp_path / "module.pt")


class _Payload:
    def __reduce__(self):
        import os
        return (os.mkdir, (str(_Payload.target),))


@pytest.mark.parametrize("content, message", [
    ("object_npy", "cannot read data file"),
    ("object_npz", "Python objects"),
    ("code_pt", "not a .npy, .npz, .pt"),
    ("text", "not a .npy, .npz, .pt"),
    ("missing", "no such file"),
    ("string_npy", "numeric"),
    ("bomb_npz", "declares .* bytes"),
])
def test_input_files_refuse_bad_files_without_running_their_code(tmp_path, content, message):
    path = tmp_path / "input.bin"
    _Payload.target = tmp_path / "payload-ran"
    if content == "object_npy":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        path = path.with_suffix(".bin.npy")
    elif content == "object_npz":
        np.savez(path, x=np.array([{"a": 1}], dtype=object))
        path = path.with_suffix(".bin.npz")
    elif content == "code_pt":
        with open(path, "wb") as f:
            pickle.dump(_Payload(), f, protocol=2)
    elif content == "text":
        path.write_text("1, 2, 3\n")
    elif content == "string_npy":
        np.save(path, np.array(["a", "b"]))
        path = path.with_suffix(".bin.npy")
    elif content == "bomb_npz":  # a header that declares 8 GB in an entry of a few hundred bytes
        import zipfile

        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                      "shape": (1 << 30,)})
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("x.npy", header.getvalue() + b"\0" * 64)

    with pytest.raises(NormcliError, match=message):
        read_input_tensors(path)
    assert not _Payload.target.exists()
