"""The safe reader: every format gives the same tensors torch.load(weights_only=True) gives, without running
anything from the file."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest
import torch

from normcli.errors import NormcliError
from normcli.formats import detect_format
from normcli.reader import read_tensors

REFERENCE = "resnet_tiny.pt"


def _reference(samples):
    return torch.load(samples / REFERENCE, weights_only=True)


@pytest.mark.parametrize("name, fmt, container", [
    ("resnet_tiny.pt", "state-dict", "torch-zip"),
    ("resnet_tiny_legacy.pt", "state-dict", "torch-legacy"),
    ("resnet_tiny.ckpt", "checkpoint", "torch-zip"),
    ("resnet_tiny_dp.pt", "state-dict", "torch-zip"),
    ("resnet_tiny.safetensors", "safetensors", "safetensors"),
    ("resnet_tiny_full.pt", "full-pickle", "torch-zip"),
    ("resnet_tiny_script.pt", "torchscript", "torchscript"),
    ("resnet_tiny.pt2", "pt2", "pt2"),
])
def test_every_format_reads_the_same_tensors(samples, name, fmt, container):
    ref = _reference(samples)
    tf = read_tensors(samples / name)
    assert (tf.format, tf.container) == (fmt, container)
    assert set(tf.tensors) == set(ref)
    for key, tensor in ref.items():
        np.testing.assert_array_equal(tf.tensors[key].load(), tensor.numpy(), err_msg=key)


def test_nested_checkpoints_say_where_the_weights_were(samples):
    ckpt = read_tensors(samples / "resnet_tiny.ckpt")
    assert ckpt.state_dict_key == "state_dict" and ckpt.stripped_prefixes == ["model."]
    dp = read_tensors(samples / "resnet_tiny_dp.pt")
    assert dp.stripped_prefixes == ["module."]
    ema = read_tensors(samples / "mobilenetv2_tiny_ema.pth")
    assert ema.state_dict_key == "state_dict" and ema.other_state_dicts == ["state_dict_ema"]
    picked = read_tensors(samples / "mobilenetv2_tiny_ema.pth", key="state_dict_ema")
    raw = torch.load(samples / "mobilenetv2_tiny_ema.pth", weights_only=True)["state_dict_ema"]
    some = next(k for k in raw if k.endswith("running_var"))
    np.testing.assert_array_equal(picked.tensors[some].load(), raw[some].numpy())
    with pytest.raises(NormcliError, match="no entry 'nope'"):
        read_tensors(samples / "mobilenetv2_tiny_ema.pth", key="nope")


def test_compiled_and_mmengine_style_nesting(tmp_path):
    sd = torch.nn.BatchNorm2d(3).state_dict()
    torch.save({"meta": {"epoch": 3}, "state_dict": {f"_orig_mod.backbone.bn.{k}": v for k, v in sd.items()},
                "optimizer": {"state": {}}}, tmp_path / "mm.pth")
    tf = read_tensors(tmp_path / "mm.pth")
    assert set(tf.tensors) == {f"backbone.bn.{k}" for k in sd}
    assert "_orig_mod." in tf.stripped_prefixes


def test_module_classes_come_from_the_file_without_importing_them(samples):
    for name in ("resnet_tiny_full.pt", "resnet_tiny_script.pt", "resnet_tiny.pt2"):
        types = read_tensors(samples / name).module_types
        assert types["layer1.0.bn1"].endswith("BatchNorm2d"), name
        assert types["layer1.0.conv1"].endswith("Conv2d"), name
    full = read_tensors(samples / "resnet_tiny_full.pt")
    assert "samples.models.BasicBlock" in full.unsafe_globals


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int8])
def test_dtypes_and_views(tmp_path, dtype):
    base = (torch.randn(6, 5) * 3).to(dtype)
    tensors = {"a": base, "view": base[1:4, ::2], "t": base.t()}
    torch.save(tensors, tmp_path / "d.pt")
    tf = read_tensors(tmp_path / "d.pt")
    for k, v in tensors.items():
        np.testing.assert_array_equal(tf.tensors[k].load(), v.float().numpy() if dtype == torch.bfloat16
                                      else v.numpy(), err_msg=k)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_read_without_running(tmp_path):
    marker = tmp_path / "pwned"
    sd = torch.nn.BatchNorm2d(4).state_dict()
    torch.save({"state_dict": sd, "hyper_parameters": _Payload(marker)}, tmp_path / "evil.ckpt")
    tf = read_tensors(tmp_path / "evil.ckpt")
    assert not marker.exists()
    assert set(tf.tensors) == set(sd)
    assert any(g.endswith(".system") for g in tf.unsafe_globals)


def test_detects_format_by_content_not_extension(samples, tmp_path):
    for src, fmt in (("resnet_tiny.safetensors", "safetensors"), ("resnet_tiny.onnx", "onnx"),
                     ("resnet_tiny.pt2", "pt2"), ("resnet_tiny_script.pt", "torchscript")):
        renamed = tmp_path / f"renamed_{fmt}.bin"
        renamed.write_bytes((samples / src).read_bytes())
        assert detect_format(renamed) == fmt


def test_zip_that_is_not_a_checkpoint(tmp_path):
    with zipfile.ZipFile(tmp_path / "x.pt", "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(NormcliError, match="not a torch checkpoint"):
        read_tensors(tmp_path / "x.pt")
