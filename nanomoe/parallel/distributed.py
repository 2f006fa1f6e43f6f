"""Distributed data parallel (DDP) plumbing for `torchrun`.

`torchrun --standalone --nproc_per_node=N -m scripts.04_train ...` starts N copies of the script and
gives each one the environment variables RANK, LOCAL_RANK and WORLD_SIZE (plus MASTER_ADDR/PORT).
`setup_distributed` reads them, joins the process group (NCCL on GPUs, gloo on CPU) and says which
device this rank drives. Without those variables it is a no-op: one process, rank 0 of 1.

Rules the trainer follows so that N ranks behave like one big process (nanoGPT's train.py does the same):
- every rank builds the same model; DDP broadcasts rank 0's weights when it wraps the model;
- each rank reads a different slice of every optimizer step's batches (see `nanomoe.training.train`);
- gradients are averaged across ranks only on the last micro-step of a step (`no_sync` on the others);
- the learning rate depends only on the step, and every stop decision is taken on an all-reduced
  value, so all ranks take the same one (a decision taken on rank 0 alone hangs the others);
- only rank 0 writes logs, plots and checkpoints.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process stands: its rank among world_size processes and the device it drives."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: Optional[str] = None  # a device forced by the launcher (cuda:LOCAL_RANK), or None
    initialized_here: bool = False  # True when setup_distributed created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_distributed(device: Optional[str] = "auto") -> DistInfo:
    """Join the torchrun process group when the launcher set RANK/WORLD_SIZE, else return rank 0 of 1.

    Backend: NCCL when the device is CUDA, gloo otherwise (CPU). On CUDA each rank takes the GPU
    cuda:LOCAL_RANK (one process per GPU)."""
    world = env_world_size()
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = torch.cuda.is_available() and (device in (None, "auto") or str(device).startswith("cuda"))
    dev = f"cuda:{local_rank}" if want_cuda else None
    created = False
    if not dist.is_initialized():
        if want_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        created = True
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev, initialized_here=created)


def cleanup_distributed(info: DistInfo) -> None:
    """Leave the process group if `setup_distributed` created it."""
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device: Optional[str] = "auto") -> Iterator[DistInfo]:
    """`setup_distributed` on entry, `cleanup_distributed` on exit (also on an exception)."""
    info = setup_distributed(device)
    try:
        yield info
    finally:
        cleanup_distributed(info)


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor over ranks (in place; a no-op for one process)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (in place; a no-op for one process)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def count_ranks(flag: bool, info: Optional[DistInfo], device: str = "cpu") -> int:
    """How many ranks have `flag` true: lets every rank see a fact that may differ between machines
    (a file on one node's disk only) and take the same decision."""
    t = torch.tensor([float(flag)], device=device)
    if info is not None:
        all_reduce_sum(t, info)
    return int(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model
