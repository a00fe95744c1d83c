"""swap --to bn | syncbn | frozen | gn: which modules change, what the swapped model computes, and the files."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from normcli.layers import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from normcli.swap import SWAP_TARGETS, gn_groups, swap_norms
from samples.models import MODELS

# (model name, input shape): BatchNorm1d on (N, C) and (N, C, L), BatchNorm2d, BatchNorm3d
RANKS = [("mlp_head", (4, 32)), ("conv1d_net", (4, 4, 32)), ("resnet_tiny", (4, 3, 32, 32)),
         ("conv3d_net", (4, 2, 8, 8, 8))]


def seeded(name: str) -> nn.Module:
    """A sample model with random, non-default statistics and affine parameters (float64 draws)."""
    torch.manual_seed(0)
    model = MODELS[name][0]()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.num_batches_tracked.fill_(7)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
    return model.eval()


def batch(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(2))


def norm_types(model) -> list[type]:
    return [type(m) for m in model.modules()
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, FrozenBatchNorm2d.__mro__[1]))]


def float32_tolerance(out: torch.Tensor) -> dict:
    # a few float32 roundings per layer, relative to the output's scale
    eps = torch.finfo(torch.float32).eps
    return {"rtol": 64 * eps, "atol": 64 * eps * out.abs().max().item()}


@pytest.mark.parametrize("name, shape", RANKS)
def test_syncbn_then_bn_round_trip_is_exact_at_every_rank(name, shape):
    model, x = seeded(name), batch(shape)
    want = model(x)
    sync, report = swap_norms(model, "syncbn", input_shape=shape)
    assert all(t is nn.SyncBatchNorm for t in norm_types(sync)) and not report.skipped
    assert report.eval_drift == {"max_abs": 0.0, "max_rel": 0.0}
    back, report = swap_norms(sync, "bn", input_shape=shape)
    original = [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norm_types(back) == original  # BatchNorm1d/2d/3d by the rank each saw
    assert report.eval_drift == {"max_abs": 0.0, "max_rel": 0.0}
    torch.testing.assert_close(back(x), want, rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key  # counters included


def test_bn_leaves_plain_batchnorm_and_says_why():
    _, report = swap_norms(seeded("resnet_tiny"), "bn", input_shape=(1, 3, 32, 32))
    assert report.replaced == [] and len(report.skipped) == 11
    assert all("already a BatchNorm2d" in s["reason"] for s in report.skipped)


@pytest.mark.parametrize("name, shape", RANKS)
def test_frozen_keeps_the_eval_output_and_never_changes(name, shape):
    model, x = seeded(name), batch(shape)
    want = model(x)
    frozen, report = swap_norms(model, "frozen", input_shape=shape)
    kinds = set(norm_types(frozen))
    assert kinds and kinds <= {FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d}
    assert report.train_check["passed"]
    got = frozen(x)
    torch.testing.assert_close(got, want, **float32_tolerance(want))
    # nothing of a frozen layer trains or updates, in train mode too
    frozen_layers = [m for m in frozen.modules() if isinstance(m, (FrozenBatchNorm1d, FrozenBatchNorm2d,
                                                                  FrozenBatchNorm3d))]
    assert all(not list(m.parameters()) for m in frozen_layers)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    frozen.train()(x)
    assert all(torch.equal(frozen.state_dict()[k], v) for k, v in before.items())


def test_frozen_skips_a_batchnorm_without_statistics():
    _, report = swap_norms(seeded("no_track_stats"), "frozen", input_shape=(2, 3, 16, 16))
    assert any("track_running_stats=False" in s["reason"] for s in report.skipped)


class TorchvisionFrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d, rebuilt from its published structure (torchvision cannot be
    installed beside this torch): four buffers, num_batches_tracked dropped on load."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x):
        w, b = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
        rv, rm = self.running_var.reshape(1, -1, 1, 1), self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


def test_frozen_state_dict_moves_to_torchvisions_layout_and_back():
    bn = seeded("resnet_tiny").bn1
    ours = FrozenBatchNorm2d.from_batchnorm(bn)
    theirs = TorchvisionFrozenBatchNorm2d(bn.num_features)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = batch((2, bn.num_features, 5, 5))
    torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=0)
    again = FrozenBatchNorm2d(bn.num_features)
    again.load_state_dict(theirs.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))
    again.load_state_dict(bn.state_dict(), strict=True)  # a BatchNorm's own state dict, counter dropped


@pytest.mark.parametrize("channels, asked, groups", [(8, 32, 8), (24, 32, 24), (48, 32, 24), (64, 32, 32),
                                                     (7, 4, 1), (12, 5, 4)])
def test_gn_groups_is_the_largest_divisor_not_above_the_ask(channels, asked, groups):
    assert gn_groups(channels, asked) == groups
    assert channels % groups == 0 and all(channels % g for g in range(groups + 1, asked + 1) if g <= channels)


def test_gn_carries_weight_and_bias_reports_groups_and_trains():
    model = seeded("resnet_tiny")
    swapped, report = swap_norms(model, "gn", input_shape=(2, 3, 32, 32), groups=4)
    gns = {n: m for n, m in swapped.named_modules() if isinstance(m, nn.GroupNorm)}
    assert len(gns) == 11 and not any(isinstance(m, nn.BatchNorm2d) for m in swapped.modules())
    for entry in report.replaced:
        gn, bn = gns[entry["name"]], model.get_submodule(entry["name"])
        assert entry["groups"] == gn.num_groups == 4
        assert torch.equal(gn.weight, bn.weight) and torch.equal(gn.bias, bn.bias) and gn.eps == bn.eps
    assert report.train_check["passed"] and report.eval_drift["max_abs"] > 0  # another function: drift shown


def test_gn_skips_a_degenerate_group_of_one_value():
    _, report = swap_norms(seeded("mlp_head"), "gn", input_shape=(2, 32), groups=1024)
    assert report.replaced == [] and "bias alone" in report.skipped[0]["reason"]


@pytest.mark.slow
@pytest.mark.parametrize("to, extra", [("frozen", []), ("syncbn", []), ("gn", ["--groups", "4"])])
def test_cli_swap_writes_a_file_that_the_recipe_rebuilds(run_normcli, samples, tmp_path, to, extra):
    out = tmp_path / f"{to}.pt"
    done = run_normcli("swap", samples / "resnet_tiny.pt", "--arch", "samples/models.py:resnet_tiny", "--to", to,
                       "-o", out, "--input-shape", "1,3,32,32", "--json", *extra)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report["replaced"]) == 11 and report["output"] == str(out)
    saved = torch.load(out, weights_only=True)
    meta = saved["normcli_swap"]
    rebuilt, _ = swap_norms(MODELS["resnet_tiny"][0]().eval(), meta["to"], **meta["options"])
    rebuilt.load_state_dict(saved["state_dict"], strict=True)
    # and the file is an ordinary input for the other commands
    done = run_normcli("inspect", out, "--arch", "samples/models.py:resnet_tiny", "--json")
    assert done.returncode == 0, done.stderr


def test_cli_refuses_impossible_options(run_normcli, samples, tmp_path):
    out = tmp_path / "x.pt"
    done = run_normcli("swap", samples / "resnet_tiny.pt", "--arch", "samples/models.py:resnet_tiny", "--to", "gn",
                       "--groups", "0", "-o", out)
    assert done.returncode == 2 and "--groups must be a positive integer" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()
    done = run_normcli("swap", samples / "resnet_tiny.pt", "--arch", "samples/models.py:resnet_tiny", "--to",
                       "frozen", "--groups", "4", "-o", out)
    assert done.returncode == 2 and not out.exists()


def test_frozen_model_folds_in_fuse_export(tmp_path, samples, run_normcli):
    from normcli.fold import fold_batchnorm

    frozen, _ = swap_norms(seeded("resnet_tiny"), "frozen", input_shape=(1, 3, 32, 32))
    x = batch((2, 3, 32, 32))
    folded, report = fold_batchnorm(frozen, example_inputs=(x,))
    assert len(report.folded) == 11 and not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
    want = frozen(x)
    torch.testing.assert_close(folded(x), want, **float32_tolerance(want))


def test_every_target_is_in_the_cli_help(run_normcli):
    text = run_normcli("swap", "--help").stdout
    assert "|".join(SWAP_TARGETS) in text
