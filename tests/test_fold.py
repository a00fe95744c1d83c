"""fold_batchnorm: structure (which norms are gone, which stay and why) and numbers against the original model.

Every numeric check compares the folded model with the original on random inputs, with norm statistics set to
random, non-trivial values (never the 0/1 defaults, which would hide a wrong fold).
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from normcli.errors import NormcliError
from normcli.fold import FoldReport, fold_batchnorm, is_foldable_norm

# ---------------------------------------------------------------------------------------------------------
# helpers


def randomize_norms(model: nn.Module, seed: int = 0, min_var: float = 0.05, mean_scale: float = 1.0) -> nn.Module:
    """Give every norm random statistics and affine parameters, then put the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            tensors = dict(module.named_buffers(recurse=False)) | dict(module.named_parameters(recurse=False))
            if not is_foldable_norm(module):
                continue
            for name, t in tensors.items():
                if not t.is_floating_point():
                    continue
                n = t.shape
                if name == "running_mean":
                    t.copy_(torch.randn(n, generator=g) * mean_scale)
                elif name == "running_var":
                    t.copy_(min_var + torch.rand(n, generator=g) * 2)
                elif name == "weight":
                    t.copy_(torch.randn(n, generator=g) * 1.5)
                elif name == "bias":
                    t.copy_(torch.randn(n, generator=g))
    return model.eval()


def norm_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if name and is_foldable_norm(m)}


def check_fold(model: nn.Module, x, *, example=True, rtol=1e-4, atol=1e-5, **kwargs):
    """Fold, compare with the original on x, and check folded norms are gone and unfolded ones stay."""
    inputs = x if isinstance(x, tuple) else (x,)
    before = norm_names(model)
    folded, report = fold_batchnorm(model, example_inputs=inputs if example else None, **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(folded(*inputs), model(*inputs), rtol=rtol, atol=atol)
    after = norm_names(folded)
    folded_names = {f["norm"] for f in report.folded}
    unfolded_names = {u["norm"] for u in report.unfolded}
    assert not (folded_names & after), "a folded norm is still in the model"
    assert unfolded_names <= after, "a norm reported as unfolded is gone"
    assert folded_names | unfolded_names == before
    return folded, report


def reasons(report: FoldReport) -> dict[str, str]:
    return {u["norm"]: u["reason"] for u in report.unfolded}


def into(report: FoldReport) -> dict[str, str]:
    return {f["norm"]: f["into"] for f in report.folded}


CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SIZE = {1: (10,), 2: (7, 6), 3: (5, 4, 6)}


class Seq(nn.Sequential):
    pass


# ---------------------------------------------------------------------------------------------------------
# patterns that fold


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_then_batchnorm_folds(dims, bias):
    model = randomize_norms(nn.Sequential(CONV[dims](3, 6, 3, padding=1, bias=bias), BN[dims](6), nn.ReLU()))
    folded, report = check_fold(model, torch.randn(2, 3, *SIZE[dims]))
    assert into(report) == {"1": "0"} and report.unfolded == [] and report.method == "fx"
    assert folded.get_submodule("0").bias is not None  # created where the conv had none


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups,in_ch,out_ch", [(1, 4, 6), (2, 4, 6), (4, 4, 8), (3, 6, 3)])
def test_convtranspose_then_batchnorm_folds_grouped(dims, groups, in_ch, out_ch):
    # weight is (in, out/groups, k...): a fold that scales dim 0, or dim 1 without the group layout, is wrong
    deconv = CONVT[dims](in_ch, out_ch, 3, stride=2, padding=1, output_padding=1, groups=groups, bias=groups % 2 == 0)
    model = randomize_norms(nn.Sequential(deconv, BN[dims](out_ch)), seed=groups)
    _, report = check_fold(model, torch.randn(2, in_ch, *SIZE[dims]))
    assert into(report) == {"1": "0"}


def test_grouped_depthwise_strided_dilated_convs_fold():
    model = randomize_norms(nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),  # depthwise
        nn.Conv2d(8, 16, (1, 3), stride=(1, 2), groups=4), nn.BatchNorm2d(16),
    ))
    folded, report = check_fold(model, torch.randn(3, 4, 15, 13))
    assert into(report) == {"1": "0", "4": "3", "6": "5"}
    assert [type(m) for m in folded.children()] == [nn.Conv2d, nn.ReLU6, nn.Conv2d, nn.Conv2d]


def test_linear_then_batchnorm1d_folds_with_example_inputs():
    model = randomize_norms(nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3, bias=False),
                                          nn.BatchNorm1d(3)))
    _, report = check_fold(model, torch.randn(4, 5))
    assert into(report) == {"1": "0", "4": "3"}


def test_linear_then_batchnorm1d_stays_without_knowing_the_rank():
    # on a (N, L, F) tensor BatchNorm1d normalises dim 1 (L), not the Linear's features: only a 2-D output folds
    model = randomize_norms(nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7)))
    _, report = check_fold(model, torch.randn(4, 5), example=False)
    assert "example_inputs" in reasons(report)["1"]

    square = randomize_norms(nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7)))
    _, report = check_fold(square, torch.randn(2, 7, 5))  # (N, L=7, F=7): channels are L
    assert "1" in reasons(report) and report.folded == []


def test_batchnorm_affine_false_folds():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, affine=False, eps=1e-3)))
    _, report = check_fold(model, torch.randn(2, 3, 8, 8))
    assert into(report) == {"1": "0"}


def test_sync_batchnorm_and_instancenorm_with_running_stats_fold():
    model = randomize_norms(nn.Sequential(
        nn.Conv2d(3, 5, 3), nn.SyncBatchNorm(5), nn.ReLU(),
        nn.Conv2d(5, 5, 1), nn.InstanceNorm2d(5, affine=True, track_running_stats=True),
        nn.Conv2d(5, 5, 1), nn.InstanceNorm2d(5, affine=True),  # per-sample statistics: stays
    ))
    _, report = check_fold(model, torch.randn(2, 3, 8, 8))
    assert into(report) == {"1": "0", "4": "3"}
    assert "own statistics" in reasons(report)["6"]


class FrozenBatchNorm2d(nn.Module):
    """Like torchvision.ops.FrozenBatchNorm2d: statistics and affine parameters as buffers."""

    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))
        self.eps = eps

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class ScaleShiftNorm(nn.Module):
    """A norm that states its eval affine map through fold_scale_shift(), as normcli's MABN2d does."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))
        self.bias = nn.Parameter(torch.randn(n))
        self.register_buffer("running_var", torch.rand(n) + 0.5)

    def forward(self, x):
        return self.weight.reshape(1, -1, 1, 1) * x / torch.sqrt(self.running_var.reshape(1, -1, 1, 1) + 1e-5) \
            + self.bias.reshape(1, -1, 1, 1)

    def fold_scale_shift(self):
        scale = self.weight.double() / torch.sqrt(self.running_var.double() + 1e-5)
        return scale, self.bias.double()


def test_frozen_batchnorm_style_module_folds():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), FrozenBatchNorm2d(6, eps=1e-3)))
    folded, report = check_fold(model, torch.randn(2, 3, 9, 9))
    assert into(report) == {"1": "0"}


def test_module_with_fold_scale_shift_folds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), ScaleShiftNorm(6), nn.ReLU(), nn.ConvTranspose2d(6, 4, 2, 2),
                          ScaleShiftNorm(4)).eval()
    _, report = check_fold(model, torch.randn(2, 3, 9, 9))
    assert into(report) == {"1": "0", "4": "3"}


def test_mabn2d_in_eval_folds():
    mabn = pytest.importorskip("normcli.layers.mabn")
    norm = mabn.MABN2d(6, B=2, real_B=4)
    with torch.no_grad():
        norm.running_var.copy_(torch.rand(6) * 3 + 0.01)
        norm.weight.copy_(torch.randn(6))
        norm.bias.copy_(torch.randn(6))
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), norm).eval()
    _, report = check_fold(model, torch.randn(2, 3, 9, 9))
    assert into(report) == {"1": "0"}


def _random_mabn(channels: int, seed: int) -> nn.Module:
    from normcli.layers import MABN2d

    g = torch.Generator().manual_seed(seed)
    norm = MABN2d(channels, B=2, real_B=4)
    with torch.no_grad():
        norm.running_var.copy_(torch.rand(channels, generator=g) * 3 + 0.01)
        norm.weight.copy_(torch.randn(channels, generator=g) * 1.5)
        norm.bias.copy_(torch.randn(channels, generator=g))
    return norm.eval()


def _eval_scale_shift(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm's eval map x -> scale * x + shift per channel, in float64 (NORM_LAYERS.md for MABN)."""
    var, weight, bias = norm.running_var.double(), norm.weight.double(), norm.bias.double()
    scale = weight / torch.sqrt(var + norm.eps)
    if isinstance(norm, nn.BatchNorm2d):
        return scale, bias - norm.running_mean.double() * scale
    return scale, bias


@pytest.mark.parametrize("norm_kind", ["batchnorm", "mabn"])
@pytest.mark.parametrize("bias, groups", [(True, 1), (False, 2)])
def test_cenconv2d_then_norm_folds_into_a_plain_conv_with_the_centred_weight(norm_kind, bias, groups):
    from normcli.layers import CenConv2d

    torch.manual_seed(11)
    conv = CenConv2d(4, 6, 3, padding=1, groups=groups, bias=bias)
    with torch.no_grad():
        conv.weight.add_(0.5)  # a weight mean far from zero, so a fold that skips the centring is visibly wrong
    norm = _random_mabn(6, seed=1) if norm_kind == "mabn" else randomize_norms(nn.BatchNorm2d(6))
    model = nn.Sequential(conv, norm).eval()
    folded, report = check_fold(model, torch.randn(2, 4, 7, 7))
    assert into(report) == {"1": "0"}
    result = folded.get_submodule("0")
    assert type(result) is nn.Conv2d and result.groups == groups and result.padding == (1, 1)

    w = conv.weight.double()
    centred = w - w.mean(dim=(1, 2, 3), keepdim=True)
    scale, shift = _eval_scale_shift(norm)
    b = conv.bias.double() if bias else torch.zeros(6, dtype=torch.float64)
    torch.testing.assert_close(result.weight, (centred * scale.reshape(-1, 1, 1, 1)).float(), rtol=0, atol=0)
    torch.testing.assert_close(result.bias, (b * scale + shift).float(), rtol=0, atol=0)


def test_norm_before_unpadded_cenconv2d_folds_into_a_plain_conv():
    from normcli.layers import CenConv2d

    torch.manual_seed(12)
    conv = CenConv2d(4, 5, 3)
    with torch.no_grad():
        conv.weight.add_(0.5)
    model = randomize_norms(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), conv))
    folded, report = check_fold(model, torch.randn(2, 4, 7, 7))
    assert into(report) == {"1": "2"} and type(folded.get_submodule("2")) is nn.Conv2d


class CenConvTwoConsumers(nn.Module):
    def __init__(self):
        super().__init__()
        from normcli.layers import CenConv2d

        self.conv = CenConv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_cenconv2d_whose_fold_is_not_exact_stays_a_cenconv2d():
    from normcli.layers import CenConv2d

    class ScaledCenConv2d(CenConv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = randomize_norms(CenConvTwoConsumers())
    folded, report = check_fold(model, torch.randn(2, 3, 6, 6))
    assert "2 consumers" in reasons(report)["bn"] and type(folded.get_submodule("conv")) is CenConv2d

    # a subclass that changes the map is not known to be a centred conv: the norm after it stays
    model = randomize_norms(nn.Sequential(ScaledCenConv2d(3, 4, 3), nn.BatchNorm2d(4)))
    _, report = check_fold(model, torch.randn(2, 3, 6, 6))
    assert report.folded == [] and "1" in reasons(report)


def test_mabn_swap_with_cenconv_of_resnet_folds_every_mabn():
    from normcli.layers import CenConv2d, MABN2d
    from normcli.swap import swap_norms

    models = pytest.importorskip("samples.models")
    torch.manual_seed(0)
    model = models.resnet_tiny()
    with torch.no_grad():  # statistics calibrated on data
        model.train()
        for _ in range(2):
            model(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    swapped, _ = swap_norms(model.eval(), "mabn", cenconv=True, input_shape=(2, 3, 32, 32))
    swapped.eval()
    mabn_names = {name for name, m in swapped.named_modules() if isinstance(m, MABN2d)}
    centred = {name for name, m in swapped.named_modules() if isinstance(m, CenConv2d)}
    assert mabn_names and centred

    folded, report = fold_batchnorm(swapped)
    assert {f["norm"] for f in report.folded} == mabn_names and report.unfolded == []
    assert {f["into"] for f in report.folded} == centred
    assert not any(isinstance(m, (MABN2d, CenConv2d)) for m in folded.modules())
    assert all(type(folded.get_submodule(name)) is nn.Conv2d for name in centred)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), swapped(x), rtol=1e-4, atol=1e-4)


def test_norm_before_unpadded_or_copy_padded_conv_folds_into_it():
    model = randomize_norms(nn.Sequential(
        nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=0),                   # padding 0: exact
        nn.ReLU(),
        nn.BatchNorm2d(6), nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect", groups=3, bias=False),
        nn.ReLU(),
        nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, padding=2, padding_mode="circular", dilation=2),
        nn.ReLU(),
        nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1, padding_mode="replicate"),
    ), mean_scale=3.0)
    _, report = check_fold(model, torch.randn(2, 4, 11, 10))
    assert into(report) == {"0": "1", "3": "4", "6": "7", "9": "10"}


def test_norm_before_linear_folds_on_2d_input():
    model = randomize_norms(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(6), nn.Linear(6, 3)), mean_scale=2.0)
    _, report = check_fold(model, torch.randn(5, 6))
    assert into(report) == {"1": "2"}


def test_norm_on_both_sides_of_one_conv_and_two_norms_in_a_row():
    model = randomize_norms(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5),
                                          nn.BatchNorm2d(5), nn.ReLU()), mean_scale=2.0)
    folded, report = check_fold(model, torch.randn(2, 3, 6, 6))
    assert into(report) == {"0": "1", "2": "1", "3": "1"}
    assert [name for name, _ in folded.named_children()] == ["1", "4"]


# ---------------------------------------------------------------------------------------------------------
# dataflow, not module order


class OutOfOrder(nn.Module):
    """Defined conv_b, bn_a, conv_a, bn_b; called conv_a -> bn_a -> conv_b -> bn_b (same channel counts)."""

    def __init__(self):
        super().__init__()
        self.conv_b = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(6)
        self.conv_a = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn_b(self.conv_b(torch.relu(self.bn_a(self.conv_a(x)))))


def test_pairs_come_from_dataflow_not_module_order():
    model = randomize_norms(OutOfOrder())
    x = torch.randn(2, 6, 8, 8)
    _, report = check_fold(model, x)
    assert into(report) == {"bn_a": "conv_a", "bn_b": "conv_b"}

    # the trap is real: pairing each conv with the next BN in definition order computes something else
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    wrong = copy.deepcopy(model)
    wrong.conv_b = fuse_conv_bn_eval(model.conv_b, model.bn_a)
    wrong.conv_a = fuse_conv_bn_eval(model.conv_a, model.bn_b)
    wrong.bn_a, wrong.bn_b = nn.Identity(), nn.Identity()
    with torch.no_grad():
        assert (wrong(x) - model(x)).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------------------
# never fold: each reason, with the norm still there


class TwoConsumers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv(torch.relu(self.bn1(self.conv(x)))))


def test_never_fold_batch_statistics():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    _, report = check_fold(model, torch.randn(3, 3, 6, 6))
    assert "track_running_stats=False" in reasons(report)["1"]
    assert into(report) == {"3": "2"}


def test_never_fold_a_conv_output_with_two_consumers():
    model = randomize_norms(TwoConsumers())
    _, report = check_fold(model, torch.randn(2, 3, 6, 6))
    assert "2 consumers" in reasons(report)["bn"]


def test_never_fold_into_a_conv_called_twice():
    model = randomize_norms(SharedConv())
    _, report = check_fold(model, torch.randn(2, 4, 6, 6))
    assert report.folded == []
    assert "2 places" in reasons(report)["bn1"] and "2 places" in reasons(report)["bn2"]


# ---------------------------------------------------------------------------------------------------------
# without example inputs: only pairs exact at every input rank both accept


def _unbatched_equal(model, folded, x):
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("conv, norm, x_shape", [
    # the two silent wrong results of the issue: an unbatched conv output puts channels at dim 0
    (nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6), (4, 8)),
    (nn.Conv2d(3, 6, 3), nn.BatchNorm1d(6), (3, 8, 5)),
    # more pairs whose ranks disagree and that run on some input
    (nn.ConvTranspose1d(4, 6, 3), nn.BatchNorm1d(6), (4, 4)),
    (nn.Conv3d(2, 6, 3), nn.BatchNorm2d(6), (2, 8, 5, 5)),
    (nn.Conv2d(3, 6, 3), nn.InstanceNorm1d(6, track_running_stats=True), (3, 8, 5)),
    (nn.Conv1d(4, 6, 3), nn.InstanceNorm2d(6, track_running_stats=True), (6, 4, 7)),
    (nn.Conv2d(3, 6, 3), nn.InstanceNorm3d(6, track_running_stats=True), (6, 3, 5, 5)),
    (nn.Conv3d(2, 6, 3), nn.InstanceNorm2d(6, track_running_stats=True), (2, 8, 5, 5)),
])
def test_rank_mismatch_pairs_stay_without_example_inputs(conv, norm, x_shape):
    model = randomize_norms(nn.Sequential(conv, norm))
    x = torch.randn(*x_shape)
    folded, report = check_fold(model, x, example=False)
    assert report.folded == [] and norm_names(folded) == {"1"}
    assert "dim" in reasons(report)["1"] and type(norm).__name__ in reasons(report)["1"]
    # with the shapes known the input shows it is not a batched feature map: still left
    folded, report = check_fold(model, x)
    assert report.folded == [] and norm_names(folded) == {"1"}
    assert "not a batched" in reasons(report)["1"] or "normalises dim 0" in reasons(report)["1"]


def test_instance_norm_on_an_unbatched_looking_tensor_stays_with_shapes_known():
    # (N, F) out of a Linear is an unbatched (C, L) input for InstanceNorm1d: its channels are the batch
    model = randomize_norms(nn.Sequential(nn.Linear(5, 7), nn.InstanceNorm1d(7, track_running_stats=True)))
    folded, report = check_fold(model, torch.randn(7, 5))
    assert report.folded == [] and "normalises dim 0" in reasons(report)["1"]


@pytest.mark.parametrize("conv, norm", [
    (nn.Conv1d(4, 6, 3), nn.BatchNorm2d(6)), (nn.Conv2d(4, 6, 3), nn.BatchNorm3d(6)),
    (nn.Conv3d(4, 6, 3), nn.BatchNorm1d(6)), (nn.Conv2d(4, 6, 3), nn.BatchNorm1d(6)),
])
def test_pairs_that_never_run_together_stay_with_the_rank_mismatch_named(conv, norm):
    model = randomize_norms(nn.Sequential(conv, norm))
    folded, report = fold_batchnorm(model)
    assert report.folded == [] and norm_names(folded) == {"1"}
    assert "ranks do not match" in reasons(report)["1"]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("norm_kind", ["batch", "instance"])
def test_matching_ranks_fold_without_example_inputs(dims, norm_kind):
    conv = CONV[dims](3, 6, 3)
    norm = BN[dims](6) if norm_kind == "batch" else \
        {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims](6, track_running_stats=True, affine=True)
    model = randomize_norms(nn.Sequential(conv, norm))
    x = torch.randn(2, 3, *SIZE[dims])
    folded, report = check_fold(model, x, example=False)
    assert into(report) == {"1": "0"} and norm_names(folded) == set()
    if norm_kind == "instance":  # InstanceNorm takes the unbatched conv output too, channels at dim 0 for both
        _unbatched_equal(model, folded, x[0])


def test_conv1d_batchnorm1d_folds_once_the_input_is_known_batched():
    model = randomize_norms(nn.Sequential(nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6)))
    _, report = check_fold(model, torch.randn(4, 8), example=False)
    assert "pass example_inputs" in reasons(report)["1"]
    folded, report = check_fold(model, torch.randn(2, 4, 8))
    assert into(report) == {"1": "0"} and norm_names(folded) == set()
    conv_in = randomize_norms(nn.Sequential(nn.Conv1d(4, 6, 3), nn.InstanceNorm1d(6, track_running_stats=True)))
    folded, report = check_fold(conv_in, torch.randn(4, 8), example=False)  # channels at dim 0 unbatched too
    assert into(report) == {"1": "0"}


# ---------------------------------------------------------------------------------------------------------
# one norm after several layers


class SharedNorm(nn.Module):
    def __init__(self, conv1, conv2, norm, tap=False):
        super().__init__()
        self.conv1, self.conv2, self.bn = conv1, conv2, norm
        self.tap = tap

    def forward(self, x):
        a = self.conv1(x)
        out = self.bn(a) + self.bn(self.conv2(x))
        return out + a if self.tap else out


def test_one_norm_after_two_convs_folds_into_both_and_is_reported_once():
    model = randomize_norms(SharedNorm(nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)))
    for example in (True, False):
        folded, report = check_fold(model, torch.randn(2, 3, 6, 6), example=example)
        assert report.folded == [{"norm": "bn", "into": "conv1, conv2"}] and report.unfolded == []
        assert norm_names(folded) == set()


def test_one_norm_after_two_convs_stays_when_one_conv_output_is_used_elsewhere():
    model = randomize_norms(SharedNorm(nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), tap=True))
    folded, report = check_fold(model, torch.randn(2, 3, 6, 6))
    assert report.folded == [] and len(report.unfolded) == 1
    assert "2 places" in reasons(report)["bn"] and "'conv1' has 2 consumers" in reasons(report)["bn"]
    assert norm_names(folded) == {"bn"}
    for name in ("conv1", "conv2"):  # neither conv changed: the norm still runs after both
        assert torch.equal(folded.get_submodule(name).weight, model.get_submodule(name).weight)


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(dims=st.integers(1, 3), transposed=st.booleans(), groups=st.sampled_from([1, 2]),
       channels=st.integers(1, 3), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_property_shared_norm_folds_into_every_producer(dims, transposed, groups, channels, bias, seed):
    out_ch, in_ch = groups * channels, groups * 2
    make = CONVT[dims] if transposed else CONV[dims]
    torch.manual_seed(seed)
    model = SharedNorm(make(in_ch, out_ch, 3, groups=groups, bias=bias), make(in_ch, out_ch, 3, groups=groups),
                       BN[dims](out_ch)).double()
    model = randomize_norms(model, seed=seed)
    x = torch.randn(2, in_ch, *SIZE[dims], dtype=torch.float64)
    folded, report = fold_batchnorm(model, example_inputs=(x,))
    assert into(report) == {"bn": "conv1, conv2"} and norm_names(folded) == set()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))  # float64 tolerances


# ---------------------------------------------------------------------------------------------------------
# one-channel norm after a Linear: broadcast


def test_linear_then_one_channel_norm_folds_by_broadcasting():
    model = randomize_norms(nn.Sequential(nn.Linear(20, 8), nn.BatchNorm1d(1)))
    x = torch.randn(5, 1, 20)
    _, report = check_fold(model, x, example=False)  # the rank is unknown: left
    assert report.folded == [] and "1" in reasons(report)
    folded, report = check_fold(model, x)
    assert into(report) == {"1": "0"} and norm_names(folded) == set()
    assert folded.get_submodule("0").weight.shape == (8, 20)


def test_linear_then_norm_with_several_channels_on_3d_input_stays():
    model = randomize_norms(nn.Sequential(nn.Linear(20, 8), nn.BatchNorm1d(3)))
    folded, report = check_fold(model, torch.randn(5, 3, 20))
    assert report.folded == [] and norm_names(folded) == {"1"}


@settings(max_examples=25, deadline=None)
@given(in_f=st.integers(1, 6), out_f=st.integers(2, 6), batch=st.integers(1, 4), length_dims=st.integers(0, 2),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_property_one_channel_norm_broadcast_fold_is_exact(in_f, out_f, batch, length_dims, bias, seed):
    torch.manual_seed(seed)
    norm = BN[length_dims + 1](1)  # BatchNorm1d on (N, 1, F), 2d on (N, 1, L, F), 3d on (N, 1, L, L, F)
    model = randomize_norms(nn.Sequential(nn.Linear(in_f, out_f, bias=bias), norm).double(), seed=seed)
    x = torch.randn(batch, 1, *([3] * length_dims), in_f, dtype=torch.float64)
    folded, report = fold_batchnorm(model, example_inputs=(x,))
    assert into(report) == {"1": "0"} and norm_names(folded) == set()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


def test_never_fold_non_float_dtypes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1),
                          nn.BatchNorm2d(4)).eval()
    model[0].weight = nn.Parameter(torch.randint(-3, 3, (4, 3, 3, 3), dtype=torch.int32), requires_grad=False)
    model[3].running_var = torch.ones(4, dtype=torch.int64)
    folded, report = fold_batchnorm(model)
    assert "non-float" in reasons(report)["1"] and "non-float" in reasons(report)["3"]
    assert norm_names(folded) == {"1", "3"}


def test_never_fold_a_norm_whose_input_is_not_a_conv_output():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU(),
                                          nn.Conv2d(4, 4, 1)))
    _, report = check_fold(model, torch.randn(2, 3, 6, 6))
    assert "not the output of a conv" in reasons(report)["2"]


def test_never_fold_a_norm_before_a_zero_padded_conv():
    model = randomize_norms(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1),
                                          nn.ReLU(), nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 4, 3, stride=2)))
    _, report = check_fold(model, torch.randn(2, 4, 6, 6))
    assert "zeros" in reasons(report)["1"]
    assert "transposed" in reasons(report)["4"]
    assert report.folded == []


def test_never_fold_across_hooks():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model[0].register_forward_hook(lambda module, args, out: out * 2)
    _, report = check_fold(model, torch.randn(2, 3, 6, 6))
    assert "hooks" in reasons(report)["1"]


# ---------------------------------------------------------------------------------------------------------
# the contract of the function


def test_refuses_a_model_in_training_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(NormcliError, match=r"model\.eval\(\)"):
        fold_batchnorm(model)
    model.eval()
    model[1].train()
    with pytest.raises(NormcliError, match="'1'"):
        fold_batchnorm(model)


def test_example_inputs_the_model_cannot_take_are_an_error():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(NormcliError, match="example inputs"):
        fold_batchnorm(model, example_inputs=torch.randn(2, 5, 8, 8))


def test_pure_by_default_and_inplace_on_request():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fold_batchnorm(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[1], nn.BatchNorm2d)

    folded, _ = fold_batchnorm(model, inplace=True)
    assert folded.get_submodule("0") is model[0] and not torch.equal(model[0].weight, state["0.weight"])


def test_folded_graph_module_keeps_signature_and_saves(tmp_path):
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor, y: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
            return self.bn(self.conv(x)) * scale + y

    model = randomize_norms(TwoInputs())
    x, y = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 4, 4)
    folded, report = check_fold(model, (x, y))
    original_params = inspect.signature(model.forward).parameters
    folded_params = inspect.signature(folded.forward).parameters
    assert list(folded_params) == list(original_params)
    assert folded_params["scale"].default == 2.0
    path = tmp_path / "folded.pt"
    torch.save(folded, path)
    loaded = torch.load(path, weights_only=False)
    assert "bn" not in dict(loaded.named_modules())
    torch.testing.assert_close(loaded(x, y, 3.0), model(x, y, 3.0))


def test_weights_are_folded_in_float64_and_rounded_once():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-4)), min_var=1e-4)
        model = model.to(dtype)
        conv, bn = model[0], model[1]
        w, b = conv.weight.double(), conv.bias.double()
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        shift = bn.bias.double() - bn.running_mean.double() * scale
        folded, _ = fold_batchnorm(model)
        assert folded.get_submodule("0").weight.dtype == dtype
        assert torch.equal(folded.get_submodule("0").weight, (w * scale.reshape(-1, 1, 1, 1)).to(dtype))
        assert torch.equal(folded.get_submodule("0").bias, (b * scale + shift).to(dtype))


# ---------------------------------------------------------------------------------------------------------
# fallback when torch.fx cannot trace


class ShapeBranch(nn.Module):
    """Python control flow on a shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.deconv = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)
        self.bn2 = nn.BatchNorm2d(4)
        self.pre = nn.BatchNorm2d(4)
        self.conv1d = nn.Conv1d(4, 4, 3, groups=2)
        self.bn1d = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)
        self.bn_fc = nn.BatchNorm1d(3)

    def forward(self, x):
        x = self.bn(self.conv(x))
        if x.shape[-1] > 4:
            x = torch.relu(self.bn2(self.deconv(x)))
        x = self.pre(x)
        x = self.bn1d(self.conv1d(x.flatten(2)))
        return self.bn_fc(self.fc(x.mean(2)))


def test_untraceable_model_folds_on_its_torch_export_graph():
    model = randomize_norms(ShapeBranch())
    x = torch.randn(2, 3, 9, 9)
    folded, report = fold_batchnorm(model, example_inputs=(x,))
    assert report.method == "export" and "torch.fx" in report.note
    assert into(report) == {"bn": "conv", "bn2": "deconv", "bn1d": "conv1d", "bn_fc": "fc"}
    assert "not the output of a conv" in reasons(report)["pre"]
    names = dict(folded.named_modules())
    assert "bn" not in names and "bn2" not in names and "pre" in names
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
        other_batch = torch.randn(5, 3, 9, 9)
        torch.testing.assert_close(folded(other_batch), model(other_batch), rtol=1e-4, atol=1e-5)


class SharedNormShapeBranch(SharedNorm):
    """SharedNorm with control flow on a shape: folded on the torch.export graph."""

    def forward(self, x):
        out = self.bn(self.conv1(x)) + self.bn(self.conv2(x))
        return out * 2 if x.shape[-1] > 4 else out


def test_torch_export_fallback_reports_a_norm_called_twice_once():
    model = randomize_norms(SharedNormShapeBranch(nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 6, 6)
    folded, report = fold_batchnorm(model, example_inputs=(x,))
    assert report.method == "export"
    assert [u["norm"] for u in report.unfolded] == ["bn"] and report.folded == []
    assert "bn" in dict(folded.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


def test_untraceable_model_without_example_inputs_folds_nothing_and_says_why():
    model = randomize_norms(ShapeBranch())
    folded, report = fold_batchnorm(model)
    assert report.method == "none" and report.folded == []
    assert set(reasons(report)) == {"bn", "bn2", "pre", "bn1d", "bn_fc"}
    assert all("example_inputs" in r for r in reasons(report).values())
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(folded(x), model(x))


# ---------------------------------------------------------------------------------------------------------
# the sample models


def _sample_models():
    models = pytest.importorskip("samples.models")
    return models.MODELS


@pytest.mark.slow
def test_every_sample_model_folds_exactly():
    for name, (factory, shape) in _sample_models().items():
        torch.manual_seed(0)
        model = factory()
        with torch.no_grad():  # calibrate statistics on data, then make them non-trivial
            model.train()
            for _ in range(2):
                model(torch.randn(*shape) * 2 + 0.5)
        randomize_norms(model, seed=len(name))
        x = torch.randn(*shape)
        _, report = check_fold(model, x, rtol=1e-4, atol=1e-4)
        assert report.method == "fx", name


# ---------------------------------------------------------------------------------------------------------
# property: random layer + norm configurations fold within tolerance of a float64 evaluation


@st.composite
def layer_and_norm(draw):
    kind = draw(st.sampled_from(["conv", "convT", "linear", "norm-conv"]))
    dims = 0 if kind == "linear" else draw(st.integers(1, 3))
    groups = 1 if kind == "linear" else draw(st.sampled_from([1, 2, 3]))
    in_ch = groups * draw(st.integers(1, 3))
    out_ch = groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    affine = draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    log_var_min = draw(st.floats(-5, 0))
    mean_scale = draw(st.sampled_from([0.0, 1.0, 10.0]))
    seed = draw(st.integers(0, 2**16))
    if kind == "linear":
        layer = nn.Linear(in_ch, out_ch, bias=bias)
        norm, channels, x_shape = nn.BatchNorm1d(out_ch, eps=eps, affine=affine), out_ch, (3, in_ch)
    else:
        size = tuple(draw(st.integers(5, 7)) for _ in range(dims))
        x_shape = (2, in_ch, *size)
        if kind == "convT":
            layer = CONVT[dims](in_ch, out_ch, kernel, stride=stride, dilation=dilation, groups=groups, bias=bias,
                                output_padding=stride - 1 if dilation > 1 or stride == 1 else 0)
        else:
            padding = 0 if kind == "norm-conv" else draw(st.integers(0, 1))
            layer = CONV[dims](in_ch, out_ch, kernel, stride=stride, dilation=dilation, groups=groups, bias=bias,
                               padding=padding)
        channels = in_ch if kind == "norm-conv" else out_ch
        norm = BN[dims](channels, eps=eps, affine=affine)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.running_var.copy_(10 ** (log_var_min + 3 * torch.rand(channels, generator=g)))
        norm.running_mean.copy_(torch.randn(channels, generator=g) * mean_scale)
        if affine:
            norm.weight.copy_(torch.randn(channels, generator=g) * 2)
            norm.bias.copy_(torch.randn(channels, generator=g))
    model = nn.Sequential(norm, layer) if kind == "norm-conv" else nn.Sequential(layer, norm)
    return model.eval(), x_shape, seed


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(layer_and_norm())
def test_property_random_configurations_fold_within_tolerance(case):
    model, x_shape, seed = case
    x = torch.randn(*x_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())

        # the fold math itself, in float64: equal to rounding
        folded64, report = fold_batchnorm(copy.deepcopy(model).double(), example_inputs=(x.double(),))
        assert len(report.folded) == 1, report.unfolded
        assert norm_names(folded64) == set()
        torch.testing.assert_close(folded64(x.double()), reference, rtol=1e-9, atol=1e-9 * reference.abs().max())

        # the float32 model: within float32 accuracy of the float64 evaluation
        folded32, _ = fold_batchnorm(model, example_inputs=(x,))
        out = folded32(x).double()
        scale = reference.abs().max().item() + 1e-12
        assert (out - reference).abs().max().item() <= 1e-4 * scale
