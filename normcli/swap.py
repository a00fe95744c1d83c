"""Swap a model's BatchNorm layers for FRN + TLU or MABN: ``swap_norms(model, to=...) -> (model, SwapReport)``.

The targets live in one registry, :data:`SWAP_TARGETS`; the CLI's ``--to`` choices are built from it.

- ``frn``: every BatchNorm1d/2d/3d and SyncBatchNorm on feature maps becomes FRN + TLU of the same rank,
  starting from the BatchNorm's ``weight``/``bias`` (``tau`` = 0). A ReLU call whose only input is the
  BatchNorm output, and which is the only consumer of it, is removed (the TLU is the activation); the
  dataflow is found with torch.fx, so other calls of a shared ReLU module stay. The result is then a
  ``torch.fx.GraphModule`` with the same parameter and buffer names. Other activations stay. A BatchNorm1d on
  (N, C) inputs (after a Linear) is skipped: FRN there degenerates to sign(x) unless ``learnable_eps=True``,
  in which case it becomes a FilterResponseNorm1d with the learnable eps. FRN cannot reproduce what a
  BatchNorm computed: the swapped model needs training; ``eval_drift`` says how far it moved.
- ``mabn``: every BatchNorm2d (and 4-d SyncBatchNorm) becomes MABN2d with the statistics transfer of
  NORM_LAYERS.md, so the eval output stays the same; ``cenconv=True`` also turns the convolutions feeding them
  into CenConv2d, which changes the function (reported as drift). BatchNorm1d/3d are skipped.
- ``bn``: every SyncBatchNorm becomes the BatchNorm1d/2d/3d of the input rank it sees on the probe (parameters,
  statistics and counter carried over: the eval output is the same).
- ``syncbn``: every BatchNorm becomes a SyncBatchNorm with the same state, for DistributedDataParallel.
- ``frozen``: every BatchNorm with running statistics becomes normcli's FrozenBatchNorm1d/2d/3d, whose state
  dict is torchvision's FrozenBatchNorm2d layout; the eval output is the same and nothing trains.
- ``gn``: every BatchNorm becomes GroupNorm with ``groups`` groups (lowered to the largest divisor of its
  channels, noted per layer), weight and bias carried over. GroupNorm computes another function: the drift and
  the train check say how far and whether it trains.

This module imports torch only inside its functions, so the CLI can build its ``--to`` choices from
:data:`SWAP_TARGETS` without importing torch.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from normcli.errors import NormcliError, describe
from normcli.fx_tools import drop_string_annotations
from normcli.inputs import infer_input_shape, make_inputs
from normcli.norm_act import norm_act_followers, norm_act_of, qualified_name

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["SWAP_TARGETS", "SwapReport", "SwapTarget", "swap_norms"]

PROBE_SEED = 0
TRAIN_CHECK_BATCH = 2


@dataclass
class SwapReport:
    """What :func:`swap_norms` did. ``eval_drift`` and ``train_check`` are None when no input shape was known."""

    to: str
    options: dict[str, Any]
    replaced: list[dict[str, str]] = field(default_factory=list)  # {"name", "from", "to"}
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"name", "reason"}
    absorbed_activations: list[str] = field(default_factory=list)
    centred_convs: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    eval_drift: dict[str, float] | None = None  # {"max_abs", "max_rel"}; max_rel is relative to max |output|
    train_check: dict[str, Any] | None = None  # {"passed", "batch_size", "nonfinite_grads", "error"}
    traced: bool | None = None  # None: the target needed no dataflow; False: torch.fx could not trace
    input_shape: list[int] | None = None  # the first probe input's shape
    input_shapes: list[list[int]] | None = None  # every probe input's shape: one per positional input, in order,
    #                                               then the next configuration's
    input_source: str | None = None  # where the probe inputs came from
    include: list[str] | None = None
    exclude: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def rebuild_options(self) -> dict[str, Any]:
        """The keyword arguments with which ``swap_norms(<the same architecture>, to, **rebuild_options)`` builds
        the same module structure: the target's options, the selection and the probe shapes."""
        return {**self.options, "include": self.include, "exclude": self.exclude,
                "input_shapes": self.input_shapes}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rebuild_options": self.rebuild_options}


@dataclass(frozen=True)
class SwapTarget:
    """One ``--to`` choice: how a BatchNorm becomes the new layer, and what else the swap does.

    ``convert(name, bn, rank, options)`` returns the new module, or a string saying why ``bn`` is skipped;
    ``rank`` is the input's number of dims seen on the probe, or None when unknown.
    """

    name: str
    summary: str
    defaults: Mapping[str, Any]
    convert: Callable[[str, nn.Module, "int | None", Mapping[str, Any]], "nn.Module | str"]
    absorbs_relu: bool = False
    validate: Callable[[Mapping[str, Any]], None] | None = None
    needs_dataflow: Callable[[Mapping[str, Any]], bool] = lambda options: False
    # whether the swapped model must compute the same eval output (the CLI then fails on any drift)
    eval_exact: Callable[[Mapping[str, Any]], bool] = lambda options: False
    # whether the new layer takes over the BatchNorm's running statistics: then findings about those statistics
    # (stale, non-finite, negative, tiny, mixed tracking) stop the swap; otherwise only findings on what the
    # new layer keeps (weight and bias) do
    carries_running_stats: bool = True


def _convert_frn(name: str, bn: nn.Module, rank: int | None, options: Mapping[str, Any]) -> nn.Module | str:
    import torch
    from torch import nn

    from normcli.layers import FilterResponseNorm1d, FilterResponseNorm2d, FilterResponseNorm3d

    frn_by_rank = {2: FilterResponseNorm1d, 3: FilterResponseNorm1d, 4: FilterResponseNorm2d, 5: FilterResponseNorm3d}
    learnable_eps = bool(options["learnable_eps"])
    if isinstance(bn, nn.BatchNorm2d):
        rank = 4
    elif isinstance(bn, nn.BatchNorm3d):
        rank = 5
    elif rank is None:
        if isinstance(bn, nn.BatchNorm1d) and learnable_eps:
            rank = 3  # FilterResponseNorm1d with learnable eps takes (N, C) and (N, C, L) alike
        else:
            return ("its input rank is unknown: it did not run on the probe inputs (probe with inputs on which "
                    "forward calls it, or exclude it)")
    if rank == 2 and not learnable_eps:
        return ("it normalises (N, C) inputs, where FRN degenerates to sign(x); pass learnable_eps=True to "
                "swap it for FRN with a learnable eps")
    if rank not in frn_by_rank:
        return f"it sees {rank}-d inputs; FRN covers 2-d to 5-d inputs"
    ref = bn.running_var if bn.running_var is not None else bn.weight
    factory = {"device": None, "dtype": None} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    frn = frn_by_rank[rank](bn.num_features, learnable_eps=learnable_eps, **factory)
    if bn.weight is not None:
        with torch.no_grad():
            frn.weight.copy_(bn.weight)
            frn.bias.copy_(bn.bias)
    return frn.train(bn.training)


# MABN keeps real_B // B steps of statistics per layer ((real_B // B, C) buffers): the paper's settings use a
# few dozen; this bound keeps a typo (or a stored option) from asking for gigabytes.
MAX_MABN_WINDOW = 4096
MAX_WARMUP_ITERS = 10 ** 9
# Elements of one probe input (swap's drift and train checks): 1x3x2048x2048 fits, a 6000x6000 image does not.
MAX_PROBE_ELEMENTS = 2 ** 24
MAX_PROBE_DIMS = 8
# probe input shapes in one swap (one per positional input, times the configurations)
MAX_PROBE_SHAPES = 64


def check_probe_shape(shape: Sequence[int]) -> None:
    """A probe input shape must be positive ints of bounded size (the same bound for the command line and for
    options stored in a file)."""
    if not 1 <= len(shape) <= MAX_PROBE_DIMS or any(type(d) is not int or d < 1 for d in shape):
        raise NormcliError(f"input shape {list(shape)[:MAX_PROBE_DIMS + 1]} is not 1 to {MAX_PROBE_DIMS} positive "
                           "integers")
    numel = 1
    for d in shape:
        numel *= d
    if numel > MAX_PROBE_ELEMENTS:
        raise NormcliError(f"input shape {list(shape)} has {numel} elements, more than the {MAX_PROBE_ELEMENTS} a "
                           "probe input may have; give a smaller shape (the checks only need a few samples)")


def _validate_mabn(options: Mapping[str, Any]) -> None:
    B, real_B = options["B"], options["real_B"]
    for key in ("B", "real_B", "warmup_iters"):
        if not isinstance(options[key], int) or isinstance(options[key], bool) or options[key] < 0:
            raise NormcliError(f"swap --to mabn: {key} must be a non-negative integer, got {options[key]!r}")
    if B < 1 or real_B < 1 or real_B % B:
        raise NormcliError(
            f"swap --to mabn: real_B must be a positive multiple of B (got B={B}, real_B={real_B}); MABN averages "
            f"the statistics of real_B // B steps"
        )
    if real_B // B > MAX_MABN_WINDOW:
        raise NormcliError(f"swap --to mabn: real_B // B = {real_B // B} steps of statistics per layer is more than "
                           f"{MAX_MABN_WINDOW}; choose real_B closer to B")
    if options["warmup_iters"] > MAX_WARMUP_ITERS:
        raise NormcliError(f"swap --to mabn: warmup_iters {options['warmup_iters']} is more than {MAX_WARMUP_ITERS}")
    if isinstance(options["momentum"], bool) or not isinstance(options["momentum"], (int, float)):
        raise NormcliError(f"swap --to mabn: momentum must be a number, got {options['momentum']!r}")
    if not 0.0 <= float(options["momentum"]) < 1.0:
        raise NormcliError(f"swap --to mabn: momentum must be in [0, 1), got {options['momentum']!r}")
    if not isinstance(options["cenconv"], bool):
        raise NormcliError(f"swap --to mabn: cenconv must be true or false, got {options['cenconv']!r}")


def _validate_frn(options: Mapping[str, Any]) -> None:
    if not isinstance(options["learnable_eps"], bool):
        raise NormcliError(f"swap --to frn: learnable_eps must be true or false, got {options['learnable_eps']!r}")


def _convert_mabn(name: str, bn: nn.Module, rank: int | None, options: Mapping[str, Any]) -> nn.Module | str:
    from torch import nn

    from normcli.layers import MABN2d

    if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm3d)):
        return f"MABN2d covers 4-d feature maps only; {type(bn).__name__} stays"
    if isinstance(bn, nn.SyncBatchNorm) and rank != 4:
        return ("MABN2d covers 4-d feature maps only, and this SyncBatchNorm "
                + ("did not run on the probe input" if rank is None else f"sees {rank}-d inputs"))
    if bn.running_mean is None or bn.running_var is None:
        return "it keeps no running statistics (track_running_stats=False), so no MABN2d computes the same"
    return MABN2d.from_batchnorm(
        bn, B=options["B"], real_B=options["real_B"], warmup_iters=options["warmup_iters"],
        momentum=options["momentum"],
    )


def _rank_of(bn: nn.Module, rank: int | None) -> int | None:
    """The input rank a BatchNorm sees: fixed by its class, or seen on the probe (SyncBatchNorm)."""
    from torch import nn

    if isinstance(bn, nn.BatchNorm2d):
        return 4
    if isinstance(bn, nn.BatchNorm3d):
        return 5
    if isinstance(bn, nn.BatchNorm1d):
        return rank if rank in (2, 3) else None
    return rank


def _copy_norm_state(source: nn.Module, target: nn.Module) -> nn.Module:
    """Parameters, statistics and counters of one BatchNorm-family module into another of the same shape."""
    target.load_state_dict(source.state_dict())
    return target.train(source.training)


def _convert_bn(name: str, bn: nn.Module, rank: int | None, options: Mapping[str, Any]) -> nn.Module | str:
    from torch import nn

    if not isinstance(bn, nn.SyncBatchNorm):
        return f"it is already a {type(bn).__name__}; --to bn converts SyncBatchNorm"
    classes = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
    if rank not in classes:
        return ("its input rank is unknown (it did not run on the probe input): pass an input shape, or exclude it"
                if rank is None else f"it sees {rank}-d inputs; BatchNorm covers 2-d to 5-d inputs")
    ref = bn.running_var if bn.running_var is not None else bn.weight
    plain = classes[rank](bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                          track_running_stats=bn.track_running_stats,
                          device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
    return _copy_norm_state(bn, plain)


def _convert_syncbn(name: str, bn: nn.Module, rank: int | None, options: Mapping[str, Any]) -> nn.Module | str:
    from torch import nn

    if isinstance(bn, nn.SyncBatchNorm):
        return "it is already a SyncBatchNorm"
    ref = bn.running_var if bn.running_var is not None else bn.weight
    sync = nn.SyncBatchNorm(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                            track_running_stats=bn.track_running_stats,
                            device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
    return _copy_norm_state(bn, sync)


def _convert_frozen(name: str, bn: nn.Module, rank: int | None, options: Mapping[str, Any]) -> nn.Module | str:
    from normcli.layers import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d

    if bn.running_mean is None or bn.running_var is None:
        return ("it keeps no running statistics (track_running_stats=False): it normalises with each batch's "
                "statistics even in eval, which a frozen layer cannot do")
    classes = {2: FrozenBatchNorm1d, 3: FrozenBatchNorm1d, 4: FrozenBatchNorm2d, 5: FrozenBatchNorm3d}
    rank = _rank_of(bn, rank)
    if rank not in classes:
        return ("its input rank is unknown (it did not run on the probe input): pass an input shape, or exclude it"
                if rank is None else f"it sees {rank}-d inputs; FrozenBatchNorm covers 2-d to 5-d inputs")
    return classes[rank].from_batchnorm(bn).train(bn.training)


def _validate_gn(options: Mapping[str, Any]) -> None:
    groups = options["groups"]
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise NormcliError(f"swap --to gn: --groups must be a positive integer, got {groups!r}")


def gn_groups(channels: int, asked: int) -> int:
    """The largest divisor of ``channels`` that is at most ``asked`` (GroupNorm needs groups | channels)."""
    return max(g for g in range(1, min(asked, channels) + 1) if channels % g == 0)


def _convert_gn(name: str, bn: nn.Module, rank: int | None, options: Mapping[str, Any]) -> nn.Module | str:
    import torch
    from torch import nn

    rank = _rank_of(bn, rank)
    if rank is None:
        return "its input rank is unknown (it did not run on the probe input): pass an input shape, or exclude it"
    groups = gn_groups(bn.num_features, options["groups"])
    if rank == 2 and groups == bn.num_features:
        return ("on (N, C) inputs a group of one channel holds one value per sample, which GroupNorm maps to its "
                "bias alone; choose fewer --groups")
    ref = bn.weight if bn.weight is not None else bn.running_var
    gn = nn.GroupNorm(groups, bn.num_features, eps=bn.eps, affine=bn.affine,
                      device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
    if bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
    return gn.train(bn.training)


SWAP_TARGETS: dict[str, SwapTarget] = {
    "frn": SwapTarget(
        name="frn",
        summary="Filter Response Normalization + TLU (Singh & Krishnan, 2020); absorbs the ReLU after each BN",
        defaults={"learnable_eps": False},
        convert=_convert_frn,
        validate=_validate_frn,
        absorbs_relu=True,
        carries_running_stats=False,
    ),
    "mabn": SwapTarget(
        name="mabn",
        summary="Moving Average Batch Normalization (Yan et al., 2020); same eval output as the BatchNorm",
        defaults={"B": 2, "real_B": 16, "warmup_iters": 100, "momentum": 0.98, "cenconv": False},
        convert=_convert_mabn,
        validate=_validate_mabn,
        needs_dataflow=lambda options: bool(options["cenconv"]),
        eval_exact=lambda options: not options["cenconv"],
        carries_running_stats=True,
    ),
    "bn": SwapTarget(
        name="bn",
        summary="SyncBatchNorm back to BatchNorm1d/2d/3d of the rank it sees; same eval output",
        defaults={},
        convert=_convert_bn,
        eval_exact=lambda options: True,
    ),
    "syncbn": SwapTarget(
        name="syncbn",
        summary="BatchNorm to SyncBatchNorm for DistributedDataParallel training; same eval output",
        defaults={},
        convert=_convert_syncbn,
        eval_exact=lambda options: True,
    ),
    "frozen": SwapTarget(
        name="frozen",
        summary="BatchNorm to normcli's FrozenBatchNorm (fixed statistics and affine, torchvision's state dict "
                "layout); same eval output",
        defaults={},
        convert=_convert_frozen,
        eval_exact=lambda options: True,
    ),
    "gn": SwapTarget(
        name="gn",
        summary="BatchNorm to GroupNorm with --groups (default 32, lowered to a divisor of the channels); "
                "weight and bias carried over, the function changes",
        defaults={"groups": 32},
        convert=_convert_gn,
        validate=_validate_gn,
        carries_running_stats=False,
    ),
}


def resolve_options(to: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The target's defaults with ``options`` applied (None means default), validated; imports no torch."""
    if to not in SWAP_TARGETS:
        raise NormcliError(f"unknown swap target {to!r}; choose one of {', '.join(SWAP_TARGETS)}")
    return _resolve_options(SWAP_TARGETS[to], options)


def _resolve_options(target: SwapTarget, options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(target.defaults))
    if unknown:
        raise NormcliError(
            f"swap --to {target.name} does not take {', '.join(unknown)}; it takes {', '.join(target.defaults)}"
        )
    resolved = dict(target.defaults)
    resolved.update({k: v for k, v in options.items() if v is not None})
    if target.validate is not None:
        target.validate(resolved)
    return resolved


def _as_patterns(globs: str | Iterable[str] | None) -> list[str]:
    if globs is None:
        return []
    return [globs] if isinstance(globs, str) else list(globs)


def selection_reason(name: str, include: str | Iterable[str] | None, exclude: str | Iterable[str] | None) -> str | None:
    """Why ``include``/``exclude`` leave the BatchNorm ``name`` alone, or None when they select it."""
    return _selection_reason(name, _as_patterns(include), _as_patterns(exclude))


def _selection_reason(name: str, include: list[str], exclude: list[str]) -> str | None:
    if include and not any(fnmatch.fnmatchcase(name, g) for g in include):
        return f"not matched by include {', '.join(include)}"
    hit = next((g for g in exclude if fnmatch.fnmatchcase(name, g)), None)
    return None if hit is None else f"matched by exclude {hit}"


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    import torch

    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return torch.get_default_dtype(), torch.device("cpu")


def _probe_inputs(model: nn.Module, shapes: Sequence[Sequence[int]], count: int) -> list[tuple]:
    """``count`` seeded samples, each a tuple of one tensor per shape (per positional input)."""
    dtype, device = _model_dtype_device(model)
    return [tuple(t.to(device) for t in sample)
            for sample in make_inputs([tuple(s) for s in shapes], count, seed=PROBE_SEED, dtype=dtype)]


def _given_inputs(model: nn.Module, tensors: Sequence[torch.Tensor]) -> tuple:
    """User-given tensors on the model's device, floating ones in its dtype."""
    dtype, device = _model_dtype_device(model)
    return tuple((t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)) for t in tensors)


def _output_tensors(out: Any) -> list[torch.Tensor]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for value in out.values() for t in _output_tensors(value)]
    if isinstance(out, (list, tuple)):
        return [t for value in out for t in _output_tensors(value)]
    return []


class _ModeRestored:
    """Put every module in eval mode for the block, then give each its own flag back."""

    def __init__(self, model: nn.Module, training: bool) -> None:
        self.model, self.training = model, training

    def __enter__(self) -> nn.Module:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.training)
        return self.model

    def __exit__(self, *exc) -> None:
        for module, flag in self.flags:
            module.training = flag


def _probe(model: nn.Module, inputs: list[tuple], record_ranks: Iterable[str] = ()) -> tuple[list, dict]:
    """Eval outputs on the probe inputs and the input rank each named BatchNorm saw."""
    import torch

    ranks: dict[str, int] = {}
    handles = []
    for name in record_ranks:
        def hook(module, args, name=name):
            if args and isinstance(args[0], torch.Tensor):
                ranks.setdefault(name, args[0].dim())
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with _ModeRestored(model, training=False), torch.no_grad():
            outputs = [[t.detach().double() for t in _output_tensors(model(*x))] for x in inputs]
    finally:
        for handle in handles:
            handle.remove()
    return outputs, ranks


def _drift(before: list[list[torch.Tensor]], after: list[list[torch.Tensor]]) -> dict[str, float]:
    max_abs = max_rel = 0.0
    for outs_before, outs_after in zip(before, after):
        if len(outs_before) != len(outs_after):
            return {"max_abs": math.inf, "max_rel": math.inf}
        for a, b in zip(outs_before, outs_after):
            if a.shape != b.shape:
                return {"max_abs": math.inf, "max_rel": math.inf}
            if a.numel() == 0:
                continue
            diff = (a - b).abs().max().item()
            scale = a.abs().max().item()
            max_abs = _nanmax(max_abs, diff)
            max_rel = _nanmax(max_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))
    return {"max_abs": max_abs, "max_rel": max_rel}


def _nanmax(x: float, y: float) -> float:
    """max that keeps a NaN: an output that became (or was) NaN must not read as no drift."""
    return math.nan if math.isnan(x) or math.isnan(y) else max(x, y)


def _train_check(model: nn.Module, sample: tuple) -> dict[str, Any]:
    """One forward and backward in train mode on ``sample`` (one tensor per positional input), on a copy (the
    result's buffers stay as they are)."""
    import torch

    trial = copy.deepcopy(model).train()
    batch = sample[0].shape[0] if sample and sample[0].dim() else None
    result: dict[str, Any] = {"passed": False, "batch_size": batch, "nonfinite_grads": [], "error": None}
    try:
        outputs = [t for t in _output_tensors(trial(*sample)) if t.is_floating_point() and t.requires_grad]
        if not outputs:
            result["error"] = "the model's output does not depend on any trainable parameter"
            return result
        sum(t.double().square().mean() for t in outputs).backward()
    except Exception as exc:  # noqa: BLE001 - any failure of the smoke check is its result
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    result["nonfinite_grads"] = [n for n, p in trial.named_parameters()
                                 if p.grad is not None and not torch.isfinite(p.grad).all()]
    result["passed"] = not result["nonfinite_grads"]
    return result


def _is_relu_call(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    import torch
    import torch.nn.functional as F
    from torch import nn

    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_)
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return False


def _relu_label(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_method":
        return f".{node.target}() call {node.name}"
    return f"{getattr(node.target, '__name__', node.target)} call {node.name}"


def _trace(model: nn.Module, report: SwapReport) -> torch.fx.Graph | None:
    import torch.fx

    class Tracer(torch.fx.Tracer):  # a norm+activation module is one call, like the norm it is
        def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
            return norm_act_of(m) is not None or super().is_leaf_module(m, qualified_name)

    try:
        graph = Tracer().trace(model)
        drop_string_annotations(graph)
    except Exception as exc:  # noqa: BLE001 - tracing fails in many ways; all mean the same here
        report.traced = False
        report.notes.append(f"torch.fx could not trace the model ({describe(exc)})")
        return None
    report.traced = True
    return graph


def opaque_norm_reason(bn: nn.Module) -> str | None:
    """Why a BatchNorm subclass is left alone: it overrides forward and is not a known norm+activation class."""
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm

    if type(bn).forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward):
        return None
    spec = norm_act_of(bn)
    if spec is not None and spec.norm == "batchnorm":
        return None
    return (f"{qualified_name(type(bn))} overrides forward() and is not a known norm+activation class, so what "
            "it computes besides the norm is unknown; replacing it could drop that")


def _norm_part(bn: nn.Module) -> nn.Module:
    """A plain BatchNorm1d/2d/3d or SyncBatchNorm holding a norm+activation module's norm state."""
    from torch import nn

    base = next(c for c in (nn.SyncBatchNorm, nn.BatchNorm3d, nn.BatchNorm2d, nn.BatchNorm1d) if isinstance(bn, c))
    ref = bn.running_var if bn.running_var is not None else bn.weight
    plain = base(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                 track_running_stats=bn.track_running_stats,
                 device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
    own = {k: v for k, v in bn.state_dict().items() if "." not in k}
    plain.load_state_dict(own)
    return plain.train(bn.training)


def _convert_keeping_followers(target: SwapTarget, name: str, bn: nn.Module, rank: int | None,
                               options: Mapping[str, Any], report: SwapReport) -> nn.Module | str:
    """The target's conversion of ``bn``; for a norm+activation module, of its norm part, with its dropout and
    activation kept after the new norm (FRN's TLU takes the place of a ReLU)."""
    from torch import nn

    from normcli.layers.norm_act import NORM_ACT_BY_BASE, with_followers

    if norm_act_of(bn) is None:
        return target.convert(name, bn, rank, options)
    followers = dict(norm_act_followers(bn))
    new = target.convert(name, _norm_part(bn), rank, options)
    if isinstance(new, str):
        return new
    if type(new) not in NORM_ACT_BY_BASE:
        return f"normcli has no {type(new).__name__} with an activation to keep {type(bn).__name__}'s"
    act = followers.get("act")
    if target.absorbs_relu and type(act) is nn.ReLU:
        report.absorbed_activations.append(f"{name}.act (inside {name})")
        act = None
    return with_followers(new, followers.get("drop"), act)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


def swap_norms(
    model: nn.Module,
    to: str,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    input_shape: Sequence[int] | None = None,
    input_shapes: Sequence[Sequence[int]] | None = None,
    inputs: Sequence[torch.Tensor] | None = None,
    probe_samples: int = 2,
    inplace: bool = False,
    **options: Any,
) -> tuple[nn.Module, SwapReport]:
    """Replace the model's BatchNorm layers by the target ``to`` (a key of :data:`SWAP_TARGETS`).

    Args:
        include, exclude: fnmatch globs (or lists of them) on module names selecting which BatchNorms to swap.
        input_shapes: shapes of the seeded probe inputs, one per positional input of the model, in order; more
            shapes are more configurations, taken N at a time for a model with N positional inputs. The probe
            gives ``eval_drift``, each BatchNorm's input rank, and (at batch size 2) ``train_check``.
            ``input_shape``: the same for a one-input model. Neither: guessed from the first conv or linear
            layer (a note says so).
        inputs: real input tensors instead of shapes (grouped the same way); the train check runs on the first
            configuration (a batch of one is repeated to two).
        inplace: change ``model`` itself instead of a deep copy (the result may still be a new GraphModule).
        options: the target's options, see ``SWAP_TARGETS[to].defaults``. frn: ``learnable_eps``; mabn: ``B``,
            ``real_B``, ``warmup_iters``, ``momentum``, ``cenconv``.

    When a ReLU call is absorbed, the result is a ``torch.fx.GraphModule`` traced in the model's current
    train/eval mode (Python branches on ``self.training`` are fixed at that point, as with any fx trace).

    Returns the swapped model and a :class:`SwapReport`. ``swap_norms(<a fresh model of the same architecture>,
    to, **report.rebuild_options)`` gives a model whose ``state_dict()`` has the same keys, so a saved state
    dict of the result loads into it.
    """
    import torch.fx
    from torch import nn

    from normcli.inputs import input_configurations, inputs_hint
    from normcli.inspection import NORM_CLASSES

    if to not in SWAP_TARGETS:
        raise NormcliError(f"unknown swap target {to!r}; choose one of {', '.join(SWAP_TARGETS)}")
    given = [x is not None for x in (input_shape, input_shapes, inputs)]
    if sum(given) > 1:
        raise NormcliError("give one of input_shape, input_shapes and inputs, not several")
    target = SWAP_TARGETS[to]
    resolved = _resolve_options(target, options)
    include_globs, exclude_globs = _as_patterns(include), _as_patterns(exclude)
    report = SwapReport(to=to, options=resolved, include=include_globs or None, exclude=exclude_globs or None)
    report.params_before = _count_params(model)
    model = model if inplace else copy.deepcopy(model)

    norms = [(name, m) for name, m in model.named_modules() if name and isinstance(
        m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm))]

    # probe samples: a list of configurations, each a list of samples (one tensor per positional input)
    configs: list[list[tuple]] | None = None
    shapes: list[list[int]] | None = None
    source = None
    if inputs is not None:
        groups = input_configurations(list(inputs), model, "inputs")
        configs = [[_given_inputs(model, group)] for group in groups]
        shapes, source = [list(t.shape) for t in inputs], "inputs"
    else:
        if input_shape is not None:
            shapes, source = [[int(d) for d in input_shape]], "input_shape"
        elif input_shapes is not None:
            shapes, source = [[int(d) for d in s] for s in input_shapes], "input_shapes"
        else:
            try:
                guessed, how = infer_input_shape(model)
                shapes, source = [list(guessed)], "guessed"
                report.notes.append(f"no input shape given; probed with {shapes[0]}, {how}")
            except NormcliError:  # no conv or linear layer: no probe, so no drift and no train check
                pass
        if shapes is not None:
            if not shapes or len(shapes) > MAX_PROBE_SHAPES:
                raise NormcliError(f"{len(shapes)} input shapes: give 1 to {MAX_PROBE_SHAPES}")
            for s in shapes:  # the same bound as the command line's and a swap file's stored shapes
                check_probe_shape(s)
            groups = input_configurations(shapes, model, "input shapes") if source != "guessed" else [shapes]
            configs = [_probe_inputs(model, group, probe_samples) for group in groups]
    before, ranks = None, {}
    if configs is not None:
        try:
            before, ranks = _probe(model, [x for config in configs for x in config], [n for n, _ in norms])
        except Exception as exc:  # noqa: BLE001
            if source != "guessed":
                raw = ", ".join(",".join(map(str, s)) for s in shapes)
                raise NormcliError(
                    f"the model does not run on inputs of shapes {raw} (from {source}) ({describe(exc)}); "
                    f"{inputs_hint(model, '--input' if source == 'inputs' else '--input-shape', given=True)}"
                ) from exc
            report.notes.append(f"the model did not run on the guessed input shape {shapes[0]}, so there is no "
                                f"eval_drift or train_check; {inputs_hint(model)}")
            configs, shapes = None, None
    report.input_shapes = shapes
    report.input_shape = shapes[0] if shapes else None
    report.input_source = source if shapes else None

    replacements: dict[str, nn.Module] = {}
    for name, bn in norms:
        reason = _selection_reason(name, include_globs, exclude_globs)
        if reason is None:
            reason = opaque_norm_reason(bn)
        new = reason if reason is not None else _convert_keeping_followers(
            target, name, bn, ranks.get(name), resolved, report)
        if isinstance(new, str):
            report.skipped.append({"name": name, "reason": new})
        else:
            replacements[name] = new
            entry = {"name": name, "from": type(bn).__name__, "to": type(new).__name__}
            kept = norm_act_followers(new)
            if norm_act_of(bn) is not None:
                entry["keeps"] = [f"{attr} ({type(m).__name__})" for attr, m in kept if type(m) is not nn.Identity]
            if isinstance(new, nn.GroupNorm):
                entry["groups"] = new.num_groups
                if new.num_groups != resolved["groups"]:
                    report.notes.append(f"{name}: {new.num_groups} groups instead of {resolved['groups']}, the "
                                        f"largest divisor of its {new.num_channels} channels that is not larger")
            report.replaced.append(entry)
    # every other norm layer is accounted for too
    for name, m in model.named_modules():
        if name and type(m).__name__ in NORM_CLASSES and not isinstance(m, nn.modules.batchnorm._BatchNorm):
            report.skipped.append({"name": name, "reason": f"it is a {type(m).__name__}, not a BatchNorm; swap "
                                   "replaces BatchNorm layers only"})

    graph = None
    if replacements and (target.absorbs_relu or target.needs_dataflow(resolved)):
        graph = _trace(model, report)
    result: nn.Module = model
    modules = dict(model.named_modules())
    if graph is not None and target.absorbs_relu:
        absorbed = _absorb_relus(graph, modules, replacements)
        report.absorbed_activations += absorbed
        if absorbed:
            result = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
            called = {node.target for node in graph.nodes if node.op == "call_module"}
            for name in [n for n in replacements if n not in called]:
                # a GraphModule keeps only what its graph uses
                del replacements[name]
                report.replaced = [r for r in report.replaced if r["name"] != name]
                report.skipped.append({"name": name, "reason": "it is never called in forward, and the traced "
                                       "result keeps only the modules forward calls"})
    elif target.absorbs_relu and replacements:
        report.notes.append("the ReLUs after the swapped BatchNorms were kept, since the dataflow is unknown")
    for name, new in replacements.items():
        _set_submodule(result, name, new)
    if to == "mabn" and resolved["cenconv"]:
        _centre_convs(result, graph, modules, replacements, report)

    report.params_after = _count_params(result)
    if configs is not None and before is not None:
        after, _ = _probe(result, [x for config in configs for x in config])
        report.eval_drift = _drift(before, after)
        report.train_check = _train_check(result, _train_sample(result, configs[0][0], source))
    return result, report


def _train_sample(model: nn.Module, sample: tuple, source: str | None) -> tuple:
    """The train check's input: seeded at batch 2 for shapes; given inputs as they are, a batch of one
    repeated to two (train-mode BatchNorm needs more than one value per channel)."""
    import torch

    if source == "inputs":
        return tuple(torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t for t in sample)
    shapes = [[TRAIN_CHECK_BATCH, *t.shape[1:]] if t.dim() else list(t.shape) for t in sample]
    return _probe_inputs(model, shapes, 1)[0]


def _absorb_relus(graph: torch.fx.Graph, modules: Mapping[str, nn.Module],
                  replaced: Mapping[str, nn.Module]) -> list[str]:
    """Remove each ReLU call that is the only consumer of a swapped BatchNorm's output; returns their labels."""
    absorbed = []
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target not in replaced or len(node.users) != 1:
            continue
        (user,) = node.users
        if not _is_relu_call(user, modules) or not user.args or user.args[0] is not node:
            continue
        user.replace_all_uses_with(node)
        graph.erase_node(user)
        absorbed.append(f"{_relu_label(user)} (after {node.target})")
    graph.lint()
    return absorbed


def _centre_convs(result: nn.Module, graph: torch.fx.Graph | None, modules: Mapping[str, nn.Module],
                  replaced: Mapping[str, nn.Module], report: SwapReport) -> None:
    """Turn each Conv2d whose output a new MABN2d normalises into a CenConv2d."""
    import torch.fx
    from torch import nn

    from normcli.layers import CenConv2d

    if graph is None:
        report.notes.append("cenconv: the convolutions feeding each BatchNorm are unknown without a traced graph; "
                            "none was centred")
        return
    feeding = []
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in replaced or not node.args:
            continue
        source = node.args[0]
        if isinstance(source, torch.fx.Node) and source.op == "call_module":
            conv = modules.get(source.target)
            if type(conv) is nn.Conv2d and source.target not in feeding:
                feeding.append(source.target)
    for name in feeding:
        _set_submodule(result, name, CenConv2d.from_conv(modules[name]))
    report.centred_convs = feeding
    if feeding:
        report.notes.append(f"cenconv: centred {len(feeding)} convolution(s); this changes the function, "
                            "see eval_drift")
