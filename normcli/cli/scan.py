"""`normcli scan PATH...`: the trust verdict of every checkpoint, fast, without importing torch."""

from __future__ import annotations


from typing import List, Optional

import typer

from normcli.cli.common import DebugOption, LimitOption, out_console
from normcli.cli.output import QuietOption, Reporter, VerboseOption

FORMATS = ("table", "json", "sarif")
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
# what each non-safe verdict means, as a SARIF rule (ids are the finding codes inspect uses)
RULES = {
    "unsafe-globals": ("error", "The file's pickles name callables that run code when it is loaded with "
                                "torch.load(weights_only=False) or pickle; do not load it."),
    "needs-classes": ("note", "Loading the file imports and constructs the classes it names (a full model "
                              "pickle or TorchScript archive); load it only if you trust their code."),
    "unreadable": ("error", "The file could not be judged: it is not a checkpoint, or it is damaged or "
                            "built so that two readers could see different contents."),
}


def scan(
    paths: List[str] = typer.Argument(..., metavar="PATH...",
                                      help="Checkpoint files, directories (searched recursively) or globs."),
    json_out: bool = typer.Option(False, "--json", help="Same as --format json."),
    fmt: Optional[str] = typer.Option(None, "--format", metavar="table|json|sarif",
                                      help="Output: a table (default), the JSON list, or a SARIF 2.1.0 log."),
    strict: bool = typer.Option(False, "--strict", help="Fail (exit 1) on needs-classes too, not only unsafe."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", metavar="N",
                                       help="Worker processes (default: the number of cores)."),
    limit: Optional[List[str]] = LimitOption,
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
    debug: bool = DebugOption,
) -> int:
    """Say for every file whether loading it could run code: safe, needs-classes, unsafe or unreadable."""
    from normcli.discover import discover, run_all
    from normcli.errors import NormcliError

    if fmt is not None:
        fmt = fmt.lower()
        if fmt not in FORMATS:
            raise NormcliError(f"--format must be table, json or sarif, not {fmt!r}")
        if json_out and fmt != "json":
            raise NormcliError(f"--json and --format {fmt} contradict each other; give one")
    fmt = fmt or ("json" if json_out else "table")
    from normcli.limits import parse_limits

    limits = parse_limits(limit)
    reporter = Reporter("scan", quiet, verbose, announce=False)
    targets = discover(paths, include_pickles=True)
    with reporter:
        reporter.stage(f"judging {len(targets)} file(s)")
        results = run_all(_Assess(limits), [t.path for t in targets], jobs, _crashed)
    if fmt == "json":
        from normcli.cli.common import print_json

        print_json([r.as_json() for r in results], schema="scan")
    elif fmt == "sarif":
        import json
        import sys

        from normcli.cli.common import jsonable

        # SARIF has its own (OASIS) schema; tests/test_scan.py checks the log against its required parts
        sys.stdout.write(json.dumps(jsonable(sarif_log(results)), indent=2) + "\n")
    else:
        render(results, reporter)
    return exit_code(results, strict)


class _Assess:
    """The verdict on one path under the given limits (picklable: it crosses to worker processes)."""

    def __init__(self, limits):
        self.limits = limits

    def __call__(self, path: str):
        from normcli.trust import assess_path

        return assess_path(path, limits=self.limits)


def _crashed(path: str, message: str):
    from normcli.trust import ScanResult

    return ScanResult(path, None, "unreadable", [], message)


def exit_code(results, strict: bool) -> int:
    """0 all safe (or needs-classes without --strict), 1 any unsafe (or needs-classes with --strict),
    2 any unreadable: a file that was not judged makes the run inconclusive, whatever the others say."""
    import sys

    verdicts = [r.verdict for r in results]
    unreadable = verdicts.count("unreadable")
    unsafe = verdicts.count("unsafe")
    classes = verdicts.count("needs-classes")
    if unreadable:
        print(f"error: {unreadable} of {len(results)} files could not be judged (see their reason); "
              "fix or remove them and scan again", file=sys.stderr)
        return 2
    if unsafe or (strict and classes):
        what = f"{unsafe} unsafe" + (f", {classes} needing classes (--strict)" if strict and classes else "")
        print(f"error: {what} of {len(results)} files; do not load them with torch.load(weights_only=False)",
              file=sys.stderr)
        return 1
    return 0


def _finding(result) -> tuple[str, str] | None:
    """(rule id, message) of a non-safe row."""
    from normcli.trust import describe_globals

    if result.verdict == "unsafe":
        return "unsafe-globals", "names callables that run code when loaded: " + describe_globals(result, "code")
    if result.verdict == "needs-classes":
        return "needs-classes", "loading imports and constructs the classes " + describe_globals(result, "class")
    if result.verdict == "unreadable":
        return "unreadable", f"could not be judged: {result.reason}"
    return None


def sarif_log(results) -> dict:
    """A SARIF 2.1.0 log: one result per file that is not safe, rule ids from the finding codes."""
    from pathlib import Path

    from normcli._version import __version__

    rule_ids = list(RULES)
    sarif_results = []
    for r in results:
        found = _finding(r)
        if found is None:
            continue
        rule, message = found
        uri = Path(r.path).as_posix()
        sarif_results.append({
            "ruleId": rule, "ruleIndex": rule_ids.index(rule), "level": RULES[rule][0],
            "message": {"text": f"{r.path}: {message}"},
            "locations": [{"physicalLocation": {"artifactLocation": {"uri": uri}}}],
            "properties": {"verdict": r.verdict, "format": r.format,
                           "globals": [{"name": g.name, "kind": g.kind} for g in r.globals]},
        })
    return {
        "$schema": SARIF_SCHEMA, "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "normcli", "version": __version__, "informationUri": "https://pypi.org/project/normcli/",
                "rules": [{"id": rid, "name": rid.replace("-", " "), "shortDescription": {"text": text},
                           "defaultConfiguration": {"level": level}} for rid, (level, text) in RULES.items()],
            }},
            "results": sarif_results,
        }],
    }


def render(results, reporter=None) -> None:
    """One row per file. When narrow, format goes first, then why; file names and reasons are never cut in a
    pipe and shortened from the middle in a terminal."""
    from rich.text import Text

    from normcli.cli.tables import Column, print_table
    from normcli.trust import describe_globals

    colour = {"safe": "green", "needs-classes": "cyan", "unsafe": "red", "unreadable": "yellow"}
    columns = [Column("file", 1, name=True), Column("format", 3), Column("verdict", 1),
               Column("why", 2, name=True)]
    rows = []
    for r in results:
        if r.verdict == "unsafe":
            why = "runs code: " + describe_globals(r, "code")
        elif r.verdict == "needs-classes":
            why = "imports classes: " + describe_globals(r, "class")
        elif r.verdict == "unreadable":
            why = r.reason or ""
        else:
            why = "only tensors and plain containers"
        rows.append([_printable(r.path), r.format or "-", Text(r.verdict, style=colour[r.verdict]), _printable(why)])
    print_table(out_console, columns, rows, note_console=reporter.note if reporter else None)
    counts = {v: sum(1 for r in results if r.verdict == v) for v in colour}
    out_console.print(", ".join(f"{n} {v}" for v, n in counts.items() if n) + f" ({len(results)} files)")


def _printable(text: str) -> str:
    """Names come from files: show control characters escaped, never raw on the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
