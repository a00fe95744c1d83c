"""Check that an ONNX model computes what the torch model computes, with onnxruntime on the CPU.

The rule is numpy's ``allclose`` with the torch output as the reference ``b``: an element fails only when
``|a - b| > atol + rtol * |b|``. NaN against a number fails, NaN against NaN agrees, an infinity agrees only
with the same infinity. A reference that holds NaN or Inf fails the check all the same (``problem`` starts
with ``non-finite``): agreement with a broken reference proves nothing. Defaults ``atol=1e-4``,
``rtol=1e-3``: typical float32 round-off for deep nets, well below what a wrong fold or a wrong export gives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from normcli.errors import NormcliError, first_line

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3


@dataclass
class OutputParity:
    """Errors of one output over all samples; ``max_rel`` is taken where the reference is non-zero."""

    name: str
    max_abs: float
    max_rel: float
    mean_abs: float
    mismatched: int  # elements out of tolerance, over all samples
    elements: int = 0
    problem: str | None = None  # set when the outputs could not be compared (shape) or the reference is NaN/Inf
    nonfinite_reference: int = 0  # reference elements that are NaN or Inf, over all samples


@dataclass
class ParityResult:
    passed: bool
    atol: float
    rtol: float
    samples: int
    outputs: list[OutputParity] = field(default_factory=list)


def check_parity(torch_model, onnx_path: str | os.PathLike, inputs: Sequence[tuple], *,
                 atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                 references: Sequence[Sequence] | None = None) -> ParityResult:
    """Run ``torch_model`` and an onnxruntime CPU session of ``onnx_path`` on each input tuple and compare.

    inputs: one tuple of tensors per sample (see ``normcli.inputs.make_inputs``); samples may differ in batch size when
    the ONNX model has a symbolic batch dimension. Several outputs (tuple, list, dict) are matched to the
    ONNX outputs in order. references: the torch model's flattened outputs per sample, when the caller has
    them already (then ``torch_model`` is not run).
    """
    import numpy as np
    import torch

    if not inputs:
        raise NormcliError("parity needs at least one sample")
    if atol < 0 or rtol < 0:
        raise NormcliError(f"tolerances must not be negative (atol={atol}, rtol={rtol})")
    session = onnx_session(onnx_path)
    onnx_inputs = session.get_inputs()
    names = [o.name for o in session.get_outputs()]
    stats = [_ErrorStats(name) for name in names]

    if references is not None and len(references) != len(inputs):
        raise NormcliError(f"{len(references)} reference outputs given for {len(inputs)} samples")
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
        for stat, a, b in zip(stats, got, reference):
            stat.add(np.asarray(a), _to_numpy(b), atol, rtol)

    outputs = [s.result() for s in stats]
    passed = all(o.mismatched == 0 and o.problem is None for o in outputs)
    return ParityResult(passed=passed, atol=atol, rtol=rtol, samples=len(inputs), outputs=outputs)


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


def load_input_file(path: str | os.PathLike):
    """Read one input tensor from a ``.npy`` file or a tensor saved with ``torch.save``; runs no file code.

    The format is found from the file's first bytes, not its extension.
    """
    import numpy as np
    import torch

    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise NormcliError(f"cannot read input file {path}: {e.strerror or e}") from None
    if head.startswith(b"\x93NUMPY"):
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as e:
            raise NormcliError(f"cannot read {path} as a .npy array ({first_line(e)}); "
                               "save a numeric array with numpy.save") from None
        if array.dtype.kind not in "fiub":
            raise NormcliError(f"{path} holds a {array.dtype} array; an input must be numeric")
        return torch.from_numpy(np.array(array, copy=True))
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        # read like a checkpoint (checked opcodes and storages), never by torch.load: an input file is as
        # untrusted as a checkpoint
        from normcli.loading import tensor_from_lazy
        from normcli.reader import read_tensor

        try:
            return tensor_from_lazy(read_tensor(path)).clone()
        except NormcliError as e:
            if "not a tensor" in str(e):
                raise
            raise NormcliError(f"cannot read {path} as a tensor saved with torch.save ({first_line(e)}); save one "
                               "tensor with torch.save(t, path)") from None
    raise NormcliError(f"{path} is neither a .npy array nor a tensor saved with torch.save")


class _ErrorStats:
    """Running error figures of one output over the samples."""

    def __init__(self, name: str):
        self.name = name
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.sum_abs = 0.0
        self.elements = 0
        self.mismatched = 0
        self.nonfinite = 0
        self.problem: str | None = None

    def add(self, actual, reference, atol: float, rtol: float) -> None:
        import numpy as np

        if actual.shape != reference.shape:
            self.problem = (f"shape {tuple(actual.shape)} from onnxruntime, {tuple(reference.shape)} from torch")
            self.mismatched += int(reference.size)
            self.elements += int(reference.size)
            return
        a = actual.astype(np.float64)
        b = reference.astype(np.float64)
        self.nonfinite += int(b.size - np.count_nonzero(np.isfinite(b)))
        self.mismatched += int(mismatch_mask(a, b, atol, rtol).sum())
        self.elements += int(b.size)
        if b.size == 0:
            return
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            diff = np.abs(a - b)
            diff[(a == b) | (np.isnan(a) & np.isnan(b))] = 0.0  # agreement, infinities and NaNs included
            nonzero = b != 0
            rel = diff[nonzero] / np.abs(b[nonzero])
        self.max_abs = _nanmax(self.max_abs, float(diff.max()))
        if rel.size:
            self.max_rel = _nanmax(self.max_rel, float(rel.max()))
        self.sum_abs += float(diff.sum())

    def result(self) -> OutputParity:
        mean = self.sum_abs / self.elements if self.elements else 0.0
        problem = self.problem
        if problem is None and self.nonfinite:
            problem = (f"non-finite: the torch output holds NaN/Inf in {self.nonfinite} of {self.elements} elements, "
                       "so agreement proves nothing")
        return OutputParity(name=self.name, max_abs=self.max_abs, max_rel=self.max_rel, mean_abs=mean,
                            mismatched=self.mismatched, elements=self.elements, problem=problem,
                            nonfinite_reference=self.nonfinite)


def _nanmax(x: float, y: float) -> float:
    """max that keeps a NaN: a NaN error (NaN against a number) must show in the report."""
    if x != x or y != y:
        return float("nan")
    return max(x, y)


def _to_numpy(value):
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
