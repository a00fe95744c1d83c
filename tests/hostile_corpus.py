"""Every hostile file the suites build, in one place: crafted zip archives and JSON bombs
(tests/test_zip_hostile.py), crafted pickles and tensor records (tests/test_pickle_hostile.py), pickles that
fill a file of up to 10 MB with the costliest opcode streams, the bypass classes published against block-list
scanners (tests/test_bypass.py), and hostile sharded indexes and torch.distributed.checkpoint directories.

``build(directory, size)`` writes them all and returns name -> path. benchmarks/bench_hostile_suite.py
measures every case against the bar (10 s, 300 MB peak RSS) and tests/test_no_signal.py checks that no
command ever ends by a signal on any of them.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests import pickle_payloads as pp
from tests.conftest import SAMPLES

TEMPLATE = SAMPLES / "resnet_tiny.pt"
PROTO2 = pp.PROTO2


def sized_pickles(size: int) -> dict[str, bytes]:
    """Pickles of about ``size`` bytes made of the opcode streams that cost the walk most per byte."""
    return {
        "deep-tuple-key": pp.deep_tuple_key(size),
        "fan-out-empty-dicts": pp.fan_out(size),
        "memo-references-into-one-list": PROTO2 + b"]q\x00(" + b"h\x00" * (size // 2) + b"e.",
        "marks-opened-and-closed": PROTO2 + b"(1" * (size // 2) + b"N.",
        "none-then-pop": PROTO2 + b"N0" * (size // 2) + b"N.",
        "mark-none-pop-mark": PROTO2 + b"(N1" * (size // 3) + b"N.",
        "dup-then-pop": PROTO2 + b"N" + b"20" * (size // 2) + b".",
        "memo-put-get-churn": PROTO2 + b"Nq\x00" + b"h\x00q\x000" * (size // 5) + b".",
        "nested-lists-appended": PROTO2 + b"]" + b"]a" * (size // 2) + b".",
        "dict-reference-bomb": pp.reference_bomb(levels=12, fanout=min(1000, size // 120)),
        # state that changes every few bytes, or no period at all: walked opcode by opcode
        "new-leaf-into-memo-then-pop": PROTO2 + b"N" + b"Nq\x000" * (size // 4) + b".",
        "memo-references-piling-up": PROTO2 + b"Nq\x00Nq\x01" + b"h\x00q\x01h\x01q\x00" * (size // 8) + b".",
        "aperiodic-int-then-pop": PROTO2 + b"".join(b"K" + bytes([i % 251]) + b"0" for i in range(size // 3)) + b"N.",
        "aperiodic-tuple-and-int": PROTO2 + b"N" + b"".join(b"N\x850K" + bytes([i % 251]) + b"0"
                                                          for i in range(size // 6)) + b".",
    }


def _shards(directory: Path, size: int) -> dict[str, Path]:
    out = {}

    def index(name: str, text: bytes) -> Path:
        d = directory / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.safetensors.index.json").write_bytes(text)
        return d

    out["index-json-deep"] = index("index-json-deep", b'{"weight_map": {"a": "x.safetensors"}, "metadata": '
                                   + b"[" * (size // 2) + b"]" * (size // 2) + b"}")
    entries = max(10, size // 40)
    out["index-json-wide"] = index("index-json-wide", b'{"weight_map": {' + b",".join(
        b'"t%d": "m-%d.safetensors"' % (i, i % 5) for i in range(entries)) + b"}}")
    out["index-too-many-shards"] = index("index-too-many-shards", json.dumps(
        {"weight_map": {f"t{i}": f"m-{i}.safetensors" for i in range(5000)}}).encode())
    out["index-shard-escapes"] = index("index-shard-escapes", json.dumps(
        {"weight_map": {"bn1.weight": "../../../etc/passwd"}}).encode())
    out["index-names-itself"] = index("index-names-itself", json.dumps(
        {"weight_map": {"bn1.weight": "model.safetensors.index.json"}}).encode())
    # DCP: .metadata is a pickle that dcp.load unpickles with pickle.load
    for name, data in {"dcp-metadata-deep": pp.deep_tuple_key(min(size, 1_000_000)),
                       "dcp-metadata-fan-out": pp.fan_out(size),
                       "dcp-metadata-memo-bomb": PROTO2 + b"]q\x00(" + b"h\x00" * (size // 2) + b"e.",
                       "dcp-metadata-ext1": pp.extension_opcode()}.items():
        d = directory / name
        d.mkdir(parents=True, exist_ok=True)
        (d / ".metadata").write_bytes(data)
        (d / "__0_0.distcp").write_bytes(b"\0" * 64)
        out[name] = d
    return out


def build(directory: Path, size: int = 10_000_000) -> dict[str, Path]:
    """Write every hostile case under ``directory``; ``size``: the bytes of the sized pickles."""
    from tests import test_bypass, test_pickle_hostile, test_zip_hostile

    directory.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Path] = {}
    zdir = directory / "zip"
    zdir.mkdir(exist_ok=True)
    for name in test_zip_hostile.HOSTILE:
        cases[f"zip/{name}"] = test_zip_hostile.hostile_path(zdir, name)
    for name, (data, _pattern) in test_zip_hostile.CLEAN_ERRORS.items():
        p = zdir / f"{name}.safetensors"
        p.write_bytes(data)
        cases[f"json/{name}"] = p
    pdir = directory / "pickle"
    pdir.mkdir(exist_ok=True)
    for name, (builder, _expected) in test_pickle_hostile.PICKLE_CASES.items():
        cases[f"pickle/{name}"] = pp.zip_with_pickle(TEMPLATE, pdir / f"{name}.pt", builder())
    for name, data in sized_pickles(size).items():
        cases[f"pickle-{size // 1_000_000 or size}MB/{name}"] = pp.zip_with_pickle(TEMPLATE, pdir / f"sized-{name}.pt",
                                                                                    data)
    bdir = directory / "bypass"
    bdir.mkdir(exist_ok=True)
    marker = directory / "bypass-ran"
    for name, make in test_bypass.RAW.items():
        p = bdir / f"{name}.pt"
        pp.zip_with_pickle(TEMPLATE, p, make(marker))
        cases[f"bypass/{name}"] = p
    for name, path in _shards(directory / "shards", size).items():
        cases[f"shards/{name}"] = path
    return cases
