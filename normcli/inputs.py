"""Inputs for running a model that came without any: seeded random samples, and a shape guessed from its
first layer. Shared by swap (probe inputs) and fuse-export (parity inputs)."""

from __future__ import annotations

from typing import Sequence

from normcli.errors import NormcliError

# spatial size per conv dimensionality when the input shape is inferred: modest, so inference stays fast
DEFAULT_SPATIAL = {1: 64, 2: 64, 3: 16}


def infer_input_shape(model) -> tuple[tuple[int, ...], str]:
    """A one-sample input shape for the first conv or linear layer (module order), and what it came from."""
    from torch import nn

    convs = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3,
             nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
    for name, module in model.named_modules():
        # a TorchScript module names the class it was scripted from
        scripted = getattr(module, "original_name", None) if hasattr(module, "_c") else None
        if scripted == "Linear":
            features = int(module.weight.shape[1])
            return (1, features), f"inferred from Linear '{name}' (in_features={features})"
        for kind, dims in convs.items():
            if type(module) is kind or isinstance(module, kind) or scripted == kind.__name__:
                size = DEFAULT_SPATIAL[dims]
                channels = module.in_channels if scripted is None else _scripted_in_channels(module, kind)
                shape = (1, channels, *([size] * dims))
                return shape, (f"inferred from {kind.__name__} '{name}' (in_channels={channels}) "
                               f"with the default spatial size {'x'.join([str(size)] * dims)}")
        if isinstance(module, nn.Linear):
            return (1, module.in_features), \
                f"inferred from Linear '{name}' (in_features={module.in_features})"
    raise NormcliError("cannot infer the input shape: the model has no conv or linear layer; "
                       "pass --input-shape (e.g. --input-shape 1,3,224,224)")


def _scripted_in_channels(module, kind) -> int:
    """A TorchScript conv keeps in_channels only as a constant inlined in its code: read it off its weight."""
    weight = module.weight
    if kind.__name__.startswith("ConvTranspose"):
        return int(weight.shape[0])
    groups = 1
    for node in module.graph.nodes():
        if node.kind() in ("aten::_convolution", "aten::conv1d", "aten::conv2d", "aten::conv3d"):
            index = 8 if node.kind() == "aten::_convolution" else 6
            inputs = list(node.inputs())
            if len(inputs) > index and inputs[index].toIValue() is not None:
                groups = int(inputs[index].toIValue())
            break
    return int(weight.shape[1]) * groups


def make_inputs(shapes: Sequence[tuple[int, ...]], samples: int, seed: int = 0, dtype=None) -> list[tuple]:
    """``samples`` tuples of standard-normal tensors, one tensor per shape, the same for the same seed."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if samples < 1:
        raise NormcliError(f"the number of samples must be at least 1, got {samples}")
    for shape in shapes:
        if any(int(d) < 1 for d in shape):
            raise NormcliError(f"input shape {','.join(map(str, shape))} has a dimension below 1")
    generator = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(tuple(shape), generator=generator, dtype=torch.float64).to(dtype) for shape in shapes)
            for _ in range(samples)]
