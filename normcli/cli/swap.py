"""`normcli swap PATH --to frn|mabn -o OUT`: replace BatchNorm with batch-size-independent layers."""

from __future__ import annotations

from typing import List, Optional

import typer

from normcli.cli.common import (ArchKwargsOption, ArchOption, DebugOption, FailOnOption, JsonOption, LimitOption,
                                UnsafeLoadOption, cell, check_inputs_first, err_console, jsonable, out_console,
                                parse_arch_kwargs, parse_fail_on, parse_shape, print_json, render_findings)

from normcli.cli.output import QuietOption, Reporter, VerboseOption, cli_spelling
from normcli.swap import SWAP_TARGETS, resolve_options  # the registry itself imports no torch

TO_HELP = "Target: " + "; ".join(f"{name}: {t.summary}" for name, t in SWAP_TARGETS.items()) + "."
# the library's option names as this command spells them, for its messages
OPTION_SPELLING = {"learnable_eps": "--learnable-eps", "B": "--B", "real_B": "--real-B",
                   "warmup_iters": "--warmup-iters", "momentum": "--momentum", "cenconv": "--cenconv",
                   "groups": "--groups"}
EXACT_REL = 1e-5  # an eval-exact swap (mabn, bn, syncbn, frozen) must not change the output beyond rounding


def swap(
    path: str = typer.Argument(..., help="Checkpoint whose BatchNorm layers to replace."),
    to: str = typer.Option(..., "--to", metavar="|".join(SWAP_TARGETS), help=TO_HELP),
    output: str = typer.Option(..., "-o", "--output", help="Where to write the swapped model."),
    arch: Optional[str] = ArchOption,
    arch_kwargs: Optional[str] = ArchKwargsOption,
    include: Optional[List[str]] = typer.Option(None, "--include", metavar="GLOB",
                                                help="Only swap BatchNorms whose name matches (repeatable)."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", metavar="GLOB",
                                                help="Leave BatchNorms whose name matches (repeatable)."),
    input_shape: Optional[List[str]] = typer.Option(
        None, "--input-shape", metavar="SHAPE",
        help="Probe input shape, e.g. 1,3,224,224; repeat for several inputs (one per positional input, in "
             "order; more are more configurations). Default: guessed from the first conv/linear layer."),
    input_file: Optional[List[str]] = typer.Option(
        None, "--input", metavar="FILE",
        help="Probe on this data instead of random samples (.npy, .npz, .pt read safely, .safetensors, or an "
             "image; the readers of recalibrate --data); repeat per input."),
    learnable_eps: Optional[bool] = typer.Option(None, "--learnable-eps/--fixed-eps",
                                                 help="frn: learnable eps (also swaps BatchNorm1d after Linear)."),
    batch: Optional[int] = typer.Option(None, "--B", help="mabn: batch size one step sees (default 2)."),
    real_batch: Optional[int] = typer.Option(None, "--real-B",
                                             help="mabn: batch size whose statistics are emulated (default 16)."),
    warmup_iters: Optional[int] = typer.Option(None, "--warmup-iters", help="mabn: warm-up steps (default 100)."),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="mabn: running_var momentum (default 0.98)."),
    cenconv: Optional[bool] = typer.Option(None, "--cenconv/--no-cenconv",
                                           help="mabn: also centre the convs feeding each MABN (changes the "
                                                "function; the drift is reported)."),
    groups: Optional[int] = typer.Option(None, "--groups", metavar="G",
                                         help="gn: groups per GroupNorm (default 32, lowered to the largest divisor "
                                              "of each layer's channels)."),
    fail_on: str = FailOnOption,
    json_out: bool = JsonOption,
    unsafe_load: bool = UnsafeLoadOption,
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    key: Optional[str] = typer.Option(None, "--key", help="Entry of a nested checkpoint that holds the weights."),
    limit: Optional[List[str]] = LimitOption,
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
    debug: bool = DebugOption,
) -> None:
    """Replace BatchNorm with FRN + TLU, MABN, BatchNorm/SyncBatchNorm, FrozenBatchNorm or GroupNorm, and write it."""
    from normcli.atomic import atomic_output, check_output_path
    from normcli.errors import CheckFailed, NormcliError

    if to not in SWAP_TARGETS:
        raise NormcliError(f"--to {to!r} is not a swap target; choose one of {', '.join(SWAP_TARGETS)}")
    target = SWAP_TARGETS[to]
    given = {"learnable_eps": learnable_eps, "B": batch, "real_B": real_batch, "warmup_iters": warmup_iters,
             "momentum": momentum, "cenconv": cenconv, "groups": groups}
    foreign = [OPTION_SPELLING[k] for k, v in given.items() if v is not None and k not in target.defaults]
    if foreign:
        raise NormcliError(f"--to {to} does not take {', '.join(foreign)}; those options belong to another target")
    options = {k: v for k, v in given.items() if k in target.defaults}
    with cli_spelling(OPTION_SPELLING):
        resolve_options(to, options)  # an impossible value fails here, before the model is loaded
    reporter = Reporter("swap", quiet, verbose)

    fail_on = parse_fail_on(fail_on)
    check_inputs_first(path, *(input_file or []))
    out = check_output_path(output, inputs=(path, *(input_file or [])), force=force)
    shapes = [parse_shape(s, "--input-shape") for s in input_shape or []]
    if shapes and input_file:
        raise NormcliError("give either --input or --input-shape, not both")
    # the same checks (and limits) as for shapes stored in a swap file, before anything is loaded
    from normcli.swap import MAX_PROBE_SHAPES, check_probe_shape

    if len(shapes) > MAX_PROBE_SHAPES:
        raise NormcliError(f"--input-shape given {len(shapes)} times; swap takes at most {MAX_PROBE_SHAPES}")
    for shape in shapes:
        check_probe_shape(list(shape))
    kwargs = parse_arch_kwargs(arch_kwargs)

    from normcli.loading import load_model
    from normcli.data import read_input_tensors

    from normcli.formats import open_checkpoint
    from normcli.limits import parse_limits

    # opened and recognised once; the loader reads through this descriptor
    limits = parse_limits(limit)
    checkpoint = open_checkpoint(path, limits)
    if arch is None and checkpoint.format in ("torchscript", "pt2"):
        # a compiled graph has no norm modules to replace: its weights go into the user's model code instead
        kind, extra = (("TorchScript archive, whose compiled modules", " --unsafe-load")
                       if checkpoint.format == "torchscript" else ("torch.export archive, whose graph", ""))
        classes = ""
        if not unsafe_load:
            from normcli.loading import _names, refuse_code
            from normcli.reader import read_tensors

            refuse_code(checkpoint, checkpoint.format)  # a file naming code is refused by those names first
            named = read_tensors(checkpoint, key=key, limits=limits).unsafe_globals
            if named:
                classes = (f" (loading it runs its classes {_names(named)}: use --unsafe-load only on files you "
                           "trust)")
        raise NormcliError(f"{path} is a {kind} cannot be swapped{classes}; swap its weights in your model code "
                           f"instead: pass --arch package.module:callable{extra} (the class that built it)")
    # torch is imported only once the file is known to be loadable: a refused file says so without waiting for it
    reporter.stage(f"loading {path}", log=False)
    loaded = load_model(checkpoint, arch=arch, arch_kwargs=kwargs, unsafe_load=unsafe_load, key=key, limits=limits)

    import torch

    from normcli.inputs import input_configurations
    from normcli.preflight import judge, model_findings
    from normcli.swap import selection_reason, swap_norms

    model = loaded.model.eval()
    tensors = [t for f in input_file or [] for t in read_input_tensors(f)]
    if shapes:
        input_configurations(shapes, model, "--input-shape")  # a count that does not fit is a usage error
    if tensors:
        input_configurations(tensors, model, "--input")

    # inspect's findings first: a swap that carries statistics over must not carry broken ones
    include, exclude = include or None, exclude or None
    findings = model_findings(loaded)
    stopping = judge(findings, fail_on, lambda name: target.carries_running_stats
                     or selection_reason(name, include, exclude) is not None)
    reporter.pause()
    if not json_out:
        render_findings(findings, "swap", verbose, quiet)
    if stopping:
        _stop(findings, stopping, path, fail_on, to, json_out, "before swapping")

    reporter.stage(f"swapping BatchNorm for {to}")
    result, report = swap_norms(model, to, include=include, exclude=exclude,
                                input_shapes=shapes or None, inputs=tensors or None, **options)

    if not report.replaced:
        _nothing_replaced(report, path)
    if not target.carries_running_stats:  # a layer the target did not replace keeps its statistics after all
        replaced = {r["name"] for r in report.replaced}
        stopping = judge(findings, fail_on, lambda name: name not in replaced)
        if stopping:
            _stop(findings, stopping, path, fail_on, to, json_out, "after swapping, before writing")

    failures = _failed_checks(report)
    doc = _report_json(report, None if failures else str(out), findings)
    if not failures:
        reporter.stage(f"writing {out}")
        with atomic_output(out) as tmp:
            if loaded.flavour == "state_dict":
                # swap_norms(the same arch, to, **options) rebuilds the module this state dict loads into
                torch.save({"state_dict": result.state_dict(),
                            "normcli_swap": {"to": to, "options": report.rebuild_options, "arch": loaded.arch,
                                             "arch_kwargs": loaded.arch_kwargs}},
                           tmp)
            else:
                torch.save(result, tmp)
    reporter.close()
    if json_out:
        print_json(doc, schema="swap")
    else:
        _render(report, doc["output"])
    if failures:
        raise CheckFailed(f"swap check failed: {'; '.join(failures)}; nothing was written")


def _stop(findings, stopping, path: str, fail_on: str, to: str, json_out: bool, when: str) -> None:
    from normcli.errors import CheckFailed
    from normcli.preflight import summary

    if json_out:
        print_json({"to": to, "output": None, "replaced": [], "skipped": [], "absorbed_activations": [],
                    "eval_drift": {"max_abs": None, "max_rel": None}, "findings": jsonable(findings)}, schema="swap")
    raise CheckFailed(f"swap stopped {when}: {len(stopping)} finding(s) at or above --fail-on {fail_on} on the norm "
                      f"layers of {path}: {summary(stopping)}; fix the checkpoint (normcli inspect shows the "
                      "details), or pass --fail-on never to swap anyway; nothing was written")


def _nothing_replaced(report, path: str) -> None:
    """A swap that changes nothing is a mistake in the invocation: say why each norm stayed."""
    from normcli.errors import NormcliError

    for s in report.skipped:
        err_console.print(f"skipped {cell(s['name'])}: {cell(s['reason'])}", soft_wrap=True)
    if not report.skipped:
        raise NormcliError(f"swap to {report.to} would replace nothing: the model in {path} has no norm layer; "
                           "nothing was written")
    groups: dict[str, list[str]] = {}
    for s in report.skipped:
        groups.setdefault(s["reason"], []).append(s["name"])
    parts = []
    for reason, names in groups.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        parts.append(f"{shown}: {reason}")
    raise NormcliError(f"swap to {report.to} would replace no layer of {path}, so nothing was written; "
                       f"{'; '.join(parts)}")


def _failed_checks(report) -> list[str]:
    failures = []
    if report.train_check is not None and not report.train_check.get("passed"):
        tc = report.train_check
        failures.append("train-mode forward/backward at batch 2 " +
                        (f"raised {tc['error']}" if tc.get("error") else
                         f"gave non-finite gradients in {', '.join(tc['nonfinite_grads'][:5])}"))
    drift = report.eval_drift
    if SWAP_TARGETS[report.to].eval_exact(report.options) and drift is not None \
            and not drift["max_rel"] <= EXACT_REL:
        failures.append(f"the {report.to} swap must keep the eval output, but it drifted by {drift['max_rel']:.3g} "
                        f"(relative), more than {EXACT_REL:g}")
    return failures


def _report_json(report, output: str | None, findings) -> dict:
    doc = jsonable(report.to_dict())
    doc["output"] = output
    doc["findings"] = jsonable(findings)
    doc["eval_drift"] = doc.get("eval_drift") or {"max_abs": None, "max_rel": None}
    return doc


def _render(report, output: str | None) -> None:
    console = out_console
    from normcli.cli.common import safe_text
    from normcli.cli.tables import Column, print_table

    print_table(console, [Column("layer", 1, name=True), Column("from", 3), Column("to", 2)],
                [[safe_text(r[k]) for k in ("name", "from", "to")] for r in report.replaced],
                title=f"swap to {report.to}")
    for s in report.skipped:
        console.print(f"[yellow]skipped[/] {cell(s['name'])}: {cell(s['reason'])}", soft_wrap=True)
    if report.absorbed_activations:
        console.print(f"absorbed activations ({len(report.absorbed_activations)}): "
                      f"{cell(', '.join(report.absorbed_activations))}", soft_wrap=True)
    if report.centred_convs:
        console.print(f"centred convs: {cell(', '.join(report.centred_convs))}", soft_wrap=True)
    console.print(f"parameters: {report.params_before:,} -> {report.params_after:,}")
    if report.eval_drift is not None:
        shapes = " ".join(",".join(map(str, shape)) for shape in report.input_shapes or [])
        console.print(f"eval drift on probe inputs {shapes}: max abs {report.eval_drift['max_abs']:.3g}, "
                      f"max rel {report.eval_drift['max_rel']:.3g}")
    if report.train_check is not None:
        ok = report.train_check.get("passed")
        console.print(f"train check (forward + backward, batch {report.train_check.get('batch_size')}): "
                      + ("[green]gradients finite[/]" if ok else "[red]failed[/]"))
    for note in report.notes:
        console.print(f"note: {cell(note)}", style="dim", soft_wrap=True)
    console.print(f"wrote {cell(output)}" if output else "[red]nothing written[/]")
