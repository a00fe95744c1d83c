"""The fuse-export pipeline: fold BatchNorm, export the folded model to ONNX, prove it with onnxruntime.

Steps, each reported: eval mode; fold (``normcli.fold``); check the folded torch model against the original;
export the folded model (``normcli.export``); count its nodes; run the ORIGINAL torch model and the ONNX model
on the same inputs (``normcli.parity``); write the ONNX file atomically, and only when parity passed unless
``keep_on_fail``.

Input shapes, when not given: the example inputs of a ``.pt2`` archive, else one sample shaped for the first
conv or linear layer in the model's module order (batch 1): ``(1, in_channels, 64)`` for Conv1d,
``(1, in_channels, 64, 64)`` for Conv2d, ``(1, in_channels, 16, 16, 16)`` for Conv3d (transposed convs
alike), ``(1, in_features)`` for Linear. The report says which was used (``input_source``).

``save_fused``: the folded model as a file that loads with plain torch and no normcli or model code: a
torch.export archive (``torch.export.load``) when the path ends in ``.pt2``, else TorchScript
(``torch.jit.load``). The saved file is loaded back and compared with the folded model before it is kept.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from normcli.atomic import atomic_output, check_output_path
from normcli.errors import NormcliError, describe, first_line
from normcli.inputs import infer_input_shape, input_configurations, inputs_hint
from normcli.metrics import DEFAULT_QUANTILE
from normcli.parity import DEFAULT_ATOL, DEFAULT_RTOL, ParityResult
from normcli.parity_diagnostics import PRECISIONS, Diagnosis

DEFAULT_SAMPLES = 3
DEFAULT_EXPORTER = "dynamo"


@dataclass
class FoldCheck:
    """The folded torch model against the original torch model, on the parity inputs."""

    passed: bool
    max_abs: float
    max_rel: float
    problem: str | None = None  # "non-finite" when the original's outputs hold NaN/Inf


@dataclass
class FuseExportReport:
    output: str | None                 # None when nothing was written
    exporter: str
    opset: int
    dynamic_batch: bool
    input_shapes: list[list[int]]      # of the export's example inputs
    input_source: str                  # where the shapes came from
    folded: list[dict]
    unfolded: list[dict]
    fold_method: str
    fold_note: str
    fold_check: FoldCheck
    parity: ParityResult
    onnx: dict                         # {"nodes", "batchnorm_nodes", "input_names", "output_names"}
    save_fused: str | None = None
    save_fused_format: str | None = None
    warnings: list[str] = field(default_factory=list)
    reference: str = "the original model"  # what parity and the fold check compare against, and why
    # set when the original model's own outputs hold NaN/Inf on the parity inputs (then parity fails):
    # {"norms": norm layers whose statistics or weights hold NaN/Inf, "first": the first module, in call order,
    #  whose output turned non-finite from finite inputs (None if unknown)}
    nonfinite: dict | None = None
    input_shape_guessed: bool = False  # the shapes were inferred from the model (infer_input_shape)
    dynamic_dims: list[list[int]] = field(default_factory=list)  # per ONNX input, its symbolic dimensions
    input_shape_fixed: str | None = None  # for a guessed shape the ONNX fixes: why, and what to do
    checked_shapes: list[list[list[int]]] = field(default_factory=list)  # each input configuration parity ran
    lower_unfolded: str = "keep"       # what became of the BatchNorm nodes left after the fold
    lowered: list[dict] = field(default_factory=list)     # {"node", "channels"}: became Mul + Add
    lower_kept: list[dict] = field(default_factory=list)  # {"node", "reason"}: left as BatchNormalization
    precision: str = "fp32"            # of the exported model (--precision)
    diagnosis: Diagnosis | None = None  # per-module errors, when compared (--compare-intermediates, failure, fp16)
    saved_inputs: str | None = None    # golden files written (--save-inputs / --save-outputs)
    saved_outputs: str | None = None

    @property
    def passed(self) -> bool:
        return self.parity.passed


def fuse_export(model, output: str | os.PathLike, *,
                input_shapes: Sequence[Sequence[int]] | None = None,
                input_tensors: Sequence | None = None,
                example_inputs: tuple | None = None,
                exporter: str = DEFAULT_EXPORTER, opset: int | None = None, dynamic_batch: bool = False,
                atol: float | None = None, rtol: float | None = None, samples: int = DEFAULT_SAMPLES,
                seed: int = 0, keep_on_fail: bool = False, save_fused: str | os.PathLike | None = None,
                lower_unfolded: str | None = None,
                force: bool = False, sources: Sequence[str | os.PathLike] = (),
                progress: Callable[[str], None] | None = None, check_stat: str | None = None,
                quantile: float = DEFAULT_QUANTILE, provider: str | None = None,
                compare_intermediates: bool = False, save_inputs: str | os.PathLike | None = None,
                save_outputs: str | os.PathLike | None = None, precision: str = "fp32") -> FuseExportReport:
    """Fold, export and check ``model``; write ``output`` only if parity passed (or ``keep_on_fail``).

    input_shapes: one shape per model input; input_tensors: real inputs (then parity runs on them, not on
    ``samples`` random ones); example_inputs: a ``.pt2`` archive's, used for shapes when nothing else is
    given. sources: input files that must not be overwritten. atol/rtol: None means the default for the
    model's dtype (``dtype_tolerances``); a float16/bfloat16 model is judged against a float32 run of itself.
    lower_unfolded: what becomes of the BatchNorm nodes the fold left, ``"mul-add"`` or ``"keep"``
    (``normcli.lower``; None: ``DEFAULT_LOWER``).
    check_stat/quantile/provider: see ``normcli.parity.check_parity``. compare_intermediates: compare every
    module's output (also done when parity fails). save_inputs/save_outputs: golden ``.npz`` files for
    ``normcli parity``. precision ``fp16``: export a float16 copy of the folded model and judge it against the
    float32 model, with float16 tolerances by default.
    """
    import torch

    from normcli import fold as fold_module
    from normcli.export import default_input_names, default_output_names, export_onnx
    from normcli.lower import DEFAULT_LOWER, LOWER_MODES
    from normcli.parity import check_parity

    lower_unfolded = DEFAULT_LOWER if lower_unfolded is None else lower_unfolded
    if lower_unfolded not in LOWER_MODES:
        raise NormcliError(f"--lower-unfolded must be one of {', '.join(LOWER_MODES)}, not {lower_unfolded!r}")
    step = progress or (lambda message: None)
    output = check_output_path(output, inputs=tuple(sources), force=force)
    if save_fused is not None:
        save_fused = check_output_path(save_fused, inputs=(*sources, output), force=force)
    golden_paths = []
    for option, golden in (("--save-inputs", save_inputs), ("--save-outputs", save_outputs)):
        if golden is not None:
            golden_paths.append(check_output_path(golden, inputs=(*sources, output, *golden_paths), force=force))
        else:
            golden_paths.append(None)
    save_inputs, save_outputs = golden_paths
    if precision not in PRECISIONS:
        raise NormcliError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if samples < 1:
        raise NormcliError(f"--samples must be at least 1, got {samples}")

    _eval_mode(model)
    dtype = _input_dtype(model)
    half = precision == "fp16"
    if half and dtype != torch.float32:
        raise NormcliError(f"--precision fp16 exports a float16 copy of a float32 model, but this model is "
                           f"{str(dtype).replace('torch.', '')}; leave --precision out to export it as it is")
    default_atol, default_rtol = dtype_tolerances(torch.float16 if half else dtype)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    if atol < 0 or rtol < 0:
        raise NormcliError(f"tolerances must not be negative (atol={atol}, rtol={rtol})")
    reference_model, reference_note = _reference_model(model, dtype)
    widen = reference_model is not model
    inputs, source = _parity_inputs(model, input_shapes, input_tensors, example_inputs, samples, seed,
                                    dynamic_batch, dtype)
    guessed = not input_tensors and not input_shapes and not example_inputs
    onnx_inputs = inputs
    if half:  # the float32 reference and the float16 export see the same (float16) numbers
        from normcli.parity_diagnostics import half_precision_inputs

        inputs, onnx_inputs = half_precision_inputs(inputs)
        reference_note = (f"the float32 model, the export in float16 (default tolerances {HALF_EPS_MULTIPLE} x "
                          f"float16's epsilon {_EPS['float16']:g})")
    example = inputs[0]
    # with a symbolic batch, export at a batch of 2 or more: torch.export specialises a batch of 1
    # dims that differ between the configurations (--input-shape/--input given more than once) are exported
    # symbolic; a differing batch dimension makes the batch symbolic
    varying = _varying_dims(inputs, source)
    if any(0 in dims for dims in varying):
        dynamic_batch = True
    varying = [[d for d in dims if d > 0] for dims in varying]
    export_example = _export_example(inputs, varying, dynamic_batch)
    with torch.no_grad():
        # the original's outputs, computed once: the fold check and the parity check both compare to them
        references = []
        for sample in inputs:
            try:
                outputs = reference_model(*_widened(sample, widen))
            except Exception as e:
                option = "--input" if source == "--input" else "--input-shape"
                hint = inputs_hint(model, option, given=source in ("--input", "--input-shape"))
                raise NormcliError(f"the model does not run on inputs of shapes {_shapes(sample)} ({source}): "
                                   f"{describe(e)}; {hint}") from None
            if not references:
                reference_outputs = outputs
            references.append(torch.utils._pytree.tree_flatten(outputs)[0])
        # a guessed shape must not become part of the artifact: where the model also runs at another spatial
        # size, those dims stay symbolic in the ONNX and parity checks that size too
        dynamic_dims, fixed = None, None
        if guessed and example[0].dim() > 2:
            from normcli.inputs import make_inputs

            other = [(*s.shape[:2], *(d + d // 2 for d in s.shape[2:])) for s in example]
            second = second_onnx = make_inputs(other, 1, seed=seed + 2, dtype=dtype)[0]
            if half:
                from normcli.parity_diagnostics import half_precision_inputs

                (second,), (second_onnx,) = half_precision_inputs([second])
            try:
                outputs = reference_model(*_widened(second, widen))
            except Exception as e:
                fixed = (f"the input shape {_shapes(example)} was guessed ({source}) and the model does not run "
                         f"at {_shapes(second)} ({first_line(describe(e))}), so the ONNX accepts only the guessed "
                         "shape; pass --input-shape with the shape the model is used at")
            else:
                inputs, onnx_inputs = [*inputs, second], [*onnx_inputs, second_onnx]
                references.append(torch.utils._pytree.tree_flatten(outputs)[0])
                dynamic_dims = [list(range(2, t.dim())) for t in example]
    nonfinite = None
    if not all(_finite(t) for outs in references for t in outs):
        # parity against NaN proves nothing: find where they come from, for the report and the error
        nonfinite = _nonfinite_sources(model, next(s for s, outs in zip(inputs, references)
                                                   if not all(_finite(t) for t in outs)))

    step("folding weight normalization and BatchNorm")
    from normcli.weight_norm import fold_weight_norm

    plain, weight_norm_report = fold_weight_norm(model)  # a copy when it folds anything
    folded, fold_report = fold_module.fold_batchnorm(plain, inplace=plain is not model, example_inputs=example)
    _eval_mode(folded)
    if dynamic_dims:
        try:  # a fold on a torch.export graph keeps only the sizes that graph kept
            with torch.no_grad():
                folded(*inputs[-1])
        except Exception as e:
            inputs, onnx_inputs, references, dynamic_dims = inputs[:-1], onnx_inputs[:-1], references[:-1], None
            fixed = (f"the input shape {_shapes(example)} was guessed ({source}); the model runs at other sizes, "
                     f"but its folded graph ({fold_report.method}) fixed the shape ({first_line(describe(e))}), so "
                     "the ONNX accepts only the guessed shape; pass --input-shape with the shape the model is used at")
    step("checking the folded model in torch")
    # float32 against float32: a float16 export's looser tolerances do not apply to the fold itself
    fold_check = _fold_check(folded, inputs, references, *(dtype_tolerances(dtype) if half else (atol, rtol)))

    exported_model = folded
    if half:
        from normcli.parity_diagnostics import half_model

        exported_model = half_model(folded)
        export_example = onnx_inputs[next(i for i, s in enumerate(inputs) if s is export_example)]

    with tempfile.TemporaryDirectory(prefix="normcli-") as scratch:
        onnx_path = Path(scratch) / output.name
        step(f"exporting with the {exporter} exporter")
        exported = export_onnx(exported_model, export_example, onnx_path, exporter=exporter, opset=opset,
                               dynamic_batch=dynamic_batch,
                               dynamic_dims=dynamic_dims or (varying if any(varying) else None),
                               input_names=default_input_names(model, len(example)),
                               output_names=default_output_names(reference_outputs))
        symbolic = [[i for i, d in enumerate(dims) if not isinstance(d, int)] for dims in exported.input_dims]
        if dynamic_dims and any(not set(want) <= set(got) for want, got in zip(dynamic_dims, symbolic)):
            # the exporter specialised the spatial dims: the ONNX runs only at the guessed shape
            inputs, onnx_inputs, references = inputs[:-1], onnx_inputs[:-1], references[:-1]
            fixed = (f"the input shape {_shapes(example)} was guessed ({source}); the model runs at other sizes "
                     f"but the {exported.exporter} exporter fixed the shape in the ONNX (input dims "
                     f"{exported.input_dims}); pass --input-shape with the shape the model is used at, or try "
                     f"--exporter {'torchscript' if exported.exporter == 'dynamo' else 'dynamo'}")
        _check_symbolic([([0] if dynamic_batch else []) + dims for dims in varying], symbolic, exported, source)
        lowering = _lower(onnx_path, lower_unfolded, exported, step)
        step("checking parity in onnxruntime")
        try:
            parity = check_parity(model, onnx_path, onnx_inputs, atol=atol, rtol=rtol, references=references,
                                  check_stat=check_stat, quantile=quantile, provider=provider)
        except NormcliError as e:
            if dtype == torch.bfloat16:
                raise NormcliError(f"{e}; onnxruntime's CPU build runs few operators in bfloat16: export the "
                                   "model in float16 or float32 instead (model.half() or model.float() before "
                                   "saving it)") from e
            raise

        diagnosis = None
        # a torch output holding NaN/Inf fails parity by itself (nonfinite names where it starts): comparing
        # every module against NaN would only repeat it
        reason = ("--compare-intermediates" if compare_intermediates
                  else "parity failed" if not parity.passed and nonfinite is None
                  else "--precision fp16" if half else None)
        if reason:
            from normcli.parity_diagnostics import diagnose

            step("comparing every module's output in onnxruntime and torch")
            diagnosis = diagnose(folded, onnx_path, inputs, reason=reason, atol=atol, rtol=rtol, provider=provider,
                                 onnx_inputs=onnx_inputs if half else None, precision=precision)

        written = None
        fused_format = None
        notes = list(exported.warnings)
        if parity.passed or keep_on_fail:

            if save_fused is not None:
                step(f"saving the folded model to {save_fused}")
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    fused_format = _save_fused(folded, export_example, save_fused, dynamic_batch, atol, rtol)
                notes += [f"{w.category.__name__}: {first_line(w.message)}" for w in caught]
            step(f"writing {output}")
            with atomic_output(output) as tmp:
                shutil.copyfile(onnx_path, tmp)
            written = str(output)
            from normcli.parity_diagnostics import save_golden

            if save_inputs is not None:  # what onnxruntime was fed, and what torch computed from it
                step(f"saving the inputs to {save_inputs}")
                save_golden(save_inputs, exported.input_names, onnx_inputs)
            if save_outputs is not None:
                step(f"saving the torch outputs to {save_outputs}")
                save_golden(save_outputs, exported.output_names, references)

    return FuseExportReport(
        output=written, exporter=exported.exporter, opset=exported.opset, dynamic_batch=dynamic_batch,
        input_shapes=[list(t.shape) for t in example], input_source=source,
        folded=weight_norm_report.folded + list(fold_report.folded),
        unfolded=weight_norm_report.unfolded + list(fold_report.unfolded),
        fold_method=fold_report.method, fold_note=fold_report.note, fold_check=fold_check, parity=parity,
        onnx={"nodes": exported.nodes, "batchnorm_nodes": exported.batchnorm_nodes,
              "input_names": exported.input_names, "output_names": exported.output_names},
        save_fused=str(save_fused) if fused_format else None, save_fused_format=fused_format,
        lower_unfolded=lowering.mode, lowered=lowering.lowered, lower_kept=lowering.kept,
        warnings=list(dict.fromkeys(notes)), reference=reference_note, nonfinite=nonfinite, precision=precision,
        diagnosis=diagnosis, saved_inputs=str(save_inputs) if written and save_inputs else None,
        saved_outputs=str(save_outputs) if written and save_outputs else None,
        input_shape_guessed=guessed, dynamic_dims=symbolic, input_shape_fixed=fixed,
        checked_shapes=[[list(t.shape) for t in s] for s in _distinct_shapes(inputs)],
    )


def _distinct_shapes(inputs: list[tuple]) -> list[tuple]:
    seen = {}
    for sample in inputs:
        seen.setdefault(tuple(tuple(t.shape) for t in sample), sample)
    return list(seen.values())


def _finite(value) -> bool:
    import torch

    return not isinstance(value, torch.Tensor) or not value.is_floating_point() or bool(torch.isfinite(value).all())


def _nonfinite_sources(model, sample: tuple) -> dict:
    """The norm layers whose statistics or weights hold NaN/Inf, and the first module (in call order) whose
    output turned non-finite although its inputs were finite."""
    import torch

    from normcli.inspection import NORM_CLASSES

    norms = []
    for name, module in model.named_modules():
        tensors = [getattr(module, k, None) for k in ("running_mean", "running_var", "weight", "bias")]
        if type(module).__name__ in NORM_CLASSES or getattr(module, "running_var", None) is not None:
            if not all(_finite(t) for t in tensors if isinstance(t, torch.Tensor)):
                norms.append(name)
    first: list[str] = []

    def hook(module, args, output, name=None):
        if not first and all(_finite(a) for a in torch.utils._pytree.tree_flatten(args)[0]) \
                and not all(_finite(o) for o in torch.utils._pytree.tree_flatten(output)[0]):
            first.append(name)

    handles = []
    try:
        for name, module in model.named_modules():
            if name and not any(True for _ in module.children()):
                handles.append(module.register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name)))
        with torch.no_grad():
            model(*sample)
    except Exception:  # noqa: BLE001 - a model that ran once runs again; if not, the norms still say enough
        pass
    finally:
        for handle in handles:
            handle.remove()
    return {"norms": norms, "first": first[0] if first else None}


def _lower(onnx_path, mode: str, exported, step):
    """Lower the BatchNormalization nodes left in the exported file; the node counts follow the rewrite."""
    import onnx

    from normcli.export import count_nodes
    from normcli.lower import lower_unfolded

    if exported.batchnorm_nodes and mode != "keep":
        step(f"lowering {exported.batchnorm_nodes} BatchNormalization node(s) ({mode})")
    report = lower_unfolded(onnx_path, mode if exported.batchnorm_nodes else "keep")
    report.mode = mode
    if report.lowered:
        proto = onnx.load(str(onnx_path), load_external_data=False)
        exported.nodes = count_nodes(proto)
        exported.batchnorm_nodes = count_nodes(proto, op_type="BatchNormalization")
    return report


def _parity_inputs(model, input_shapes, input_tensors, example_inputs, samples: int, seed: int,
                   dynamic_batch: bool, dtype) -> tuple[list[tuple], str]:
    """The parity samples (the first is the export's example) and a note on where their shapes came from."""
    import torch

    from normcli.inputs import make_inputs

    if input_tensors:
        configs = [tuple(t.to(dtype) if t.is_floating_point() else t for t in group)
                   for group in input_configurations(input_tensors, model, "--input")]
        given = configs[0]
        inputs = [given]
        if dynamic_batch:  # the same data at twice the batch size: a second batch size on real inputs
            inputs.append(tuple(torch.cat([t, t]) for t in given))
        return inputs + configs[1:], "--input"
    extra: list[tuple] = []
    if input_shapes:
        # shapes beyond one per positional input are more configurations, each checked like the first
        groups = input_configurations([tuple(int(d) for d in s) for s in input_shapes], model, "--input-shape")
        shapes, source = groups[0], "--input-shape"
        for index, group in enumerate(groups[1:], start=1):
            extra += make_inputs(group, samples, seed=seed + 1 + index, dtype=dtype)
    elif example_inputs:
        shapes = [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]
        source = "the example inputs of the .pt2 archive"
    else:
        shape, source = infer_input_shape(model)
        shapes = [shape]
    for shape in shapes:
        if not shape or any(d < 1 for d in shape):
            raise NormcliError(f"input shape {','.join(map(str, shape))} is not valid: every dimension must be "
                               "at least 1 (e.g. --input-shape 1,3,224,224)")
    if not dynamic_batch:
        return make_inputs(shapes, samples, seed=seed, dtype=dtype) + extra, source
    # two batch sizes: the first half of the samples at the given batch, the rest at 2*batch+1
    other = [(2 * s[0] + 1, *s[1:]) for s in shapes]
    first = max(1, (samples + 1) // 2)
    second = max(1, samples - first)
    return (make_inputs(shapes, first, seed=seed, dtype=dtype)
            + make_inputs(other, second, seed=seed + 1, dtype=dtype)) + extra, source


def _varying_dims(inputs: list[tuple], source: str) -> list[list[int]]:
    """Per input, the dimensions whose size differs between the parity samples: the ONNX model must take
    every configuration, so these are exported symbolic. A rank that differs cannot be."""
    first = [tuple(t.shape) for t in inputs[0]]
    dims: list[set[int]] = [set() for _ in first]
    for sample in inputs[1:]:
        for index, (a, t) in enumerate(zip(first, sample)):
            b = tuple(t.shape)
            if len(a) != len(b):
                raise NormcliError(f"{source}: input {index} is {','.join(map(str, a))} in one configuration and "
                                   f"{','.join(map(str, b))} in another; one ONNX input takes one rank, so give "
                                   "shapes of the same rank")
            dims[index] |= {d for d, (x, y) in enumerate(zip(a, b)) if x != y}
    return [sorted(d) for d in dims]


def _export_example(inputs: list[tuple], varying: list[list[int]], dynamic_batch: bool) -> tuple:
    """The sample to export at: one whose symbolic dims are all 2 or more (torch.export specialises a size of
    1), else the first."""
    wanted = [set(dims) | ({0} if dynamic_batch else set()) for dims in varying]
    return next((s for s in inputs if all(t.dim() > max(dims, default=-1) and all(t.shape[d] > 1 for d in dims)
                                          for t, dims in zip(s, wanted))), inputs[0])


def _check_symbolic(varying: list[list[int]], symbolic: list[list[int]], exported, source: str) -> None:
    """Refuse an ONNX file that fixed a dimension the parity samples need symbolic (the exporter specialised
    it, e.g. on a batch size read as a Python number): onnxruntime could not run the other samples on it."""
    for index, (want, got) in enumerate(zip(varying, symbolic)):
        missing = sorted(set(want) - set(got))
        if missing:
            raise NormcliError(f"the {exported.exporter} exporter fixed dims {', '.join(map(str, missing))} of input "
                               f"{index} (now {exported.input_dims[index]}), which parity checks at several sizes "
                               f"({source}{', --dynamic-batch' if 0 in missing else ''}); the model specialises on "
                               "them: check one size per run, or try the other --exporter")


def _distinct_shapes(inputs: list[tuple]) -> list[tuple]:
    seen = {}
    for sample in inputs:
        seen.setdefault(tuple(tuple(t.shape) for t in sample), sample)
    return list(seen.values())


def _fold_check(folded, inputs, references, atol: float, rtol: float) -> FoldCheck:
    import numpy as np
    import torch

    from normcli.parity import mismatch_mask

    passed, max_abs, max_rel = True, 0.0, 0.0
    if not all(_finite(t) for outs in references for t in outs):
        passed = False  # agreement with a NaN/Inf reference proves nothing
    with torch.no_grad():
        for sample, want in zip(inputs, references):
            got = torch.utils._pytree.tree_flatten(folded(*sample))[0]
            if len(want) != len(got):
                return FoldCheck(False, float("inf"), float("inf"))
            for a, b in zip(got, want):
                a = a.detach().double().numpy()
                b = b.detach().double().numpy()
                if a.shape != b.shape:
                    return FoldCheck(False, float("inf"), float("inf"))
                passed &= not bool(mismatch_mask(a, b, atol, rtol).any())
                with np.errstate(invalid="ignore", divide="ignore"):
                    diff = np.abs(a - b)
                    diff[(a == b) | (np.isnan(a) & np.isnan(b))] = 0.0
                    rel = diff[b != 0] / np.abs(b[b != 0])
                if diff.size:
                    max_abs = max(max_abs, float(diff.max())) if diff.max() == diff.max() else float("nan")
                if rel.size and rel.max() == rel.max():
                    max_rel = max(max_rel, float(rel.max()))
    nonfinite = not all(_finite(t) for outs in references for t in outs)
    return FoldCheck(passed, max_abs, max_rel, "non-finite" if nonfinite else None)


def _save_fused(folded, example: tuple, path: Path, dynamic_batch: bool, atol: float, rtol: float) -> str:
    """Write the folded model in a form plain torch loads, load it back, and compare. Returns the format."""
    import torch

    from normcli.parity import mismatch_mask

    with atomic_output(path) as tmp:
        if path.suffix == ".pt2":
            dynamic = tuple({0: torch.export.Dim("batch")} for _ in example) if dynamic_batch else None
            try:
                program = torch.export.export(folded, example, dynamic_shapes=dynamic)
                buffer = io.BytesIO()  # torch.export wants a .pt2 name; the temporary file has another
                torch.export.save(program, buffer)
                tmp.write_bytes(buffer.getvalue())
                with open(tmp, "rb") as f:
                    reloaded = torch.export.load(io.BytesIO(f.read())).module()
            except Exception as e:
                raise NormcliError(f"cannot save the folded model as a torch.export archive ({first_line(e)}); "
                                   "give --save-fused a path not ending in .pt2 to save TorchScript") from e
            fmt = "pt2"
        else:
            try:
                scripted = torch.jit.script(folded)
                fmt = "torchscript"
            except Exception:  # some fx graphs do not script; a trace of the same graph is equivalent
                try:
                    scripted = torch.jit.trace(folded, example, check_trace=False)
                except Exception as e:
                    raise NormcliError(f"cannot save the folded model as TorchScript ({first_line(e)}); "
                                       "give --save-fused a path ending in .pt2 instead") from e
                fmt = "torchscript (traced)"
            torch.jit.save(scripted, str(tmp))
            reloaded = torch.jit.load(str(tmp), map_location="cpu")
        with torch.no_grad():
            want = torch.utils._pytree.tree_flatten(folded(*example))[0]
            got = torch.utils._pytree.tree_flatten(reloaded(*example))[0]
        if len(want) != len(got) or any(a.shape != b.shape or mismatch_mask(a.double().numpy(), b.double().numpy(),
                                                                             atol, rtol).any()
                                        for a, b in zip(got, want)):
            raise NormcliError(f"the saved folded model {path} does not compute what the folded model computes; "
                               "nothing was written")
    return fmt


def _eval_mode(model) -> None:
    try:
        model.eval()
    except NotImplementedError:
        # a module unlifted from a torch.export archive refuses eval(): its graph was captured in one mode
        # already, and the flag only tells the fold that no module is training
        for module in model.modules():
            module.training = False


def _input_dtype(model):
    import torch

    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


# Machine epsilon (the spacing of numbers near 1) of each half dtype; its tolerances are multiples of it.
_EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}
# A half-precision model rounds every layer's output to its dtype: errors of a few epsilon per layer,
# relative to the activations, add up through the network. A wrong fold or export is off by the norm's
# scale and shift, far more.
HALF_EPS_MULTIPLE = 16


def dtype_tolerances(dtype) -> tuple[float, float]:
    """(atol, rtol) of the parity and fold checks for a model whose parameters are ``dtype``.

    float32 and float64: ``DEFAULT_ATOL``, ``DEFAULT_RTOL``; float16 and bfloat16: ``HALF_EPS_MULTIPLE``
    times the dtype's epsilon, both absolute and relative (float16: 0.0156, bfloat16: 0.125).
    """
    eps = _EPS.get(str(dtype).replace("torch.", ""))
    if eps is None:
        return DEFAULT_ATOL, DEFAULT_RTOL
    return HALF_EPS_MULTIPLE * eps, HALF_EPS_MULTIPLE * eps


def _reference_model(model, dtype):
    """The model the checks compare against: a float32 copy of a half-precision model, else the model itself.

    A float16 model compared with itself would judge the ONNX by torch's own float16 rounding; the float32
    copy computes what the half-precision weights mean.
    """
    import torch

    from normcli.weight_norm import copy_module

    if dtype not in (torch.float16, torch.bfloat16):
        return model, "the original model"
    name = str(dtype).replace("torch.", "")
    try:
        wide = copy_module(model).float()
    except Exception as e:  # e.g. a module unlifted from a .pt2 archive: judge it by itself, loosely
        return model, (f"the original {name} model itself (a float32 copy failed: {describe(e)}); default "
                       f"tolerances {HALF_EPS_MULTIPLE} x {name}'s epsilon {_EPS[name]:g}")
    _eval_mode(wide)
    return wide, (f"a float32 run of the original {name} model (default tolerances {HALF_EPS_MULTIPLE} x "
                  f"{name}'s epsilon {_EPS[name]:g})")


def _widened(inputs: tuple, widen: bool) -> tuple:
    import torch

    if not widen:
        return inputs
    return tuple(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)


def _shapes(inputs) -> str:
    return " ".join(",".join(map(str, t.shape)) for t in inputs)
