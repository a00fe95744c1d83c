"""Regenerate every sample file under samples/ (or another directory): ``python samples/make_samples.py [OUT_DIR]``.

Deterministic on any CPU: every weight comes from a seeded float64 generator, and the BatchNorm statistics
from a float64 pass over seeded synthetic data (not the 0/1 defaults), each rounded once to float32, so
another machine's kernels cannot change a stored value. samples/README.md lists the
files and the problems written into unhealthy.pt.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
# the full-module sample pickles its classes by module path: they must be found as samples.models, not as a
# top-level `models` module, whichever way this script is started
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from samples import models  # noqa: E402

SEED = 20240607
BN_EPS = 1e-5
FP16_MAX = 65504.0

# Each layer of unhealthy.pt and the one problem make_samples writes into it: layer -> (finding code,
# channels). bn_stale's channels are all of them. samples/README.md carries the same table, and a test
# checks the file against it.
UNHEALTHY_PROBLEMS: dict[str, tuple[str, list[int]]] = {
    "bn_stale": ("stale-stats", list(range(8))),
    "bn_nan": ("non-finite", [1, 5]),
    "bn_negative_var": ("negative-var", [2, 6]),
    "bn_tiny_var": ("tiny-var", [0, 3]),
    "bn_dead": ("dead-channels", [4, 7]),
    "bn_fp16_overflow": ("fp16-overflow", [2]),
    "bn_mixed_tracking": ("mixed-tracking", list(range(8))),
}
UNHEALTHY_STEPS = 20
STAT_BATCHES = 8
MIXED_TRACKING_STEPS = 5


def seeded_model(name: str, tracked: int, seed: int) -> nn.Module:
    """``name``'s model with every value drawn from seeded float64 generators, independent of the CPU.

    Parameters come from numpy's generator in float64 (weights scaled by fan-in, norm weights in [0.5, 1.5],
    biases small), rounded once to float32. The BatchNorm statistics are then what the model's own data
    gives: the model runs in float64 on seeded synthetic batches (a per-channel offset and scale, so every
    norm sees its own non-trivial mean and variance) with a cumulative average (momentum None), and the
    result is rounded once to float32. Kernel rounding of any CPU stays ~1e-16 relative in float64 and
    disappears in that rounding, where training steps would amplify it. Every layer then reports
    ``tracked`` batches, as after real training.
    """
    factory, input_shape = models.MODELS[name]
    torch.manual_seed(seed)  # only the factory's own init, every value of which is replaced below
    model = factory().double()
    rng = np.random.default_rng(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    norm_params = {id(p) for m in norms for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if id(p) in norm_params:
                values = rng.uniform(0.5, 1.5, p.shape) if pname.endswith("weight") else rng.normal(0, 0.1, p.shape)
            elif p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                values = rng.normal(0.0, np.sqrt(2.0 / fan_in), p.shape)
            else:
                values = rng.normal(0.0, 0.05, p.shape)
            p.copy_(torch.from_numpy(values))
        momenta = {m: m.momentum for m in norms}
        for m in norms:
            if m.track_running_stats:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the batches below
        channels = input_shape[1]
        offset = rng.uniform(-1.0, 1.0, channels)
        scale = rng.uniform(0.5, 2.0, channels)
        view = (1, -1) + (1,) * (len(input_shape) - 2)
        model.train()
        for _ in range(STAT_BATCHES):
            x = rng.standard_normal((16,) + tuple(input_shape[1:])) * scale.reshape(view) + offset.reshape(view)
            model(torch.from_numpy(x))
        for m, momentum in momenta.items():
            m.momentum = momentum
            if m.track_running_stats:
                m.num_batches_tracked.fill_(tracked)
    return model.float().eval()


def example_input(name: str, seed: int = SEED) -> torch.Tensor:
    _, input_shape = models.MODELS[name]
    return torch.randn(input_shape, generator=torch.Generator().manual_seed(seed))


def plain_state_dict(model: nn.Module) -> OrderedDict:
    """Detached, contiguous copies, so that saved files hold no views into live parameters."""
    return OrderedDict((k, v.detach().clone().contiguous()) for k, v in model.state_dict().items())


@contextlib.contextmanager
def stdout_silenced() -> Iterator[None]:
    """Keep exporter progress lines off stdout (this script's stdout lists what it wrote)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        os.dup2(devnull.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def ema_state(state: OrderedDict, seed: int) -> OrderedDict:
    """A timm-style EMA copy: every float entry a little off the live weights (seeded, float64, rounded once),
    integers copied, as an exponential moving average leaves them."""
    rng = np.random.default_rng(seed)
    out = OrderedDict()
    for key, value in state.items():
        if value.is_floating_point():
            factor = 1.0 + rng.normal(0.0, 0.02, tuple(value.shape))
            value = (value.double() * torch.from_numpy(factor)).to(value.dtype)
        out[key] = value.clone()
    return out


def sgd_with_momentum(model: nn.Module, seed: int, lr: float = 0.1) -> torch.optim.Optimizer:
    """An SGD optimizer whose momentum buffers hold seeded values, as a checkpoint mid-training carries."""
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    for p in model.parameters():
        optimizer.state[p]["momentum_buffer"] = torch.from_numpy(rng.normal(0.0, 1e-3, tuple(p.shape))).float()
    return optimizer


def break_unhealthy(model: nn.Module) -> None:
    """Write into each ``bn_<problem>`` of a trained unhealthy_net the problem UNHEALTHY_PROBLEMS names."""
    with torch.no_grad():
        stale = model.bn_stale
        stale.running_mean.zero_()
        stale.running_var.fill_(1.0)
        stale.num_batches_tracked.zero_()

        nan_channel, inf_channel = UNHEALTHY_PROBLEMS["bn_nan"][1]
        model.bn_nan.running_mean[nan_channel] = float("nan")
        model.bn_nan.running_var[inf_channel] = float("inf")

        first, second = UNHEALTHY_PROBLEMS["bn_negative_var"][1]
        model.bn_negative_var.running_var[first] = -0.25
        model.bn_negative_var.running_var[second] = -1e-3

        first, second = UNHEALTHY_PROBLEMS["bn_tiny_var"][1]
        model.bn_tiny_var.running_var[first] = 1e-9
        model.bn_tiny_var.running_var[second] = 1e-12

        model.bn_dead.weight[UNHEALTHY_PROBLEMS["bn_dead"][1]] = 0.0

        # gamma / sqrt(var + eps) = 6e4 / 0.5 = 1.2e5 > 65504, with a variance that is healthy on its own,
        # so that this layer carries no tiny-var finding besides
        (channel,) = UNHEALTHY_PROBLEMS["bn_fp16_overflow"][1]
        model.bn_fp16_overflow.weight[channel] = 6e4
        model.bn_fp16_overflow.running_var[channel] = 0.25

        # as if this layer had been re-initialised and fine-tuned for fewer steps than the rest
        model.bn_mixed_tracking.num_batches_tracked.fill_(MIXED_TRACKING_STEPS)


def onnx_batchnorm_count(path: Path) -> int:
    import onnx

    return sum(node.op_type == "BatchNormalization" for node in onnx.load(str(path)).graph.node)


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    # The TorchScript-based exporter (dynamo=False) on purpose: the dynamo exporter's graph optimiser folds
    # eval-mode BatchNorm into the convs, and without the optimiser it leaves Expand/CastLike scaffolding
    # around each BN. This sample must carry plain BatchNormalization nodes, as most ONNX files in the wild
    # do, so that inspect has them to read; constant folding is off so that nothing folds them either.
    with stdout_silenced(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            opset_version=18,
            dynamo=False,
            do_constant_folding=False,
        )
    if onnx_batchnorm_count(path) == 0:
        raise RuntimeError(f"{path}: the exporter folded every BatchNorm away; the sample needs them")


def make_all(out_dir: Path) -> list[tuple[Path, str]]:
    """Write every sample into ``out_dir``; return (path, description) for each file written."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, str]] = []

    def wrote(filename: str, what: str) -> Path:
        path = out_dir / filename
        written.append((path, what))
        return path

    # ---- resnet_tiny in every container format ----
    resnet = seeded_model("resnet_tiny", tracked=30, seed=SEED)
    optimizer = sgd_with_momentum(resnet, seed=SEED)
    state = plain_state_dict(resnet)
    torch.save(state, wrote("resnet_tiny.pt", "state dict, torch zip format"))
    torch.save(
        state,
        wrote("resnet_tiny_legacy.pt", "state dict, legacy (pre-1.6) torch.save format"),
        _use_new_zipfile_serialization=False,
    )
    lightning = {
        "epoch": 2,
        "global_step": 30,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": OrderedDict(("model." + k, v) for k, v in state.items()),
        "loops": {},
        "callbacks": {},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": optimizer.param_groups[0]["lr"], "arch": "resnet_tiny"},
    }
    torch.save(lightning, wrote("resnet_tiny.ckpt", "Lightning checkpoint: state_dict with 'model.' prefix"))
    data_parallel = nn.DataParallel(resnet)  # real DataParallel naming, not a hand-made prefix
    torch.save(
        plain_state_dict(data_parallel), wrote("resnet_tiny_dp.pt", "DataParallel state dict, 'module.' prefix")
    )

    from safetensors.torch import save_file

    save_file(state, str(wrote("resnet_tiny.safetensors", "safetensors")), metadata={"format": "pt"})

    torch.save(resnet, wrote("resnet_tiny_full.pt", "full pickled nn.Module (classes in samples.models)"))

    example = example_input("resnet_tiny")
    # trace, not script: ResNet.forward walks its stages with getattr, which TorchScript cannot compile
    with torch.no_grad():
        traced = torch.jit.trace(resnet, (example,))
    traced.save(str(wrote("resnet_tiny_script.pt", "TorchScript archive (traced)")))

    exported = torch.export.export(resnet, (example,))
    torch.export.save(exported, str(wrote("resnet_tiny.pt2", "torch.export archive")))

    export_onnx(resnet, example, wrote("resnet_tiny.onnx", "ONNX, BatchNormalization nodes kept"))

    # ---- mobilenetv2_tiny: plain and timm-style with EMA ----
    mobilenet = seeded_model("mobilenetv2_tiny", tracked=24, seed=SEED + 1)
    mobilenet_state = plain_state_dict(mobilenet)
    torch.save(mobilenet_state, wrote("mobilenetv2_tiny.pt", "state dict, torch zip format"))
    timm_checkpoint = {
        "epoch": 3,
        "arch": "mobilenetv2_tiny",
        "state_dict": mobilenet_state,
        "state_dict_ema": ema_state(mobilenet_state, seed=SEED + 1),
    }
    torch.save(timm_checkpoint, wrote("mobilenetv2_tiny_ema.pth", "timm checkpoint: state_dict + state_dict_ema"))

    # ---- unhealthy: seeded, then one problem per layer ----
    unhealthy = seeded_model("unhealthy_net", tracked=UNHEALTHY_STEPS, seed=SEED + 2)
    break_unhealthy(unhealthy)
    torch.save(plain_state_dict(unhealthy), wrote("unhealthy.pt", "state dict with one problem per bn_* layer"))

    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    for path, what in make_all(args.out_dir):
        print(f"{os.path.relpath(path)}  {path.stat().st_size / 1024:.1f} KiB  {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
