"""`normcli parity MODEL.onnx --inputs F.npz --expected F.npz`: check an ONNX file against golden outputs.

For deployment pipelines: no torch import, the same metrics and exit codes as fuse-export's check.
"""

from __future__ import annotations

from typing import Optional

import typer

from normcli.cli.common import (CheckErrorStatOption, DebugOption, ErrorQuantileOption, JsonOption, ProviderOption,
                                out_console, parse_check_stat, print_json, safe_text)
from normcli.cli.output import QuietOption, Reporter, VerboseOption

# the library defaults (normcli.parity), repeated so that --help shows them without importing numpy
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3


def parity(
    model: str = typer.Argument(..., metavar="MODEL.onnx", help="ONNX model to run in onnxruntime."),
    inputs: str = typer.Option(..., "--inputs", metavar="F.npz",
                               help="Inputs keyed by the model's input names (name, or name:0, name:1, ... for "
                                    "several samples), e.g. from fuse-export --save-inputs."),
    expected: str = typer.Option(..., "--expected", metavar="F.npz",
                                 help="Expected outputs keyed by the model's output names, e.g. from fuse-export "
                                      "--save-outputs."),
    atol: float = typer.Option(DEFAULT_ATOL, "--atol", metavar="X", help="Absolute tolerance."),
    rtol: float = typer.Option(DEFAULT_RTOL, "--rtol", metavar="X",
                               help="Relative tolerance: an element fails when |onnx-expected| > atol + "
                                    "rtol*|expected|."),
    check_error_stat: Optional[str] = CheckErrorStatOption,
    error_quantile: float = ErrorQuantileOption,
    provider: Optional[str] = ProviderOption,
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
    debug: bool = DebugOption,
) -> None:
    """Check an ONNX model against stored inputs and expected outputs in onnxruntime (no torch needed)."""
    from normcli.errors import CheckFailed
    from normcli.formats import check_readable
    from normcli.golden import check_golden

    stat = parse_check_stat(check_error_stat, error_quantile)
    check_readable(model)
    with Reporter("parity", quiet, verbose, announce=False) as reporter:
        reporter.stage(f"running {model} in onnxruntime")
        result = check_golden(model, inputs, expected, atol=atol, rtol=rtol, check_stat=stat,
                              quantile=error_quantile, provider=provider)
    if json_out:
        print_json({"model": result.model, "passed": result.passed, "atol": result.atol, "rtol": result.rtol,
                    "samples": result.samples, "provider": result.provider, "check_error_stat": result.check_stat,
                    "outputs": result.outputs}, schema="parity")
    else:
        render(result, reporter)
    if not result.passed:
        failed = [o.name for o in result.outputs if not o.passed]
        raise CheckFailed(f"parity failed on {', '.join(failed)}: {model} differs from {expected} beyond "
                          f"atol={atol:g}, rtol={rtol:g}" + (f" ({stat} error)" if stat else ""))


def render(result, reporter=None) -> None:
    out_console.print(f"{result.model}: {result.samples} sample(s) on {result.provider}, atol {result.atol:g}, "
                      f"rtol {result.rtol:g}" + (f", checking the {result.check_stat} error" if result.check_stat
                                                 else ", every element"), markup=False, soft_wrap=True)
    print_metrics_table(result.outputs, note=reporter.note if reporter else None)


# When narrow, dropped first: median abs, p99 abs, mean abs, need rtol, cosine, top-1, max rel, need atol;
# output, max abs and result always stay.
METRIC_COLUMNS = (("output", 1, "left", None), ("max abs", 1, "right", None), ("max rel", 3, "right", None),
                  ("mean abs", 7, "right", None), ("median abs", 9, "right", "median"),
                  ("p99 abs", 8, "right", "p99"), ("cosine", 5, "right", "cos"),
                  ("need atol", 2, "right", "atol?"), ("need rtol", 6, "right", "rtol?"),
                  ("top-1", 4, "right", None), ("result", 1, "left", None))


def metrics_rows(outputs) -> list[list[str]]:
    rows = []
    for o in outputs:
        verdict = "ok" if o.passed else (o.problem or f"FAIL ({o.mismatched}/{o.elements})")
        rows.append([safe_text(o.name), _e(o.max_abs), _e(o.max_rel), _e(o.mean_abs), _e(o.median_abs),
                     _e(o.p99_abs), _f(o.cosine), _e(o.required_atol), _e(o.required_rtol),
                     "-" if o.top1_agreement is None else f"{o.top1_agreement:.3f}", safe_text(verdict)])
    return rows


def print_metrics_table(outputs, console=None, note=None) -> None:
    """One row per output: the errors, the tolerance that would have passed, agreement, the verdict; fitted to
    the width (output names never cut in a pipe)."""
    from normcli.cli.tables import Column, print_table

    columns = [Column(h, p, j, short=s, name=h in ("output", "result")) for h, p, j, s in METRIC_COLUMNS]
    print_table(console or out_console, columns, metrics_rows(outputs), note_console=note)


def metrics_table(outputs) -> str:
    """The metrics table as plain text at full width (every column)."""
    rows = [[h for h, *_ in METRIC_COLUMNS], *metrics_rows(outputs)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                     for r in rows)


def _e(x: float) -> str:
    return "nan" if x != x else f"{x:.2e}"


def _f(x: float) -> str:
    return "nan" if x != x else f"{x:.6f}"
