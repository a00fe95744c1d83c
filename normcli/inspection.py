"""Find every norm layer in a checkpoint, summarise its statistics and flag what is wrong with them.

Plain numpy: inspecting a safetensors or ONNX file never imports torch.
"""

from __future__ import annotations

import fnmatch
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from normcli.errors import NormcliError

SEVERITIES = ("error", "warning", "info")
FINDING_SEVERITY = {
    "unsafe-globals": "error",
    "needs-classes": "info",
    "non-finite": "error",
    "negative-var": "error",
    "stale-stats": "error",
    "tiny-var": "warning",
    "dead-channels": "warning",
    "fp16-overflow": "warning",
    "mixed-tracking": "warning",
    "tiny-direction": "warning",
}
FP16_MAX = 65504.0

# Norm classes by name (last component of the class path) -> kind reported.
NORM_CLASSES = {
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LazyBatchNorm1d", "LazyBatchNorm2d",
    "LazyBatchNorm3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "GroupNorm", "LayerNorm",
    "RMSNorm", "FrozenBatchNorm2d", "FrozenBatchNorm", "FilterResponseNorm1d", "FilterResponseNorm2d",
    "FilterResponseNorm3d", "MABN2d", "LocalResponseNorm",
}
_INSTANCE_NORMS = {"InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"}


@dataclass(frozen=True)
class Thresholds:
    """When a statistic counts as a problem. Defaults are documented in the README."""

    eps: float = 1e-5            # the norm's eps when the file does not record it (BatchNorm's default)
    tiny_var_ratio: float = 1.0  # running_var < ratio * eps: eps, not the data, sets the channel's scale
    dead_weight: float = 1e-8    # |weight| at or below this: the channel's output is constant
    fp16_max: float = FP16_MAX   # |weight / sqrt(var + eps)| or |folded bias| above this overflows fp16
    tiny_direction_ratio: float = 1e-3  # weight norm: a slice's ||v|| below ratio * the median ||v|| (or 0)


@dataclass
class Stats:
    min: float
    mean: float
    max: float


@dataclass
class Finding:
    code: str
    severity: str
    message: str
    channels: list[int] = field(default_factory=list)


@dataclass
class NormLayer:
    name: str
    kind: str
    inferred: bool
    num_features: int
    num_batches_tracked: int | None
    running_mean: Stats | None
    running_var: Stats | None
    weight: Stats | None
    bias: Stats | None
    findings: list[Finding] = field(default_factory=list)
    eps: float | None = None
    values: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # per-channel arrays
    direction_norm: Stats | None = None  # WeightNorm: ||v|| per slice (g is ``weight``)
    norm_dim: int | None = None          # WeightNorm: the dim g keeps; None: one norm over all of v


@dataclass
class InspectReport:
    path: str
    format: str
    layers: list[NormLayer]
    state_dict_key: str | None = None
    notes: list[str] = field(default_factory=list)
    file_findings: list[Finding] = field(default_factory=list)  # about the file, not a layer (trust, shards)
    trust: dict | None = None           # {"verdict": ..., "globals": [{"name", "kind"}]} (normcli/schemas/inspect.schema.json)

    def all_findings(self) -> list[Finding]:
        """The file's own findings, then every layer's."""
        return [*self.file_findings, *(f for layer in self.layers for f in layer.findings)]

    @property
    def summary(self) -> dict[str, Any]:
        kinds = Counter(layer.kind for layer in self.layers)
        sev = Counter(f.severity for f in self.all_findings())
        return {"layers": len(self.layers), "kinds": dict(sorted(kinds.items())),
                **{s: sev.get(s, 0) for s in SEVERITIES}}

    def worst_severity(self) -> str | None:
        present = {f.severity for f in self.all_findings()}
        return next((s for s in SEVERITIES if s in present), None)

    def worst_finding(self) -> Finding | None:
        """The first finding of the highest severity present (file findings first)."""
        worst = self.worst_severity()
        return next((f for f in self.all_findings() if f.severity == worst), None)


def inspect_file(path: str | os.PathLike, *, arch: str | None = None, arch_kwargs: dict | None = None,
                 key: str | None = None, thresholds: Thresholds | None = None,
                 unsafe_load: bool = False, limits=None) -> InspectReport:
    """Inspect the norm layers of any file normcli reads. With ``arch``, kinds come from the built model."""
    from normcli.formats import open_checkpoint
    from normcli.limits import DEFAULT_LIMITS

    thresholds = thresholds or Thresholds()
    # opened and recognised once; everything below reads through it
    with open_checkpoint(path, limits or DEFAULT_LIMITS) as ck:
        return _inspect_opened(ck, path, arch, arch_kwargs, key, thresholds, unsafe_load, limits)


def _inspect_opened(ck, path, arch, arch_kwargs, key, thresholds, unsafe_load, limits=None) -> InspectReport:
    fmt = ck.format
    trust = file_trust(ck, fmt)
    if fmt == "onnx":
        if arch is not None:
            raise NormcliError("--arch does not apply to ONNX files; drop it")
        from normcli.onnx_reader import read_onnx_norms

        layers = read_onnx_norms(path)
        for layer in layers:
            layer.findings = layer_findings(layer, thresholds)
        return InspectReport(str(path), "onnx", layers, trust=trust.as_json())
    if arch is not None or (unsafe_load and fmt in ("torchscript", "pt2")):
        from normcli.loading import load_model, module_tensor_file

        loaded = load_model(ck, arch=arch, arch_kwargs=arch_kwargs, unsafe_load=unsafe_load, key=key,
                            limits=limits)
        tf = module_tensor_file(loaded)
        functional = _functional_norms(loaded.model)
    else:
        from normcli.reader import read_tensors

        tf = read_tensors(ck, key=key, limits=limits)
        functional = ()
    layers = find_norm_layers(tf.tensors, tf.module_types, tf.module_eps, functional)
    if tf.format == "safetensors" and arch is None:
        # safetensors sorts its keys as strings (layer1.10 before layer1.2); natural order reads as the model
        # was built (with --arch, the tensors come from the model in its own order)
        from normcli.naming import natural_key

        layers.sort(key=lambda x: natural_key(x.name))
    add_findings(layers, thresholds)
    notes = []
    if tf.stripped_prefixes:
        notes.append("removed key prefixes " + ", ".join(repr(s) for s in tf.stripped_prefixes))
    if tf.other_state_dicts:
        notes.append("also holds " + ", ".join(tf.other_state_dicts) + " (choose with --key)")
    trust = merge_reader_globals(trust, tf.globals)
    return InspectReport(str(path), tf.format, layers, state_dict_key=tf.state_dict_key, notes=notes,
                         file_findings=[*trust_findings(trust), *tf.file_findings], trust=trust.as_json())


def _functional_norms(model) -> list[str]:
    """Modules whose running statistics an ``F.batch_norm`` call in forward reads, found by torch.fx; none
    when the model does not trace (inspect then names their kind from the buffers, as without --arch)."""
    from normcli.fold import functional_norm_sites

    try:
        return functional_norm_sites(model)
    except Exception:  # noqa: BLE001 - an untraceable model has no fx dataflow to read
        return []


# -------------------------------------------------------------------------------------------------- trust

def file_trust(ck, fmt: str):
    """The trust verdict from the file's pickles (normcli.trust), read through the already opened file; a
    file it cannot judge is refused here, so that inspect never reports weights from bytes a second reader
    could see differently."""
    from normcli.trust import Trust, assess_opened

    if fmt in ("onnx", "safetensors"):  # no pickles
        return Trust("safe", [])
    result = assess_opened(ck)
    if result.verdict == "unreadable":
        reason = result.reason or "cannot be judged"
        raise NormcliError(reason if reason.startswith(str(ck)) else f"{ck}: {reason}")
    return Trust(result.verdict, result.globals)


def merge_reader_globals(trust, names: list[str]):
    """Add the globals the reader saw that the opcode walk did not (classified by name alone)."""
    from normcli.trust import Trust, classify, verdict_of

    known = {g.name for g in trust.globals}
    extra = [classify(n) for n in dict.fromkeys(names) if n not in known]
    if not extra:
        return trust
    merged = [*trust.globals, *extra]
    return Trust(verdict_of(merged), merged)


def trust_findings(trust) -> list[Finding]:
    """``unsafe-globals`` (error) naming the callables, or ``needs-classes`` (info) naming the classes."""
    code, classes = trust.names("code"), trust.names("class")
    out = []
    if code:
        out.append(Finding("unsafe-globals", "error", "the file's pickles name callables that run code under "
                           f"torch.load(weights_only=False): {_list_names(code)}; never load it with a full "
                           "unpickler (normcli read only its tensors)"))
    if classes:
        out.append(Finding("needs-classes", "info", "loading the full model imports and constructs "
                           f"{_list_names(classes)}; use --unsafe-load only if you trust that code"))
    return out


def _list_names(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ------------------------------------------------------------------------------------------ layer discovery

def _class_name(qualname: str | None) -> str | None:
    return qualname.rsplit(".", 1)[-1] if qualname else None


def _infer_kind(names: set[str]) -> str | None:
    if {"running_var", "buffer_x2", "buffer_gz"} <= names:
        return "MABN2d"
    if {"running_mean", "running_var"} <= names:
        return "BatchNorm" if "num_batches_tracked" in names else "FrozenBatchNorm"
    if {"tau", "weight", "bias"} <= names:
        return "FilterResponseNorm"
    return None


def find_norm_layers(tensors: dict[str, Any], module_types: dict[str, str] | None = None,
                     module_eps: dict[str, float] | None = None,
                     functional: Iterable[str] = ()) -> list[NormLayer]:
    """Group a state dict's tensors by module and keep the modules that are norm layers.

    ``tensors`` maps names to objects with ``load() -> np.ndarray``, ``shape`` and ``ndim``; only the
    norm layers' tensors are ever loaded. A known norm+activation class (``normcli.norm_act``) is a norm of
    its own kind; ``functional`` names modules whose statistics an ``F.batch_norm`` call in forward uses (kind
    ``functional``).
    """
    from normcli.norm_act import NORM_ACT_CLASSES

    functional = set(functional)
    module_types = module_types or {}
    module_eps = module_eps or {}
    groups: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        module, _, leaf = key.rpartition(".")
        groups.setdefault(module, {})[leaf] = t
    layers = _weight_norm_layers(groups, module_types)
    for module, members in groups.items():
        names = set(members)
        cls = _class_name(module_types.get(module))
        inferred = _infer_kind(names)
        if module in functional and "running_mean" in names:
            kind, is_inferred = "functional", False
        elif module_types.get(module) in NORM_ACT_CLASSES:
            kind, is_inferred = cls, False
        elif cls in NORM_CLASSES:
            if cls in _INSTANCE_NORMS and "running_mean" not in names:
                continue  # instance norm without running statistics has nothing to inspect
            kind, is_inferred = cls, False
        elif inferred is not None:
            kind, is_inferred = inferred, True
        elif cls is None and _looks_like_affine_norm(members):
            kind, is_inferred = "AffineNorm", True
        else:
            continue
        try:
            layers.append(_make_layer(module, kind, is_inferred, members, module_eps.get(module)))
        except NormcliError:
            raise
        except Exception as e:  # the bytes behind a tensor do not match its description
            raise NormcliError(f"cannot read the tensors of layer {module!r} ({type(e).__name__}: {e}); "
                               "the file is truncated or corrupt") from None
    return _in_file_order(layers, tensors)


def _in_file_order(layers: list[NormLayer], tensors: dict[str, Any]) -> list[NormLayer]:
    """Layers in the order their first tensor appears (a state dict's order is the model's order), weight-norm
    layers among the others rather than ahead of them."""
    first: dict[str, int] = {}
    for i, key in enumerate(tensors):
        module = key.rpartition(".")[0]
        while True:
            first.setdefault(module, i)
            if not module:
                break
            module = module.rpartition(".")[0]
    return sorted(layers, key=lambda x: first.get(x.name, first.get(x.name.rpartition(".")[0], len(first))))


_PARAMETRIZED = ".parametrizations."
WEIGHT_NORM_CLASSES = {"_WeightNorm", "WeightNorm"}


def _weight_norm_pairs(groups: dict[str, dict[str, Any]], module_types: dict[str, str]):
    """(layer name, owner module, g, v) for each weight-normalized tensor, in both storage forms.

    ``torch.nn.utils.weight_norm``: ``<owner>.<tensor>_g`` / ``_v``; ``parametrizations.weight_norm``:
    ``<owner>.parametrizations.<tensor>.original0`` / ``original1``.
    """
    for module, members in groups.items():
        path = f".{module}"
        if _PARAMETRIZED in path and {"original0", "original1"} <= set(members):
            owner, _, tensor = path.rpartition(_PARAMETRIZED)
            owner = owner[1:]
            cls = _class_name(module_types.get(f"{module}.0"))
            if cls is not None and cls not in WEIGHT_NORM_CLASSES:
                continue  # another parametrization with two originals
            exact = cls is not None
            yield _tensor_layer(owner, tensor), exact, members["original0"], members["original1"]
            continue
        for leaf in sorted(members):
            if leaf.endswith("_g") and f"{leaf[:-2]}_v" in members:
                exact = module_types.get(module) is not None
                yield _tensor_layer(module, leaf[:-2]), exact, members[leaf], members[f"{leaf[:-2]}_v"]


def _tensor_layer(owner: str, tensor: str) -> str:
    if tensor == "weight":
        return owner
    return f"{owner}.{tensor}" if owner else tensor


def _weight_norm_dim(g_shape: tuple, v_shape: tuple) -> tuple[bool, int | None]:
    """(is a weight-norm pair, dim): g is 1 everywhere but the kept dim, where it is v's size; all 1: None."""
    g_shape, v_shape = tuple(int(d) for d in g_shape), tuple(int(d) for d in v_shape)
    if all(d == 1 for d in g_shape):
        return (len(g_shape) in (0, len(v_shape))), None
    if len(g_shape) != len(v_shape):
        return False, None
    kept = [i for i, d in enumerate(g_shape) if d != 1]
    if len(kept) != 1 or g_shape[kept[0]] != v_shape[kept[0]]:
        return False, None
    return True, kept[0]


def weight_norm_layers(tensors: dict[str, Any], module_types: dict[str, str] | None = None) -> list[NormLayer]:
    """The weight-normalized tensors among ``tensors`` (named like a state dict; see find_norm_layers)."""
    groups: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        module, _, leaf = key.rpartition(".")
        groups.setdefault(module, {})[leaf] = t
    return _weight_norm_layers(groups, module_types or {})


def _numel(t: Any) -> int:
    n = 1
    for d in t.shape:
        n *= int(d)
    return n


def _elements_held(t: Any) -> int | None:
    """How many values the file really stores behind ``t`` (None when the reader does not say)."""
    array = getattr(t, "array_", None)
    if array is not None:
        return int(array.size)
    storage = getattr(t, "storage", None)
    numel = getattr(storage, "numel", None)
    if isinstance(numel, int):
        return numel - int(getattr(t, "offset", 0) or 0)
    return None


def _weight_norm_layers(groups: dict[str, dict[str, Any]], module_types: dict[str, str]) -> list[NormLayer]:
    layers = []
    for name, exact, g, v in _weight_norm_pairs(groups, module_types):
        is_pair, dim = _weight_norm_dim(g.shape, v.shape)
        if not is_pair or not (_is_float(g) and _is_float(v)):
            continue
        for label, t in (("g", g), ("v", v)):
            held = _elements_held(t)
            if held is not None and _numel(t) > held:
                # a weight is never a broadcast view: a shape beyond the bytes would only make us allocate
                raise NormcliError(f"layer {name!r}: its weight-norm {label} claims {_numel(t)} elements but the "
                                   f"file holds {held} for it; the file is crafted or corrupt")
        try:
            g_values = _load_vector(g)
            with np.errstate(all="ignore"):
                v_values = np.asarray(v.load(), dtype=np.float64)
                slices = (v_values.reshape(1, -1) if dim is None
                          else np.moveaxis(v_values, dim, 0).reshape(v_values.shape[dim], -1))
                direction = np.sqrt(np.sum(slices * slices, axis=1))
        except Exception as e:  # the bytes behind a tensor do not match its description
            raise NormcliError(f"cannot read the tensors of layer {name!r} ({type(e).__name__}: {e}); "
                               "the file is truncated or corrupt") from None
        layers.append(NormLayer(name=name, kind="WeightNorm", inferred=not exact, num_features=int(g_values.size),
                                num_batches_tracked=None, running_mean=None, running_var=None,
                                weight=_stats(g_values), bias=None,
                                values={"weight": g_values, "direction_norm": direction},
                                direction_norm=_stats(direction), norm_dim=dim))
    return layers


def _looks_like_affine_norm(members: dict[str, Any]) -> bool:
    # weight and bias, both per-channel vectors of one length and nothing else: GroupNorm, LayerNorm or a
    # BatchNorm with track_running_stats=False, seen without class names
    if set(members) != {"weight", "bias"}:
        return False
    w, b = members["weight"], members["bias"]
    return w.ndim == 1 and b.ndim == 1 and w.shape == b.shape and _is_float(w)


def _is_float(t: Any) -> bool:
    return str(getattr(t, "dtype", "")).replace("torch.", "") in ("float32", "float64", "float16", "bfloat16")


def _load_vector(t: Any) -> np.ndarray | None:
    if t is None:
        return None
    with np.errstate(all="ignore"):  # a damaged file's values are reported as findings, not numpy warnings
        a = np.asarray(t.load(), dtype=np.float64)
    return a.reshape(-1)


def _make_layer(name: str, kind: str, inferred: bool, members: dict[str, Any], eps: float | None) -> NormLayer:
    values = {k: _load_vector(members.get(k)) for k in ("running_mean", "running_var", "weight", "bias")
              if members.get(k) is not None}
    nbt = members.get("num_batches_tracked", members.get("iters"))
    num_batches = None
    if nbt is not None:
        arr = nbt.load()
        num_batches = int(np.asarray(arr).reshape(-1)[0]) if np.asarray(arr).size else None
    num_features = next((v.size for v in values.values() if v is not None), 0)
    return NormLayer(name=name, kind=kind, inferred=inferred, num_features=int(num_features),
                     num_batches_tracked=num_batches,
                     running_mean=_stats(values.get("running_mean")), running_var=_stats(values.get("running_var")),
                     weight=_stats(values.get("weight")), bias=_stats(values.get("bias")),
                     eps=eps, values=values)


def _stats(a: np.ndarray | None) -> Stats | None:
    if a is None or a.size == 0:
        return None
    with np.errstate(invalid="ignore", over="ignore"):
        return Stats(float(np.min(a)), float(np.mean(a)), float(np.max(a)))


# ----------------------------------------------------------------------------------------------- findings

def add_findings(layers: list[NormLayer], thresholds: Thresholds) -> None:
    for layer in layers:
        layer.findings = layer_findings(layer, thresholds)
    _mixed_tracking(layers)


def _channels(mask: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask)]


def _finding(code: str, message: str, channels: Iterable[int] = ()) -> Finding:
    return Finding(code, FINDING_SEVERITY[code], message, list(channels))


def _fmt_channels(ch: list[int], total: int) -> str:
    shown = ", ".join(map(str, ch[:8])) + (", ..." if len(ch) > 8 else "")
    return f"{len(ch)} of {total} channels ({shown})"


def layer_findings(layer: NormLayer, t: Thresholds) -> list[Finding]:
    """The problems one layer's statistics show; ``mixed-tracking`` needs all layers (see add_findings)."""
    v = layer.values
    mean, var, weight, bias = (v.get(k) for k in ("running_mean", "running_var", "weight", "bias"))
    n = layer.num_features
    eps = layer.eps if layer.eps is not None else t.eps
    out: list[Finding] = []

    bad = np.zeros(n, dtype=bool)
    for arr in v.values():
        if arr is not None and arr.size == n:
            bad |= ~np.isfinite(arr)
    if bad.any():
        names = [k for k, arr in v.items() if arr is not None and arr.size and not np.isfinite(arr).all()]
        out.append(_finding("non-finite", f"NaN or Inf in {', '.join(names)}: {_fmt_channels(_channels(bad), n)}",
                            _channels(bad)))

    if var is not None:
        neg = var < 0
        if neg.any():
            out.append(_finding("negative-var", f"running_var is negative in {_fmt_channels(_channels(neg), n)} "
                                f"(min {np.nanmin(var):.3g}); a variance cannot be negative, the statistics are "
                                "corrupt", _channels(neg)))
        tiny = (var >= 0) & (var < t.tiny_var_ratio * eps)
        if tiny.any():
            out.append(_finding("tiny-var", f"running_var below {t.tiny_var_ratio:g} x eps ({eps:g}) in "
                                f"{_fmt_channels(_channels(tiny), n)}: eps, not the data, sets their scale and "
                                "small input changes are amplified up to 1/sqrt(eps)", _channels(tiny)))

    if mean is not None and var is not None and n and np.all(mean == 0) and np.all(var == 1) \
            and not layer.num_batches_tracked:
        out.append(_finding("stale-stats", "running statistics are the initial values (mean 0, var 1) and no "
                            "batch was tracked: the layer never saw data in train mode, eval output will be wrong",
                            range(n)))

    if weight is not None:
        dead = np.abs(weight) <= t.dead_weight
        if dead.any():
            out.append(_finding("dead-channels", f"|weight| <= {t.dead_weight:g} in "
                                f"{_fmt_channels(_channels(dead), n)}: these channels output a constant",
                                _channels(dead)))

    direction = v.get("direction_norm")
    if direction is not None and direction.size:
        finite = direction[np.isfinite(direction)]
        median = float(np.median(finite)) if finite.size else 0.0
        tiny = np.isfinite(direction) & ((direction < t.tiny_direction_ratio * median) | (direction == 0))
        if tiny.any():
            out.append(_finding("tiny-direction", f"||v|| below {t.tiny_direction_ratio:g} x the layer's median "
                                f"({median:.3g}) or 0 in {_fmt_channels(_channels(tiny), n)} (min "
                                f"{float(direction[tiny].min()):.3g}): g * v / ||v|| magnifies any change of these "
                                "slices of v by 1/||v||", _channels(tiny)))

    if var is not None:
        with np.errstate(all="ignore"):
            scale = (weight if weight is not None else 1.0) / np.sqrt(var + eps)
            folded_bias = (bias if bias is not None else 0.0) - (mean if mean is not None else 0.0) * scale
            over = np.isfinite(scale) & (np.abs(scale) > t.fp16_max)
            over |= np.isfinite(folded_bias) & (np.abs(folded_bias) > t.fp16_max)
        over &= var >= 0
        if over.any():
            worst = float(np.nanmax(np.abs(np.where(over, np.maximum(np.abs(scale), np.abs(folded_bias)), 0))))
            out.append(_finding("fp16-overflow", f"folded scale or bias exceeds the fp16 range ({t.fp16_max:g}) in "
                                f"{_fmt_channels(_channels(over), n)} (up to {worst:.3g}); folding and running in "
                                "half precision gives inf", _channels(over)))
    return out


def _mixed_tracking(layers: list[NormLayer]) -> None:
    # a stale layer (never tracked) is already reported as such; MABN counts iterations, not batches
    tracked = [layer for layer in layers if layer.num_batches_tracked is not None and layer.kind != "MABN2d"
               and not any(f.code == "stale-stats" for f in layer.findings)]
    counts = Counter(layer.num_batches_tracked for layer in tracked)
    if len(counts) < 2:
        return
    common, _ = counts.most_common(1)[0]
    for layer in tracked:
        if layer.num_batches_tracked != common:
            layer.findings.append(_finding(
                "mixed-tracking", f"num_batches_tracked is {layer.num_batches_tracked} here but {common} in "
                f"{counts[common]} other layers: this layer was trained (or frozen) differently"))


def select_layers(layers: list[NormLayer], pattern: str) -> list[NormLayer]:
    """Layers whose name matches the glob ``pattern``."""
    return [layer for layer in layers if fnmatch.fnmatchcase(layer.name, pattern)]


def fails(report: InspectReport, fail_on: str) -> bool:
    """Whether findings reach the ``--fail-on`` level (error, warning or never)."""
    if fail_on == "never":
        return False
    worst = report.worst_severity()
    if worst is None:
        return False
    return SEVERITIES.index(worst) <= SEVERITIES.index(fail_on)
