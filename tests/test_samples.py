"""The sample models have the structures they claim, and the committed sample files are what they claim."""

from __future__ import annotations

import operator
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `samples` is a directory of the repository, not of the package
    sys.path.insert(0, str(REPO_ROOT))

from samples import make_samples  # noqa: E402
from samples.models import MODELS  # noqa: E402

SAMPLES = REPO_ROOT / "samples"
SAMPLE_FILES = [
    "resnet_tiny.pt",
    "resnet_tiny_legacy.pt",
    "resnet_tiny.ckpt",
    "resnet_tiny_dp.pt",
    "resnet_tiny.safetensors",
    "resnet_tiny_full.pt",
    "resnet_tiny_script.pt",
    "resnet_tiny.pt2",
    "resnet_tiny.onnx",
    "mobilenetv2_tiny.pt",
    "mobilenetv2_tiny_ema.pth",
    "unhealthy.pt",
]
# files whose tensors torch.load(weights_only=True) reads; the determinism test compares them
STATE_FILES = [
    "resnet_tiny.pt",
    "resnet_tiny_legacy.pt",
    "resnet_tiny.ckpt",
    "resnet_tiny_dp.pt",
    "mobilenetv2_tiny.pt",
    "mobilenetv2_tiny_ema.pth",
    "unhealthy.pt",
]
EPS = 1e-5
FP16_MAX = 65504.0
TWO_MB = 2 * 1024 * 1024


def build(name: str, **kwargs) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    return factory(**kwargs), torch.randn(shape, generator=torch.Generator().manual_seed(1))


def load(name: str):
    return torch.load(SAMPLES / name, weights_only=True)


def call_counts(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """How many times each named submodule is called in one forward."""
    counts: dict[str, int] = {}
    handles = []
    for module_name, module in model.named_modules():
        if module_name:

            def hook(_module, _inputs, _output, module_name=module_name):
                counts[module_name] = counts.get(module_name, 0) + 1

            handles.append(module.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def call_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    order: list[str] = []
    handles = [
        module.register_forward_hook(lambda _m, _i, _o, n=name: order.append(n))
        for name, module in model.named_modules()
        if name and not list(module.children())
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return order


def module_calls(graph: torch.fx.GraphModule, target: str) -> list[torch.fx.Node]:
    return [n for n in graph.graph.nodes if n.op == "call_module" and n.target == target]


def consumers(node: torch.fx.Node) -> list[str]:
    return [u.target if u.op == "call_module" else str(u.target) for u in node.users]


def bn_prefixes(state: dict) -> list[str]:
    return [k[: -len("running_var")] for k in state if k.endswith("running_var")]


# ---------------------------------------------------------------------------------------------------------
# every model
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_runs_in_eval_and_train_mode(name):
    model, x = build(name)
    model.train()
    out_train = model(x)
    out_train.float().sum().backward()
    model.eval()
    with torch.no_grad():
        out_eval = model(x)
    assert out_eval.shape == out_train.shape and out_eval.shape[0] == x.shape[0]
    assert torch.isfinite(out_eval).all() and torch.isfinite(out_train).all()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_is_small_and_fx_traceable(name):
    model, x = build(name)
    model.eval()
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert size < TWO_MB
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    traced = torch.fx.symbolic_trace(model)  # the fold and the swap find their patterns by dataflow
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, kwargs, classes",
    [
        ("resnet_tiny", {"num_classes": 7}, 7),
        ("mobilenetv2_tiny", {"num_classes": 4}, 4),
        ("small_cnn", {"num_classes": 3}, 3),
    ],
)
def test_factories_take_keyword_arguments(name, kwargs, classes):
    model, x = build(name, **kwargs)
    assert model.eval()(x).shape == (x.shape[0], classes)


# ---------------------------------------------------------------------------------------------------------
# structures
# ---------------------------------------------------------------------------------------------------------


def test_resnet_tiny_calls_one_relu_module_twice_per_block():
    from samples.models import BasicBlock

    model, x = build("resnet_tiny")
    counts = call_counts(model.eval(), x)
    blocks = [name for name, m in model.named_modules() if isinstance(m, BasicBlock)]
    assert len(blocks) >= 3
    for block in blocks:
        relus = [m for m in model.get_submodule(block).modules() if isinstance(m, nn.ReLU)]
        assert len(relus) == 1, f"{block} should own exactly one ReLU module"
        assert counts[f"{block}.relu"] == 2
    assert counts["relu"] == 1  # the stem's own relu
    # the shared ReLU's second call comes after the residual add, not after a BN
    traced = torch.fx.symbolic_trace(model)
    for block in blocks:
        first, second = module_calls(traced, f"{block}.relu")
        assert first.args[0].target == f"{block}.bn1"
        assert second.args[0].op == "call_function" and second.args[0].target in (operator.add, operator.iadd)
    downsamples = [m for name, m in model.named_modules() if name.endswith("downsample")]
    assert downsamples
    for branch in downsamples:
        conv, bn = branch
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (2, 2)
        assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels
    assert isinstance(model.maxpool, nn.MaxPool2d) and isinstance(model.fc, nn.Linear)
    assert ["conv1", "bn1", "relu", "maxpool"] == call_order(model, x)[:4]


def test_resnet_bottleneck_tiny_blocks():
    from samples.models import Bottleneck

    model, x = build("resnet_bottleneck_tiny")
    counts = call_counts(model.eval(), x)
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, Bottleneck)]
    assert blocks
    for name, block in blocks:
        assert [block.conv1.kernel_size, block.conv2.kernel_size, block.conv3.kernel_size] == [(1, 1), (3, 3), (1, 1)]
        assert block.conv3.out_channels == 4 * block.conv1.out_channels
        assert counts[f"{name}.relu"] == 3
        assert block.downsample is not None


def test_mobilenetv2_tiny_inverted_residuals():
    from samples.models import InvertedResidual

    model, x = build("mobilenetv2_tiny")
    model.eval()
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    with_residual = 0
    for block in blocks:
        layers = list(block.conv)
        depthwise = layers[-3]  # ConvBNReLU6: conv, BN, ReLU6
        dw_conv = depthwise[0]
        assert dw_conv.groups == dw_conv.in_channels == dw_conv.out_channels and dw_conv.kernel_size == (3, 3)
        assert isinstance(depthwise[1], nn.BatchNorm2d) and isinstance(depthwise[2], nn.ReLU6)
        if len(layers) == 4:  # expand 1x1 + BN + ReLU6 first
            expand = layers[0]
            assert expand[0].kernel_size == (1, 1) and isinstance(expand[2], nn.ReLU6)
        project, project_bn = layers[-2], layers[-1]
        assert project.kernel_size == (1, 1) and isinstance(project_bn, nn.BatchNorm2d)  # linear bottleneck
        # the residual is there exactly when stride is 1 and the channels match
        inp = torch.randn(2, (layers[0][0] if len(layers) == 4 else dw_conv).in_channels, 8, 8)
        with torch.no_grad():
            expected_residual = dw_conv.stride == (1, 1) and inp.shape[1] == project_bn.num_features
            difference = block(inp) - block.conv(inp)
            if expected_residual:
                torch.testing.assert_close(difference, inp)
                with_residual += 1
            else:
                assert torch.count_nonzero(difference) == 0
    assert 0 < with_residual < len(blocks)


def test_densenet_tiny_preactivation_concat_and_transition():
    from samples.models import DenseBlock, DenseLayer, Transition

    model, x = build("densenet_tiny")
    model.eval()
    order = call_order(model, x)
    for name, layer in model.named_modules():
        if isinstance(layer, DenseLayer):
            mine = [n[len(name) + 1 :] for n in order if n.startswith(name + ".")]
            assert mine == ["norm1", "relu1", "conv1", "norm2", "relu2", "conv2"]
    for block in (m for m in model.modules() if isinstance(m, DenseBlock)):
        first = next(iter(block.values()))
        inp = torch.randn(2, first.norm1.num_features, 8, 8)
        with torch.no_grad():
            out = block(inp)
        assert torch.equal(out[:, : inp.shape[1]], inp)  # concatenation keeps the input channels as they are
        assert out.shape[1] == inp.shape[1] + len(block) * first.conv2.out_channels
    transitions = [m for m in model.modules() if isinstance(m, Transition)]
    assert len(transitions) == 1
    kinds = [type(m) for m in transitions[0]]
    assert kinds == [nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.AvgPool2d] and transitions[0].conv.kernel_size == (1, 1)
    # the final BN -> ReLU: the BN is the last module of features and its output goes through relu
    traced = torch.fx.symbolic_trace(model)
    (final_bn,) = module_calls(traced, "features.norm5")
    assert [u.target for u in final_bn.users] == [torch.nn.functional.relu]


@pytest.mark.parametrize(
    "name, dims", [("convtranspose_decoder", 2), ("convtranspose1d_decoder", 1), ("convtranspose3d_decoder", 3)]
)
def test_convtranspose_decoders(name, dims):
    model, x = build(name)
    deconv_type = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    bn_type = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    deconvs = {n: m for n, m in model.named_modules() if isinstance(m, deconv_type)}
    assert any(m.groups == 2 for m in deconvs.values())
    assert any(m.stride[0] == 2 and m.output_padding[0] == 1 for m in deconvs.values())
    traced = torch.fx.symbolic_trace(model)
    for deconv_name, deconv in deconvs.items():
        (call,) = module_calls(traced, deconv_name)
        (user,) = consumers(call)
        bn = model.get_submodule(user)
        assert isinstance(bn, bn_type) and bn.num_features == deconv.out_channels


def test_mlp_head_linear_bn1d_relu_linear():
    model, x = build("mlp_head")
    assert x.ndim == 2
    order = call_order(model.eval(), x)
    assert [type(model.get_submodule(n)) for n in order] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]


def test_two_consumers_conv_output_feeds_bn_and_the_add():
    model, _ = build("two_consumers")
    traced = torch.fx.symbolic_trace(model)
    (conv,) = module_calls(traced, "conv")
    users = list(conv.users)
    assert len(users) == 2 and "bn" in consumers(conv)
    (bn,) = module_calls(traced, "bn")
    (add,) = [u for u in users if u.op == "call_function"]
    assert bn in add.args


def test_affine_false_and_no_track_stats():
    model, x = build("affine_false")
    assert model.bn1.weight is None and model.bn1.bias is None and model.bn1.running_var is not None
    assert model.bn2.weight is not None
    assert "bn1.weight" not in model.state_dict() and "bn1.running_mean" in model.state_dict()

    model, x = build("no_track_stats")
    assert model.bn1.running_mean is None and model.bn1.running_var is None
    assert "bn1.running_mean" not in model.state_dict() and "bn2.running_mean" in model.state_dict()
    model.eval()
    with torch.no_grad():
        z = model.conv1(x * 3 + 5)
        out = model.bn1(z)
    # in eval it still normalises with the batch's statistics: each channel comes out with mean 0, var 1
    mean = out.double().mean(dim=(0, 2, 3))
    var = out.double().var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.ones_like(var), atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "name, conv_type, bn_type",
    [("conv1d_net", nn.Conv1d, nn.BatchNorm1d), ("conv3d_net", nn.Conv3d, nn.BatchNorm3d)],
)
def test_conv1d_and_conv3d_nets(name, conv_type, bn_type):
    model, x = build(name)
    convs = [m for m in model.modules() if isinstance(m, conv_type)]
    assert any(c.bias is None for c in convs) and any(c.bias is not None for c in convs)
    assert any(max(c.dilation) > 1 for c in convs) and any(max(c.stride) > 1 for c in convs)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(type(b) is bn_type for b in bns)


def test_out_of_order_pairs_differ_from_module_order():
    model, _ = build("out_of_order")
    defined = [n for n, m in model.named_children() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    by_module_order = {c: b for c, b in zip(defined, defined[1:]) if c.startswith("conv") and b.startswith("bn")}
    traced = torch.fx.symbolic_trace(model)
    by_dataflow = {c: consumers(module_calls(traced, c)[0])[0] for c in ("conv_a", "conv_b")}
    assert by_dataflow == {"conv_a": "bn_a", "conv_b": "bn_b"}
    assert by_module_order == {"conv_b": "bn_a", "conv_a": "bn_b"}
    # every wrong pair is shape-compatible, so a wrong pairing would fail silently
    modules = [model.get_submodule(n) for n in defined]
    channels = {m.out_channels if isinstance(m, nn.Conv2d) else m.num_features for m in modules}
    assert len(channels) == 1


def test_shared_conv_called_twice_each_followed_by_its_own_bn():
    model, x = build("shared_conv")
    assert call_counts(model.eval(), x)["conv"] == 2
    traced = torch.fx.symbolic_trace(model)
    calls = module_calls(traced, "conv")
    assert [consumers(c) for c in calls] == [["bn1"], ["bn2"]]


def test_bn_before_conv_with_and_without_padding():
    model, _ = build("bn_before_conv")
    traced = torch.fx.symbolic_trace(model)
    assert consumers(module_calls(traced, "bn_in")[0]) == ["conv_valid"]
    assert consumers(module_calls(traced, "bn_mid")[0]) == ["conv_same"]
    assert model.conv_valid.padding == (0, 0) and model.conv_same.padding == (1, 1)


def test_small_cnn_for_digits():
    model, x = build("small_cnn")
    assert x.shape[1:] == (1, 8, 8)
    assert model.eval()(x).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown norm"):
        MODELS["small_cnn"][0](norm="nope")


# ---------------------------------------------------------------------------------------------------------
# committed files
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_committed_sample_exists_and_is_under_2mb(name):
    path = SAMPLES / name
    assert path.is_file()
    assert 0 < path.stat().st_size < TWO_MB


def test_resnet_tiny_formats_hold_the_same_tensors():
    from safetensors.torch import load_file

    reference = load("resnet_tiny.pt")
    model, _ = build("resnet_tiny")
    model.load_state_dict(reference, strict=True)  # fits the factory
    assert zipfile.is_zipfile(SAMPLES / "resnet_tiny.pt")
    assert not zipfile.is_zipfile(SAMPLES / "resnet_tiny_legacy.pt")

    ckpt = load("resnet_tiny.ckpt")
    assert {"epoch", "global_step", "pytorch-lightning_version", "optimizer_states", "lr_schedulers"} <= set(ckpt)
    assert ckpt["hyper_parameters"]["arch"] == "resnet_tiny"
    momentum = ckpt["optimizer_states"][0]["state"]
    assert momentum and all(torch.isfinite(s["momentum_buffer"]).all() for s in momentum.values())

    variants = {
        "legacy": load("resnet_tiny_legacy.pt"),
        "lightning": {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()},
        "data_parallel": {k.removeprefix("module."): v for k, v in load("resnet_tiny_dp.pt").items()},
        "safetensors": load_file(SAMPLES / "resnet_tiny.safetensors"),
    }
    assert all(k.startswith("model.") for k in ckpt["state_dict"])
    assert all(k.startswith("module.") for k in load("resnet_tiny_dp.pt"))
    for variant, state in variants.items():
        assert set(state) == set(reference), variant
        for key, value in reference.items():
            assert torch.equal(state[key], value), f"{variant}: {key}"


def test_code_carrying_formats_are_what_they_claim_without_running_them():
    full = SAMPLES / "resnet_tiny_full.pt"
    classes = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(full)))
    assert {"samples.models.ResNet", "samples.models.BasicBlock", "torch.nn.modules.batchnorm.BatchNorm2d"} <= classes

    script_names = zipfile.ZipFile(SAMPLES / "resnet_tiny_script.pt").namelist()
    assert any(n.endswith("/constants.pkl") for n in script_names)
    assert any("/code/" in n for n in script_names)

    with zipfile.ZipFile(SAMPLES / "resnet_tiny.pt2") as archive:
        (format_entry,) = [n for n in archive.namelist() if n.endswith("archive_format")]
        assert archive.read(format_entry).decode().strip() == "pt2"


def test_onnx_sample_keeps_batchnorm_nodes_with_the_trained_statistics():
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(SAMPLES / "resnet_tiny.onnx")).graph
    reference = load("resnet_tiny.pt")
    bn_nodes = [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert len(bn_nodes) == len(bn_prefixes(reference))
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    aliases = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    for node in bn_nodes:
        mean_name = node.input[3]
        mean_name = aliases.get(mean_name, mean_name)
        prefix = mean_name.removesuffix("running_mean")
        assert mean_name.endswith("running_mean") and prefix in bn_prefixes(reference)
        for slot, field in ((3, "running_mean"), (4, "running_var")):
            name = aliases.get(node.input[slot], node.input[slot])
            assert torch.equal(torch.from_numpy(values[name].copy()), reference[prefix + field])


def test_mobilenetv2_ema_checkpoint():
    ckpt = load("mobilenetv2_tiny_ema.pth")
    plain = load("mobilenetv2_tiny.pt")
    assert {"state_dict", "state_dict_ema", "epoch"} <= set(ckpt)
    assert set(ckpt["state_dict_ema"]) == set(plain)
    for key, value in plain.items():
        assert torch.equal(ckpt["state_dict"][key], value)
    floats = [k for k, v in plain.items() if v.is_floating_point()]
    assert any(not torch.equal(ckpt["state_dict_ema"][k], plain[k]) for k in floats)  # a real average


def healthy_problems(state: dict, prefix: str) -> list[str]:
    """Problems of one BN layer by plain float64 math (used to show healthy files have none)."""
    mean = state[prefix + "running_mean"].double()
    var = state[prefix + "running_var"].double()
    weight = state.get(prefix + "weight")
    problems = []
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
        problems.append("non-finite")
    if (var < 0).any():
        problems.append("negative-var")
    if (var < 100 * EPS).any():
        problems.append("small-var")
    if (mean == 0).all() and (var == 1).all():
        problems.append("default-stats")
    if weight is not None:
        weight = weight.double()
        if (weight.abs() < 1e-3).any():
            problems.append("dead")
        if (weight.abs() / (var + EPS).sqrt() > FP16_MAX).any():
            problems.append("fp16")
    return problems


@pytest.mark.parametrize("name", ["resnet_tiny.pt", "mobilenetv2_tiny.pt"])
def test_healthy_samples_have_trained_statistics(name):
    state = load(name)
    prefixes = bn_prefixes(state)
    assert prefixes
    for prefix in prefixes:
        assert healthy_problems(state, prefix) == [], prefix
    tracked = {int(state[p + "num_batches_tracked"]) for p in prefixes}
    assert len(tracked) == 1 and tracked.pop() > 0


def test_sample_files_have_different_tracking_counts():
    counts = {}
    for name in ("resnet_tiny.pt", "mobilenetv2_tiny.pt", "unhealthy.pt"):
        state = load(name)
        counts[name] = int(state[bn_prefixes(state)[0] + "num_batches_tracked"])
    assert len(set(counts.values())) == len(counts)


# ---------------------------------------------------------------------------------------------------------
# unhealthy.pt against the README's table
# ---------------------------------------------------------------------------------------------------------


def readme_unhealthy_table() -> dict[str, tuple[str, list[int]]]:
    text = (SAMPLES / "README.md").read_text()
    section = text.split("## unhealthy.pt", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\|\s*`(bn_\w+)`\s*\|\s*`?([\w-]+)`?\s*\|\s*([^|]+?)\s*\|", line)
        if match:
            layer, problem, channels = match.groups()
            if channels == "all":
                channel_list = list(range(8))
            elif channels == "none":
                channel_list = []
            else:
                channel_list = [int(c) for c in channels.split(",")]
            rows[layer] = (problem, channel_list)
    return rows


def channels_with(problem: str, state: dict, prefix: str, all_tracked: dict[str, int]) -> list[int]:
    """Channels of one layer that carry ``problem``, by plain float64 math on the loaded tensors."""
    mean = state[prefix + "running_mean"].double()
    var = state[prefix + "running_var"].double()
    weight = state[prefix + "weight"].double()
    bias = state[prefix + "bias"].double()
    tracked = int(state[prefix + "num_batches_tracked"])
    everything = torch.ones_like(var, dtype=torch.bool)
    if problem == "stale-stats":
        hit = everything if ((mean == 0).all() and (var == 1).all() and tracked == 0) else ~everything
    elif problem == "non-finite":
        hit = ~(torch.isfinite(mean) & torch.isfinite(var) & torch.isfinite(weight) & torch.isfinite(bias))
    elif problem == "negative-var":
        hit = var < 0
    elif problem == "tiny-var":
        hit = (var >= 0) & (var < EPS / 100)
    elif problem == "dead-channels":
        hit = weight.abs() == 0
    elif problem == "fp16-overflow":
        hit = weight.abs() / (var + EPS).sqrt() > FP16_MAX
    elif problem == "mixed-tracking":
        others = [n for p, n in all_tracked.items() if p != prefix and n > 0]
        differs = tracked > 0 and all(n != tracked for n in others) and len(set(others)) == 1
        hit = everything if differs else ~everything
    else:
        raise AssertionError(f"unknown problem {problem}")
    return torch.nonzero(hit).flatten().tolist()


def test_readme_table_matches_the_script():
    table = readme_unhealthy_table()
    assert table.pop("bn_healthy") == ("none", [])
    assert table == make_samples.UNHEALTHY_PROBLEMS


def test_unhealthy_sample_carries_each_problem_exactly_where_the_readme_says():
    state = load("unhealthy.pt")
    table = readme_unhealthy_table()
    prefixes = bn_prefixes(state)
    assert sorted(p[:-1] for p in prefixes) == sorted(table)
    tracked = {p: int(state[p + "num_batches_tracked"]) for p in prefixes}
    problems = sorted({problem for problem, _ in table.values() if problem != "none"})
    assert problems == sorted(
        ["stale-stats", "non-finite", "negative-var", "tiny-var", "dead-channels", "fp16-overflow", "mixed-tracking"]
    )
    for layer, (own_problem, own_channels) in table.items():
        for problem in problems:
            found = channels_with(problem, state, layer + ".", tracked)
            expected = own_channels if problem == own_problem else []
            assert found == expected, f"{layer}: {problem} on channels {found}, expected {expected}"
    # the layers that were not broken keep trained statistics rather than defaults
    assert healthy_problems(state, "bn_healthy.") == []
    model, _ = build("unhealthy_net")
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------------------
# regeneration
# ---------------------------------------------------------------------------------------------------------


def assert_same_tensors(regenerated, committed, where: str) -> None:
    if isinstance(committed, torch.Tensor):
        assert isinstance(regenerated, torch.Tensor) and regenerated.dtype == committed.dtype, where
        if committed.is_floating_point():
            # every value is computed in float64 and rounded once: another CPU's kernels may move a value by
            # the last float32 bit where float64 rounding lands on a tie, never more
            ulp = torch.finfo(committed.dtype).eps
            torch.testing.assert_close(regenerated, committed, rtol=2 * ulp, atol=0.0, equal_nan=True, msg=where)
        else:
            assert torch.equal(regenerated, committed), where
    elif isinstance(committed, dict):
        assert list(regenerated) == list(committed), where
        for key in committed:
            assert_same_tensors(regenerated[key], committed[key], f"{where}[{key!r}]")
    elif isinstance(committed, (list, tuple)):
        assert len(regenerated) == len(committed), where
        for index, (a, b) in enumerate(zip(regenerated, committed)):
            assert_same_tensors(a, b, f"{where}[{index}]")
    else:
        assert regenerated == committed, where


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["native", "default"])
def test_make_samples_regenerates_the_committed_files(tmp_path, kernels):
    """Regenerating gives the committed files on this CPU's best kernels and on torch's plain ones
    (ATEN_CPU_CAPABILITY=default), which stands in for a machine with another CPU."""
    env = dict(os.environ)
    if kernels == "default":
        env["ATEN_CPU_CAPABILITY"] = "default"
    result = subprocess.run(
        [sys.executable, str(SAMPLES / "make_samples.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # works from any directory, and the imports do not depend on the caller's sys.path
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SAMPLE_FILES)
    # stdout lists what was written and nothing else (the exporter's progress lines are kept off it)
    lines = result.stdout.splitlines()
    assert len(lines) == len(SAMPLE_FILES)
    assert all(any(line.startswith(name + " ") for line in lines) for name in SAMPLE_FILES)
    for name in STATE_FILES:
        regenerated = torch.load(tmp_path / name, weights_only=True)
        assert_same_tensors(regenerated, load(name), name)

    from safetensors.torch import load_file

    assert_same_tensors(
        load_file(tmp_path / "resnet_tiny.safetensors"), load_file(SAMPLES / "resnet_tiny.safetensors"), "safetensors"
    )
