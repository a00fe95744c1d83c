"""The JSON Schemas shipped in the package: valid schemas, installed with normcli, and strict enough to catch
an output that drifts from the contract."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest

from normcli.schemas import COMMANDS, schema, schema_path, validate


@pytest.mark.parametrize("command", COMMANDS)
def test_every_schema_is_a_valid_draft_2020_12_schema(command):
    jsonschema.Draft202012Validator.check_schema(schema(command))
    assert schema_path(command).is_file()


def test_schemas_are_found_through_the_installed_package():
    code = "import normcli.schemas as s; print(all(s.schema_path(c).is_file() for c in s.COMMANDS))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True"


def test_real_inspect_output_validates_and_a_drifted_one_does_not(run_normcli, samples):
    done = run_normcli("inspect", samples / "resnet_tiny.pt", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    validate("inspect", report)

    broken = json.loads(done.stdout)
    broken["layers"][0]["running_var"]["min"] = "NaN"  # NaN/Inf are spelled "nan", "inf", "-inf"
    with pytest.raises(ValueError, match=r"layers/0/running_var"):
        validate("inspect", broken)
    broken = json.loads(done.stdout)
    del broken["layers"][2]["findings"]
    with pytest.raises(ValueError, match=r"layers/2"):
        validate("inspect", broken)
    broken = json.loads(done.stdout)
    broken["layers"][0]["findings"] = [{"code": "tiny-var", "severity": "bad", "message": "", "channels": []}]
    with pytest.raises(ValueError, match="severity"):
        validate("inspect", broken)


def test_inspect_always_gives_the_verdict_and_file_findings(run_normcli, samples):
    """trust and file_findings are in every inspect report (one file, and each file of several): the schema
    requires them, so a report without them is refused."""
    done = run_normcli("inspect", samples / "resnet_tiny.pt", "--json")
    report = json.loads(done.stdout)
    assert report["trust"]["verdict"] == "safe" and report["file_findings"] == []
    for key in ("trust", "file_findings", "notes", "state_dict_key"):
        broken = json.loads(done.stdout)
        del broken[key]
        with pytest.raises(ValueError, match=key):
            validate("inspect", broken)
    many = run_normcli("inspect", samples / "resnet_tiny.pt", samples / "resnet_tiny_full.pt", "--json", "--jobs", "1")
    doc = json.loads(many.stdout)
    validate("inspect", doc)
    assert all("trust" in f and "file_findings" in f for f in doc["files"])
    assert doc["summary"]["verdicts"] == {"safe": 1, "needs-classes": 1, "unsafe": 0}
    broken = json.loads(many.stdout)
    del broken["files"][1]["trust"]
    with pytest.raises(ValueError):
        validate("inspect", broken)


def test_the_cli_refuses_to_print_json_that_breaks_its_schema(cli, samples, monkeypatch):
    """NORMCLI_VALIDATE_JSON (set for the whole suite) makes a drifted report an error instead of output."""
    import normcli.cli.inspect as inspect_cli

    original = inspect_cli.report_json

    def drifted(*args, **kwargs):
        report = original(*args, **kwargs)
        report["summary"]["error"] = -1
        return report

    monkeypatch.setattr(inspect_cli, "report_json", drifted)
    code, out, err = cli("inspect", samples / "resnet_tiny.pt", "--json")
    assert code == 2 and out == ""
    assert "breaks its schema at summary/error" in err


def test_every_json_printing_command_names_its_schema():
    """print_json needs the schema name, so no command's --json output escapes validation."""
    import ast
    from pathlib import Path

    import normcli.cli

    calls = []
    for path in Path(normcli.cli.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print_json":
                schema_arg = next((k.value for k in node.keywords if k.arg == "schema"), None)
                assert isinstance(schema_arg, ast.Constant) and schema_arg.value in COMMANDS, path.name
                calls.append(schema_arg.value)
    assert {"inspect", "swap", "fuse-export"} <= set(calls)
