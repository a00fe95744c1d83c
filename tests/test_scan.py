"""`normcli scan` and multi-file `normcli inspect` through the installed command: verdicts, exit codes, JSON,
SARIF, discovery by content, and no torch import."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.hostile_payloads import Reduce, nested_checkpoint

# Installed before anything else by a sitecustomize: any attempt to import torch (or numpy) fails loudly.
NO_TORCH = """
import sys
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'numpy'):
            raise ImportError('scan imported ' + name)
        return None
sys.meta_path.insert(0, _Refuse())
"""


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "marker"
    path = nested_checkpoint(tmp_path / "evil.ckpt", Reduce(os.system, (f"touch '{marker}'",)))
    return path, marker


def _no_torch_env(tmp_path: Path) -> dict:
    site = tmp_path / "no_torch_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_TORCH)
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_scan_imports_neither_torch_nor_numpy(run_normcli, samples, tmp_path, evil):
    env = _no_torch_env(tmp_path)
    # the guard works: inspect of a pickle does import numpy, and fails under it
    guarded = run_normcli("inspect", samples / "resnet_tiny.pt", env=env)
    assert guarded.returncode == 2 and "scan imported" in guarded.stderr
    proc = run_normcli("scan", "--json", samples, evil[0], "--jobs", "1", env=env)
    assert "scan imported" not in proc.stderr, proc.stderr
    rows = {Path(r["path"]).name: r for r in json.loads(proc.stdout)}
    assert rows["resnet_tiny.pt"]["verdict"] == "safe"
    assert rows["resnet_tiny_full.pt"]["verdict"] == "needs-classes"
    assert rows["evil.ckpt"]["verdict"] == "unsafe"
    assert proc.returncode == 1


def test_scan_json_rows_follow_the_contract(run_normcli, samples, evil):
    proc = run_normcli("scan", "--json", samples / "resnet_tiny.pt", samples / "resnet_tiny_script.pt", evil[0])
    rows = json.loads(proc.stdout)
    assert proc.returncode == 1
    assert [Path(r["path"]).name for r in rows] == ["resnet_tiny.pt", "resnet_tiny_script.pt", "evil.ckpt"]
    for r in rows:
        assert set(r) >= {"path", "format", "verdict", "globals", "reason"}
        assert all(set(g) == {"name", "kind"} and g["kind"] in ("tensor", "class", "code") for g in r["globals"])
    assert [r["verdict"] for r in rows] == ["safe", "needs-classes", "unsafe"]
    assert rows[1]["format"] == "torchscript"
    assert any(g["name"].endswith(".system") and g["kind"] == "code" for g in rows[2]["globals"])
    assert not evil[1].exists()


def test_scan_exit_codes(run_normcli, samples, tmp_path, evil):
    assert run_normcli("scan", samples / "resnet_tiny.pt").returncode == 0
    assert run_normcli("scan", samples / "resnet_tiny_full.pt").returncode == 0
    strict = run_normcli("scan", "--strict", samples / "resnet_tiny_full.pt")
    assert strict.returncode == 1 and strict.stderr.startswith("error:")
    unsafe = run_normcli("scan", evil[0])
    assert unsafe.returncode == 1 and unsafe.stderr.startswith("error:") and "unsafe" in unsafe.stdout
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    bad = run_normcli("scan", samples / "resnet_tiny.pt", text)
    assert bad.returncode == 2 and "unreadable" in bad.stdout and "not a checkpoint" in bad.stdout
    missing = run_normcli("scan", tmp_path / "nope.pt")
    assert missing.returncode == 2
    usage = run_normcli("scan", "--format", "xml", samples / "resnet_tiny.pt")
    assert usage.returncode == 2 and usage.stderr.startswith("error:")
    for proc in (strict, unsafe, bad, missing, usage):
        assert "Traceback" not in proc.stderr


def test_scan_walks_directories_and_globs_by_content(run_normcli, samples, tmp_path, evil):
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    shutil.copy(samples / "resnet_tiny.pt", tree / "a" / "weights.bin")        # no telling extension
    shutil.copy(evil[0], tree / "a" / "b" / "readme.txt")                     # a checkpoint named .txt
    (tree / "a" / "notes.md").write_text("# not a checkpoint\n")              # skipped silently
    (tree / "a" / "b" / "data.pt").write_bytes(b"\x00" * 100)                 # .pt but not a checkpoint
    proc = run_normcli("scan", "--json", tree)
    rows = {Path(r["path"]).name: r["verdict"] for r in json.loads(proc.stdout)}
    assert rows == {"weights.bin": "safe", "readme.txt": "unsafe"}
    assert proc.returncode == 1
    globbed = run_normcli("scan", "--json", str(tree / "**" / "*.bin"))
    assert [Path(r["path"]).name for r in json.loads(globbed.stdout)] == ["weights.bin"]
    assert globbed.returncode == 0
    nothing = run_normcli("scan", str(tmp_path / "*.nothing"))
    assert nothing.returncode == 2 and nothing.stderr.startswith("error:")


def test_scan_sarif_is_a_valid_sarif_log(run_normcli, samples, tmp_path, evil):
    jsonschema = pytest.importorskip("jsonschema")
    text = tmp_path / "x.bin"
    text.write_bytes(b"garbage")
    proc = run_normcli("scan", "--format", "sarif", samples / "resnet_tiny.pt", samples / "resnet_tiny_full.pt",
                       evil[0], text)
    assert proc.returncode == 2  # x.bin is unreadable
    log = json.loads(proc.stdout)
    jsonschema.validate(log, SARIF_SUBSET)
    results = log["runs"][0]["results"]
    # one result per file that is not safe, rule ids from the finding codes
    assert sorted(r["ruleId"] for r in results) == ["needs-classes", "unreadable", "unsafe-globals"]
    rules = log["runs"][0]["tool"]["driver"]["rules"]
    for r in results:
        assert rules[r["ruleIndex"]]["id"] == r["ruleId"]
    unsafe = next(r for r in results if r["ruleId"] == "unsafe-globals")
    assert unsafe["level"] == "error" and "system" in unsafe["message"]["text"]
    assert unsafe["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].endswith("evil.ckpt")


# The parts of the SARIF 2.1.0 schema (sarif-schema-2.1.0.json, OASIS) that a log and its results must meet.
SARIF_SUBSET = {
    "type": "object", "required": ["version", "runs"],
    "properties": {
        "version": {"const": "2.1.0"}, "$schema": {"type": "string"},
        "runs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["tool"],
            "properties": {
                "tool": {"type": "object", "required": ["driver"], "properties": {"driver": {
                    "type": "object", "required": ["name"],
                    "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                   "rules": {"type": "array", "items": {
                                       "type": "object", "required": ["id"],
                                       "properties": {"id": {"type": "string"},
                                                      "shortDescription": {"type": "object", "required": ["text"]},
                                                      "defaultConfiguration": {"type": "object", "properties": {
                                                          "level": {"enum": ["none", "note", "warning",
                                                                             "error"]}}}}}}}}}},
                "results": {"type": "array", "items": {
                    "type": "object", "required": ["message"],
                    "properties": {
                        "ruleId": {"type": "string"}, "ruleIndex": {"type": "integer", "minimum": 0},
                        "level": {"enum": ["none", "note", "warning", "error"]},
                        "message": {"type": "object", "anyOf": [{"required": ["text"]}, {"required": ["id"]}]},
                        "locations": {"type": "array", "items": {"type": "object", "properties": {
                            "physicalLocation": {"type": "object", "properties": {
                                "artifactLocation": {"type": "object", "properties": {
                                    "uri": {"type": "string"}}}}}}}}}}}}}},
    },
}


def test_scan_in_parallel_matches_one_by_one(run_normcli, samples, evil):
    args = [samples, evil[0]]
    one = json.loads(run_normcli("scan", "--json", "--jobs", "1", *args).stdout)
    many = json.loads(run_normcli("scan", "--json", "--jobs", "2", *args).stdout)
    assert one == many and len(one) == 13


def test_scan_table_escapes_control_characters_in_names(run_normcli, samples, tmp_path):
    odd = tmp_path / "bad\x1b[31mname.pt"
    shutil.copy(samples / "resnet_tiny.pt", odd)
    proc = run_normcli("scan", odd)
    assert proc.returncode == 0 and "\x1b" not in proc.stdout and "\\x1b" in proc.stdout


# ------------------------------------------------------------------------------------ inspect, many files

def test_inspect_many_files_json(run_normcli, samples, tmp_path, evil):
    missing = tmp_path / "missing.pt"
    proc = run_normcli("inspect", "--json", "--jobs", "2", samples / "resnet_tiny.pt", samples / "unhealthy.pt",
                       evil[0], missing)
    assert proc.returncode == 2, proc.stderr                 # one file could not be read
    assert proc.stderr.startswith("error:") and "1 of 4" in proc.stderr and "Traceback" not in proc.stderr
    out = json.loads(proc.stdout)
    files = out["files"]
    assert [Path(f["path"]).name for f in files] == ["resnet_tiny.pt", "unhealthy.pt", "evil.ckpt", "missing.pt"]
    assert files[0]["summary"]["layers"] == 11 and files[0]["trust"]["verdict"] == "safe"
    assert files[1]["summary"]["error"] > 0
    assert files[2]["trust"]["verdict"] == "unsafe"
    assert set(files[3]) == {"path", "error"} and "no such file" in files[3]["error"]
    s = out["summary"]
    assert s["files"] == 4 and s["read"] == 3 and s["unreadable"] == 1
    assert s["error"] == sum(f["summary"]["error"] for f in files[:3])
    assert not evil[1].exists()


def test_inspect_many_files_fail_on_covers_all_files(run_normcli, samples):
    healthy = [samples / "resnet_tiny.pt", samples / "resnet_tiny.safetensors"]
    assert run_normcli("inspect", *healthy).returncode == 0
    proc = run_normcli("inspect", *healthy, samples / "unhealthy.pt")
    assert proc.returncode == 1 and "unhealthy.pt" in proc.stderr
    assert run_normcli("inspect", *healthy, samples / "unhealthy.pt", "--fail-on", "never").returncode == 0
    table = proc.stdout
    for col in ("file", "format", "layers", "errors", "warnings", "worst finding"):
        assert col in table
    assert "stale-stats" in table or "non-finite" in table or "negative-var" in table


def test_inspect_one_file_keeps_its_single_object(run_normcli, samples):
    out = json.loads(run_normcli("inspect", "--json", samples / "resnet_tiny.pt").stdout)
    assert "files" not in out and out["summary"]["layers"] == 11


def test_inspect_a_directory_reads_every_checkpoint_and_skips_the_rest(run_normcli, samples, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(samples / "resnet_tiny.pt", d / "a.weights")
    shutil.copy(samples / "resnet_tiny.safetensors", d / "b.safetensors")
    (d / "notes.txt").write_text("nothing to see\n")
    proc = run_normcli("inspect", "--json", d)
    out = json.loads(proc.stdout)
    assert proc.returncode == 0
    assert sorted(Path(f["path"]).name for f in out["files"]) == ["a.weights", "b.safetensors"]


def test_swap_and_fuse_export_refuse_a_payload_with_its_names(run_normcli, evil, tmp_path):
    path, marker = evil
    for argv in (["swap", path, "--to", "frn", "-o", tmp_path / "out.pt", "--arch", "samples/models.py:resnet_tiny"],
                 ["fuse-export", path, "-o", tmp_path / "out.onnx", "--arch", "samples/models.py:resnet_tiny"]):
        proc = run_normcli(*argv)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error:") and "system" in proc.stderr and "unsafe" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "out.onnx").exists()
    assert not marker.exists()


def test_a_sharded_directory_is_one_row_with_the_worst_verdict(run_normcli, tmp_path, samples):
    import torch

    marker = tmp_path / "marker"
    d = tmp_path / "sharded"
    d.mkdir()
    torch.save({"a.weight": torch.zeros(2)}, d / "pytorch_model-00001-of-00002.bin")
    torch.save({"b.weight": torch.zeros(2), "cfg": Reduce(os.system, (f"touch '{marker}'",))},
               d / "pytorch_model-00002-of-00002.bin")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a.weight": "pytorch_model-00001-of-00002.bin",
                                        "b.weight": "pytorch_model-00002-of-00002.bin"}}))
    proc = run_normcli("scan", "--json", tmp_path)
    rows = json.loads(proc.stdout)
    assert [(Path(r["path"]).name, r["format"], r["verdict"]) for r in rows] == [("sharded", "sharded", "unsafe")]
    assert proc.returncode == 1 and not marker.exists()
