"""The chapter-07 run: a character-level MoE trained with expert parallelism under torchrun.

    torchrun --standalone --nproc_per_node=2 -m nanomoe.parallel.ep_run --max_steps=200      # CPU: gloo
    torchrun --standalone --nproc_per_node=8 -m nanomoe.parallel.ep_run --dtype=bfloat16     # GPUs: NCCL

Every rank builds the same model from the same seed and keeps its E/W experts; rank 0 writes
metrics.jsonl (loss, tokens/s, rows sent/received per rank, bytes, imbalance), comm.png and
latest.pt (full experts: `--resume` works on any world size that divides E, `--init_from` takes a
single-process checkpoint). The step itself is `nanomoe.parallel.ep_train.train_step`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import matplotlib.pyplot as plt
import torch
import torch.distributed as dist

from ..config import moe_config
from ..course.ep_plots import plot_comm
from ..data import BatchLoader, encode_splits, read_corpus
from ..model import GPT
from ..moe import MoE, expert_counts
from ..tokenizer import get_tokenizer
from ..training.checkpoint import CheckpointError
from ..training.progress import tqdm
from ..training.train import get_lr
from .distributed import cleanup_distributed, setup_distributed
from .ep_train import evaluate, gather_comm, restore, save, train_step
from .expert_parallel import (
    ExpertParallelError,
    check_world_size,
    expert_parallel_moe,
    load_full_state_dict,
    shard_model,
    sync_gradients,
)


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
    log_interval: int = 50  # print the loss and the accounting every this many steps
    save_interval: int = 100  # write latest.pt every this many steps (and at the end)
    eval_iters: int = 10  # validation batches per rank at the end
    seed: int = 1337
    dtype: str = "float32"  # float32 | bfloat16 (autocast; the router stays float32)
    out_dir: str = "runs/07"
    resume: bool = False  # continue from out_dir/latest.pt (saved on any world size)
    init_from: str = ""  # start from this checkpoint's weights and optimizer (e.g. a 1-process run)
    threads: int = 1  # CPU threads per rank
    check: bool = False  # instead of training: one layer on W ranks vs the same layer in one process


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
        return check_layer(cfg, info) if cfg.check else _run(cfg, info)
    finally:
        cleanup_distributed(info)


def check_layer(cfg: EPConfig, info, sequences_per_rank: int = 2) -> dict:
    """One MoE layer split over the W ranks against the same layer in one process, on the same
    weights and tokens (rank r takes sequences r*b..(r+1)*b-1). Rank 0 prints the max differences
    of the outputs and of every parameter's gradient after `sync_gradients`."""
    torch.set_num_threads(max(1, cfg.threads))
    device = info.device or "cpu"
    check_world_size(cfg.n_experts, info.world_size)
    config = moe_config(vocab_size=32, block_size=cfg.block_size, n_embd=cfg.n_embd, n_head=cfg.n_head,
                        n_experts=cfg.n_experts, moe_top_k=cfg.moe_top_k, dropout=0.0,
                        moe_capacity_factor=cfg.moe_capacity_factor or None, moe_balance_scope=cfg.moe_balance_scope)
    torch.manual_seed(cfg.seed)  # the same full layer and batch on every rank
    single = MoE(config).to(device)
    x = torch.randn(sequences_per_rank * info.world_size, cfg.block_size, cfg.n_embd, device=device)
    layer = shard_model_layer(single, config) if info.enabled else single
    b = sequences_per_rank
    xr = x[info.rank * b:(info.rank + 1) * b].clone().requires_grad_(True)
    with torch.no_grad():  # the step's expert counts (global balance scope): every rank has the whole batch
        load = expert_counts(single.route(x)[2].reshape(1, -1, config.moe_top_k), config.n_experts)[0]
    y, aux, _ = layer(xr, load)
    (y.square().mean() + aux).backward()  # any scalar of the outputs (a mean over tokens, like the CE)
    sync_gradients(layer)
    ys = _gather(y.detach(), info)
    grads = {n: _gather(p.grad, info) if n.startswith("experts.") else p.grad for n, p in layer.named_parameters()}
    # the reference runs on every rank, on the whole batch and its counts
    y1, aux1, _ = single(x, load)
    (y1.square().mean() + aux1).backward()
    if not info.is_main:
        return {}
    diffs = {"output": float((ys - y1.detach()).abs().max())}
    diffs.update({f"grad {n}": float((grads[n] - p.grad).abs().max()) for n, p in single.named_parameters()})
    print(f"{info.world_size} ranks vs 1 process, {cfg.n_experts} experts, top-{cfg.moe_top_k}: max |difference|")
    for name, d in diffs.items():
        print(f"  {name:<22} {d:.1e}")
    return diffs


def shard_model_layer(single: MoE, config) -> MoE:
    layer = expert_parallel_moe(config).to(single.router.weight.device)
    load_full_state_dict(layer, single.state_dict())
    return layer


def _gather(t: torch.Tensor, info) -> torch.Tensor:
    if not info.enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


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
                         world_size=info.world_size, vocab_size=tok.vocab_size)
    out = Path(cfg.out_dir)
    step = 0
    if cfg.resume and (out / "latest.pt").is_file():
        step = restore(out / "latest.pt", model, optimizer, loader)
    elif cfg.init_from:
        step = restore(cfg.init_from, model, optimizer, loader)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else None
    log = _train_loop(cfg, info, model, optimizer, loader, tok, step, device, autocast)
    val = BatchLoader(val_ids, cfg.batch_size, cfg.block_size, seed=cfg.seed + 1, rank=info.rank,
                      world_size=info.world_size)
    val_loss = evaluate(model, val, cfg.eval_iters, device, autocast) if cfg.eval_iters else float("nan")
    save(out / "latest.pt", model, optimizer, cfg.max_steps, cfg, loader, tok)
    summary = _summary(log, val_loss, info.world_size)
    if info.is_main:
        print(json.dumps(summary))
        _plot(log, out / "comm.png", info.world_size)
    return summary


def _train_loop(cfg, info, model, optimizer, loader, tokenizer, step, device, autocast) -> list[dict]:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    if info.is_main and step == 0:
        metrics.unlink(missing_ok=True)
    log = []
    # rank 0 shows the bar where nanomoe.training.progress says (a terminal, a notebook with widgets)
    bar = tqdm(range(step, cfg.max_steps), disable=None if info.is_main else True, desc=f"EP W={info.world_size}")
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
            if (s + 1) % cfg.log_interval == 0 or s == cfg.max_steps - 1:
                bar.write(format_step(rec))
        if (s + 1) % cfg.save_interval == 0 and s + 1 < cfg.max_steps:
            save(out / "latest.pt", model, optimizer, s + 1, cfg, loader, tokenizer)
    return log


def format_step(rec: dict) -> str:
    """One step's loss and, for W > 1, who sent how many rows to whom and the bytes moved."""
    line = f"step {rec['step'] + 1}: loss {rec['loss']:.4f}, {rec['tok_per_s']:.0f} tok/s"
    if "sent" not in rec:
        return line
    rows = [f"  rank {r}: sent {sum(row)} rows {row}, its experts computed {rec['received'][r]}, "
            f"{rec['bytes'][r] / 1e3:.1f} kB out" for r, row in enumerate(rec["sent"])]
    return "\n".join([line, *rows, f"  imbalance (max/mean of expert rows) {rec['imbalance']:.3f}"])


def _summary(log: list[dict], val_loss: float, world: int) -> dict:
    tail = log[len(log) // 2:] or log  # steady state: the second half
    out = {"world_size": world, "steps": len(log), "final_loss": log[-1]["loss"] if log else None,
           "val_loss": val_loss,
           "tok_per_s": sorted(r["tok_per_s"] for r in tail)[len(tail) // 2] if tail else None}
    if log and "bytes" in log[-1]:
        out["bytes_per_step"] = sum(sum(r["bytes"]) for r in tail) / len(tail)
        out["imbalance_mean"] = sum(r["imbalance"] for r in tail) / len(tail)
        out["received_last_step"] = log[-1]["received"]
        out["dropped_fraction"] = sum(r["dropped"] for r in tail) / sum(sum(r["received"]) + r["dropped"] for r in tail)
        out["local_fraction"] = sum(sum(r["sent"][i][i] for i in range(world)) for r in tail) / sum(
            sum(r["received"]) for r in tail)
    return out


def _plot(log: list[dict], path: Path, world: int) -> None:
    if world == 1 or not log:
        return
    fig = plot_comm(log)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def launch(world: int, timeout: float = 3600, **options) -> tuple[dict, str]:
    """Run `torchrun --standalone --nproc_per_node=world -m nanomoe.parallel.ep_run --key=value ...` as a
    subprocess (how a notebook starts W processes on one machine; gloo on CPU, one thread each).
    Returns rank 0's summary (its last JSON line) and the printed output. Raises RuntimeError with
    the end of the output when the run fails."""
    args = [f"--{k}={v}" if not isinstance(v, bool) else (f"--{k}" if v else f"--no-{k}") for k, v in options.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "nanomoe.parallel.ep_run", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if sys.platform.startswith("linux") and not torch.cuda.is_available():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: talk over the loopback interface
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    text = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if _worth_showing(line))
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun with {world} processes failed (exit {proc.returncode}):\n{text[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return (json.loads(lines[-1]) if lines else {}), text


def _worth_showing(line: str) -> bool:
    """torchrun's own warnings (OMP_NUM_THREADS, ...) are noise in a notebook."""
    return bool(line.strip()) and not line.startswith(("W1", "W0", "*****", "  warnings.warn")) \
        and "Setting OMP_NUM_THREADS" not in line and "UserWarning" not in line


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
