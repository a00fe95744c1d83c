"""torch.distributed.checkpoint directories written by the real dcp.save (one process, and two gloo processes
with sharded DTensors) read by inspect without torch.distributed and without unpickling anything unsafe."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "resnet_tiny.pt"
STATS = ("running_mean", "running_var", "weight", "bias")


def _save(state_dict: dict, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(state_dict, checkpoint_id=str(directory))


@pytest.fixture(scope="module")
def sample_sd() -> dict:
    return torch.load(SAMPLE, weights_only=True)


@pytest.fixture
def one_process(tmp_path, sample_sd) -> Path:
    directory = tmp_path / "dcp"
    _save(dict(sample_sd), directory)
    return directory


def expected_stats(sd: dict) -> dict:
    """Per BN layer, min/mean/max of each statistic, straight from the state dict (float64)."""
    out = {}
    for name in sd:
        if name.endswith(".running_var"):
            layer = name[: -len(".running_var")]
            out[layer] = {s: (float(sd[f"{layer}.{s}"].double().min()), float(sd[f"{layer}.{s}"].double().mean()),
                              float(sd[f"{layer}.{s}"].double().max())) for s in STATS}
            out[layer]["num_batches_tracked"] = int(sd[f"{layer}.num_batches_tracked"])
    return out


def assert_matches(doc: dict, sd: dict) -> None:
    want = expected_stats(sd)
    got = {x["name"]: x for x in doc["layers"]}
    assert set(got) == set(want)
    for layer, stats in want.items():
        assert got[layer]["num_batches_tracked"] == stats["num_batches_tracked"]
        for s in STATS:
            triple = (got[layer][s]["min"], got[layer][s]["mean"], got[layer][s]["max"])
            # float32 values summarised in float64 on both sides: equal up to the mean's summation order
            np.testing.assert_allclose(triple, stats[s], rtol=1e-12, atol=0)


def test_one_process_checkpoint_inspects_like_its_state_dict(one_process, run_normcli, sample_sd):
    assert (one_process / ".metadata").is_file() and list(one_process.glob("*.distcp"))
    proc = run_normcli("inspect", one_process, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["format"] == "dcp" and doc["file_findings"] == []
    assert_matches(doc, sample_sd)


def test_safetensors_storage_format_is_read_too(tmp_path, run_normcli, sample_sd):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

    directory = tmp_path / "dcp_st"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(dict(sample_sd), storage_writer=FileSystemWriter(
            str(directory), serialization_format=SerializationFormat.SAFETENSORS))
    proc = run_normcli("inspect", directory, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["format"] == "dcp" and doc["file_findings"] == []
    assert_matches(doc, sample_sd)


def test_inspect_never_imports_torch_distributed(one_process, tmp_path):
    import subprocess
    import sys

    code = ("import sys\nfrom normcli.reader import read_tensors\ntf = read_tensors(sys.argv[1])\n"
            "assert tf.format == 'dcp' and len(tf.tensors) > 10\n"
            "[t.load() for t in tf.tensors.values()]\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    proc = subprocess.run([sys.executable, "-c", code, str(one_process)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_nested_state_dict_picks_the_model_and_notes_the_rest(tmp_path, run_normcli, sample_sd):
    directory = tmp_path / "nested"
    model = {k: v.clone() for k, v in sample_sd.items()}
    optim = {"state": {k: {"exp_avg": torch.zeros_like(v)} for k, v in sample_sd.items() if v.is_floating_point()},
             "param_groups": [{"lr": 0.1}]}
    _save({"model": model, "optim": optim, "step": 7}, directory)
    doc = json.loads(run_normcli("inspect", directory, "--json").stdout)
    assert doc["state_dict_key"] == "model"
    assert_matches(doc, sample_sd)


def test_swap_and_fuse_export_take_a_dcp_directory_with_arch(one_process, tmp_path, run_normcli, sample_sd):
    out = tmp_path / "frn.pt"
    proc = run_normcli("swap", one_process, "--to", "frn", "--arch", "samples/models.py:resnet_tiny", "-o", out,
                       "--json")
    assert proc.returncode == 0, proc.stderr
    ref = tmp_path / "ref.pt"
    assert run_normcli("swap", SAMPLE, "--to", "frn", "--arch", "samples/models.py:resnet_tiny", "-o", ref,
                       "--json").returncode == 0
    got = torch.load(out, weights_only=True)["state_dict"]
    want = torch.load(ref, weights_only=True)["state_dict"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


@pytest.mark.slow
def test_fuse_export_takes_a_dcp_directory_with_arch(one_process, tmp_path, run_normcli):
    out = tmp_path / "m.onnx"
    proc = run_normcli("fuse-export", one_process, "--arch", "samples/models.py:resnet_tiny", "-o", out,
                       "--input-shape", "1,3,32,32", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["parity"]["passed"] and out.is_file()


# ------------------------------------------------------------------------------------ two gloo processes

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bf16_sd(sd: dict) -> dict:
    return {k: (v.to(torch.bfloat16) if k.startswith("layer3") and v.is_floating_point() else v) for k, v in sd.items()}


def _worker(rank: int, port: int, out_dir: str, sample: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        sd = _bf16_sd(torch.load(sample, weights_only=True))
        # every tensor with a first dimension split across the two ranks (uneven where odd), scalars replicated
        sharded = {k: distribute_tensor(v, mesh, [Shard(0)] if v.ndim and v.shape[0] > 1 else [Replicate()])
                   for k, v in sd.items()}
        dcp.save(sharded, checkpoint_id=out_dir)
        dist.barrier()  # both ranks done before gloo is torn down
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process(tmp_path_factory) -> Path:
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("dcp2") / "ckpt"
    mp.spawn(_worker, args=(_free_port(), str(out_dir), str(SAMPLE)), nprocs=WORLD_SIZE, join=True)
    return out_dir


@pytest.mark.slow
def test_two_process_sharded_checkpoint_is_reassembled(two_process, run_normcli, sample_sd):
    files = sorted(p.name for p in two_process.glob("*.distcp"))
    assert len(files) == WORLD_SIZE  # one file per rank
    import torch.distributed.checkpoint as dcp  # only to check that the chunks really are split across ranks

    meta = dcp.FileSystemReader(str(two_process)).read_metadata()
    assert len(meta.state_dict_metadata["conv1.weight"].chunks) == WORLD_SIZE
    proc = run_normcli("inspect", two_process, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["format"] == "dcp" and doc["file_findings"] == []
    assert_matches(doc, _bf16_sd(sample_sd))  # bf16 statistics exactly as torch holds them, widened

    from normcli.reader import read_tensors

    tf = read_tensors(two_process)
    for k, v in _bf16_sd(sample_sd).items():  # every tensor, assembled from its chunks, bit for bit
        np.testing.assert_array_equal(tf.tensors[k].load(), v.float().numpy() if v.dtype == torch.bfloat16
                                      else v.numpy())


@pytest.mark.slow
def test_two_process_checkpoint_swaps_with_arch(two_process, tmp_path, run_normcli):
    out = tmp_path / "frn.pt"
    proc = run_normcli("swap", two_process, "--to", "frn", "--arch", "samples/models.py:resnet_tiny", "-o", out)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------- hostile metadata

def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rewrite(directory: Path, edit) -> None:
    """Load .metadata with torch's own classes (the test built it), edit it, pickle it back."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(directory)).read_metadata()
    edit(meta)
    (directory / ".metadata").write_bytes(pickle.dumps(meta))


def _first_storage(meta, fqn: str):
    return next((idx, info) for idx, info in meta.storage_data.items() if idx.fqn == fqn)


def _refused(run_normcli, directory: Path, *words: str) -> None:
    proc = run_normcli("inspect", directory, "--json")
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


def test_chunk_bytes_past_the_file_end_are_refused(one_process, tmp_path, run_normcli):
    d = _copy(one_process, tmp_path / "bad")

    def edit(meta):
        _idx, info = _first_storage(meta, "fc.weight")
        info.offset = (d / info.relative_path).stat().st_size - 10

    _rewrite(d, edit)
    _refused(run_normcli, d, "past the file's end")


def test_chunk_outside_the_tensor_shape_is_refused(one_process, tmp_path, run_normcli):
    d = _copy(one_process, tmp_path / "bad")

    def edit(meta):
        meta.state_dict_metadata["fc.weight"].chunks[0].sizes = torch.Size([11, 32])

    _rewrite(d, edit)
    _refused(run_normcli, d, "outside the tensor's shape")


def test_chunk_whose_stored_tensor_has_another_shape_is_refused(one_process, tmp_path, run_normcli):
    d = _copy(one_process, tmp_path / "bad")

    def edit(meta):
        t = meta.state_dict_metadata["fc.weight"]
        t.size = torch.Size([5, 32])
        t.chunks[0].sizes = torch.Size([5, 32])

    _rewrite(d, edit)
    _refused(run_normcli, d, "fc.weight", "holds a")


@pytest.mark.slow
def test_chunks_that_do_not_cover_the_tensor_are_refused(two_process, tmp_path, run_normcli):
    d = _copy(two_process, tmp_path / "bad")

    def edit(meta):
        meta.state_dict_metadata["conv1.weight"].chunks.pop()

    _rewrite(d, edit)
    _refused(run_normcli, d, "do not cover")


@pytest.mark.parametrize("path", ["../outside.distcp", "/etc/passwd"])
def test_storage_paths_outside_the_directory_are_refused(one_process, tmp_path, run_normcli, path):
    d = _copy(one_process, tmp_path / "bad")

    def edit(meta):
        for info in meta.storage_data.values():
            info.relative_path = path

    _rewrite(d, edit)
    _refused(run_normcli, d, "outside")


def test_missing_and_stray_distcp_files_are_findings(one_process, tmp_path, run_normcli):
    d = _copy(one_process, tmp_path / "stray")
    (d / "__1_0.distcp").write_bytes((d / "__0_0.distcp").read_bytes())
    doc = json.loads(run_normcli("inspect", d, "--json", "--fail-on", "never").stdout)
    assert [f["code"] for f in doc["file_findings"]] == ["shard-stray"]
    (d / "__0_0.distcp").unlink()
    proc = run_normcli("inspect", d, "--json")
    assert proc.returncode == 2 and "no tensor" in proc.stderr  # every tensor lived in the missing file


class _Payload:
    """What a crafted .metadata could carry: plain pickle.load (as dcp.load does) would run os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_code_payload_in_metadata_never_runs_and_blocks_swap(one_process, tmp_path, run_normcli):
    d = _copy(one_process, tmp_path / "evil")
    marker = tmp_path / "pwned"

    def edit(meta):
        meta.storage_meta.checkpoint_id = _Payload(marker)

    _rewrite(d, edit)
    proc = run_normcli("inspect", d, "--json")
    # the weights are still read, and the payload is an error finding (exit 1 under the default --fail-on)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["layers"] and report["trust"]["verdict"] == "unsafe"
    unsafe = [f for f in report["file_findings"] if f["code"] == "unsafe-globals"]
    assert unsafe and "system" in unsafe[0]["message"]
    proc = run_normcli("scan", d, "--json")
    assert proc.returncode == 1 and json.loads(proc.stdout)[0]["verdict"] == "unsafe"
    proc = run_normcli("swap", d, "--to", "frn", "--arch", "samples/models.py:resnet_tiny", "-o", tmp_path / "o.pt")
    assert proc.returncode == 2 and "system" in proc.stderr and "--unsafe-load" in proc.stderr
    assert not marker.exists() and not (tmp_path / "o.pt").exists()

    from normcli.reader import read_tensors

    tf = read_tensors(d)
    assert "os.system" in tf.unsafe_globals or "posix.system" in tf.unsafe_globals
    assert not any(g.startswith("torch.distributed.checkpoint") for g in tf.unsafe_globals)


def test_dcp_limits_name_the_limit(one_process):
    from normcli.dcp import read_dcp
    from normcli.limits import LimitExceeded, Limits

    with pytest.raises(LimitExceeded, match="max_dcp_chunks"):
        read_dcp(one_process, limits=Limits(max_dcp_chunks=5))
    with pytest.raises(LimitExceeded, match="max_dcp_metadata_bytes"):
        read_dcp(one_process, limits=Limits(max_dcp_metadata_bytes=1000))


def test_dcp_directory_is_one_checkpoint(one_process, tmp_path):
    from normcli.formats import detect_format
    from normcli.sharded import checkpoint_kind, is_checkpoint_dir

    assert detect_format(one_process) == "dcp" and checkpoint_kind(one_process) == "dcp"
    assert is_checkpoint_dir(one_process)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / ".metadata").write_bytes(b"not a pickle")
    assert checkpoint_kind(fake) is None


@pytest.mark.slow
def test_overlapping_chunks_are_refused(two_process, tmp_path, run_normcli):
    d = _copy(two_process, tmp_path / "bad")

    def edit(meta):
        # the second chunk of conv1.weight moved up one row: the volumes still add up to the tensor's, but
        # row 3 is claimed twice and the last row by no chunk
        t = meta.state_dict_metadata["conv1.weight"]
        c0, c1 = sorted(t.chunks, key=lambda c: c.offsets[0])
        old = list(c1.offsets)
        new = torch.Size([c1.offsets[0] - 1, *c1.offsets[1:]])
        for idx, info in list(meta.storage_data.items()):
            if idx.fqn == "conv1.weight" and list(idx.offset) == old:
                del meta.storage_data[idx]
                from torch.distributed.checkpoint.metadata import MetadataIndex

                meta.storage_data[MetadataIndex("conv1.weight", new)] = info
        c1.offsets = new

    _rewrite(d, edit)
    proc = run_normcli("inspect", d, "--json")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "overlap" in proc.stderr, proc.stderr


def test_truncated_or_mutated_files_give_one_error_line(one_process, tmp_path, cli):
    import random
    import shutil

    rng = random.Random(0)
    meta = (one_process / ".metadata").read_bytes()
    data = (one_process / "__0_0.distcp").read_bytes()
    cases = [("__0_0.distcp", data[: int(len(data) * f)]) for f in (0.0, 0.01, 0.3, 0.7, 0.999)]
    cases += [(".metadata", meta[: int(len(meta) * f)]) for f in (0.05, 0.5, 0.99)]
    for _ in range(12):
        for name, blob in ((".metadata", meta), ("__0_0.distcp", data)):
            b = bytearray(blob)
            for _ in range(8):
                b[rng.randrange(len(b))] = rng.randrange(256)
            cases.append((name, bytes(b)))
    for i, (name, blob) in enumerate(cases):
        d = tmp_path / f"case{i}"
        shutil.copytree(one_process, d)
        (d / name).write_bytes(blob)
        code, out, err = cli("inspect", d, "--json", "--fail-on", "never")
        assert code in (0, 2), (i, name, err)
        assert "Traceback" not in err, (i, name, err)
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (i, name, err)
        else:
            json.loads(out)


def test_a_payload_in_a_non_tensor_entry_is_reported_never_run(tmp_path, run_normcli, sample_sd):
    # dcp.load would torch.load(weights_only=False) this entry; normcli reads only its opcodes
    directory = tmp_path / "evil_bytes"
    marker = tmp_path / "pwned"
    _save({**{k: v.clone() for k, v in sample_sd.items()}, "extra": _Payload(marker)}, directory)
    assert not marker.exists()
    from normcli.reader import read_tensors

    tf = read_tensors(directory)
    assert {"os.system", "posix.system"} & set(tf.unsafe_globals)
    proc = run_normcli("swap", directory, "--to", "frn", "--arch", "samples/models.py:resnet_tiny", "-o",
                       tmp_path / "o.pt")
    assert proc.returncode == 2 and "system" in proc.stderr and not marker.exists()


def test_inspect_of_a_tree_gives_one_row_per_checkpoint_directory(one_process, tmp_path, run_normcli, sample_sd):
    """A directory that is one checkpoint (DCP, sharded) is one report, by itself or found inside a tree; a
    directory that is none expands to the checkpoints in it, as scan does."""
    from test_sharded import write_sharded

    tree = tmp_path / "tree"
    shutil.copytree(one_process, tree / "run" / "dcp")
    index = write_sharded(sample_sd, tree / "hf")
    torch.save(sample_sd, tree / "plain.pt")
    (tree / "notes.txt").write_text("not a checkpoint")

    for target in (tree / "run" / "dcp", str(tree / "run" / "dcp") + "/", index.parent):
        proc = run_normcli("inspect", target, "--json")
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)  # one checkpoint: one report, not a list of its files
        assert doc["format"] in ("dcp", "sharded-safetensors") and doc["summary"]["layers"] > 0
        assert doc["trust"]["verdict"] == "safe" and doc["file_findings"] == []

    proc = run_normcli("inspect", tree, "--json")
    assert proc.returncode == 0, proc.stderr
    files = json.loads(proc.stdout)["files"]
    got = sorted((Path(f["path"]).relative_to(tree).as_posix(), f["format"]) for f in files)
    assert got == [("hf", "sharded-safetensors"), ("plain.pt", "state-dict"), ("run/dcp", "dcp")]
    scanned = json.loads(run_normcli("scan", tree, "--json").stdout)
    assert sorted(Path(r["path"]).relative_to(tree).as_posix() for r in scanned) == ["hf", "plain.pt", "run/dcp"]


@pytest.mark.parametrize("payload, limit", [
    (b"\x80\x02" + b"(" * 600 + b"N" + b"t" * 600 + b".", "pickle_depth"),                # nested marks
    (b"\x80\x02N" + b"\x85" * 1000 + b".", "pickle_depth"),                                # nested tuples
    (b"\x80\x02]q\x00h\x05a.", "memo entry 5 before writing"),
    (b"\x80\x02\x82\x01.", "EXT1"),
])
def test_a_hostile_metadata_pickle_is_refused_by_the_checked_walk(one_process, run_normcli, payload, limit):
    """DCP's .metadata goes through the reader's checked opcode walk before any unpickler sees it."""
    (one_process / ".metadata").write_bytes(payload)
    proc = run_normcli("inspect", one_process)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and limit in proc.stderr, proc.stderr
    proc = run_normcli("scan", one_process)  # unreadable, or unsafe for the extension-registry lookup
    assert proc.returncode == (1 if limit == "EXT1" else 2) and "Traceback" not in proc.stderr, proc.stderr
    from normcli.dcp import read_dcp
    from normcli.errors import NormcliError

    with pytest.raises(NormcliError, match=limit):
        read_dcp(one_process)
