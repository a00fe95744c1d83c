"""Data sources for recalibrate: files cut into batches across file boundaries, several inputs, safe reading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normcli.data import open_source
from normcli.errors import NormcliError


def test_directory_of_npz_files_with_two_arrays_gives_positional_pairs_cut_across_files(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((10, 3, 4)).astype(np.float32)
    b = rng.standard_normal((10, 2)).astype(np.float32)
    np.savez(tmp_path / "part1.npz", image=a[:6], extra=b[:6])
    np.savez_compressed(tmp_path / "part2.npz", image=a[6:], extra=b[6:])
    batches = list(open_source(str(tmp_path), batch_size=4).batches())
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([x for x, _ in batches]), torch.from_numpy(a))
    assert torch.equal(torch.cat([y for _, y in batches]), torch.from_numpy(b))


def test_pt_safetensors_and_npy_files_are_read_by_content(tmp_path):
    from safetensors.torch import save_file

    x = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    torch.save(x[:2].clone(), tmp_path / "a.data")                 # no telling extension
    save_file({"x": x[2:4].contiguous()}, str(tmp_path / "b.bin"))
    np.save(tmp_path / "c.npy", x[4:].numpy())
    (tmp_path / "README").write_text("not data")
    source = open_source(str(tmp_path), batch_size=5)
    got = torch.cat(list(source.batches()))
    assert torch.equal(got, x)
    assert source.notes == [f"skipped 1 file(s) in {tmp_path} that are not data"]


def test_a_pt_file_that_needs_code_to_load_is_refused_without_running_it(tmp_path):
    import argparse

    torch.save({"x": torch.zeros(2, 3), "cfg": argparse.Namespace(a=1)}, tmp_path / "d.pt")
    with pytest.raises(NormcliError, match="does not hold a tensor"):
        list(open_source(str(tmp_path / "d.pt")).batches())


def test_mismatched_files_and_bad_options_are_errors(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 4), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((3, 5), np.float32))
    with pytest.raises(NormcliError, match="does not match"):
        list(open_source(str(tmp_path)).batches())
    with pytest.raises(NormcliError, match="apply to image data"):
        open_source(str(tmp_path / "a.npy"), resize=(4, 4))
    with pytest.raises(NormcliError, match="no such file"):
        open_source(str(tmp_path / "missing"))
    with pytest.raises(NormcliError, match="--batch-size"):
        open_source(str(tmp_path / "a.npy"), batch_size=0)
