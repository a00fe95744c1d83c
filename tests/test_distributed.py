"""Swapped models train under DistributedDataParallel: 2 processes, gloo, 127.0.0.1."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from normcli.layers import MABN2d
from normcli.swap import swap_norms

WORLD_SIZE = 2
STEPS = 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)) + out)
        return self.head(out.mean((2, 3)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIGS = {"frn": {}, "mabn": {"B": 2, "real_B": 4, "warmup_iters": 2}}


def worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        for to, options in CONFIGS.items():
            train(rank, to, options, out_dir)
        # both ranks done before either tears gloo down: a rank that leaves while its peer still has
        # traffic in flight aborts in gloo's destructor ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train(rank: int, to: str, options: dict, out_dir: str) -> None:
    """A few DDP steps on this rank's own data; saves every rank's parameters (gathered) and own buffers."""
    torch.manual_seed(0)  # the same initial model on every rank
    model, _ = swap_norms(Net(), to, input_shape=(2, 3, 8, 8), **options)
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    optimiser = torch.optim.SGD(ddp.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank sees its own data
    for _ in range(STEPS):
        x = torch.randn(2, 3, 8, 8, generator=gen) * (1 + rank)
        loss = nn.functional.cross_entropy(ddp(x), torch.randint(0, 3, (2,), generator=gen))
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(params) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, params)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    torch.save({"gathered": gathered, "buffers": buffers}, f"{out_dir}/{to}_rank{rank}.pt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both swaps trained for a few steps in one 2-process group (spawning is the slow part)."""
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return out_dir


@pytest.mark.slow
@pytest.mark.parametrize("to", list(CONFIGS))
def test_ddp_keeps_parameters_identical_across_ranks(trained, to):
    options = CONFIGS[to]
    results = [torch.load(trained / f"{to}_rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]

    for result in results:
        rank0, rank1 = result["gathered"]
        torch.testing.assert_close(rank0, rank1, atol=0, rtol=0)
    start = torch.cat([p.detach().flatten() for p in _fresh(to, options).parameters()])
    assert not torch.equal(results[0]["gathered"][0], start)  # training did move the parameters

    if to == "mabn":
        # broadcast_buffers=False: each rank kept its own statistics (rank 1's inputs are twice as large)
        assert "broadcast_buffers=False" in MABN2d.__doc__
        for name in ("bn1.running_var", "bn1.buffer_x2", "bn2.buffer_gz"):
            assert not torch.allclose(results[0]["buffers"][name], results[1]["buffers"][name]), name
        assert results[0]["buffers"]["bn1.iters"].item() == results[1]["buffers"]["bn1.iters"].item() == STEPS
        assert (results[1]["buffers"]["bn1.buffer_x2"] > results[0]["buffers"]["bn1.buffer_x2"]).all()


def _fresh(to, options):
    torch.manual_seed(0)
    return swap_norms(Net(), to, input_shape=(2, 3, 8, 8), **options)[0]
