"""What fuse-export adds around its parity check: the first diverging layer, half precision, golden files.

- ``diagnose``: with ``--compare-intermediates``, or by itself when parity failed, compares every module's output
  in the folded torch model with the ONNX value exported for it (``normcli.diverge``) and names the first module,
  in execution order, out of tolerance. For a float16 export it also names the layers that lose the most
  precision against the float32 model.
- ``half_precision_inputs``: inputs a float16 export and its float32 reference can share exactly.
- ``save_golden``: the parity inputs and the torch outputs as ``.npz`` files keyed ``name:k`` (sample k), which
  ``normcli parity MODEL.onnx --inputs F.npz --expected F.npz`` reads back without torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from normcli.atomic import atomic_output
from normcli.errors import NormcliError, describe

PRECISIONS = ("fp32", "fp16")
PRECISION_LOSS_TOP = 5


@dataclass
class Diagnosis:
    """Per-module errors of the ONNX model against the folded torch model."""

    reason: str                        # why it ran: "--compare-intermediates", "parity failed", "--precision fp16"
    first: dict | None                 # the first module call out of tolerance, in execution order
    modules: list[dict] = field(default_factory=list)   # every matched call, in execution order
    unmatched: list[str] = field(default_factory=list)  # calls with no ONNX value of their shape
    precision_losses: list[dict] = field(default_factory=list)  # fp16: where the error grows most
    error: str | None = None           # the comparison itself could not run (the parity verdict stands)


def fp16_gate(findings, fail_on: str) -> list:
    """With ``--precision fp16``, inspect's ``fp16-overflow`` (a warning otherwise) stops the export at any
    ``--fail-on`` but ``never``: its folded values become inf in float16. Returns the findings it stops."""
    stopped = []
    for f in findings:
        if f.code == "fp16-overflow" and not f.stops and fail_on != "never":
            f.stops = True
            f.note = "--precision fp16: the folded values do not fit in float16"
            stopped.append(f)
    return stopped


def half_precision_inputs(inputs: Sequence[tuple]) -> tuple[list[tuple], list[tuple]]:
    """(float32 inputs holding only float16 values, the same values as float16): the float32 reference and the
    float16 export then see exactly the same numbers."""
    import torch

    def cast(t, dtype):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    half = [tuple(cast(t, torch.float16) for t in sample) for sample in inputs]
    return [tuple(cast(t, torch.float32) for t in sample) for sample in half], half


def half_model(folded):
    """A float16 copy of the folded model (the folded model itself stays float32 for the reference)."""
    from normcli.weight_norm import copy_module

    try:
        return copy_module(folded).half()
    except Exception as e:
        raise NormcliError(f"cannot make a float16 copy of the folded model ({describe(e)}); export it in "
                           "float32 (--precision fp32)") from None


def diagnose(folded, onnx_path: str | os.PathLike, inputs: Sequence[tuple], *, reason: str, atol: float,
             rtol: float, provider: str | None = None, onnx_inputs: Sequence[tuple] | None = None,
             precision: str = "fp32") -> Diagnosis:
    """Compare every module call of ``folded`` with its ONNX value. A failure of the comparison itself is
    reported in ``error`` rather than raised: the parity verdict does not depend on it."""
    from normcli.diverge import find_divergence

    try:
        found = find_divergence(folded, onnx_path, inputs, atol=atol, rtol=rtol, provider=provider,
                                onnx_samples=onnx_inputs)
    except Exception as e:  # noqa: BLE001 - a diagnosis that cannot run must not hide the parity result
        return Diagnosis(reason=reason, first=None, error=describe(e))
    modules = [_entry(m) for m in found.modules]
    losses = precision_losses(found.modules) if precision == "fp16" else []
    return Diagnosis(reason=reason, first=_entry(found.first) if found.first else None, modules=modules,
                     unmatched=list(found.unmatched), precision_losses=losses)


def precision_losses(modules, top: int = PRECISION_LOSS_TOP) -> list[dict]:
    """The module calls whose output's relative error (``rel_rms``) grows the most over the call before them in
    execution order: where precision is lost, rather than where earlier losses merely arrive."""
    previous = 0.0
    growth = []
    for m in modules:
        if m.rel_rms == m.rel_rms:  # not NaN
            growth.append((m.rel_rms - previous, m))
            previous = m.rel_rms
    growth.sort(key=lambda item: -item[0])
    return [{**_entry(m), "added_rel_rms": added} for added, m in growth[:top] if added > 0]


def _entry(m) -> dict:
    return {"module": m.module, "call": m.call, "onnx_value": m.onnx_value, "max_abs": m.max_abs,
            "max_rel": m.max_rel, "mean_abs": m.mean_abs, "rel_rms": m.rel_rms, "passed": m.passed,
            "finite": m.finite}


def save_golden(path: str | os.PathLike, names: Sequence[str], samples: Sequence[Sequence]) -> None:
    """Write ``samples`` (per sample, one array per name) to ``path`` as ``.npz`` with keys ``name:k``."""
    import numpy as np
    import torch

    arrays = {}
    for index, sample in enumerate(samples):
        if len(sample) != len(names):
            raise NormcliError(f"{len(sample)} arrays for {len(names)} names ({', '.join(names)}) in {path}")
        for name, value in zip(names, sample):
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu()
                value = value.float() if value.dtype == torch.bfloat16 else value
                value = value.numpy()
            arrays[f"{name}:{index}"] = np.asarray(value)
    with atomic_output(Path(path)) as tmp:
        with open(tmp, "wb") as f:  # a file object: numpy would append .npz to a name without it
            np.savez(f, **arrays)
