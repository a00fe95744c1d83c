"""Check that an ONNX model computes what the torch model computes, with onnxruntime.

The rule is numpy's ``allclose`` with the torch output as the reference ``b``: an element fails only when
``|a - b| > atol + rtol * |b|``. NaN against a number fails, NaN against NaN agrees, an infinity agrees only
with the same infinity. A reference that holds NaN or Inf fails the check all the same (``problem`` starts
with ``non-finite``): agreement with a broken reference proves nothing. Defaults ``atol=1e-4``,
``rtol=1e-3``: typical float32 round-off for deep nets, well below what a wrong fold or a wrong export gives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

from normcli.errors import NormcliError, first_line
from normcli.metrics import CHECK_STATS, DEFAULT_QUANTILE, OutputMetrics, compare_output

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3


# Each output's figures: normcli.metrics.OutputMetrics (max/mean/median/p99 errors, cosine, the tolerance that
# would have passed, top-1/top-5 agreement). The old name stays for callers that import it.
OutputParity = OutputMetrics


@dataclass
class ParityResult:
    passed: bool
    atol: float
    rtol: float
    samples: int
    outputs: list[OutputMetrics] = field(default_factory=list)
    provider: str = "CPUExecutionProvider"   # the onnxruntime execution provider that ran the model
    check_stat: str | None = None            # None: every element must be within tolerance
    quantile: float = DEFAULT_QUANTILE       # with check_stat "quantile"
    onnx_outputs: list[list] = field(default_factory=list, repr=False)  # per sample, onnxruntime's outputs


def check_parity(torch_model, onnx_path: str | os.PathLike, inputs: Sequence[tuple], *,
                 atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                 references: Sequence[Sequence] | None = None, check_stat: str | None = None,
                 quantile: float = DEFAULT_QUANTILE, provider: str | None = None) -> ParityResult:
    """Run ``torch_model`` and an onnxruntime session of ``onnx_path`` on each input tuple and compare.

    inputs: one tuple of tensors per sample (see ``normcli.inputs.make_inputs``); samples may differ in shape
    where the ONNX model has symbolic dimensions. Several outputs (tuple, list, dict) are matched to the ONNX
    outputs in order. references: the torch model's flattened outputs per sample, when the caller has them
    already (then ``torch_model`` is not run). check_stat / quantile: what must be within tolerance
    (``normcli.metrics``). provider: the onnxruntime execution provider (default the CPU).
    """
    import torch

    if not inputs:
        raise NormcliError("parity needs at least one sample")
    if atol < 0 or rtol < 0:
        raise NormcliError(f"tolerances must not be negative (atol={atol}, rtol={rtol})")
    if check_stat is not None and check_stat not in CHECK_STATS:
        raise NormcliError(f"--check-error-stat must be one of {', '.join(CHECK_STATS)}, not {check_stat!r}")
    if not 0.0 <= quantile <= 1.0:
        raise NormcliError(f"--error-quantile must be between 0 and 1, got {quantile}")
    session = onnx_session(onnx_path, provider=provider)
    onnx_inputs = session.get_inputs()
    names = [o.name for o in session.get_outputs()]

    if references is not None and len(references) != len(inputs):
        raise NormcliError(f"{len(references)} reference outputs given for {len(inputs)} samples")
    got_all: list[list] = []
    want_all: list[list] = []
    for index, sample in enumerate(inputs):
        sample = tuple(sample)
        if len(sample) != len(onnx_inputs):
            raise NormcliError(f"the ONNX model {onnx_path} takes {len(onnx_inputs)} inputs "
                               f"({', '.join(i.name for i in onnx_inputs)}), but {len(sample)} were given")
        if references is not None:
            reference = list(references[index])
        else:
            with torch.no_grad():
                reference = torch.utils._pytree.tree_flatten(torch_model(*sample))[0]
        feed = {spec.name: _to_numpy(t) for spec, t in zip(onnx_inputs, sample)}
        try:
            got = session.run(None, feed)
        except Exception as e:
            raise NormcliError(f"onnxruntime could not run {onnx_path} on inputs of shapes "
                               f"{[tuple(t.shape) for t in sample]}: {first_line(e)}") from e
        if len(reference) != len(got):
            raise NormcliError(f"the torch model returns {len(reference)} tensors but the ONNX model "
                               f"{onnx_path} has {len(got)} outputs ({', '.join(names)})")
        got_all.append(list(got))
        want_all.append([_to_numpy(b) for b in reference])

    outputs = [compare_output(name, [g[i] for g in got_all], [w[i] for w in want_all], atol=atol, rtol=rtol,
                              check_stat=check_stat, quantile=quantile)
               for i, name in enumerate(names)]
    return ParityResult(passed=all(o.passed for o in outputs), atol=atol, rtol=rtol, samples=len(inputs),
                        outputs=outputs, provider=session.get_providers()[0], check_stat=check_stat,
                        quantile=quantile, onnx_outputs=got_all)


def mismatch_mask(actual, reference, atol: float, rtol: float):
    """Boolean array, True where ``actual`` is out of tolerance of ``reference`` (numpy.allclose's rule).

    Computed in float64 so that the rule is decided exactly for float32 and float16 outputs.
    """
    import numpy as np

    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        close = np.isfinite(a) & np.isfinite(b) & (np.abs(a - b) <= atol + rtol * np.abs(b))
    close |= a == b  # the same infinity
    close |= np.isnan(a) & np.isnan(b)
    return ~close


def onnx_session(onnx_path: str | os.PathLike, provider: str | None = None):
    """An onnxruntime session on ``provider`` (default the CPU), with a NormcliError for a file it cannot load
    or a provider this onnxruntime does not have."""
    import onnxruntime as ort

    chosen = resolve_provider(provider)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: onnxruntime's warnings are not the user's business here
    providers = [chosen] + (["CPUExecutionProvider"] if chosen != "CPUExecutionProvider" else [])
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
    except Exception as e:
        raise NormcliError(f"onnxruntime cannot load {onnx_path}: {first_line(e)}") from e


def resolve_provider(provider: str | None) -> str:
    """``cpu``/``cuda``/... or a full name -> the installed onnxruntime execution provider's name."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider is None:
        return "CPUExecutionProvider"
    for name in available:
        if provider.lower() in (name.lower(), name.lower().removesuffix("executionprovider")):
            return name
    raise NormcliError(f"--provider {provider!r} is not an execution provider of the installed onnxruntime; "
                       f"available here: {', '.join(available)}")


def _to_numpy(value):
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
