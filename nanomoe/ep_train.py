"""Training an MoE with expert parallelism under torchrun (chapter 07).

    torchrun --standalone --nproc_per_node=2 -m nanomoe.ep_train --max_steps=200      # CPU: gloo
    torchrun --standalone --nproc_per_node=8 -m nanomoe.ep_train --dtype=bfloat16     # GPUs: NCCL

Every rank is a data-parallel replica for the dense weights and the owner of E/W experts
(`nanomoe.expert_parallel`). One optimizer step on each rank:

    for each of its grad_accum micro-batches:   forward (tokens travel to their experts and back),
                                                (loss / grad_accum).backward()  (and back again)
    sync_gradients    dense gradients averaged over ranks ONCE per step; expert gradients / W
    clip_grad_norm    the global norm (dense once + expert shards summed over ranks)
    AdamW step, update_moe_bias (DeepSeek-V3 bias, loads summed over ranks)

The BatchLoader gives rank r global batches r, r+W, ...: W ranks with A micro-batches see exactly
what one process with W*A micro-batches sees, so the two runs are the same computation (the test
`tests/test_07_expert_parallel.py` checks 20 steps of it). Checkpoints hold the full experts and
resume on any world size that divides E (`--resume`), or start from a single-process checkpoint
(`--init_from`). Accounting per step and rank: rows sent/received, bytes over the network,
and the imbalance of the ranks' expert work, written to metrics.jsonl and plotted."""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import matplotlib.pyplot as plt
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, check_config, load_checkpoint, save_checkpoint
from .config import moe_config
from .data import BatchLoader, encode_splits, read_corpus
from .distributed import cleanup_distributed, setup_distributed
from .ep_plots import plot_comm
from .expert_parallel import (
    ExpertParallelError,
    check_world_size,
    clip_grad_norm,
    comm_summary,
    ep_layers,
    full_optimizer_state,
    full_state_dict,
    imbalance,
    load_full_optimizer_state,
    load_full_state_dict,
    shard_model,
    sync_gradients,
)
from .model import GPT
from .moe import global_balance_prepass, update_moe_bias
from .tokenizer import get_tokenizer
from .train import get_lr


@dataclass
class EPConfig:
    """A chapter-07 run: the model (a small character-level MoE) and how to train it."""

    corpus: str = "machado"
    source: str = ""  # a local copy of the corpus (file or folder) when offline
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    n_experts: int = 8
    moe_top_k: int = 2
    moe_capacity_factor: float = 0.0  # 0 = dropless
    moe_balance_scope: str = "global"  # the balance loss sees every rank's load
    batch_size: int = 8  # sequences per micro-batch, per rank
    grad_accum: int = 1  # micro-batches per step, per rank
    max_steps: int = 200
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 20
    decay_steps: Optional[int] = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_iters: int = 10
    seed: int = 1337
    dtype: str = "float32"  # float32 | bfloat16 (autocast; the router stays float32)
    out_dir: str = "runs/07"
    resume: bool = False  # continue from out_dir/latest.pt (saved on any world size)
    init_from: str = ""  # start from this checkpoint's weights and optimizer (e.g. a 1-process run)
    threads: int = 1  # CPU threads per rank


def parse_config(argv=None) -> EPConfig:
    p = argparse.ArgumentParser(description="Train an MoE with expert parallelism (run under torchrun).")
    for f in fields(EPConfig):
        default = f.default
        if isinstance(default, bool):
            p.add_argument(f"--{f.name}", default=default, action=argparse.BooleanOptionalAction)
        else:
            kind = type(default) if default is not None else int
            p.add_argument(f"--{f.name}", type=kind, default=default, help=f"default: {default}")
    return EPConfig(**vars(p.parse_args(argv)))


# ---- one optimizer step -----------------------------------------------------------------------


def train_step(model, optimizer, micro_batches, lr: float, grad_clip: float, group=None, autocast=None) -> dict:
    """One optimizer step over this rank's micro-batches [(x, y), ...]. Returns the step's
    cross-entropy (mean over micro-batches and ranks), the global gradient norm and this rank's
    exchanges: rows sent to / received from each rank and bytes sent (forward + backward)."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    if len(micro_batches) > 1:  # global balance scope: count the whole step's routing first (else a no-op);
        with autocast or nullcontext():  # with one micro-batch the forward all-reduces the counts itself
            global_balance_prepass(model, [x for x, _ in micro_batches])
    ce, sent, received, sent_bytes = 0.0, 0, 0, 0
    for x, y in micro_batches:
        with autocast or nullcontext():
            _, loss = model(x, y)
        (loss / len(micro_batches)).backward()
        ce += float(model.last_ce_loss) / len(micro_batches)
        comm = comm_summary(model)
        if comm:
            sent, received = sent + comm["sent"], received + comm["received"]
            sent_bytes += 2 * comm["bytes"]  # the backward sends as many bytes as the forward
    sync_gradients(model, group)
    norm = clip_grad_norm(model, grad_clip, group)
    optimizer.step()
    update_moe_bias(model)
    ce = _mean_over_ranks(ce, group)
    return {"loss": ce, "grad_norm": norm, "sent": sent, "received": received, "bytes": sent_bytes}


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
    received[d] rows rank d's experts computed, bytes[s], and the imbalance max/mean of received."""
    W = dist.get_world_size(group) if dist.is_initialized() else 1
    if W == 1 or not torch.is_tensor(step_result["sent"]):
        return {}
    mine = torch.cat([step_result["sent"], torch.tensor([step_result["bytes"]])]).long()
    if dist.get_backend(group) == "nccl":
        mine = mine.cuda()
    rows = [torch.empty_like(mine) for _ in range(W)]
    dist.all_gather(rows, mine, group=group)
    table = torch.stack(rows).cpu()  # (W, W+1)
    sent = table[:, :W]
    received = sent.sum(0)  # what each rank's experts computed
    return {"sent": sent.tolist(), "received": received.tolist(), "bytes": table[:, W].tolist(),
            "imbalance": imbalance(received)}


@torch.no_grad()
def evaluate(model, loader: BatchLoader, iters: int, device, autocast=None, group=None) -> float:
    """Mean validation cross-entropy over `iters` batches per rank (every rank takes part: the MoE
    layers exchange tokens in evaluation too)."""
    model.eval()
    total = 0.0
    for _ in range(iters):
        x, y = loader.next_batch(device)
        with autocast or nullcontext():
            model(x, y)
        total += float(model.last_ce_loss)
    model.train()
    return _mean_over_ranks(total / max(iters, 1), group)


# ---- checkpoints -------------------------------------------------------------------------------


def save(path: Path, model, optimizer, cfg: EPConfig, step: int, loader: BatchLoader, tokenizer, group=None) -> None:
    """Gather the full experts (a collective: every rank calls it), then rank 0 writes atomically."""
    state = {
        "model": full_state_dict(model, group) if dist.is_initialized() else model.state_dict(),
        "optimizer": full_optimizer_state(optimizer, model, group) if dist.is_initialized() else optimizer.state_dict(),
        "config": model.config.to_dict(),
        "train_config": asdict(cfg),
        "step": step,
        "loader": loader.state_dict(),
        "tokenizer": tokenizer.info() if tokenizer is not None else None,
        "world_size": dist.get_world_size(group) if dist.is_initialized() else 1,
    }
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_checkpoint(path, state)
    if dist.is_initialized():
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


# ---- the run ----------------------------------------------------------------------------------


def build_model(cfg: EPConfig, vocab_size: int) -> GPT:
    return GPT(moe_config(
        vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_embd=cfg.n_embd, n_experts=cfg.n_experts, moe_top_k=cfg.moe_top_k, dropout=0.0,
        moe_capacity_factor=cfg.moe_capacity_factor or None, moe_balance_scope=cfg.moe_balance_scope,
    ))


def run(cfg: EPConfig) -> dict:
    """Train under torchrun (or as one process); rank 0 writes metrics.jsonl, latest.pt and a plot."""
    info = setup_distributed("auto")
    try:
        return _run(cfg, info)
    finally:
        cleanup_distributed(info)


def _run(cfg: EPConfig, info) -> dict:
    torch.set_num_threads(max(1, cfg.threads))
    device = info.device or "cpu"
    check_world_size(cfg.n_experts, info.world_size)
    text = read_corpus(cfg.corpus, cfg.source or None)
    tok = get_tokenizer("char", text)
    train_ids, val_ids = encode_splits(tok, text)
    torch.manual_seed(cfg.seed)  # every rank draws the same full model, then keeps its experts
    model = build_model(cfg, tok.vocab_size).to(device)
    if info.enabled:
        shard_model(model)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, device_type=torch.device(device).type)
    loader = BatchLoader(train_ids, cfg.batch_size, cfg.block_size, seed=cfg.seed, rank=info.rank,
                         world_size=info.world_size)
    out = Path(cfg.out_dir)
    step = 0
    if cfg.resume and (out / "latest.pt").is_file():
        step = restore(out / "latest.pt", model, optimizer, loader)
    elif cfg.init_from:
        step = restore(cfg.init_from, model, optimizer, loader)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else None
    log = _train_loop(cfg, info, model, optimizer, loader, step, device, autocast)
    val = BatchLoader(val_ids, cfg.batch_size, cfg.block_size, seed=cfg.seed + 1, rank=info.rank,
                      world_size=info.world_size)
    val_loss = evaluate(model, val, cfg.eval_iters, device, autocast) if cfg.eval_iters else float("nan")
    save(out / "latest.pt", model, optimizer, cfg, cfg.max_steps, loader, tok)
    summary = _summary(log, val_loss, info.world_size)
    if info.is_main:
        print(json.dumps(summary))
        _plot(log, out / "comm.png", info.world_size)
    return summary


def _train_loop(cfg, info, model, optimizer, loader, step, device, autocast) -> list[dict]:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    if info.is_main and step == 0:
        metrics.unlink(missing_ok=True)
    log = []
    bar = tqdm(range(step, cfg.max_steps), disable=not info.is_main, desc=f"EP W={info.world_size}")
    for s in bar:
        t0 = time.perf_counter()
        batches = [loader.next_batch(device) for _ in range(cfg.grad_accum)]
        res = train_step(model, optimizer, batches, get_lr(s, cfg), cfg.grad_clip, autocast=autocast)
        dt = time.perf_counter() - t0
        tokens = cfg.batch_size * cfg.block_size * cfg.grad_accum * info.world_size
        rec = {"step": s, "loss": res["loss"], "grad_norm": res["grad_norm"], "tok_per_s": tokens / dt,
               "world_size": info.world_size, **gather_comm(res)}
        log.append(rec)
        if info.is_main:
            bar.set_postfix(loss=f"{res['loss']:.3f}")
            with open(metrics, "a") as f:
                f.write(json.dumps(rec) + "\n")
    return log


def _summary(log: list[dict], val_loss: float, world: int) -> dict:
    tail = log[len(log) // 2:] or log  # steady state: the second half
    out = {"world_size": world, "steps": len(log), "final_loss": log[-1]["loss"] if log else None,
           "val_loss": val_loss,
           "tok_per_s": sorted(r["tok_per_s"] for r in tail)[len(tail) // 2] if tail else None}
    if log and "bytes" in log[-1]:
        out["bytes_per_step"] = sum(sum(r["bytes"]) for r in tail) / len(tail)
        out["imbalance_mean"] = sum(r["imbalance"] for r in tail) / len(tail)
        out["received_last_step"] = log[-1]["received"]
    return out


def _plot(log: list[dict], path: Path, world: int) -> None:
    if world == 1 or not log:
        return
    fig = plot_comm(log)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    try:
        cfg = parse_config(argv)
        run(cfg)
    except (ExpertParallelError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
