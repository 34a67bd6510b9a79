"""Training with the segregated layers under DistributedDataParallel (gloo, processes on one
machine), checked against the same training in one process.

    python -m perf.ddp_example            # 2 processes, CPU

Each rank trains on its half of every batch; DDP averages the gradients, so after the same
number of steps the parameters equal those of one process training on the whole batches.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import triton_kstconv as K


class Decoder(nn.Module):
    """A small decoder: two segregated transposed convolutions and a 1x1 head."""

    def __init__(self):
        super().__init__()
        self.up1 = K.ConvTranspose2d(16, 12, 4, stride=2, padding=1, activation="relu")
        self.up2 = K.ConvTranspose2d(12, 8, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, z):
        return torch.tanh(self.head(torch.relu(self.up2(self.up1(z)))))


def make_data(steps: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(steps, batch, 16, 4, 4, generator=g)
    target = torch.rand(steps, batch, 3, 16, 16, generator=g) * 2 - 1
    return z, target


def train(model: nn.Module, z, target, lr: float = 0.05, rank: int = 0, world: int = 1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    per = z.shape[1] // world
    for step in range(z.shape[0]):
        zb = z[step, rank * per:(rank + 1) * per]
        tb = target[step, rank * per:(rank + 1) * per]
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(zb), tb)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _worker(rank: int, world: int, port: int, steps: int, batch: int, out_path: str):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # loopback only (a sandbox's hostname may not resolve), and a bounded wait: a peer that
    # cannot connect fails the run in two minutes instead of gloo's default thirty
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(Decoder())
        z, target = make_data(steps, batch)
        train(model, z, target, rank=rank, world=world)
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in model.module.state_dict().items()},
                       out_path)
        dist.barrier()  # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(world: int = 2, steps: int = 5, batch: int = 8) -> dict:
    """Train with `world` processes; returns rank 0's final state_dict."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.pt")
        mp.spawn(_worker, args=(world, _free_port(), steps, batch, path), nprocs=world,
                 join=True)
        return torch.load(path)


def run_single(steps: int = 5, batch: int = 8) -> dict:
    torch.manual_seed(0)
    model = Decoder()
    z, target = make_data(steps, batch)
    train(model, z, target)
    return model.state_dict()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    ddp = run_ddp(args.world, args.steps, args.batch)
    one = run_single(args.steps, args.batch)
    worst = max((ddp[k] - one[k]).abs().max().item() for k in one)
    print(f"| parameters | max |DDP({args.world} processes) - one process| |")
    print("|---|---|")
    print(f"| {len(one)} tensors | {worst:.2e} |")
    return worst


if __name__ == "__main__":
    main()
