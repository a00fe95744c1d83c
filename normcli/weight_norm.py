"""Fold weight normalization (Salimans & Kingma, 2016: w = g * v / ||v||) into a plain weight.

Both forms PyTorch has: the hook of ``torch.nn.utils.weight_norm`` (parameters ``<name>_g``/``<name>_v``)
and ``torch.nn.utils.parametrizations.weight_norm`` (``parametrizations.<name>.original0``/``original1``).
The weight is computed in float64 from g and v and rounded once to the parameter's dtype, so the exported
graph holds one constant instead of a norm-of-v subgraph.

Only the command bodies import this module, so torch is imported at the top.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from normcli.errors import NormcliError, describe
from normcli.fold import FoldReport

__all__ = ["fold_weight_norm", "weight_norm_value", "copy_module"]


def weight_norm_value(g: torch.Tensor, v: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
    """g * v / ||v|| in float64; the norm over every dim but ``dim`` (all of v when ``dim`` is None or -1).

    The same rule as ``torch._weight_norm`` (``norm_except_dim``), without its float32 rounding.
    """
    g64, v64 = g.detach().double(), v.detach().double()
    if dim is None or dim == -1:
        return g64 * v64 / torch.linalg.vector_norm(v64)
    dim = dim % v64.dim()
    others = [d for d in range(v64.dim()) if d != dim]
    if not others:  # a 1-d v normalised along its only dim: each element by its own magnitude
        return g64 * v64 / v64.abs()
    return g64 * v64 / torch.linalg.vector_norm(v64, dim=others, keepdim=True)


def _hook_weight_norms(module: nn.Module):
    from torch.nn.utils.weight_norm import WeightNorm

    return [(key, hook) for key, hook in module._forward_pre_hooks.items() if type(hook) is WeightNorm]


def _parametrized_weight_norms(module: nn.Module):
    """(name, parametrization list) of every parametrized tensor whose parametrizations include weight norm."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import _WeightNorm

    if not parametrize.is_parametrized(module):
        return []
    return [(name, plist) for name, plist in module.parametrizations.items()
            if any(isinstance(p, _WeightNorm) for p in plist)]


def copy_module(model: nn.Module) -> nn.Module:
    """A deep copy that also works with the old weight-norm hook.

    That hook stores the computed weight as a plain (non-leaf) tensor attribute, which ``copy.deepcopy``
    refuses; the copy gets a detached clone of it instead (recomputed by the hook at the next forward).
    """
    memo: dict = {}
    for module in model.modules():
        for _, hook in _hook_weight_norms(module):
            computed = module.__dict__.get(hook.name)
            if isinstance(computed, torch.Tensor) and not computed.is_leaf:
                memo[id(computed)] = computed.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:
        raise NormcliError(f"cannot copy the model to fold it ({describe(exc)}); pass inplace=True to fold "
                           "the model itself") from exc


def _layer_name(module_name: str, tensor: str) -> str:
    if tensor == "weight":
        return module_name
    return f"{module_name}.{tensor}" if module_name else tensor


def fold_weight_norm(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, FoldReport]:
    """Replace every weight-normalized tensor by the plain parameter g * v / ||v|| it computes.

    Returns ``(model, report)``; ``report.folded`` has ``{"norm": layer, "into": layer}`` per tensor (the
    layer itself), ``report.unfolded`` the ones left, with why. ``inplace=False`` (default) works on a copy
    when there is anything to fold, else returns ``model`` itself.
    """
    found = [(name, m) for name, m in model.named_modules()
             if _hook_weight_norms(m) or _parametrized_weight_norms(m)]
    report = FoldReport(method="weight-norm")
    if not found:
        return model, report
    if not inplace:
        model = copy_module(model)
    modules = dict(model.named_modules())
    for name, _ in found:
        module = modules[name]
        for key, hook in _hook_weight_norms(module):
            _fold_hook(module, key, hook)
            report.folded.append({"norm": _layer_name(name, hook.name), "into": _layer_name(name, hook.name)})
        parametrized = _parametrized_weight_norms(module)
        problems = {tensor: _parametrization_problem(plist) for tensor, plist in parametrized}
        if parametrized and len(parametrized) != len(module.parametrizations):
            others = ", ".join(t for t in module.parametrizations if t not in problems)
            problems = {t: f"other tensors of the layer are parametrized too ({others})" for t in problems}
        for tensor, plist in parametrized:
            if problems[tensor]:
                report.unfolded.append({"norm": _layer_name(name, tensor), "reason": problems[tensor]})
        if parametrized and not any(problems.values()):
            for tensor, plist in parametrized:
                _fold_parametrized(module, tensor, plist)
                report.folded.append({"norm": _layer_name(name, tensor), "into": _layer_name(name, tensor)})
            _unparametrize(module)
    return model, report


def _fold_hook(module: nn.Module, key, hook) -> None:
    g = module._parameters[f"{hook.name}_g"]
    v = module._parameters[f"{hook.name}_v"]
    weight = weight_norm_value(g, v, hook.dim)
    del module._forward_pre_hooks[key]
    del module._parameters[f"{hook.name}_g"], module._parameters[f"{hook.name}_v"]
    module.__dict__.pop(hook.name, None)  # the hook's last computed value
    module.register_parameter(hook.name, nn.Parameter(weight.to(dtype=v.dtype, device=v.device),
                                                      requires_grad=v.requires_grad))
    _refresh_flat_weights(module)


def _refresh_flat_weights(module: nn.Module) -> None:
    # RNNs keep a list of their weight tensors, built from the attributes; rebuild it with the plain ones
    if callable(getattr(module, "_init_flat_weights", None)):
        module._init_flat_weights()


def _parametrization_problem(plist) -> Optional[str]:
    from torch.nn.utils.parametrizations import _WeightNorm

    if len(plist) != 1:
        kinds = ", ".join(type(p).__name__ for p in plist)
        return f"weight norm is one of {len(plist)} parametrizations ({kinds}); only a lone weight norm folds"
    p = plist[0]
    if type(p).forward is not _WeightNorm.forward:
        return f"{type(p).__name__} overrides forward(), so its weight is not known to be g * v / ||v||"
    if not hasattr(plist, "original0") or not hasattr(plist, "original1"):
        return "its parametrization does not hold g and v as original0 and original1"
    return None


def _fold_parametrized(module: nn.Module, tensor: str, plist) -> None:
    g, v = plist.original0, plist.original1
    weight = weight_norm_value(g, v, plist[0].dim)
    # not parametrize.remove_parametrizations: it deletes the tensor's property from the Parametrized*
    # class, which a deep copy shares with the original model
    del module.parametrizations[tensor]
    module.__dict__.setdefault("_normcli_folded", {})[tensor] = nn.Parameter(
        weight.to(dtype=v.dtype, device=v.device), requires_grad=v.requires_grad)


def _unparametrize(module: nn.Module) -> None:
    """Give the module its plain class back (this instance only) and the folded tensors as parameters."""
    folded = module.__dict__.pop("_normcli_folded")
    delattr(module, "parametrizations")
    module.__class__ = module.__class__.__bases__[0]  # Parametrized<Cls> derives from <Cls> alone
    for tensor, parameter in folded.items():
        module.register_parameter(tensor, parameter)
    # parametrizations.weight_norm also adds a hook that maps old weight_g/weight_v keys on load: it has no
    # parametrization left to feed, and as a local function it would make the module unpicklable
    for key, hook in list(module._load_state_dict_pre_hooks.items()):
        if getattr(getattr(hook, "hook", hook), "__name__", "") == "_weight_norm_compat_hook":
            del module._load_state_dict_pre_hooks[key]
    _refresh_flat_weights(module)
