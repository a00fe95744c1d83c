"""Hostile pickles of up to 10 MB through the installed `normcli inspect`: wall time and the child's own peak
RSS (wait4) per case. The bar (issue: "every case within 10 s and 300 MB peak RSS for any file up to 10 MB")
is absolute; the baseline column is `normcli inspect` of the healthy sample in the same run, for scale.

Each case is a real torch zip checkpoint (samples/resnet_tiny.pt) whose data.pkl is replaced by a pickle
sized to fill the file: the costliest opcode streams the reader's checks still have to walk.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TIME_BAR_S = 10.0
RSS_BAR_MB = 300.0


def _cases(size: int) -> dict[str, bytes]:
    from tests import pickle_payloads as pp

    return {
        "deep tuple key": pp.deep_tuple_key(size),
        "fan-out of empty dicts": pp.fan_out(size),
        "memo references (BINGET) into one list": pp.PROTO2 + b"]q\x00(" + b"h\x00" * (size // 2) + b"e.",
        "marks opened and closed": pp.PROTO2 + b"(1" * (size // 2) + b"N.",
        "dict reference bomb": pp.reference_bomb(levels=12, fanout=min(1000, size // 120)),
    }


def _normcli() -> list[str]:
    exe = Path(sys.executable).with_name("normcli")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "normcli"]


def _measure(path: Path) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, exit status) of `normcli inspect PATH`, the RSS the command's own."""
    from tests.conftest import run_with_peak_rss

    code, _out, _err, mb, seconds = run_with_peak_rss([*_normcli(), "inspect", str(path)], timeout=600)
    return seconds, mb, code


def run(quick: bool = False) -> list[dict]:
    from tests import pickle_payloads as pp

    size = 1_000_000 if quick else 10_000_000
    template = ROOT / "samples" / "resnet_tiny.pt"
    rows = []
    with tempfile.TemporaryDirectory() as d:
        base_s, base_mb, _ = _measure(template)
        for name, data in _cases(size).items():
            path = Path(d) / "case.pt"
            pp.zip_with_pickle(template, path, data)
            seconds, mb, code = _measure(path)
            ok = code == 2
            rows.append({"name": f"inspect hostile pickle: {name} ({path.stat().st_size / 1e6:.1f} MB), wall (s)",
                         "normcli": seconds, "baseline": base_s, "ratio": seconds / base_s,
                         "bar": f"<= {TIME_BAR_S:g} s, exit 2", "passed": ok and seconds <= TIME_BAR_S})
            rows.append({"name": f"inspect hostile pickle: {name}, peak RSS (MB)", "normcli": mb,
                         "baseline": base_mb, "ratio": mb / base_mb, "bar": f"<= {RSS_BAR_MB:g} MB",
                         "passed": ok and mb <= RSS_BAR_MB})
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(f"{row['name']:<90} {row['normcli']:8.2f} {row['baseline']:8.2f} {row['bar']:<18} "
              f"{'pass' if row['passed'] else 'FAIL'}")
