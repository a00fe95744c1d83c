"""Sharded checkpoints (transformers' save_pretrained layout) are one checkpoint: inspect gives the unsharded
file's layers, checks the index against its shards, and refuses shard names that leave the directory."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from normcli.errors import NormcliError
from normcli.formats import detect_format
from normcli.limits import LimitExceeded, Limits
from normcli.sharded import checkpoint_kind, is_checkpoint_dir, read_sharded

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "resnet_tiny.pt"


def split_like_save_pretrained(sd: dict, max_shard_bytes: int) -> list[dict]:
    """huggingface_hub's split_torch_state_dict_into_shards: tensors in order, a new shard when the next one
    would pass the size, a tensor larger than the size alone in its shard."""
    shards, current, size = [], {}, 0
    for name, t in sd.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += n
    if current:
        shards.append(current)
    return shards


def write_sharded(sd: dict, directory: Path, kind: str = "safetensors", max_shard_bytes: int = 20_000) -> Path:
    """Write ``sd`` as transformers does: numbered shards, an index with total_size and the weight_map."""
    directory.mkdir(parents=True, exist_ok=True)
    shards = split_like_save_pretrained(sd, max_shard_bytes)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        if kind == "safetensors":
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in shard.items()}, directory / name, metadata={"format": "pt"})
        else:
            name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
            torch.save(shard, directory / name)
        for k, v in shard.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    index = directory / ("model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json")
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return index


@pytest.fixture(scope="module")
def sample_sd() -> dict:
    return torch.load(SAMPLE, weights_only=True)


@pytest.fixture(scope="module")
def unsharded_json(tmp_path_factory) -> dict:
    import subprocess

    from conftest import normcli_executable

    proc = subprocess.run([*normcli_executable(), "inspect", str(SAMPLE), "--json"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _layers(doc: dict) -> list:
    return [{k: x[k] for k in ("name", "kind", "num_features", "num_batches_tracked", "running_mean", "running_var",
                               "weight", "bias", "findings")} for x in doc["layers"]]


def inspect_json(run_normcli, path, *extra, code=0) -> dict:
    proc = run_normcli("inspect", path, "--json", *extra)
    assert proc.returncode == code, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_sharded_checkpoint_inspects_like_the_unsharded_file(tmp_path, run_normcli, sample_sd, unsharded_json, kind):
    index = write_sharded(sample_sd, tmp_path / "ckpt", kind)
    assert len(list((tmp_path / "ckpt").glob("*-of-*"))) >= 4  # really split
    for target in (index, index.parent):  # the index, or the directory holding it
        doc = inspect_json(run_normcli, target)
        assert doc["format"] == f"sharded-{kind}"
        assert doc["file_findings"] == []
        assert _layers(doc) == _layers(unsharded_json)
        assert doc["summary"] == unsharded_json["summary"]


def test_table_output_names_the_file_findings(tmp_path, run_normcli, sample_sd):
    index = write_sharded(sample_sd, tmp_path / "ckpt")
    shard = sorted(index.parent.glob("model-*"))[1]
    shard.unlink()
    proc = run_normcli("inspect", index.parent)
    assert proc.returncode == 1
    assert "shard-missing" in proc.stdout and shard.name in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def _codes(doc: dict) -> list[str]:
    return [f["code"] for f in doc["file_findings"]]


def test_missing_shard_is_an_error_finding_and_the_rest_is_still_read(tmp_path, run_normcli, sample_sd):
    index = write_sharded(sample_sd, tmp_path / "ckpt")
    weight_map = json.loads(index.read_text())["weight_map"]
    gone = weight_map["layer2.0.bn1.running_var"]
    (index.parent / gone).unlink()
    doc = inspect_json(run_normcli, index, code=1)
    assert _codes(doc) == ["shard-missing"]
    assert gone in doc["file_findings"][0]["message"] and doc["file_findings"][0]["severity"] == "error"
    assert doc["summary"]["error"] >= 1
    names = [x["name"] for x in doc["layers"]]
    kept = [k[:-len(".running_var")] for k, v in weight_map.items() if k.endswith("running_var") and v != gone]
    assert kept and set(kept) <= set(names) and "layer2.0.bn1" not in names
    assert inspect_json(run_normcli, index, "--fail-on", "never")["file_findings"][0]["code"] == "shard-missing"


def test_stray_shard_from_an_earlier_save_is_reported(tmp_path, run_normcli, sample_sd):
    index = write_sharded(sample_sd, tmp_path / "ckpt")
    first = sorted(index.parent.glob("model-*"))[0]
    shutil.copy(first, index.parent / "model-00001-of-00009.safetensors")  # leftover of a 9-shard save
    save_file({"extra.weight": torch.ones(3)}, index.parent / "adapter.safetensors")
    (index.parent / "config.json").write_text("{}")  # not a shard
    doc = inspect_json(run_normcli, index.parent, code=1)
    assert _codes(doc) == ["shard-stray"]
    message = doc["file_findings"][0]["message"]
    assert "model-00001-of-00009.safetensors" in message and "adapter.safetensors" in message
    assert "config.json" not in message


def test_a_second_index_in_the_directory_owns_its_shards(tmp_path, run_normcli, sample_sd):
    write_sharded(sample_sd, tmp_path / "ckpt", "safetensors")
    write_sharded(sample_sd, tmp_path / "ckpt", "bin")
    doc = inspect_json(run_normcli, tmp_path / "ckpt")
    assert doc["format"] == "sharded-safetensors"  # safetensors first, as transformers prefers it
    assert doc["file_findings"] == []
    doc = inspect_json(run_normcli, tmp_path / "ckpt" / "pytorch_model.bin.index.json")
    assert doc["format"] == "sharded-bin" and doc["file_findings"] == []


def test_tensor_mapped_twice_in_the_index_is_a_duplicate(tmp_path, run_normcli, sample_sd):
    index = write_sharded(sample_sd, tmp_path / "ckpt")
    text = index.read_text()
    weight_map = json.loads(text)["weight_map"]
    other = next(s for s in weight_map.values() if s != weight_map["bn1.weight"])
    # JSON objects may repeat a key; json.loads would silently keep the last one
    text = text.replace('"weight_map": {', f'"weight_map": {{\n    "bn1.weight": "{other}",', 1)
    index.write_text(text)
    doc = inspect_json(run_normcli, index, code=1)
    assert "shard-duplicate" in _codes(doc)
    assert any("'bn1.weight'" in f["message"] for f in doc["file_findings"] if f["code"] == "shard-duplicate")


def test_tensor_in_two_shards_is_a_duplicate_and_differing_copies_a_mismatch(tmp_path, run_normcli, sample_sd):
    index = write_sharded(sample_sd, tmp_path / "ckpt")
    weight_map = json.loads(index.read_text())["weight_map"]
    home = weight_map["bn1.running_var"]
    other = next(s for s in sorted(set(weight_map.values())) if s != home)
    from safetensors.torch import load_file

    tensors = load_file(index.parent / other)
    tensors["bn1.running_var"] = sample_sd["bn1.running_var"].double()  # same name, another dtype
    save_file(tensors, index.parent / other)
    doc = inspect_json(run_normcli, index, code=1)
    assert "shard-duplicate" in _codes(doc) and "shard-mismatch" in _codes(doc)
    mismatch = next(f["message"] for f in doc["file_findings"] if f["code"] == "shard-mismatch")
    assert "float64" in mismatch and "float32" in mismatch
    # the index's shard wins: the statistics are the float32 copy's
    bn1 = next(x for x in doc["layers"] if x["name"] == "bn1")
    assert bn1["running_var"]["max"] == pytest.approx(float(sample_sd["bn1.running_var"].max()))


def test_tensor_missing_from_its_shard_and_total_size_disagreement_are_mismatches(tmp_path, run_normcli, sample_sd):
    index = write_sharded(sample_sd, tmp_path / "ckpt")
    doc = json.loads(index.read_text())
    doc["metadata"]["total_size"] += 4
    index.write_text(json.dumps(doc))
    found = inspect_json(run_normcli, index, code=1)
    assert _codes(found) == ["shard-mismatch"] and "total_size" in found["file_findings"][0]["message"]

    doc["metadata"]["total_size"] -= 4
    wrong = next(s for s in sorted(set(doc["weight_map"].values())) if s != doc["weight_map"]["fc.weight"])
    doc["weight_map"]["fc.weight"] = wrong  # the index points at a shard that does not hold it
    index.write_text(json.dumps(doc))
    found = inspect_json(run_normcli, index, code=1)
    messages = [f["message"] for f in found["file_findings"] if f["code"] == "shard-mismatch"]
    assert any("'fc.weight'" in m and "not in it" in m for m in messages)


def test_shard_holding_a_tensor_the_index_does_not_list_is_a_mismatch(tmp_path, run_normcli, sample_sd):
    index = write_sharded(sample_sd, tmp_path / "ckpt")
    doc = json.loads(index.read_text())
    del doc["weight_map"]["fc.bias"]
    doc["metadata"]["total_size"] -= sample_sd["fc.bias"].numel() * 4
    index.write_text(json.dumps(doc))
    found = inspect_json(run_normcli, index, code=1)
    assert _codes(found) == ["shard-mismatch"] and "'fc.bias'" in found["file_findings"][0]["message"]


def test_weight_map_values_that_are_not_file_names_are_refused(tmp_path, run_normcli, sample_sd):
    index = write_sharded(sample_sd, tmp_path / "ckpt")
    for value in (["a"], {"b": 1}, 3, None):
        doc = json.loads(index.read_text())
        doc["weight_map"]["bn1.weight"] = value
        index.write_text(json.dumps(doc))
        proc = run_normcli("inspect", index)
        assert proc.returncode == 2 and "not a shard file name" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_shard_names_that_leave_the_directory_are_refused(tmp_path, run_normcli, sample_sd, name):
    index = write_sharded(sample_sd, tmp_path / "ckpt")
    save_file({"x": torch.ones(2)}, tmp_path / "outside.safetensors")
    doc = json.loads(index.read_text())
    doc["weight_map"]["bn1.weight"] = name
    index.write_text(json.dumps(doc))
    proc = run_normcli("inspect", index)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "outside its directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_symlinked_shard_pointing_outside_is_refused(tmp_path, run_normcli, sample_sd):
    index = write_sharded(sample_sd, tmp_path / "ckpt")
    shard = sorted(index.parent.glob("model-*"))[0]
    moved = tmp_path / "elsewhere.safetensors"
    shard.rename(moved)
    os.symlink(moved, shard)
    proc = run_normcli("inspect", index)
    assert proc.returncode == 2 and "symlink" in proc.stderr and "Traceback" not in proc.stderr
    # a symlink to a file inside the directory is fine
    shard.unlink()
    (index.parent / "blobs").mkdir()
    inner = index.parent / "blobs" / "0123abcd"
    moved.rename(inner)
    os.symlink(Path("blobs") / inner.name, shard)
    assert run_normcli("inspect", index, "--json").returncode == 0


def test_index_limits_name_the_limit(tmp_path, run_normcli, sample_sd):
    index = write_sharded(sample_sd, tmp_path / "ckpt")
    with pytest.raises(LimitExceeded, match="max_shards"):
        read_sharded(index, limits=Limits(max_shards=2))
    with pytest.raises(LimitExceeded, match="max_index_nodes"):
        read_sharded(index, limits=Limits(max_index_nodes=50))
    with pytest.raises(LimitExceeded, match="max_index_bytes"):
        read_sharded(index, limits=Limits(max_index_bytes=100))
    deep = tmp_path / "deep" / "model.safetensors.index.json"
    deep.parent.mkdir()
    deep.write_text('{"weight_map": {"a": "b"}, "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}")
    proc = run_normcli("inspect", deep)
    assert proc.returncode == 2 and "max_index_depth" in proc.stderr and "Traceback" not in proc.stderr


def test_a_large_hostile_index_is_refused_quickly(tmp_path, run_normcli):
    import time

    index = tmp_path / "model.safetensors.index.json"
    for body, limit in ((",".join(f'"t{i}":"s{i}"' for i in range(600_000)), "max_index_nodes"),  # ~10 MB
                        (",".join(f'"t{i}":"s{i}"' for i in range(450_000)), "max_shards")):  # ~8 MB
        index.write_text('{"weight_map":{' + body + "}}")
        start = time.perf_counter()
        proc = run_normcli("inspect", index)
        assert proc.returncode == 2 and limit in proc.stderr and "Traceback" not in proc.stderr
        assert time.perf_counter() - start < 10


def test_format_is_recognised_from_content(tmp_path, sample_sd):
    index = write_sharded(sample_sd, tmp_path / "ckpt")
    renamed = index.parent / "weights.idx"
    shutil.copy(index, renamed)
    assert detect_format(renamed) == "sharded"
    assert detect_format(index.parent) == "sharded"
    assert checkpoint_kind(index.parent) == "sharded" and is_checkpoint_dir(index.parent)
    assert not is_checkpoint_dir(index)  # a file is not a checkpoint directory
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text('{"hidden": 3}')
    assert checkpoint_kind(tmp_path / "plain") is None
    with pytest.raises(NormcliError, match="is a directory"):
        detect_format(tmp_path / "plain")
    not_index = tmp_path / "x.index.json"
    not_index.write_text('{"hidden": 3}')
    with pytest.raises(NormcliError, match="unrecognised"):
        detect_format(not_index)


def test_swap_takes_a_sharded_checkpoint_with_arch(tmp_path, run_normcli, sample_sd):
    index = write_sharded(sample_sd, tmp_path / "ckpt", "bin")
    out = tmp_path / "frn.pt"
    proc = run_normcli("swap", index.parent, "--to", "frn", "--arch", "samples/models.py:resnet_tiny", "-o", out,
                       "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["replaced"] and out.is_file()
    # the unsharded sample gives the same swapped weights
    ref = tmp_path / "ref.pt"
    assert run_normcli("swap", SAMPLE, "--to", "frn", "--arch", "samples/models.py:resnet_tiny", "-o", ref,
                       "--json").returncode == 0
    got = torch.load(out, weights_only=True)["state_dict"]
    want = torch.load(ref, weights_only=True)["state_dict"]
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_swap_of_a_sharded_checkpoint_missing_a_shard_is_refused(tmp_path, run_normcli, sample_sd):
    index = write_sharded(sample_sd, tmp_path / "ckpt")
    sorted(index.parent.glob("model-*"))[-1].unlink()
    out = tmp_path / "frn.pt"
    proc = run_normcli("swap", index, "--to", "frn", "--arch", "samples/models.py:resnet_tiny", "-o", out)
    assert proc.returncode == 2 and "missing keys" in proc.stderr and not out.exists()


@pytest.mark.slow
def test_fuse_export_takes_a_sharded_checkpoint_with_arch(tmp_path, run_normcli, sample_sd):
    index = write_sharded(sample_sd, tmp_path / "ckpt")
    out = tmp_path / "m.onnx"
    proc = run_normcli("fuse-export", index.parent, "--arch", "samples/models.py:resnet_tiny", "-o", out,
                       "--input-shape", "1,3,32,32", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["parity"]["passed"] and doc["folded"] and out.is_file()


def test_an_index_naming_itself_is_refused(tmp_path, run_normcli, sample_sd):
    index = write_sharded(sample_sd, tmp_path / "ckpt")
    doc = json.loads(index.read_text())
    doc["weight_map"]["bn1.weight"] = index.name
    index.write_text(json.dumps(doc))
    proc = run_normcli("inspect", index)
    assert proc.returncode == 2 and "itself a sharded index" in proc.stderr and "Traceback" not in proc.stderr


def test_inspect_with_arch_keeps_the_file_findings(tmp_path, run_normcli, sample_sd):
    index = write_sharded(sample_sd, tmp_path / "ckpt")
    shutil.copy(sorted(index.parent.glob("model-*"))[0], index.parent / "model-00007-of-00009.safetensors")
    doc = inspect_json(run_normcli, index.parent, "--arch", "samples/models.py:resnet_tiny", code=1)
    assert _codes(doc) == ["shard-stray"]
    assert [x["kind"] for x in doc["layers"]] == ["BatchNorm2d"] * 11  # exact kinds from the model


def test_mutated_index_gives_one_error_line_or_a_report(tmp_path, cli, sample_sd):
    import random

    rng = random.Random(0)
    index = write_sharded(sample_sd, tmp_path / "ckpt")
    text = index.read_bytes()
    for i in range(40):
        b = bytearray(text)
        for _ in range(rng.choice((1, 4, 16))):
            b[rng.randrange(len(b))] = rng.choice(b'{}[]",:\\/.0123456789x\x00\xff')
        index.write_bytes(bytes(b[: rng.randrange(len(b) // 2, len(b) + 1)] if i % 3 == 0 else b))
        code, out, err = cli("inspect", index.parent, "--json", "--fail-on", "never")
        assert "Traceback" not in err, (i, err)
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (i, err)
        else:
            assert code == 0, (i, err)
            json.loads(out)
