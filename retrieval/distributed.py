"""The few torch.distributed helpers training needs; all are no-ops in a single process.

Started by ``torchrun --nproc_per_node=N``, which sets RANK / WORLD_SIZE / LOCAL_RANK: gloo on
CPU, nccl on GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .errors import UserError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def check_device(device: str | None) -> None:
    """``--device cuda`` on a machine where torch sees no GPU: one line, not a CUDA traceback."""
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: torch sees no CUDA GPU on this machine (a CPU-only "
                        "torch build, or no driver); drop --device to use the CPU")


def setup(device: str | None = None) -> Context:
    """Join the process group if torchrun started us; pick this rank's device."""
    check_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if use_cuda:
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device(device or "cpu")
    return Context(rank, world_size, chosen)


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast(ctx: Context, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_across_ranks(ctx: Context, value: float) -> float:
    if not ctx.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / ctx.world_size


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class RankShardSampler(Sampler[int]):
    """Gives each rank its own slice of every global batch drawn by ``base``.

    pytorch-metric-learning's MPerClassSampler is not distributed-aware; seeded identically on every
    rank it yields the same global order, and slicing whole batches keeps its m-per-identity groups
    intact (batch_size is a multiple of m).
    """

    def __init__(self, base: Sampler[int], batch_size: int, ctx: Context, seed: int):
        self.base, self.batch_size, self.ctx, self.seed = base, batch_size, ctx, seed
        self.epoch = 0
        global_batch = batch_size * ctx.world_size
        self.num_batches = len(base) // global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        np.random.seed(self.seed + self.epoch)  # MPerClassSampler draws from numpy's global RNG
        order = list(self.base)
        global_batch = self.batch_size * self.ctx.world_size
        for b in range(self.num_batches):
            start = b * global_batch + self.ctx.rank * self.batch_size
            yield from order[start:start + self.batch_size]
