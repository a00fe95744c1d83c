"""Check an ONNX file against golden outputs stored beside it: ``normcli parity`` (no torch).

The golden files are ``.npz`` archives keyed by the ONNX model's input and output names, as
``normcli fuse-export --save-inputs F.npz --save-outputs F.npz`` writes them: ``name`` for a single sample, or
``name:0``, ``name:1``, ... for several samples (each sample may have its own shape). They are read by
``normcli.data.read_npz``, the one npz reader: nothing in them is unpickled, and each array's declared size is
checked against the file before it is read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from normcli.data import read_npz
from normcli.errors import NormcliError, first_line
from normcli.metrics import DEFAULT_QUANTILE, OutputMetrics, compare_output

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
