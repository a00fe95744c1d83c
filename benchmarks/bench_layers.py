"""CPU forward+backward time of normcli's FRN+TLU and MABN2d against BatchNorm and against a straightforward
implementation of the same formulas, measured in the same run (medians of interleaved runs).

    python benchmarks/bench_layers.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from normcli.layers import FilterResponseNorm2d, MABN2d

CHANNELS, SIZE = 64, 56


def straightforward_frn(x, gamma, beta, tau, eps=1e-6):
    nu2 = x.pow(2).mean(dim=(2, 3), keepdim=True)
    y = gamma.view(1, -1, 1, 1) * x / torch.sqrt(nu2 + eps) + beta.view(1, -1, 1, 1)
    return torch.max(y, tau.view(1, -1, 1, 1))


class StraightforwardMABN(torch.autograd.Function):
    """The MABN training step of NORM_LAYERS.md written line by line (buffers in a dict)."""

    @staticmethod
    def forward(ctx, x, weight, bias, s):
        s["t"] += 1
        t, m = s["t"], s["buffer_x2"].shape[0]
        chi = x.pow(2).mean(dim=(0, 2, 3))
        s["buffer_x2"][t % m] = chi
        v = chi if (t <= m or t < s["warmup_iters"]) else s["buffer_x2"].mean(0)
        z = x / torch.sqrt(v + s["eps"]).view(1, -1, 1, 1)
        if t <= max(1000, s["warmup_iters"]):
            r = torch.ones_like(v)
        else:
            r = torch.clamp(torch.sqrt(v + s["eps"]) / torch.sqrt(s["running_var"] + s["eps"]), 1 / 5, 5)
        out = weight.view(1, -1, 1, 1) * (r.view(1, -1, 1, 1) * z) + bias.view(1, -1, 1, 1)
        s["running_var"] = 0.98 * s["running_var"] + 0.02 * v
        ctx.save_for_backward(z, v, r, weight)
        ctx.s, ctx.t = s, t
        return out

    @staticmethod
    def backward(ctx, grad_out):
        z, v, r, weight = ctx.saved_tensors
        s, t = ctx.s, ctx.t
        m = s["buffer_gz"].shape[0]
        c = lambda a: a.view(1, -1, 1, 1)  # noqa: E731
        g = grad_out * c(weight) * c(r)
        psi_t = (g * z).mean(dim=(0, 2, 3))
        s["buffer_gz"][t % m] = psi_t
        psi = psi_t if (t <= m or t < s["warmup_iters"]) else s["buffer_gz"].mean(0)
        grad_x = (g - z * c(psi)) / c(torch.sqrt(v + s["eps"]))
        grad_weight = (grad_out * c(r) * z).sum(dim=(0, 2, 3))
        grad_bias = grad_out.sum(dim=(0, 2, 3))
        return grad_x, grad_weight, grad_bias, None


def _candidates(batch: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, CHANNELS, SIZE, SIZE).requires_grad_(True)
    grad = torch.randn_like(x)

    frn = FilterResponseNorm2d(CHANNELS).train()
    bn_relu = nn.Sequential(nn.BatchNorm2d(CHANNELS), nn.ReLU()).train()
    bn = nn.BatchNorm2d(CHANNELS).train()
    # past warm-up, with the moving averages and the renormalisation active
    mabn = MABN2d(CHANNELS, B=batch, real_B=4 * batch, warmup_iters=10).train()
    mabn.iters.fill_(2000)
    gamma, beta, tau = (torch.ones(CHANNELS, requires_grad=True), torch.zeros(CHANNELS, requires_grad=True),
                        torch.zeros(CHANNELS, requires_grad=True))
    w_plain, b_plain = torch.ones(CHANNELS, requires_grad=True), torch.zeros(CHANNELS, requires_grad=True)
    state = {"t": 2000, "warmup_iters": 10, "eps": 1e-5, "running_var": torch.ones(CHANNELS),
             "buffer_x2": torch.zeros(4, CHANNELS), "buffer_gz": torch.zeros(4, CHANNELS)}

    def timed(fn):
        def run():
            x.grad = None
            fn().backward(grad)
        return run

    return {
        "frn": timed(lambda: frn(x)),
        "bn_relu": timed(lambda: bn_relu(x)),
        "frn_plain": timed(lambda: straightforward_frn(x, gamma, beta, tau)),
        "mabn": timed(lambda: mabn(x)),
        "bn": timed(lambda: bn(x)),
        "mabn_plain": timed(lambda: StraightforwardMABN.apply(x, w_plain, b_plain, state)),
    }


def _times(batch: int, repeats: int, inner: int) -> dict[str, list[float]]:
    candidates = _candidates(batch)
    for fn in candidates.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():  # interleaved, so load changes hit every candidate alike
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return times


COMPARISONS = [
    ("FRN+TLU vs BatchNorm2d+ReLU", "frn", "bn_relu", 2.5),
    ("MABN2d vs BatchNorm2d", "mabn", "bn", 3.0),
    ("FRN+TLU vs straightforward FRN+TLU", "frn", "frn_plain", 1.0),
    ("MABN2d vs straightforward MABN", "mabn", "mabn_plain", 1.0),
]


def run(quick: bool = False) -> list[dict]:
    """Rows {name, normcli, baseline, ratio, bar, passed}; times are seconds per forward+backward."""
    batches = [4] if quick else [2, 8]
    repeats, inner = (7, 2) if quick else (21, 3)
    rows = []
    for batch in batches:
        times = _times(batch, repeats, inner)
        for title, ours, baseline, bar in COMPARISONS:
            # each repeat's pair ran back to back: their ratios give the median and the spread
            ratios = [o / b for o, b in zip(times[ours], times[baseline])]
            ratio = statistics.median(ratios)
            rows.append({
                "name": f"{title} (batch {batch}, {CHANNELS}x{SIZE}x{SIZE})",
                "normcli": statistics.median(times[ours]),
                "baseline": statistics.median(times[baseline]),
                "ratio": ratio,
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "bar": bar,
                "passed": ratio <= bar,
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times in ms per forward+backward")
    for row in run(quick=args.quick):
        print(
            f"{row['name']:<62} normcli {row['normcli'] * 1e3:8.3f}  baseline {row['baseline'] * 1e3:8.3f}  "
            f"ratio {row['ratio']:5.2f}  bar {row['bar']:.1f}  {'PASS' if row['passed'] else 'FAIL'}"
        )


if __name__ == "__main__":
    main()
