"""Zip archives built so that two readers could see different entries, zip bombs, corrupt compressed data and
JSON bombs: each is refused by the installed `normcli` with exit 2 and one `error:` line naming the reason,
never a signal, within a bounded peak RSS. Plus the positive side: the same archives written cleanly read
exactly like the sample, and names with terminal escapes are shown escaped in tables and exact in JSON.

Every archive is written here, at test time, by a small zip writer that can get each field wrong on purpose.
"""

from __future__ import annotations

import bz2
import json
import lzma
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLES, normcli_executable

ARCH = "samples/models.py:resnet_tiny"
RSS_LIMIT_MB = 300

# --------------------------------------------------------------------------------------- a zip writer

STORED, DEFLATED, BZIP2, LZMA = 0, 8, 12, 14


@dataclass
class Entry:
    name: str
    data: bytes                      # uncompressed
    method: int = STORED
    payload: bytes | None = None     # the bytes written as the entry's data (default: data compressed)
    local: dict = field(default_factory=dict)     # local-header fields to get wrong: name, csize, usize, ...
    central: dict = field(default_factory=dict)   # central-record fields to get wrong
    flags: int = 0x800


def compress(method: int, data: bytes) -> bytes:
    if method == STORED:
        return data
    if method == DEFLATED:
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush()
    if method == BZIP2:
        return bz2.compress(data)
    props = lzma._encode_filter_properties({"id": lzma.FILTER_LZMA1})
    c = lzma.LZMACompressor(lzma.FORMAT_RAW, filters=[lzma._decode_filter_properties(lzma.FILTER_LZMA1, props)])
    return struct.pack("<BBH", 9, 4, len(props)) + props + c.compress(data) + c.flush()


def write_zip(entries: list[Entry], *, prepend: bytes = b"", shift_offsets: bool = False, append: bytes = b"",
              extra_eocd: bool = False) -> bytes:
    """A zip archive of ``entries``; ``prepend`` bytes before it (offsets shifted past them if asked)."""
    out = bytearray(prepend)
    base = len(prepend) if shift_offsets else 0
    records = []
    for e in entries:
        payload = compress(e.method, e.data) if e.payload is None else e.payload
        flags = e.flags | (0x2 if e.method == LZMA else 0)
        fields = {"name": e.name.encode(), "flags": flags, "method": e.method, "crc": zlib.crc32(e.data),
                  "csize": len(payload), "usize": len(e.data)}
        local = {**fields, **e.local}
        central = {**fields, **e.central}
        offset = len(out) - len(prepend) + base
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, local["flags"], local["method"], 0, 0x21,
                           local["crc"], local["csize"], local["usize"], len(local["name"]), 0)
        out += local["name"] + payload
        records.append((central, central.get("offset", offset)))
    cd_offset = len(out) - len(prepend) + base
    cd = bytearray()
    for c, offset in records:
        cd += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, c["flags"], c["method"], 0, 0x21, c["crc"],
                          c["csize"], c["usize"], len(c["name"]), 0, 0, 0, 0, 0, offset)
        cd += c["name"]
    out += cd
    eocd = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(records), len(records), len(cd), cd_offset, 0)
    out += eocd
    if extra_eocd:
        out += eocd
    return bytes(out + append)


def sample_entries(name: str = "resnet_tiny.pt") -> list[Entry]:
    with zipfile.ZipFile(SAMPLES / name) as z:
        return [Entry(i.filename, z.read(i)) for i in z.infolist()]


def find(entries: list[Entry], suffix: str) -> Entry:
    return next(e for e in entries if e.name.endswith(suffix))


def deflate_bomb_payload(total: int, segment: int = 1 << 20) -> bytes:
    """Raw deflate data that inflates to ``total`` zero bytes: one fully flushed segment repeated (each
    segment resets the dictionary, so copies concatenate), then an empty final block."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = c.compress(bytes(segment)) + c.flush(zlib.Z_FULL_FLUSH)
    return piece * (total // segment) + b"\x03\x00"


# ----------------------------------------------------------------------------------- hostile archives

def _dup_last_differs(d: Path) -> bytes:
    entries = sample_entries()
    other = find(sample_entries("resnet_tiny_full.pt"), "data.pkl").data
    entries.append(Entry(find(entries, "data.pkl").name, other))      # a second data.pkl, different bytes
    return write_zip(entries)


def _dup_case(d: Path) -> bytes:
    entries = sample_entries()
    pkl = find(entries, "data.pkl")
    entries.append(Entry(pkl.name.replace("data.pkl", "DATA.PKL"), pkl.data))
    return write_zip(entries)


def _local_patch(suffix: str, **local):
    def build(d: Path) -> bytes:
        entries = sample_entries()
        e = find(entries, suffix)
        e.local = {k: (v(e) if callable(v) else v) for k, v in local.items()}
        return write_zip(entries)
    return build


def _overlap(d: Path) -> bytes:
    """A second entry whose local header and data lie inside the first entry's data; the directory lists both."""
    import io

    entries = sample_entries()
    pkl = find(entries, "data.pkl")
    hidden_name = pkl.name.replace("data.pkl", "hidden").encode()
    crc = zlib.crc32(b"x")
    hidden = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0x800, 0, 0, 0x21, crc, 1, 1, len(hidden_name), 0)
    carrier = Entry(pkl.name.replace("data.pkl", "carrier"), hidden + hidden_name + b"x")
    entries.insert(1, carrier)
    body = write_zip(entries)
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        inside = z.getinfo(carrier.name).header_offset + 30 + len(carrier.name)
    eocd_at = body.rindex(b"PK\x05\x06")
    n, cd_size, cd_offset = struct.unpack_from("<HII", body, eocd_at + 10)
    record = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0x800, 0, 0, 0x21, crc, 1, 1,
                         len(hidden_name), 0, 0, 0, 0, 0, inside) + hidden_name
    eocd = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n + 1, n + 1, cd_size + len(record), cd_offset, 0)
    return body[:eocd_at] + record + eocd


def _past_eof(d: Path) -> bytes:
    entries = sample_entries()
    e = find(entries, "data/0")
    e.local = {"csize": 0x7000_0000, "usize": 0x7000_0000}
    e.central = {"csize": 0x7000_0000, "usize": 0x7000_0000}
    return write_zip(entries)


def _offset_past_eof(d: Path) -> bytes:
    entries = sample_entries()
    find(entries, "data/1").central = {"offset": 0x7FFF_0000}
    return write_zip(entries)


def _bomb(method: int, declared: int | None):
    """data.pkl compressed so that it inflates to GBs. With ``declared`` None the headers tell the truth
    about the size; else they declare only the real pickle's size."""
    def build(d: Path) -> bytes:
        entries = sample_entries()
        pkl = find(entries, "data.pkl")
        if method == DEFLATED:
            payload, total = deflate_bomb_payload(2 << 30), 2 << 30
        else:
            total = 64 << 20  # bz2 and LZMA hold this in a few KB; compressing more would only slow the test
            payload = compress(method, bytes(total))
        size = total if declared is None else declared
        pkl.method, pkl.payload = method, payload
        sizes = {"csize": len(payload), "usize": size & 0xFFFFFFFF, "crc": 0}
        pkl.local, pkl.central = dict(sizes), dict(sizes)
        return write_zip(entries)
    return build


def _corrupt(method: int):
    def build(d: Path) -> bytes:
        entries = sample_entries()
        pkl = find(entries, "data.pkl")
        payload = bytearray(compress(method, pkl.data))
        for i in range(len(payload) // 3, len(payload) // 3 + 24):
            payload[i] ^= 0x5A
        pkl.method, pkl.payload = method, bytes(payload)
        return write_zip(entries)
    return build


def _pt2_json(entry_suffix: str, text: bytes):
    def build(d: Path) -> bytes:
        entries = sample_entries("resnet_tiny.pt2")
        find(entries, entry_suffix).data = text
        return write_zip(entries)
    return build


DEEP = b'{"graph_module": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
WIDE = b"[" + b"{}," * 3_000_000 + b"{}]"
WIDE_CONFIG = b'{"config": {' + b",".join(b'"w%d": [[], [], [], []]' % i for i in range(500_000)) + b"}}"

# name -> (builder, regex the error line must match)
HOSTILE = {
    "duplicate-name-last-differs": (_dup_last_differs, r"duplicate entry name .*data\.pkl"),
    "duplicate-name-ascii-case": (_dup_case, r"duplicate entry name .*torch's reader does not tell"),
    "prepended-junk": (lambda d: write_zip(sample_entries(), prepend=b"MZ" + b"\0" * 510),
                       r"prepended"),
    "prepended-junk-offsets-shifted": (lambda d: write_zip(sample_entries(), prepend=b"\0" * 512,
                                                           shift_offsets=True), r"512 bytes before the first entry"),
    "appended-junk": (lambda d: write_zip(sample_entries(), append=b"trailing bytes"),
                      r"bytes of data after the end-of-directory record"),
    "two-end-records": (lambda d: write_zip(sample_entries(), extra_eocd=True), r"more than one end-of-directory"),
    "local-name-differs": (_local_patch("data.pkl", name=lambda e: e.name.replace("data.pkl", "data.pkX").encode()),
                           r"named .*data\.pkX.* in its local header"),
    "local-size-differs": (_local_patch("data/0", usize=lambda e: len(e.data) - 4, csize=lambda e: len(e.data) - 4),
                           r"size \d+ in its local header and \d+ in the central directory"),
    "local-method-differs": (_local_patch("data.pkl", method=DEFLATED),
                             r"deflate in its local header and stored in the central directory"),
    "local-flags-differ": (_local_patch("data.pkl", flags=0x808), r"flags 0x0808 in its local header"),
    "overlapping-entries": (_overlap, r"entries .* overlap"),
    "entry-past-eof": (_past_eof, r"runs past the end of the file"),
    "offset-past-eof": (_offset_past_eof, r"starts past the end of the file"),
    "deflate-bomb-declared": (_bomb(DEFLATED, None), r"max_record_bytes"),
    "deflate-bomb-lying": (_bomb(DEFLATED, 6000), r"inflates to more than the 6000 bytes it declares"),
    "bzip2-bomb-lying": (_bomb(BZIP2, 6000), r"inflates to more than the 6000 bytes it declares"),
    "lzma-bomb-lying": (_bomb(LZMA, 6000), r"inflates to more than the 6000 bytes it declares"),
    # raw LZMA has no checksum of its own: damage shows as corrupt data, a wrong length or a CRC mismatch
    "deflate-corrupt": (_corrupt(DEFLATED), r"entry '.*data\.pkl': corrupt deflate data"),
    "lzma-corrupt": (_corrupt(LZMA), r"entry '.*data\.pkl'.*(corrupt LZMA data|inflates to|ends early|CRC)"),
    "bzip2-corrupt": (_corrupt(BZIP2), r"entry '.*data\.pkl'.*(corrupt bzip2 data|inflates to|ends early|CRC)"),
    "pt2-json-deep": (_pt2_json("models/model.json", DEEP), r"nests JSON \d+ levels deep.*max_json_depth"),
    "pt2-json-fan-out": (_pt2_json("models/model.json", WIDE), r"JSON values.*max_json_nodes"),
    "pt2-weights-json-fan-out": (_pt2_json("model_weights_config.json", WIDE_CONFIG),
                                 r"model_weights_config\.json holds more than \d+ JSON values.*max_json_nodes"),
}


# ------------------------------------------------------------------------------------------- running

# Runs the command as a grandchild of a small launcher: a child's ru_maxrss starts from its parent's at
# fork, so measured directly from pytest (with torch loaded) it would count pytest's own memory.
_LAUNCH = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
with open(os.environ["ZIP_TEST_USAGE"], "w") as f:
    f.write(f"{usage.ru_maxrss} {os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0}")
sys.exit(os.waitstatus_to_exitcode(status) if not os.WIFSIGNALED(status) else 100)
"""


@dataclass
class Run:
    code: int
    out: str
    err: str
    rss_mb: float
    signal: int


def run_measured(tmp_path: Path, *args) -> Run:
    usage = tmp_path / "usage.txt"
    proc = subprocess.run([sys.executable, "-c", _LAUNCH, *normcli_executable(), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "ZIP_TEST_USAGE": str(usage)})
    rss_kb, signal = usage.read_text().split()
    return Run(proc.returncode, proc.stdout, proc.stderr, int(rss_kb) / 1024, int(signal))


def assert_refused(run: Run, pattern: str) -> str:
    import re

    assert run.signal == 0, f"killed by signal {run.signal}"
    assert run.code == 2, (run.code, run.err)
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.err
    assert not lines[0].startswith("error: unexpected"), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert run.rss_mb < RSS_LIMIT_MB, f"peak RSS {run.rss_mb:.0f} MB"
    return lines[0]


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zip_hostile")


def hostile_path(d: Path, name: str) -> Path:
    p = d / f"{name}.pt2" if name.startswith("pt2") else d / f"{name}.pt"
    if not p.exists():
        p.write_bytes(HOSTILE[name][0](d))
    return p


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_archive_is_refused_by_inspect(tmp_path, hostile_dir, name):
    path = hostile_path(hostile_dir, name)
    before = path.read_bytes()
    run = run_measured(tmp_path, "inspect", path)
    line = assert_refused(run, HOSTILE[name][1])
    assert str(path) in line                      # the message says which file
    assert run.out == ""
    assert path.read_bytes() == before


SWAP_CASES = ["duplicate-name-last-differs", "prepended-junk-offsets-shifted", "two-end-records",
              "local-size-differs", "deflate-bomb-lying", "lzma-corrupt"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["swap", "fuse-export"])
@pytest.mark.parametrize("name", SWAP_CASES)
def test_hostile_archive_is_refused_by_swap_and_fuse_export(tmp_path, hostile_dir, name, command):
    path = hostile_path(hostile_dir, name)
    out = tmp_path / "out"
    out.mkdir()
    args = (["swap", path, "--to", "frn", "-o", out / "o.pt"] if command == "swap" else
            ["fuse-export", path, "-o", out / "o.onnx", "--input-shape", "1,3,32,32"])
    run = run_measured(tmp_path, *args, "--arch", ARCH)
    # torch is imported before the file is read: its own ~230 MB are in the peak too
    assert_refused(run, HOSTILE[name][1])
    assert list(out.iterdir()) == []


def test_python_zipfile_and_torch_really_disagree_on_duplicates(tmp_path):
    """The premise of refusing duplicates: zipfile takes the last copy, torch.load the first."""
    import io

    import torch

    first, last = io.BytesIO(), io.BytesIO()
    torch.save({"w": torch.zeros(2)}, first)
    torch.save({"w": torch.ones(2)}, last)
    with zipfile.ZipFile(first) as zf, zipfile.ZipFile(last) as zl:
        a = [Entry(i.filename, zf.read(i)) for i in zf.infolist()]
        pkl_last = next(zl.read(i) for i in zl.infolist() if i.filename.endswith("data.pkl"))
    # give the second file's storage its own key, so both pickles resolve
    a.append(Entry(find(a, "data.pkl").name, pkl_last.replace(b"X\x01\x00\x00\x000", b"X\x01\x00\x00\x009")))
    a.append(Entry(find(a, "data/0").name[:-1] + "9", struct.pack("<2f", 1.0, 1.0)))
    p = tmp_path / "dup.pt"
    p.write_bytes(write_zip(a))
    with zipfile.ZipFile(p) as z:
        assert z.read(find(a, "data.pkl").name) == a[-2].data
    assert torch.load(p, weights_only=True)["w"].tolist() == [0.0, 0.0]


# ------------------------------------------------------------------------------------- the good side

def test_rewritten_archive_reads_exactly_like_the_sample(tmp_path, run_normcli):
    """The writer above, without faults, gives an archive normcli reads as the sample: so each refusal
    above is about the fault, not about the writer."""
    want = json.loads(run_normcli("inspect", SAMPLES / "resnet_tiny.pt", "--json").stdout)
    want.pop("path")
    for method in (STORED, DEFLATED, BZIP2, LZMA):
        entries = sample_entries()
        for e in entries:
            e.method = method
        p = tmp_path / f"rewritten_{method}.pt"
        p.write_bytes(write_zip(entries))
        got = run_normcli("inspect", p, "--json")
        assert got.returncode == 0, got.stderr
        doc = json.loads(got.stdout)
        doc.pop("path")
        assert doc == want


def test_rewritten_pt2_reads_like_the_sample(tmp_path, run_normcli):
    p = tmp_path / "rewritten.pt2"
    p.write_bytes(write_zip(sample_entries("resnet_tiny.pt2")))
    got, want = run_normcli("inspect", p, "--json"), run_normcli("inspect", SAMPLES / "resnet_tiny.pt2", "--json")
    assert got.returncode == 0, got.stderr
    a, b = json.loads(got.stdout), json.loads(want.stdout)
    a.pop("path"), b.pop("path")
    assert a == b


def test_inflate_budget_stops_compressed_entries(tmp_path):
    """All compressed entries of a file together inflate to at most max_inflated_bytes + ratio x size."""
    from normcli.formats import CheckpointFile
    from normcli.limits import LimitExceeded, Limits
    from normcli.reader import read_tensors

    entries = sample_entries()
    for e in entries:
        e.method = DEFLATED
    p = tmp_path / "deflated.pt"
    p.write_bytes(write_zip(entries))
    tight = Limits(max_inflated_bytes=1000, max_inflate_ratio=0)
    with pytest.raises(LimitExceeded, match=r"max_inflate_ratio.*--limit max_inflate_ratio=N"):
        read_tensors(CheckpointFile(p, tight), limits=tight)
    assert len(read_tensors(p).tensors) > 0    # and the defaults read it


def test_opened_once(tmp_path, monkeypatch):
    """detect + read + loading the norm tensors go through one open of the file, never another by name."""
    import builtins

    from normcli.inspection import inspect_file

    opened = []
    real_open, real_os_open = builtins.open, os.open
    target = str(tmp_path / "one.pt")
    (tmp_path / "one.pt").write_bytes((SAMPLES / "resnet_tiny.pt").read_bytes())

    def spy_open(file, *a, **k):
        if str(file) == target:
            opened.append("open")
        return real_open(file, *a, **k)

    def spy_os_open(file, *a, **k):
        if str(file) == target:
            opened.append("os.open")
        return real_os_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    report = inspect_file(target)
    assert len(report.layers) > 0
    assert opened == ["os.open"]


# -------------------------------------------------------------------------------------- terminal safety

EVIL = "bn\x1b[2J\x1b]0;pwned\x07\u202eevil"


def _evil_checkpoint(tmp_path: Path) -> Path:
    import torch

    g = torch.Generator().manual_seed(0)
    sd = {f"{EVIL}.weight": torch.rand(4, generator=g, dtype=torch.float64).float(),
          f"{EVIL}.bias": torch.zeros(4), f"{EVIL}.running_mean": torch.zeros(4),
          f"{EVIL}.running_var": torch.full((4,), -1.0),          # a finding, so the name is also in its line
          f"{EVIL}.num_batches_tracked": torch.tensor(3)}
    p = tmp_path / "evil_names.pt"
    torch.save(sd, p)
    return p


def test_names_with_terminal_escapes_are_escaped_in_tables_and_exact_in_json(tmp_path, run_normcli):
    p = _evil_checkpoint(tmp_path)
    table = run_normcli("inspect", p, "--fail-on", "never")
    assert table.returncode == 0, table.stderr
    for raw in ("\x1b", "\x07", "\u202e"):
        assert raw not in table.stdout and raw not in table.stderr
    assert "bn\\x1b[2J\\x1b]0;pwned\\x07\\u202eevil" in table.stdout
    doc = json.loads(run_normcli("inspect", p, "--json", "--fail-on", "never").stdout)
    assert [x["name"] for x in doc["layers"]] == [EVIL]
    # an error line quoting names from the file is escaped too
    err = run_normcli("inspect", p, "--layer", "nomatch*")
    assert err.returncode == 2 and "\x1b" not in err.stderr and "\\x1b" in err.stderr, err.stderr


def test_safe_text_escapes_every_non_printable_character():
    from normcli.cli.common import safe_text

    assert safe_text("layer1.0.bn1") == "layer1.0.bn1"
    assert safe_text("résumé.中文") == "résumé.中文"
    assert safe_text("a\x1b[31mb") == "a\\x1b[31mb"
    assert safe_text("\x9b\x00\r\n\t") == "\\x9b\\x00\\x0d\\x0a\\x09"
    assert safe_text("x\u202ey\u2066z\u200f") == "x\\u202ey\\u2066z\\u200f"
    assert safe_text("\U000e0041") == "\\U000e0041"


# ------------------------------------------------------------------------------------------ clean errors

def _safetensors(header: bytes, data: int = 16) -> bytes:
    return struct.pack("<Q", len(header)) + header + bytes(data)


CLEAN_ERRORS = {
    "safetensors-shape-1e400": (_safetensors(b'{"a.running_var": {"dtype": "F32", "shape": [1e400], '
                                             b'"data_offsets": [0, 4]}}'), r"malformed or unsupported"),
    "safetensors-shape-float": (_safetensors(b'{"a.running_var": {"dtype": "F32", "shape": [4.0], '
                                             b'"data_offsets": [0, 16]}}'), r"malformed or unsupported"),
    "safetensors-huge-int": (_safetensors(b'{"a.running_var": {"dtype": "F32", "shape": [' + b"9" * 40
                                          + b'], "data_offsets": [0, 4]}}'), r"malformed or unsupported"),
    "safetensors-overflowing-product": (_safetensors(b'{"a.running_var": {"dtype": "F32", "shape": [4294967296, '
                                                     b'4294967296, 4294967296], "data_offsets": [0, 0]}}'),
                                        r"do not fit its shape"),
    "safetensors-digits-bomb": (_safetensors(b'{"a": {"dtype": "F32", "shape": [' + b"1" * 100_000
                                             + b'], "data_offsets": [0, 4]}}'), r"not valid JSON"),
}


@pytest.mark.parametrize("name", list(CLEAN_ERRORS))
def test_extreme_values_in_headers_end_in_a_specific_error(tmp_path, name):
    data, pattern = CLEAN_ERRORS[name]
    p = tmp_path / f"{name}.safetensors"
    p.write_bytes(data)
    run = run_measured(tmp_path, "inspect", p)
    assert_refused(run, pattern)
    assert "Warning" not in run.err


def test_huge_integer_key_ends_in_a_specific_error(tmp_path):
    import torch

    p = tmp_path / "hugeint.pt"
    torch.save({10 ** 5000: torch.zeros(3)}, p)
    run = run_measured(tmp_path, "inspect", p)
    assert_refused(run, r"no state dict found .*<an integer of \d+ bits>")


def test_pt2_with_a_huge_size_is_a_specific_error(tmp_path):
    entries = sample_entries("resnet_tiny.pt2")
    cfg = find(entries, "model_weights_config.json")
    doc = json.loads(cfg.data)
    first = next(iter(doc["config"].values()))
    first["tensor_meta"]["sizes"][0]["as_int"] = 10 ** 30
    cfg.data = json.dumps(doc).encode()
    p = tmp_path / "huge.pt2"
    p.write_bytes(write_zip(entries))
    assert_refused(run_measured(tmp_path, "inspect", p), r"malformed description in model_weights_config\.json")


# ------------------------------------------------------------------------------------------------ zip64

def write_sparse_zip64(path: Path, entries: list[Entry], big_size: int, *, classic_count_off_by: int = 0) -> None:
    """An archive laid out as torch writes one over 4 GB: data-descriptor flag, zeros in the local headers,
    a zip64 extra field on the big entry, 24-byte descriptors for it, zip64 offsets in the directory for
    every entry past 4 GB, a zip64 end record and locator. The big entry's bytes are a hole in a sparse file:
    the archive takes a few KB of disk."""
    big = Entry(entries[0].name.rsplit("/", 1)[0] + "/data/huge", b"")
    order = [entries[0], big, *entries[1:]]
    records = []
    with open(path, "wb") as f:
        for e in order:
            name, offset = e.name.encode(), f.tell()
            is_big = e is big
            extra = struct.pack("<HHQQ", 1, 16, big_size, 0) if is_big else b""
            f.write(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 45, 0x808, 0, 0, 0, 0, 0, 0, len(name), len(extra))
                    + name + extra)
            if is_big:
                crc, size = 0, big_size
                f.seek(big_size, os.SEEK_CUR)
                f.write(struct.pack("<4sIQQ", b"PK\x07\x08", crc, size, size))
            else:
                crc, size = zlib.crc32(e.data), len(e.data)
                f.write(e.data + struct.pack("<4sIII", b"PK\x07\x08", crc, size, size))
            records.append((name, crc, size, offset))
        cd_offset = f.tell()
        for name, crc, size, offset in records:
            values, size32, offset32 = b"", size, offset
            if size >= 0xFFFFFFFF:
                size32, values = 0xFFFFFFFF, values + struct.pack("<QQ", size, size)
            if offset >= 0xFFFFFFFF:
                offset32, values = 0xFFFFFFFF, values + struct.pack("<Q", offset)
            extra = struct.pack("<HH", 1, len(values)) + values if values else b""
            f.write(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45, 0x808, 0, 0, 0, crc, size32, size32,
                                len(name), len(extra), 0, 0, 0, 0, offset32) + name + extra)
        cd_size, z64, n = f.tell() - cd_offset, f.tell(), len(records)
        f.write(struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, cd_size, cd_offset))
        f.write(struct.pack("<4sIQI", b"PK\x06\x07", 0, z64, 1))
        f.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n + classic_count_off_by, n + classic_count_off_by,
                            cd_size, 0xFFFFFFFF, 0))


def test_zip64_archive_over_4_gb_reads_like_the_sample(tmp_path, run_normcli):
    p = tmp_path / "huge.pt"
    write_sparse_zip64(p, sample_entries(), (4 << 30) + 12345)
    assert p.stat().st_size > 4 << 30
    with zipfile.ZipFile(p) as z:                 # a valid zip64 archive for Python's reader too
        assert z.getinfo(sample_entries()[-1].name).header_offset > 4 << 30
    got = run_normcli("inspect", p, "--json")
    want = run_normcli("inspect", SAMPLES / "resnet_tiny.pt", "--json")
    assert got.returncode == 0, got.stderr
    a, b = json.loads(got.stdout), json.loads(want.stdout)
    a.pop("path"), b.pop("path")
    assert a == b


def test_zip64_and_classic_end_records_that_disagree_are_refused(tmp_path):
    p = tmp_path / "disagree.pt"
    write_sparse_zip64(p, sample_entries(), (4 << 30) + 12345, classic_count_off_by=1)
    assert_refused(run_measured(tmp_path, "inspect", p), r"zip64 and classic end records disagree on the entry count")
