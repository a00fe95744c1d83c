"""Export a torch model to ONNX with ``torch.onnx.export``, keeping the exporter's chatter off stdout.

Two exporters, both torch's own:

- ``dynamo`` (the default): ``torch.onnx.export(..., dynamo=True)``, built on ``torch.export``.
- ``torchscript``: ``torch.onnx.export(..., dynamo=False)``, the legacy tracer; useful when ``torch.export``
  cannot capture a model, and the only one of the two that writes opsets below 18.

Default opset: 18 for both (``DEFAULT_OPSET``). It is the opset the dynamo exporter's operator library is
written for (below it, torch silently keeps 18), every torch this package supports writes it with either
exporter, and onnxruntime has run it since 1.14. Pass ``opset`` for anything else; a model that does not come
out at the opset asked for is an error rather than a surprise.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from normcli.errors import NormcliError, first_line

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = {"dynamo": 18, "torchscript": 18}
# Fallback only: supported_opsets() asks the installed torch and onnx.
OPSET_RANGE = {"dynamo": (18, None), "torchscript": (7, 20)}
BATCH_DIM_NAME = "batch"


@dataclass
class ExportResult:
    """What was written: which exporter and opset, the graph's interface and its size."""

    path: str
    exporter: str
    opset: int
    nodes: int
    batchnorm_nodes: int
    input_names: list[str]
    output_names: list[str]
    dynamic_batch: bool = False
    warnings: list[str] = field(default_factory=list)
    input_dims: list[list] = field(default_factory=list)  # per ONNX input: ints, or names of symbolic dims
    log: str = ""  # what the exporter printed, kept off stdout


def export_onnx(model, example_inputs: tuple, path: str | os.PathLike, *, exporter: str = "dynamo",
                opset: int | None = None, dynamic_batch: bool = False,
                input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = None,
                dynamic_dims: Sequence[Sequence[int]] | None = None) -> ExportResult:
    """Export ``model`` (in eval mode) to the ONNX file ``path`` and check the result with ``onnx.checker``.

    example_inputs: the positional arguments of ``model``, as a tuple of tensors.
    dynamic_batch: make dimension 0 of every input and output symbolic (named ``batch``).
    dynamic_dims: per input, more dimensions to keep symbolic (e.g. ``[[2, 3]]`` for an image's height and
    width). The dynamo exporter keeps them where the model allows and fixes them where it specialises; which
    came out symbolic is in ``ExportResult.input_dims``.
    input_names / output_names: default to the forward's parameter names and ``output`` / ``output_<i>``
    (or the keys of a dict output), the same for both exporters.
    """
    import onnx
    import torch

    if exporter not in EXPORTERS:
        raise NormcliError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    opset = _resolve_opset(exporter, opset)
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    if model.training:
        raise NormcliError("the model is in training mode; call model.eval() before exporting it, "
                           "or BatchNorm would be exported with batch statistics")

    input_names = list(input_names) if input_names is not None else default_input_names(model, len(example_inputs))
    if len(input_names) != len(example_inputs):
        raise NormcliError(f"{len(input_names)} input names given for {len(example_inputs)} inputs")
    if output_names is None:  # named after the outputs, so the model runs once here
        with torch.no_grad():
            output_names = default_output_names(model(*example_inputs))
    output_names = list(output_names)

    extra = [sorted(int(d) for d in dims) for dims in (dynamic_dims or [])]
    extra += [[] for _ in range(len(example_inputs) - len(extra))]
    kwargs: dict[str, Any] = dict(input_names=input_names, output_names=output_names, opset_version=opset)
    if exporter == "dynamo":
        kwargs.update(dynamo=True, external_data=False)
        if dynamic_batch or any(extra):
            batch = torch.export.Dim(BATCH_DIM_NAME)
            kwargs["dynamic_shapes"] = tuple(
                {**({0: batch} if dynamic_batch else {}), **{d: torch.export.Dim.AUTO for d in dims if d > 0}}
                or None for dims in extra)
    else:
        # PRESERVE: the model is in eval mode already (checked above), and a torch.export module refuses train()
        kwargs.update(dynamo=False, do_constant_folding=True, training=torch.onnx.TrainingMode.PRESERVE)
        axes = {name: {0: BATCH_DIM_NAME} for name in [*input_names, *output_names]} if dynamic_batch else {}
        for name, dims in zip(input_names, extra):
            axes.setdefault(name, {}).update({d: f"{name}_dim{d}" for d in dims if d > 0})
        if any(axes.values()):
            kwargs["dynamic_axes"] = {k: v for k, v in axes.items() if v}

    path = Path(path)
    with _stdout_captured() as log, warnings.catch_warnings(record=True) as caught, _quiet_torch_onnx_logs():
        warnings.simplefilter("always")
        try:
            torch.onnx.export(model, example_inputs, str(path), **kwargs)
        except Exception as e:
            other = EXPORTERS[1 - EXPORTERS.index(exporter)]
            raise NormcliError(f"the {exporter} exporter could not export the model: {_failure_reason(e)}; "
                               f"try the {other} exporter (--exporter {other})") from e
    notes = _unique(f"{w.category.__name__}: {first_line(w.message)}" for w in caught)

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise NormcliError(f"the {exporter} exporter wrote an invalid ONNX model ({first_line(e)}); "
                           f"try the other exporter or another opset") from e
    try:  # strict shape inference as well; it has gaps of its own, so a failure is a warning only
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        notes.append(f"onnx full check (strict shape inference) failed: {first_line(e)}")

    proto = onnx.load(str(path), load_external_data=False)
    if len(proto.graph.output) != len(output_names):
        raise NormcliError(f"{len(output_names)} output names given, but the exported model has "
                           f"{len(proto.graph.output)} outputs")
    written_opset = model_opset(proto)
    if written_opset != opset:
        raise NormcliError(f"asked for opset {opset} but the {exporter} exporter wrote opset {written_opset}; "
                           f"use opset {written_opset} or the other exporter")
    return ExportResult(
        path=str(path), exporter=exporter, opset=written_opset,
        nodes=count_nodes(proto), batchnorm_nodes=count_nodes(proto, op_type="BatchNormalization"),
        input_names=[i.name for i in proto.graph.input],
        output_names=[o.name for o in proto.graph.output],
        dynamic_batch=dynamic_batch, warnings=notes, log=log.getvalue(), input_dims=onnx_input_dims(proto),
    )


def onnx_input_dims(proto) -> list[list]:
    """Each graph input's dimensions: an int where fixed, the symbol's name (or ``"?"``) where not."""
    initializers = {i.name for i in proto.graph.initializer}
    dims = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        shape = value.type.tensor_type.shape
        dims.append([d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim])
    return dims


def default_input_names(model, count: int) -> list[str]:
    """The forward's positional parameter names, or ``input`` / ``input_<i>`` when they cannot be read."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:count]]
    if len(names) == count and len(set(names)) == count:
        return names
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def default_output_names(outputs) -> list[str]:
    """``output`` for one tensor, the keys of a flat dict, ``output_<i>`` otherwise (in pytree order)."""
    import torch

    flat, _ = torch.utils._pytree.tree_flatten(outputs)
    if isinstance(outputs, dict) and len(outputs) == len(flat) and all(isinstance(k, str) for k in outputs):
        return list(outputs)
    return ["output"] if len(flat) == 1 else [f"output_{i}" for i in range(len(flat))]


def model_opset(proto) -> int:
    """The default-domain opset an ONNX model declares."""
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise NormcliError("the ONNX model declares no opset for the default domain")


def count_nodes(proto, op_type: str | None = None) -> int:
    """Count the nodes an ONNX model runs, optionally only those of ``op_type`` (default domain).

    A call to a model-local function counts as the nodes of its body (so a BatchNormalization hidden in a
    function is counted), and the subgraphs of If/Loop/Scan count as well.
    """
    functions = {(f.domain, f.name): f for f in getattr(proto, "functions", [])}
    return _count_graph_nodes(proto.graph.node, functions, op_type, depth=0)


def _count_graph_nodes(nodes, functions, op_type, depth: int) -> int:
    import onnx

    if depth > 64:
        raise NormcliError("the ONNX model's functions call each other recursively; it cannot be counted")
    total = 0
    for node in nodes:
        function = functions.get((node.domain, node.op_type))
        if function is not None:
            total += _count_graph_nodes(function.node, functions, op_type, depth + 1)
        elif op_type is None or (node.op_type == op_type and node.domain in ("", "ai.onnx")):
            total += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                total += _count_graph_nodes(attr.g.node, functions, op_type, depth + 1)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for graph in attr.graphs:
                    total += _count_graph_nodes(graph.node, functions, op_type, depth + 1)
    return total


def supported_opsets(exporter: str) -> tuple[int, int]:
    """The lowest and highest opset the installed exporter writes, asked from the installed torch and onnx."""
    from torch.onnx import _constants

    if exporter == "torchscript":
        return (int(_constants.ONNX_MIN_OPSET),
                int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET)))
    import onnx

    try:  # the opset torch's ONNX operator library is written for; earlier ones it does not write
        from torch.onnx._internal.exporter._constants import TORCHLIB_OPSET as low
    except ImportError:
        low = OPSET_RANGE["dynamo"][0]
    # later opsets come from onnx's version converter, which knows up to the installed onnx's opset
    return int(low), int(onnx.defs.onnx_opset_version())


def check_opset(exporter: str, opset: int) -> None:
    """Refuse an opset the installed exporter does not write, naming the ones it does (and the other exporter's,
    when that one writes it)."""
    if exporter not in EXPORTERS:
        raise NormcliError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    low, high = supported_opsets(exporter)
    if low <= opset <= high:
        return
    other = EXPORTERS[1 - EXPORTERS.index(exporter)]
    other_low, other_high = supported_opsets(other)
    hint = f" (the {other} exporter writes {other_low} to {other_high}: --exporter {other})" \
        if other_low <= opset <= other_high else ""
    raise NormcliError(f"the installed {exporter} exporter does not write opset {opset}: it writes opsets "
                       f"{low} to {high}{hint}")


def _resolve_opset(exporter: str, opset: int | None) -> int:
    if opset is None:
        return DEFAULT_OPSET[exporter]
    check_opset(exporter, opset)
    return opset


@contextlib.contextmanager
def _quiet_torch_onnx_logs() -> Iterator[None]:
    """Hide the exporter's registration chatter (e.g. that torchvision's ops are skipped); errors still show."""
    # torch.onnx's registration chatter, and onnxscript's notes on how it converts between opsets: what went
    # wrong reaches the user as the error normcli raises, not as a library's log record
    levels = {"torch.onnx": logging.ERROR, "onnxscript": logging.CRITICAL, "onnx_ir": logging.CRITICAL}
    saved = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _stdout_captured() -> Iterator[io.StringIO]:
    """Send everything written to stdout, by Python or by native code on fd 1, into a buffer."""
    log = io.StringIO()
    for stream in (sys.stdout, sys.__stdout__):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()
    try:
        saved_fd = os.dup(1)
    except OSError:  # no fd 1 at all: only Python-level writes can reach stdout
        saved_fd = None
    with tempfile.TemporaryFile(mode="w+b") as sink:
        if saved_fd is not None:
            os.dup2(sink.fileno(), 1)
        try:
            with contextlib.redirect_stdout(log):
                yield log
        finally:
            if saved_fd is not None:
                with contextlib.suppress(Exception):
                    sys.__stdout__.flush()
                os.dup2(saved_fd, 1)
                os.close(saved_fd)
                sink.seek(0)
                log.write(sink.read().decode("utf-8", "replace"))


def _failure_reason(error: BaseException) -> str:
    """The exporter's own summary plus the root cause, which is usually the part that names the problem."""
    summary = first_line(error).split(". ")[0].rstrip(".")
    root = error
    seen = {id(root)}
    while (root.__cause__ or root.__context__) is not None and id(root.__cause__ or root.__context__) not in seen:
        root = root.__cause__ or root.__context__
        seen.add(id(root))
    if root is error:
        return summary
    return f"{summary} ({type(root).__name__}: {first_line(root)})"


def _unique(items) -> list[str]:
    return list(dict.fromkeys(items))
