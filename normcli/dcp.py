"""torch.distributed.checkpoint directories (``.metadata`` + ``*.distcp``), read without torch.distributed and
without running anything the files carry.

``.metadata`` is a pickle of DCP's dataclasses (``Metadata``, ``TensorStorageMetadata``,
``ChunkStorageMetadata``, ``MetadataIndex``, ``_StorageInfo``, ...). normcli's safe unpickler turns each into
an inert placeholder holding the state the pickle gave it; this module reads those placeholders by qualified
name (nothing is imported) and checks every value: each tensor is a list of chunks (offsets and sizes inside
the tensor's shape), each chunk a byte range of one ``.distcp`` file (inside that file) holding a
``torch.save``'d tensor of exactly the chunk's shape, read with the same checked zip/pickle reading as a
``.pt`` file. The chunks of a tensor must cover it exactly once; the full tensor is assembled from them only
when a caller loads it. Non-tensor entries (DCP's ``BytesStorageMetadata``, which ``dcp.load`` unpickles
with ``weights_only=False``) are not read, but the globals their pickles name are reported. A ``.distcp``
written in DCP's safetensors format is read through its own (validated) safetensors header instead.

Layout from torch/distributed/checkpoint/filesystem.py (``_write_item``, ``_StorageInfo``, ``finish``).
"""

from __future__ import annotations

import io
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from normcli.errors import NormcliError
from normcli.limits import DEFAULT_LIMITS, LimitExceeded, Limits

_MD = "torch.distributed.checkpoint.metadata."
_FS = "torch.distributed.checkpoint.filesystem."
# Globals a DCP .metadata names that are DCP's own records (read here as data): anything else in it would
# run under dcp.load's plain pickle.load, and is reported as unsafe.
DCP_RECORDS = {
    _MD + "Metadata", _MD + "TensorStorageMetadata", _MD + "BytesStorageMetadata", _MD + "ChunkStorageMetadata",
    _MD + "TensorProperties", _MD + "MetadataIndex", _MD + "StorageMeta", _MD + "_MEM_FORMAT_ENCODING",
    _FS + "_StorageInfo", _FS + "_StoragePrefix", "torch.serialization._get_layout", "torch.strided",
    "torch.sparse_coo", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.Path",
    "torch.distributed.checkpoint.planner.LoadItemType", "torch.distributed.checkpoint.planner.WriteItemType",
}
MAX_INT = 2 ** 48


def _fail(where, what: str) -> NormcliError:
    return NormcliError(f"{where}: {what}; the checkpoint is corrupt or crafted")


def _checked_unpickle(data: bytes, persistent_load, limits: Limits, where: str):
    """The checked opcode walk, then the allow-list unpickler (normcli.safe_pickle.safe_load), with every
    failure named after ``where``: (value, unpickler, walk)."""
    from normcli.safe_pickle import PickleRefused, safe_load

    try:
        return safe_load(io.BytesIO(data), persistent_load, limits, size=len(data))
    except (PickleRefused, LimitExceeded) as e:
        e.args = (f"{where}: {e.args[0]}",)
        raise
    except NormcliError:
        raise
    except Exception as e:
        raise _fail(where, f"cannot read its pickle ({type(e).__name__}: {str(e)[:80]})") from None


def _state(obj: Any, qualname: str, where) -> dict:
    """The fields a placeholder of class ``qualname`` was given (BUILD state, dict or (dict, slots))."""
    from normcli.safe_pickle import Placeholder

    if not isinstance(obj, Placeholder) or obj.qualname != qualname:
        found = obj.qualname if isinstance(obj, Placeholder) else type(obj).__name__
        raise _fail(where, f"expected a {qualname.rsplit('.', 1)[-1]} record, found {found}")
    state = obj._state
    if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
        state = {**(state[0] or {}), **(state[1] or {})}
    if state is None:
        state = {}
    if not isinstance(state, (dict, tuple)):
        raise _fail(where, f"a {qualname.rsplit('.', 1)[-1]} record holds {type(state).__name__}")
    return state


def _ints(value: Any, where, what: str, limit: int = 64) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > limit or \
            not all(type(v) is int and 0 <= v <= MAX_INT for v in value):
        raise _fail(where, f"{what} is {value!r:.60}, not a list of non-negative integers")
    return tuple(value)


def _int(value: Any, where, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_INT:
        raise _fail(where, f"{what} is {value!r:.40}, not a non-negative integer")
    return value


# ------------------------------------------------------------------------------------------------- reading

class _Mapped:
    """One .distcp file, opened once and memory-mapped; every range is checked against its real size."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
        self.path = path

    def view(self, offset: int, length: int, what: str) -> memoryview:
        if offset + length > self.size or self.mm is None:
            raise _fail(self.path, f"{what} claims bytes {offset}..{offset + length}, past the file's end "
                                   f"({self.size} bytes)")
        return memoryview(self.mm)[offset:offset + length]


def read_saved_tensor(mf: _Mapped, offset: int, length: int, where: str, limits: Limits = DEFAULT_LIMITS):
    """The tensor a ``torch.save`` wrote at ``mf[offset:offset+length]`` (a torch zip), as a LazyArray over
    the mapped bytes; also the globals its pickle names. The archive is read by normcli's checked zip reader
    over exactly that range (entries, local headers and data descriptors checked; nothing outside it read)."""
    from normcli.reader import _one_storage
    from normcli.safe_pickle import LazyArray, PickleRefused, _numpy_dtype, element_size, storage_from_pid
    from normcli.ziparchive import ZipArchive

    region = mf.view(offset, length, where)
    if bytes(region[:4]) != b"PK\x03\x04":
        raise _fail(mf.path, f"{where} is not a torch.save archive (and the file is not in DCP's safetensors "
                             "format)")
    try:
        z = ZipArchive(region, f"{mf.path} ({where})", limits)
        data = z.read(f"{z.prefix}data.pkl", min(limits.max_record_bytes, 1024 * 1024), "its data.pkl")
    except NormcliError:
        raise
    except Exception as e:  # anything the archive parser did not phrase itself
        raise _fail(mf.path, f"{where} is a damaged zip ({type(e).__name__}: {str(e)[:80]})") from None

    def entry_data(ref) -> np.ndarray:
        view = z.view(f"{z.prefix}data/{ref.key}")
        nbytes = ref.numel * element_size(ref.dtype)
        if nbytes > len(view):
            raise _fail(mf.path, f"{where}: storage {ref.key} is shorter than its tensor says")
        return np.frombuffer(view, dtype=_numpy_dtype(ref.dtype), count=ref.numel)

    storages: dict = {}

    def persistent_load(pid):
        ref = _one_storage(storages, storage_from_pid(pid, entry_data, limits))
        if z.get(f"{z.prefix}data/{ref.key}") is None:
            raise PickleRefused(f"the pickle refers to storage {ref.key}, which the archive does not hold")
        return ref

    value, unpickler, walk = _checked_unpickle(data, persistent_load, limits, f"{mf.path} ({where})")
    if not isinstance(value, LazyArray):
        raise _fail(mf.path, f"{where} does not hold a tensor")
    return value, _merged(walk.globals, unpickler.globals_seen)


def _merged(*lists: list[str]) -> list[str]:
    return list(dict.fromkeys(g for names in lists for g in names))


def _safetensors_chunks(mf: _Mapped) -> dict | None:
    """For a .distcp written in DCP's safetensors format: tensor name -> (LazyArray, saved offsets), read from
    the file's own validated header; None when the file is not safetensors (DCP's default torch_save)."""
    import json

    from normcli.formats import read_safetensors_header
    from normcli.reader import SAFETENSORS_DTYPES, _contiguous_strides
    from normcli.safe_pickle import LazyArray, StorageRef, _numpy_dtype, element_size

    head = bytes(mf.view(0, min(9, mf.size), "the file's header"))
    if len(head) < 9 or head[8:9] != b"{" or 8 + int.from_bytes(head[:8], "little") > mf.size:
        return None
    header, start = read_safetensors_header(mf.path)
    try:
        info = json.loads((header.get("__metadata__") or {}).get("DCP_SHARDING_INFO", "{}"))
    except (TypeError, ValueError, RecursionError):
        raise _fail(mf.path, "its DCP_SHARDING_INFO is not valid JSON") from None
    if not isinstance(info, dict):
        raise _fail(mf.path, "its DCP_SHARDING_INFO is not a JSON object")
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[meta["dtype"]]
            shape = _ints(meta["shape"], mf.path, f"the shape of {name!r}")
            begin, end = (_int(x, mf.path, f"the offsets of {name!r}") for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _fail(mf.path, f"safetensors entry {name!r:.80} is malformed or of an unsupported dtype") from None
        numel = 1
        for d in shape:
            numel *= d
        if not begin <= end <= mf.size - start or end - begin != numel * element_size(dtype):
            raise _fail(mf.path, f"safetensors entry {name!r:.80} claims bytes that do not fit its shape or the file")
        saved = (info.get(name) or {}).get("saved_offsets") if isinstance(info.get(name), dict) else None
        saved = None if saved is None else _ints(saved, mf.path, f"the saved offsets of {name!r}")
        ref = StorageRef(name, dtype, numel, lambda r, off=start + begin: np.frombuffer(
            mf.mm, dtype=_numpy_dtype(r.dtype), count=r.numel, offset=off))
        out[name] = (LazyArray(ref, 0, shape, _contiguous_strides(shape), dtype), saved)
    return out


def _pickle_globals_of(view: memoryview, where: str, limits: Limits) -> list[str]:
    """Globals a BYTE_IO item's pickle (a torch.save zip, or a bare pickle) names, by opcodes only."""
    from normcli.reader import _pickle_globals
    from normcli.ziparchive import ZipArchive

    try:
        if bytes(view[:4]) == b"PK\x03\x04":
            z = ZipArchive(view, where, limits)
            return _pickle_globals(z.read(f"{z.prefix}data.pkl", limits.max_record_bytes, "its data.pkl"), limits)
        return _pickle_globals(bytes(view), limits)
    except NormcliError as e:
        if not str(e).startswith(where):
            e.args = (f"{where}: {e.args[0]}",)
        raise
    except Exception as e:  # anything the archive parser did not phrase itself
        raise NormcliError(f"{where}: a non-tensor entry's data is not a readable torch.save archive "
                           f"({type(e).__name__}); the checkpoint is corrupt or crafted") from None


def read_dcp(directory: Path, key: str | None = None, limits: Limits = DEFAULT_LIMITS):
    """Read a torch.distributed.checkpoint directory as one TensorFile (format ``dcp``)."""
    from normcli.reader import STATE_DICT_KEYS, TensorFile, _strip_wrapper_prefixes
    from normcli.safe_pickle import (STORAGE_DTYPES, TORCH_DTYPE_STORAGE, LazyArray, StorageRef, element_size,
                                     is_unsafe_global)
    from normcli.sharded import shard_path

    meta_path = directory / ".metadata"
    try:
        with open(meta_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limits.max_dcp_metadata_bytes:
                raise LimitExceeded(f"{meta_path}: {size} bytes", "max_dcp_metadata_bytes",
                                    limits.max_dcp_metadata_bytes)
            raw = f.read(limits.max_dcp_metadata_bytes + 1)
    except OSError as e:
        raise NormcliError(f"{meta_path}: cannot read ({e.strerror})") from None
    root, unpickler, walk = _checked_unpickle(raw, None, limits, str(meta_path))
    globals_seen = _merged(walk.globals, unpickler.globals_seen)

    md = _state(root, _MD + "Metadata", meta_path)
    sdm = md.get("state_dict_metadata")
    storage = md.get("storage_data")
    if not isinstance(sdm, dict) or not isinstance(storage, dict):
        raise _fail(meta_path, "Metadata has no state_dict_metadata or storage_data mapping")
    if len(storage) > limits.max_dcp_chunks:
        raise LimitExceeded(f"{meta_path}: {len(storage)} stored items", "max_dcp_chunks", limits.max_dcp_chunks)

    # (fqn, chunk offsets) -> (relative path, offset, length)
    where_stored: dict[tuple, tuple[str, int, int]] = {}
    for idx, info in storage.items():
        i = _state(idx, _MD + "MetadataIndex", meta_path)
        s = _state(info, _FS + "_StorageInfo", meta_path)
        fqn = i.get("fqn")
        if not isinstance(fqn, str):
            raise _fail(meta_path, "a MetadataIndex has no tensor name")
        off = i.get("offset")
        off = None if off is None else _ints(off, meta_path, f"the offset of {fqn!r}")
        if s.get("transform_descriptors"):
            raise NormcliError(f"{meta_path}: {fqn!r} is stored through the transforms "
                               f"{list(s['transform_descriptors'])!r:.80} (e.g. compression), which normcli does "
                               "not read")
        rel = s.get("relative_path")
        where_stored[(fqn, off)] = (rel, _int(s.get("offset"), meta_path, f"{fqn!r}'s offset"),
                                    _int(s.get("length"), meta_path, f"{fqn!r}'s length"))

    files: dict[str, _Mapped] = {}
    missing: list[str] = []
    st_files: dict[str, dict | None] = {}

    def open_file(rel: Any) -> _Mapped | None:
        if rel not in files:
            p = shard_path(directory, rel, meta_path)
            if not p.is_file():
                missing.append(rel)
                files[rel] = None
            else:
                files[rel] = _Mapped(p)
        return files[rel]

    tensors: dict[str, LazyArray] = {}
    chunks_seen = 0
    skipped_bytes = []
    for fqn, tmeta in sdm.items():
        if not isinstance(fqn, str):
            raise _fail(meta_path, "a state dict entry has a name that is not a string")
        from normcli.safe_pickle import Placeholder

        if isinstance(tmeta, Placeholder) and tmeta.qualname == _MD + "BytesStorageMetadata":
            stored = where_stored.get((fqn, None))
            if stored is not None:
                mf = open_file(stored[0])
                if mf is not None:
                    found = _pickle_globals_of(mf.view(stored[1], stored[2], repr(fqn)),
                                               f"{mf.path} (entry {fqn!r})", limits)
                    globals_seen += [g for g in found if g not in globals_seen]
            skipped_bytes.append(fqn)
            continue
        t = _state(tmeta, _MD + "TensorStorageMetadata", meta_path)
        props = t.get("properties")
        pstate = _state(props, _MD + "TensorProperties", meta_path)
        dtype_name = pstate[0] if isinstance(pstate, tuple) and pstate else (
            pstate.get("dtype") if isinstance(pstate, dict) else None)
        if not isinstance(dtype_name, str) or dtype_name not in TORCH_DTYPE_STORAGE:
            raise NormcliError(f"{meta_path}: tensor {fqn!r} has dtype {dtype_name!r:.40}, which normcli does not "
                               "read")
        dtype = STORAGE_DTYPES[TORCH_DTYPE_STORAGE[dtype_name]][0]
        shape = _ints(t.get("size"), meta_path, f"the size of {fqn!r}")
        chunk_list = t.get("chunks")
        if not isinstance(chunk_list, list) or not chunk_list:
            raise _fail(meta_path, f"tensor {fqn!r} has no chunks")
        chunks_seen += len(chunk_list)
        if chunks_seen > limits.max_dcp_chunks:
            raise LimitExceeded(f"{meta_path}: more than {limits.max_dcp_chunks} chunks", "max_dcp_chunks",
                                limits.max_dcp_chunks)
        numel = 1
        for s in shape:
            numel *= s
        pieces = []
        covered = 0
        absent = False
        for c in chunk_list:
            cs = _state(c, _MD + "ChunkStorageMetadata", meta_path)
            offsets = _ints(cs.get("offsets"), meta_path, f"a chunk offset of {fqn!r}")
            sizes = _ints(cs.get("sizes"), meta_path, f"a chunk size of {fqn!r}")
            if len(offsets) != len(shape) or len(sizes) != len(shape) or \
                    any(o + n > s for o, n, s in zip(offsets, sizes, shape)):
                raise _fail(meta_path, f"a chunk of {fqn!r} at {list(offsets)} of size {list(sizes)} lies outside "
                                       f"the tensor's shape {list(shape)}")
            stored = where_stored.get((fqn, offsets))
            if stored is None:
                raise _fail(meta_path, f"the chunk of {fqn!r} at {list(offsets)} has no storage entry")
            mf = open_file(stored[0])
            if mf is None:
                absent = True
                continue
            where = f"chunk {list(offsets)} of {fqn!r} in {stored[0]}"
            if stored[0] not in st_files:
                st_files[stored[0]] = _safetensors_chunks(mf)
            if st_files[stored[0]] is not None:  # DCP's safetensors format: the chunk is found by name
                arr, saved = st_files[stored[0]].get(fqn, (None, None))
                if arr is None or (saved is not None and saved != offsets):
                    raise _fail(mf.path, f"{where} is not in the file (or is stored with other offsets)")
            else:
                arr, names = read_saved_tensor(mf, stored[1], stored[2], where, limits)
                globals_seen += [g for g in names if g not in globals_seen]
            if tuple(arr.shape) != sizes or element_size(arr.dtype) != element_size(dtype):
                raise _fail(meta_path, f"{where} holds a {arr.dtype}{list(arr.shape)} tensor, not "
                                       f"{dtype}{list(sizes)}")
            volume = 1
            for n in sizes:
                volume *= n
            covered += volume
            pieces.append((offsets, sizes, arr))
        if absent:
            continue
        _check_cover(fqn, shape, numel, pieces, covered, meta_path)
        if len(pieces) == 1 and tuple(pieces[0][2].shape) == shape:
            tensors[fqn] = pieces[0][2]
            continue
        ref = StorageRef(fqn, dtype, numel, _assembler(shape, dtype, pieces))
        tensors[fqn] = LazyArray(ref, 0, shape, _contiguous(shape), dtype)

    from normcli.inspection import Finding

    findings = []
    if missing:
        findings.append(Finding("shard-missing", "error", f"{len(missing)} .distcp files named by .metadata are "
                                f"missing ({', '.join(repr(m) for m in missing[:6])}); their tensors are left out"))
    named = {v[0] for v in where_stored.values()}
    stray = sorted(p.name for p in directory.iterdir() if p.name.endswith(".distcp") and p.name not in named)
    if stray:
        findings.append(Finding("shard-stray", "error", f"{len(stray)} .distcp files are not named by .metadata: "
                                f"{', '.join(repr(s) for s in stray[:6])}; they are left over from another save"))
    if not tensors:
        raise NormcliError(f"{directory}: the distributed checkpoint holds no tensor that could be read")

    sd, state_key, others = _choose_state_dict(tensors, key, STATE_DICT_KEYS, directory)
    sd, stripped = _strip_wrapper_prefixes(sd)
    unsafe = [g for g in globals_seen if g not in DCP_RECORDS and is_unsafe_global(g)]
    return TensorFile(str(directory), "dcp", "dcp", sd, state_dict_key=state_key, stripped_prefixes=stripped,
                      unsafe_globals=unsafe, other_state_dicts=others, globals=globals_seen,
                      file_findings=findings)


PAIRWISE_CHUNKS = 1024  # a chunk layout that is not a grid is checked pair by pair up to this many chunks


def _check_cover(fqn: str, shape: tuple, numel: int, pieces: list, covered: int, where) -> None:
    """The chunks cover the tensor exactly once: their volumes add up to it and no two overlap.

    The layouts DCP writes (FSDP along dim 0, tensor parallel along 0 or 1, both at once) form a grid: in
    every dimension the chunks' intervals partition it, and each grid cell is one chunk; that is checked in
    O(k log k). Any other layout is checked pair by pair, for at most PAIRWISE_CHUNKS chunks.
    """
    if covered != numel:
        raise _fail(where, f"the chunks of {fqn!r} hold {covered} elements of a tensor of {numel} "
                           f"(shape {list(shape)}): they do not cover it exactly")
    boxes = [(p[0], p[1]) for p in pieces if all(n > 0 for n in p[1])]
    if not shape or len(boxes) <= 1:
        return
    per_dim = [sorted({(o[d], s[d]) for o, s in boxes}) for d in range(len(shape))]
    cells = 1
    for intervals in per_dim:
        cells *= len(intervals)
    if len(set(boxes)) == len(boxes) == cells and all(_partitions(iv, n) for iv, n in zip(per_dim, shape)):
        return
    if len(boxes) > PAIRWISE_CHUNKS:
        raise NormcliError(f"{where}: the {len(boxes)} chunks of {fqn!r} do not form a grid; normcli checks such "
                           f"layouts only up to {PAIRWISE_CHUNKS} chunks")
    boxes.sort()
    for i, (o1, s1) in enumerate(boxes):
        for o2, s2 in boxes[i + 1:]:
            if o2[0] >= o1[0] + s1[0]:
                break  # sorted by the first offset: no later box reaches back
            if all(a < b + m and b < a + n for a, n, b, m in zip(o1, s1, o2, s2)):
                raise _fail(where, f"two chunks of {fqn!r} overlap (at {list(o1)} and {list(o2)})")


def _partitions(intervals: list, size: int) -> bool:
    """Whether the sorted (offset, length) intervals tile [0, size) exactly."""
    end = 0
    for offset, length in intervals:
        if offset != end:
            return False
        end = offset + length
    return end == size


def _assembler(shape: tuple, dtype: str, pieces: list):
    from normcli.safe_pickle import _numpy_dtype

    def read(ref) -> np.ndarray:
        out = np.empty(shape, dtype=_numpy_dtype(dtype))
        for offsets, sizes, arr in pieces:
            values = arr.load()
            if dtype == "bfloat16":  # load() widened it to float32; keep the stored bits
                values = (np.ascontiguousarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
            out[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))] = values.reshape(sizes)
        return out.reshape(-1)

    return read


def _contiguous(shape: tuple) -> tuple:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


def _choose_state_dict(tensors: dict, key: str | None, preferred: tuple, where) -> tuple[dict, str | None, list]:
    """DCP flattens nested state dicts with dots (``model.conv1.weight``, ``optim.state...``): pick the model's
    part the way a nested .pt checkpoint's is picked (``--key`` or the usual names)."""
    groups: dict[str, int] = {}
    for name in tensors:
        head, dot, _ = name.partition(".")
        if dot:
            groups[head] = groups.get(head, 0) + 1
    if key is not None:
        sd = {k[len(key) + 1:]: v for k, v in tensors.items() if k.startswith(key + ".")}
        if not sd:
            raise NormcliError(f"{where}: no tensor names start with {key + '.'!r}; top-level names: "
                               f"{', '.join(sorted(groups)[:12])}")
        return sd, key, []
    if len(groups) > 1 and sum(groups.values()) == len(tensors):
        found = [k for k in preferred if k in groups]
        if found:
            chosen = found[0]
            return ({k[len(chosen) + 1:]: v for k, v in tensors.items() if k.startswith(chosen + ".")}, chosen,
                    found[1:])
    return dict(tensors), None, []
