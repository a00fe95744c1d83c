"""`normcli inspect PATH`: a table (or JSON) of every norm layer's statistics and what is wrong with them."""

from __future__ import annotations

import os

import math
from dataclasses import dataclass
from typing import List, Optional

import typer

from normcli.cli.common import (ArchKwargsOption, ArchOption, DebugOption, JsonOption, LimitOption,
                                UnsafeLoadOption, cell,
                                jsonable, out_console, parse_arch_kwargs, print_json)
from normcli.cli.output import QuietOption, Reporter, VerboseOption

SPARK = "▁▂▃▄▅▆▇█"


def inspect(
    paths: List[str] = typer.Argument(..., metavar="PATH...",
                                      help="Checkpoints (.pt/.pth/.ckpt/.safetensors/TorchScript/.pt2/.onnx), "
                                           "directories (searched recursively) or globs."),
    arch: Optional[str] = ArchOption,
    arch_kwargs: Optional[str] = ArchKwargsOption,
    layer: Optional[str] = typer.Option(None, "--layer", metavar="GLOB",
                                        help="Show per-channel values of the layers matching this glob."),
    json_out: bool = JsonOption,
    fail_on: str = typer.Option("error", "--fail-on", metavar="error|warning|never",
                                help="Exit 1 when findings reach this severity.", case_sensitive=False),
    unsafe_load: bool = UnsafeLoadOption,
    key: Optional[str] = typer.Option(None, "--key", help="Entry of a nested checkpoint that holds the weights "
                                      "(e.g. state_dict_ema); default: found automatically."),
    eps: float = typer.Option(1e-5, "--eps", help="Norm eps assumed where the file does not record it."),
    tiny_var_ratio: float = typer.Option(1.0, "--tiny-var-ratio",
                                         help="tiny-var flags channels with running_var < ratio * eps."),
    dead_weight: float = typer.Option(1e-8, "--dead-weight", help="dead-channels flags |weight| <= this."),
    fp16_max: float = typer.Option(65504.0, "--fp16-max",
                                   help="fp16-overflow flags folded scale or bias beyond this."),
    tiny_direction_ratio: float = typer.Option(
        1e-3, "--tiny-direction-ratio",
        help="tiny-direction flags weight-norm slices with ||v|| < ratio * the layer's median ||v|| (or 0)."),
    limit: Optional[List[str]] = LimitOption,
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", metavar="N",
                                       help="Worker processes for several files (default: the number of cores)."),
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
    debug: bool = DebugOption,
) -> None:
    """Show every norm layer's statistics and flag stale, non-finite, negative, tiny or overflowing values."""
    from normcli.discover import discover
    from normcli.errors import CheckFailed, NormcliError
    from normcli.inspection import Thresholds, fails, inspect_file, select_layers
    from normcli.limits import parse_limits

    fail_on = fail_on.lower()
    if fail_on not in ("error", "warning", "never"):
        raise NormcliError(f"--fail-on must be error, warning or never, not {fail_on!r}")
    reporter = Reporter("inspect", quiet, verbose, announce=False)
    thresholds = Thresholds(eps=eps, tiny_var_ratio=tiny_var_ratio, dead_weight=dead_weight, fp16_max=fp16_max,
                            tiny_direction_ratio=tiny_direction_ratio)
    targets = discover(paths, include_pickles=False)
    if len(paths) > 1 or len(targets) > 1 or os.path.normpath(targets[0].path) != os.path.normpath(paths[0]):
        if layer:
            raise NormcliError("--layer shows one file's channels; give a single file with it")
        job = _Job(arch, arch_kwargs, key, thresholds, unsafe_load, parse_limits(limit))
        return _inspect_many(targets, job, json_out, fail_on, jobs, reporter)
    path = paths[0]
    with reporter:
        reporter.stage(f"reading {path}")
        report = inspect_file(path, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs), key=key,
                              thresholds=thresholds, unsafe_load=unsafe_load, limits=parse_limits(limit))
        reporter.info(f"{len(report.layers)} norm layers in {report.format}")
    detail = select_layers(report.layers, layer) if layer else []
    if layer and not detail:
        names = ", ".join(x.name for x in report.layers[:5]) or "none found"
        raise NormcliError(f"--layer {layer!r} matches no norm layer in {path} (layers are named like {names})")
    if json_out:
        print_json(report_json(report, detail), schema="inspect")
    else:
        render(report, detail, reporter)
    if fails(report, fail_on):
        s = report.summary
        raise CheckFailed(f"{s['error']} error and {s['warning']} warning findings in {path} "
                          f"(--fail-on {fail_on})")


# ------------------------------------------------------------------------------------------- many files

@dataclass(frozen=True)
class _Job:
    """What every worker needs to inspect one file (picklable: it crosses to worker processes)."""

    arch: Optional[str]
    arch_kwargs: Optional[str]
    key: Optional[str]
    thresholds: object
    unsafe_load: bool
    limits: object = None

    def __call__(self, path: str) -> dict:
        from normcli.errors import NormcliError
        from normcli.inspection import inspect_file

        try:
            report = inspect_file(path, arch=self.arch, arch_kwargs=parse_arch_kwargs(self.arch_kwargs),
                                  key=self.key, thresholds=self.thresholds, unsafe_load=self.unsafe_load,
                                  limits=self.limits)
        except NormcliError as e:
            return {"path": path, "error": " ".join(str(e).split())}
        except Exception as e:  # one bad file must not hide the others' results
            return {"path": path, "error": f"unexpected {type(e).__name__}: {' '.join(str(e).split())}"}
        worst = report.worst_finding()
        return {"report": report_json(report, []), "worst": None if worst is None else
                {"code": worst.code, "severity": worst.severity}}


def _crashed(path: str, message: str) -> dict:
    return {"path": path, "error": message}


def _inspect_many(targets, job: _Job, json_out: bool, fail_on: str, jobs: Optional[int], reporter) -> int:
    """One row per file; exit 2 if any file could not be read (the run is incomplete), else 1 if any file's
    findings reach --fail-on, else 0."""
    import sys

    from normcli.discover import run_all
    from normcli.inspection import SEVERITIES

    with reporter:
        reporter.stage(f"reading {len(targets)} files")
        results = run_all(job, [t.path for t in targets], jobs, _crashed)
    reports = [r["report"] for r in results if "report" in r]
    errors = [r for r in results if "error" in r]
    failing = []
    for r in results:
        if "report" in r and fail_on != "never" and r["worst"] is not None and \
                SEVERITIES.index(r["worst"]["severity"]) <= SEVERITIES.index(fail_on):
            failing.append(r["report"]["path"])
    summary = {"files": len(results), "read": len(reports), "unreadable": len(errors),
               "failing": len(failing), "layers": sum(x["summary"]["layers"] for x in reports),
               **{s: sum(x["summary"][s] for x in reports) for s in SEVERITIES},
               "verdicts": {v: sum(1 for x in reports if (x.get("trust") or {}).get("verdict") == v)
                            for v in ("safe", "needs-classes", "unsafe")}}
    if json_out:
        print_json({"files": [r.get("report", {"path": r.get("path"), "error": r.get("error")}) for r in results],
                    "summary": summary}, schema="inspect")
    else:
        render_many(results, reporter)
        out_console.print(f"{summary['files']} files: {summary['read']} read, {summary['unreadable']} unreadable; "
                          f"{summary['error']} errors, {summary['warning']} warnings, {summary['info']} info "
                          f"in {summary['layers']} norm layers")
    if errors:
        print(f"error: {len(errors)} of {len(results)} files could not be read (first: {errors[0]['error']})", file=sys.stderr)
        return 2
    if failing:
        print(f"error: {len(failing)} of {len(results)} files have findings at or above --fail-on {fail_on} "
              f"(first: {failing[0]})", file=sys.stderr)
        return 1
    return 0


def render_many(results: list, reporter=None) -> None:
    """One row per file. Dropped first when narrow: format, layers, warnings, errors; file names are never
    cut in a pipe and shortened from the middle in a terminal."""
    from rich.text import Text

    from normcli.cli.tables import Column, print_table

    columns = [Column("file", 1, name=True), Column("format", 6), Column("layers", 5, "right"),
               Column("errors", 3, "right", short="err"), Column("warnings", 4, "right", short="warn"),
               Column("verdict", 2), Column("worst finding", 1, name=True, short="worst")]
    colour = {"error": "red", "warning": "yellow", "info": "cyan"}
    rows = []
    for r in results:
        if "error" in r:
            rows.append([_printable(r["path"]), "-", "-", "-", "-", Text("unreadable", style="yellow"),
                         Text(_printable(r["error"]), style="red")])
            continue
        x, worst = r["report"], r["worst"]
        s = x["summary"]
        verdict = (x.get("trust") or {}).get("verdict", "-")
        shown = Text("ok", style="green") if worst is None else Text(worst["code"], style=colour[worst["severity"]])
        rows.append([_printable(x["path"]), x["format"], str(s["layers"]), str(s["error"]), str(s["warning"]),
                     verdict, shown])
    print_table(out_console, columns, rows, note_console=reporter.note if reporter else None)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def report_json(report, detail: list) -> dict:
    """The contract's inspect schema, plus per-channel values for the layers picked with --layer."""
    picked = {id(x) for x in detail}
    layers = []
    for x in report.layers:
        entry = {"name": x.name, "kind": x.kind, "inferred": x.inferred, "num_features": x.num_features,
                 "num_batches_tracked": x.num_batches_tracked, "running_mean": x.running_mean,
                 "running_var": x.running_var, "weight": x.weight, "bias": x.bias, "eps": x.eps,
                 "findings": x.findings}
        if x.kind == "WeightNorm":  # weight is g; the per-slice norm of v and the dim g keeps
            entry.update({"direction_norm": x.direction_norm, "dim": x.norm_dim})
        if id(x) in picked:
            entry["channels"] = {k: v.tolist() for k, v in x.values.items()}
        layers.append(entry)
    return jsonable({"path": report.path, "format": report.format, "state_dict_key": report.state_dict_key,
                     "notes": report.notes, "layers": layers, "summary": report.summary,
                     "file_findings": [{"code": f.code, "severity": f.severity, "message": f.message}
                                       for f in report.file_findings],
                     "trust": report.trust})


# ------------------------------------------------------------------------------------------------ rendering

def _num(x: float) -> str:
    if x is None:
        return "-"
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        return f"{x:.3g}"
    return f"{x:.2e}"


def _range(stats) -> str:
    if stats is None:
        return "-"
    return f"{_num(stats.min)} … {_num(stats.max)}"


def sparkline(values, width: int = 16) -> str:
    """Per-channel values, one character per channel up to ``width`` characters, beyond that each character
    the mean of a bin of neighbouring channels (log scale for positive data); '!' marks NaN/Inf."""
    import numpy as np

    if values is None or values.size == 0 or width < 1:
        return ""
    groups = np.array_split(values, min(width, values.size))
    out = []
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return "!" * len(groups)
    positive = finite.min() > 0
    transform = np.log10 if positive else (lambda a: a)
    lo, hi = transform(finite.min()), transform(finite.max())
    for g in groups:
        if not np.isfinite(g).all():
            out.append("!")
            continue
        v = transform(g.mean()) if positive else g.mean()
        level = 0 if hi == lo else int(round((v - lo) / (hi - lo) * (len(SPARK) - 1)))
        out.append(SPARK[max(0, min(len(SPARK) - 1, level))])
    return "".join(out)


SEVERITY_COLOUR = {"error": "red", "warning": "yellow", "info": "cyan"}
# Columns of the layer table; when it does not fit, the highest priority number goes first:
# bias, weight, running_mean, tracked, var per channel, running_var, C, kind. layer and findings always stay.
LAYER_COLUMNS = (("layer", 1, "left", None), ("kind", 2, "left", None), ("C", 3, "right", None),
                 ("tracked", 6, "right", "trk"), ("running_mean", 7, "left", "mean"),
                 ("running_var", 4, "left", "var"), ("var per channel", 5, "left", "var/ch"),
                 ("weight", 8, "left", None), ("bias", 9, "left", None), ("findings", 1, "left", None))


def layer_table(report):
    """(columns, rows) of the per-layer table: every layer and all its findings' codes."""
    from rich.text import Text

    from normcli.cli.common import safe_text
    from normcli.cli.tables import Column

    layers = report.layers
    var = [x.values.get("running_var") for x in layers]
    columns = []
    for header, priority, justify, short in LAYER_COLUMNS:
        if header == "var per channel":
            columns.append(Column(header, priority, justify, short=short, min_width=8,
                                  want=lambda r: 0 if var[r] is None else int(var[r].size),
                                  render=lambda r, w: sparkline(var[r], w)))
        else:
            columns.append(Column(header, priority, justify, short=short, name=header == "layer"))
    rows = []
    for x in layers:
        codes = Text()
        for f in x.findings:
            if codes:
                codes.append(" ")
            codes.append(safe_text(f.code), style=SEVERITY_COLOUR[f.severity])
        kind = x.kind + ("?" if x.inferred else "")
        rows.append([safe_text(x.name or "(root)"), safe_text(kind), str(x.num_features),
                     "-" if x.num_batches_tracked is None else str(x.num_batches_tracked),
                     _range(x.running_mean), _range(x.running_var), None, _range(x.weight), _range(x.bias),
                     codes if codes else Text("ok", style="green")])
    return columns, rows


def group_findings(layers) -> list[tuple[str, str, list]]:
    """(severity, code, [(layer, finding), ...]) in order of first appearance, most severe first."""
    from normcli.inspection import SEVERITIES

    groups: dict[tuple[str, str], list] = {}
    for x in layers:
        for f in x.findings:
            groups.setdefault((f.severity, f.code), []).append((x, f))
    ordered = sorted(groups.items(), key=lambda item: SEVERITIES.index(item[0][0]))
    return [(sev, code, members) for (sev, code), members in ordered]


def render(report, detail: list, reporter=None) -> None:
    from rich.text import Text

    from normcli.cli.tables import output_width, print_table

    console = out_console
    pipe = not console.is_terminal  # a pipe gets each message on one line; a terminal wraps them at words
    verbose = bool(reporter and reporter.verbose)
    title = cell(f"{report.path}  [{report.format}" + (f", weights under {report.state_dict_key!r}"
                                                          if report.state_dict_key else "") + "]")
    columns, rows = layer_table(report)
    fitted = print_table(console, columns, rows, title=Text.from_markup(title),
                         note_console=reporter.note if reporter else None)
    spark = fitted.flex_width.get("var per channel")
    binned = [x for x in report.layers if spark and x.values.get("running_var") is not None
              and x.values["running_var"].size > spark]
    if binned:
        most = max(x.values["running_var"].size for x in binned)
        console.print(f"var per channel: one character per channel up to {spark}; {len(binned)} layer(s) with more "
                      f"channels are binned, each character the mean of up to {-(-most // spark)} channels",
                      soft_wrap=pipe)
    for x in report.layers:
        if x.kind == "WeightNorm":
            over = "all of v" if x.norm_dim is None else f"dim {x.norm_dim}"
            console.print(f"{cell(x.name or '(root)')}: weight norm over {over}; g (weight) {_range(x.weight)}, "
                          f"||v|| per slice {_range(x.direction_norm)}", soft_wrap=pipe)
    for x in detail:
        _render_channels(console, x, reporter)
    width = output_width(console)
    for severity, code, members in group_findings(report.layers):
        color = SEVERITY_COLOUR[severity]
        if len(members) == 1 or verbose:
            for x, f in members:
                console.print(f"[{color}]{severity:<7}[/] {cell(x.name)} [bold]{cell(f.code)}[/]: {cell(f.message)}",
                              soft_wrap=pipe)
            continue
        from normcli.cli.tables import join_names

        head = f"{severity:<7} {code} in {len(members)} layers: "
        names = join_names([x.name or "(root)" for x, _ in members], None if width is None else
                           max(20, width - len(head)))
        console.print(f"[{color}]{severity:<7}[/] [bold]{cell(code)}[/] in {len(members)} layers: {cell(names)}",
                      soft_wrap=pipe)
        first, f = members[0]
        console.print(f"        {cell(first.name or '(root)')}: {cell(f.message)}", soft_wrap=pipe)
    for f in report.file_findings:
        color = SEVERITY_COLOUR[f.severity]
        console.print(f"[{color}]{f.severity:<7}[/] (file) [bold]{cell(f.code)}[/]: {cell(f.message)}", soft_wrap=pipe)
    if report.trust:
        console.print(f"trust: {report.trust['verdict']}", style="dim")
    s = report.summary
    kinds = ", ".join(f"{k} {n}" for k, n in s["kinds"].items()) or "none"
    for note in report.notes:
        console.print(f"note: {cell(note)}", style="dim")
    grouped = any(len(m) > 1 for _, _, m in group_findings(report.layers)) and not verbose
    console.print(f"{s['layers']} norm layers ({kinds}); {s['error']} errors, {s['warning']} warnings, "
                  f"{s['info']} info" + ("; '?' marks kinds inferred from buffer names" if any(
                      x.inferred for x in report.layers) else "")
                  + ("; repeated findings grouped (-v lists each)" if grouped else ""), soft_wrap=pipe)


def _render_channels(console, x, reporter=None) -> None:
    """One row per channel of a --layer match. When narrow, dropped first: direction_norm, bias, weight,
    running_mean, scale; ch, running_var and flags stay."""
    import numpy as np

    from normcli.cli.common import safe_text
    from normcli.cli.tables import Column, print_table

    cols = [k for k in ("running_mean", "running_var", "weight", "bias", "direction_norm") if k in x.values]
    priority = {"running_mean": 5, "running_var": 1, "weight": 6, "bias": 7, "direction_norm": 8}
    short = {"running_mean": "mean", "running_var": "var", "direction_norm": "||v||"}
    columns = [Column("ch", 1, "right"), *[Column(k, priority[k], "right", short=short.get(k)) for k in cols],
               Column("scale", 4, "right"), Column("flags", 1, name=True)]
    eps = x.eps if x.eps is not None else 1e-5
    var = x.values.get("running_var")
    weight = x.values.get("weight")
    with np.errstate(all="ignore"):
        scale = None if var is None else (weight if weight is not None else 1.0) / np.sqrt(var + eps)
    flags: dict[int, list[str]] = {}
    for f in x.findings:
        for c in f.channels:
            flags.setdefault(c, []).append(f.code)
    rows = []
    for c in range(x.num_features):
        row = [str(c)] + [_num(float(x.values[k][c])) for k in cols]
        row.append("-" if scale is None else _num(float(np.broadcast_to(scale, (x.num_features,))[c])))
        row.append(safe_text(" ".join(flags.get(c, []))))
        rows.append(row)
    print_table(console, columns, rows, title=safe_text(f"{x.name} ({x.kind}, {x.num_features} channels)"),
                note_console=reporter.note if reporter else None)
