"""Inspect's findings on the norm layers of a model that swap or fuse-export loaded, before it is transformed.

A BatchNorm that never saw data (``stale-stats``) is almost always a user who forgot to load trained weights;
folding or converting it proves nothing. So the commands that transform a model run the same findings as
``inspect`` first, and findings at or above ``--fail-on`` stop them.

Findings about running statistics stop only what uses them: every fold, and a swap whose target takes the
statistics over (``SwapTarget.carries_running_stats``). A target without running statistics (FRN) keeps only
the BatchNorm's weight and bias, so for the layers it replaces only findings on those stop it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from normcli.inspection import SEVERITIES, Thresholds, add_findings, find_norm_layers

FAIL_ON = ("error", "warning", "never")
# codes that judge running_mean / running_var / num_batches_tracked, or values folded from them
STATISTICS_CODES = frozenset({"stale-stats", "negative-var", "tiny-var", "mixed-tracking", "fp16-overflow"})


@dataclass
class GateFinding:
    """One inspect finding on one norm layer, and whether it stops the command."""

    layer: str
    kind: str
    code: str
    severity: str
    message: str
    channels: list[int] = field(default_factory=list)
    about: str = "weights"  # "statistics": only running statistics are involved; "weights": weight or bias
    stops: bool = False
    note: str | None = None  # why a finding at the --fail-on level does not stop the command


def model_findings(loaded) -> list[GateFinding]:
    """Inspect's findings on every norm layer of a :class:`normcli.loading.LoadedModel`, in module order."""
    import numpy as np

    from normcli.loading import module_tensor_file

    tf = module_tensor_file(loaded)
    layers = find_norm_layers(tf.tensors, tf.module_types, tf.module_eps)
    add_findings(layers, Thresholds())
    out = []
    for layer in layers:
        for f in layer.findings:
            about = "statistics" if f.code in STATISTICS_CODES else "weights"
            if f.code == "non-finite":
                kept = [layer.values.get(k) for k in ("weight", "bias")]
                about = "weights" if any(v is not None and not np.isfinite(v).all() for v in kept) else "statistics"
            out.append(GateFinding(layer.name, layer.kind, f.code, f.severity, f.message, list(f.channels), about))
    return out


def reaches(severity: str, fail_on: str) -> bool:
    """Whether a finding of ``severity`` is at or above ``fail_on`` (error, warning or never)."""
    if fail_on == "never":
        return False
    return SEVERITIES.index(severity) <= SEVERITIES.index(fail_on)


def judge(findings: Iterable[GateFinding], fail_on: str,
          statistics_used: Callable[[str], bool] = lambda layer: True) -> list[GateFinding]:
    """Mark and return the findings that stop the command: at or above ``fail_on``, and, for findings about
    running statistics, only on layers whose statistics the result still uses (``statistics_used(name)``)."""
    stopping = []
    for f in findings:
        level = reaches(f.severity, fail_on)
        f.stops = level and (f.about != "statistics" or statistics_used(f.layer))
        f.note = "the result does not use this layer's running statistics" if level and not f.stops else None
        if f.stops:
            stopping.append(f)
    return stopping


def summary(findings: list[GateFinding], limit: int = 6) -> str:
    """``bn_stale stale-stats, bn_nan non-finite`` (at most ``limit`` named)."""
    shown = ", ".join(f"{f.layer} {f.code}" for f in findings[:limit])
    return shown + (f" and {len(findings) - limit} more" if len(findings) > limit else "")
