"""Every load path of swap and fuse-export: each norm accounted for once, guessed shapes never silently baked
into the ONNX, and the README's formats table run cell by cell through the installed ``normcli``."""

from __future__ import annotations

import copy
import json
import re
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from normcli.fold import fold_batchnorm

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
ARCH = "samples.models:resnet_tiny"


def resnet_norms() -> set[str]:
    from samples.models import resnet_tiny

    return {name for name, m in resnet_tiny().named_modules() if isinstance(m, nn.BatchNorm2d)}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------------------------------------------
# Part 2: every norm accounted for on every load path


class Mixed(nn.Module):
    """conv+BN (folds), a BN on the raw input (nothing in front, a padded conv behind), an unused BN."""

    def __init__(self, group_norm: bool = False):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4) if group_norm else nn.Identity()
        self.unused = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.gn(torch.relu(self.bn(self.conv(self.bn_in(x)))))


def _scripted_mixed(group_norm: bool = False) -> torch.jit.ScriptModule:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = Mixed(group_norm)
    for bn in (model.bn_in, model.bn, model.unused):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64).float())
        bn.running_var.copy_((torch.rand(bn.num_features, generator=g, dtype=torch.float64) + 0.5).float())
    return torch.jit.script(model.eval())


def test_torchscript_fold_reports_each_norm_once_with_a_reason_for_those_left():
    model = _scripted_mixed()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 8, 8))).float()
    folded, report = fold_batchnorm(model, example_inputs=(x,))
    assert report.method == "torchscript"
    assert report.folded == [{"norm": "bn", "into": "conv"}]
    unfolded = {r["norm"]: r["reason"] for r in report.unfolded}
    assert sorted(unfolded) == ["bn_in", "unused"]
    assert "not the output of a conv" in unfolded["bn_in"]
    assert "never calls it" in unfolded["unused"]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-4)
        # the converted graph keeps batch and spatial sizes symbolic: the fold is valid at other sizes too
        y = torch.randn(3, 3, 12, 10)
        torch.testing.assert_close(folded(y), model(y), atol=1e-5, rtol=1e-4)


def test_torchscript_without_example_inputs_lists_every_norm_as_left_with_the_reason():
    model = _scripted_mixed()
    folded, report = fold_batchnorm(model)
    assert isinstance(folded, torch.jit.ScriptModule) and report.folded == [] and report.method == "none"
    assert sorted(r["norm"] for r in report.unfolded) == ["bn", "bn_in", "unused"]
    assert all("example inputs" in r["reason"] for r in report.unfolded)


def test_torchscript_that_torch_cannot_convert_keeps_every_norm_with_the_converters_reason():
    model = _scripted_mixed(group_norm=True)  # scripted GroupNorm holds a loop the converter refuses
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 8, 8))).float()
    folded, report = fold_batchnorm(model, example_inputs=(x,))
    assert isinstance(folded, torch.jit.ScriptModule) and report.folded == [] and report.method == "none"
    assert sorted(r["norm"] for r in report.unfolded) == ["bn", "bn_in", "gn", "unused"]
    assert all("could not be converted to a torch.export graph" in r["reason"] for r in report.unfolded)


def test_a_torch_export_module_is_folded_on_its_graph_and_every_norm_reported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.LayerNorm([4, 6, 6])).eval()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 6, 6))).float()
    module = torch.export.export(model, (x,)).module()
    for m in module.modules():  # a torch.export module refuses eval(); its graph was captured in eval already
        m.training = False
    folded, report = fold_batchnorm(module, example_inputs=(x,))
    assert report.method == "export"
    assert report.folded == [{"norm": "2", "into": "1"}]
    assert sorted(r["norm"] for r in report.unfolded) == ["0", "4"]
    assert not any(n.target == torch.ops.aten._native_batch_norm_legit_no_training.default
                   for n in folded.graph.nodes if n.op == "call_function" and "2" in str(n.args[1:2]))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Part 4: a guessed shape never silently becomes part of the artifact


ARCH_FILE = textwrap.dedent('''
    import torch
    from torch import nn


    def _calibrated(model):
        g = torch.Generator().manual_seed(3)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64).float())
                m.running_var.copy_((torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5).float())
        return model


    def pooled():
        """A classifier trained at 32x32 that runs at any size (global pooling before the Linear)."""
        torch.manual_seed(0)
        return _calibrated(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)))


    def flat64():
        """Runs at 64x64 only: a Linear after flatten."""
        torch.manual_seed(0)
        return _calibrated(nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(),
                                         nn.Flatten(), nn.Linear(2 * 64 * 64, 5)))


    def mixed_norms():
        """BatchNorm after a conv, and norms that normalise each sample by itself (not foldable)."""
        torch.manual_seed(0)
        return _calibrated(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                         nn.GroupNorm(2, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                         nn.LayerNorm(4), nn.Linear(4, 3), nn.RMSNorm(3)))


    def flat32():
        """Runs at 32x32 only: the guessed 64x64 does not fit it."""
        torch.manual_seed(0)
        return _calibrated(nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(),
                                         nn.Flatten(), nn.Linear(2 * 32 * 32, 5)))
''')


@pytest.fixture(scope="module")
def guess_models(tmp_path_factory) -> dict[str, tuple[str, Path, nn.Module]]:
    """name -> (--arch spec, its saved state dict, the model): written once for the module's tests."""
    import importlib.util

    d = tmp_path_factory.mktemp("guess")
    file = d / "guessmodels.py"
    file.write_text(ARCH_FILE)
    spec = importlib.util.spec_from_file_location("guessmodels", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = {}
    for name in ("pooled", "flat64", "flat32", "mixed_norms"):
        model = getattr(module, name)().eval()
        torch.save(model.state_dict(), d / f"{name}.pt")
        out[name] = (f"{file}:{name}", d / f"{name}.pt", model)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_model_used_at_32x32_gets_an_onnx_that_accepts_32x32(run_normcli, tmp_path, guess_models, exporter):
    arch, weights, model = guess_models["pooled"]
    out = tmp_path / "pooled.onnx"
    result = run_normcli("fuse-export", weights, "--arch", arch, "-o", out, "--exporter", exporter, "--json",
                         "--samples", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["input_shape_guessed"] is True and report["input_shapes"] == [[1, 3, 64, 64]]
    assert report["input_shape_fixed"] is None
    assert report["dynamic_dims"] == [[2, 3]]
    assert len(report["checked_shapes"]) == 2 and [[1, 3, 64, 64]] in report["checked_shapes"]
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.HasField("dim_value") for d in dims] == [True, True, False, False]
    # the size the model is used at, which the guess did not know, in a real onnxruntime session
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_a_model_that_runs_at_one_size_says_the_guessed_shape_is_now_fixed(run_normcli, cli, tmp_path,
                                                                           guess_models):
    arch, weights, _ = guess_models["flat64"]
    out = tmp_path / "flat.onnx"
    result = run_normcli("fuse-export", weights, "--arch", arch, "-o", out, "--json", "--samples", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["input_shape_guessed"] is True and report["dynamic_dims"] == [[]]
    assert "guessed" in report["input_shape_fixed"] and "--input-shape" in report["input_shape_fixed"]
    assert report["checked_shapes"] == [[[1, 3, 64, 64]]]
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "guessed" in warning[0] and "accepts only" in warning[0]
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 64, 64]
    # the human report says it too (the same entry point, in this process)
    code, stdout, _ = cli("fuse-export", weights, "--arch", arch, "-o", tmp_path / "flat2.onnx", "--samples", "1",
                          "--exporter", "torchscript")
    assert code == 0 and "now fixed in the ONNX" in stdout


@pytest.mark.slow
def test_a_guess_the_model_cannot_run_is_an_error_that_asks_for_the_shape(run_normcli, tmp_path, guess_models):
    arch, weights, _ = guess_models["flat32"]
    out = tmp_path / "flat.onnx"
    result = run_normcli("fuse-export", weights, "--arch", arch, "-o", out)
    assert result.returncode == 2 and not out.exists()
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "1,3,64,64" in lines[0] and "--input-shape" in lines[0]
    fixed = run_normcli("fuse-export", weights, "--arch", arch, "-o", out, "--input-shape", "1,3,32,32", "--json",
                        "--samples", "1", "--exporter", "torchscript")
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads(fixed.stdout)["input_shape_guessed"] is False


@pytest.mark.slow
def test_fuse_export_lists_norms_it_cannot_fold_with_the_reason(run_normcli, tmp_path, guess_models):
    """A state dict with --arch: every norm layer of the model once, those that normalise each sample by
    itself (GroupNorm, LayerNorm, RMSNorm) left in place with that reason."""
    arch, weights, model = guess_models["mixed_norms"]
    out = tmp_path / "mixed.onnx"
    result = run_normcli("fuse-export", weights, "--arch", arch, "-o", out, "--input-shape", "2,3,16,16",
                         "--samples", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    norms = {name for name, m in model.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm,
                                                                          nn.LayerNorm, nn.RMSNorm))}
    names = [r["norm"] for r in report["folded"] + report["unfolded"]]
    assert sorted(names) == sorted(norms) == ["1", "3", "6", "8"]
    assert report["folded"] == [{"norm": "1", "into": "0"}]
    for entry in report["unfolded"]:
        assert "normalises each sample with that sample's own statistics" in entry["reason"], entry
    assert report["parity"]["passed"]


# ---------------------------------------------------------------------------------------------------------
# The README's formats table, run cell by cell


FORMAT_FILES = {  # the README row (its first words) -> the sample file of that format
    "`torch.save` state dict": "resnet_tiny.pt",
    "nested training checkpoint": "resnet_tiny.ckpt",
    "full pickled `nn.Module`": "resnet_tiny_full.pt",
    "TorchScript archive": "resnet_tiny_script.pt",
    "torch.export archive": "resnet_tiny.pt2",
    "safetensors": "resnet_tiny.safetensors",
    "ONNX model": "resnet_tiny.onnx",
}
COMBINATIONS = ("(no option)", "--arch", "--unsafe-load", "--arch --unsafe-load")


def formats_table() -> list[dict[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Formats read", 1)[1].split("\n## ", 1)[0]
    # the first table: one file per format (multi-file checkpoints follow in their own table)
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = lines[start:end]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in row.strip("|").split("|")))) for row in rows[2:]]


def works_with(cell: str) -> set[str]:
    """The option combinations a swap / fuse-export cell lists (each in backticks); "no" lists none."""
    return {c.strip() for c in re.findall(r"`([^`]*)`", cell)}


def _cells():
    for row in formats_table():
        fmt = next(f for key, f in FORMAT_FILES.items() if row["format"].startswith(key))
        yield pytest.param(fmt, "inspect", row["inspect"], None, id=f"{fmt}-inspect")
        for command in ("swap", "fuse-export"):
            for combo in COMBINATIONS:
                yield pytest.param(fmt, command, combo, works_with(row[command]), id=f"{fmt}-{command}-{combo}")


def test_the_formats_table_names_every_sample_format_and_only_known_combinations():
    rows = formats_table()
    assert len(rows) == len(FORMAT_FILES)
    for row in rows:
        assert {"inspect", "swap", "fuse-export"} <= set(row), row
        for command in ("swap", "fuse-export"):
            assert works_with(row[command]) <= set(COMBINATIONS), row[command]


# Every sample file holds the same weights, so one reference checks the ONNX of every load path. The pt2 was
# exported at batch 2, 32x32: every cell runs at that shape (the guessed-shape path has its own tests above).
CELL_SHAPE = "2,3,32,32"
# the aten graphs fuse-export folds itself (TorchScript and .pt2 without --arch) are exported with the default
# exporter; the other load paths give the same nn.Module to the exporter, so the faster one checks them
GRAPH_CELLS = {("resnet_tiny_script.pt", "--unsafe-load"), ("resnet_tiny.pt2", "--unsafe-load")}


@pytest.fixture(scope="module")
def reference():
    """resnet_tiny with the samples' weights in float64, and a fixed input at the cells' shape."""
    from samples.models import resnet_tiny

    model = resnet_tiny()
    model.load_state_dict(torch.load(SAMPLES / "resnet_tiny.pt", weights_only=True))
    model = model.double().eval()
    x = np.random.default_rng(0).standard_normal([int(d) for d in CELL_SHAPE.split(",")])
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    return x.astype(np.float32), want


@pytest.mark.slow
@pytest.mark.parametrize("file, command, combo, works", list(_cells()))
def test_every_cell_of_the_readme_formats_table(run_normcli, tmp_path, reference, file, command, combo, works):
    if command == "inspect":
        result = run_normcli("inspect", SAMPLES / file)
        assert combo.startswith("yes")
        assert result.returncode == 0, result.stderr
        return
    options = [] if combo == "(no option)" else combo.split()
    if "--arch" in options:
        options[options.index("--arch") + 1:options.index("--arch") + 1] = [ARCH]
    out = tmp_path / ("out.pt" if command == "swap" else "out.onnx")
    extra = ["--to", "frn"] if command == "swap" else ["--samples", "1"]
    if command == "fuse-export" and (file, combo) not in GRAPH_CELLS:
        extra += ["--exporter", "torchscript"]
    result = run_normcli(command, SAMPLES / file, *extra, "-o", out, "--input-shape", CELL_SHAPE, "--json",
                         *options)
    if combo not in works:
        assert result.returncode == 2, (result.returncode, result.stderr)
        lines = error_lines(result.stderr)
        assert len(lines) == 1 and "Traceback" not in result.stderr
        assert not out.exists()
        if works:  # the message points to an option that, added to what was given, is in a working combination
            named = {o for o in ("--arch", "--unsafe-load") if o in lines[0]}
            assert any(set(w.split()) - {"(no", "option)"} <= set(combo.split()) | named for w in works), lines[0]
        return
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    report = json.loads(result.stdout)
    if command == "swap":
        assert sorted(r["name"] for r in report["replaced"]) == sorted(resnet_norms())
        return
    # every norm of the model accounted for exactly once, on this load path; all 11 sit after a conv
    names = [r["norm"] for r in report["folded"]] + [r["norm"] for r in report["unfolded"]]
    assert sorted(names) == sorted(resnet_norms())
    assert {r["norm"] for r in report["folded"]} == resnet_norms(), report["unfolded"]
    assert report["parity"]["passed"] and report["onnx"]["batchnorm_nodes"] == 0
    # the written ONNX computes the samples' model, checked here in onnxruntime against a float64 torch run
    x, want = reference
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


class _SizeBranch(nn.Module):
    """Runs at any size, but computes something else at 64x64: an exporter can only trace one branch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if x.shape[-1] == 64:
            return y.mean(dim=(2, 3))
        return y.amax(dim=(2, 3))


@pytest.mark.slow
def test_when_the_fold_graph_fixes_a_guessed_shape_the_report_says_so_and_parity_skips_the_other_size(tmp_path):
    from normcli.fuse_export import fuse_export

    model = _SizeBranch().eval()
    report = fuse_export(model, tmp_path / "b.onnx", exporter="dynamo", samples=1)
    assert report.input_shape_guessed and report.input_shapes == [[1, 3, 64, 64]]
    assert report.dynamic_dims == [[]]  # torch.export specialised the size its branch depends on
    assert "fixed the shape" in report.input_shape_fixed and "--input-shape" in report.input_shape_fixed
    assert report.checked_shapes == [[[1, 3, 64, 64]]] and report.parity.passed
    assert [d.dim_value for d in onnx.load(str(tmp_path / "b.onnx")).graph.input[0].type.tensor_type.shape.dim] \
        == [1, 3, 64, 64]
