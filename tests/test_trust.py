"""The trust verdict: the allow-list, the class-versus-code rule, the opcode walk, and inspect's report of it."""

from __future__ import annotations

import io
import json
import os
import pickle

import pytest

from normcli.trust import (TENSOR_GLOBALS, assess_path, classify, pickle_uses, trust_from_uses)


def test_every_global_the_safe_unpickler_stands_in_for_is_tensor():
    from normcli.safe_pickle import SAFE_GLOBALS, STORAGE_DTYPES, TORCH_DTYPE_STORAGE

    names = {f"{m}.{n}" for m, n in SAFE_GLOBALS} | {f"torch.{s}" for s in STORAGE_DTYPES} | \
        {f"torch.{d}" for d in TORCH_DTYPE_STORAGE}
    assert names <= TENSOR_GLOBALS
    assert all(classify(n).kind == "tensor" for n in names)


def test_torch_weights_only_defaults_are_tensor_but_nothing_more():
    import torch._weights_only_unpickler as w

    allowed = set(w._get_allowed_globals())
    # what we call tensor torch also accepts under weights_only=True (apart from DCP's records, paths and
    # TorchScript's list helpers, which torch's own readers of those formats accept)
    extra = {n for n in TENSOR_GLOBALS - allowed
             if not n.startswith(("torch.distributed.checkpoint.", "pathlib.", "torch.jit._pickle."))}
    assert extra <= {f"torch.{x}" for x in ("float", "double", "half", "long", "int", "short", "cfloat",
                                              "cdouble", "chalf", "strided", "sparse_coo", "sparse_csr",
                                              "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn", "jagged",
                                              "contiguous_format", "channels_last", "channels_last_3d",
                                              "preserve_format")} | {"builtins.frozenset", "builtins.slice",
                                                                     "__builtin__.frozenset", "__builtin__.slice",
                                                                     "__builtin__.set", "__builtin__.complex",
                                                                     "__builtin__.bytearray"}, extra


@pytest.mark.parametrize("name,uses,kind", [
    ("samples.models.ResNet", {"newobj", "build"}, "class"),
    ("torch.nn.modules.batchnorm.BatchNorm2d", {"newobj"}, "class"),
    ("__main__.Net", {"newobj"}, "class"),
    ("__torch__.torch.nn.modules.conv.___torch_mangle_3.Conv2d", {"value"}, "class"),
    ("mylib.Config", {"reduce"}, "class"),               # a class with its own __reduce__ (enums, configs)
    ("argparse.Namespace", {"newobj"}, "class"),         # standard-library data class on the list
    ("os.system", {"reduce"}, "code"),
    ("commands.Popen", {"reduce"}, "code"),              # the Python 2 spelling pickle maps to subprocess.Popen
    ("__builtin__.eval", {"reduce"}, "code"),
    ("copy_reg._reconstructor", {"reduce"}, "code"),
    ("posix.system", {"value"}, "code"),
    ("builtins.eval", {"reduce"}, "code"),
    ("builtins.getattr", {"reduce"}, "code"),
    ("builtins.__import__", {"reduce"}, "code"),
    ("importlib.import_module", {"reduce"}, "code"),
    ("functools.partial", {"newobj"}, "code"),
    ("operator.attrgetter", {"reduce"}, "code"),
    ("operator.methodcaller", {"reduce"}, "code"),
    ("pkgutil.resolve_name", {"reduce"}, "code"),
    ("runpy.run_path", {"reduce"}, "code"),
    ("pickle.loads", {"reduce"}, "code"),
    ("subprocess.Popen", {"reduce"}, "code"),            # CapWords, but a standard-library callable
    ("webbrowser.open", {"reduce"}, "code"),
    ("mylib.run_payload", {"reduce"}, "code"),           # a function: not CapWords
    ("mylib.RUN", {"reduce"}, "code"),                   # ALL CAPS is a constant or a function, not a class
    ("mylib.Model", {"newobj", "called-result"}, "code"),  # what it built is called
    ("mylib.Model", {"build-global"}, "code"),           # state set on the class object itself
    ("torch.load", {"reduce"}, "code"),
    ("torch.hub.Loader", {"newobj"}, "code"),            # a module that runs code, whatever the name
    ("numpy.testing.Tester", {"newobj"}, "code"),
    ("<computed global>", {"dynamic"}, "code"),
    ("torch._utils._rebuild_tensor_v2", {"reduce"}, "tensor"),
    ("collections.OrderedDict", {"reduce"}, "tensor"),
    ("torch.distributed.checkpoint.metadata.Metadata", {"newobj"}, "tensor"),
])
def test_classify(name, uses, kind):
    assert classify(name, uses).kind == kind


def test_verdicts():
    assert trust_from_uses({"collections.OrderedDict": {"reduce"}}).verdict == "safe"
    assert trust_from_uses({"a.Model": {"newobj"}, "collections.OrderedDict": set()}).verdict == "needs-classes"
    assert trust_from_uses({"a.Model": {"newobj"}, "os.system": {"reduce"}}).verdict == "unsafe"
    # a pickle a real unpickler stops on: unreadable, unless it named code before that point (which ran)
    assert trust_from_uses({"a.Model": {"newobj"}}, "truncated").verdict == "unreadable"
    assert trust_from_uses({"os.system": {"reduce"}}, "truncated").verdict == "unsafe"


class _Model:
    pass


def test_walk_records_how_each_global_is_used():
    m = _Model()
    m.x = 1
    uses, problem = pickle_uses(pickle.dumps({"m": m, "f": os.path.join}, protocol=2))
    assert problem is None
    assert uses[f"{__name__}._Model"] >= {"newobj", "build"} or uses[f"{__name__}._Model"] >= {"reduce"}
    assert "posixpath.join" in uses or "ntpath.join" in uses


def test_walk_follows_memoised_strings_into_stack_global():
    uses, problem = pickle_uses(pickle.dumps(os.system, protocol=4) + b"")
    assert problem is None and any(n.endswith(".system") for n in uses)
    # os.system and then the same module string fetched back from the memo
    raw = (b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93\x94h\x00\x8c\x06getcwd\x94\x93\x94\x86\x94.")
    uses, problem = pickle_uses(raw)
    assert problem is None
    assert set(uses) == {"os.system", "os.getcwd"}


def test_a_stream_without_stop_is_a_problem_but_keeps_what_it_named():
    uses, problem = pickle_uses(b"cos\nsystem\n(Vx\ntR")
    assert problem and "os.system" in uses


def test_samples_verdicts(samples):
    expected = {"resnet_tiny.pt": "safe", "resnet_tiny.ckpt": "safe", "resnet_tiny_legacy.pt": "safe",
                "resnet_tiny.safetensors": "safe", "resnet_tiny.onnx": "safe", "resnet_tiny.pt2": "safe",
                "resnet_tiny_full.pt": "needs-classes", "resnet_tiny_script.pt": "needs-classes"}
    for name, verdict in expected.items():
        r = assess_path(samples / name)
        assert r.verdict == verdict, (name, r)
    full = assess_path(samples / "resnet_tiny_full.pt")
    assert {"samples.models.ResNet", "torch.nn.modules.batchnorm.BatchNorm2d"} <= {g.name for g in full.globals}


def test_a_dcp_directory_is_judged_from_its_metadata_pickle(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    d = tmp_path / "ckpt"
    dcp.save({"w": torch.ones(3), "opt": {"lr": 0.1, "step": torch.zeros(1)}}, checkpoint_id=str(d), no_dist=True)
    r = assess_path(d)
    assert r.verdict == "safe", r
    assert "torch.distributed.checkpoint.metadata.Metadata" in {g.name for g in r.globals}
    # a non-tensor value with a payload: DCP torch.saves it into a .distcp file, whose pickles are walked too
    from tests.hostile_payloads import Reduce

    marker = tmp_path / "marker"
    e = tmp_path / "evil_ckpt"
    dcp.save({"w": torch.ones(3), "cfg": Reduce(os.system, (f"touch '{marker}'",))}, checkpoint_id=str(e),
             no_dist=True)
    r = assess_path(e)
    assert r.verdict == "unsafe" and any(g.name.endswith(".system") for g in r.globals), r
    assert not marker.exists()
    # a .metadata with a payload makes the directory unsafe
    (d / ".metadata").write_bytes(b"cos\nsystem\n(Vtouch nothing\ntR.")
    assert assess_path(d).verdict == "unsafe"


def test_inspect_reports_trust_and_flags_a_payload_beside_a_state_dict(cli, tmp_path):
    from tests.hostile_payloads import Reduce, nested_checkpoint

    marker = tmp_path / "marker"
    path = nested_checkpoint(tmp_path / "evil.ckpt", Reduce(os.system, (f"touch '{marker}'",)))
    code, out, err = cli("inspect", path, "--json")
    assert code == 1, err     # unsafe-globals is an error finding: --fail-on error fails
    report = json.loads(out)
    assert report["trust"]["verdict"] == "unsafe"
    assert {"name": "posix.system", "kind": "code"} in report["trust"]["globals"] or \
        {"name": "os.system", "kind": "code"} in report["trust"]["globals"]
    finding = next(f for f in report["file_findings"] if f["code"] == "unsafe-globals")
    assert finding["severity"] == "error" and "system" in finding["message"]
    assert report["summary"]["error"] >= 1
    assert report["layers"]  # the weights are still read, inertly
    assert not marker.exists()


def test_inspect_json_of_a_full_pickle_says_needs_classes(cli, samples):
    code, out, _ = cli("inspect", samples / "resnet_tiny_full.pt", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["trust"]["verdict"] == "needs-classes"
    assert [f["code"] for f in report["file_findings"]] == ["needs-classes"]
    assert report["file_findings"][0]["severity"] == "info"


def test_inspect_of_a_plain_state_dict_is_safe_with_no_file_findings(cli, samples):
    code, out, _ = cli("inspect", samples / "resnet_tiny.pt", "--json")
    report = json.loads(out)
    assert code == 0 and report["trust"]["verdict"] == "safe" and report["file_findings"] == []
    assert all(g["kind"] == "tensor" for g in report["trust"]["globals"])


def test_the_walk_limits_are_named_and_raised_with_limit(tmp_path, run_normcli):
    """scan walks with the reader's own checked walk: a pickle over a limit is unreadable with the limit's
    name, and --limit NAME=VALUE raises it."""
    import json

    deep = tmp_path / "deep.pkl"
    deep.write_bytes(b"\x80\x02" + b"(" * 600 + b"N" + b"t" * 600 + b".")   # 600 nested tuples
    rows = json.loads(run_normcli("scan", deep, "--json").stdout)
    assert rows[0]["verdict"] == "unreadable" and "pickle_depth=500" in rows[0]["reason"]
    proc = run_normcli("scan", deep, "--json", "--limit", "pickle_depth=1000")
    assert proc.returncode == 0 and json.loads(proc.stdout)[0]["verdict"] == "safe", proc.stdout
    wide = tmp_path / "wide.pkl"
    wide.write_bytes(b"\x80\x02](" + b"}" * 50_000 + b"e.")                # 50k dicts from 50k bytes
    proc = run_normcli("scan", wide, "--json", "--limit", "pickle_items_base=1000")
    assert "pickle_items_per_byte" in json.loads(proc.stdout)[0]["reason"] and proc.returncode == 2
    assert json.loads(run_normcli("scan", wide, "--json").stdout)[0]["verdict"] == "safe"


def test_pop_of_a_bare_mark_is_followed_as_pickle_does():
    # MARK then POP discards the mark (pickle's rule); the call after it must still be seen
    uses, problem = pickle_uses(b"\x80\x02(0cos\nsystem\n(Vx\ntR.")
    assert problem is None and uses["os.system"] >= {"reduce"}
    assert trust_from_uses(uses).verdict == "unsafe"


def test_state_set_on_an_allowed_global_itself_is_code(run_normcli, tmp_path):
    """BUILD on torch's own rebuild function sets attributes on it for the whole process: never a tensor."""
    import json

    from tests import pickle_payloads as pp
    from tests.conftest import SAMPLES

    path = pp.zip_with_pickle(SAMPLES / "resnet_tiny.pt", tmp_path / "build-global.pt",
                              pp.build_on_global("torch._utils", "_rebuild_tensor_v2"))
    proc = run_normcli("scan", path, "--json")
    row = json.loads(proc.stdout)[0]
    assert proc.returncode == 1 and row["verdict"] == "unsafe", row
    assert {"name": "torch._utils._rebuild_tensor_v2", "kind": "code"} in row["globals"]
