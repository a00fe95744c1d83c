"""Data sources: batches of model inputs read from files, image folders or a user's function.

``open_source(spec, ...)`` returns a :class:`DataSource` whose ``batches()`` yields what one forward pass
takes: a tensor, a tuple of tensors (several positional inputs) or a dict (keyword inputs).

- A file or a directory (searched recursively, sorted by path) of ``.npy``, ``.npz``, ``.pt`` (torch.save) or
  ``.safetensors`` files, recognised by content. Each file holds one array (one input) or several named arrays
  (several positional inputs, in the file's order), samples along the first dimension; all files must agree
  on names and per-sample shapes. Batches of ``batch_size`` samples are cut across file boundaries.
  ``.pt`` files are read with normcli's safe reader; nothing in them is executed.
- A file or directory of PNG/JPEG images (Pillow, the ``images`` extra): each image is one sample, float32
  CHW in [0, 1], resized to ``resize`` if given, then ``(x - mean) / std`` per channel.
- ``package.module:callable`` or ``path/to/file.py:callable``: called (with ``batch_size=`` when given)
  and must return an iterable of batches; numpy arrays in it become tensors.

Only ``batches()`` imports torch. Files are opened one at a time; tensors are memory-mapped where the format
allows, so a large data set is not read into memory at once.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from normcli.errors import NormcliError, describe
from normcli.user_code import import_callable

NPY_MAGIC = b"\x93NUMPY"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
MAX_IMAGE_PIXELS = 64_000_000       # a larger image is refused (decompression bombs)
MAX_FILES = 1_000_000               # a directory walk stops with an error beyond this many entries


@dataclass
class DataSource:
    """Where batches come from; ``batches()`` yields them (torch imported on first use)."""

    description: str
    _iter: Callable[[], Iterator[Any]]
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def batches(self) -> Iterator[Any]:
        return self._iter()


def open_source(spec: str, *, batch_size: int | None = None, resize: tuple[int, int] | None = None,
                mean: list[float] | None = None, std: list[float] | None = None) -> DataSource:
    """The data source ``spec`` names: a path (file or directory) or ``module:callable``."""
    if batch_size is not None and batch_size < 1:
        raise NormcliError(f"--batch-size must be at least 1, got {batch_size}")
    path = Path(spec)
    if path.exists():
        files, notes = _collect_files(path)
        kinds = {kind for kind, _ in files}
        if not files:
            raise NormcliError(f"--data {spec}: no .npy, .npz, .pt, .safetensors, PNG or JPEG file found; "
                               "the data source is empty")
        if len(kinds) > 1:
            raise NormcliError(f"--data {spec} mixes images and tensor files; give one kind of data")
        image_opts = resize is not None or mean is not None or std is not None
        if kinds == {"image"}:
            return _image_source(spec, [p for _, p in files], batch_size or 32, resize, mean, std, notes)
        if image_opts:
            raise NormcliError("--resize, --mean and --std apply to image data; "
                               f"{spec} holds tensor files")
        return _array_source(spec, [p for _, p in files], batch_size or 32, notes)
    module, sep, attr = spec.rpartition(":")
    if sep and module and attr.isidentifier():
        if resize is not None or mean is not None or std is not None:
            raise NormcliError("--resize, --mean and --std apply to image files; a function source "
                               "returns ready batches")
        fn = import_callable(spec, "--data")
        return _callable_source(spec, fn, batch_size)
    raise NormcliError(f"--data {spec}: no such file or directory, and not a module:callable; give a file, "
                       "a directory, package.module:function or path/to/file.py:function")


# --------------------------------------------------------------------------------------------- callables


def _callable_source(spec: str, fn: Callable, batch_size: int | None) -> DataSource:
    def iterate():
        try:
            result = fn(batch_size=batch_size) if batch_size is not None else fn()
        except Exception as e:
            raise NormcliError(f"--data {spec} raised {describe(e)}") from None
        try:
            iterator = iter(result)
        except TypeError:
            raise NormcliError(f"--data {spec} returned a {type(result).__name__}, not an iterable of "
                               "batches") from None
        index = 0
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except Exception as e:
                raise NormcliError(f"--data {spec} raised {describe(e)} while producing batch {index}") from None
            yield to_torch(batch, f"batch {index} of {spec}")
            index += 1

    return DataSource(spec, iterate)


def to_torch(obj: Any, where: str, depth: int = 0) -> Any:
    """Numpy arrays -> tensors inside tuples, lists and dicts; anything else that is not a tensor is refused."""
    import numpy as np
    import torch

    if depth > 8:
        raise NormcliError(f"{where} is nested deeper than 8 levels")
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "fiub":
            raise NormcliError(f"{where} holds a {obj.dtype} array; model inputs must be numeric")
        return torch.from_numpy(np.array(obj, copy=True))
    if isinstance(obj, dict):
        return {k: to_torch(v, where, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return tuple(to_torch(v, where, depth + 1) for v in obj)
    if isinstance(obj, (int, float, bool, str)) or obj is None:
        return obj
    raise NormcliError(f"{where} is a {type(obj).__name__}; a batch is a tensor, an array, or a tuple/list/dict "
                       "of them")


# ------------------------------------------------------------------------------------------------- files

def _kind_of(path: Path) -> str | None:
    """'tensor' or 'image' from the file's first bytes, or None for anything else."""
    from normcli.formats import detect_format

    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise NormcliError(f"cannot read {path}: {e.strerror or e}") from None
    if head.startswith(PNG_MAGIC) or head.startswith(JPEG_MAGIC):
        return "image"
    if head.startswith(NPY_MAGIC):
        return "tensor"
    try:
        fmt = detect_format(path)
    except NormcliError:
        fmt = None
    if fmt in ("torch-zip", "torch-legacy", "safetensors", "state-dict", "checkpoint"):
        return "tensor"
    if head.startswith(b"PK\x03\x04") and _is_npz(path):
        return "tensor"
    return None


def _is_npz(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def _collect_files(path: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    if path.is_file():
        kind = _kind_of(path)
        if kind is None:
            raise NormcliError(f"--data {path}: not a .npy, .npz, .pt, .safetensors, PNG or JPEG file "
                               "(recognised by content)")
        return [(kind, path)], []
    found, skipped, seen = [], 0, 0
    for root, dirs, names in os.walk(path, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            seen += 1
            if seen > MAX_FILES:
                raise NormcliError(f"--data {path} holds more than {MAX_FILES} files; give a smaller directory")
            p = Path(root) / name
            if name.startswith(".") or not p.is_file():
                continue
            kind = _kind_of(p)
            if kind is None:
                skipped += 1
            else:
                found.append((kind, p))
    notes = [f"skipped {skipped} file(s) in {path} that are not data"] if skipped else []
    return found, notes


# An array in an .npz may declare at most this many bytes per byte of its (compressed) entry: deflate reaches
# ~1000x only on constant data, and a declared size far beyond it is a decompression bomb.
MAX_EXPANSION = 1100


def _read_npz_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, what: str = "data file"):
    """One array of an .npz, allocated only after its header's size is checked against the entry's sizes."""
    import numpy as np

    name = info.filename[:-4]
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=10000)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=10000)
        if dtype.hasobject:
            raise NormcliError(f"{what} {path}: array {name!r} holds Python objects; only numeric arrays are read")
        if dtype.kind not in "fiub":
            raise NormcliError(f"{what} {path}: array {name!r} holds {dtype} values; only numeric arrays are read")
        count = 1
        for s in shape:
            count *= int(s)
        nbytes = count * dtype.itemsize
        if nbytes > info.file_size - f.tell() or nbytes > max(info.compress_size, 1) * MAX_EXPANSION + 4096:
            raise NormcliError(f"{what} {path}: array {name!r} declares {nbytes} bytes but its entry holds "
                               f"{info.compress_size} compressed, {info.file_size} stored; the file is corrupt")
        data = f.read(nbytes)
    if len(data) != nbytes:
        raise NormcliError(f"{what} {path}: array {name!r} is truncated")
    arr = np.frombuffer(data, dtype=dtype, count=count)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def read_npz(path: str | os.PathLike, what: str = "data file") -> dict[str, Any]:
    """name -> numpy array of an ``.npz`` archive, in the file's order; nothing is unpickled and every array's
    declared size is checked against its entry before it is read. ``what`` names the file in errors."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise NormcliError(f"{what} {path}: no such file") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise NormcliError(f"{what} {path} is not an .npz archive ({describe(e)}); write it with numpy.savez "
                           "or normcli fuse-export --save-inputs/--save-outputs") from None
    arrays = {}
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise NormcliError(f"{what} {path}: entry {info.filename!r} is not a .npy array")
            try:
                arrays[info.filename[:-4]] = _read_npz_member(archive, info, path, what)
            except NormcliError:
                raise
            except Exception as e:
                raise NormcliError(f"{what} {path}: cannot read array {info.filename[:-4]!r} ({describe(e)})"
                                   ) from None
    if not arrays:
        raise NormcliError(f"{what} {path} holds no arrays")
    return arrays


def read_input_tensors(path: str | os.PathLike, option: str = "--input") -> list:
    """The tensors one input file holds, in the file's order, read with the same readers as ``--data``:
    ``.npy`` (one), ``.npz``/``.pt``/``.safetensors`` (each array one positional input), or a PNG/JPEG image
    (one (1, C, H, W) float32 tensor in [0, 1], through the ``images`` extra). Runs no file code."""
    import numpy as np
    import torch

    path = Path(path)
    if not path.is_file():
        raise NormcliError(f"{option} {path}: no such file" if not path.exists() else
                           f"{option} {path} is not a file; give one .npy, .npz, .pt, .safetensors or image file")
    kind = _kind_of(path)
    if kind is None:
        raise NormcliError(f"{option} {path}: not a .npy, .npz, .pt, .safetensors, PNG or JPEG file "
                           "(recognised by content)")
    if kind == "image":
        try:
            import PIL  # noqa: F401
        except ImportError:
            raise NormcliError(f"{option} {path} is an image, which needs Pillow: pip install 'normcli[images]'"
                               ) from None
        return [torch.from_numpy(load_image(path, None)[None].copy())]
    tensors = []
    for name, a in read_arrays(path).items():
        bf16 = isinstance(a, tuple)
        arr = np.array(a[0] if bf16 else a, copy=True)
        if arr.dtype.kind not in "fiub":
            raise NormcliError(f"{option} {path}: array {name} holds {arr.dtype} values; an input must be numeric")
        t = torch.from_numpy(arr)
        tensors.append(t.view(torch.bfloat16) if bf16 else t)
    if not tensors:
        raise NormcliError(f"{option} {path} holds no arrays")
    return tensors


def read_arrays(path: Path) -> dict[str, Any]:
    """The named arrays of one tensor file (numpy arrays or memory maps), in the file's order."""
    import numpy as np

    from normcli.formats import detect_format

    with open(path, "rb") as f:
        head = f.read(8)
    try:
        if head.startswith(NPY_MAGIC):
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            return {"x": arr}
        if head.startswith(b"PK\x03\x04") and _is_npz(path):
            return read_npz(path)
        fmt = detect_format(path)
        if fmt == "safetensors":
            from normcli.reader import read_tensors

            return {k: _lazy_to_numpy(v) for k, v in read_tensors(path).tensors.items()}
        root = read_torch_pickle(path)[0]
        return _arrays_from_root(root, path)
    except NormcliError:
        raise
    except Exception as e:
        raise NormcliError(f"cannot read data file {path} ({describe(e)}); it is truncated or corrupt") from None


def _lazy_to_numpy(lazy):
    import dataclasses

    import numpy as np

    if lazy.dtype == "bfloat16":
        # keep the raw bits; they become torch.bfloat16 in batches()
        return np.asarray(dataclasses.replace(lazy, dtype="uint16").load()).view(np.uint16), "bfloat16"
    return np.asarray(lazy.load())


def _arrays_from_root(root, path: Path) -> dict[str, Any]:
    from normcli.safe_pickle import LazyArray

    if isinstance(root, LazyArray):
        return {"x": _lazy_to_numpy(root)}
    if isinstance(root, dict) and root and all(isinstance(v, LazyArray) for v in root.values()):
        return {str(k): _lazy_to_numpy(v) for k, v in root.items()}
    if isinstance(root, (list, tuple)) and root and all(isinstance(v, LazyArray) for v in root):
        return {f"arr_{i}": _lazy_to_numpy(v) for i, v in enumerate(root)}
    raise NormcliError(f"{path} does not hold a tensor, a dict of tensors or a list of tensors; save the data "
                       "with torch.save(tensor) or torch.save({'name': tensor, ...})")


def read_torch_pickle(path):
    """What a torch.save'd file holds, read with normcli's safe unpickler: plain containers, LazyArray tensors,
    inert placeholders for anything else. ``path`` may be an opened :class:`normcli.formats.CheckpointFile`
    (then nothing is opened again). Returns ``(root, container, globals named by its pickle)``."""
    from normcli import reader
    from normcli.formats import open_checkpoint

    ck = open_checkpoint(path)
    fmt = ck.format
    try:
        if fmt == "torch-legacy":
            root, unpickler, _ = reader._unpickle_legacy(ck)
        elif fmt == "torch-zip":
            root, unpickler, _ = reader._unpickle_zip(ck)
        else:
            raise NormcliError(f"{ck} is a {fmt} file, not a file written by torch.save")
    except NormcliError:
        raise
    except Exception as e:
        raise NormcliError(f"{ck}: cannot read the {fmt} file ({describe(e)}); it is truncated or corrupt") from None
    return root, fmt, list(unpickler.globals_seen)


def _array_source(spec: str, files: list[Path], batch_size: int, notes: list[str]) -> DataSource:
    def iterate():
        import numpy as np
        import torch

        layout: tuple | None = None
        pending: list[dict[str, Any]] = []     # pieces of the batch being assembled
        pending_n = 0
        index = 0

        def emit(pieces):
            names = list(pieces[0])
            out = []
            for name in names:
                parts = [p[name] for p in pieces]
                bf16 = isinstance(parts[0], tuple)
                arrays = [np.ascontiguousarray(a[0] if bf16 else a) for a in parts]
                arr = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
                t = torch.from_numpy(np.array(arr, copy=True))
                out.append(t.view(torch.bfloat16) if bf16 else t)
            return out[0] if len(out) == 1 else tuple(out)

        for path in files:
            arrays = read_arrays(path)
            if not arrays:
                continue
            shapes = {}
            for name, a in arrays.items():
                arr = a[0] if isinstance(a, tuple) else a
                if arr.dtype.kind not in "fiub":
                    raise NormcliError(f"{path}: array {name} holds {arr.dtype} values; data must be numeric")
                if arr.ndim == 0:
                    raise NormcliError(f"{path}: array {name} is a scalar; data needs samples along the first "
                                       "dimension")
                shapes[name] = (tuple(arr.shape[1:]), str(arr.dtype))
            lengths = {(a[0] if isinstance(a, tuple) else a).shape[0] for a in arrays.values()}
            if len(lengths) != 1:
                raise NormcliError(f"{path}: its arrays hold different numbers of samples "
                                   f"({', '.join(f'{k}: {(a[0] if isinstance(a, tuple) else a).shape[0]}' for k, a in arrays.items())})")
            signature = tuple(shapes.items())
            if layout is None:
                layout = signature
                first = path
            elif signature != layout:
                raise NormcliError(f"{path} does not match {first}: arrays and per-sample shapes "
                                   f"{_fmt_layout(signature)} vs {_fmt_layout(layout)}")
            n = lengths.pop()
            start = 0
            while start < n:
                take = min(batch_size - pending_n, n - start)
                pending.append({k: ((a[0][start:start + take], a[1]) if isinstance(a, tuple)
                                    else a[start:start + take]) for k, a in arrays.items()})
                pending_n += take
                start += take
                if pending_n == batch_size:
                    yield emit(pending)
                    index += 1
                    pending, pending_n = [], 0
        if pending_n:
            yield emit(pending)

    return DataSource(spec, iterate, [str(f) for f in files], notes)


def _fmt_layout(signature) -> str:
    return ", ".join(f"{name} {list(shape)} {dtype}" for name, (shape, dtype) in signature)


# ------------------------------------------------------------------------------------------------ images

def _image_source(spec: str, files: list[Path], batch_size: int, resize, mean, std, notes) -> DataSource:
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise NormcliError(f"--data {spec} holds images, which need Pillow: pip install 'normcli[images]'") \
            from None

    def iterate():
        import numpy as np
        import torch

        batch, size, channels = [], None, None
        for path in files:
            arr = load_image(path, resize)
            if channels is None:
                channels = arr.shape[0]
                m, s = _norm_vectors(mean, std, channels)
            if arr.shape[0] != channels:
                arr = _match_channels(arr, channels, path)
            if size is None:
                size = arr.shape[1:]
            elif arr.shape[1:] != size:
                raise NormcliError(f"{path} is {arr.shape[2]}x{arr.shape[1]} but earlier images are "
                                   f"{size[1]}x{size[0]}; pass --resize H,W")
            batch.append((arr - m) / s)
            if len(batch) == batch_size:
                yield torch.from_numpy(np.stack(batch))
                batch = []
        if batch:
            yield torch.from_numpy(np.stack(batch))

    return DataSource(spec, iterate, [str(f) for f in files], notes)


def load_image(path: Path, resize: tuple[int, int] | None):
    """One image as float32 CHW in [0, 1]: 1 channel for greyscale, 3 for colour (alpha dropped)."""
    import warnings

    import numpy as np
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise NormcliError(f"{path} is {img.width}x{img.height} pixels, more than the "
                                       f"{MAX_IMAGE_PIXELS} normcli reads; resize it first")
                img = img.convert("L" if img.mode in ("L", "I;16", "I", "F", "1") else "RGB")
                if resize is not None:
                    img = img.resize((resize[1], resize[0]), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.float32) / 255.0
    except NormcliError:
        raise
    except Exception as e:
        raise NormcliError(f"cannot read image {path} ({describe(e)})") from None
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def _match_channels(arr, channels: int, path: Path):
    import numpy as np

    if arr.shape[0] == 1 and channels == 3:
        return np.repeat(arr, 3, axis=0)
    raise NormcliError(f"{path} has {arr.shape[0]} channels but earlier images have {channels}")


def _norm_vectors(mean, std, channels: int):
    import numpy as np

    def vec(values, default, name):
        if values is None:
            return np.full((channels, 1, 1), default, dtype=np.float32)
        if len(values) == 1:
            values = values * channels
        if len(values) != channels:
            raise NormcliError(f"{name} gives {len(values)} values but the images have {channels} channels")
        return np.asarray(values, dtype=np.float32).reshape(channels, 1, 1)

    m, s = vec(mean, 0.0, "--mean"), vec(std, 1.0, "--std")
    if not (s > 0).all():
        raise NormcliError("--std values must be positive")
    return m, s

