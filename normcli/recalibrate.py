"""Re-estimate the running statistics of a model's BatchNorm-family layers from data.

``recalibrate(model, batches)`` sets, for every norm layer that tracks running statistics (BatchNorm1d/2d/3d,
SyncBatchNorm, InstanceNorm with ``track_running_stats=True``, normcli's MABN2d), the exact population
statistics of that layer's input over all the samples seen:

- ``running_mean`` = the per-channel mean of every value the layer received,
- ``running_var``  = their unbiased per-channel variance (``M2 / (n - 1)``); for MABN2d, whose running_var is
  the second moment E[x^2] (NORM_LAYERS.md), the mean of x^2 instead,
- ``num_batches_tracked`` = the number of batches used (all ranks together).

Every value counts once (equal weight per sample, batches of any size); this is not the mean of per-batch
variances that ``torch.optim.swa_utils.update_bn`` and momentum-based updates compute. Each batch is reduced
by torch's batch-statistics kernel (centred, accumulated in double on CPU), again around its mean where a
channel's mean is large against its spread, and the batches (and ranks) are merged in float64 with Chan's
parallel formula, so a large mean does not cancel the variance away and no float64 copy of an activation
is made.

What the layers see during the pass (``forward=``):

- ``"batch"`` (default): each recalibrated norm normalises its input with the statistics of the current
  batch, exactly as it would in training (BatchNorm and SyncBatchNorm: batch mean and biased variance;
  InstanceNorm: per-instance statistics; MABN: the batch's second moment), while everything else --
  dropout included -- stays in eval. The statistics being fixed are the ones a layer cannot be trusted
  with: with ``"running"``, every layer after the first would see inputs normalised by the stale statistics
  of the layers before it, and its new statistics would describe a model that no longer exists after the
  update. Batch statistics are what the deeper layers will approximately see once every layer is updated,
  in one pass over the data (the approach of ``update_bn`` and precise-BN, without their averaging error).
- ``"running"``: the whole model in eval, every layer normalising with its existing running statistics;
  each layer's new statistics are those of its input under the old model. Right when only some layers'
  statistics are wrong and the others must stay as they are.

Exactly recalibrating layer by layer (each layer seeing the new statistics of all layers before it) would
need one pass over the data per level of norm depth; neither mode does that.

Under ``torch.distributed`` (initialised, e.g. by ``torchrun``) each rank runs its share of the batches,
(count, mean, M2) per channel are combined across ranks in float64, and every rank ends with the same
statistics as one process on all the batches; the file pipeline writes from rank 0 only.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from normcli.errors import NormcliError, describe

FORWARD_MODES = ("batch", "running")
CHUNK_ELEMENTS = 1 << 20    # values shifted and reduced at a time (a 4 MiB float32 temporary)
# a channel whose |mean| exceeds this many standard deviations is reduced again around its mean
SHIFT_RATIO = 2.0
SMALL_ELEMENTS = 1 << 16     # inputs up to this size are reduced in float64 directly (512 KiB)


@dataclass
class LayerChange:
    """One recalibrated layer: its statistics before and after (min/mean/max over channels)."""

    name: str
    kind: str
    before: dict          # {"running_mean": STATS | None, "running_var": STATS | None}
    after: dict
    values: int           # values per channel the statistics were computed from
    mean_shift: float     # max over channels of |new mean - old mean| / sqrt(new var + eps)
    var_ratio: dict       # {"min", "max"} over channels of new var / old var


@dataclass
class RecalibrationReport:
    output: str | None
    samples: int
    batches: int
    layers: list[LayerChange]
    findings_before: list[dict]
    findings_after: list[dict]
    eval_change: dict                      # {"max_abs", "max_rel"} on the held-out batch
    forward: str = "batch"
    held_out: bool = True                  # False when the source had a single batch (used for both)
    world_size: int = 1
    skipped: list[dict] = field(default_factory=list)   # {"name", "reason"}
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ norm layers

def recalibratable(module) -> str | None:
    """The kind of norm ``module`` is when recalibrate can re-estimate its statistics, else None."""
    from torch import nn

    from normcli.layers.mabn import MABN2d

    if isinstance(module, MABN2d):
        return "MABN2d"
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        if module.track_running_stats and module.running_mean is not None and module.running_var is not None:
            return type(module).__name__
    return None


def select_norms(model, include: list[str] | None = None, exclude: list[str] | None = None):
    """``[(name, module, kind)]`` of the norms to recalibrate; refuses when there is none."""
    found = [(name, m, kind) for name, m in model.named_modules() if (kind := recalibratable(m)) is not None]
    if not found:
        raise NormcliError("the model has no norm layer that tracks running statistics (BatchNorm, SyncBatchNorm, "
                           "InstanceNorm with track_running_stats=True, MABN2d); there is nothing to recalibrate")
    chosen = [(n, m, k) for n, m, k in found if _matches(n, include, exclude)]
    if not chosen:
        raise NormcliError(f"--include/--exclude leave none of the {len(found)} norm layers "
                           f"({', '.join(n for n, _, _ in found[:6])}{', ...' if len(found) > 6 else ''})")
    return chosen


def _matches(name: str, include, exclude) -> bool:
    if include and not any(fnmatch.fnmatchcase(name, g) for g in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, g) for g in exclude))


class _Moments:
    """Per-channel count, mean and centred sum of squares (M2) in float64, merged with Chan's formula."""

    def __init__(self, channels: int):
        import torch

        self.n = 0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)

    def merge(self, n: int, mean, m2) -> None:
        if n == 0:
            return
        if self.n == 0:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.n * n / total)
        self.n = total

    def add(self, x) -> None:
        """Add every value of ``x`` (N, C, *S) to its channel's moments."""
        self.merge(*batch_moments(x))

    def all_reduce(self, group=None) -> None:
        """Combine the moments of every rank (each rank ends with the same values)."""
        import torch
        import torch.distributed as dist

        n = torch.tensor([float(self.n)], dtype=torch.float64)
        dist.all_reduce(n, group=group)
        total = int(n.item())
        weighted = self.mean * self.n
        dist.all_reduce(weighted, group=group)
        mean = weighted / max(total, 1)
        local = self.m2 + self.n * (self.mean - mean) ** 2
        dist.all_reduce(local, group=group)
        self.n, self.mean, self.m2 = total, mean, local


def batch_moments(x):
    """``(n, mean, M2)`` per channel of ``x`` (N, C, *S), returned in float64.

    Small inputs are reduced in float64 outright. Larger ones go through torch's own batch-statistics kernel
    (the one BatchNorm trains with), which for contiguous (N, C, *S) tensors centres and accumulates in double
    on CPU (other layouts are made contiguous first: its channels-last path accumulates in float32). Its
    float32 results are exact to float32 rounding, which is enough unless a channel's mean is large against
    its spread: then the batch is reduced again, in chunks, shifted by that first mean, so the large mean
    cannot cancel the variance away (chunks merged with Chan's formula).
    """
    import torch

    channels = x.shape[1]
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    n = work.numel() // channels if channels else 0
    if n == 0:
        zeros = torch.zeros(channels, dtype=torch.float64)
        return 0, zeros, zeros.clone()
    if work.numel() <= SMALL_ELEMENTS or work.dim() == 2 or work.dtype == torch.float64:
        dims = [0] + list(range(2, work.dim()))
        var, mean = torch.var_mean(work.to(torch.float64), dims, correction=0)
        return n, mean, var * n
    work = work.contiguous()
    mean, var = torch.batch_norm_update_stats(work, None, None, 0.0)
    if not bool((mean.abs() > SHIFT_RATIO * var.sqrt()).any()):
        return n, mean.to(torch.float64), var.to(torch.float64) * n
    k = mean.view([1, channels] + [1] * (x.dim() - 2))
    k64 = mean.to(torch.float64)
    per_sample = max(work[0].numel(), 1)
    acc = _Moments(channels)
    for chunk in work.split(max(1, CHUNK_ELEMENTS // per_sample)):
        m, v = torch.batch_norm_update_stats(chunk - k, None, None, 0.0)
        count = chunk.numel() // channels
        acc.merge(count, m.to(torch.float64) + k64, v.to(torch.float64) * count)
    return acc.n, acc.mean, acc.m2


def _batch_forward(module, kind: str, moments: _Moments):
    """A forward that records the input's moments and normalises with this batch's own statistics."""
    import torch
    import torch.nn.functional as F

    eps = module.eps

    def forward(x, *args, **kwargs):
        _check_input(module, kind, x)
        n, mean, m2 = batch_moments(x)
        moments.merge(n, mean, m2)
        if kind.startswith("InstanceNorm"):
            return F.instance_norm(x, None, None, module.weight, module.bias, True, 0.0, eps)
        var = m2 / max(n, 1)                       # training normalises with the biased batch variance
        if kind == "MABN2d":
            second = var + mean * mean             # MABN normalises by the batch's second moment
            return F.batch_norm(x, torch.zeros_like(second, dtype=x.dtype), second.to(x.dtype), module.weight,
                                module.bias, False, 0.0, eps)
        return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), module.weight, module.bias, False, 0.0, eps)

    return forward


def _record_input(kind: str, moments: _Moments):
    def hook(module, args):
        x = args[0]
        _check_input(module, kind, x)
        moments.add(x)
    return hook


def _check_input(module, kind: str, x) -> None:
    import torch

    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"{kind} expects an (N, C, ...) tensor input, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    features = module.num_features
    if x.shape[1] != features:
        raise ValueError(f"{kind}({features}) got an input with {x.shape[1]} channels (shape {tuple(x.shape)})")


# ------------------------------------------------------------------------------------------- the pass

def default_call(model, batch):
    """Run ``model`` on one batch: a tensor positionally, a tuple/list as positional inputs, a dict as keywords."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def batch_size_of(batch) -> int:
    """Samples in a batch: the first dimension of its first tensor."""
    import torch

    leaves = torch.utils._pytree.tree_leaves(batch)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return 0


def _prepare(batch, dtype, index: int, where: str):
    """Cast floating inputs to the model's dtype; refuse non-finite values."""
    import torch

    def fix(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            # a sum is NaN/Inf when any value is (no temporaries); only then look closer, since a sum of
            # finite values can also overflow
            if not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise NormcliError(f"batch {index} of {where} holds {bad} non-finite value(s) (NaN or Inf); "
                                   "clean the data before recalibrating")
            return t.to(dtype) if dtype is not None and t.dtype != dtype else t
        return t

    return torch.utils._pytree.tree_map(fix, batch)


def _outputs(value) -> list:
    import torch

    return [t.detach() for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _change(before: list, after: list) -> dict:
    max_abs = max_rel = 0.0
    if len(before) != len(after):
        return {"max_abs": math.inf, "max_rel": math.inf}
    for a, b in zip(before, after):
        if a.shape != b.shape:
            return {"max_abs": math.inf, "max_rel": math.inf}
        if a.numel() == 0 or not a.is_floating_point():
            continue
        diff = (a.double() - b.double()).abs().max().item()
        scale = a.double().abs().max().item()
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))
    return {"max_abs": max_abs, "max_rel": max_rel}


def _dist_info():
    """(rank, world size) when torch.distributed is initialised, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(error: BaseException | None, rank: int, world: int) -> None:
    """Every rank learns whether any rank failed, so that none waits forever in a collective."""
    if world == 1:
        if error is not None:
            raise error
        return
    import torch
    import torch.distributed as dist

    flag = torch.tensor([0.0 if error is None else float(rank + 1)], dtype=torch.float64)
    failed = flag.clone()
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item() > 0:
        raise NormcliError(f"rank {int(failed.item()) - 1} failed while recalibrating (see its error line); "
                           "nothing was written")


def recalibrate(model, batches: Iterable, *, include: list[str] | None = None, exclude: list[str] | None = None,
                call: Callable | None = None, forward: str = "batch", max_batches: int | None = None,
                source_name: str = "the data", progress: Callable[[int, int, float], None] | None = None,
                inplace: bool = False):
    """Re-estimate the running statistics of ``model``'s norm layers from ``batches``.

    Returns ``(model, RecalibrationReport)``; the model is a copy unless ``inplace``. The first batch is held
    out to measure how much the eval output changed (used for the statistics too when it is the only one).
    ``call(model, batch)`` runs the model on one batch (default: :func:`default_call`); ``max_batches`` caps
    the batches used for statistics (all ranks together). ``progress(batches, samples, seconds)`` is called
    after each batch this rank ran.
    """
    import torch

    from normcli.layers.mabn import MABN2d

    if forward not in FORWARD_MODES:
        raise NormcliError(f"forward mode {forward!r} is not one of {', '.join(FORWARD_MODES)}")
    if max_batches is not None and max_batches < 1:
        raise NormcliError(f"--batches must be at least 1, got {max_batches}")
    if not inplace:
        model = copy.deepcopy(model)
    call = call or default_call
    rank, world = _dist_info()
    norms = select_norms(model, include, exclude)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    findings_before = _findings(model, {n for n, _, _ in norms})
    before = {name: _snapshot(m) for name, m, _ in norms}

    modes = {m: m.training for m in model.modules()}
    model.eval()
    moments = {name: _Moments(m.num_features) for name, m, _ in norms}
    stream = iter(batches)
    error: BaseException | None = None
    held_out, held_out_used = None, True
    local_batches = local_samples = 0
    index = 0
    start = time.perf_counter()
    reference = None
    try:
        held_out = next(stream, None)
        if held_out is None:
            raise NormcliError(f"{source_name} yielded no batch; the data source is empty")
        held_out = _prepare(held_out, dtype, 0, source_name)
        with torch.no_grad():
            reference = _outputs(_run(call, model, held_out, 0, source_name))
        pending = next(stream, None)
        if pending is None:
            held_out_used = False
            pending, first_index = held_out, 0
            stream = iter(())
        else:
            first_index = 1
        handles, patched = _install(norms, moments, forward)
        try:
            with torch.no_grad():
                index = first_index
                used = 0
                while pending is not None:
                    if max_batches is not None and used >= max_batches:
                        break
                    if (used % world) == rank:
                        batch = _prepare(pending, dtype, index, source_name) if index else pending
                        _run(call, model, batch, index, source_name)
                        local_batches += 1
                        local_samples += batch_size_of(batch)
                        if progress is not None:
                            progress(local_batches, local_samples, time.perf_counter() - start)
                    used += 1
                    index += 1
                    pending = next(stream, None)
        finally:
            for h in handles:
                h.remove()
            for m in patched:
                del m.forward
    except NormcliError as e:
        error = e
    except Exception as e:  # a user's data function or --call: still one error line
        error = NormcliError(f"recalibrating on {source_name} failed: {describe(e)}")
    _agree(error, rank, world)

    total = torch.tensor([float(local_batches), float(local_samples)], dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(total)
        for m in moments.values():
            m.all_reduce()
    n_batches, n_samples = int(total[0].item()), int(total[1].item())
    if n_batches == 0:
        raise NormcliError(f"{source_name} yielded no batch for the statistics")

    layers, skipped = [], []
    for name, module, kind in norms:
        mom = moments[name]
        if mom.n == 0:
            skipped.append({"name": name, "reason": "the model did not run this layer on the data"})
            continue
        if mom.n < 2 and not isinstance(module, MABN2d):
            raise NormcliError(f"layer {name} saw a single value per channel; an unbiased variance needs at least "
                               "two: give more data (more samples or batches)")
        mean = mom.mean
        var = mom.m2 / mom.n + mean * mean if isinstance(module, MABN2d) else mom.m2 / (mom.n - 1)
        if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all())):
            raise NormcliError(f"layer {name} received non-finite values from the model on {source_name}; "
                               "its statistics would be NaN or Inf, nothing was written")
        with torch.no_grad():
            if not isinstance(module, MABN2d):
                module.running_mean.copy_(mean.to(module.running_mean.dtype))
                if getattr(module, "num_batches_tracked", None) is not None:
                    module.num_batches_tracked.fill_(n_batches)
            module.running_var.copy_(var.to(module.running_var.dtype))
        layers.append(_layer_change(name, kind, module, before[name], mom.n, mean, var))
    if not layers:
        raise NormcliError(f"the model ran none of the selected norm layers on {source_name}")

    with torch.no_grad():
        after_out = _outputs(_run(call, model, held_out, 0, source_name))
    for m, mode in modes.items():
        m.training = mode
    report = RecalibrationReport(
        output=None, samples=n_samples, batches=n_batches, layers=layers,
        findings_before=findings_before, findings_after=_findings(model, {n for n, _, _ in norms}),
        eval_change=_change(reference, after_out), forward=forward, held_out=held_out_used, world_size=world,
        skipped=skipped, seconds=time.perf_counter() - start)
    if not held_out_used:
        report.notes.append("the data held a single batch: it was used for the statistics and for eval_change")
    return model, report


def _run(call, model, batch, index: int, where: str):
    try:
        return call(model, batch)
    except NormcliError:
        raise
    except Exception as e:
        raise NormcliError(f"the model does not run on batch {index} of {where} ({_describe_batch(batch)}): "
                           f"{describe(e)}; check the data's shape and --call") from None


def _describe_batch(batch) -> str:
    import torch

    leaves = [t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]
    return "shapes " + ", ".join(f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in leaves[:4])


def _install(norms, moments, forward: str):
    handles, patched = [], []
    for name, module, kind in norms:
        if forward == "batch":
            # an instance attribute shadows the class's forward for this pass only (removed in finally)
            module.forward = _batch_forward(module, kind, moments[name])
            patched.append(module)
        else:
            handles.append(module.register_forward_pre_hook(_record_input(kind, moments[name])))
    return handles, patched


def _snapshot(module) -> dict:
    return {"running_mean": None if getattr(module, "running_mean", None) is None
            else module.running_mean.detach().double().clone(),
            "running_var": module.running_var.detach().double().clone()}


def _stats(t) -> dict | None:
    if t is None or t.numel() == 0:
        return None
    return {"min": float(t.min()), "mean": float(t.mean()), "max": float(t.max())}


def _layer_change(name, kind, module, before: dict, values: int, mean, var) -> LayerChange:
    import torch

    eps = float(module.eps)
    old_mean, old_var = before["running_mean"], before["running_var"]
    shift = 0.0
    if old_mean is not None:
        shift = float(((mean - old_mean).abs() / torch.sqrt(var + eps)).max())
    with torch.no_grad():
        ratio = var / old_var
    return LayerChange(
        name=name, kind=kind,
        before={"running_mean": _stats(old_mean), "running_var": _stats(old_var)},
        after={"running_mean": _stats(None if old_mean is None else mean), "running_var": _stats(var)},
        values=int(values), mean_shift=shift, var_ratio={"min": float(ratio.min()), "max": float(ratio.max())})


def _findings(model, names: set[str]) -> list[dict]:
    """inspect's findings on the model's norm layers, flattened with the layer's name."""
    from normcli.inspection import Thresholds, add_findings, find_norm_layers
    from normcli.loading import LoadedModel, module_tensor_file

    tf = module_tensor_file(LoadedModel(model, "module", "module"))
    layers = find_norm_layers(tf.tensors, tf.module_types, tf.module_eps)
    add_findings(layers, Thresholds())
    return [{"layer": layer.name, "code": f.code, "severity": f.severity, "message": f"{layer.name}: {f.message}",
             "channels": f.channels} for layer in layers for f in layer.findings]


# ------------------------------------------------------------------------------------ checkpoint files

# Globals whose values the safe reader keeps only in a lossy form (a dtype or device as its name, a Size
# as a tuple, a Parameter as a tensor): a checkpoint naming them cannot be written back entry for entry.
_LOSSY_GLOBALS = {"torch.device", "torch.Size", "torch.nn.parameter.Parameter"}


@dataclass
class CheckpointLayout:
    """A checkpoint as read by the safe reader, with torch tensors, ready to be written back in its own form."""

    path: str
    container: str          # torch-zip | torch-legacy | safetensors
    root: Any               # what the file holds (for safetensors: name -> tensor)
    state_dict: dict        # the state dict inside ``root`` (the same object)
    key_map: dict           # model key (wrapper prefixes removed) -> key in ``state_dict``
    metadata: dict | None = None    # safetensors ``__metadata__``
    state_dict_key: str | None = None

    def replace(self, updates: dict) -> None:
        """Set model keys to new tensors, each cast to the dtype the file stored it in."""
        for key, value in updates.items():
            original = self.key_map.get(key)
            if original is None:
                raise NormcliError(f"{self.path}: no entry for {key} in its state dict")
            old = self.state_dict[original]
            self.state_dict[original] = value.detach().to(dtype=old.dtype).clone().reshape(old.shape)

    def write(self, dest: os.PathLike) -> None:
        import torch

        if self.container == "safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.root.items()}, os.fspath(dest), metadata=self.metadata)
        else:
            torch.save(self.root, os.fspath(dest), _use_new_zipfile_serialization=self.container == "torch-zip")


def read_layout(path: str | os.PathLike, key: str | None = None) -> CheckpointLayout:
    """Read ``path`` with the safe reader into torch containers, refusing what cannot be written back as it was."""
    from normcli.formats import open_checkpoint, read_safetensors_header
    from normcli.reader import _strip_wrapper_prefixes, read_tensors

    path = open_checkpoint(path)    # opened once; every read below goes through it
    fmt = path.format
    if fmt == "safetensors":
        if key is not None:
            raise NormcliError("--key does not apply to safetensors files, which hold one flat state dict")
        header, _ = read_safetensors_header(path)
        tf = read_tensors(path)
        names = [k for k in header if k != "__metadata__"]
        stripped, _ = _strip_wrapper_prefixes({k: k for k in names})
        tensors = {stripped_key: _lazy_to_torch(tf.tensors[stripped_key], {}, path, original)
                   for stripped_key, original in stripped.items()}
        root = {original: tensors[k] for k, original in stripped.items()}
        meta = header.get("__metadata__")
        return CheckpointLayout(str(path), "safetensors", root, root, stripped,
                                meta if isinstance(meta, dict) else None)
    if fmt in ("onnx", "pt2", "torchscript"):
        raise NormcliError(f"{path} is a {fmt} file; recalibrate reads and writes PyTorch state dicts and training "
                           "checkpoints (torch.save) and safetensors")
    from normcli.data import read_torch_pickle

    tf = read_tensors(path, key=key)
    if tf.format not in ("state-dict", "checkpoint"):
        raise NormcliError(f"{path} holds a {tf.format}; recalibrate writes state dicts and training checkpoints "
                           "back in their own layout, so save the model's state_dict() and pass --arch")
    raw, container, globals_ = read_torch_pickle(path)
    lossy = sorted({g for g in globals_ if g in _LOSSY_GLOBALS or _is_dtype_global(g)})
    if lossy:
        raise NormcliError(f"{path} holds values of {', '.join(lossy)}, which normcli's safe reader keeps only in "
                           "a simplified form; it cannot write the checkpoint back unchanged. Save the state dict "
                           "on its own (torch.save(model.state_dict(), ...)) and recalibrate that")
    root = _to_torch_tree(raw, path, "", {}, 0)
    sd = root
    for part in tf.state_dict_key.split("/") if tf.state_dict_key else ():
        sd = sd[part]
    if not isinstance(sd, dict):
        raise NormcliError(f"{path}: entry {tf.state_dict_key!r} is not a state dict")
    stripped, _ = _strip_wrapper_prefixes({k: k for k in sd})
    return CheckpointLayout(str(path), container, root, sd, stripped, None, tf.state_dict_key)


def _is_dtype_global(name: str) -> bool:
    from normcli.safe_pickle import TORCH_DTYPE_STORAGE

    module, _, attr = name.rpartition(".")
    return module == "torch" and attr in TORCH_DTYPE_STORAGE


def _lazy_to_torch(lazy, storages: dict, path, where: str):
    """A LazyArray as a torch tensor; tensors that shared a storage in the file share one here."""
    import numpy as np
    import torch

    ref = lazy.storage
    if ref is None:
        return torch.from_numpy(np.array(lazy.load(), copy=True))
    if lazy.dtype != ref.dtype:
        raise NormcliError(f"{path}: tensor {where} is stored as {ref.dtype} but read as {lazy.dtype}; "
                           "recalibrate cannot write that encoding back")
    base = storages.get(id(ref))
    if base is None:
        raw = np.array(ref.array(), copy=True)
        base = torch.from_numpy(raw)
        if ref.dtype == "bfloat16":
            base = base.view(torch.bfloat16)
        storages[id(ref)] = (base, ref)      # keep ref alive so its id stays unique
    else:
        base = base[0]
    if lazy.numel == 0:
        return torch.empty(lazy.shape, dtype=base.dtype)
    last = lazy.offset + sum((s - 1) * st for s, st in zip(lazy.shape, lazy.stride))
    if lazy.offset < 0 or any(st < 0 for st in lazy.stride) or last >= base.numel():
        raise NormcliError(f"{path}: tensor {where} extends past the end of its storage; the file is corrupt")
    return base.as_strided(lazy.shape, lazy.stride, lazy.offset)


def _to_torch_tree(obj, path, where: str, storages: dict, depth: int):
    import collections

    from normcli.safe_pickle import LazyArray, Placeholder

    if depth > 64:
        raise NormcliError(f"{path}: entries nested deeper than 64 levels at {where or '(top level)'}")
    if isinstance(obj, LazyArray):
        return _lazy_to_torch(obj, storages, path, where)
    if isinstance(obj, Placeholder):
        raise NormcliError(f"{path}: entry {where or '(top level)'} is a {obj.qualname} object, which normcli "
                           "reads only as an inert record and cannot write back unchanged; save the state dict "
                           "on its own (torch.save(model.state_dict(), ...)) and recalibrate that")
    if isinstance(obj, dict):
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _to_torch_tree(v, path, f"{where}/{k}" if where else str(k), storages, depth + 1)
        for attr, v in getattr(obj, "__dict__", {}).items():   # a state dict's _metadata
            setattr(out, attr, _to_torch_tree(v, path, f"{where}.{attr}", storages, depth + 1))
        return out
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        items = [_to_torch_tree(v, path, f"{where}[{i}]", storages, depth + 1) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, (set, frozenset)) and type(obj) in (set, frozenset):
        return obj
    if obj is None or type(obj) in (bool, int, float, str, bytes, bytearray, complex, slice):
        return obj
    raise NormcliError(f"{path}: entry {where or '(top level)'} is a {type(obj).__name__}, which recalibrate "
                       "cannot write back unchanged")


def recalibrate_file(path: str | os.PathLike, data: str, output: str | os.PathLike, *, arch: str | None = None,
                     arch_kwargs: dict | None = None, key: str | None = None, batches: int | None = None,
                     batch_size: int | None = None, call: str | None = None, include: list[str] | None = None,
                     exclude: list[str] | None = None, forward: str = "batch", resize=None, mean=None, std=None,
                     force: bool = False, progress=None) -> RecalibrationReport:
    """The `normcli recalibrate` pipeline: load, recalibrate from ``data``, write ``output`` in the input's
    layout (only the recalibrated buffers change). Under torch.distributed, rank 0 writes."""
    from normcli.atomic import atomic_output, check_output_path
    from normcli.data import import_callable, open_source
    from normcli.loading import load_model

    from normcli.formats import open_checkpoint

    out = check_output_path(output, inputs=(path,), force=force)
    checkpoint = open_checkpoint(path)
    layout = read_layout(checkpoint, key)
    source = open_source(data, batch_size=batch_size, resize=resize, mean=mean, std=std)
    call_fn = import_callable(call, "--call") if call else None
    loaded = load_model(checkpoint, arch=arch, arch_kwargs=arch_kwargs, key=key)
    model, report = recalibrate(loaded.model, source.batches(), include=include, exclude=exclude, call=call_fn,
                                forward=forward, max_batches=batches, source_name=str(data), progress=progress,
                                inplace=True)
    state = model.state_dict()
    updates = {}
    for layer in report.layers:
        for leaf in ("running_mean", "running_var", "num_batches_tracked"):
            name = f"{layer.name}.{leaf}" if layer.name else leaf
            if name in state:
                updates[name] = state[name]
    layout.replace(updates)
    report.notes += source.notes
    rank, world = _dist_info()
    error = None
    if rank == 0:
        try:
            with atomic_output(out) as tmp:
                layout.write(tmp)
        except NormcliError as e:
            error = e
        except Exception as e:
            error = NormcliError(f"writing {out} failed ({describe(e)}); nothing was written")
    _agree(error, rank, world)   # the other ranks learn whether rank 0 wrote the file
    report.output = str(out)
    return report
