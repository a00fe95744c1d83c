"""recalibrate(): exact population statistics, checked against an independent float64 reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normcli.errors import NormcliError
from normcli.layers import MABN2d
from normcli.recalibrate import batch_moments, recalibrate

RTOL = 1e-6


class Net2d(nn.Module):
    """Every norm family recalibrate handles, behind convolutions, with a dropout that must stay in eval."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(5, affine=True, track_running_stats=True)
        self.conv3 = nn.Conv2d(5, 4, 3, padding=1)
        self.mabn = MABN2d(4, B=2, real_B=4)
        self.sync = nn.SyncBatchNorm(4)
        self.fc = nn.Linear(4, 7)
        self.bn1d = nn.BatchNorm1d(7)
        self.frozen = nn.BatchNorm1d(7, track_running_stats=False)   # nothing to recalibrate
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        x = self.drop(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.inorm(self.conv2(x)))
        x = self.sync(self.mabn(self.conv3(x)))
        x = self.bn1d(self.fc(x.mean((2, 3))))
        return self.head(torch.relu(self.frozen(x)))


class Net13d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.bn = nn.BatchNorm1d(3, momentum=None)
        self.conv3d = nn.Conv3d(3, 2, 1)
        self.bn3d = nn.BatchNorm3d(2)

    def forward(self, x):
        y = self.bn(self.conv(x))                       # (N, C, L)
        return self.bn3d(self.conv3d(y[:, :, None, :, None].expand(-1, -1, 2, -1, 3).contiguous()))


def _seeded(cls, seed):
    torch.manual_seed(seed)
    model = cls().double().float()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if "running_mean" in name:
                buf.uniform_(-2, 2)
            elif "running_var" in name:
                buf.uniform_(0.1, 3)
    return model.eval()


def _batches(shape_tail, sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    channels = shape_tail[0]
    offset = torch.linspace(-3, 5, channels).view([1, channels] + [1] * (len(shape_tail) - 1))
    scale = torch.linspace(0.5, 4, channels).view_as(offset)
    return [(torch.randn((n, *shape_tail), generator=gen, dtype=torch.float64) * scale + offset + 100.0 * 0)
            .float() for n in sizes]


def _reference(model, batches, forward):
    """Population statistics of every tracking norm's input, from inputs captured by forward hooks and
    reduced all at once in float64. ``forward="batch"``: the norms run in train mode (batch statistics),
    everything else in eval; ``"running"``: the whole model in eval."""
    model = copy.deepcopy(model).eval()
    captured: dict[str, list] = {}
    norms = {name: m for name, m in model.named_modules()
             if isinstance(m, MABN2d) or (isinstance(m, (nn.modules.batchnorm._BatchNorm,
                                                         nn.modules.instancenorm._InstanceNorm))
                                          and m.track_running_stats)}
    for name, m in norms.items():
        m.register_forward_pre_hook(lambda mod, args, name=name: captured.setdefault(name, []).append(
            args[0].detach().double().clone()))
        if forward == "batch":
            m.train()
            if isinstance(m, MABN2d):
                m.warmup_iters = 10 ** 9          # the training step then normalises by this batch's mean(x^2)
    with torch.no_grad():
        for b in batches:
            model(b)
    stats = {}
    for name, xs in captured.items():
        x = torch.cat(xs)
        dims = [0] + list(range(2, x.dim()))
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        if isinstance(norms[name], MABN2d):
            stats[name] = (None, (flat * flat).mean(1))
        else:
            stats[name] = (flat.mean(1), flat.var(1, correction=1))
        del dims
    return stats


def _assert_matches(model, ref, mabn=("mabn",)):
    for name, (mean, var) in ref.items():
        module = model.get_submodule(name)
        std = var.sqrt()
        if mean is not None:
            torch.testing.assert_close(module.running_mean.double(), mean, rtol=RTOL, atol=RTOL * float(std.max()))
        torch.testing.assert_close(module.running_var.double(), var, rtol=RTOL, atol=0)


@pytest.mark.parametrize("forward", ["batch", "running"])
@pytest.mark.parametrize("seed", [0, 1])
def test_statistics_are_the_population_statistics_of_each_norms_input(forward, seed):
    model = _seeded(Net2d, seed)
    batches = _batches((3, 8, 8), [5, 16, 3, 9, 2], seed)    # unequal sizes: every sample weighs the same
    # the first batch is held out for eval_change, the rest are the statistics
    ref = _reference(model, batches[1:], forward)
    result, report = recalibrate(model, batches, forward=forward)
    _assert_matches(result, ref)
    assert report.samples == 16 + 3 + 9 + 2 and report.batches == 4 and report.held_out
    assert sorted(layer.name for layer in report.layers) == sorted(ref) == ["bn1", "bn1d", "inorm", "mabn", "sync"]
    assert all(result.get_submodule(n).num_batches_tracked.item() == 4 for n in ("bn1", "bn1d", "sync", "inorm"))
    assert result.frozen.running_mean is None


def test_bn1d_on_sequences_and_bn3d():
    model = _seeded(Net13d, 3)
    batches = _batches((2, 11), [4, 7, 7, 1], 3)
    ref = _reference(model, batches[1:], "batch")
    result, _ = recalibrate(model, batches)
    _assert_matches(result, ref)


def test_not_the_mean_of_per_batch_variances():
    # what update_bn-style averaging gives differs from the population variance by far more than the tolerance
    torch.manual_seed(0)
    bn = nn.Sequential(nn.BatchNorm1d(2)).eval()
    batches = [torch.zeros(1, 2)] + [torch.randn(n, 2) + shift for n, shift in ((10, 0.0), (2, 5.0), (30, -1.0))]
    result, _ = recalibrate(bn, batches)
    x = torch.cat(batches[1:]).double()
    torch.testing.assert_close(result[0].running_var.double(), x.var(0), rtol=RTOL, atol=0)
    averaged = torch.stack([b.double().var(0) for b in batches[1:]]).mean(0)
    assert ((result[0].running_var.double() - averaged).abs() / averaged > 0.1).all()


def test_large_mean_does_not_cancel_the_variance():
    x = torch.randn(4096, 3, dtype=torch.float64) * 1e-3 + 1e4
    n, mean, m2 = batch_moments(x.float())
    ref = x.float().double()
    torch.testing.assert_close(m2 / (n - 1), ref.var(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(mean, ref.mean(0), rtol=0, atol=1e-6 * 1e-3)   # to a millionth of the std
    # over many batches too: the shifts and Chan's merge keep it
    from normcli.recalibrate import _Moments

    acc = _Moments(3)
    for part in x.float().split(100):
        acc.add(part)
    torch.testing.assert_close(acc.m2 / (acc.n - 1), ref.var(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(acc.mean, ref.mean(0), rtol=0, atol=1e-6 * 1e-3)


@pytest.mark.parametrize("shape, channels_last", [((8, 4, 256, 256), False), ((8, 4, 256, 256), True),
                                                  ((40000, 3), False), ((64, 3, 2000), False)])
@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_batch_moments_of_large_activations_in_any_layout(shape, channels_last, offset):
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5 + offset
    x = x64.float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = x.double()
    dims = [0] + list(range(2, x.dim()))
    n, mean, m2 = batch_moments(x)
    assert n == x.numel() // x.shape[1]
    torch.testing.assert_close(m2 / n, ref.var(dims, correction=0), rtol=1e-6, atol=0)
    torch.testing.assert_close(mean, ref.mean(dims), rtol=0, atol=1e-6 * 0.5)


def test_parameters_and_other_buffers_are_bit_identical_and_the_input_model_untouched():
    model = _seeded(Net2d, 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result, _ = recalibrate(model, _batches((3, 8, 8), [4, 4, 4], 5))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k                       # pure: the argument is not modified
    changed = {k for k, v in result.state_dict().items() if not torch.equal(v, before[k])}
    for k in result.state_dict():
        if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked"):
            continue
        assert torch.equal(result.state_dict()[k], before[k]), k  # weights, MABN iters/buffers
    assert {k.rsplit(".", 1)[0] for k in changed} == {"bn1", "inorm", "mabn", "sync", "bn1d"}
    assert not result.training and all(not m.training for m in result.modules())
    assert "forward" not in vars(result.bn1)                      # the pass's forward is gone


def test_include_exclude_and_eval_change():
    model = _seeded(Net2d, 6)
    batches = _batches((3, 8, 8), [6, 6, 6], 6)
    result, report = recalibrate(model, batches, include=["bn*"], exclude=["bn1d"])
    assert [layer.name for layer in report.layers] == ["bn1"]
    assert torch.equal(result.bn1d.running_mean, model.bn1d.running_mean)
    with torch.no_grad():
        change = (result(batches[0]) - model(batches[0])).abs().max().item()
    assert report.eval_change["max_abs"] == pytest.approx(change, rel=1e-6)
    with pytest.raises(NormcliError, match="leave none"):
        recalibrate(model, batches, include=["nothing*"])


def test_single_batch_source_is_used_for_statistics_and_eval_change():
    model = _seeded(Net13d, 1)
    (batch,) = _batches((2, 11), [9], 1)
    result, report = recalibrate(model, [batch])
    assert not report.held_out and report.batches == 1 and report.samples == 9
    _assert_matches(result, _reference(model, [batch], "batch"))


def test_bad_inputs_are_errors():
    model = _seeded(Net2d, 2)
    with pytest.raises(NormcliError, match="empty"):
        recalibrate(model, [])
    with pytest.raises(NormcliError, match="does not run on batch"):
        recalibrate(model, [torch.randn(2, 4, 8, 8)] * 2)
    bad = torch.randn(4, 3, 8, 8)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(NormcliError, match="non-finite"):
        recalibrate(model, [torch.randn(4, 3, 8, 8), bad])
    with pytest.raises(NormcliError, match="no norm layer"):
        recalibrate(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), [torch.randn(3, 2)])
