"""Regenerate every sample file under samples/ (or another directory): ``python samples/make_samples.py [OUT_DIR]``.

Deterministic: fixed seeds, one CPU thread, deterministic algorithms. Models are trained for a few SGD steps
on synthetic data in train mode, so their BatchNorm statistics are what training leaves behind rather than
the 0/1 defaults, then put in eval mode before they are saved or exported. samples/README.md lists the
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

import torch
import torch.nn.functional as F
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
MIXED_TRACKING_STEPS = 5


def synthetic_batch(generator: torch.Generator, shape: tuple[int, ...], offset: torch.Tensor, scale: torch.Tensor):
    """Inputs with a per-channel offset and scale, so each BN sees its own non-trivial mean and variance."""
    x = torch.randn(shape, generator=generator)
    view = (1, -1) + (1,) * (len(shape) - 2)
    return x * scale.view(view) + offset.view(view)


def train_briefly(
    model: nn.Module,
    input_shape: tuple[int, ...],
    steps: int,
    seed: int,
    batch_size: int = 16,
    lr: float = 0.05,
    on_step=None,
) -> torch.optim.Optimizer:
    """Train ``model`` for ``steps`` SGD steps on seeded synthetic data, leaving it in eval mode.

    Classifiers (2-d outputs) learn random labels by cross-entropy, other models regress a fixed random
    target. ``on_step(model)`` is called after each step (the EMA copy of a timm-style checkpoint uses it).
    """
    generator = torch.Generator().manual_seed(seed)
    channels = input_shape[1]
    offset = torch.rand(channels, generator=generator) * 2 - 1
    scale = torch.rand(channels, generator=generator) * 1.5 + 0.5
    shape = (batch_size,) + tuple(input_shape[1:])
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    target = None
    for _ in range(steps):
        x = synthetic_batch(generator, shape, offset, scale)
        out = model(x)
        if out.ndim == 2:
            labels = torch.randint(0, out.shape[1], (batch_size,), generator=generator)
            loss = F.cross_entropy(out, labels)
        else:
            if target is None:
                target = torch.randn(out.shape, generator=generator).tanh()
            loss = F.mse_loss(out, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(model)
    model.eval()
    return optimizer


def trained(name: str, steps: int, seed: int, **train_options) -> tuple[nn.Module, torch.optim.Optimizer]:
    factory, input_shape = models.MODELS[name]
    torch.manual_seed(seed)
    model = factory()
    optimizer = train_briefly(model, input_shape, steps, seed, **train_options)
    return model, optimizer


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


class EMA:
    """timm-style exponential moving average of every state-dict entry (integers are copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.state = plain_state_dict(model)

    def update(self, model: nn.Module) -> None:
        with torch.no_grad():
            for key, value in model.state_dict().items():
                if value.is_floating_point():
                    self.state[key].mul_(self.decay).add_(value.detach(), alpha=1 - self.decay)
                else:
                    self.state[key].copy_(value)


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
    resnet, optimizer = trained("resnet_tiny", steps=30, seed=SEED, lr=0.1)
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
    ema: EMA | None = None

    def update_ema(model: nn.Module) -> None:
        nonlocal ema
        if ema is None:
            ema = EMA(model, decay=0.9)
        else:
            ema.update(model)

    mobilenet, _ = trained("mobilenetv2_tiny", steps=24, seed=SEED + 1, on_step=update_ema)
    mobilenet_state = plain_state_dict(mobilenet)
    torch.save(mobilenet_state, wrote("mobilenetv2_tiny.pt", "state dict, torch zip format"))
    timm_checkpoint = {
        "epoch": 3,
        "arch": "mobilenetv2_tiny",
        "state_dict": mobilenet_state,
        "state_dict_ema": ema.state,
    }
    torch.save(timm_checkpoint, wrote("mobilenetv2_tiny_ema.pth", "timm checkpoint: state_dict + state_dict_ema"))

    # ---- unhealthy: trained, then one problem per layer ----
    unhealthy, _ = trained("unhealthy_net", steps=UNHEALTHY_STEPS, seed=SEED + 2)
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
