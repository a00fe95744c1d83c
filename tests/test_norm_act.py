"""Norm+activation modules (timm's BatchNormAct2d, SyncBatchNormAct, FrozenBatchNormAct2d by qualified name):
fold folds the norm part and keeps the activation, swap replaces the norm part and keeps it, inspect names
the kind; an unknown class with the same forward is refused with its reason."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from normcli.fold import fold_batchnorm
from normcli.swap import swap_norms
from tests import timm_like
from tests.timm_like import (BatchNormAct2d, FrozenBatchNormAct2d, NotTimmBatchNormAct2d, SyncBatchNormAct,
                             randomise, timm_like_net)

X_SHAPE = (2, 3, 10, 10)


def x64(shape=X_SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def net64() -> nn.Module:
    return randomise(timm_like_net().double())


def test_fold_folds_each_norm_part_and_keeps_each_activation():
    model, x = net64(), x64()
    want = model(x)
    folded, report = fold_batchnorm(model, example_inputs=x)
    assert sorted(f["norm"] for f in report.folded) == ["bn1", "bn2", "bn3"] and report.unfolded == []
    assert {f["norm"]: f["into"] for f in report.folded} == {"bn1": "conv1", "bn2": "conv2", "bn3": "conv3"}
    calls = [n.target for n in folded.graph.nodes if n.op == "call_module"]
    # the dropout is the identity in eval and goes; SiLU, PReLU and ReLU stay, in place
    assert calls == ["conv1", "bn1.act", "conv2", "bn2.act", "conv3", "bn3.act", "fc"]
    assert isinstance(folded.get_submodule("bn1.act"), nn.SiLU)
    kinds = [type(m) for m in folded.modules()]
    assert not any(k in kinds for k in (BatchNormAct2d, SyncBatchNormAct, FrozenBatchNormAct2d))
    state = folded.state_dict()
    assert "bn2.act.weight" in state and not any(k.startswith("bn1.running") for k in state)
    torch.testing.assert_close(state["bn2.act.weight"], model.bn2.act.weight)
    torch.testing.assert_close(folded(x), want)


def test_fold_keeps_a_norm_act_before_a_conv_when_its_activation_is_in_between():
    class Pre(nn.Module):
        def __init__(self, act):
            super().__init__()
            self.bn = BatchNormAct2d(3, act_layer=act)
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(self.bn(x))

    x = x64()
    with_relu = randomise(Pre(nn.ReLU).double())
    folded, report = fold_batchnorm(with_relu, example_inputs=x)
    assert report.folded == [] and len(report.unfolded) == 1
    assert "act (ReLU) comes between its norm and the conv" in report.unfolded[0]["reason"]
    torch.testing.assert_close(folded(x), with_relu(x))
    # with no activation (act is an Identity) it folds into the conv after it
    plain = randomise(Pre(None).double())
    folded, report = fold_batchnorm(plain, example_inputs=x)
    assert report.folded == [{"norm": "bn", "into": "conv"}]
    assert [n.target for n in folded.graph.nodes if n.op == "call_module"] == ["conv"]
    torch.testing.assert_close(folded(x), plain(x))


def test_unknown_subclass_with_the_same_forward_is_still_refused_with_its_reason():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = NotTimmBatchNormAct2d(4, act_layer=nn.SiLU)

        def forward(self, x):
            return self.bn(self.conv(x))

    model, x = randomise(Net().double()), x64()
    folded, report = fold_batchnorm(model, example_inputs=x)
    assert report.folded == []
    assert report.unfolded == [{"norm": "bn", "reason": "NotTimmBatchNormAct2d overrides forward(), so its eval "
                                                        "map is not known to be affine"}]
    torch.testing.assert_close(folded(x), model(x))
    swapped, swap_report = swap_norms(model, "frozen", input_shape=X_SHAPE)
    assert swap_report.replaced == [] and len(swap_report.skipped) == 1
    assert "mylib.layers.NotTimmBatchNormAct2d overrides forward() and is not a known norm+activation class" in \
        swap_report.skipped[0]["reason"]
    assert type(swapped.bn) is NotTimmBatchNormAct2d


def test_frozen_lookalike_with_children_is_not_folded_as_a_plain_frozen_norm():
    """FrozenBatchNormAct2d's buffers under an unknown name: its act would be lost by a plain frozen fold."""
    class Unknown(FrozenBatchNormAct2d):
        __module__ = "mylib.layers"

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = Unknown(4, act_layer=nn.SiLU)

        def forward(self, x):
            return self.bn(self.conv(x))

    model, x = randomise(Net().double()), x64()
    folded, report = fold_batchnorm(model, example_inputs=x)
    assert report.folded == []
    torch.testing.assert_close(folded(x), model(x))


@pytest.mark.parametrize("to, cls_name", [("frozen", "FrozenBatchNorm2dAct"), ("syncbn", "SyncBatchNormAct"),
                                          ("mabn", "MABN2dAct")])
def test_eval_exact_swaps_replace_the_norm_part_and_keep_the_activation(to, cls_name):
    model, x = net64(), x64()
    want = model(x)
    swapped, report = swap_norms(model, to, input_shape=X_SHAPE)
    names = {r["name"]: r for r in report.replaced}
    # bn3 is frozen already (no BatchNorm); bn2 is a SyncBatchNorm already
    assert set(names) == ({"bn1"} if to == "syncbn" else {"bn1", "bn2"})
    assert names["bn1"]["from"] == "BatchNormAct2d" and names["bn1"]["to"] == cls_name
    assert names["bn1"]["keeps"] == ["drop (Dropout)", "act (SiLU)"]
    if to != "syncbn":
        assert names["bn2"]["from"] == "SyncBatchNormAct" and names["bn2"]["keeps"] == ["act (PReLU)"]
    assert type(swapped.bn1).__module__ == "normcli.layers.norm_act" and type(swapped.bn1).__name__ == cls_name
    assert swapped.bn1.act is not model.bn1.act and isinstance(swapped.bn1.act, nn.SiLU)
    if to != "syncbn":  # frozen's x * scale + shift, MABN's moved statistics: another float64 rounding
        assert report.eval_drift["max_rel"] < 1e-13
        torch.testing.assert_close(swapped(x), want)
    else:
        assert report.eval_drift == {"max_abs": 0.0, "max_rel": 0.0}
        torch.testing.assert_close(swapped(x), want, rtol=0, atol=0)
    # the swapped model's norm+activation layers are known to the fold too
    folded, fold_report = fold_batchnorm(swapped, example_inputs=x)
    assert {f["norm"] for f in fold_report.folded} == {"bn1", "bn2", "bn3"}
    torch.testing.assert_close(folded(x), want)


def test_syncbn_then_bn_round_trip_keeps_the_state_dict_and_the_activation():
    model, x = net64(), x64()
    sync, _ = swap_norms(model, "syncbn", input_shape=X_SHAPE)
    back, report = swap_norms(sync, "bn", input_shape=X_SHAPE)
    assert [(r["name"], r["from"], r["to"]) for r in report.replaced] == [
        ("bn1", "SyncBatchNormAct", "BatchNorm2dAct"), ("bn2", "SyncBatchNormAct", "BatchNorm2dAct")]
    assert back.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)


def test_frn_takes_the_place_of_a_relu_inside_and_keeps_other_activations():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn_relu = BatchNormAct2d(4, act_layer=nn.ReLU)
            self.bn_silu = BatchNormAct2d(4, act_layer=nn.SiLU)

        def forward(self, x):
            return self.bn_silu(self.bn_relu(self.conv(x)))

    swapped, report = swap_norms(randomise(Net()), "frn", input_shape=(2, 3, 8, 8))
    assert report.absorbed_activations == ["bn_relu.act (inside bn_relu)"]
    assert isinstance(swapped.bn_relu.act, nn.Identity) and isinstance(swapped.bn_silu.act, nn.SiLU)
    assert report.train_check["passed"]


def test_gn_keeps_the_activation_and_trains():
    swapped, report = swap_norms(net64().float(), "gn", groups=4, input_shape=X_SHAPE)
    assert [r["to"] for r in report.replaced] == ["GroupNormAct", "GroupNormAct"]
    assert isinstance(swapped.bn1.act, nn.SiLU) and swapped.bn1.num_groups == 4
    assert report.train_check["passed"]


def test_inspect_names_the_kind_from_a_pickle_without_running_it(tmp_path, run_normcli):
    timm_like.install()
    model = randomise(timm_like_net())
    path = tmp_path / "timm_model.pt"
    torch.save(model, path)  # a full pickle naming timm.layers.norm_act classes
    done = run_normcli("inspect", path, "--json")  # a fresh process where no timm module exists
    assert done.returncode == 0, done.stderr
    layers = {layer["name"]: layer for layer in json.loads(done.stdout)["layers"]}
    assert {n: (layers[n]["kind"], layers[n]["inferred"]) for n in ("bn1", "bn2", "bn3")} == {
        "bn1": ("BatchNormAct2d", False), "bn2": ("SyncBatchNormAct", False), "bn3": ("FrozenBatchNormAct2d", False)}


def test_inspect_with_arch_names_the_kind(cli, tmp_path):
    model = randomise(timm_like_net())
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    code, out, err = cli("inspect", path, "--arch", "tests/timm_like.py:timm_like_net", "--json")
    assert code == 0, err
    kinds = {layer["name"]: layer["kind"] for layer in json.loads(out)["layers"]}
    assert kinds == {"bn1": "BatchNormAct2d", "bn2": "SyncBatchNormAct", "bn3": "FrozenBatchNormAct2d"}


def test_swap_cli_keeps_the_activation_and_reports_it(tmp_path, run_normcli):
    model = randomise(timm_like_net())
    path, out = tmp_path / "sd.pt", tmp_path / "frozen.pt"
    torch.save(model.state_dict(), path)
    done = run_normcli("swap", path, "--to", "frozen", "-o", out, "--arch", "tests/timm_like.py:timm_like_net",
                       "--input-shape", "2,3,10,10", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [(r["name"], r["to"], r["keeps"]) for r in report["replaced"]] == [
        ("bn1", "FrozenBatchNorm2dAct", ["drop (Dropout)", "act (SiLU)"]),
        ("bn2", "FrozenBatchNorm2dAct", ["act (PReLU)"])]
    assert report["eval_drift"]["max_rel"] < 1e-6  # float32 rounding of x * scale + shift


def test_fuse_export_folds_norm_act_modules_and_keeps_their_activations(cli, tmp_path):
    model = randomise(timm_like_net())
    path, out, fused = tmp_path / "sd.pt", tmp_path / "m.onnx", tmp_path / "fused.pt"
    torch.save(model.state_dict(), path)
    code, stdout, err = cli("fuse-export", path, "--arch", "tests/timm_like.py:timm_like_net", "-o", out,
                            "--input-shape", "1,3,10,10", "--save-fused", fused, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert sorted((f["norm"], f["into"]) for f in report["folded"]) == [
        ("bn1", "conv1"), ("bn2", "conv2"), ("bn3", "conv3")]
    assert report["parity"]["passed"] and report["onnx"]["batchnorm_nodes"] == 0
    import onnx

    op_types = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "PRelu" in op_types and "Relu" in op_types and "Sigmoid" in op_types  # SiLU = x * sigmoid(x)
    x = torch.randn(1, 3, 10, 10, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(torch.jit.load(str(fused))(x), model(x), rtol=1e-4, atol=1e-5)
