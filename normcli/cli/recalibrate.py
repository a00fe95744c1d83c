"""`normcli recalibrate PATH --data SOURCE -o OUT`: re-estimate BatchNorm-family running statistics from data."""

from __future__ import annotations

import os
import time
from typing import List, Optional

import typer

from normcli.cli.common import (ArchKwargsOption, ArchOption, DebugOption, JsonOption, jsonable, out_console,
                                parse_arch_kwargs, parse_shape, print_json)
from normcli.cli.output import QuietOption, Reporter, VerboseOption


def recalibrate(
    path: str = typer.Argument(..., help="Checkpoint whose norm statistics to re-estimate (state dict, training "
                                         "checkpoint or safetensors)."),
    data: str = typer.Option(..., "--data", metavar="SOURCE",
                             help="File or directory of .npy/.npz/.pt/.safetensors tensors or PNG/JPEG images, or "
                                  "package.module:fn / path/to/file.py:fn returning an iterable of batches."),
    output: str = typer.Option(..., "-o", "--output", help="Where to write the recalibrated checkpoint."),
    arch: Optional[str] = ArchOption,
    arch_kwargs: Optional[str] = ArchKwargsOption,
    key: Optional[str] = typer.Option(None, "--key", help="Entry of a nested checkpoint that holds the weights "
                                                          "(e.g. an EMA copy); only that entry is changed."),
    batches: Optional[int] = typer.Option(None, "--batches", metavar="N",
                                          help="Use at most N batches for the statistics (default: all)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", metavar="B",
                                             help="Samples per batch for file sources (default 32); passed as "
                                                  "batch_size= to a function source."),
    call: Optional[str] = typer.Option(None, "--call", metavar="SPEC",
                                       help="fn(model, batch) that runs the model on one batch (dict or several "
                                            "inputs): package.module:fn or path/to/file.py:fn."),
    include: Optional[List[str]] = typer.Option(None, "--include", metavar="GLOB",
                                                help="Only recalibrate norms whose name matches (repeatable)."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", metavar="GLOB",
                                                help="Leave norms whose name matches as they are (repeatable)."),
    forward: str = typer.Option("batch", "--forward", metavar="batch|running",
                                help="What the recalibrated norms normalise with during the pass: each batch's "
                                     "own statistics, as in training (default), or their existing running "
                                     "statistics."),
    resize: Optional[str] = typer.Option(None, "--resize", metavar="H,W", help="Images: resize to H,W (or S,S)."),
    mean: Optional[str] = typer.Option(None, "--mean", metavar="M[,M,M]", help="Images: per-channel mean subtracted."),
    std: Optional[str] = typer.Option(None, "--std", metavar="S[,S,S]", help="Images: per-channel std divided by."),
    json_out: bool = JsonOption,
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
    debug: bool = DebugOption,
) -> None:
    """Re-estimate BatchNorm-family running statistics from data; write the checkpoint back in its layout.

    running_mean and running_var become the exact population statistics (float64, every sample weighted
    equally) of each norm's input over the data."""
    from normcli.errors import NormcliError

    size = parse_shape(resize, "--resize") if resize else None
    if size is not None and len(size) == 1:
        size = (size[0], size[0])
    if size is not None and len(size) != 2:
        raise NormcliError(f"--resize {resize!r} must be H,W or one size S")
    kwargs = parse_arch_kwargs(arch_kwargs)
    from normcli.recalibrate import FORWARD_MODES, recalibrate_file

    if forward not in FORWARD_MODES:
        raise NormcliError(f"--forward {forward!r} is not one of {', '.join(FORWARD_MODES)}")
    reporter = Reporter("recalibrate", quiet, verbose)
    started = _init_distributed()
    try:
        rank = _rank()
        progress = _Progress(reporter) if rank == 0 else None
        with reporter if rank == 0 else _nothing():
            if rank == 0:
                reporter.stage(f"loading {path} and {data}", log=False)
            report = recalibrate_file(path, data, output, arch=arch, arch_kwargs=kwargs, key=key, batches=batches,
                                      batch_size=batch_size, call=call, include=include or None,
                                      exclude=exclude or None, forward=forward, resize=size,
                                      mean=_floats(mean, "--mean"), std=_floats(std, "--std"), force=force,
                                      progress=progress)
        if progress is not None:
            progress.done(report)
        if rank == 0:
            if json_out:
                print_json(report_json(report), schema="recalibrate")
            else:
                render(report, reporter)
    finally:
        if started:
            _finish_distributed()


def _floats(text: Optional[str], option: str) -> Optional[list[float]]:
    from normcli.errors import NormcliError

    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise NormcliError(f"{option} {text!r} is not a list of numbers; e.g. {option} 0.485,0.456,0.406")
    return values


def _init_distributed() -> bool:
    """Join the process group torchrun describes in the environment; True when this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = os.environ.get("NORMCLI_DIST_BACKEND", "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return True


def _finish_distributed() -> None:
    import torch.distributed as dist

    try:
        # every rank done before any tears gloo down (a rank leaving early can abort its peer)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _Progress:
    """Batches and samples per second: on the reporter's live line in a terminal; without a terminal, a stage
    line when the first batch starts and a line every 30 seconds after (5 with --verbose)."""

    def __init__(self, reporter: Reporter):
        self.reporter = reporter
        self.last = 0.0
        self.running = False

    def __call__(self, batches: int, samples: int, seconds: float) -> None:
        now = time.monotonic()
        if not self.running:
            self.running = True
            self.last = now
            self.reporter.stage("running the data through the model")
        rate = samples / seconds if seconds > 0 else 0.0
        line = f"{batches} batches, {samples} samples, {rate:.1f} samples/s"
        self.reporter.update(line)
        # a log line every 30 s (5 s with --verbose) while the batches run
        if self.reporter.tty or self.reporter.quiet or now - self.last < (5.0 if self.reporter.verbose else 30.0):
            return
        self.last = now
        self.reporter._plain(f"[recalibrate {self.reporter.elapsed():.1f}s] {line}")

    def done(self, report) -> None:
        rate = report.samples / report.seconds if report.seconds > 0 else 0.0
        ranks = f" on {report.world_size} ranks" if report.world_size > 1 else ""
        self.reporter.note(f"recalibrated {len(report.layers)} norm layers from {report.batches} batches, "
                           f"{report.samples} samples{ranks} in {report.seconds:.1f} s ({rate:.1f} samples/s)")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def report_json(report) -> dict:
    doc = jsonable(report)
    return doc


def render(report, reporter=None) -> None:
    from rich.markup import escape

    from normcli.cli.common import safe_text

    from normcli.cli.tables import Column, print_table

    # when narrow, dropped first: var before, mean before, kind, var after, mean after; layer, mean shift and
    # var ratio stay
    columns = [Column("layer", 1, name=True), Column("kind", 6), Column("mean before", 7, "right", "mean0"),
               Column("mean after", 4, "right", "mean1"), Column("var before", 8, "right", "var0"),
               Column("var after", 5, "right", "var1"), Column("mean shift", 2, "right", "shift"),
               Column("var ratio", 3, "right", "ratio")]

    def rng(stats):
        return "-" if stats is None else f"{stats['min']:.3g}..{stats['max']:.3g}"

    rows = [[safe_text(layer.name), safe_text(layer.kind), rng(layer.before["running_mean"]),
             rng(layer.after["running_mean"]), rng(layer.before["running_var"]), rng(layer.after["running_var"]),
             f"{layer.mean_shift:.3g}", f"{layer.var_ratio['min']:.3g}..{layer.var_ratio['max']:.3g}"]
            for layer in report.layers]
    print_table(out_console, columns, rows, title="recalibrated norm layers",
                note_console=reporter.note if reporter else None)
    for s in report.skipped:
        out_console.print(f"[yellow]skipped[/] {escape(s['name'])}: {escape(s['reason'])}", soft_wrap=True)
    for label, findings in (("before", report.findings_before), ("after", report.findings_after)):
        counts = {}
        for f in findings:
            counts[f["severity"]] = counts.get(f["severity"], 0) + 1
        summary = ", ".join(f"{n} {sev}" for sev, n in counts.items()) or "none"
        out_console.print(f"inspect findings {label}: {summary}")
    for f in report.findings_after:
        if f["severity"] in ("error", "warning"):
            out_console.print(f"  {f['severity']} {f['code']}: {escape(f['message'])}", soft_wrap=True)
    change = report.eval_change
    out_console.print(f"samples {report.samples}, batches {report.batches}; eval output change on the held-out "
                      f"batch: max abs {change['max_abs']:.3g}, max rel {change['max_rel']:.3g}")
    for note in report.notes:
        out_console.print(f"note: {escape(note)}", style="dim", soft_wrap=True)
    out_console.print(f"wrote {escape(report.output)}" if report.output else "[red]nothing written[/]")
