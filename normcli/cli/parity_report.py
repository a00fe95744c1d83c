"""How fuse-export shows its parity check: the per-output metrics table, the first diverging module, the layers
that lose precision, the golden files; and the same as JSON."""

from __future__ import annotations

from normcli.cli.common import cell, jsonable

# the metrics of one output that the contract names, in its order; the rest of OutputMetrics follows them
OUTPUT_KEYS = ("name", "max_abs", "max_rel", "mean_abs", "median_abs", "p99_abs", "cosine", "required_atol",
               "required_rtol", "top1_agreement", "top5_agreement")
INTERMEDIATES_SHOWN = 12   # rows of the per-module table in the terminal (JSON has them all)


def parity_json(report) -> dict:
    """fuse-export's ``parity`` object."""
    parity, diagnosis = report.parity, report.diagnosis
    outputs = []
    for o in parity.outputs:
        entry = jsonable(o)
        outputs.append({**{k: entry[k] for k in OUTPUT_KEYS}, **{k: v for k, v in entry.items() if k not in OUTPUT_KEYS}})
    first = None
    if diagnosis is not None and diagnosis.first is not None:
        f = diagnosis.first
        first = {"module": f["module"], "max_abs": f["max_abs"], "max_rel": f["max_rel"], "call": f["call"],
                 "onnx_value": f["onnx_value"], "mean_abs": f["mean_abs"], "rel_rms": f["rel_rms"]}
    return jsonable({
        "passed": parity.passed, "atol": parity.atol, "rtol": parity.rtol, "samples": parity.samples,
        "check_error_stat": parity.check_stat,
        "error_quantile": parity.quantile if parity.check_stat == "quantile" else None,
        "provider": parity.provider, "precision": report.precision,
        "outputs": outputs,
        "first_divergence": first,
        "intermediates": diagnosis.modules if diagnosis is not None else None,
        "intermediates_reason": diagnosis.reason if diagnosis is not None else None,
        "unmatched_modules": diagnosis.unmatched if diagnosis is not None else None,
        "intermediates_error": diagnosis.error if diagnosis is not None else None,
        "precision_losses": diagnosis.precision_losses if diagnosis is not None else [],
        "saved_inputs": report.saved_inputs, "saved_outputs": report.saved_outputs,
    })


def _num(x) -> str:
    if x is None:
        return "-"
    if x != x or x in (float("inf"), float("-inf")):
        return str(x)
    return "0" if x == 0 else f"{x:.2e}"


def _share(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _cos(x) -> str:
    return "nan" if x != x else f"{x:.6f}"


# When narrow, dropped first: top-5, median abs, p99 abs, mean abs, need rtol, cosine, top-1, max rel,
# mismatched, need atol; output, max abs and the verdict stay.
PARITY_COLUMNS = (("output", 1, None), ("max abs", 1, None), ("max rel", 3, None), ("mean abs", 7, None),
                  ("median abs", 9, "median"), ("p99 abs", 8, "p99"), ("cosine", 5, "cos"), ("need atol", 2, "atol?"),
                  ("need rtol", 6, "rtol?"), ("top-1", 4, None), ("top-5", 10, None), ("mismatched", 3, "bad"),
                  ("", 1, None))


def render_parity(console, report, note=None) -> None:
    """The parity lines and the per-output table, fitted to the width (``note``: where to say which columns
    were left out)."""
    from rich.text import Text

    from normcli.cli.common import safe_text
    from normcli.cli.tables import Column, print_table

    parity = report.parity
    rule = {None: "every element", "quantile": f"the {parity.quantile:g} quantile of the errors"}.get(
        parity.check_stat, f"the {parity.check_stat} error")
    console.print(f"parity in onnxruntime ({cell(parity.provider)}), {report.precision} export, original torch "
                  f"model as reference: {parity.samples} samples, atol {parity.atol:g}, rtol {parity.rtol:g}, "
                  f"checking {rule}", soft_wrap=True)
    if report.reference != "the original model":
        console.print(f"reference: {cell(report.reference)}", soft_wrap=True)
    if len(report.checked_shapes) > 1:
        shapes = " and ".join(" ".join(",".join(map(str, s)) for s in config) for config in report.checked_shapes)
        symbolic = "; ".join(f"input {i}: {', '.join(map(str, dims))}" for i, dims in enumerate(report.dynamic_dims)
                             if dims)
        console.print(f"checked at {shapes}" + (f"; symbolic dims {symbolic}" if symbolic else ""), soft_wrap=True)
    rows = []
    for o in parity.outputs:
        verdict = Text("ok", style="green") if o.passed else \
            Text.assemble(("FAIL", "red"), " " + safe_text(o.problem or ""))
        rows.append([safe_text(o.name), _num(o.max_abs), _num(o.max_rel), _num(o.mean_abs), _num(o.median_abs),
                     _num(o.p99_abs), _cos(o.cosine), _num(o.required_atol), _num(o.required_rtol),
                     _share(o.top1_agreement), _share(o.top5_agreement), f"{o.mismatched}/{o.elements}", verdict])
    print_table(console, [Column(h, p, "left" if h in ("output", "") else "right", short=short, name=h in ("output", ""))
                          for h, p, short in PARITY_COLUMNS], rows, note_console=note)


def render_diagnosis(console, report, note=None) -> None:
    """The first diverging module, the per-module errors, the layers that lose precision."""
    from rich.text import Text

    from normcli.cli.common import safe_text
    from normcli.cli.tables import Column, print_table

    d = report.diagnosis
    if d is None:
        return
    if d.error:
        console.print(f"[yellow]could not compare the intermediate values[/] ({cell(d.reason)}): {cell(d.error)}",
                      soft_wrap=True)
        return
    console.print(f"intermediate values ({cell(d.reason)}): {len(d.modules)} module call(s) matched, "
                  f"{len(d.unmatched)} without an ONNX value of their shape", soft_wrap=True)
    if d.first is not None:
        f = d.first
        call = f" (call {f['call'] + 1})" if f["call"] else ""
        console.print(f"[red]first diverging module[/]: {cell(f['module'])}{call}, max abs {_num(f['max_abs'])}, "
                      f"max rel {_num(f['max_rel'])} (ONNX value {cell(f['onnx_value'])})", soft_wrap=True)
    elif d.modules and all(m["finite"] for m in d.modules):
        console.print("[green]every matched module agrees[/] within the tolerances", soft_wrap=True)
    rows = d.modules
    if d.first is not None:  # the rows around the culprit say the most
        at = next((i for i, m in enumerate(rows) if (m["module"], m["call"]) == (d.first["module"], d.first["call"])), 0)
        rows = rows[max(0, at - INTERMEDIATES_SHOWN // 2):][:INTERMEDIATES_SHOWN]
    else:
        rows = rows[-INTERMEDIATES_SHOWN:]
    if rows and (report.diagnosis.reason != "--precision fp16" or d.first is not None):
        body = []
        for m in rows:
            call = f" (call {m['call'] + 1})" if m["call"] else ""
            body.append([safe_text(m["module"] + call), _num(m["max_abs"]), _num(m["max_rel"]), _num(m["rel_rms"]),
                         Text("non-finite torch output", style="yellow") if not m["finite"] else
                         Text("ok", style="green") if m["passed"] else Text("out of tolerance", style="red")])
        print_table(console, [Column("module", 1, name=True), Column("max abs", 1, "right"),
                              Column("max rel", 2, "right"), Column("rel rms", 3, "right"), Column("", 1)],
                    body, note_console=note)
        if len(rows) < len(d.modules):
            console.print(f"({len(d.modules) - len(rows)} more in --json)", style="dim")
    if d.precision_losses:
        names = ", ".join(f"{cell(m['module'])} (+{m['added_rel_rms']:.2e})" for m in d.precision_losses)
        console.print(f"layers losing the most precision in float16 (relative RMS error added): {names}",
                      soft_wrap=True)


def render_golden(console, report) -> None:
    for what, path in (("inputs", report.saved_inputs), ("torch outputs", report.saved_outputs)):
        if path:
            console.print(f"wrote the {what} to {cell(path)} (normcli parity --inputs/--expected)", soft_wrap=True)
