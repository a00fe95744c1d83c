"""Pickles crafted against normcli's own reader, assembled opcode by opcode at test time.

Each builder returns the bytes of one ``data.pkl``; :func:`zip_with_pickle` puts it into a copy of a real
torch zip checkpoint (so the storages it names exist), :func:`legacy_without_storage` breaks a real legacy file.
Nothing here is executed by the reader under test; the point of each is what the reader must refuse.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path

from tests.hostile_payloads import rewrite_zip_entry

PROTO2 = b"\x80\x02"


def s(text: str) -> bytes:
    """BINUNICODE"""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def i(n: int) -> bytes:
    """Any int (LONG1 for big and negative ones)."""
    if 0 <= n < 256:
        return b"K" + bytes([n])
    raw = pickle.encode_long(n)
    return b"\x8a" + bytes([len(raw)]) + raw


def g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def tup(*parts: bytes) -> bytes:
    return b"(" + b"".join(parts) + b"t"


def storage(key: str = "0", numel: int = 16, kind: str = "FloatStorage") -> bytes:
    """A torch storage persistent id (BINPERSID)."""
    return tup(s("storage"), g("torch", kind), s(key), s("cpu"), i(numel)) + b"Q"


def ints(values) -> bytes:
    out = b"("
    for v in values:
        out += b"\x88" if v is True else b"\x89" if v is False else i(v)
    return out + b"t"


def tensor(size, stride, offset: int = 0, key: str = "0", numel: int = 16) -> bytes:
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())"""
    return (g("torch._utils", "_rebuild_tensor_v2") + b"(" + storage(key, numel) + i(offset) + ints(size)
            + ints(stride) + b"\x89" + g("collections", "OrderedDict") + b")R" + b"tR")


def state_dict(entries: dict[str, bytes]) -> bytes:
    """A plain dict of name -> already-assembled value; a whole pickle (PROTO ... STOP)."""
    body = b"}("
    for name, value in entries.items():
        body += s(name) + value
    return PROTO2 + body + b"u."


def bn_state_dict(running_var: bytes) -> bytes:
    """A BatchNorm's four entries, the running variance replaced by ``running_var``."""
    ok = tensor([16], [1])
    return state_dict({"bn1.weight": ok, "bn1.bias": ok, "bn1.running_mean": ok, "bn1.running_var": running_var})


def zip_with_pickle(template: Path, dst: Path, data: bytes) -> Path:
    """A copy of the torch zip ``template`` whose data.pkl is ``data`` (its storages stay as they were)."""
    rewrite_zip_entry(template, dst, "/data.pkl", data)
    return dst


def storage_numel(template: Path, key: str = "0", itemsize: int = 4) -> int:
    with zipfile.ZipFile(template) as z:
        name = next(n for n in z.namelist() if n.endswith(f"/data/{key}"))
        return z.getinfo(name).file_size // itemsize


# ------------------------------------------------------------------------------------------------- classes

def deep_tuple_key(levels: int) -> bytes:
    """{((((...)))): 1} with the key a tuple nested ``levels`` deep (C hashing recurses through it)."""
    return PROTO2 + b"}" + b")" + b"\x85" * levels + b"K\x01s."


def deep_set_item(levels: int) -> bytes:
    """A set (protocol 4 EMPTY_SET/ADDITEMS) whose one item is a tuple nested ``levels`` deep."""
    return b"\x80\x04\x8f(" + b")" + b"\x85" * levels + b"\x90."


def memo_index_bomb() -> bytes:
    """LONG_BINPUT at index 2**31: the C unpickler would size its memo to that index."""
    return PROTO2 + b"}r" + struct.pack("<I", 2 ** 31) + b"."


def memo_unset_get() -> bytes:
    return PROTO2 + b"}h\x05."


def reference_bomb(levels: int = 12, fanout: int = 1000) -> bytes:
    """Dicts whose every value is the previous level's dict: a few KB that expands to fanout**levels nodes for
    any walk without a visited set."""
    out = PROTO2 + b"}q\x00"
    for level in range(1, levels + 1):
        out += b"0}(" + b"".join(s(f"k{j}") + b"h" + bytes([level - 1]) for j in range(fanout)) + b"u"
        out += b"q" + bytes([level])
    return out + b"."


def list_reference_bomb(levels: int = 12, fanout: int = 1000) -> bytes:
    """The same with lists, under a dict key a walker may read (``normcli_swap``)."""
    out = PROTO2 + b"}" + s("normcli_swap") + b"]q\x00"
    for level in range(1, levels + 1):
        out += b"0(" + (b"h" + bytes([level - 1])) * fanout + b"lq" + bytes([level])
    return out + b"s."


def device_string_bomb(levels: int = 30) -> bytes:
    """torch.device(<list repeated by reference 2**levels times>): str() of it would take gigabytes."""
    out = b"]q\x00"
    for level in range(1, levels + 1):
        out += b"0(h" + bytes([level - 1]) + b"h" + bytes([level - 1]) + b"lq" + bytes([level])
    return PROTO2 + b"}" + s("d") + g("torch", "device") + b"(" + s("cpu") + out + b"tRs."


def fan_out(count: int) -> bytes:
    """A list of ``count`` empty dicts, one byte each: many objects from few bytes."""
    return PROTO2 + b"](" + b"}" * count + b"e."


def extension_opcode() -> bytes:
    """EXT1 1: whatever copyreg's extension registry maps code 1 to."""
    return PROTO2 + b"\x82\x01."


def out_of_band_buffer(readonly: bool = False) -> bytes:
    return b"\x80\x05\x97" + (b"\x98" if readonly else b"") + b"."


def persistent_id(pid: bytes) -> bytes:
    return state_dict({"w": g("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + i(0) + ints([4]) + ints([1])
                             + b"\x89" + g("collections", "OrderedDict") + b")R" + b"tR"})


def text_persistent_id() -> bytes:
    return PROTO2 + b"Pstorage\n."


def build_on_tensor(state: bytes) -> bytes:
    """BUILD applied to an allow-listed tensor record (today's numpy-pointer exploit sets ``array_``)."""
    return bn_state_dict(tensor([16], [1]) + state + b"b")


def build_on_global(module: str, name: str) -> bytes:
    """BUILD applied to an allow-listed global itself (would set attributes on the reader's own function)."""
    return state_dict({"x": g(module, name) + b"}" + s("__defaults__") + b")sb"})


def array_interface_smuggling(address: int = 0x1000) -> bytes:
    """A placeholder class given ``__array_interface__`` state pointing at an address of the file's choosing."""
    iface = (b"}(" + s("shape") + tup(i(16)) + s("typestr") + s("<f4") + s("version") + i(3) + s("data")
             + tup(i(address), b"\x89") + b"u")
    fake = g("numpy", "ndarray") + b")\x81" + b"}" + s("__array_interface__") + iface + b"sb"
    ok = tensor([16], [1])
    return state_dict({"bn1.weight": ok, "bn1.bias": ok, "bn1.running_mean": ok, "bn1.running_var": fake})


def legacy_without_storage(src: Path, dst: Path, itemsize: int = 4) -> Path:
    """A copy of the legacy-format file ``src`` (every storage of ``itemsize``-byte elements) whose storage
    key list lost its last key, and that storage its bytes: the pickle still refers to the storage, which
    torch.load would leave uninitialised."""
    data = src.read_bytes()
    f = io.BytesIO(data)
    for _ in range(4):  # magic, protocol, sys info, the object
        for op, _arg, _pos in pickletools.genops(f):
            if op.name == "STOP":
                break
    keys_start = f.tell()
    keys = pickle.load(f)
    pos = f.tell()
    out = data[:keys_start] + pickle.dumps(keys[:-1], protocol=2)
    for _key in keys[:-1]:
        (count,) = struct.unpack("<q", data[pos:pos + 8])
        out += data[pos:pos + 8 + itemsize * count]
        pos += 8 + itemsize * count
    dst.write_bytes(out)
    return dst
