"""Error metrics of one output against its reference: what a user needs to act on a parity result.

numpy only (no torch, no onnx): ``normcli parity`` and fuse-export's check share it.

For each output, over all samples: max, mean, median and p99 of the absolute and relative error, cosine
similarity, the tolerance that would have passed (the smallest atol at the given rtol, the smallest rtol at the
given atol, both under the element rule ``|a - b| <= atol + rtol * |b|``), and for class-score outputs (N, K)
the top-1 and top-5 agreement. The relative error is taken where the reference is not zero.

What must be within tolerance:

- by default every element: ``|a - b| <= atol + rtol * |b|`` (numpy's ``allclose`` rule, reference ``b``);
- with ``check_stat`` in max, mean, median, quantile: Polygraphy's ``--check-error-stat`` meaning, the output
  fails when that statistic of the absolute error exceeds atol AND the same statistic of the relative error
  exceeds rtol (a NaN statistic exceeds any tolerance).

A reference that holds NaN or Inf is never a pass: there is nothing to compare against (``problem`` says
``non-finite: ...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

CHECK_STATS = ("max", "mean", "median", "quantile")
DEFAULT_QUANTILE = 0.99


@dataclass
class OutputMetrics:
    """Errors of one output over all samples; every figure is a float64 computation on the raw outputs."""

    name: str
    max_abs: float
    max_rel: float
    mean_abs: float
    median_abs: float
    p99_abs: float
    mean_rel: float
    median_rel: float
    p99_rel: float
    cosine: float
    required_atol: float      # the smallest atol that passes every element at the given rtol
    required_rtol: float      # the smallest rtol that passes every element at the given atol
    top1_agreement: float | None
    top5_agreement: float | None
    mismatched: int           # elements out of tolerance under the element rule
    elements: int
    passed: bool
    problem: str | None = None   # "non-finite" reference, or a shape/count mismatch
    quantile_abs: float | None = None   # with check_stat "quantile": the chosen quantile's errors
    quantile_rel: float | None = None
    nonfinite_reference: int = 0         # reference elements that are NaN or Inf


def compare_output(name: str, actual: Sequence, reference: Sequence, *, atol: float, rtol: float,
                   check_stat: str | None = None, quantile: float = DEFAULT_QUANTILE) -> OutputMetrics:
    """Compare one output over several samples: ``actual[i]`` against ``reference[i]`` for each sample i."""
    import numpy as np

    if check_stat is not None and check_stat not in CHECK_STATS:
        raise ValueError(f"check_stat must be one of {', '.join(CHECK_STATS)}, not {check_stat!r}")
    problem = None
    for index, (a, b) in enumerate(zip(actual, reference)):
        if np.shape(a) != np.shape(b):
            problem = f"shape {tuple(np.shape(a))} against {tuple(np.shape(b))} (sample {index})"
    if len(actual) != len(reference):
        problem = f"{len(actual)} samples against {len(reference)}"
    if problem is not None:
        elements = int(sum(np.size(b) for b in reference))
        nan = float("nan")
        return OutputMetrics(name, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, None, None,
                             elements, elements, False, problem)

    a = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in actual]) if actual else np.zeros(0)
    b = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in reference]) if reference else np.zeros(0)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        diff = np.abs(a - b)
        same = (a == b) | (np.isnan(a) & np.isnan(b))  # agreement, matching infinities and NaNs included
        diff[same] = 0.0
        nonzero = b != 0
        rel = diff[nonzero] / np.abs(b[nonzero])
        scaled = rtol * np.abs(b)
        close = same | (np.isfinite(diff) & (diff <= atol + scaled))
        # per element, the smallest tolerance that passes under the rule exactly as it is evaluated here:
        # diff - rtol*|b| rounds, and (diff - rtol*|b|) + rtol*|b| can land one ulp below diff
        need_atol = _smallest_passing(diff, lambda t: t + scaled, np.maximum(diff - scaled, 0.0))
        need_atol[same] = 0.0
        mag = np.abs(b)
        ratio = np.where(diff > atol, (diff - atol) / np.where(mag > 0, mag, 1.0), 0.0)
        need_rtol = _smallest_passing(diff, lambda t: atol + t * mag, np.maximum(ratio, 0.0))
        need_rtol[(diff > atol) & (mag == 0)] = np.inf  # no rtol helps against a zero reference
        need_rtol[same] = 0.0
        need_atol[np.isnan(diff) & ~same] = np.inf  # NaN against a number: no tolerance passes
        need_rtol[np.isnan(diff) & ~same] = np.inf
    mismatched = int((~close).sum())
    nonfinite = int(b.size - np.count_nonzero(np.isfinite(b)))
    if nonfinite:
        problem = (f"non-finite: the reference holds NaN/Inf in {nonfinite} of {b.size} elements, so agreement "
                   "proves nothing")

    def stat(values, fn):
        if not values.size:
            return 0.0
        with np.errstate(all="ignore"):  # inf errors: a quantile interpolates inf - inf
            return float(fn(values))

    metrics = OutputMetrics(
        name=name,
        max_abs=stat(diff, np.max), max_rel=stat(rel, np.max),
        mean_abs=stat(diff, np.mean), median_abs=stat(diff, np.median),
        p99_abs=stat(diff, lambda v: np.quantile(v, 0.99)),
        mean_rel=stat(rel, np.mean), median_rel=stat(rel, np.median),
        p99_rel=stat(rel, lambda v: np.quantile(v, 0.99)),
        cosine=_cosine(a, b),
        required_atol=stat(need_atol, np.max),
        required_rtol=stat(need_rtol, np.max),
        top1_agreement=None, top5_agreement=None,
        mismatched=mismatched, elements=int(b.size), passed=False, problem=problem,
        nonfinite_reference=nonfinite,
    )
    metrics.top1_agreement, metrics.top5_agreement = _top_k_agreement(actual, reference)
    if check_stat == "quantile":
        metrics.quantile_abs = stat(diff, lambda v: np.quantile(v, quantile))
        metrics.quantile_rel = stat(rel, lambda v: np.quantile(v, quantile))
    metrics.passed = problem is None and _passes(metrics, atol, rtol, check_stat)
    return metrics


def _smallest_passing(diff, bound, start):
    """Per element, the smallest tolerance ``t >= 0`` with ``diff <= bound(t)`` as float64 evaluates it,
    starting from the algebraic answer ``start`` (which rounding can leave a few ulps off either way)."""
    import numpy as np

    t = np.array(start, dtype=np.float64)
    finite = np.isfinite(diff) & np.isfinite(t)
    with np.errstate(invalid="ignore", over="ignore"):
        for _ in range(4):  # up while the rule still fails
            low = finite & ~(diff <= bound(t))
            if not low.any():
                break
            t[low] = np.nextafter(t[low], np.inf)
        for _ in range(4):  # down while a smaller value passes too
            smaller = np.maximum(np.nextafter(t, -np.inf), 0.0)
            down = finite & (t > 0) & (diff <= bound(smaller))
            if not down.any():
                break
            t[down] = smaller[down]
    return t


def _passes(m: OutputMetrics, atol: float, rtol: float, check_stat: str | None) -> bool:
    if check_stat is None:
        return m.mismatched == 0
    abs_stat, rel_stat = {"max": (m.max_abs, m.max_rel), "mean": (m.mean_abs, m.mean_rel),
                          "median": (m.median_abs, m.median_rel),
                          "quantile": (m.quantile_abs, m.quantile_rel)}[check_stat]

    def exceeds(value, tolerance):
        return value != value or value > tolerance  # NaN exceeds everything

    return not (exceeds(abs_stat, atol) and exceeds(rel_stat, rtol))


def _cosine(a, b) -> float:
    import numpy as np

    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


def _top_k_agreement(actual: Sequence, reference: Sequence) -> tuple[float | None, float | None]:
    """For class scores (N, K): the share of rows whose top-1 class agrees, and whose top-5 classes are the
    same set (None for other shapes, and top-5 None when K < 5)."""
    import numpy as np

    rows_a = [np.asarray(x) for x in actual]
    rows_b = [np.asarray(x) for x in reference]
    if not rows_b or any(x.ndim != 2 or x.shape[1] < 2 for x in rows_b):
        return None, None
    a = np.concatenate(rows_a).astype(np.float64)
    b = np.concatenate(rows_b).astype(np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None, None
    top1 = float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))
    if b.shape[1] < 5:
        return top1, None
    top5_a = np.sort(np.argsort(-a, axis=1, kind="stable")[:, :5], axis=1)
    top5_b = np.sort(np.argsort(-b, axis=1, kind="stable")[:, :5], axis=1)
    return top1, float(np.mean((top5_a == top5_b).all(axis=1)))
