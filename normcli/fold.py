"""Fold eval-mode norms that are per-channel affine maps (BatchNorm and kin) into the conv/linear beside them.

Pairs are found by dataflow — a ``torch.fx`` trace, or a ``torch.export`` graph when tracing fails — never by
the order modules were defined in. A fold is done only where it is exact for every input the model accepts;
everything else stays, with the reason in ``FoldReport.unfolded``. Folded weights are computed in float64
from the original values and rounded once to the layer's dtype. A ``CenConv2d`` folded into becomes a plain
``nn.Conv2d`` holding its centred weight times the norm's scale (a CenConv2d would centre it again).

Only the command bodies import this module, so torch is imported at the top.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from normcli.errors import NormcliError, describe
from normcli.fx_tools import drop_string_annotations
from normcli.layers.mabn import CenConv2d
from normcli.norm_act import IDENTITY_IN_EVAL, NormAct, norm_act_followers, norm_act_of, qualified_name

__all__ = ["FoldReport", "fold_batchnorm", "is_foldable_norm"]


@dataclass
class FoldReport:
    """What ``fold_batchnorm`` did.

    ``folded``: ``{"norm", "into"}`` per folded norm; ``unfolded``: ``{"norm", "reason"}`` per norm left in
    place. Names are qualified module names of the original model. ``method`` is how pairs were found:
    ``"fx"`` (torch.fx trace), ``"export"`` (torch.export graph) or ``"none"`` (nothing was folded);
    ``note`` says why a fallback was used.
    """

    folded: list[dict[str, str]] = field(default_factory=list)
    unfolded: list[dict[str, str]] = field(default_factory=list)
    method: str = "none"
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"folded": list(self.folded), "unfolded": list(self.unfolded), "method": self.method,
                "note": self.note}


# ---------------------------------------------------------------------------------------------------------
# Which modules are norms, and what per-channel affine map they compute in eval


_TRUSTED_NORM_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward, _InstanceNorm.forward)
_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def _looks_frozen(module: nn.Module) -> bool:
    """FrozenBatchNorm's four buffers and eps, and nothing inside: a module with children (timm's
    FrozenBatchNormAct2d holds its activation) may apply them after the norm."""
    buffers = dict(module.named_buffers(recurse=False))
    return (all(name in buffers for name in _FROZEN_BUFFERS) and "num_batches_tracked" not in buffers
            and hasattr(module, "eps") and next(module.children(), None) is None)


def is_foldable_norm(module: nn.Module) -> bool:
    """True for the module kinds the fold knows: BatchNorm (incl. SyncBatchNorm), InstanceNorm, modules
    with FrozenBatchNorm's buffers, modules with a ``fold_scale_shift()`` method (e.g. MABN), and the known
    norm+activation classes of ``normcli.norm_act`` whose norm part is one of these."""
    spec = norm_act_of(module)
    if spec is not None:
        return spec.norm != "own" or callable(getattr(module, "fold_scale_shift", None))
    return (callable(getattr(module, "fold_scale_shift", None))
            or isinstance(module, (_BatchNorm, _InstanceNorm)) or _looks_frozen(module))


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def is_identity_in_eval(module: nn.Module) -> bool:
    """An Identity or a dropout (of torch's exact classes, or timm's DropBlock/DropPath) without hooks."""
    return (isinstance(module, nn.Module)
            and (type(module) in _DROPOUTS or qualified_name(type(module)) in IDENTITY_IN_EVAL)
            and _hook_problem(module) is None)


def _eval_followers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The followers that still compute something in eval (dropout and identities dropped)."""
    return [(attr, m) for attr, m in norm_act_followers(module) if not is_identity_in_eval(m)]


def _standard_affine(mean, var, gamma, beta, eps: float, channels: int):
    for name, tensor in (("running_mean", mean), ("running_var", var), ("weight", gamma), ("bias", beta)):
        if tensor is not None and not tensor.is_floating_point():
            return f"non-float dtype: {name} is {tensor.dtype}"
    var64 = var.detach().double()
    scale = 1.0 / torch.sqrt(var64 + float(eps))
    if gamma is not None:
        scale = scale * gamma.detach().double()
    shift = -mean.detach().double() * scale
    if beta is not None:
        shift = shift + beta.detach().double()
    if scale.shape != (channels,) or shift.shape != (channels,):
        return f"statistics of shape {tuple(scale.shape)} are not per-channel for {channels} channels"
    return scale, shift


def _norm_affine(module: nn.Module):
    """(scale, shift) in float64 with ``norm(x) = scale[c] * x + shift[c]`` in eval, or why there is none.

    For a known norm+activation module, the map of its norm part (what follows stays in the graph).
    """
    hooks = _hook_problem(module)
    if hooks:
        return hooks
    spec = norm_act_of(module)
    if spec is not None:
        return _norm_act_affine(module, spec)
    return _plain_norm_affine(module)


def _norm_act_affine(module: nn.Module, spec: NormAct):
    name = type(module).__name__
    for attr, follower in norm_act_followers(module):
        if not isinstance(follower, nn.Module):
            return f"{name}.{attr} is a {type(follower).__name__}, not a module the folded graph can call"
    if spec.norm == "own":
        return _plain_norm_affine(module)
    missing = [b for b in ("running_mean", "running_var", "eps") if getattr(module, b, None) is None]
    if missing or (spec.norm == "batchnorm" and not getattr(module, "track_running_stats", True)):
        return f"{name} keeps no running statistics: it normalises with each batch's own statistics, even in eval"
    channels = module.running_mean.numel()
    return _standard_affine(module.running_mean, module.running_var, getattr(module, "weight", None),
                            getattr(module, "bias", None), float(module.eps), channels)


def _plain_norm_affine(module: nn.Module):
    if callable(getattr(module, "fold_scale_shift", None)):
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor.dtype not in (torch.int64,) and not tensor.is_floating_point():
                return f"non-float dtype: {name} is {tensor.dtype}"
        try:
            scale, shift = module.fold_scale_shift()
        except Exception as exc:  # the module says it cannot be folded
            return f"fold_scale_shift() failed: {exc}"
        scale = torch.as_tensor(scale).detach().double().flatten()
        shift = torch.as_tensor(shift).detach().double().flatten()
        if scale.shape != shift.shape:
            return f"fold_scale_shift() returned scale {tuple(scale.shape)} and shift {tuple(shift.shape)}"
        return scale, shift
    if isinstance(module, (_BatchNorm, _InstanceNorm)):
        if type(module).forward not in _TRUSTED_NORM_FORWARDS:
            return f"{type(module).__name__} overrides forward(), so its eval map is not known to be affine"
        if not module.track_running_stats or module.running_mean is None or module.running_var is None:
            if isinstance(module, _InstanceNorm):
                return "track_running_stats=False: it normalises each sample with its own statistics"
            return "track_running_stats=False: it normalises with each batch's own statistics, even in eval"
        return _standard_affine(module.running_mean, module.running_var, module.weight, module.bias,
                                module.eps, module.num_features)
    if _looks_frozen(module):
        return _standard_affine(module.running_mean, module.running_var, module.weight, module.bias,
                                float(module.eps), module.running_mean.numel())
    return f"{type(module).__name__} is not a per-channel affine map in eval"


def _hook_problem(module: nn.Module) -> Optional[str]:
    if module._forward_hooks or module._forward_pre_hooks:
        return "has forward hooks, which the fold would drop"
    return None


# ---------------------------------------------------------------------------------------------------------
# Layers a norm folds into


_CONV_TYPES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONVT_TYPES = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}


@dataclass
class _Layer:
    """A conv, transposed conv or linear, as the fold math needs it."""

    kind: str  # "conv", "convT", "linear"
    dims: int  # spatial dims; 0 for linear
    groups: int
    out_channels: int
    in_channels: int


def _layer_of_module(module: nn.Module) -> Optional[_Layer]:
    for base, dims in _CONV_TYPES.items():
        if isinstance(module, base):
            return _Layer("conv", dims, module.groups, module.out_channels, module.in_channels)
    for base, dims in _CONVT_TYPES.items():
        if isinstance(module, base):
            return _Layer("convT", dims, module.groups, module.out_channels, module.in_channels)
    if isinstance(module, nn.Linear):
        return _Layer("linear", 0, 1, module.out_features, module.in_features)
    return None


def _is_centred_conv(module: nn.Module) -> bool:
    """A CenConv2d that computes exactly CenConv2d's map: a Conv2d with its weight centred per output channel."""
    cls = type(module)
    return (isinstance(module, CenConv2d) and cls.forward is CenConv2d.forward
            and cls.centred_weight is CenConv2d.centred_weight and cls._conv_forward is nn.Conv2d._conv_forward)


def _effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the layer convolves with, in float64."""
    weight = module.weight.detach().double()
    if _is_centred_conv(module):
        weight = weight - weight.mean(dim=(1, 2, 3), keepdim=True)
    return weight


def _plain_conv(conv: nn.Conv2d, weight: nn.Parameter, bias: nn.Parameter) -> nn.Conv2d:
    """An nn.Conv2d with ``conv``'s configuration and the given parameters."""
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=False,
                      padding_mode=conv.padding_mode, device="meta")
    plain.weight = weight
    plain.bias = bias
    plain.train(conv.training)
    return plain


def _layer_module_problem(module: nn.Module, name: str) -> Optional[str]:
    base = next(b for b in (*_CONV_TYPES, *_CONVT_TYPES, nn.Linear) if isinstance(module, b))
    overrides = type(module).forward is not base.forward or (
        hasattr(base, "_conv_forward") and type(module)._conv_forward is not base._conv_forward)
    if overrides and not _is_centred_conv(module):  # a CenConv2d's map is known: a conv with the centred weight
        return f"'{name}' ({type(module).__name__}) overrides forward(), so folding into its weight may not be exact"
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module):
        return f"'{name}' has a parametrized weight"
    hooks = _hook_problem(module)
    if hooks:
        return f"'{name}' {hooks}"
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return f"'{name}' is a lazy module that was never run"
    if not module.weight.is_floating_point():
        return f"non-float dtype: '{name}'.weight is {module.weight.dtype}"
    if module.bias is not None and not module.bias.is_floating_point():
        return f"non-float dtype: '{name}'.bias is {module.bias.dtype}"
    return None


def _zero_padding(module: nn.Module) -> Optional[str]:
    """Why a norm in front of this conv cannot fold into it, when the conv pads with zeros."""
    if module.padding_mode != "zeros":
        return None  # reflect/replicate/circular pad with copies of normalised values: exact
    if all(int(p) == 0 for p in module._reversed_padding_repeated_twice):
        return None
    return (f"it pads with zeros (padding={module.padding}), where the norm's shift would have to be padded "
            "instead")


class _Master:
    """Float64 copy of a layer's weight and bias, updated by every fold into it and rounded once at the end."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], layer: _Layer):
        self.weight = weight.detach().double().clone()
        channels = layer.out_channels
        self.bias = (bias.detach().double().clone() if bias is not None
                     else torch.zeros(channels, dtype=torch.float64, device=weight.device))
        self.layer = layer

    def fold_output(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """y -> scale * y + shift per output channel."""
        scale = scale.to(self.weight.device)
        shift = shift.to(self.weight.device)
        w = self.weight
        spatial = [1] * (w.dim() - 2)
        if self.layer.kind == "convT":
            # weight is (in, out/groups, k...): output channel o = group * (out/groups) + j lives at [group rows, j]
            g = self.layer.groups
            per_group = w.shape[1]
            w = w.reshape(g, w.shape[0] // g, per_group, *w.shape[2:])
            w = w * scale.reshape(g, 1, per_group, *spatial)
            self.weight = w.reshape(self.weight.shape)
        else:
            self.weight = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        self.bias = self.bias * scale + shift

    def fold_input(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """x -> scale * x + shift per input channel, in front of a conv (not transposed) or linear."""
        scale = scale.to(self.weight.device)
        shift = shift.to(self.weight.device)
        w = self.weight
        if self.layer.kind == "linear":
            self.bias = self.bias + w @ shift
            self.weight = w * scale.reshape(1, -1)
            return
        out, in_per_group = w.shape[:2]
        g = self.layer.groups
        spatial = [1] * (w.dim() - 2)

        def per_weight(v):  # (in,) -> (out, in/groups): the input channel each weight row reads
            return v.reshape(g, 1, in_per_group).expand(g, out // g, in_per_group).reshape(out, in_per_group)

        self.bias = self.bias + (w * per_weight(shift).reshape(out, in_per_group, *spatial)).flatten(1).sum(1)
        self.weight = w * per_weight(scale).reshape(out, in_per_group, *spatial)


def _rounded(value: torch.Tensor, like: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(value.to(dtype=like.dtype, device=like.device), requires_grad=requires_grad)


# ---------------------------------------------------------------------------------------------------------
# Shape knowledge (from one run on the example inputs, or torch.export's fake values)


_SHAPE_KEY = "normcli_shape"


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph on real inputs and notes each tensor-valued node's shape in ``node.meta``.

    A plain interpreter rather than ``torch.fx.passes.shape_prop.ShapeProp``: ShapeProp imports torch's
    symbolic-shape machinery (and with it sympy, over a second of start-up) for metadata the fold never reads.
    """

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[_SHAPE_KEY] = tuple(result.shape)
        return result


def _shape(node: Any) -> Optional[tuple[int, ...]]:
    if not isinstance(node, fx.Node):
        return None
    recorded = node.meta.get(_SHAPE_KEY)
    if recorded is not None:
        return recorded
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    return None


class _Functional:
    """Stands for an ``F.batch_norm`` call where the rank checks take a norm module."""

    def __repr__(self) -> str:
        return "F.batch_norm"


FUNCTIONAL = _Functional()


def _norm_label(norm: Any) -> str:
    return "F.batch_norm" if norm is FUNCTIONAL else type(norm).__name__


def _norm_channel_dims(norm: nn.Module) -> Optional[dict[int, int]]:
    """For each input rank the norm accepts, the dim it normalises as channels; None when not known.

    BatchNorm1d takes (N, C) and (N, C, L); InstanceNorm{k}d also takes an unbatched (C, ...) input, where its
    channels are dim 0. A subclass that changes which ranks it accepts is not known.
    """
    from normcli.layers.mabn import MABN2d

    if norm is FUNCTIONAL:
        return {rank: 1 for rank in range(2, 9)}  # F.batch_norm normalises dim 1 of any (N, C, ...) input
    spec = norm_act_of(norm)
    if spec is not None and spec.ranks is not None:
        return {rank: 1 for rank in spec.ranks}
    known = ((nn.BatchNorm1d, {2: 1, 3: 1}), (nn.BatchNorm2d, {4: 1}), (nn.BatchNorm3d, {5: 1}),
             (nn.InstanceNorm1d, {2: 0, 3: 1}), (nn.InstanceNorm2d, {3: 0, 4: 1}),
             (nn.InstanceNorm3d, {4: 0, 5: 1}), (MABN2d, {4: 1}),
             (nn.SyncBatchNorm, {rank: 1 for rank in range(2, 9)}))
    for cls, dims in known:
        if isinstance(norm, cls):
            check = getattr(cls, "_check_input_dim", None)
            if check is not None and getattr(type(norm), "_check_input_dim", None) is not check:
                return None
            if cls is MABN2d and type(norm).forward is not MABN2d.forward:
                return None
            return dims
    return None


def _ranks(dims) -> str:
    return " or ".join(f"{r}-D" for r in sorted(dims))


def _rank_problem(layer: _Layer, norm: nn.Module, where: str) -> Optional[str]:
    """Without shapes: why the norm's channels may not be the conv's channels at some rank both accept.

    A conv takes a batched (N, C, ...) and an unbatched (C, ...) input; the fold is exact only if, at every
    rank the conv and the norm both accept, the norm's channel dim is the conv's.
    """
    name = _norm_label(norm)
    norm_dims = _norm_channel_dims(norm)
    if norm_dims is None:
        return (f"the rank of the tensor {where} is unknown and which dim {name} normalises depends on it; "
                "pass example_inputs so the fold can check it")
    layer_dims = {layer.dims + 1: 0, layer.dims + 2: 1}
    kind = f"a {layer.dims}-d {'transposed conv' if layer.kind == 'convT' else 'conv'}"
    common = sorted(set(norm_dims) & set(layer_dims))
    if not common:
        return (f"the ranks do not match: {name} takes {_ranks(norm_dims)} tensors, {kind} gives and takes "
                f"{_ranks(layer_dims)}")
    wrong = [rank for rank in common if norm_dims[rank] != layer_dims[rank]]
    if not wrong:
        return None
    rank = wrong[0]
    batched = "an unbatched" if layer_dims[rank] == 0 else "a batched"
    problem = (f"on {batched} {rank}-D tensor {where} {name} normalises dim {norm_dims[rank]}, not the channels "
               f"of {kind} (dim {layer_dims[rank]})")
    if len(wrong) == len(common):
        return f"the ranks do not match: {problem}"
    return f"{problem}; pass example_inputs so the fold can check the rank"


def _broadcast_linear(layer: _Layer, tensor_node: Any, channels: int) -> bool:
    """A one-channel norm on a Linear's (N, 1, ..., features) output: one scale and shift for every feature.

    Needs the shape: the norm's channel dim is dim 1 of a tensor of rank 3 or more, of size 1.
    """
    shape = _shape(tensor_node)
    return (layer.kind == "linear" and channels == 1 and layer.out_channels != 1 and shape is not None
            and len(shape) >= 3 and int(shape[1]) == 1)


def _layout_problem(layer: _Layer, tensor_node: Any, norm: Optional[nn.Module], channels: int,
                    where: str) -> Optional[str]:
    """Check that the norm's channel dim is the layer's channel dim on the tensor between them."""
    shape = _shape(tensor_node)
    norm_dims = _norm_channel_dims(norm) if norm is not None else None
    if shape is not None and norm_dims is not None and norm_dims.get(len(shape), 1) != 1:
        # e.g. InstanceNorm2d on a 3-D tensor: an unbatched input, channels at dim 0
        return (f"on the {len(shape)}-D tensor {where} {_norm_label(norm)} normalises dim "
                f"{norm_dims[len(shape)]}, not dim 1")
    if layer.kind == "linear":
        if shape is None:
            return (f"the rank of the tensor {where} is unknown: BatchNorm1d on a 3-D tensor normalises dim 1, "
                    "not the Linear's features; pass example_inputs so the fold can check it is 2-D")
        if len(shape) != 2:
            return f"the tensor {where} has shape {list(shape)}: not (batch, features)"
    else:
        if shape is not None:
            if len(shape) != layer.dims + 2:
                return f"the tensor {where} has shape {list(shape)}: not a batched {layer.dims}-d feature map"
            if int(shape[1]) != channels:
                return f"the tensor {where} has {shape[1]} channels, the norm {channels}"
        elif norm is not None:
            return _rank_problem(layer, norm, where)
    return None


# ---------------------------------------------------------------------------------------------------------
# torch.fx


class _FoldTracer(fx.Tracer):
    """Keeps every norm the fold knows, and every CenConv2d, as one call_module node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_foldable_norm(m) or _is_centred_conv(m) or super().is_leaf_module(m, module_qualified_name)


def _owner_counts(graph: fx.Graph) -> Counter:
    """How often each module is used: calls plus direct reads of its parameters/buffers."""
    uses: Counter = Counter()
    for node in graph.nodes:
        if node.op == "call_module":
            uses[node.target] += 1
        elif node.op == "get_attr":
            parts = node.target.split(".")
            for end in range(1, len(parts)):  # every module that owns the tensor read
                uses[".".join(parts[:end])] += 1
    return uses


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _FoldTracer()
    graph = tracer.trace(model)
    drop_string_annotations(graph)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _fold_fx(gm: fx.GraphModule, model: nn.Module, example_inputs: Optional[tuple],
             report: FoldReport) -> fx.GraphModule:
    if example_inputs is not None:
        try:
            with torch.no_grad():
                _ShapeRecorder(gm).run(*example_inputs)
        except Exception as exc:
            raise NormcliError(f"the model fails on the example inputs ({describe(exc)}); give inputs of "
                               "the shape the model expects") from exc
    modules = dict(gm.named_modules())
    uses = _owner_counts(gm.graph)
    masters: dict[str, _Master] = {}

    def master(name: str) -> _Master:
        if name not in masters:
            module = modules[name]
            masters[name] = _Master(_effective_weight(module), module.bias, _layer_of_module(module))
        return masters[name]

    def layer_problem(name: str) -> Optional[str]:
        problem = _layer_module_problem(modules[name], name)
        if problem:
            return problem
        if uses[name] > 1:
            return f"'{name}' is called (or its weights read) at {uses[name]} places"
        return None

    norm_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and is_foldable_norm(modules[n.target])]
    called = {n.target for n in norm_nodes}
    pending: list[tuple[fx.Node, tuple, str]] = []
    folded_targets: list[str] = []

    def producer_problem(node: fx.Node, scale: torch.Tensor) -> tuple[Optional[str], bool]:
        """(why the norm at this call site cannot fold into the layer before it, whether it broadcasts)."""
        src = node.args[0]
        producer = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        layer = _layer_of_module(producer) if producer is not None else None
        if layer is None:
            return "its input is not the output of a conv or linear", False
        problem = layer_problem(src.target)
        if problem is None and len(src.users) > 1:
            problem = f"the output of '{src.target}' has {len(src.users)} consumers"
        broadcast = problem is None and _broadcast_linear(layer, src, scale.numel())
        if problem is None and not broadcast and layer.out_channels != scale.numel():
            problem = f"'{src.target}' has {layer.out_channels} output channels, the norm {scale.numel()}"
        if problem is None and not broadcast:
            problem = _layout_problem(layer, src, modules[node.target], scale.numel(), f"out of '{src.target}'")
        return problem, broadcast

    def remove_norm_call(node: fx.Node, src: fx.Node) -> None:
        """The norm's call gives way to its input; a norm+activation module's activation stays, on that input."""
        out = src
        if node.op == "call_module":
            with gm.graph.inserting_before(node):
                for attr, _ in _eval_followers(modules[node.target]):
                    out = gm.graph.call_module(f"{node.target}.{attr}", (out,))
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)

    def fold_into_producer(node: fx.Node, scale: torch.Tensor, shift: torch.Tensor, broadcast: bool) -> str:
        src = node.args[0]
        if broadcast:  # one channel: the same scale and shift for every output feature
            features = modules[src.target].out_features
            scale, shift = scale.expand(features), shift.expand(features)
        master(src.target).fold_output(scale, shift)
        remove_norm_call(node, src)
        return src.target

    sites: dict[str, list[fx.Node]] = {}
    for node in norm_nodes:
        sites.setdefault(node.target, []).append(node)

    # Pass 1: norm after the layer that produces its input.
    for name, nodes in sites.items():
        affine = _norm_affine(modules[name])
        if isinstance(affine, str):
            report.unfolded.append({"norm": name, "reason": affine})
            continue
        if uses[name] > len(nodes):
            report.unfolded.append({"norm": name, "reason": f"its statistics are read at "
                                                            f"{uses[name] - len(nodes)} places besides its calls"})
            continue
        if any(len(n.args) != 1 or n.kwargs for n in nodes):
            report.unfolded.append({"norm": name, "reason": "it is called with more than one argument"})
            continue
        scale, shift = affine
        if len(nodes) > 1:
            # one eval map at every call site: it folds when it folds into the layer before each of them
            checked = [producer_problem(n, scale) for n in nodes]
            problem = next((p for p, _ in checked if p is not None), None)
            if problem is not None:
                report.unfolded.append({"norm": name, "reason": f"it is called at {len(nodes)} places and "
                                                                f"cannot fold at each: {problem}"})
                continue
            targets = [fold_into_producer(n, scale, shift, bc) for n, (_, bc) in zip(nodes, checked)]
            folded_targets.append(name)
            report.folded.append({"norm": name, "into": ", ".join(targets)})
            continue
        node = nodes[0]
        problem, broadcast = producer_problem(node, scale)
        if problem is not None:
            pending.append((node, affine, problem))
            continue
        target = fold_into_producer(node, scale, shift, broadcast)
        folded_targets.append(name)
        report.folded.append({"norm": name, "into": target})

    # Pass 2: norm in front of the conv/linear that consumes it, where that is exact.
    for node, (scale, shift), first_reason in pending:
        name = node.target
        users = list(node.users)
        consumer = users[0] if len(users) == 1 else None
        target = (consumer.target if consumer is not None and consumer.op == "call_module"
                  and consumer.args[:1] == (node,) else None)
        layer = _layer_of_module(modules[target]) if target is not None else None
        if layer is None:
            if not first_reason.startswith("its input"):
                report.unfolded.append({"norm": name, "reason": first_reason})
            else:
                report.unfolded.append({"norm": name, "reason": f"{first_reason}, nor does its output go "
                                                                "straight into a conv or linear alone"})
            continue
        problem = layer_problem(target)
        followers = _eval_followers(modules[name])
        if problem is None and followers:
            problem = (f"its {', '.join(f'{a} ({type(m).__name__})' for a, m in followers)} comes between its "
                       "norm and the conv")
        if problem is None and layer.kind == "convT":
            problem = "a transposed conv spreads the norm's shift unevenly over its output"
        if problem is None and layer.kind == "conv":
            problem = _zero_padding(modules[target])
        if problem is None and layer.in_channels != scale.numel():
            problem = f"'{target}' has {layer.in_channels} input channels, the norm {scale.numel()}"
        if problem is None:
            problem = _layout_problem(layer, node, modules[name], scale.numel(), f"into '{target}'")
        if problem is not None:
            report.unfolded.append({"norm": name, "reason": f"{first_reason}, and folding it into the following "
                                                            f"'{target}' is not exact: {problem}"})
            continue
        master(target).fold_input(scale, shift)
        remove_norm_call(node, node.args[0])
        folded_targets.append(name)
        report.folded.append({"norm": name, "into": target})

    # Pass 3: F.batch_norm calls on a module's stored statistics, after the layer that produces their input.
    _fold_functional(gm, modules, uses, master, layer_problem, report)

    for name, m in masters.items():
        module = modules[name]
        requires_grad = module.weight.requires_grad
        weight = _rounded(m.weight, module.weight, requires_grad)
        bias = _rounded(m.bias, module.bias if module.bias is not None else module.weight, requires_grad)
        if _is_centred_conv(module):
            # a CenConv2d would centre the folded weight again at every forward: it becomes a plain Conv2d
            gm.add_submodule(name, _plain_conv(module, weight, bias))
        else:
            module.weight = weight
            module.bias = bias
    for name in folded_targets:
        kept = _eval_followers(modules[name])
        if kept:  # the norm is gone; what followed it inside the module stays, under the same names
            holder = nn.Module()
            for attr, follower in kept:
                holder.add_module(attr, follower)
            gm.add_submodule(name, holder)
        else:
            gm.delete_submodule(name)
    gm.graph.lint()
    gm.recompile()
    _report_uncalled(model, called, report)
    return gm


def _batch_norm_arguments(node: fx.Node) -> Optional[dict[str, Any]]:
    """The arguments of an ``F.batch_norm`` call node by name, or None for any other node."""
    import inspect

    import torch.nn.functional as F

    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    try:
        bound = inspect.signature(F.batch_norm).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def functional_norm_sites(model: nn.Module) -> list[str]:
    """Names of the modules whose stored running_mean an ``F.batch_norm`` call in ``model``'s forward reads
    (by torch.fx dataflow; raises when the model does not trace)."""
    graph = _trace(model).graph
    names = []
    for node in graph.nodes:
        args = _batch_norm_arguments(node)
        mean = args.get("running_mean") if args else None
        if isinstance(mean, fx.Node) and mean.op == "get_attr":
            names.append(mean.target.rpartition(".")[0])
    return list(dict.fromkeys(names))


def functional_norm_name(node: fx.Node, args: dict[str, Any]) -> str:
    """An F.batch_norm call is named after the module holding its running_mean (the name inspect lists)."""
    mean = args.get("running_mean")
    if isinstance(mean, fx.Node) and mean.op == "get_attr" and "." in mean.target:
        return mean.target.rsplit(".", 1)[0]
    return f"F.batch_norm call {node.name}"


def _functional_affine(gm: fx.GraphModule, node: fx.Node, args: dict[str, Any], reads: Counter,
                       called: set):
    """(scale, shift, tensor targets) of an eval F.batch_norm on stored tensors, or why it has none."""
    training = args["training"]
    if isinstance(training, fx.Node):
        return "its training flag is computed in the graph, so it may use batch statistics"
    if training:
        return "it is called with training=True: it normalises with each batch's own statistics"
    if isinstance(args["eps"], fx.Node) or not isinstance(args["eps"], (int, float)):
        return "its eps is computed in the graph"
    tensors: dict[str, Optional[torch.Tensor]] = {}
    targets = []
    for key in ("running_mean", "running_var", "weight", "bias"):
        arg = args[key]
        if arg is None:
            if key in ("running_mean", "running_var"):
                return f"it is called without {key}: it normalises with each batch's own statistics"
            tensors[key] = None
            continue
        if not isinstance(arg, fx.Node) or arg.op != "get_attr":
            return f"its {key} is computed in the graph, not a stored tensor"
        owner = arg.target.rpartition(".")[0]
        if owner in called:
            return f"its {key} belongs to '{owner}', which forward also calls"
        if reads[arg.target] > 1 or len(arg.users) > 1:
            return f"its {key} ('{arg.target}') is read at more than one place"
        value = _get_attr(gm, arg.target)
        if not isinstance(value, torch.Tensor):
            return f"its {key} ('{arg.target}') is not a tensor"
        tensors[key] = value
        targets.append(arg.target)
    channels = tensors["running_mean"].numel()
    affine = _standard_affine(tensors["running_mean"], tensors["running_var"], tensors["weight"], tensors["bias"],
                              float(args["eps"]), channels)
    if isinstance(affine, str):
        return affine
    return (*affine, targets)


def _fold_functional(gm: fx.GraphModule, modules: dict, uses: Counter, master, layer_problem,
                     report: FoldReport) -> None:
    """Fold each eval ``F.batch_norm`` call whose statistics a module holds into the conv/linear before it."""
    reads = Counter(n.target for n in gm.graph.nodes if n.op == "get_attr")
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    dropped: list[str] = []
    for node in list(gm.graph.nodes):
        args = _batch_norm_arguments(node)
        if args is None:
            continue
        name = functional_norm_name(node, args)
        found = _functional_affine(gm, node, args, reads, called)
        if isinstance(found, str):
            report.unfolded.append({"norm": name, "reason": found})
            continue
        scale, shift, targets = found
        src = args["input"]
        producer = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        layer = _layer_of_module(producer) if producer is not None else None
        problem = None
        if layer is None:
            problem = "its input is not the output of a conv or linear"
        if problem is None:
            problem = layer_problem(src.target)
        if problem is None and len(src.users) > 1:
            problem = f"the output of '{src.target}' has {len(src.users)} consumers"
        if problem is None and layer.out_channels != scale.numel():
            problem = f"'{src.target}' has {layer.out_channels} output channels, the norm {scale.numel()}"
        if problem is None:
            problem = _layout_problem(layer, src, FUNCTIONAL, scale.numel(), f"out of '{src.target}'")
        if problem is not None:
            report.unfolded.append({"norm": name, "reason": problem})
            continue
        master(src.target).fold_output(scale, shift)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        for attr in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target in targets and not n.users]:
            gm.graph.erase_node(attr)
        dropped += targets
        report.folded.append({"norm": name, "into": src.target})
    for target in dropped:  # the folded statistics leave the module (and its state dict) with the call
        owner_path, _, leaf = target.rpartition(".")
        delattr(_get_attr(gm, owner_path) if owner_path else gm, leaf)


def _report_uncalled(model: nn.Module, called: set, report: FoldReport) -> None:
    for name, module in model.named_modules():
        if name and name not in called and is_foldable_norm(module) and not _inside_norm(name, called):
            report.unfolded.append({"norm": name, "reason": "forward() never calls it directly; left as is"})


def _inside_norm(name: str, called: set) -> bool:
    return any(name.startswith(c + ".") for c in called)


# ---------------------------------------------------------------------------------------------------------
# torch.export fallback


def _overloads(name: str) -> set:
    packet = getattr(torch.ops.aten, name)
    return {getattr(packet, overload) for overload in packet.overloads()}


def _export_layer(node: fx.Node) -> Optional[tuple[_Layer, int]]:
    """(layer, index of the bias argument) for an aten conv/linear call."""
    aten = torch.ops.aten
    target = node.target
    for dims in (1, 2, 3):
        for kind, name in (("conv", f"conv{dims}d"), ("convT", f"conv_transpose{dims}d")):
            if target in _overloads(name):
                groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
                return _Layer(kind, dims, int(groups), -1, -1), 2
    if target == aten.convolution.default:
        weight_rank = len(_shape(node.args[1]) or ()) or 4
        kind = "convT" if node.args[6] else "conv"
        return _Layer(kind, weight_rank - 2, int(node.args[8]), -1, -1), 2
    if target == aten.linear.default:
        return _Layer("linear", 0, 1, -1, -1), 2
    return None


def _get_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _fold_export(ep, model: nn.Module, report: FoldReport) -> nn.Module:
    gm = _fold_graph(ep.module(), report)
    _report_uncalled_export(model, {r["norm"] for r in report.folded + report.unfolded}, report)
    return gm


# batch-norm ops that normalise with the batch's own statistics: never foldable, always reported
_BATCH_STAT_NORMS = ("_native_batch_norm_legit", "_native_batch_norm_legit_functional", "native_batch_norm",
                     "cudnn_batch_norm", "miopen_batch_norm")
# other norm ops a graph can hold: not a per-channel affine map of the input in eval
_OTHER_NORMS = {"layer_norm": "LayerNorm", "native_layer_norm": "LayerNorm", "group_norm": "GroupNorm",
                "native_group_norm": "GroupNorm", "instance_norm": "InstanceNorm", "rms_norm": "RMSNorm",
                "_fused_rms_norm": "RMSNorm"}


def _aten_targets(names) -> dict:
    found = {}
    for name in names:
        if hasattr(torch.ops.aten, name):
            for overload in _overloads(name):
                found[overload] = name
    return found


def _graph_norm_name(node: fx.Node) -> str:
    """The module path of a norm op: the owner of its running statistics or weight, else torch.export's stack."""
    for arg in node.args[1:5]:
        if isinstance(arg, fx.Node) and arg.op == "get_attr" and "." in arg.target:
            return arg.target.rsplit(".", 1)[0]
    return _stack_name(node)


def _fold_graph(gm: fx.GraphModule, report: FoldReport) -> fx.GraphModule:
    """Fold on an aten-level graph (a torch.export module, or TorchScript converted to one), in place.

    Every norm op the graph holds ends up in ``report`` once: folded, or unfolded with its reason.
    """
    aten = torch.ops.aten
    graph = gm.graph
    attr_users: Counter = Counter()
    for node in graph.nodes:
        if node.op == "get_attr":
            attr_users[node.target] += len(node.users)
    masters: dict[str, tuple[_Master, fx.Node]] = {}
    folded_attrs: list[str] = []
    seen_norms: set = set()

    def attr_target(arg) -> Optional[str]:
        return arg.target if isinstance(arg, fx.Node) and arg.op == "get_attr" else None

    batch_stat_norms = _aten_targets(_BATCH_STAT_NORMS)
    other_norms = _aten_targets(_OTHER_NORMS)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in batch_stat_norms or node.target in other_norms:
            name = _graph_norm_name(node)
            if name not in seen_norms:
                seen_norms.add(name)
                reason = ("it normalises with each batch's own statistics (the graph was captured in training "
                          "mode)" if node.target in batch_stat_norms else
                          f"{_OTHER_NORMS[other_norms[node.target]]} normalises each sample with its own "
                          "statistics, so it is not a fixed per-channel affine map")
                report.unfolded.append({"norm": name, "reason": reason})
            continue
        if node.target not in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
            continue
        if node.target == aten.batch_norm.default:
            x, gamma, beta, mean, var, training, _momentum, eps = node.args[:8]
            out_nodes = [node]
        else:
            x, gamma, beta, mean, var, _momentum, eps = node.args[:7]
            training = False
            out_nodes = list(node.users)
        mean_t, var_t = attr_target(mean), attr_target(var)
        name = mean_t.rsplit(".", 1)[0] if mean_t else _graph_norm_name(node)
        if name in seen_norms:  # one norm module called at several places: its first call reported it
            continue
        seen_norms.add(name)
        if training or mean_t is None or var_t is None:
            report.unfolded.append({"norm": name, "reason": "it normalises with each batch's own statistics"})
            continue
        if node.target != aten.batch_norm.default and any(
                u.target is not operator.getitem or u.args[1] != 0 for u in out_nodes):
            report.unfolded.append({"norm": name, "reason": "its saved statistics are used by the graph"})
            continue
        params = {k: _get_attr(gm, attr_target(a)) if attr_target(a) else None
                  for k, a in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var))}
        affine = _standard_affine(params["mean"], params["var"], params["gamma"], params["beta"], float(eps),
                                  params["mean"].numel())
        if isinstance(affine, str):
            report.unfolded.append({"norm": name, "reason": affine})
            continue
        if any(attr_users[attr_target(a)] > 1 for a in (gamma, beta, mean, var) if attr_target(a)):
            report.unfolded.append({"norm": name, "reason": "it is called at more than one place"})
            continue
        scale, shift = affine
        found = _export_layer(x) if isinstance(x, fx.Node) and x.op == "call_function" else None
        if found is None:
            report.unfolded.append({"norm": name, "reason": "its input is not the output of a conv or linear "
                                                            "(the torch.export fallback folds only those)"})
            continue
        layer, bias_index = found
        weight_t = attr_target(x.args[1])
        bias_arg = x.args[bias_index] if len(x.args) > bias_index else x.kwargs.get("bias")
        bias_t = attr_target(bias_arg)
        producer = weight_t.rsplit(".", 1)[0] if weight_t else str(x.name)
        problem = None
        if weight_t is None or (bias_arg is not None and bias_t is None):
            problem = f"the weights of '{producer}' are computed in the graph, not stored"
        elif attr_users[weight_t] > 1 or (bias_t and attr_users[bias_t] > 1):
            problem = f"'{producer}' is called (or its weights read) at more than one place"
        elif len(x.users) > 1:
            problem = f"the output of '{producer}' has {len(x.users)} consumers"
        if problem is None:
            weight = _get_attr(gm, weight_t)
            if not weight.is_floating_point():
                problem = f"non-float dtype: '{producer}'.weight is {weight.dtype}"
        if problem is None:
            layer.dims = 0 if layer.kind == "linear" else weight.dim() - 2
            out_channels = weight.shape[1] * layer.groups if layer.kind == "convT" else weight.shape[0]
            layer.out_channels = out_channels
            if out_channels != scale.numel():
                problem = f"'{producer}' has {out_channels} output channels, the norm {scale.numel()}"
            else:
                problem = _layout_problem(layer, x, None, scale.numel(), f"out of '{producer}'")
        if problem is not None:
            report.unfolded.append({"norm": name, "reason": problem})
            continue
        if weight_t not in masters:
            bias = _get_attr(gm, bias_t) if bias_t else None
            masters[weight_t] = (_Master(weight, bias, layer), x)
        masters[weight_t][0].fold_output(scale, shift)
        for out in out_nodes:
            out.replace_all_uses_with(x)
        for out in out_nodes:
            if out is not node:
                graph.erase_node(out)
        graph.erase_node(node)
        for a in (gamma, beta, mean, var):
            if attr_target(a):
                folded_attrs.append(a.target)
        report.folded.append({"norm": name, "into": producer})

    for weight_t, (m, conv_node) in masters.items():
        owner_path, _, leaf = weight_t.rpartition(".")
        owner = _get_attr(gm, owner_path) if owner_path else gm
        weight = getattr(owner, leaf)
        setattr(owner, leaf, _rounded(m.weight, weight, weight.requires_grad))
        bias_arg = conv_node.args[2] if len(conv_node.args) > 2 else conv_node.kwargs.get("bias")
        if isinstance(bias_arg, fx.Node):
            b_owner_path, _, b_leaf = bias_arg.target.rpartition(".")
            b_owner = _get_attr(gm, b_owner_path) if b_owner_path else gm
            old = getattr(b_owner, b_leaf)
            setattr(b_owner, b_leaf, _rounded(m.bias, old, old.requires_grad))
        else:
            bias_leaf = "bias" if not hasattr(owner, "bias") else f"{leaf}_folded_bias"
            owner.register_parameter(bias_leaf, _rounded(m.bias, weight, weight.requires_grad))
            with graph.inserting_before(conv_node):
                bias_node = graph.get_attr(f"{owner_path}.{bias_leaf}" if owner_path else bias_leaf)
            args = list(conv_node.args)
            if len(args) > 2:
                args[2] = bias_node
                conv_node.args = tuple(args)
            elif "bias" in conv_node.kwargs or len(args) < 2:
                conv_node.kwargs = {**conv_node.kwargs, "bias": bias_node}
            else:
                conv_node.args = (*args, bias_node)

    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users and node.target.rsplit(".", 1)[0] in {
                t.rsplit(".", 1)[0] for t in folded_attrs}:
            graph.erase_node(node)
    for norm in {t.rsplit(".", 1)[0] for t in folded_attrs}:
        _drop_norm_state(gm, norm)
    graph.lint()
    gm.recompile()
    return gm


def _drop_norm_state(gm: nn.Module, norm: str) -> None:
    """Remove a folded norm's tensors from the exported module, and the module itself once empty."""
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    owner_path, _, leaf = norm.rpartition(".")
    try:
        module = _get_attr(gm, norm)
    except AttributeError:
        return
    for attr in [k for k, _ in module.named_parameters(recurse=False)] + \
            [k for k, _ in module.named_buffers(recurse=False)]:
        if f"{norm}.{attr}" not in still_read:
            delattr(module, attr)
    if not list(module.parameters()) and not list(module.buffers()) and not list(module.children()):
        owner = _get_attr(gm, owner_path) if owner_path else gm
        delattr(owner, leaf)


def _stack_name(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else node.name


def _report_uncalled_export(model: nn.Module, seen: set, report: FoldReport) -> None:
    for name, module in model.named_modules():
        if name and name not in seen and is_foldable_norm(module):
            reason = ("the torch.export fallback folds only BatchNorm ops" if not isinstance(module, _BatchNorm)
                      else "forward() does not call it for inputs shaped like the example; left as is")
            report.unfolded.append({"norm": name, "reason": reason})


def _export(model: nn.Module, example_inputs: tuple):
    """torch.export with symbolic dimensions where the model allows them, else static shapes.

    Every dimension may stay symbolic (Dim.AUTO specialises the ones the model fixes), so the folded module
    runs at the other batch sizes and spatial sizes the original runs at.
    """
    from torch.export import Dim

    dynamic = tuple({d: Dim.AUTO for d in range(t.dim())} if isinstance(t, torch.Tensor) and t.dim() > 0 else None
                    for t in example_inputs)
    try:
        return torch.export.export(model, example_inputs, dynamic_shapes=dynamic)
    except Exception:
        return torch.export.export(model, example_inputs)


# ---------------------------------------------------------------------------------------------------------


def fold_batchnorm(
    model: nn.Module,
    inplace: bool = False,
    example_inputs: Union[torch.Tensor, Sequence[Any], None] = None,
) -> tuple[nn.Module, FoldReport]:
    """Fold every eval-mode per-channel affine norm into the conv/linear next to it, where that is exact.

    Returns ``(folded_model, report)``. The model must be in eval mode. ``inplace=False`` (default) works on
    a deep copy; with ``inplace=True`` the original's layers are changed and it must not be used afterwards.
    ``example_inputs`` (a tensor or a tuple of positional inputs) lets the fold check tensor ranks (needed to
    fold around a Linear) and is the fallback's input when torch.fx cannot trace the model: then the model
    is exported with torch.export and folded on that graph (``report.method == "export"``).
    The folded model is a ``torch.fx.GraphModule`` with the original's call signature; the folded norms are
    gone from its ``named_modules()``. With ``method == "fx"`` it pickles (``torch.save``); the
    ``"export"`` module carries torch.export's shape guards, which torch cannot pickle: save its
    ``state_dict()``, or export it again.
    """
    in_training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if in_training:
        shown = ", ".join(f"'{n}'" for n in in_training[:3]) + (" ..." if len(in_training) > 3 else "")
        raise NormcliError(f"cannot fold a model in training mode ({shown}): BatchNorm then uses batch "
                           "statistics; call model.eval() first")
    if example_inputs is not None:
        example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except Exception as exc:
            raise NormcliError(f"cannot copy the model to fold it ({exc}); pass inplace=True to fold the "
                               "model itself") from exc
    # every norm layer is accounted for: those the fold does not handle are listed with the reason below
    norms = _norm_layers(model)
    folded, report = _fold_any(model, example_inputs)
    _report_other_norms(norms, report)
    return folded, report


# norms that normalise each sample with that sample's own statistics: no fixed per-channel affine map to fold
_PER_SAMPLE_NORMS = {"GroupNorm", "LayerNorm", "RMSNorm", "LocalResponseNorm", "FilterResponseNorm1d",
                     "FilterResponseNorm2d", "FilterResponseNorm3d"}


def _norm_layers(model: nn.Module) -> list[tuple[str, str]]:
    """(name, class name) of every norm layer of ``model`` (a TorchScript module names the class it was
    scripted from); a module unlifted from a torch.export archive holds none as modules."""
    from normcli.inspection import NORM_CLASSES

    if _is_aten_graph(model):
        return []
    out = []
    for name, module in model.named_modules():
        kind = getattr(module, "original_name", None) if isinstance(module, torch.jit.ScriptModule) else None
        kind = kind or type(module).__name__
        if name and kind in NORM_CLASSES:
            out.append((name, kind))
    return out


def _report_other_norms(norms: list[tuple[str, str]], report: FoldReport) -> None:
    seen = {r["norm"] for r in report.folded + report.unfolded}
    for name, kind in norms:
        if name in seen:
            continue
        if kind in _PER_SAMPLE_NORMS:
            reason = (f"{kind} normalises each sample with that sample's own statistics, so it is not a fixed "
                      "per-channel affine map; left in place")
        else:
            reason = f"the fold does not handle {kind}; left in place"
        report.unfolded.append({"norm": name, "reason": reason})


def _fold_any(model: nn.Module, example_inputs: Optional[tuple]) -> tuple[nn.Module, FoldReport]:
    report = FoldReport()
    if isinstance(model, torch.jit.ScriptModule):
        return _fold_torchscript(model, example_inputs, report)
    if _is_aten_graph(model):
        # a module unlifted from a torch.export archive: its norms are aten ops in the graph, not modules
        folded = _fold_graph(model, report)
        _report_unused_graph_norms(model, report)
        report.method = "export"
        report.note = "a torch.export module: folded on its graph"
        return folded, report
    try:
        traced = _trace(model)
    except Exception as exc:  # any tracing failure: fall back below
        fx_error = describe(exc)
    else:
        report.method = "fx"
        return _fold_fx(traced, model, example_inputs, report), report
    if example_inputs is None:
        why = f"torch.fx could not trace the model ({fx_error}); pass example_inputs to fold via torch.export"
        return model, _nothing_folded(model, why)
    try:
        exported = _export(model, example_inputs)
    except Exception as exc:
        export_error = describe(exc)
        why = f"torch.fx could not trace the model ({fx_error}) and torch.export failed too ({export_error})"
        return model, _nothing_folded(model, why)
    folded = _fold_export(exported, model, report)
    _report_each_norm_once(report)
    report.method = "export"
    report.note = f"torch.fx could not trace the model ({fx_error}); folded on its torch.export graph"
    return folded, report


def _report_each_norm_once(report: FoldReport) -> None:
    """A norm called at several places is one norm: keep its first reason only."""
    seen: set = set()
    unfolded = []
    for entry in report.unfolded:
        if entry["norm"] not in seen:
            seen.add(entry["norm"])
            unfolded.append(entry)
    report.unfolded = unfolded


def _nothing_folded(model: nn.Module, why: str) -> FoldReport:
    report = FoldReport(method="none", note=why)
    for name, module in model.named_modules():
        if is_foldable_norm(module):
            report.unfolded.append({"norm": name, "reason": f"not folded: {why}"})
    return report


# ---------------------------------------------------------------------------------------------------------
# Modules that already are graphs: torch.export modules (.pt2) and TorchScript


def _is_aten_graph(model: nn.Module) -> bool:
    """A GraphModule of aten ops (what ``torch.export.load(...).module()`` returns), not a torch.fx trace."""
    return isinstance(model, fx.GraphModule) and any(
        n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in model.graph.nodes)


def _reported(report: FoldReport) -> set:
    return {r["norm"] for r in report.folded + report.unfolded}


def _report_unused_graph_norms(gm: nn.Module, report: FoldReport) -> None:
    """Norm state the module holds (running statistics) that no op of its graph reads."""
    seen = _reported(report)
    for name, module in gm.named_modules():
        buffers = dict(module.named_buffers(recurse=False))
        if name and name not in seen and "running_mean" in buffers and "running_var" in buffers:
            report.unfolded.append({"norm": name, "reason": "the graph never uses it; left as is"})


def _script_norms(model) -> list[str]:
    """Names of the norm modules in a TorchScript module, by the class each was scripted from."""
    from normcli.inspection import NORM_CLASSES

    return [name for name, module in model.named_modules()
            if name and getattr(module, "original_name", type(module).__name__) in NORM_CLASSES]


def _fold_torchscript(model, example_inputs: Optional[tuple], report: FoldReport):
    """Convert TorchScript to a torch.export graph (torch's TS2EPConverter) and fold on that graph.

    The result is a GraphModule that computes what the TorchScript computes (the caller's checks compare the
    two). Where the conversion is impossible, the TorchScript module is returned as is and every norm in it
    is reported unfolded with the reason.
    """
    import warnings

    norms = _script_norms(model)

    def nothing(why: str):
        report.method = "none"
        report.note = why
        for name in norms:
            report.unfolded.append({"norm": name, "reason": f"not folded: {why}"})
        return model, report

    if example_inputs is None:
        return nothing("TorchScript is folded on a torch.export graph converted from it, which needs "
                       "example inputs; pass example_inputs")
    from torch._export.converter import TS2EPConverter

    # a batch of 2 keeps the batch dimension symbolic in the converted graph (a batch of 1 is specialised)
    single = [isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1 for t in example_inputs]
    candidates = [example_inputs]
    if any(single):
        candidates.insert(0, tuple(torch.cat([t, t]) if one else t for t, one in zip(example_inputs, single)))
    errors = []
    for sample in candidates:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the converter warns about every unused num_batches_tracked
                gm = TS2EPConverter(model, sample).convert().module()
            break
        except Exception as exc:
            errors.append(describe(exc))
    else:
        return nothing(f"the TorchScript could not be converted to a torch.export graph ({errors[-1]}); "
                       "left in the TorchScript module")
    gm = _fold_graph(gm, report)
    seen = _reported(report)
    for name in norms:
        if name not in seen:
            report.unfolded.append({"norm": name, "reason": "the TorchScript graph never calls it; left as is"})
    report.method = "torchscript"
    report.note = "TorchScript converted to a torch.export graph and folded on it"
    return gm, report
