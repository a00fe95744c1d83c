"""`normcli fuse-export PATH -o OUT.onnx`: fold BatchNorm, export to ONNX, prove parity in onnxruntime."""

from __future__ import annotations

import math
from typing import List, Optional

import typer

from normcli.cli.common import (ArchKwargsOption, ArchOption, CheckErrorStatOption, DebugOption, ErrorQuantileOption,
                                FailOnOption, JsonOption, LimitOption, ProviderOption, UnsafeLoadOption, cell,
                                check_inputs_first, err_console, jsonable, out_console, parse_arch_kwargs,
                                parse_check_stat, parse_fail_on, parse_shape, print_json, render_findings, safe_text)
from normcli.cli.output import QuietOption, Reporter, VerboseOption
from normcli.cli.parity_report import parity_json, render_diagnosis, render_golden, render_parity

# Mirrors of the library defaults (normcli.parity / normcli.fuse_export), kept here so that `--help` shows
# them without importing torch; a test checks they agree.
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
DEFAULT_SAMPLES = 3
EXPORTERS = ("dynamo", "torchscript")
LOWER_MODES = ("mul-add", "keep")  # normcli.lower.LOWER_MODES; DEFAULT_LOWER mirrors its default
DEFAULT_LOWER = "keep"
PRECISIONS = ("fp32", "fp16")                 # normcli.parity_diagnostics


def fuse_export(
    path: str = typer.Argument(..., help="Checkpoint to read (state dict with --arch, or a live module with "
                                         "--unsafe-load)."),
    output: str = typer.Option(..., "-o", "--output", metavar="OUT.onnx", help="ONNX file to write."),
    arch: Optional[str] = ArchOption,
    arch_kwargs: Optional[str] = ArchKwargsOption,
    input_shape: Optional[List[str]] = typer.Option(
        None, "--input-shape", metavar="SHAPE",
        help="Comma-separated input shape, e.g. 1,3,224,224; repeat for several inputs. Default: a .pt2's "
             "example inputs, else (1, C, 64, 64) from the first conv (64 for 1d, 16^3 for 3d) or "
             "(1, F) from the first linear; a guessed shape's spatial dims stay symbolic in the ONNX where the "
             "model runs at another size (checked at both), else the report says the shape is now fixed."),
    input_file: Optional[List[str]] = typer.Option(
        None, "--input", metavar="FILE",
        help="Run parity on this data instead of random samples: .npy, .npz, .pt (read safely), .safetensors "
             "(each array one input, in the file's order) or a PNG/JPEG image (the images extra); the same "
             "readers as recalibrate --data. Repeat per input."),
    opset: Optional[int] = typer.Option(None, "--opset", metavar="N",
                                        help="ONNX opset. Default 18; each exporter writes the opsets the "
                                             "installed torch and onnx support (an error names them)."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch",
                                       help="Make dim 0 of every input and output symbolic; parity then runs "
                                            "two batch sizes."),
    atol: Optional[float] = typer.Option(
        None, "--atol", metavar="X",
        help=f"Absolute tolerance of the parity check. Default {DEFAULT_ATOL:g}; for a float16/bfloat16 model "
             "16 times its epsilon (0.0156 / 0.125), judged against a float32 run of it."),
    rtol: Optional[float] = typer.Option(
        None, "--rtol", metavar="X",
        help=f"Relative tolerance: an element fails when |onnx-torch| > atol + rtol*|torch|. Default "
             f"{DEFAULT_RTOL:g}; for float16/bfloat16 as --atol."),
    samples: int = typer.Option(DEFAULT_SAMPLES, "--samples", metavar="N",
                                help="Seeded standard-normal inputs to check parity on."),
    exporter: str = typer.Option("dynamo", "--exporter", metavar="dynamo|torchscript", case_sensitive=False,
                                 help="torch.onnx.export's torch.export-based exporter (dynamo, default) or the "
                                      "legacy TorchScript one."),
    save_fused: Optional[str] = typer.Option(
        None, "--save-fused", metavar="PATH",
        help="Also write the folded torch model: a torch.export archive if PATH ends in .pt2, else TorchScript; "
             "both load with plain torch."),
    lower_unfolded: str = typer.Option(
        DEFAULT_LOWER, "--lower-unfolded", metavar="mul-add|keep", case_sensitive=False,
        help="What becomes of a BatchNorm the fold could not fold (no conv or linear beside it): mul-add "
             "rewrites its BatchNormalization node as a per-channel Mul + Add (scale and shift computed in "
             "float64); keep (default, faster in onnxruntime) leaves the node."),
    keep_on_fail: bool = typer.Option(False, "--keep-on-fail", help="Write the outputs even if parity fails "
                                                                     "(the exit code is still 1)."),
    fail_on: str = FailOnOption,
    check_error_stat: Optional[str] = CheckErrorStatOption,
    error_quantile: float = ErrorQuantileOption,
    compare_intermediates: bool = typer.Option(
        False, "--compare-intermediates",
        help="Compare every module's output in torch and onnxruntime and name the first that diverges "
             "(done by itself when parity fails)."),
    save_inputs: Optional[str] = typer.Option(None, "--save-inputs", metavar="F.npz",
                                              help="Write the parity inputs, keyed by the ONNX input names."),
    save_outputs: Optional[str] = typer.Option(
        None, "--save-outputs", metavar="F.npz",
        help="Write the torch outputs, keyed by the ONNX output names: normcli parity OUT.onnx --inputs "
             "--expected checks the ONNX file against them without torch."),
    precision: str = typer.Option("fp32", "--precision", metavar="fp32|fp16", case_sensitive=False,
                                  help="Export in float16 (fp16) and check it against the float32 model, with "
                                       "float16 tolerances (16 x its epsilon) unless --atol/--rtol say otherwise."),
    provider: Optional[str] = ProviderOption,
    json_out: bool = JsonOption,
    unsafe_load: bool = UnsafeLoadOption,
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
    limit: Optional[List[str]] = LimitOption,
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
    debug: bool = DebugOption,
) -> None:
    """Fold BatchNorm into the convs next to it, export to ONNX and check it against the original in onnxruntime."""
    from normcli.atomic import check_output_path
    from normcli.errors import CheckFailed, NormcliError

    exporter = exporter.lower()
    if exporter not in EXPORTERS:
        raise NormcliError(f"--exporter must be dynamo or torchscript, not {exporter!r}")
    if samples < 1:
        raise NormcliError(f"--samples must be at least 1, got {samples}")
    for name, value in (("--atol", atol), ("--rtol", rtol)):  # None: from the dtype; NaN compares False
        if value is not None and not (value >= 0 and not math.isinf(value)):
            raise NormcliError(f"--atol and --rtol must be finite and not negative (got {name} {value})")
    fail_on = parse_fail_on(fail_on)
    lower_unfolded = lower_unfolded.lower()
    if lower_unfolded not in LOWER_MODES:
        raise NormcliError(f"--lower-unfolded must be mul-add or keep, not {lower_unfolded!r}")
    shapes = [parse_shape(s) for s in input_shape or []]
    stat = parse_check_stat(check_error_stat, error_quantile)
    precision = precision.lower()
    if precision not in PRECISIONS:
        raise NormcliError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if shapes and input_file:
        raise NormcliError("give either --input or --input-shape, not both")
    # a missing input is the first thing to say; then refuse a clobbering or unwritable output before the
    # slow work starts
    check_inputs_first(path, *(input_file or []))
    out_path = check_output_path(output, inputs=(path, *(input_file or [])), force=force)
    if save_fused is not None:
        check_output_path(save_fused, inputs=(path, out_path), force=force)
    for golden in (save_inputs, save_outputs):
        if golden is not None:
            check_output_path(golden, inputs=(path, out_path, *(input_file or [])), force=force)
    if provider is not None:
        from normcli.parity import resolve_provider

        resolve_provider(provider)  # an unknown one is a usage error before the slow work
    if opset is not None:  # before the slow work: the installed exporter says which opsets it writes
        from normcli.export import check_opset

        check_opset(exporter, opset)

    reporter = Reporter("fuse-export", quiet, verbose)
    with reporter.section() as step:
        step.stage("loading the model", log=False)
        from normcli.fuse_export import fuse_export as run_pipeline
        from normcli.loading import load_model
        from normcli.data import read_input_tensors

        from normcli.formats import open_checkpoint
        from normcli.limits import parse_limits

        # opened and recognised once; the loader reads through this descriptor
        limits = parse_limits(limit)
        loaded = load_model(open_checkpoint(path, limits), arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs),
                            unsafe_load=unsafe_load,
                            limits=limits)
        tensors = [t for f in input_file or [] for t in read_input_tensors(f)]
        step.stage("checking the norm layers", log=False)
        from normcli.preflight import judge, model_findings

        findings = model_findings(loaded)
        stopping = judge(findings, fail_on)  # a fold uses every statistic
        if precision == "fp16":
            from normcli.parity_diagnostics import fp16_gate

            stopping += fp16_gate(findings, fail_on)
    if not json_out:
        render_findings(findings, "fuse-export", verbose, quiet)
    if stopping:
        from normcli.preflight import summary

        if json_out:
            from normcli.export import DEFAULT_OPSET

            # nothing was folded or exported: the opset is the one asked for
            print_json({"output": None, "opset": opset or DEFAULT_OPSET[exporter], "exporter": exporter,
                        "folded": [], "unfolded": [], "parity": None, "onnx": None, "findings": jsonable(findings)},
                       schema="fuse-export")
        raise CheckFailed(f"fuse-export stopped before folding: {len(stopping)} finding(s) at or above --fail-on "
                          f"{fail_on} on the norm layers of {path}: {summary(stopping)}; exporting them would "
                          "prove nothing; fix the checkpoint (normcli inspect shows the details), or pass "
                          "--fail-on never to export anyway; nothing was written")

    with reporter.section() as step:
        report = run_pipeline(loaded.model, output, input_shapes=shapes or None, input_tensors=tensors or None,
                              example_inputs=loaded.example_inputs, exporter=exporter, opset=opset,
                              dynamic_batch=dynamic_batch, atol=atol, rtol=rtol, samples=samples,
                              keep_on_fail=keep_on_fail, save_fused=save_fused, force=force,
                              lower_unfolded=lower_unfolded,
                              sources=(path, *(input_file or [])), progress=step, check_stat=stat,
                              quantile=error_quantile, provider=provider, compare_intermediates=compare_intermediates,
                              save_inputs=save_inputs, save_outputs=save_outputs, precision=precision)
    reporter.close()

    if report.input_shape_fixed:
        err_console.print(f"warning: {safe_text(report.input_shape_fixed)}", soft_wrap=True, markup=False,
                          highlight=False)
    if json_out:
        print_json({**report_json(report), "findings": jsonable(findings)}, schema="fuse-export")
    else:
        render(report, reporter)
    if report.nonfinite is not None:
        kept = f"; {report.output} was written anyway (--keep-on-fail)" if report.output else \
            "; nothing was written"
        norms = ", ".join(report.nonfinite["norms"][:8]) or "none"
        first = report.nonfinite["first"]
        raise CheckFailed("the torch model's own output holds NaN/Inf on the test inputs, so parity proves "
                          f"nothing: norm layers with non-finite statistics: {norms}"
                          + (f"; the first module whose output is non-finite: {first}" if first else "")
                          + f"; fix or recalibrate those statistics{kept}")
    if not report.parity.passed:
        failed = [o.name for o in report.parity.outputs if not o.passed]
        kept = f"; {report.output} was written anyway (--keep-on-fail)" if report.output else \
            "; nothing was written"
        rule = f" ({report.parity.check_stat} error)" if report.parity.check_stat else "*|torch|"
        first = report.diagnosis.first if report.diagnosis else None
        where = f"; it starts at module {first['module']}" if first else ""
        raise CheckFailed(f"parity failed on {', '.join(failed)}: the ONNX model differs from the torch model "
                          f"beyond atol={report.parity.atol} + rtol={report.parity.rtol}{rule}{where}{kept}")


def report_json(report) -> dict:
    """The contract's fuse-export schema, plus how the inputs, the fold and the saved model came about."""
    return jsonable({
        "output": report.output, "opset": report.opset, "exporter": report.exporter,
        "folded": report.folded, "unfolded": report.unfolded,
        "parity": parity_json(report),
        "onnx": report.onnx,
        "dynamic_batch": report.dynamic_batch,
        "input_shapes": report.input_shapes, "input_source": report.input_source,
        "fold_method": report.fold_method, "fold_note": report.fold_note, "fold_check": report.fold_check,
        "save_fused": report.save_fused, "save_fused_format": report.save_fused_format,
        "warnings": report.warnings, "reference": report.reference, "nonfinite": report.nonfinite,
        "input_shape_guessed": report.input_shape_guessed, "dynamic_dims": report.dynamic_dims,
        "input_shape_fixed": report.input_shape_fixed, "checked_shapes": report.checked_shapes,
        "lower_unfolded": report.lower_unfolded, "lowered": report.lowered, "lower_kept": report.lower_kept,
    })


def _num(x: float) -> str:
    if x != x or x in (float("inf"), float("-inf")):
        return str(x)
    return "0" if x == 0 else f"{x:.2e}"


def render(report, reporter=None) -> None:
    console = out_console
    shapes = " ".join(",".join(map(str, s)) for s in report.input_shapes)
    console.print(f"input shape {shapes} ({'guessed: ' if report.input_shape_guessed else ''}{report.input_source})"
                  + (", batch dimension symbolic" if report.dynamic_batch else ""), soft_wrap=True)
    if report.input_shape_guessed:
        others = [" ".join(",".join(map(str, s)) for s in config) for config in report.checked_shapes]
        if report.input_shape_fixed:
            console.print(f"[yellow]the guessed shape is now fixed in the ONNX[/]: {cell(report.input_shape_fixed)}",
                          soft_wrap=True)
        elif any(report.dynamic_dims):
            dims = "; ".join(f"input {i}: dims {', '.join(map(str, d))}" for i, d in enumerate(report.dynamic_dims)
                             if d)
            console.print(f"the guessed shape is not fixed in the ONNX: symbolic {dims}; parity checked at "
                          f"{' and '.join(others)}", soft_wrap=True)
    method = {"fx": "torch.fx dataflow", "export": "torch.export graph",
              "torchscript": "the torch.export graph of the TorchScript"}.get(report.fold_method, report.fold_method)
    console.print(f"folded {len(report.folded)} norm(s) by {method}, {len(report.unfolded)} left in place",
                  soft_wrap=True)
    if report.fold_note:
        console.print(f"note: {cell(report.fold_note)}", style="dim", soft_wrap=True)
    from normcli.cli.common import safe_text
    from normcli.cli.tables import Column, print_table

    for rows, columns in ((report.folded, ("norm", "into")), (report.unfolded, ("norm", "reason"))):
        if rows:
            print_table(console, [Column("folded norm" if columns[1] == "into" else "unfolded norm", 1, name=True),
                                  Column(columns[1], 1, name=True)],
                        [[safe_text(row[c]) for c in columns] for row in rows])
    check = report.fold_check
    verdict = "[green]ok[/]" if check.passed else \
        ("[red]non-finite[/]: the original's output holds NaN/Inf" if check.problem else "[red]out of tolerance[/]")
    console.print(f"folded torch vs original torch: max abs {_num(check.max_abs)}, max rel {_num(check.max_rel)} "
                  + verdict, soft_wrap=True)

    parity = report.parity
    note = reporter.note if reporter else None  # which columns a narrow table left out (not under -q)
    render_parity(console, report, note)
    render_diagnosis(console, report, note)
    console.print(f"ONNX: {report.onnx['nodes']} nodes, {report.onnx['batchnorm_nodes']} BatchNormalization; "
                  f"{report.exporter} exporter, opset {report.opset}", soft_wrap=True)
    if report.lowered:
        console.print(f"lowered {len(report.lowered)} unfolded BatchNormalization node(s) to Mul + Add "
                      "(--lower-unfolded mul-add)", soft_wrap=True)
    for kept in report.lower_kept:
        console.print(f"kept BatchNormalization {cell(kept['node'])}: {cell(kept['reason'])}", soft_wrap=True)
    if report.output:
        console.print(f"wrote {cell(report.output)}" + ("" if parity.passed else " (parity failed; --keep-on-fail)"),
                      soft_wrap=True)
    else:
        console.print("[red]nothing written[/]: parity failed (pass --keep-on-fail to write anyway)", soft_wrap=True)
    if report.save_fused:
        console.print(f"wrote {cell(report.save_fused)} ({report.save_fused_format})", soft_wrap=True)
    render_golden(console, report)
