"""Check an ONNX file against golden outputs stored beside it: ``normcli parity`` (no torch).

The golden files are ``.npz`` archives keyed by the ONNX model's input and output names, as
``normcli fuse-export --save-inputs F.npz --save-outputs F.npz`` writes them: ``name`` for a single sample, or
``name:0``, ``name:1``, ... for several samples (each sample may have its own shape). Nothing in them is
unpickled (``allow_pickle=False``), and each array's declared size is checked against the file before it is
read.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from normcli.errors import NormcliError, first_line
from normcli.metrics import DEFAULT_QUANTILE, OutputMetrics, compare_output

# An array in a golden file may declare at most this many bytes per byte of its (compressed) entry: numpy's
# deflate reaches ~1000x only on constant data, and a declared size far beyond it is a decompression bomb.
MAX_EXPANSION = 1100
SAMPLE_KEY = re.compile(r"^(?P<name>.+?)(?::(?P<index>\d+))?$")


@dataclass
class GoldenParity:
    """``normcli parity``'s result: one entry per ONNX output, over every stored sample."""

    model: str
    passed: bool
    atol: float
    rtol: float
    samples: int
    provider: str
    check_stat: str | None
    outputs: list[OutputMetrics] = field(default_factory=list)


def read_npz(path: str | os.PathLike, what: str) -> dict[str, "object"]:
    """name -> numpy array, read without unpickling and with every array's declared size checked first."""
    import numpy as np

    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise NormcliError(f"{what} {path}: no such file") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise NormcliError(f"{what} {path} is not an .npz archive ({first_line(e)}); write it with numpy.savez "
                           "or normcli fuse-export --save-inputs/--save-outputs") from None
    arrays = {}
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise NormcliError(f"{what} {path}: entry {info.filename!r} is not a .npy array")
            name = info.filename[:-4]
            try:
                with archive.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(f)  # the header only: the data is not read yet
                    declared = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
                    if dtype.hasobject:
                        raise NormcliError(f"{what} {path}: array {name!r} holds Python objects; only numeric "
                                           "arrays are read")
                    if declared > max(info.compress_size, 1) * MAX_EXPANSION + 4096:
                        raise NormcliError(f"{what} {path}: array {name!r} declares {declared} bytes but its entry "
                                           f"holds {info.compress_size}; the file is corrupt")
                with archive.open(info) as f:
                    array = np.lib.format.read_array(f, allow_pickle=False)
            except NormcliError:
                raise
            except Exception as e:
                raise NormcliError(f"{what} {path}: cannot read array {name!r} ({first_line(e)})") from None
            if array.dtype.kind not in "fiub":
                raise NormcliError(f"{what} {path}: array {name!r} is {array.dtype}; only numeric arrays are read")
            arrays[name] = array
    if not arrays:
        raise NormcliError(f"{what} {path} holds no arrays")
    return arrays


def by_sample(arrays: dict, names: list[str], kind: str, path) -> list[list]:
    """Arrange ``name`` / ``name:k`` entries into samples (each a list in ``names`` order); ``kind`` is
    ``input`` or ``output``."""
    what = f"{kind}s file"
    samples: dict[int, dict[str, object]] = {}
    for key, value in arrays.items():
        m = SAMPLE_KEY.match(key)
        name, index = m.group("name"), int(m.group("index") or 0)
        if name not in names:
            raise NormcliError(f"{what} {path}: array {key!r} names no {kind} of the model (expected "
                               f"{', '.join(names)}, with an optional :N sample index)")
        samples.setdefault(index, {})[name] = value
    order = sorted(samples)
    if order != list(range(len(order))):
        raise NormcliError(f"{what} {path}: sample indices {order} are not 0..{len(order) - 1}")
    out = []
    for index in order:
        missing = [n for n in names if n not in samples[index]]
        if missing:
            raise NormcliError(f"{what} {path}: sample {index} lacks {', '.join(missing)}")
        out.append([samples[index][n] for n in names])
    return out


def check_golden(model: str | os.PathLike, inputs: str | os.PathLike, expected: str | os.PathLike, *,
                 atol: float, rtol: float, check_stat: str | None = None, quantile: float = DEFAULT_QUANTILE,
                 provider: str | None = None) -> GoldenParity:
    """Run ``model`` in onnxruntime on the stored inputs and compare with the stored outputs."""
    from normcli.parity import onnx_session

    if atol < 0 or rtol < 0:
        raise NormcliError(f"--atol and --rtol must not be negative (got {atol}, {rtol})")
    if not 0.0 <= quantile <= 1.0:
        raise NormcliError(f"--error-quantile must be between 0 and 1, got {quantile}")
    session = onnx_session(model, provider=provider)
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]
    feeds = by_sample(read_npz(inputs, "inputs file"), input_names, "input", inputs)
    wanted = by_sample(read_npz(expected, "outputs file"), output_names, "output", expected)
    if len(feeds) != len(wanted):
        raise NormcliError(f"{inputs} holds {len(feeds)} samples but {expected} holds {len(wanted)}")
    got: list[list] = []
    for index, sample in enumerate(feeds):
        try:
            got.append(session.run(None, dict(zip(input_names, sample))))
        except Exception as e:
            raise NormcliError(f"onnxruntime could not run {model} on sample {index} of {inputs} (shapes "
                               f"{[tuple(x.shape) for x in sample]}): {first_line(e)}") from None
    outputs = [compare_output(name, [g[i] for g in got], [w[i] for w in wanted], atol=atol, rtol=rtol,
                              check_stat=check_stat, quantile=quantile)
               for i, name in enumerate(output_names)]
    return GoldenParity(model=str(model), passed=all(o.passed for o in outputs), atol=atol, rtol=rtol,
                        samples=len(feeds), provider=session.get_providers()[0], check_stat=check_stat,
                        outputs=outputs)
