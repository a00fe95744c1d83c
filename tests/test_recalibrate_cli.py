"""`normcli recalibrate` on real files: layouts kept, data sources, bad input, torchrun with two gloo ranks."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, sha256

ARCH = ["--arch", "samples.models:resnet_tiny"]
STAT_LEAVES = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture
def data_npy(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((70, 3, 16, 16)) * [[[2.0]], [[1.0]], [[0.5]]] + 1.0).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, x)
    return path


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_except_stats(a, b, where="", changed=None):
    """Equal entry for entry (types, dtypes, bits), except norm statistics, which are collected in ``changed``."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            leaf = str(k).rsplit(".", 1)[-1]
            if changed is not None and leaf in STAT_LEAVES and isinstance(a[k], torch.Tensor):
                assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{where}/{k}"
                if not torch.equal(a[k], b[k]):
                    changed.add(f"{where}/{k}")
                continue
            _assert_same_except_stats(a[k], b[k], f"{where}/{k}", changed)
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_except_stats(x, y, f"{where}[{i}]", changed)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def test_lightning_checkpoint_keeps_every_other_entry(cli, samples, data_npy, tmp_path):
    src = samples / "resnet_tiny.ckpt"
    digest = sha256(src)
    out = tmp_path / "out.ckpt"
    code, stdout, err = cli("recalibrate", src, *ARCH, "--data", data_npy, "-o", out, "--batch-size", "16", "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["output"] == str(out) and doc["batches"] == 4 and doc["samples"] == 70 - 16
    assert len(doc["layers"]) == 11
    assert set(doc["eval_change"]) >= {"max_abs", "max_rel"} and doc["eval_change"]["max_abs"] > 0
    assert "samples/s" in err
    assert sha256(src) == digest
    changed: set = set()
    before, after = _load(src), _load(out)
    _assert_same_except_stats(before, after, changed=changed)
    assert len(changed) == 33                              # 11 layers x (mean, var, num_batches_tracked)
    assert all(k.startswith("/state_dict/model.") for k in changed)
    assert after["state_dict"]["model.bn1.num_batches_tracked"].item() == 4


def test_output_equals_the_library_on_the_same_batches(cli, samples, data_npy, tmp_path):
    from normcli.loading import load_model
    from normcli.recalibrate import recalibrate

    out = tmp_path / "out.pt"
    assert cli("recalibrate", samples / "resnet_tiny.pt", *ARCH, "--data", data_npy, "-o", out,
               "--batch-size", "32")[0] == 0
    model = load_model(samples / "resnet_tiny.pt", arch="samples.models:resnet_tiny").model
    x = torch.from_numpy(np.load(data_npy))
    result, _ = recalibrate(model, list(x.split(32)))
    written = _load(out)
    assert type(written).__name__ == "OrderedDict" and all(isinstance(v, torch.Tensor) for v in written.values())
    for k, v in result.state_dict().items():
        assert torch.equal(written[k], v), k


def test_ema_entry_chosen_with_key_is_the_only_one_changed(cli, samples, tmp_path):
    src = samples / "mobilenetv2_tiny_ema.pth"
    data = tmp_path / "d.pt"
    torch.save(torch.randn(20, 3, 16, 16), data)
    out = tmp_path / "out.pth"
    code, _, err = cli("recalibrate", src, "--arch", "samples.models:mobilenetv2_tiny", "--key", "state_dict_ema",
                       "--data", data, "-o", out, "--batch-size", "8")
    assert code == 0, err
    changed: set = set()
    _assert_same_except_stats(_load(src), _load(out), changed=changed)
    assert changed and all(k.startswith("/state_dict_ema/") for k in changed)


@pytest.mark.parametrize("name", ["resnet_tiny.safetensors", "resnet_tiny_legacy.pt"])
def test_safetensors_and_legacy_files_stay_in_their_format(cli, samples, data_npy, tmp_path, name):
    from normcli.formats import detect_format

    src = samples / name
    out = tmp_path / name
    assert cli("recalibrate", src, *ARCH, "--data", data_npy, "-o", out)[0] == 0
    assert detect_format(out) == detect_format(src)
    if name.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        a, b = load_file(src), load_file(out)
        with safe_open(src, "pt") as f, safe_open(out, "pt") as g:
            assert f.metadata() == g.metadata()
    else:
        a, b = _load(src), _load(out)
    changed: set = set()
    _assert_same_except_stats(dict(a), dict(b), changed=changed)
    assert len(changed) == 33


@pytest.mark.slow
def test_installed_entry_point_and_bad_inputs_exit_2_and_write_nothing(run_normcli, samples, data_npy, tmp_path):
    out = tmp_path / "out.pt"
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((8, 4, 16, 16), np.float32))
    nan = tmp_path / "nan.npy"
    x = np.ones((8, 3, 16, 16), np.float32)
    x[5, 1, 2, 3] = np.nan
    np.save(nan, x)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not data")
    cases = {
        "does not run on batch": ["--data", wrong],
        "non-finite": ["--data", nan],
        "empty": ["--data", empty],
        "no norm layer that tracks": ["--data", data_npy, "--arch-kwargs", "{}",
                                      "--arch", str(ROOT / "tests" / "recalibrate_helpers.py") + ":no_tracking"],
        "leave none": ["--data", data_npy, "--exclude", "*"],
    }
    for message, args in cases.items():
        src = samples / ("resnet_tiny.pt" if "no_tracking" not in str(args) else "resnet_tiny.pt")
        extra = [] if any("--arch" == a for a in args) else ARCH
        if "no_tracking" in str(args):
            src = tmp_path / "nt.pt"
            sys.path.insert(0, str(ROOT / "tests"))
            import recalibrate_helpers

            torch.save(recalibrate_helpers.no_tracking().state_dict(), src)
        proc = run_normcli("recalibrate", src, *extra, *args, "-o", out)
        assert proc.returncode == 2, (message, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], (message, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert not out.exists() and not list(tmp_path.glob(".out.pt*"))
    ok = run_normcli("recalibrate", samples / "resnet_tiny.pt", *ARCH, "--data", data_npy, "-o", out, "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["output"] == str(out)
    again = run_normcli("recalibrate", samples / "resnet_tiny.pt", *ARCH, "--data", data_npy, "-o", out)
    assert again.returncode == 2 and "--force" in again.stderr
    same = run_normcli("recalibrate", samples / "resnet_tiny.pt", *ARCH, "--data", data_npy,
                       "-o", samples / "resnet_tiny.pt", "--force")
    assert same.returncode == 2 and "is the input file" in same.stderr


def test_checkpoint_with_an_object_the_safe_reader_keeps_inert_is_refused(cli, samples, data_npy, tmp_path):
    import argparse

    ckpt = {"state_dict": _load(samples / "resnet_tiny.pt"), "args": argparse.Namespace(lr=0.1)}
    src = tmp_path / "ns.ckpt"
    torch.save(ckpt, src)
    out = tmp_path / "out.ckpt"
    code, _, err = cli("recalibrate", src, *ARCH, "--data", data_npy, "-o", out)
    assert code == 2 and "argparse.Namespace" in err and "entry args" in err
    assert not out.exists()


def test_function_source_and_call_with_dict_batches(cli, tmp_path):
    helpers = ROOT / "tests" / "recalibrate_helpers.py"
    sys.path.insert(0, str(ROOT / "tests"))
    import recalibrate_helpers

    src = tmp_path / "two.pt"
    torch.save(recalibrate_helpers.two_inputs().state_dict(), src)
    out = tmp_path / "out.pt"
    code, stdout, err = cli("recalibrate", src, "--arch", f"{helpers}:two_inputs", "--data",
                            f"{helpers}:dict_batches", "--call", f"{helpers}:call_dict", "-o", out, "--json",
                            "--batch-size", "5")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["samples"] == 5 * 3 and doc["batches"] == 3
    model = recalibrate_helpers.two_inputs()
    model.load_state_dict(_load(src))
    batches = list(recalibrate_helpers.dict_batches(batch_size=5))[1:]
    a = torch.cat([b["image"] for b in batches]).double()
    torch.testing.assert_close(_load(out)["bn_a.running_mean"].double(), a.mean((0, 2, 3)), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_load(out)["bn_a.running_var"].double(),
                               a.transpose(0, 1).reshape(2, -1).var(1), rtol=1e-6, atol=0)


def test_image_directory_with_resize_and_normalisation(cli, tmp_path):
    from PIL import Image

    helpers = ROOT / "tests" / "recalibrate_helpers.py"
    sys.path.insert(0, str(ROOT / "tests"))
    import recalibrate_helpers

    rng = np.random.default_rng(1)
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    pixels = []
    for i in range(7):
        arr = rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)
        (Image.fromarray(arr).save(images / ("sub" if i % 2 else "") / f"{i}.png"))
    (images / "labels.txt").write_text("ignored")
    src = tmp_path / "m.pt"
    torch.save(recalibrate_helpers.rgb_net().state_dict(), src)
    out = tmp_path / "out.pt"
    code, stdout, err = cli("recalibrate", src, "--arch", f"{helpers}:rgb_net", "--data", images, "--resize", "8,6",
                            "--mean", "0.5", "--std", "0.25", "--batch-size", "3", "-o", out, "--json")
    assert code == 0, err
    from normcli.data import load_image

    files = sorted(images.rglob("*.png"))
    for f in files:
        pixels.append((load_image(f, (8, 6)) - 0.5) / 0.25)
    x = torch.from_numpy(np.stack(pixels[3:])).double()    # sorted walk: the first batch of 3 is held out
    torch.testing.assert_close(_load(out)["bn.running_mean"].double(), x.mean((0, 2, 3)), rtol=1e-6, atol=1e-7)
    assert json.loads(stdout)["samples"] == 4


def test_npz_whose_header_claims_more_than_the_entry_holds_is_refused(cli, samples, tmp_path):
    path = tmp_path / "bomb.npz"
    header = np.lib.format.header_data_from_array_1_0(np.zeros((4, 3, 16, 16), np.float32))
    header["shape"] = (10 ** 9, 3, 16, 16)
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    buf.write(np.zeros((4, 3, 16, 16), np.float32).tobytes())
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", buf.getvalue())
    code, _, err = cli("recalibrate", samples / "resnet_tiny.pt", *ARCH, "--data", path, "-o", tmp_path / "o.pt")
    assert code == 2 and "claims" in err and "corrupt" in err


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_equal_one_process(samples, data_npy, tmp_path):
    single, multi = tmp_path / "single.ckpt", tmp_path / "multi.ckpt"
    base = ["recalibrate", str(samples / "resnet_tiny.ckpt"), *ARCH, "--data", str(data_npy), "--batch-size", "8",
            "--json"]
    one = subprocess.run([sys.executable, "-m", "normcli", *base, "-o", str(single)], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "normcli", *base, "-o", str(multi)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert two.returncode == 0, two.stderr
    doc_one = json.loads(one.stdout)
    doc_two = json.loads(two.stdout)                      # rank 0 alone prints its report
    assert (doc_two["samples"], doc_two["batches"]) == (doc_one["samples"], doc_one["batches"]) == (62, 8)
    assert "on 2 ranks" in two.stderr
    a, b = _load(single)["state_dict"], _load(multi)["state_dict"]
    changed = 0
    for k in a:
        if k.rsplit(".", 1)[-1] in ("running_mean", "running_var"):
            torch.testing.assert_close(b[k].double(), a[k].double(), rtol=1e-6, atol=1e-6 * float(a[k].abs().max()))
            changed += 1
        else:
            assert torch.equal(a[k], b[k]), k
    assert changed == 22
    assert not list(tmp_path.glob(".multi.ckpt*"))


def test_readme_swa_table_is_the_committed_run():
    readme = (ROOT / "README.md").read_text()
    committed = (ROOT / "examples" / "recalibrate_swa.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| ") and ("SWA" in line or "last SGD" in line)]
    assert len(rows) == 4
    for row in rows:
        assert row in committed.splitlines(), row
    assert (ROOT / "examples" / "recalibrate_swa.png").stat().st_size > 1000
