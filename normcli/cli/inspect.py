"""`normcli inspect PATH`: a table (or JSON) of every norm layer's statistics and what is wrong with them."""

from __future__ import annotations

import math
from typing import Optional

import typer

from normcli.cli.common import (ArchKwargsOption, ArchOption, DebugOption, JsonOption, UnsafeLoadOption, cell,
                                jsonable, out_console, parse_arch_kwargs, print_json)

SPARK = "▁▂▃▄▅▆▇█"


def inspect(
    path: str = typer.Argument(..., help="Checkpoint to read (.pt/.pth/.ckpt/.safetensors/TorchScript/.pt2/.onnx)."),
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
    debug: bool = DebugOption,
) -> None:
    """Show every norm layer's statistics and flag stale, non-finite, negative, tiny or overflowing values."""
    from normcli.errors import CheckFailed, NormcliError
    from normcli.inspection import Thresholds, fails, inspect_file, select_layers

    fail_on = fail_on.lower()
    if fail_on not in ("error", "warning", "never"):
        raise NormcliError(f"--fail-on must be error, warning or never, not {fail_on!r}")
    thresholds = Thresholds(eps=eps, tiny_var_ratio=tiny_var_ratio, dead_weight=dead_weight, fp16_max=fp16_max,
                            tiny_direction_ratio=tiny_direction_ratio)
    report = inspect_file(path, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs), key=key,
                          thresholds=thresholds, unsafe_load=unsafe_load)
    detail = select_layers(report.layers, layer) if layer else []
    if layer and not detail:
        names = ", ".join(x.name for x in report.layers[:5]) or "none found"
        raise NormcliError(f"--layer {layer!r} matches no norm layer in {path} (layers are named like {names})")
    if json_out:
        print_json(report_json(report, detail), schema="inspect")
    else:
        render(report, detail)
    if fails(report, fail_on):
        s = report.summary
        raise CheckFailed(f"{s['error']} error and {s['warning']} warning findings in {path} "
                          f"(--fail-on {fail_on})")


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
                                       for f in report.file_findings]})


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
    """Per-channel values as a bar per group of channels (log scale for positive data); '!' marks NaN/Inf."""
    import numpy as np

    if values is None or values.size == 0:
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


def render(report, detail: list) -> None:
    from rich.table import Table

    console = out_console
    title = cell(f"{report.path}  [{report.format}" + (f", weights under {report.state_dict_key!r}"
                                                          if report.state_dict_key else "") + "]")
    table = Table(title=title, title_justify="left", header_style="bold", pad_edge=False, box=None)
    for col, kw in (("layer", {}), ("kind", {}), ("C", {"justify": "right"}), ("tracked", {"justify": "right"}),
                    ("running_mean", {}), ("running_var", {}), ("var per channel", {}), ("weight", {}),
                    ("bias", {}), ("findings", {})):
        table.add_column(col, **kw)
    for x in report.layers:
        codes = []
        for f in x.findings:
            color = {"error": "red", "warning": "yellow", "info": "cyan"}[f.severity]
            codes.append(f"[{color}]{cell(f.code)}[/]")
        kind = x.kind + ("?" if x.inferred else "")
        table.add_row(cell(x.name or "(root)"), cell(kind), str(x.num_features),
                      "-" if x.num_batches_tracked is None else str(x.num_batches_tracked),
                      _range(x.running_mean), _range(x.running_var),
                      sparkline(x.values.get("running_var")), _range(x.weight), _range(x.bias),
                      " ".join(codes) or "[green]ok[/]")
    console.print(table)
    for x in report.layers:
        if x.kind == "WeightNorm":
            over = "all of v" if x.norm_dim is None else f"dim {x.norm_dim}"
            console.print(f"{escape(x.name or '(root)')}: weight norm over {over}; g (weight) {_range(x.weight)}, "
                          f"||v|| per slice {_range(x.direction_norm)}", soft_wrap=True)
    for x in detail:
        _render_channels(console, x)
    findings = [(x, f) for x in report.layers for f in x.findings]
    for x, f in findings:
        color = {"error": "red", "warning": "yellow", "info": "cyan"}[f.severity]
        console.print(f"[{color}]{f.severity:<7}[/] {cell(x.name)} [bold]{cell(f.code)}[/]: {cell(f.message)}",
                      soft_wrap=True)
    for f in report.file_findings:
        color = {"error": "red", "warning": "yellow", "info": "cyan"}[f.severity]
        console.print(f"[{color}]{f.severity:<7}[/] (file) [bold]{cell(f.code)}[/]: {cell(f.message)}", soft_wrap=True)
    s = report.summary
    kinds = ", ".join(f"{k} {n}" for k, n in s["kinds"].items()) or "none"
    for note in report.notes:
        console.print(f"note: {cell(note)}", style="dim")
    console.print(f"{s['layers']} norm layers ({kinds}); {s['error']} errors, {s['warning']} warnings, "
                  f"{s['info']} info" + ("; '?' marks kinds inferred from buffer names" if any(
                      x.inferred for x in report.layers) else ""))


def _render_channels(console, x) -> None:
    import numpy as np
    from rich.table import Table

    table = Table(title=cell(f"{x.name} ({x.kind}, {x.num_features} channels)"), title_justify="left",
                  header_style="bold", box=None, pad_edge=False)
    cols = [k for k in ("running_mean", "running_var", "weight", "bias", "direction_norm") if k in x.values]
    for col in ["ch", *cols, "scale", "flags"]:
        table.add_column(col, justify="right" if col != "flags" else "left")
    eps = x.eps if x.eps is not None else 1e-5
    var = x.values.get("running_var")
    weight = x.values.get("weight")
    with np.errstate(all="ignore"):
        scale = None if var is None else (weight if weight is not None else 1.0) / np.sqrt(var + eps)
    flags: dict[int, list[str]] = {}
    for f in x.findings:
        for c in f.channels:
            flags.setdefault(c, []).append(f.code)
    for c in range(x.num_features):
        row = [str(c)] + [_num(float(x.values[k][c])) for k in cols]
        row.append("-" if scale is None else _num(float(np.broadcast_to(scale, (x.num_features,))[c])))
        row.append(cell(" ".join(flags.get(c, []))))
        table.add_row(*row)
    console.print(table)
