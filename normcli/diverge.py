"""Where an exported model starts to differ: every module's output in torch against the same value in ONNX.

``find_divergence(model, onnx_path, samples)`` runs onnxruntime with the intermediate values exposed as extra
outputs and the torch model with forward hooks on every module, matches ONNX values to module calls, and
returns the per-call errors and the first call, in torch's execution order, whose output is out of tolerance.

Matching uses the module names the exporters record: the torch.export-based exporter writes each node's module
path in the ``pkg.torch.onnx.name_scopes`` metadata; the TorchScript-based exporter names nodes
``/layer1/layer1.0/conv1/Conv`` (a second call of a module gets ``_1``). A module's k-th call is the k-th
contiguous run of ONNX nodes inside its scope, and its output is the first output of the run's last node;
a call whose shapes do not agree is left unmatched rather than compared with the wrong value.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Sequence

from normcli.errors import NormcliError, first_line

_CALL_SUFFIX = re.compile(r"^(?P<name>.+?)_(?P<call>\d+)$")


@dataclass
class ModuleError:
    """One module call's output: torch against the matched ONNX value, over all samples."""

    module: str
    call: int
    onnx_value: str
    max_abs: float
    max_rel: float
    mean_abs: float
    passed: bool
    rel_rms: float = 0.0   # ||onnx - torch|| / ||torch||: the error relative to the output's size
    finite: bool = True    # the torch output holds no NaN/Inf (where it does, agreement proves nothing)


@dataclass
class Divergence:
    first: ModuleError | None                 # the first call in execution order out of tolerance
    modules: list[ModuleError] = field(default_factory=list)   # every matched call, in execution order
    unmatched: list[str] = field(default_factory=list)         # module calls with no ONNX value of their shape


def _scopes(node, module_names: set[str], owners: dict[str, str] | None = None, flat: bool = False) -> list[str]:
    """The module path of an ONNX node, outermost first (module names as torch's named_modules spells them).

    ``owners`` maps value names that are a module's parameters (``layer1.0.conv1.weight``) to that module: a
    node consuming one belongs to it, whatever its name says. ``flat``: the model is a torch.fx GraphModule,
    whose TorchScript export names every call after the bare attribute (``conv1_1`` may be
    ``layer1.0.conv1``), so a name that needs its call suffix stripped is not trusted.
    """
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            import ast

            try:
                parts = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [p for p in parts[:-1] if p in module_names]  # the last part is the op itself
    chain: list[str] = []
    if node.name.startswith("/"):
        # the TorchScript exporter's scopes: "/layer1/layer1.0/conv1/Conv" (a segment is either a full dotted
        # name or an attribute of the scope before it; "relu_1" is the second call of "relu")
        path = ""
        for part in node.name.strip("/").split("/")[:-1]:
            m = _CALL_SUFFIX.match(part)
            bases = [part] + ([m.group("name")] if m and (path or not flat) else [])
            found = next((c for base in bases for c in (base, f"{path}.{base}" if path else base)
                          if c in module_names and (not path or c.startswith(path + "."))), None)
            if found is None:
                break  # an ambiguous segment: what lies below it cannot be placed either
            chain.append(found)
            path = found
    owner = next((owners[i] for i in node.input if owners and i in owners), None)
    if owner is not None:
        chain = [c for c in chain if owner.startswith(c + ".")] + [owner]
    return chain


def _onnx_calls(model, module_names: set[str], flat: bool = False,
                weights: dict[bytes, str] | None = None) -> dict[str, list[str]]:
    """module name -> the ONNX value holding its output, one per call (contiguous run of its nodes).

    ``weights`` maps the bytes of each module's float32 weight to the module (where unique): an initializer
    with the same bytes is that module's, whatever name the exporter gave it."""
    from onnx import numpy_helper

    owners = {}
    for value in [init.name for init in model.graph.initializer] + \
            [out for n in model.graph.node if n.op_type == "Identity" for out in n.output]:
        module, _, param = value.rpartition(".")
        if module in module_names and param in ("weight", "bias"):
            owners[value] = module
    for init in model.graph.initializer if weights else ():
        if init.name not in owners:
            key = numpy_helper.to_array(init).tobytes()
            if key in weights:
                owners[init.name] = weights[key]
    aliases = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity" and n.input}
    for alias, source in aliases.items():
        if source in owners and alias not in owners:
            owners[alias] = owners[source]
    calls: dict[str, list[str]] = {}
    open_runs: dict[str, str] = {}   # module -> last output seen in its current run
    for node in model.graph.node:
        chain = set(_scopes(node, module_names, owners, flat))
        for name in list(open_runs):
            if name not in chain:     # the run of `name` ended before this node
                calls.setdefault(name, []).append(open_runs.pop(name))
        if node.output and node.output[0]:
            for name in chain:
                open_runs[name] = node.output[0]
    for name, value in open_runs.items():
        calls.setdefault(name, []).append(value)
    return calls


def _exposed_model(onnx_path, values: set[str]):
    """The ONNX model with ``values`` added as graph outputs (types from shape inference)."""
    import onnx

    model = onnx.load(str(onnx_path))
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - without inference the types come from the model's own value_info
        inferred = model
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    existing = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    added = []
    for name in sorted(values - existing):
        elem = types.get(name)
        if elem:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
            added.append(name)
    return model, added


def find_divergence(model, onnx_path: str | os.PathLike, samples: Sequence[tuple], *, atol: float,
                    rtol: float, provider: str | None = None,
                    onnx_samples: Sequence[tuple] | None = None) -> Divergence:
    """Compare every module call of ``model`` with the ONNX value exported for it, on ``samples``.

    onnx_samples: what onnxruntime is fed instead, sample for sample (e.g. the float16 inputs of a float16
    export checked against the float32 torch model); the same values at another precision."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from normcli.parity import mismatch_mask, resolve_provider

    names = {name for name, _ in model.named_modules() if name}
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False)
    import torch.fx

    weights: dict[bytes, str] = {}
    ambiguous: set[bytes] = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name and isinstance(weight, torch.Tensor) and weight.numel() > 1:
            # the bytes at the model's own precision, and at half precision for a float16 export of it
            for key in {weight.detach().cpu().contiguous().numpy().tobytes(),
                        weight.detach().cpu().half().contiguous().numpy().tobytes()}:
                (ambiguous.add(key) if key in weights else weights.__setitem__(key, name))
    for key in ambiguous:  # two modules with equal weights: neither can be told by its bytes
        weights.pop(key, None)
    onnx_calls = _onnx_calls(graph, names, flat=isinstance(model, torch.fx.GraphModule), weights=weights)
    wanted = {v for values in onnx_calls.values() for v in values}
    exposed, _ = _exposed_model(onnx_path, wanted)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    chosen = resolve_provider(provider)
    try:
        session = ort.InferenceSession(exposed.SerializeToString(), sess_options=options,
                                       providers=[chosen] + (["CPUExecutionProvider"]
                                                             if chosen != "CPUExecutionProvider" else []))
    except Exception as e:
        raise NormcliError(f"onnxruntime cannot load {onnx_path} with its intermediate values exposed: "
                           f"{first_line(e)}") from None
    output_names = [o.name for o in session.get_outputs()]
    input_names = [i.name for i in session.get_inputs()]

    # torch: every module call's first tensor output, in the order calls finish
    order: list[tuple[str, int]] = []
    outputs: dict[tuple[str, int], list] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook_for(name):
        def hook(module, args, out):
            tensor = out if isinstance(out, torch.Tensor) else next(
                (t for t in (out if isinstance(out, (tuple, list)) else ()) if isinstance(t, torch.Tensor)), None)
            if tensor is None:
                return
            key = (name, counts.get(name, 0))
            counts[name] = key[1] + 1
            if key not in outputs:
                order.append(key)
            # a copy: an in-place op after this module (ReLU(inplace=True)) would change the tensor it returned
            outputs.setdefault(key, []).append(tensor.detach().cpu().numpy().copy())
        return hook

    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_hook(hook_for(name)))
    got: dict[str, list] = {}
    try:
        if onnx_samples is not None and len(onnx_samples) != len(samples):
            raise NormcliError(f"{len(onnx_samples)} onnxruntime samples given for {len(samples)} torch samples")
        for index, sample in enumerate(samples):
            counts.clear()
            with torch.no_grad():
                model(*sample)
            fed = sample if onnx_samples is None else onnx_samples[index]
            feed = {n: t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
                    for n, t in zip(input_names, fed)}
            for name, value in zip(output_names, session.run(None, feed)):
                got.setdefault(name, []).append(value)
    finally:
        for handle in hooks:
            handle.remove()

    result = Divergence(first=None)
    for key in order:
        name, call = key
        values = onnx_calls.get(name, [])
        value = values[call] if call < len(values) else None
        reference = outputs[key]
        actual = got.get(value) if value is not None else None
        if actual is None or [a.shape for a in actual] != [r.shape for r in reference]:
            result.unmatched.append(f"{name}" + (f" (call {call + 1})" if call else ""))
            continue
        a = np.concatenate([x.astype(np.float64).ravel() for x in actual])
        r = np.concatenate([x.astype(np.float64).ravel() for x in reference])
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            diff = np.abs(a - r)
            diff[(a == r) | (np.isnan(a) & np.isnan(r))] = 0.0
            nonzero = r != 0
            rel = diff[nonzero] / np.abs(r[nonzero])
        entry = ModuleError(module=name, call=call, onnx_value=value,
                            max_abs=float(diff.max()) if diff.size else 0.0,
                            max_rel=float(rel.max()) if rel.size else 0.0,
                            mean_abs=float(diff.mean()) if diff.size else 0.0,
                            passed=not bool(mismatch_mask(a, r, atol, rtol).any()),
                            rel_rms=_rel_rms(a, r), finite=bool(np.isfinite(r).all()))
        result.modules.append(entry)
        if result.first is None and not entry.passed:
            result.first = entry
    return result


def _rel_rms(a, r) -> float:
    import numpy as np

    with np.errstate(invalid="ignore", over="ignore"):
        num, den = float(np.linalg.norm(a - r)), float(np.linalg.norm(r))
    if num != num:
        return float("nan")
    return 0.0 if num == 0 else (num / den if den else float("inf"))
