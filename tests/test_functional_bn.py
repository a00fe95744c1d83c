"""``F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False)`` in a forward:
found by the fx dataflow, folded into the conv before it like a BatchNorm module, listed by inspect --arch as
kind ``functional``; where it cannot fold, the report says why."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normcli.fold import fold_batchnorm
from tests.timm_like import FunctionalBN, functional_net, randomise


def x64(shape=(2, 3, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def model_graph(model):
    return torch.fx.symbolic_trace(model)


def batch_norm_calls(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.batch_norm]


def test_functional_batch_norm_folds_into_the_conv_before_it():
    model, x = randomise(functional_net().double()), x64()
    want = model(x)
    folded, report = fold_batchnorm(model, example_inputs=x)
    assert report.folded == [{"norm": "block", "into": "block.conv"}] and report.unfolded == []
    assert batch_norm_calls(folded) == []
    assert sorted(folded.state_dict()) == ["block.conv.bias", "block.conv.weight", "head.bias", "head.weight"]
    torch.testing.assert_close(folded(x), want)
    assert model.block.running_mean.abs().sum() > 0  # the original is untouched (fold works on a copy)


def test_functional_batch_norm_at_the_root_is_named_by_its_call():
    model, x = randomise(FunctionalBN().double()), x64()
    folded, report = fold_batchnorm(model, example_inputs=x)
    assert report.folded == [{"norm": "F.batch_norm call batch_norm", "into": "conv"}]
    torch.testing.assert_close(folded(x), model(x))


class Training(FunctionalBN):
    def forward(self, x):
        return F.batch_norm(self.conv(x), self.running_mean, self.running_var, self.weight, self.bias, training=True)


class AfterRelu(FunctionalBN):
    def forward(self, x):
        return F.batch_norm(torch.relu(self.conv(x)), self.running_mean, self.running_var, self.weight, self.bias)


class StatsReadTwice(FunctionalBN):
    def forward(self, x):
        y = self.conv(x)
        stats = (self.running_mean, self.running_var, self.weight, self.bias)
        return F.batch_norm(y, *stats) - F.batch_norm(y * 2, *stats)


class ComputedWeight(FunctionalBN):
    def forward(self, x):
        return F.batch_norm(self.conv(x), self.running_mean, self.running_var, self.weight * 2, self.bias)


class NoStats(FunctionalBN):
    def forward(self, x):
        return F.batch_norm(self.conv(x), None, None, self.weight, self.bias, training=True)


@pytest.mark.parametrize("cls, reason", [
    (Training, "it is called with training=True: it normalises with each batch's own statistics"),
    (AfterRelu, "its input is not the output of a conv or linear"),
    (StatsReadTwice, "its running_mean ('running_mean') is read at more than one place"),
    (ComputedWeight, "its weight is computed in the graph, not a stored tensor"),
    (NoStats, "it is called with training=True: it normalises with each batch's own statistics"),
])
def test_functional_batch_norm_that_cannot_fold_says_why(cls, reason):
    model, x = randomise(cls().double()), x64()
    want = model(x)
    folded, report = fold_batchnorm(model, example_inputs=x)
    calls = len(batch_norm_calls(model_graph(model)))
    assert report.folded == []
    assert report.unfolded == [{"norm": f"F.batch_norm call {node.name}", "reason": reason}
                               for node in batch_norm_calls(folded)]
    assert len(batch_norm_calls(folded)) == calls
    torch.testing.assert_close(folded(x), want)


def test_functional_batch_norm_after_an_unbatched_conv_input_is_not_folded_without_shapes():
    """A conv also takes an unbatched (C, H, W) input, where F.batch_norm would normalise H: without example
    inputs the fold cannot tell, and says so."""
    model = randomise(functional_net().double())
    folded, report = fold_batchnorm(model)
    assert report.folded == []
    assert "F.batch_norm normalises dim 1, not the channels" in report.unfolded[0]["reason"]


def test_inspect_arch_lists_the_functional_norm(cli, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(randomise(functional_net()).state_dict(), path)
    code, out, err = cli("inspect", path, "--arch", "tests/timm_like.py:functional_net", "--json")
    assert code == 0, err
    layers = json.loads(out)["layers"]
    assert [(x["name"], x["kind"], x["inferred"], x["num_features"]) for x in layers] == [
        ("block", "functional", False, 6)]
    # without --arch nothing says how the statistics are used: the kind is inferred from the buffer names
    code, out, err = cli("inspect", path, "--json")
    assert [(x["kind"], x["inferred"]) for x in json.loads(out)["layers"]] == [("FrozenBatchNorm", True)]


def test_fuse_export_folds_the_functional_norm_and_passes_parity(cli, tmp_path):
    path, out = tmp_path / "sd.pt", tmp_path / "m.onnx"
    torch.save(randomise(functional_net()).state_dict(), path)
    code, stdout, err = cli("fuse-export", path, "--arch", "tests/timm_like.py:functional_net", "-o", out,
                            "--input-shape", "1,3,16,16", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["folded"] == [{"norm": "block", "into": "block.conv"}]
    assert report["parity"]["passed"] and report["onnx"]["batchnorm_nodes"] == 0 and out.exists()


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.register_buffer("running_mean", torch.zeros(4))
        self.register_buffer("running_var", torch.ones(4))

    def forward(self, x):
        return F.batch_norm(self.fc(x), self.running_mean, self.running_var)


def test_functional_batch_norm_without_affine_folds_into_a_linear():
    model = randomise(Linear().double())
    x = x64((3, 5))
    folded, report = fold_batchnorm(model, example_inputs=x)
    assert report.folded == [{"norm": "F.batch_norm call batch_norm", "into": "fc"}]
    torch.testing.assert_close(folded(x), model(x))
