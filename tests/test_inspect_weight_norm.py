"""inspect finds weight-normalized layers in both storage forms and every format, with g, ||v|| and findings."""

from __future__ import annotations

import contextlib
import io
import json
import textwrap
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrizations

from normcli.inspection import Thresholds, inspect_file


def old_weight_norm(module, dim=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.weight_norm(module, dim=dim)


FORMS = {"hook": old_weight_norm, "parametrize": parametrizations.weight_norm}

ARCH = textwrap.dedent("""
    import warnings

    import torch
    from torch import nn
    from torch.nn.utils import parametrizations


    def build(form="parametrize"):
        if form == "hook":
            warnings.simplefilter("ignore", FutureWarning)
            wn = torch.nn.utils.weight_norm
        else:
            wn = parametrizations.weight_norm
        return nn.Sequential(wn(nn.Conv1d(4, 6, 3), dim=0), wn(nn.ConvTranspose1d(6, 3, 4, stride=2), dim=1),
                             wn(nn.Linear(5, 5), dim=None), nn.BatchNorm1d(3))
""")


def build(form: str) -> nn.Module:
    namespace: dict = {}
    exec(ARCH, namespace)
    model = namespace["build"](form)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).float() + 0.1)
        g0, v0 = _gv(model[0], form)
        v0[2] *= 1e-6     # a collapsed direction: tiny-direction on slice 2
        g0[4] = 0.0       # dead-channels on slice 4
    return model.eval()


def _gv(layer, form):
    if form == "hook":
        return layer.weight_g, layer.weight_v
    return layer.parametrizations.weight.original0, layer.parametrizations.weight.original1


def slice_norms(v: torch.Tensor, dim) -> np.ndarray:
    v = v.double()
    if dim is None:
        return np.array([torch.linalg.vector_norm(v).item()])
    return torch.linalg.vector_norm(v.movedim(dim, 0).flatten(1), dim=1).numpy()


def save(model, folder, fmt):
    state = model.state_dict()
    path = folder / f"model.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("form", list(FORMS))
def test_weight_norm_layers_in_state_dict_files(form, fmt, tmp_path):
    model = build(form)
    report = inspect_file(save(model, tmp_path, fmt))
    layers = {x.name: x for x in report.layers}
    assert report.summary["kinds"] == {"BatchNorm": 1, "WeightNorm": 3}
    for name, dim in (("0", 0), ("1", 1), ("2", None)):
        layer = layers[name]
        g, v = (t.detach() for t in _gv(model[int(name)], form))
        assert layer.kind == "WeightNorm" and layer.inferred and layer.norm_dim == dim
        norms = slice_norms(v, dim)
        assert layer.num_features == norms.size
        np.testing.assert_allclose([layer.weight.min, layer.weight.max], [g.min().item(), g.max().item()])
        np.testing.assert_allclose([layer.direction_norm.min, layer.direction_norm.mean, layer.direction_norm.max],
                                   [norms.min(), norms.mean(), norms.max()], rtol=1e-12)
    findings = {(f.code, f.severity, tuple(f.channels)) for f in layers["0"].findings}
    assert findings == {("tiny-direction", "warning", (2,)), ("dead-channels", "warning", (4,))}
    assert layers["1"].findings == [] and layers["2"].findings == []


@pytest.mark.parametrize("form", list(FORMS))
def test_weight_norm_kind_is_exact_with_arch(form, tmp_path):
    arch = tmp_path / "arch.py"
    arch.write_text(ARCH)
    path = save(build(form), tmp_path, "pt")
    report = inspect_file(path, arch=f"{arch}:build", arch_kwargs={"form": form})
    weight_norms = [x for x in report.layers if x.kind == "WeightNorm"]
    assert [(x.name, x.inferred, x.norm_dim) for x in weight_norms] == [("0", False, 0), ("1", False, 1),
                                                                        ("2", False, None)]


def test_weight_norm_kind_is_exact_from_the_class_names_of_a_full_pickle(tmp_path):
    model = build("hook")  # a parametrized module cannot be pickled whole; the hook form can
    path = tmp_path / "full.pt"
    torch.save(model, path)
    report = inspect_file(path)
    assert [(x.name, x.kind, x.inferred) for x in report.layers if x.kind == "WeightNorm"] == \
        [("0", "WeightNorm", False), ("1", "WeightNorm", False), ("2", "WeightNorm", False)]


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_weight_norm_in_pt2_and_torchscript_archives(fmt, tmp_path):
    model = build("parametrize" if fmt == "pt2" else "hook")[:1]
    x = torch.randn(1, 4, 8)
    path = tmp_path / f"model.{fmt}"
    if fmt == "pt2":
        torch.export.save(torch.export.export(model, (x,)), str(path))
    else:
        torch.jit.trace(model, x).save(str(path))
    layers = [x for x in inspect_file(path).layers if x.kind == "WeightNorm"]
    assert [(x.name, x.inferred, x.norm_dim) for x in layers] == [("0", False, 0)]
    assert {f.code for f in layers[0].findings} == {"tiny-direction", "dead-channels"}


def test_weight_norm_in_an_onnx_file_exported_without_folding(tmp_path):
    model = build("parametrize")
    path = tmp_path / "model.onnx"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(nn.Sequential(model[0]), (torch.randn(1, 4, 8),), str(path), dynamo=False,
                          do_constant_folding=False)
    layers = [x for x in inspect_file(path).layers if x.kind == "WeightNorm"]
    assert [(x.name, x.norm_dim) for x in layers] == [("0", 0)]
    assert {f.code for f in layers[0].findings} == {"tiny-direction", "dead-channels"}


def test_non_finite_v_and_the_tiny_direction_threshold(tmp_path):
    model = build("hook")
    with torch.no_grad():
        model[1].weight_v[0, 1, 0] = float("nan")  # dim 1: slice 1 of the transposed conv
    path = save(model, tmp_path, "safetensors")
    layers = {x.name: x for x in inspect_file(path).layers}
    assert [(f.code, f.channels) for f in layers["1"].findings] == [("non-finite", [1])]
    assert "direction_norm" in layers["1"].findings[0].message
    # the threshold is the user's: 0 flags only an all-zero slice; 0.99 flags every slice below the median
    strict = {x.name: x for x in inspect_file(path, thresholds=Thresholds(tiny_direction_ratio=0)).layers}
    assert "tiny-direction" not in {f.code for f in strict["0"].findings}
    loose = {x.name: x for x in inspect_file(path, thresholds=Thresholds(tiny_direction_ratio=0.99)).layers}
    tiny = next(f for f in loose["0"].findings if f.code == "tiny-direction")
    norms = slice_norms(model[0].weight_v.detach(), 0)
    assert tiny.channels == [int(i) for i in np.flatnonzero(norms < 0.99 * np.median(norms))]


def test_a_g_that_does_not_fit_v_is_not_a_weight_norm(tmp_path):
    # crafted: names of a weight-norm pair, shapes that are not (g keeps a dim v does not have)
    path = tmp_path / "odd.safetensors"
    save_file({"conv.weight_g": torch.ones(5, 1, 1), "conv.weight_v": torch.ones(4, 3, 3),
               "lin.weight_g": torch.ones(2, 3), "lin.weight_v": torch.ones(2, 3)}, str(path))
    assert [x for x in inspect_file(path).layers if x.kind == "WeightNorm"] == []


def test_a_v_that_claims_more_values_than_the_file_holds_is_refused(cli, tmp_path):
    # crafted: a 9-million-element v that is a stride-0 view of one stored value (what the file holds: 1)
    path = tmp_path / "broadcast.pt"
    torch.save({"conv.weight_g": torch.ones(3000, 1), "conv.weight_v": torch.zeros(1).expand(3000, 3000)}, path)
    code, out, err = cli("inspect", path)
    assert code == 2 and out == "" and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert "claims 9000000 elements but the file holds 1" in err


def test_cli_json_maps_g_to_weight_and_v_norms_to_direction_norm(cli, tmp_path):
    path = save(build("parametrize"), tmp_path, "safetensors")
    code, out, err = cli("inspect", path, "--json", "--fail-on", "warning")
    assert code == 1 and err.startswith("error:")  # the warnings reach --fail-on warning
    report = json.loads(out)
    layer = next(x for x in report["layers"] if x["name"] == "0")
    required = {"name", "kind", "inferred", "num_features", "num_batches_tracked", "running_mean", "running_var",
                "weight", "bias", "findings"}
    assert required <= set(layer) and layer["kind"] == "WeightNorm" and layer["inferred"] is True
    assert layer["dim"] == 0 and set(layer["direction_norm"]) == {"min", "mean", "max"}
    assert layer["running_mean"] is None and layer["num_batches_tracked"] is None
    assert {f["code"] for f in layer["findings"]} == {"tiny-direction", "dead-channels"}
    assert report["summary"]["kinds"]["WeightNorm"] == 3

    code, out, _ = cli("inspect", path, "--json", "--tiny-direction-ratio", "0", "--fail-on", "never")
    layer = next(x for x in json.loads(out)["layers"] if x["name"] == "0")
    assert code == 0 and {f["code"] for f in layer["findings"]} == {"dead-channels"}
