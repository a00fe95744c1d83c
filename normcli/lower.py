"""Lower the BatchNormalization nodes left in an exported ONNX graph to a per-channel multiply-add.

A BatchNorm with no conv or linear to fold into (after pooling, before a zero-padded conv, on an output that
several layers read) stays a ``BatchNormalization`` node after the fold. In inference it is
``y = x * scale + shift`` per channel with ``scale = gamma / sqrt(var + eps)`` and
``shift = beta - mean * scale``; ``lower_unfolded(path, "mul-add")`` rewrites each such node into ``Mul`` and
``Add`` with ``scale`` and ``shift`` computed in float64 from the node's stored inputs and rounded once to the
input's dtype, shaped ``(C, 1, ..., 1)`` to broadcast over the node's input rank. ``"keep"`` leaves the graph
as exported (the default, the faster form in onnxruntime). A node that cannot be lowered exactly (training
mode, statistics computed in the graph, unknown input rank) stays, with the reason.

Imports onnx and numpy only inside its functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from normcli.errors import NormcliError

LOWER_MODES = ("mul-add", "keep")
# Chosen by benchmarks/bench_lower_unfolded.py: onnxruntime (CPU, one thread) ran the samples' leftover norms
# as BatchNormalization 5-11% faster than as Mul + Add, so the graph keeps them unless asked; the benchmark's
# rows fail when the default stops being the faster form.
DEFAULT_LOWER = "keep"


@dataclass
class LowerReport:
    """``lowered``: ``{"node", "channels"}`` per rewritten node; ``kept``: ``{"node", "reason"}`` per node left."""

    mode: str
    lowered: list[dict] = field(default_factory=list)
    kept: list[dict] = field(default_factory=list)


def lower_unfolded(path: str | os.PathLike, mode: str = DEFAULT_LOWER) -> LowerReport:
    """Rewrite the ONNX file ``path`` in place (a scratch file of the pipeline) per ``mode``; see the module."""
    import onnx

    if mode not in LOWER_MODES:
        raise NormcliError(f"--lower-unfolded must be one of {', '.join(LOWER_MODES)}, not {mode!r}")
    report = LowerReport(mode)
    if mode == "keep":
        return report
    model = onnx.load(str(path))
    if lower_model(model, report):
        onnx.save(model, str(path))
        onnx.checker.check_model(str(path))
    return report


def _value_types(model) -> tuple[dict[str, int], dict[str, int]]:
    """(rank, element type) of every value whose type ONNX shape inference knows."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(model).graph
    ranks, elem_types = {}, {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor = info.type.tensor_type
        elem_types[info.name] = tensor.elem_type
        if tensor.HasField("shape"):
            ranks[info.name] = len(tensor.shape.dim)
    return ranks, elem_types


def lower_model(model, report: LowerReport) -> bool:
    """Lower the BatchNormalization nodes of ``model``'s main graph in place; True when any was lowered."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    ranks, elem_types = _value_types(model)
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for out in graph.output:
        readers[out.name] = readers.get(out.name, 0) + 1

    new_nodes = []
    dropped: set[str] = set()
    changed = False
    for index, node in enumerate(graph.node):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        label = node.name or f"BatchNormalization #{index}"
        reason = _unlowerable(node, initializers, ranks)
        if reason is not None:
            report.kept.append({"node": label, "reason": reason})
            new_nodes.append(node)
            continue
        x, gamma, beta, mean, var = node.input[:5]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        values = {k: numpy_helper.to_array(initializers[n]).astype(np.float64)
                  for k, n in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var))}
        # float64 from the stored values, as ONNX defines the node: gamma * (x - mean) / sqrt(var + eps) + beta
        scale = values["gamma"] / np.sqrt(values["var"] + np.float64(np.float32(eps)))
        shift = values["beta"] - values["mean"] * scale
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_types.get(x) or initializers[gamma].data_type)
        shape = (scale.size,) + (1,) * (ranks[x] - 2)
        base = _unique_name(graph, f"{label}_lowered", initializers)
        scale_t = numpy_helper.from_array(scale.reshape(shape).astype(dtype), f"{base}_scale")
        shift_t = numpy_helper.from_array(shift.reshape(shape).astype(dtype), f"{base}_shift")
        for t in (scale_t, shift_t):
            graph.initializer.append(t)
            initializers[t.name] = t
        scaled = f"{base}_scaled"
        new_nodes.append(helper.make_node("Mul", [x, scale_t.name], [scaled], name=f"{base}_mul"))
        new_nodes.append(helper.make_node("Add", [scaled, shift_t.name], [node.output[0]], name=f"{base}_add"))
        for name in (gamma, beta, mean, var):
            readers[name] -= 1
            if readers[name] == 0:
                dropped.add(name)
        report.lowered.append({"node": label, "channels": int(scale.size)})
        changed = True
    if not changed:
        return False
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return True


def _unlowerable(node, initializers: dict, ranks: dict[str, int]) -> str | None:
    """Why this BatchNormalization node cannot become an exact multiply-add, or None."""
    if any(a.name == "training_mode" and a.i for a in node.attribute):
        return "it runs in training mode (batch statistics)"
    if len([o for o in node.output if o]) != 1:
        return "its running statistics are outputs of the graph"
    if len(node.input) < 5:
        return "it has fewer than five inputs"
    missing = [n for n in node.input[1:5] if n not in initializers]
    if missing:
        return f"its parameters {', '.join(missing)} are computed in the graph, not stored"
    rank = ranks.get(node.input[0])
    if rank is None:
        return "the rank of its input is unknown after shape inference"
    if rank < 2:
        return f"its input has rank {rank}; channels are dim 1 of a rank-2 or higher tensor"
    return None


def _unique_name(graph, base: str, initializers: dict) -> str:
    taken = set(initializers) | {o for n in graph.node for o in n.output} | {n.name for n in graph.node}
    name, i = base, 1
    while any(f"{name}{suffix}" in taken for suffix in ("_scale", "_shift", "_scaled", "_mul", "_add")):
        i += 1
        name = f"{base}{i}"
    return name
