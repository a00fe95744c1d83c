"""Inputs for running a model that came without any: seeded random samples, and a shape guessed from its
first layer. Shared by swap (probe inputs) and fuse-export (parity inputs)."""

from __future__ import annotations

from typing import Sequence

from normcli.errors import NormcliError

# spatial size per conv dimensionality when the input shape is inferred: modest, so inference stays fast
DEFAULT_SPATIAL = {1: 64, 2: 64, 3: 16}
# all the random inputs of one run together (samples x elements per sample): 2 GiB of float64 at most, made
# up front, so that a large --samples is a usage error before anything is allocated
MAX_INPUT_ELEMENTS = 1 << 28


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
    per_sample = 0
    for shape in shapes:
        if any(int(d) < 1 for d in shape):
            raise NormcliError(f"input shape {','.join(map(str, shape))} has a dimension below 1")
        numel = 1
        for d in shape:
            numel *= int(d)
        per_sample += numel
    if per_sample > MAX_INPUT_ELEMENTS:
        raise NormcliError(f"input shapes {' '.join(','.join(map(str, s)) for s in shapes)} have {per_sample} "
                           f"elements, more than the {MAX_INPUT_ELEMENTS} one run makes; give smaller input shapes")
    if samples * per_sample > MAX_INPUT_ELEMENTS:
        raise NormcliError(f"{samples} samples of {per_sample} input elements each are {samples * per_sample} "
                           f"elements, more than the {MAX_INPUT_ELEMENTS} one run makes; give fewer --samples or "
                           "smaller input shapes")
    generator = torch.Generator().manual_seed(seed)
    try:
        return [tuple(torch.randn(tuple(shape), generator=generator, dtype=torch.float64).to(dtype)
                      for shape in shapes) for _ in range(samples)]
    except (RuntimeError, MemoryError) as e:  # a shape too large for this machine's memory
        from normcli.errors import first_line

        raise NormcliError(f"cannot make inputs of shapes {' '.join(','.join(map(str, s)) for s in shapes)} "
                           f"({first_line(e)}); give smaller input shapes") from None


def positional_inputs(model) -> list[str] | None:
    """The names of the forward's required positional parameters, in order; None when the forward takes
    ``*args`` or its signature cannot be read (then the number of inputs is unknown)."""
    import inspect

    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return None
    names = []
    for p in parameters:
        if p.kind == p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            names.append(p.name)
    return names or None


def input_configurations(items: Sequence, model, option: str) -> list[list]:
    """Split what ``--input-shape`` (or ``--input``) gave into configurations of one item per positional input:
    for a model with N inputs, items are taken N at a time. A count that is not a multiple of N is an error."""
    items = list(items)
    names = positional_inputs(model)
    n = len(names) if names else max(1, len(items))
    if len(items) % n:
        raise NormcliError(f"{len(items)} {option} given, but the model takes {n} positional inputs "
                           f"({', '.join(names or [])}): give one {option} per input, in that order (and {n} more "
                           "for each further configuration to check)")
    return [items[i:i + n] for i in range(0, len(items), n)]


def inputs_hint(model, option: str = "--input-shape", given: bool = False) -> str:
    """What to give instead, for an error about inputs the model did not run on. ``given``: the user passed
    ``option`` already, so the hint says what to change in it rather than asking for it again."""
    names = positional_inputs(model)
    if given:
        what = "the shapes" if option == "--input-shape" else "the files"
        if names and len(names) > 1:
            return (f"the model takes {len(names)} positional inputs ({', '.join(names)}): check {what} given with "
                    f"{option}, one per input, in order")
        if names:
            return f"the model takes one positional input ({names[0]}): check {what} given with {option}"
        return f"check {what} given with {option}: one per positional input of the model"
    if names and len(names) > 1:
        return (f"the model takes {len(names)} positional inputs ({', '.join(names)}): give one {option} per input, "
                "in order")
    if names:
        return f"the model takes one positional input ({names[0]}): give {option} with the shape it expects"
    return f"give {option} with the shapes the model expects, one per positional input"
