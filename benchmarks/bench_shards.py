"""Sharded-checkpoint inspect benchmark (issue 10, part 4).

`normcli inspect DIR` of a sharded safetensors checkpoint of >= 2 GB in >= 8 shards, written the way
transformers' save_pretrained writes one (numbered shards + model.safetensors.index.json), against
`python -c "import torch"` measured in the same run, pair by pair (median ratio and its spread); and the
inspect process's own peak RSS (VmHWM). The checkpoint is built in a temporary directory for the run and deleted afterwards.

    python benchmarks/bench_shards.py           # 2.1 GB in 8 shards, 7 repeats
    python benchmarks/bench_shards.py --quick   # 40 MB in 8 shards, one repeat: a smoke run
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inspect import NORMCLI_RSS, ROOT, WORK, ratio_row, timed_pairs  # noqa: E402

SHARDS = 8


def make_sharded_checkpoint(directory: Path, gigabytes: float, shards: int = SHARDS) -> None:
    """A ResNet-shaped model whose 3x3 conv weights fill ``gigabytes``, each BN with realistic statistics,
    split into ``shards`` safetensors files with an index, one shard in memory at a time."""
    import json

    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    per_conv = 256 * 256 * 3 * 3 * 4
    convs_per_shard = max(1, int(gigabytes * 1e9 / per_conv / shards))
    directory.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    block = 0
    for s in range(1, shards + 1):
        name = f"model-{s:05d}-of-{shards:05d}.safetensors"
        sd = {}
        for _ in range(convs_per_shard):
            sd[f"blocks.{block}.conv.weight"] = torch.randn(256, 256, 3, 3, generator=g) * 0.02
            sd[f"blocks.{block}.bn.weight"] = torch.rand(256, generator=g) + 0.5
            sd[f"blocks.{block}.bn.bias"] = torch.randn(256, generator=g) * 0.1
            sd[f"blocks.{block}.bn.running_mean"] = torch.randn(256, generator=g)
            sd[f"blocks.{block}.bn.running_var"] = torch.rand(256, generator=g) + 0.1
            sd[f"blocks.{block}.bn.num_batches_tracked"] = torch.tensor(1000)
            block += 1
        save_file(sd, directory / name, metadata={"format": "pt"})
        for k, v in sd.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
        del sd
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def run(quick: bool = False) -> list[dict]:
    repeats = 1 if quick else 7
    size = 0.04 if quick else 2.1
    torch_import = [sys.executable, "-c", "import torch"]
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="shards_", dir=WORK))  # on disk, not a RAM-backed /tmp
    try:
        ckpt = tmp / "ckpt"
        # built in a child process, so that this process never holds torch's memory
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                        "from bench_shards import make_sharded_checkpoint as m; from pathlib import Path; "
                        "m(Path(sys.argv[2]), float(sys.argv[3]))", str(Path(__file__).parent), str(ckpt), str(size)],
                       check=True, cwd=ROOT)
        shards = len(list(ckpt.glob("*.safetensors")))
        gb = sum(p.stat().st_size for p in ckpt.glob("*.safetensors")) / 1e9
        t = timed_pairs([*NORMCLI_RSS, "inspect", str(ckpt), "--json"], torch_import, repeats)
        assert t["code"] == 0, f"inspect exited {t['code']}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    label = f"inspect {gb:.2f} GB sharded checkpoint ({shards} shards)"
    return [
        ratio_row(f"{label} / import torch", t, 0.5),
        # memory does not depend on what else runs on the machine: an absolute bar
        {"name": f"{label}, peak RSS (MB)", "normcli": t["rss"], "baseline": None, "ratio": None,
         "bar": "<= 200 MB", "passed": t["rss"] <= 200},
    ]


if __name__ == "__main__":
    from bench_inspect import print_rows

    print_rows(run(quick="--quick" in sys.argv))
