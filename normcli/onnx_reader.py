"""Norm layers of an ONNX model: BatchNormalization (and other normalisation) nodes with their constants.

Uses only the onnx package and numpy, never torch and never onnxruntime.
"""

from __future__ import annotations

import os

import numpy as np

from normcli.errors import NormcliError, first_line
from normcli.inspection import NormLayer, _stats

# op type -> names of the inputs that carry per-channel statistics, by input position
_NORM_OPS = {
    "BatchNormalization": ("X", "weight", "bias", "running_mean", "running_var"),
    "InstanceNormalization": ("X", "weight", "bias"),
    "GroupNormalization": ("X", "weight", "bias"),
    "LayerNormalization": ("X", "weight", "bias"),
}


def read_onnx_norms(path: str | os.PathLike) -> list[NormLayer]:
    """The normalisation nodes of the model in ``path``, in graph order, with per-channel values."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends; all mean a damaged file
        raise NormcliError(f"{path}: not a readable ONNX model ({type(e).__name__}); the file is truncated or "
                           "corrupt") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.initializer):
        raise NormcliError(f"{path}: the ONNX model has no graph; the file is truncated or corrupt")
    try:  # statistics of a graph that cannot run would describe nothing real
        onnx.checker.check_model(model)
    except Exception as e:
        raise NormcliError(f"{path}: the ONNX graph is invalid ({first_line(e)}); re-export the model") from None
    constants: dict[str, np.ndarray | None] = {}
    for init in model.graph.initializer:
        constants[init.name] = _to_array(init, numpy_helper)
    graphs = [model.graph] + [f for f in model.functions]
    layers: list[NormLayer] = []
    for graph in graphs:
        for node in graph.node:
            if node.op_type == "Identity" and node.input and node.input[0] in constants:
                constants[node.output[0]] = constants[node.input[0]]  # exporters share equal initializers
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value" and attr.HasField("t"):
                        constants[node.output[0]] = _to_array(attr.t, numpy_helper)
        for index, node in enumerate(graph.node):
            if node.op_type not in _NORM_OPS or node.domain not in ("", "ai.onnx"):
                continue
            layers.append(_layer(node, index, constants))
    # weight norm exported as it is (g, v and a norm-of-v subgraph): the initializers keep the state-dict names
    from normcli.inspection import weight_norm_layers

    layers += weight_norm_layers({init.name: _Initializer(init, numpy_helper) for init in model.graph.initializer
                                  if init.data_location != 1})
    return layers


class _Initializer:
    """An ONNX initializer as the state-dict readers describe a tensor: shape, ndim, dtype and load()."""

    _DTYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}

    def __init__(self, tensor, numpy_helper):
        self._tensor, self._numpy_helper = tensor, numpy_helper
        self.shape = tuple(int(d) for d in tensor.dims)
        self.ndim = len(self.shape)
        self.dtype = self._DTYPES.get(tensor.data_type, "other")

    def load(self) -> np.ndarray:
        return np.asarray(self._numpy_helper.to_array(self._tensor), dtype=np.float64).reshape(self.shape)


def _to_array(tensor, numpy_helper) -> np.ndarray | None:
    if tensor.data_location == 1:  # external data: not read (it may point anywhere on disk)
        return None
    try:
        return np.asarray(numpy_helper.to_array(tensor), dtype=np.float64).reshape(-1)
    except Exception:
        return None


def _layer(node, index: int, constants: dict) -> NormLayer:
    roles = _NORM_OPS[node.op_type]
    values: dict[str, np.ndarray] = {}
    for role, name in zip(roles[1:], list(node.input)[1:]):
        arr = constants.get(name)
        if arr is not None:
            values[role] = arr
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    name = node.name or (node.output[0] if node.output else f"{node.op_type}_{index}")
    num_features = next((v.size for v in values.values()), 0)
    return NormLayer(name=name, kind=node.op_type, inferred=False, num_features=int(num_features),
                     num_batches_tracked=None,
                     running_mean=_stats(values.get("running_mean")), running_var=_stats(values.get("running_var")),
                     weight=_stats(values.get("weight")), bias=_stats(values.get("bias")),
                     eps=float(eps), values=values)
