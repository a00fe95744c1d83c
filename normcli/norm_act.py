"""Norm layers whose forward also applies what follows the norm (dropout, activation): a registry by class name.

Model zoos wrap BatchNorm and its activation in one module (timm's ``BatchNormAct2d``, ``SyncBatchNormAct``,
``FrozenBatchNormAct2d``). Such a class overrides ``forward``, so nothing about it can be read from the
class itself; normcli treats one as "a norm followed by these submodules" only when its qualified class
name is in :data:`NORM_ACT_CLASSES`, each entry saying how its forward splits. Any other class that
overrides a norm's forward stays an opaque module that fold and swap refuse with their reason.

The registry is plain data (no torch import): ``inspect`` reads it to name the kind of a layer from a
file's class names without running anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["NormAct", "NORM_ACT_CLASSES", "norm_act_of", "norm_act_followers", "qualified_name",
           "IDENTITY_IN_EVAL"]


@dataclass(frozen=True)
class NormAct:
    """How one known class's forward splits: ``norm`` computes the norm, then each attribute of ``follows``
    that the module has is applied in order (a missing one is skipped, as timm's ``SyncBatchNormAct`` does).

    ``norm``: ``"batchnorm"`` (the BatchNorm eval map from ``running_mean``/``running_var``/``weight``/``bias``
    and ``eps``, batch statistics in training), ``"frozen"`` (the same map from buffers, never updated) or
    ``"own"`` (the eval map of the class's base, which ``fold_scale_shift()`` gives when it has one).
    ``ranks``: the input ranks the forward accepts (channels in dim 1); None: those of its BatchNorm base.
    """

    norm: str
    follows: tuple[str, ...] = ("drop", "act")
    ranks: Optional[tuple[int, ...]] = None


_TIMM = {
    "BatchNormAct2d": NormAct("batchnorm", ranks=(4,)),
    "SyncBatchNormAct": NormAct("batchnorm"),
    "FrozenBatchNormAct2d": NormAct("frozen", ranks=(4,)),
}

# normcli's own: a swap of a norm+activation module keeps the activation in one of these
_NORMCLI = {
    "BatchNorm1dAct": NormAct("batchnorm"),
    "BatchNorm2dAct": NormAct("batchnorm"),
    "BatchNorm3dAct": NormAct("batchnorm"),
    "SyncBatchNormAct": NormAct("batchnorm"),
    "FrozenBatchNorm1dAct": NormAct("frozen", ranks=(2, 3)),
    "FrozenBatchNorm2dAct": NormAct("frozen", ranks=(4,)),
    "FrozenBatchNorm3dAct": NormAct("frozen", ranks=(5,)),
    "MABN2dAct": NormAct("own", ranks=(4,)),
    "GroupNormAct": NormAct("own"),
    "FilterResponseNorm1dAct": NormAct("own"),
    "FilterResponseNorm2dAct": NormAct("own"),
    "FilterResponseNorm3dAct": NormAct("own"),
}

# qualified class name (module + qualname) -> how its forward splits. timm moved its layers from
# timm.models.layers to timm.layers (0.9); checkpoints pickled with either name exist.
NORM_ACT_CLASSES: dict[str, NormAct] = {
    **{f"timm.layers.norm_act.{name}": spec for name, spec in _TIMM.items()},
    **{f"timm.models.layers.norm_act.{name}": spec for name, spec in _TIMM.items()},
    **{f"normcli.layers.norm_act.{name}": spec for name, spec in _NORMCLI.items()},
}

# Modules that compute the identity in eval mode, by qualified class name: a fold may drop them from the
# eval graph. torch's dropouts are recognised by class (see ``is_identity_in_eval`` in normcli.fold).
IDENTITY_IN_EVAL = frozenset({
    "torch.nn.modules.linear.Identity",
    "timm.layers.drop.DropBlock2d", "timm.layers.drop.DropPath",
    "timm.models.layers.drop.DropBlock2d", "timm.models.layers.drop.DropPath",
})


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def norm_act_of(module_or_name: Any) -> Optional[NormAct]:
    """The registry entry of a module (by its exact class: a subclass of a known class is not known) or of a
    qualified class name; None when it is not a known norm+activation class."""
    name = module_or_name if isinstance(module_or_name, str) else qualified_name(type(module_or_name))
    return NORM_ACT_CLASSES.get(name)


def norm_act_followers(module: Any) -> list[tuple[str, Any]]:
    """For a known norm+activation module: the (attribute, value) pairs its forward applies after the norm, in
    order; [] for any other module."""
    spec = norm_act_of(module)
    if spec is None:
        return []
    found = [(attr, getattr(module, attr, None)) for attr in spec.follows]
    return [(attr, m) for attr, m in found if m is not None]
