"""One optimizer step of expert-parallel training, its accounting, and checkpoints (chapter 07).

Every rank is a data-parallel replica for the dense weights and the owner of E/W experts
(`nanomoe.parallel.expert_parallel`). One optimizer step on each rank (`train_step`):

    for each of its grad_accum micro-batches:   forward (tokens travel to their experts and back),
                                                (loss / grad_accum).backward()  (and back again)
    sync_gradients    dense gradients averaged over ranks ONCE per step; expert gradients / W
    clip_grad_norm    the global norm (dense once + expert shards summed over ranks)
    AdamW step, update_moe_bias (DeepSeek-V3 bias, loads summed over ranks)

With `BatchLoader(rank=r, world_size=W)` rank r reads global batches r, r+W, ...: W ranks with A
micro-batches see exactly what one process with W*A micro-batches sees, so the two runs are the
same computation (`tests/test_07_expert_parallel.py` checks 20 steps). Checkpoints (`save`,
`restore`) hold the full experts in the single-process layout: a run saved on W ranks resumes on
any world size that divides E, and a single-process checkpoint starts an expert-parallel run.
The command-line run is `nanomoe.parallel.ep_run`."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..data import BatchLoader
from ..moe import add_loads, global_balance_prepass, sum_over_ranks, update_moe_bias
from ..training.checkpoint import check_config, load_checkpoint, save_checkpoint
from .expert_parallel import (
    clip_grad_norm,
    comm_summary,
    ep_layers,
    full_optimizer_state,
    full_state_dict,
    imbalance,
    load_full_optimizer_state,
    load_full_state_dict,
    reset_comm,
    sync_gradients,
)

# ---- one optimizer step -----------------------------------------------------------------------


def train_step(model, optimizer, micro_batches, lr: float, grad_clip: float, group=None, autocast=None) -> dict:
    """One optimizer step over this rank's micro-batches [(x, y), ...]. Returns the step's
    cross-entropy (mean over micro-batches and ranks), the global gradient norm and this rank's
    exchanges: rows sent to / received from each rank and bytes sent (forward + backward)."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    reset_comm(model)
    step_loads = sum_over_ranks  # global balance scope, one micro-batch: its counts summed over ranks
    if len(micro_batches) > 1:  # several: count the whole step's routing first (None unless the scope is global)
        with autocast or nullcontext():
            step_loads = global_balance_prepass(model, [x for x, _ in micro_batches])
    prepass_bytes = comm_summary(model).get("bytes", 0)  # its forwards exchange tokens too (no backward)
    reset_comm(model)
    ce, dropped, loads = 0.0, 0, None
    for x, y in micro_batches:
        with autocast or nullcontext():
            out = model(x, y, moe_loads=step_loads)
        (out.loss / len(micro_batches)).backward()
        ce += float(out.ce_loss) / len(micro_batches)
        dropped += sum(int(st["dropped"]) for st in out.moe_stats)  # capacity drops (assignments)
        loads = add_loads(loads, out.moe_stats)
    comm = comm_summary(model)  # the training forwards; their backward sends as many bytes again
    sent, received = comm.get("sent", 0), comm.get("received", 0)
    sent_bytes = prepass_bytes + 2 * comm.get("bytes", 0)
    sync_gradients(model, group)
    norm = clip_grad_norm(model, grad_clip, group)
    optimizer.step()
    update_moe_bias(model, loads)
    ce = _mean_over_ranks(ce, group)
    return {"loss": ce, "grad_norm": norm, "sent": sent, "received": received, "bytes": sent_bytes,
            "dropped": dropped}


def _mean_over_ranks(value: float, group=None) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, group=group)
    return float(t) / dist.get_world_size(group)


def gather_comm(step_result: dict, group=None) -> dict:
    """Every rank's accounting of one step, on every rank: sent[s][d] rows rank s sent to rank d,
    received[d] rows rank d's experts computed, bytes[s] rank s sent over the network (forward +
    backward), dropped (assignments over capacity, all ranks) and the imbalance max/mean of received."""
    W = dist.get_world_size(group) if dist.is_initialized() else 1
    if W == 1 or not torch.is_tensor(step_result["sent"]):
        return {}
    mine = torch.cat([step_result["sent"], torch.tensor([step_result["bytes"], step_result["dropped"]])]).long()
    if dist.get_backend(group) == "nccl":
        mine = mine.cuda()
    rows = [torch.empty_like(mine) for _ in range(W)]
    dist.all_gather(rows, mine, group=group)
    table = torch.stack(rows).cpu()  # (W, W+2)
    sent = table[:, :W]
    received = sent.sum(0)  # what each rank's experts computed
    return {"sent": sent.tolist(), "received": received.tolist(), "bytes": table[:, W].tolist(),
            "dropped": int(table[:, W + 1].sum()), "imbalance": imbalance(received)}


@torch.no_grad()
def evaluate(model, loader: BatchLoader, iters: int, device, autocast=None, group=None) -> float:
    """Mean validation cross-entropy over `iters` batches per rank (every rank takes part: the MoE
    layers exchange tokens in evaluation too)."""
    model.eval()
    total = 0.0
    for _ in range(iters):
        x, y = loader.next_batch(device)
        with autocast or nullcontext():
            total += float(model(x, y).ce_loss)
    model.train()
    return _mean_over_ranks(total / max(iters, 1), group)


# ---- checkpoints -------------------------------------------------------------------------------


def save(path: Path, model, optimizer, step: int, cfg: Optional[Any] = None,
         loader: Optional[BatchLoader] = None, tokenizer=None, group=None) -> None:
    """Gather the full experts (a collective: every rank calls it), then rank 0 writes atomically.
    The file has the single-process layout, so any world size (or chapter 04's tools) can read it."""
    distributed = dist.is_available() and dist.is_initialized()
    state = {
        "model": full_state_dict(model, group) if distributed else model.state_dict(),
        "optimizer": full_optimizer_state(optimizer, model, group) if distributed else optimizer.state_dict(),
        "config": model.config.to_dict(),
        "train_config": dict(vars(cfg)) if cfg is not None else None,
        "step": step,
        "loader": loader.state_dict() if loader is not None else None,
        "tokenizer": tokenizer.info() if tokenizer is not None else None,
        "world_size": dist.get_world_size(group) if distributed else 1,
    }
    if not distributed or dist.get_rank() == 0:
        save_checkpoint(path, state)
    if distributed:
        dist.barrier(group)


def restore(path, model, optimizer, loader: Optional[BatchLoader]) -> int:
    """Load a full checkpoint (saved on any world size, or by one process) into this rank's model
    and optimizer; returns the step to continue from. A different model config is refused, naming
    the fields that differ."""
    ckpt = load_checkpoint(path)
    check_config(ckpt, model.config)
    if ep_layers(model):
        load_full_state_dict(model, ckpt["model"])
        if "optimizer" in ckpt:
            load_full_optimizer_state(optimizer, model, ckpt["optimizer"])
    else:
        model.load_state_dict(ckpt["model"])
        if "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
    if loader is not None and ckpt.get("loader"):
        loader.load_state_dict(ckpt["loader"])
    return int(ckpt.get("step", 0))
