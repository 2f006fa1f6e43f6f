"""Chapter 07's helpers around the one training loop: start W processes from a notebook, summarize
their metrics, and check one expert-parallel layer against the same layer in one process.

    launch(2, max_steps=100, out_dir="runs/07/w2")   # torchrun -m scripts.04_train --config=machado_moe_ep ...
    summarize(read_metrics("runs/07/w2"))             # final loss, val loss, tokens/s, bytes per step, ...
    torchrun --standalone --nproc_per_node=2 -m nanomoe.course.ep_runs --n_experts=8   # the layer check

The training is `nanomoe.training.train` with `parallel="ep"` (`scripts.04_train`); nothing here trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import moe_config
from ..moe import MoE
from ..parallel.distributed import cleanup_distributed, setup_distributed
from ..parallel.expert_parallel import check_world_size, expert_parallel_moe, load_full_state_dict, sync_gradients
from ..paths import checkout_with
from ..training.cli import parse_args, short_errors

CHECK_DEFAULTS = dict(n_embd=64, n_head=4, block_size=64, n_experts=8, moe_top_k=2, moe_capacity_factor=0.0,
                      moe_balance_scope="global", seed=1337, threads=1)


def launch(world: int, module: str = "scripts.04_train", timeout: float = 3600, **options) -> str:
    """Run `torchrun --standalone --nproc_per_node=world -m module --key=value ...` as a subprocess
    (how a notebook starts W processes on one machine; gloo on CPU, one thread each). For
    scripts.04_train the run config is `machado_moe_ep` unless `config=` says otherwise. Returns the
    printed output; raises RuntimeError with its end when the run fails."""
    target, root = ["-m", module], checkout_with("scripts/04_train.py")
    if module == "scripts.04_train":
        target = ["-m", module] if root is not None else [_packaged_train_04()]
        options = {"config": "machado_moe_ep", "compare_chars": 0, "plot": False, **options}
    args = [f"--{k}={v}" for k, v in options.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           *target, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NANOMOE_ARGS": ""}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root or ""), env.get("PYTHONPATH", "")) if p)
    if sys.platform.startswith("linux") and not torch.cuda.is_available():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: talk over the loopback interface
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    text = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if _worth_showing(line))
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun with {world} processes failed (exit {proc.returncode}):\n{text[-3000:]}")
    return text


def _packaged_train_04() -> str:
    """Chapter 04's training program as the wheel carries it (package data: a pip install, such as
    Colab's, has no scripts/ folder)."""
    packaged = files("nanomoe.resources").joinpath("train_04.py")
    if not packaged.is_file():
        raise RuntimeError("chapter 04's training program was not found: run from a source checkout of nanomoe "
                           "(git clone https://github.com/sagui-nlp/nanomoe) or install the nanomoe wheel")
    return str(packaged)


def _worth_showing(line: str) -> bool:
    """torchrun's own warnings (OMP_NUM_THREADS, ...) are noise in a notebook."""
    return bool(line.strip()) and not line.startswith(("W1", "W0", "*****", "  warnings.warn")) \
        and "Setting OMP_NUM_THREADS" not in line and "UserWarning" not in line


def read_metrics(out_dir, kind: str = "train") -> list[dict]:
    """The records of one kind ("train" or "eval") in a run's metrics.jsonl."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def summarize(out_dir) -> dict:
    """A run's last train CE and validation CE; over the second half of its train records (steady
    state): the median tokens/s and, with several ranks, bytes per step, imbalance, drops, local rows."""
    log, evals = read_metrics(out_dir), read_metrics(out_dir, "eval")
    tail = log[len(log) // 2:] or log
    out = {"steps": log[-1]["step"] if log else 0, "final_loss": log[-1]["ce"] if log else None,
           "val_loss": evals[-1]["val_loss"] if evals else float("nan"),
           "tok_per_s": sorted(r["tokens_per_s"] for r in tail)[len(tail) // 2] if tail else None}
    if tail and "bytes" in tail[-1]:
        rows = sum(sum(r["received"]) for r in tail)
        out["bytes_per_step"] = sum(sum(r["bytes"]) for r in tail) / len(tail)
        out["imbalance_mean"] = sum(r["imbalance"] for r in tail) / len(tail)
        out["dropped_fraction"] = sum(r["dropped"] for r in tail) / (rows + sum(r["dropped"] for r in tail))
        out["local_fraction"] = sum(sum(r["sent"][i][i] for i in range(len(r["sent"]))) for r in tail) / rows
    return out


def format_step(rec: dict) -> str:
    """One train record's loss and, for W > 1, who sent how many rows to whom and the bytes moved."""
    line = f"step {rec['step']}: loss {rec['ce']:.4f}, {rec['tokens_per_s']:.0f} tok/s"
    if "sent" not in rec:
        return line
    rows = [f"  rank {r}: sent {sum(row)} rows {row}, its experts computed {rec['received'][r]}, "
            f"{rec['bytes'][r] / 1e3:.1f} kB out" for r, row in enumerate(rec["sent"])]
    return "\n".join([line, *rows, f"  imbalance (max/mean of expert rows) {rec['imbalance']:.3f}"])


# ---- the layer check (run under torchrun) ----------------------------------------------------------


def check_layer(opts, info, sequences_per_rank: int = 2) -> dict:
    """One MoE layer split over the W ranks against the same layer in one process, on the same
    weights and tokens (rank r takes sequences r*b..(r+1)*b-1). Rank 0 prints the max differences
    of the outputs and of every parameter's gradient after `sync_gradients`."""
    torch.set_num_threads(max(1, opts.threads))
    device = info.device or "cpu"
    check_world_size(opts.n_experts, info.world_size)
    config = moe_config(vocab_size=32, block_size=opts.block_size, n_embd=opts.n_embd, n_head=opts.n_head,
                        n_experts=opts.n_experts, moe_top_k=opts.moe_top_k, dropout=0.0,
                        moe_capacity_factor=opts.moe_capacity_factor or None, moe_balance_scope=opts.moe_balance_scope)
    torch.manual_seed(opts.seed)  # the same full layer and batch on every rank
    single = MoE(config).to(device)
    x = torch.randn(sequences_per_rank * info.world_size, opts.block_size, opts.n_embd, device=device)
    layer = single
    if info.enabled:
        layer = expert_parallel_moe(config).to(device)
        load_full_state_dict(layer, single.state_dict())
    b = sequences_per_rank
    xr = x[info.rank * b:(info.rank + 1) * b].clone().requires_grad_(True)
    with torch.no_grad():  # the step's balance counts (global scope, as `global_balance_prepass`): the whole batch
        single.eval()
        load = single(x)[2]["balance_load"].clone()
        single.train()
    y, aux, _ = layer(xr, load)
    (y.square().mean() + aux).backward()  # any scalar of the outputs (a mean over tokens, like the CE)
    sync_gradients(layer)
    ys = _gather(y.detach(), info)
    grads = {n: _gather(p.grad, info) if n.startswith("experts.") else p.grad for n, p in layer.named_parameters()}
    y1, aux1, _ = single(x, load)  # the reference runs on every rank, on the whole batch and its counts
    (y1.square().mean() + aux1).backward()
    if not info.is_main:
        return {}
    diffs = {"output": float((ys - y1.detach()).abs().max())}
    diffs.update({f"grad {n}": float((grads[n] - p.grad).abs().max()) for n, p in single.named_parameters()})
    print(f"{info.world_size} ranks vs 1 process, {opts.n_experts} experts, top-{opts.moe_top_k}: max |difference|")
    for name, d in diffs.items():
        print(f"  {name:<22} {d:.1e}")
    return diffs


def _gather(t: torch.Tensor, info) -> torch.Tensor:
    if not info.enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


if __name__ == "__main__":
    short_errors()  # a world size that does not divide the experts prints one clear line
    opts = parse_args(CHECK_DEFAULTS)
    dist_info = setup_distributed("auto")
    try:
        check_layer(opts, dist_info)
    finally:
        cleanup_distributed(dist_info)
