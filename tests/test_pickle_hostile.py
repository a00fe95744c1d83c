"""Pickles and tensor records crafted against normcli's own reader: each is refused with exit 2 and one
`error:` line naming what was wrong, the process is never killed by a signal, and its memory stays bounded.

The files are real torch zip checkpoints (copies of samples/resnet_tiny.pt) whose data.pkl is replaced by an
opcode-level payload from tests/pickle_payloads.py, a real legacy-format file with a storage removed, and
files carrying hostile `normcli_swap` options.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import pickle_payloads as pp
from tests.conftest import ROOT, SAMPLES, normcli_executable, run_with_peak_rss, sha256

ARCH = "samples/models.py:resnet_tiny"
TEMPLATE = SAMPLES / "resnet_tiny.pt"
RSS_LIMIT_MB = 300        # inspect (no torch): the bar for any file up to 10 MB
TORCH_RSS_LIMIT_MB = 450  # swap/fuse-export import torch (~230 MB here) before reading the file
TIME_LIMIT_S = 60         # generous for a shared machine; the benchmark holds the real bar


def _storage0_numel() -> int:
    return pp.storage_numel(TEMPLATE)


# name -> (pickle bytes builder, text the error line must contain)
PICKLE_CASES = {
    "deep-tuple-key": (lambda: pp.deep_tuple_key(1_000_000), "pickle_depth"),
    "deep-set-item": (lambda: pp.deep_set_item(1_000_000), "pickle_depth"),
    "memo-index-bomb": (pp.memo_index_bomb, "memo entry 2147483648"),
    "memo-unset-get": (pp.memo_unset_get, "memo entry 5 before writing"),
    "dict-reference-bomb": (pp.reference_bomb, "no state dict found"),
    "list-reference-bomb": (pp.list_reference_bomb, "no state dict found"),
    "device-string-bomb": (pp.device_string_bomb, "torch.device"),
    "fan-out": (lambda: pp.fan_out(3_000_000), "pickle_items_per_byte"),
    "ext1": (pp.extension_opcode, "EXT1"),
    "next-buffer": (pp.out_of_band_buffer, "NEXT_BUFFER"),
    "text-persistent-id": (pp.text_persistent_id, "PERSID"),
    "pid-path": (lambda: pp.persistent_id(pp.storage("../../etc/passwd", 4)), "does not hold"),
    "pid-kind": (lambda: pp.persistent_id(pp.tup(pp.s("module"), pp.s("x")) + b"Q"), "persistent id"),
    "pid-numel-past-entry": (lambda: pp.persistent_id(pp.storage("0", _storage0_numel() + 1)), "holds 864 bytes"),
    "pid-bool-numel": (lambda: pp.persistent_id(pp.tup(pp.s("storage"), pp.g("torch", "FloatStorage"), pp.s("0"),
                                                       pp.s("cpu"), b"\x88") + b"Q"), "bad element count"),
    "build-on-tensor": (lambda: pp.build_on_tensor(b"}" + pp.s("array_") + b"Ns"), "BUILD"),
    "build-on-allowed-global": (lambda: pp.build_on_global("torch._utils", "_rebuild_tensor_v2"), "BUILD"),
    "build-on-ordered-dict": (lambda: pp.state_dict({"x": pp.g("collections", "OrderedDict") + b")R}"
                                                     + pp.s("foo") + b"K\x01sb"}), "BUILD"),
    "array-interface-smuggling": (pp.array_interface_smuggling, "no state dict found"),
    "negative-stride": (lambda: pp.bn_state_dict(pp.tensor([16], [-1], offset=15)), "stride holds -1"),
    "negative-size": (lambda: pp.bn_state_dict(pp.tensor([-16], [1])), "size holds -16"),
    "bool-size": (lambda: pp.bn_state_dict(pp.tensor([True], [1])), "size holds True"),
    "negative-offset": (lambda: pp.bn_state_dict(pp.tensor([4], [1], offset=-4)), "storage offset holds -4"),
    "size-stride-length": (lambda: pp.bn_state_dict(pp.tensor([4, 4], [1])), "2 sizes but 1 strides"),
    "extent-overflow": (lambda: pp.bn_state_dict(pp.tensor([2 ** 40, 2 ** 40], [2 ** 40, 1])), "needs"),
    "huge-size": (lambda: pp.bn_state_dict(pp.tensor([2 ** 62], [1])), "below 2**48"),
    "past-the-storage": (lambda: pp.bn_state_dict(pp.tensor([17], [1])), "holds 16"),
    "zero-stride-expansion": (lambda: pp.bn_state_dict(pp.tensor([1 << 20, 1 << 20], [0, 0])),
                              "tensor_expand_bytes"),
}
# the state dicts above hold a BatchNorm's four tensors, not resnet_tiny: with --arch a zero-stride tensor that
# passes the reader is refused by the key check instead. swap and fuse-export refuse a file whose pickles name
# code before anything else, naming it: the extension-registry lookup, numpy.ndarray, a global given state.
ARCH_MESSAGE = {"zero-stride-expansion": "does not fit --arch", "ext1": "copyreg.extension_registry[1]",
                "array-interface-smuggling": "numpy.ndarray",
                "build-on-allowed-global": "torch._utils._rebuild_tensor_v2"}


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pickle-hostile")
    for name, (build, _) in PICKLE_CASES.items():
        pp.zip_with_pickle(TEMPLATE, d / f"{name}.pt", build())
    return d


def run_measured(*args, timeout: float = 300) -> tuple[int, str, str, float, float]:
    """The installed normcli: (exit status, stdout, stderr, its own peak RSS in MB, seconds); a signal is a
    negative status."""
    return run_with_peak_rss([*normcli_executable(), *map(str, args)], timeout=timeout)


def assert_refused(code: int, err: str, expected: str | None) -> str:
    assert code >= 0, f"killed by signal {-code}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    if expected:
        assert expected in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("name", list(PICKLE_CASES))
def test_inspect_refuses_each_hostile_pickle(hostile_dir, name):
    path = hostile_dir / f"{name}.pt"
    before = sha256(path)
    code, out, err, rss, seconds = run_measured("inspect", path)
    assert_refused(code, err, PICKLE_CASES[name][1])
    assert rss < RSS_LIMIT_MB, f"peak RSS {rss:.0f} MB"
    assert seconds < TIME_LIMIT_S
    assert sha256(path) == before


@pytest.mark.parametrize("command", ["swap", "fuse-export"])
@pytest.mark.parametrize("name", list(PICKLE_CASES))
def test_swap_and_fuse_export_refuse_each_hostile_pickle(cli, monkeypatch, hostile_dir, tmp_path, name, command):
    monkeypatch.chdir(ROOT)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = (["swap", hostile_dir / f"{name}.pt", "--to", "frn", "-o", out_dir / "out.pt", "--arch", ARCH]
            if command == "swap" else
            ["fuse-export", hostile_dir / f"{name}.pt", "-o", out_dir / "out.onnx", "--arch", ARCH,
             "--input-shape", "1,3,32,32"])
    code, _out, err = cli(*argv)
    assert_refused(code, err, ARCH_MESSAGE.get(name, PICKLE_CASES[name][1]))
    assert list(out_dir.iterdir()) == []


LOADING_MESSAGES = {"ext1": "is unsafe: its pickles name callables that run code when loaded "
                            "(copyreg.extension_registry[1])"}
SUBPROCESS_SUBSET = ["deep-tuple-key", "memo-index-bomb", "fan-out", "build-on-tensor", "negative-stride",
                     "ext1"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["swap", "fuse-export"])
@pytest.mark.parametrize("name", SUBPROCESS_SUBSET)
def test_installed_swap_and_fuse_export_refuse_hostile_pickles(hostile_dir, tmp_path, name, command):
    argv = (["swap", hostile_dir / f"{name}.pt", "--to", "frn", "-o", tmp_path / "out.pt", "--arch", ARCH]
            if command == "swap" else
            ["fuse-export", hostile_dir / f"{name}.pt", "-o", tmp_path / "out.onnx", "--arch", ARCH,
             "--input-shape", "1,3,32,32"])
    code, _out, err, rss, seconds = run_measured(*argv)
    # swap and fuse-export judge the file's globals first: an extension-registry call is refused as code
    assert_refused(code, err, LOADING_MESSAGES.get(name, PICKLE_CASES[name][1]))
    assert rss < TORCH_RSS_LIMIT_MB, f"peak RSS {rss:.0f} MB"
    assert seconds < TIME_LIMIT_S
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "out.onnx").exists()


def test_the_walk_refuses_before_the_unpickler_runs():
    """The deep tuple key is refused by the opcode walk, before any unpickler (whose C hashing would
    overflow the stack) sees it; and the same bytes really are accepted by the walk's protocol otherwise."""
    import io

    from normcli.limits import LimitExceeded, Limits
    from normcli.safe_pickle import walk_pickle

    data = pp.deep_tuple_key(1_000_000)
    with pytest.raises(LimitExceeded, match="pickle_depth"):
        walk_pickle(io.BytesIO(data), size=len(data))
    shallow = pp.deep_tuple_key(100)
    walk_pickle(io.BytesIO(shallow), Limits(pickle_depth=200), len(shallow))


# ------------------------------------------------------------------------------------ legacy missing storage

@pytest.fixture(scope="module")
def legacy_missing(tmp_path_factory) -> Path:
    import torch

    from tests.hostile_payloads import resnet_state_dict

    d = tmp_path_factory.mktemp("legacy")
    sd = {k: v.float() for k, v in resnet_state_dict().items()}  # one element size for every storage
    torch.save(sd, d / "whole.pt", _use_new_zipfile_serialization=False)
    return pp.legacy_without_storage(d / "whole.pt", d / "missing.pt")


def test_legacy_missing_storage_is_what_torch_leaves_uninitialised(legacy_missing):
    """The control: torch.load accepts the file (so the storage really is left to chance)."""
    import torch

    loaded = torch.load(legacy_missing, weights_only=True)
    assert "fc.bias" in loaded or len(loaded) > 10


@pytest.mark.parametrize("argv", [
    ["inspect", "{path}"],
    ["swap", "{path}", "--to", "frn", "-o", "{out}/out.pt", "--arch", ARCH],
    ["fuse-export", "{path}", "-o", "{out}/out.onnx", "--arch", ARCH, "--input-shape", "1,3,32,32"],
], ids=["inspect", "swap", "fuse-export"])
def test_legacy_missing_storage_is_refused_by_every_command(legacy_missing, tmp_path, argv):
    args = [a.format(path=legacy_missing, out=tmp_path) for a in argv]
    code, _out, err, rss, _ = run_measured(*args)
    line = assert_refused(code, err, "missing from the legacy file's key list")
    assert "storage" in line
    assert [p for p in tmp_path.iterdir()] == []


# --------------------------------------------------------------------------------------- stored swap options

SWAP_OPTION_CASES = {
    "mabn-window-4.5GB": ({"to": "mabn", "options": {"B": 1, "real_B": 2 ** 31, "warmup_iters": 100,
                                                     "momentum": 0.98, "cenconv": False}}, "normcli_swap.options"),
    "probe-6000x6000": ({"to": "frn", "options": {"learnable_eps": False}, "input_shape": [1, 3, 6000, 6000]},
                        "normcli_swap.input_shape"),
    "string-batch": ({"to": "mabn", "options": {"B": "2"}}, "normcli_swap.options.B"),
    "bool-as-int": ({"to": "mabn", "options": {"B": True}}, "normcli_swap.options.B"),
    "yes-as-bool": ({"to": "frn", "options": {"learnable_eps": "yes"}}, "normcli_swap.options.learnable_eps"),
    "unknown-target": ({"to": "layernorm", "options": {}}, "normcli_swap.to"),
    "unknown-option": ({"to": "frn", "options": {"probe_samples": 10 ** 9}}, "normcli_swap.options.probe_samples"),
    "extra-entry": ({"to": "frn", "options": {}, "probe_samples": 10 ** 9}, "normcli_swap.probe_samples"),
    "include-not-list": ({"to": "frn", "options": {}, "include": "conv*"}, "normcli_swap.include"),
    "negative-shape": ({"to": "frn", "options": {}, "input_shape": [1, -3, 32, 32]}, "normcli_swap.input_shape"),
    "nan-momentum": ({"to": "mabn", "options": {"momentum": float("nan")}}, "normcli_swap.options.momentum"),
    # the layout swap writes now: the selection and the probe shapes inside the options
    "options-probe-6000x6000": ({"to": "frn", "options": {"include": None, "exclude": None,
                                                          "input_shapes": [[1, 3, 6000, 6000]]}},
                                "normcli_swap.options.input_shapes"),
    "options-many-shapes": ({"to": "frn", "options": {"input_shapes": [[1, 3, 8, 8]] * 65}},
                            "normcli_swap.options.input_shapes"),
    "options-shape-of-strings": ({"to": "frn", "options": {"input_shapes": [["1", "3", "32", "32"]]}},
                                 "normcli_swap.options.input_shapes"),
    "options-include-not-list": ({"to": "frn", "options": {"include": "conv*"}}, "normcli_swap.options.include"),
    "options-two-probe-shapes": ({"to": "frn", "options": {"input_shape": [1, 3, 32, 32],
                                                           "input_shapes": [[1, 3, 32, 32]]}},
                                 "normcli_swap.options.input_shapes"),
}


@pytest.fixture(scope="module")
def swap_option_files(tmp_path_factory) -> Path:
    import torch

    from tests.hostile_payloads import resnet_state_dict

    d = tmp_path_factory.mktemp("swap-options")
    sd = resnet_state_dict()
    for name, (meta, _) in SWAP_OPTION_CASES.items():
        torch.save({"state_dict": sd, "normcli_swap": {"arch": ARCH, "arch_kwargs": {}, **meta}}, d / f"{name}.pt")
    return d


@pytest.mark.parametrize("command", ["swap", "fuse-export"])
@pytest.mark.parametrize("name", list(SWAP_OPTION_CASES))
def test_stored_swap_options_are_validated_like_the_command_line(cli, monkeypatch, swap_option_files, tmp_path,
                                                                name, command):
    monkeypatch.chdir(ROOT)
    path = swap_option_files / f"{name}.pt"
    argv = (["swap", path, "--to", "frn", "-o", tmp_path / "out.pt", "--arch", ARCH] if command == "swap" else
            ["fuse-export", path, "-o", tmp_path / "out.onnx", "--arch", ARCH, "--input-shape", "1,3,32,32"])
    code, _out, err = cli(*argv)
    assert_refused(code, err, SWAP_OPTION_CASES[name][1])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,expected", [
    (["--to", "mabn", "--B", "1", "--real-B", str(2 ** 31)], "--real-B // --B"),  # the options as typed
    (["--to", "frn", "--input-shape", "1,3,6000,6000"], "elements"),
], ids=["mabn-window", "probe-size"])
def test_the_command_line_has_the_same_limits(cli, monkeypatch, tmp_path, argv, expected):
    monkeypatch.chdir(ROOT)
    code, _out, err = cli("swap", SAMPLES / "resnet_tiny.pt", "-o", tmp_path / "out.pt", "--arch", ARCH, *argv)
    assert_refused(code, err, expected)


@pytest.mark.slow
def test_installed_swap_refuses_a_stored_4GB_window_with_bounded_memory(swap_option_files, tmp_path):
    code, _out, err, rss, _ = run_measured("swap", swap_option_files / "mabn-window-4.5GB.pt", "--to", "frn",
                                           "-o", tmp_path / "out.pt", "--arch", ARCH)
    assert_refused(code, err, "normcli_swap.options")
    assert rss < TORCH_RSS_LIMIT_MB


# --------------------------------------------------------------------------------- what still reads, exactly

def test_a_large_state_dict_pickle_is_within_every_limit(tmp_path):
    """Twenty thousand tensors (a pickle of ~2 MB, as a multi-GB model's) read with the default limits."""
    import torch

    from normcli.reader import read_tensors

    base = torch.arange(20_000, dtype=torch.float32)
    sd = {f"blocks.{i // 8}.layer{i % 8}.weight": base[i:i + 1] for i in range(20_000)}
    torch.save(sd, tmp_path / "many.pt")
    tf = read_tensors(tmp_path / "many.pt")
    assert len(tf.tensors) == 20_000
    assert float(tf.tensors["blocks.2499.layer7.weight"].load()[0]) == 19_999.0


def _bottleneck_class():
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            cout = width * 4
            self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
            self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
            self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                               if stride != 1 or cin != cout else None)

    Bottleneck.__module__, Bottleneck.__qualname__ = __name__, "Bottleneck"
    return Bottleneck


def _resnet152_like():
    from torch import nn

    global Bottleneck
    Bottleneck = _bottleneck_class()  # module level, so torch.save can name it
    layers, cin = [], 8
    for width, blocks, stride in ((2, 3, 1), (4, 8, 2), (8, 36, 2), (16, 3, 2)):
        stage = []
        for b in range(blocks):
            stage.append(Bottleneck(cin, width, stride if b == 0 else 1))
            cin = width * 4
        layers.append(nn.Sequential(*stage))
    return nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8), *layers)


def test_a_resnet152_sized_full_pickle_still_inspects(tmp_path):
    """ResNet-152's module tree (50 bottlenecks, over 150 BatchNorms) pickled whole: the module tree, its tensors
    and eps are read with the default limits (narrow channels keep the file small; the pickle is full size)."""
    import torch

    from normcli.reader import read_tensors

    model = _resnet152_like()
    torch.save(model, tmp_path / "r152.pt")
    tf = read_tensors(tmp_path / "r152.pt")
    assert tf.format == "full-pickle"
    assert len(tf.tensors) == len(model.state_dict())
    bns = [n for n, m in model.named_modules() if type(m).__name__ == "BatchNorm2d"]
    assert len(bns) >= 150
    assert sorted(n for n, t in tf.module_types.items() if t.endswith("BatchNorm2d")) == sorted(bns)
    assert all(v == 1e-5 for v in tf.module_eps.values())


def test_limits_are_named_and_can_be_raised(cli, monkeypatch, hostile_dir):
    """A limit's error names it and `--limit` raises it: a real sample fails under a tiny depth limit and reads
    with the default; a zero-stride tensor refused at the default materialises once the budget allows it."""
    monkeypatch.chdir(ROOT)
    code, _out, err = cli("inspect", SAMPLES / "resnet_tiny.pt", "--limit", "pickle_depth=3")
    assert_refused(code, err, "pickle_depth=3")
    assert cli("inspect", SAMPLES / "resnet_tiny.pt")[0] in (0, 1)
    code, _out, err = cli("inspect", hostile_dir / "zero-stride-expansion.pt", "--limit", "tensor_expand_bytes=8")
    assert_refused(code, err, "tensor_expand_bytes=8")
    code, _out, err = cli("inspect", SAMPLES / "resnet_tiny.pt", "--limit", "no_such_limit=1")
    assert_refused(code, err, "pickle_depth")  # the error lists the known names


def test_a_small_zero_stride_tensor_reads_as_torch_gives_it(tmp_path):
    """A zero stride within the budget is legal, as in torch: the values repeat."""
    import numpy as np

    from normcli.reader import read_tensors

    path = pp.zip_with_pickle(TEMPLATE, tmp_path / "bcast.pt", pp.bn_state_dict(pp.tensor([16], [0], offset=3)))
    tf = read_tensors(path)
    first = pp.storage_numel(TEMPLATE)  # storage 0 is conv1.weight: compare with its element 3
    import torch

    conv = torch.load(TEMPLATE, weights_only=True)["conv1.weight"].reshape(-1)
    assert first >= 16
    np.testing.assert_array_equal(tf.tensors["bn1.running_var"].load(), np.full(16, conv[3].item(), np.float32))
