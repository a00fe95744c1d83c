"""swap_norms: which modules become FRN/MABN, which ReLU calls remain, and what the swapped model computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normcli.errors import NormcliError
from normcli.layers import CenConv2d, FilterResponseNorm1d, FilterResponseNorm2d, FilterResponseNorm3d, MABN2d
from normcli.swap import SWAP_TARGETS, swap_norms


def randomise_bn(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
    return model


class Block(nn.Module):
    """torchvision BasicBlock style: one ReLU module, called after bn1 and after the residual add."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class Mixed(nn.Module):
    """A functional relu, a ReLU6, a BN output with two consumers, a BN1d after Linear, 1-d and 3-d maps."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_f = nn.BatchNorm2d(4)
        self.conv6 = nn.Conv2d(4, 4, 1)
        self.bn6 = nn.BatchNorm2d(4)
        self.act6 = nn.ReLU6()
        self.bn_two = nn.BatchNorm2d(4)
        self.relu_two = nn.ReLU()
        self.seq = nn.Conv1d(4, 4, 1)
        self.bn_seq = nn.BatchNorm1d(4)
        self.vol = nn.Conv3d(1, 2, 1)
        self.bn_vol = nn.BatchNorm3d(2)
        self.fc = nn.Linear(4, 5)
        self.bn_fc = nn.BatchNorm1d(5)
        self.fc_relu = nn.ReLU()

    def forward(self, x):
        a = F.relu(self.bn_f(self.conv(x)))
        b = self.act6(self.bn6(self.conv6(a)))
        t = self.bn_two(b)
        c = self.relu_two(t) + t
        s = torch.relu(self.bn_seq(self.seq(c.flatten(2))))  # (N, 4, H*W)
        v = self.bn_vol(self.vol(c[:, :1, None]))  # (N, 2, 1, H, W)
        h = self.fc_relu(self.bn_fc(self.fc(s.mean(-1) + v.mean((1, 2, 3, 4))[:, None])))
        return h


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: torch.fx cannot trace it
            x = x * 2
        return self.relu(self.bn(self.conv(x)))


def relu_calls(model):
    """Targets of the ReLU calls left in a traced result's graph (or of a plain model's ReLU modules)."""
    if isinstance(model, torch.fx.GraphModule):
        mods = dict(model.named_modules())
        return sorted(
            str(n.target) if n.op == "call_module" else getattr(n.target, "__name__", str(n.target))
            for n in model.graph.nodes
            if (n.op == "call_module" and type(mods[n.target]) in (nn.ReLU, nn.ReLU6))
            or (n.op == "call_function" and n.target in (F.relu, torch.relu))
        )
    return sorted(name for name, m in model.named_modules() if type(m) in (nn.ReLU, nn.ReLU6))


def test_registry_names_the_targets():
    assert set(SWAP_TARGETS) == {"frn", "mabn", "bn", "syncbn", "frozen", "gn"}
    assert SWAP_TARGETS["mabn"].defaults["warmup_iters"] == 100
    with pytest.raises(NormcliError, match="frn, mabn, bn, syncbn, frozen, gn"):
        swap_norms(Block(), "layernorm")
    with pytest.raises(NormcliError, match="does not take"):
        swap_norms(Block(), "frn", B=2)
    with pytest.raises(NormcliError, match="multiple of B"):
        swap_norms(Block(), "mabn", B=3, real_B=8)


def test_frn_absorbs_only_the_relu_call_after_bn1():
    torch.manual_seed(0)
    block = randomise_bn(Block())
    swapped, report = swap_norms(block, "frn", input_shape=(2, 4, 6, 6))

    assert isinstance(swapped.bn1, FilterResponseNorm2d) and isinstance(swapped.bn2, FilterResponseNorm2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in swapped.modules())
    assert report.traced is True
    assert report.absorbed_activations == ["relu (after bn1)"]
    assert relu_calls(swapped) == ["relu"]  # the call after the residual add stays
    # FRN starts from the BatchNorm's affine parameters
    torch.testing.assert_close(swapped.bn1.weight, block.bn1.weight)

    x = torch.randn(2, 4, 6, 6)
    expected = torch.relu(swapped.bn2(swapped.conv2(swapped.bn1(swapped.conv1(x)))) + x)
    torch.testing.assert_close(swapped(x), expected)
    assert report.params_after == report.params_before + 2 * 4  # a tau per channel
    assert report.train_check["passed"] and report.train_check["batch_size"] == 2
    assert report.eval_drift["max_abs"] > 0  # FRN computes something else than BN: the drift is reported


def test_frn_keeps_other_activations_and_shared_outputs():
    torch.manual_seed(1)
    model = randomise_bn(Mixed())
    swapped, report = swap_norms(model, "frn", input_shape=(2, 3, 5, 5))

    replaced = {r["name"]: r["to"] for r in report.replaced}
    assert replaced == {"bn_f": "FilterResponseNorm2d", "bn6": "FilterResponseNorm2d",
                        "bn_two": "FilterResponseNorm2d", "bn_seq": "FilterResponseNorm1d",
                        "bn_vol": "FilterResponseNorm3d"}
    skipped = {s["name"]: s["reason"] for s in report.skipped}
    assert list(skipped) == ["bn_fc"] and "(N, C)" in skipped["bn_fc"] and "learnable_eps" in skipped["bn_fc"]
    assert isinstance(swapped.bn_fc, nn.BatchNorm1d)
    assert sorted(report.absorbed_activations) == ["relu call relu (after bn_f)", "relu call relu_1 (after bn_seq)"]
    # ReLU6 stays, the ReLU on a BN output that is also used elsewhere stays, the ReLU after the kept BN1d stays
    assert relu_calls(swapped) == ["act6", "fc_relu", "relu_two"]

    x = torch.randn(2, 3, 5, 5)
    m = swapped.eval()
    with torch.no_grad():
        a = m.bn_f(m.conv(x))
        t = m.bn_two(m.act6(m.bn6(m.conv6(a))))
        c = torch.relu(t) + t
        s = m.bn_seq(m.seq(c.flatten(2)))
        v = m.bn_vol(m.vol(c[:, :1, None]))
        expected = torch.relu(m.bn_fc(m.fc(s.mean(-1) + v.mean((1, 2, 3, 4))[:, None])))
        torch.testing.assert_close(swapped(x), expected)


def test_frn_learnable_eps_takes_bn1d_after_linear():
    model = randomise_bn(Mixed())
    swapped, report = swap_norms(model, "frn", input_shape=(2, 3, 5, 5), learnable_eps=True)
    assert isinstance(swapped.bn_fc, FilterResponseNorm1d) and swapped.bn_fc.learnable_eps
    assert report.skipped == [] and report.options == {"learnable_eps": True}
    assert "fc_relu (after bn_fc)" in report.absorbed_activations
    assert report.train_check["passed"]


def test_frn_without_input_shape_skips_bn1d_of_unknown_rank():
    class NoStem(nn.Module):  # nothing to guess an input shape from
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)
            self.bn2 = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn2(x) + self.bn(x.flatten(2)).view_as(x)

    swapped, report = swap_norms(NoStem(), "frn")
    assert [s["name"] for s in report.skipped] == ["bn"] and "unknown" in report.skipped[0]["reason"]
    assert isinstance(swapped.bn2, FilterResponseNorm2d)
    assert report.eval_drift is None and report.train_check is None


def test_untraceable_model_swaps_modules_and_keeps_relus():
    model = randomise_bn(Untraceable())
    swapped, report = swap_norms(model, "frn", input_shape=(1, 3, 4, 4))
    assert report.traced is False and any("could not trace" in n for n in report.notes)
    assert isinstance(swapped.bn, FilterResponseNorm2d) and report.absorbed_activations == []
    assert not isinstance(swapped, torch.fx.GraphModule)
    x = torch.randn(1, 3, 4, 4).abs()
    torch.testing.assert_close(swapped(x), torch.relu(swapped.bn(swapped.conv(x * 2))))


def test_include_exclude_select_by_name():
    model = randomise_bn(Mixed())
    _, report = swap_norms(model, "frn", input_shape=(2, 3, 5, 5), include="bn_*", exclude=["bn_two", "bn_v*"])
    assert sorted(r["name"] for r in report.replaced) == ["bn_f", "bn_seq"]
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert reasons["bn6"].startswith("not matched by include")
    assert reasons["bn_two"] == "matched by exclude bn_two" and reasons["bn_vol"] == "matched by exclude bn_v*"
    assert report.absorbed_activations == ["relu call relu (after bn_f)", "relu call relu_1 (after bn_seq)"]


def test_swap_is_pure_by_default():
    model = randomise_bn(Block())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    swap_norms(model, "frn", input_shape=(1, 4, 5, 5))
    swap_norms(model, "mabn", input_shape=(1, 4, 5, 5), cenconv=True)
    assert isinstance(model.bn1, nn.BatchNorm2d) and type(model.conv1) is nn.Conv2d
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], atol=0, rtol=0)


def test_mabn_keeps_eval_output():
    torch.manual_seed(2)
    model = randomise_bn(Mixed()).eval()
    swapped, report = swap_norms(model, "mabn", input_shape=(2, 3, 5, 5), B=1, real_B=4, warmup_iters=7)
    assert report.traced is None and not isinstance(swapped, torch.fx.GraphModule)
    replaced = sorted(r["name"] for r in report.replaced)
    assert replaced == ["bn6", "bn_f", "bn_two"]
    for name in replaced:
        layer = swapped.get_submodule(name)
        assert isinstance(layer, MABN2d) and (layer.B, layer.real_B, layer.warmup_iters) == (1, 4, 7)
    skipped = {s["name"]: s["reason"] for s in report.skipped}
    assert sorted(skipped) == ["bn_fc", "bn_seq", "bn_vol"]
    assert all("4-d" in reason for reason in skipped.values())
    assert report.absorbed_activations == [] and relu_calls(swapped) == ["act6", "fc_relu", "relu_two"]

    x = torch.randn(3, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), model(x), rtol=1e-5, atol=1e-6)
    assert report.eval_drift["max_rel"] <= 1e-5
    assert report.params_after == report.params_before
    assert report.train_check["passed"]


def test_mabn_cenconv_centres_the_feeding_convs_and_reports_drift():
    torch.manual_seed(3)
    model = randomise_bn(Block()).eval()
    swapped, report = swap_norms(model, "mabn", input_shape=(2, 4, 6, 6), cenconv=True)
    assert report.traced is True and report.centred_convs == ["conv1", "conv2"]
    assert type(swapped.conv1) is CenConv2d and type(swapped.conv2) is CenConv2d
    torch.testing.assert_close(swapped.conv1.weight, model.conv1.weight, atol=0, rtol=0)

    gen = torch.Generator().manual_seed(0)
    probes = [torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64).float() for _ in range(2)]
    with torch.no_grad():
        drift = max((swapped.eval()(x) - model(x)).abs().max().item() for x in probes)
    assert report.eval_drift["max_abs"] == pytest.approx(drift, rel=1e-4)
    assert drift > 1e-3


def test_sync_batchnorm_is_swapped():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), nn.ReLU())
    randomise_bn(model)
    swapped, report = swap_norms(model, "frn", input_shape=(1, 3, 4, 4))
    assert isinstance(swapped.get_submodule("1"), FilterResponseNorm2d) and report.absorbed_activations == ["2 (after 1)"]
    swapped, report = swap_norms(model.eval(), "mabn", input_shape=(1, 3, 4, 4))
    assert isinstance(swapped.get_submodule("1"), MABN2d) and report.eval_drift["max_rel"] <= 1e-5


@pytest.mark.parametrize("to, options", [("frn", {}), ("mabn", {"B": 2, "real_B": 4, "cenconv": True})])
def test_saved_state_dict_loads_into_a_fresh_swap(tmp_path, to, options):
    torch.manual_seed(4)
    swapped, _ = swap_norms(randomise_bn(Block()), to, input_shape=(2, 4, 5, 5), **options)
    optimiser = torch.optim.SGD(swapped.parameters(), lr=0.1)
    for _ in range(3):  # train, so parameters and MABN buffers move
        swapped.train()(torch.randn(2, 4, 5, 5)).square().mean().backward()
        optimiser.step()
        optimiser.zero_grad()
    torch.save(swapped.state_dict(), tmp_path / "swapped.pt")

    fresh, _ = swap_norms(Block(), to, input_shape=(2, 4, 5, 5), **options)
    fresh.load_state_dict(torch.load(tmp_path / "swapped.pt", weights_only=True), strict=True)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), swapped.eval()(x), atol=0, rtol=0)


def test_resnet_tiny_sample():
    samples = pytest.importorskip("samples.models")
    model = randomise_bn(samples.resnet_tiny()).eval()
    swapped, report = swap_norms(model, "frn", input_shape=(1, 3, 16, 16))
    bn_names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(r["name"] for r in report.replaced) == sorted(bn_names)
    bn1_relus = [f"{n.rsplit('.', 1)[0]}.relu (after {n})" for n in bn_names if n.endswith(".bn1")]
    assert set(bn1_relus) <= set(report.absorbed_activations)
    # every block keeps its ReLU call after the residual add
    blocks = {n.rsplit(".", 1)[0] for n in bn_names if n.endswith(".bn1")}
    assert {b + ".relu" for b in blocks} <= set(relu_calls(swapped))
    assert report.train_check["passed"]

    swapped, report = swap_norms(model, "mabn", input_shape=(2, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), model(x), rtol=1e-5, atol=1e-5)
    assert report.eval_drift["max_rel"] <= 1e-5


def test_frn_bn3d_and_conv1d_models_keep_rank():
    model = nn.Sequential(nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3), nn.ReLU(), nn.Conv3d(3, 1, 1))
    swapped, report = swap_norms(model, "frn", input_shape=(1, 2, 3, 3, 3))
    assert isinstance(swapped.get_submodule("1"), FilterResponseNorm3d)
    assert report.absorbed_activations == ["2 (after 1)"] and relu_calls(swapped) == []


def test_unused_batchnorm_in_a_traced_result_is_reported_as_skipped():
    class Spare(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()
            self.spare = nn.BatchNorm2d(4)  # registered, never called

        def forward(self, x):
            return self.relu(self.bn(self.conv(x)))

    swapped, report = swap_norms(Spare(), "frn", input_shape=(1, 3, 4, 4))
    assert [r["name"] for r in report.replaced] == ["bn"]
    assert report.skipped[0]["name"] == "spare" and "never called" in report.skipped[0]["reason"]
    assert set(swapped.state_dict()) == {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.tau"}


def test_mabn_swap_folds_into_convs():
    from normcli.fold import fold_batchnorm

    torch.manual_seed(5)
    model = randomise_bn(Block()).eval()
    swapped, _ = swap_norms(model, "mabn", input_shape=(1, 4, 6, 6))
    folded, _ = fold_batchnorm(swapped.eval())
    assert not any(isinstance(m, MABN2d) for m in folded.modules())
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_frn_swap_exports_to_onnx_with_parity(tmp_path):
    import contextlib
    import io

    import numpy as np
    import onnxruntime as ort

    torch.manual_seed(6)
    swapped, report = swap_norms(randomise_bn(Block()), "frn", input_shape=(1, 4, 6, 6))
    assert isinstance(swapped, torch.fx.GraphModule) and report.absorbed_activations
    swapped.eval()
    x = torch.randn(2, 4, 6, 6)
    path = tmp_path / "frn.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(swapped, (x,), str(path), input_names=["x"], output_names=["y"])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, swapped(x).numpy(), atol=1e-4, rtol=1e-3)


# --- what a swap keeps, and how to redo it ----------------------------------------------------------------------

def test_the_registry_says_which_targets_carry_running_statistics():
    carrying = {name for name, target in SWAP_TARGETS.items() if target.carries_running_stats}
    # FRN and GroupNorm keep only weight and bias; the others keep (or are) the running statistics
    assert {"frn", "gn"}.isdisjoint(carrying) and {"mabn", "bn", "syncbn", "frozen"} <= carrying


@pytest.mark.parametrize("to", ["frn", "mabn"])
def test_rebuild_options_redo_a_partial_swap_on_a_fresh_model(to):
    from samples.models import resnet_tiny

    swapped, report = swap_norms(randomise_bn(resnet_tiny()).eval(), to, include=["layer1.*", "bn1"],
                                 exclude="*.bn2", input_shape=(1, 3, 16, 16))
    assert report.rebuild_options["include"] == ["layer1.*", "bn1"] and report.rebuild_options["exclude"] == ["*.bn2"]
    assert report.rebuild_options["input_shapes"] == [[1, 3, 16, 16]]
    fresh, again = swap_norms(resnet_tiny().eval(), to, **report.rebuild_options)
    fresh.load_state_dict(swapped.state_dict(), strict=True)
    assert again.replaced == report.replaced and again.skipped == report.skipped
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fresh.eval()(x), swapped.eval()(x))


def test_two_input_probe_finds_each_batchnorms_rank_and_shapes_come_in_groups():
    from samples.models import image_and_features

    model = randomise_bn(image_and_features()).eval()
    swapped, report = swap_norms(model, "frn", learnable_eps=True, input_shapes=[(2, 3, 8, 8), (2, 6)])
    assert [r["to"] for r in report.replaced] == ["FilterResponseNorm2d", "FilterResponseNorm1d"]
    assert report.train_check["passed"] and report.input_shapes == [[2, 3, 8, 8], [2, 6]]
    with pytest.raises(NormcliError, match=r"3 input shapes given, but the model takes 2 positional inputs"):
        swap_norms(model, "frn", input_shapes=[(2, 3, 8, 8), (2, 6), (2, 3, 8, 8)])
    # the shapes were given: the error says to check them, not to give the option again
    with pytest.raises(NormcliError, match=r"does not run on inputs of shapes 2,6, 2,3,8,8 .*check the shapes given "
                                           r"with --input-shape, one per input, in order"):
        swap_norms(model, "frn", input_shapes=[(2, 6), (2, 3, 8, 8)])
    inputs = [torch.randn(1, 3, 8, 8), torch.randn(1, 6)]
    _, from_tensors = swap_norms(model, "mabn", inputs=inputs)
    assert from_tensors.eval_drift["max_rel"] <= 1e-5 and from_tensors.train_check["batch_size"] == 2


def test_other_norm_layers_are_accounted_for_as_skipped():
    class WithGroupNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.gn = nn.GroupNorm(2, 4)

        def forward(self, x):
            return self.gn(self.bn(self.conv(x)))

    _, report = swap_norms(WithGroupNorm().eval(), "mabn", input_shape=(1, 3, 8, 8))
    assert [r["name"] for r in report.replaced] == ["bn"]
    assert report.skipped == [{"name": "gn", "reason": "it is a GroupNorm, not a BatchNorm; swap replaces "
                                                       "BatchNorm layers only"}]


def test_preflight_findings_stop_only_what_uses_them():
    from normcli.preflight import GateFinding, judge, reaches

    stale = GateFinding("a", "BatchNorm2d", "stale-stats", "error", "m", about="statistics")
    weight = GateFinding("b", "BatchNorm2d", "non-finite", "error", "m", about="weights")
    tiny = GateFinding("c", "BatchNorm2d", "tiny-var", "warning", "m", about="statistics")
    assert judge([stale, weight, tiny], "error") == [stale, weight]
    assert judge([stale, weight, tiny], "warning") == [stale, weight, tiny]
    assert judge([stale, weight, tiny], "never") == []
    # a result that does not use layer a's statistics: only what it keeps stops it
    assert judge([stale, weight, tiny], "warning", lambda layer: layer != "a") == [weight, tiny]
    assert stale.note and not weight.note
    assert reaches("warning", "warning") and not reaches("info", "warning") and not reaches("error", "never")
