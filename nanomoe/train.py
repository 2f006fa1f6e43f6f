"""The training loop every chapter uses: one function, from a laptop CPU to many GPUs.

    result = train(model, train_tokens, val_tokens, TrainConfig(max_steps=2000, lr=1e-3))

What one optimizer step does (nanoGPT's train.py, made resumable and testable):

1. learning rate from the step alone (`get_lr`): linear warmup, cosine decay to `min_lr`
   (Loshchilov & Hutter 2017, SGDR); the same pure function on every rank;
2. `grad_accum` micro-batches, each loss divided by the number of micro-batches this rank runs, so
   the gradient is the mean over the whole step's batch; under DDP the gradient all-reduce happens
   only on the last micro-step (`no_sync` on the others) and averages over ranks;
3. mixed precision chosen by `nanomoe.device.pick_precision`: bf16 autocast on Ampere+, fp16
   autocast + GradScaler on a T4 (fp16 gradients underflow without loss scaling), fp32 on CPU;
4. gradient clipping to `grad_clip` (global L2 norm; Pascanu et al. 2013), AdamW step
   (`model.configure_optimizers`, fused kernel on CUDA);
5. MoE models with `moe_bias_balance`: the DeepSeek-V3 routing bias moves after the step.

Every `eval_interval` steps: validation cross-entropy on a fixed set of validation batches (the
MoE auxiliary losses are *not* part of it; perplexity = exp(CE)), a sample generation when a
tokenizer is given, a line in `out_dir/metrics.jsonl`, the curves plot, and the checkpoints
`latest.pt` / `best.pt` (atomic, see `nanomoe.checkpoint`).

Exact resume. The randomness of a step is a function of (seed, step) only: the batch of the g-th
micro-batch of the run is drawn by a generator seeded with (seed, g), and the dropout generator is
reseeded with (seed, rank, step) at the start of every step (when the model has dropout, the only
other user of randomness in a step). So training N steps, stopping and
resuming for N more replays exactly the same batches and dropout masks as 2N steps straight, and on
CPU the losses and the final weights are bitwise identical (tests/test_04_resume.py).
The same trick makes W ranks under DDP read exactly the batches one process reads with the same
`grad_accum`: rank r's n-th batch is global batch n*W + r (`nanomoe.data.BatchLoader`), so each step
consumes global batches step*grad_accum .. step*grad_accum + grad_accum - 1 whatever W is.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from . import checkpoint as ck
from . import resources
from .data import BatchLoader, DataError
from .device import Precision, peak_flops, pick_precision
from .paths import data_root
from .distributed import (DistInfo, all_reduce_mean, all_reduce_sum, barrier, cleanup_distributed, setup_distributed,
                          unwrap)

TokenData = Union[np.ndarray, torch.Tensor, Sequence[Union[np.ndarray, torch.Tensor]]]  # 1-D ids or shards


@dataclass
class TrainConfig:
    """Everything about *how* to train (the model's shape lives in GPTConfig)."""

    max_steps: int = 1000  # optimizer steps
    batch_size: int = 12  # sequences per micro-batch (per rank)
    block_size: Optional[int] = None  # tokens per sequence; None = model.config.block_size
    grad_accum: int = 1  # micro-batches per optimizer step, over all ranks (divisible by world size)
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 100  # linear warmup steps
    decay_steps: Optional[int] = None  # cosine decay ends here (None = max_steps); min_lr after
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    eval_interval: int = 250  # evaluate (and checkpoint) every this many steps, and at the end
    eval_iters: int = 20  # validation batches per evaluation; 0 = no evaluation
    log_interval: int = 10  # train-loss log lines every this many steps
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False  # torch.compile the model (slow start, faster steps on GPU)
    threads: int = 0  # CPU intra-op threads (torch.set_num_threads); 0 = torch's default (all cores)
    seed: int = 1337
    out_dir: Optional[str] = None  # where metrics.jsonl, the plot and checkpoints go; None = nowhere
    resume: bool = False  # continue from out_dir/latest.pt when it exists
    save_interval: int = 0  # also save latest.pt every this many steps (0 = only at evaluations)
    save_checkpoints: bool = True  # write latest.pt / best.pt when out_dir is set
    sample_tokens: int = 200  # tokens generated at each evaluation when a tokenizer is given (0 = none)
    sample_prompt: str = "\n"
    sample_temperature: float = 0.8
    plot: bool = True  # write out_dir/curves.png at each evaluation

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"TrainConfig: {msg}")

        self.betas = tuple(float(b) for b in self.betas)
        need(self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(self.block_size is None or self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        need(self.lr > 0 and self.min_lr >= 0, f"lr must be > 0 and min_lr >= 0, got lr={self.lr}, min_lr={self.min_lr}")
        need(self.min_lr <= self.lr, f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.eval_interval >= 1, f"eval_interval must be >= 1, got {self.eval_interval}")
        need(self.eval_iters >= 0, f"eval_iters must be >= 0, got {self.eval_iters}")
        need(self.log_interval >= 1, f"log_interval must be >= 1, got {self.log_interval}")
        need(len(self.betas) == 2, f"betas must be two numbers, got {self.betas}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        need(self.threads >= 0, f"threads must be >= 0 (0 = torch's default), got {self.threads}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)


@dataclass
class TrainResult:
    """What `train` returns. `history` has one dict per evaluation (step, tokens, train_loss,
    val_loss, val_ppl, lr, tokens_per_s, mfu, elapsed_s, sample); `final` is the last of them;
    `losses` the optimized loss of every step (CE + MoE aux); `log` the train-loss records."""

    history: list[dict] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    log: list[dict] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    train_time_s: float = 0.0
    tokens_per_s: float = 0.0
    best_val_loss: float = float("inf")
    stopped: Optional[str] = None  # None = finished; else why training stopped early
    out_dir: Optional[str] = None

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


# ---- learning-rate schedule -----------------------------------------------------------------------


def get_lr(step: int, tcfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): nanoGPT's schedule.

    warmup:  lr * (step + 1) / (warmup_steps + 1)               for step < warmup_steps
    cosine:  min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * r))     r = (step - warmup) / (decay - warmup)
    after:   min_lr                                              for step > decay_steps"""
    decay = tcfg.decay_steps if tcfg.decay_steps is not None else tcfg.max_steps
    if step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / (tcfg.warmup_steps + 1)
    if step > decay or decay <= tcfg.warmup_steps:
        return tcfg.min_lr
    ratio = (step - tcfg.warmup_steps) / (decay - tcfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return tcfg.min_lr + coeff * (tcfg.lr - tcfg.min_lr)


# ---- evaluation -----------------------------------------------------------------------------------


@torch.no_grad()
def _eval_sums(model, data, tcfg_bs: int, T: int, iters: int, device: str, precision: Precision, seed: int,
               rank: int = 0, world: int = 1) -> tuple[float, int]:
    """Sum of the per-batch mean CE over this rank's share of `iters` fixed validation batches
    (global batches 0 .. iters-1 of a loader seeded with `seed`; rank r takes r, r+world, ...)."""
    raw = unwrap(model)
    loader = BatchLoader(data, tcfg_bs, T, seed=seed, rank=rank, world_size=world)
    total, n = 0.0, 0
    for _ in range(rank, iters, world):
        x, y = loader.next_batch(device)
        with precision.autocast():
            _, loss = model(x, y)
        ce = raw.last_ce_loss if raw.last_ce_loss is not None else loss  # CE only, never CE + aux
        total += float(ce)
        n += 1
    return total, n


def evaluate(
    model: torch.nn.Module,
    data: TokenData,
    batch_size: int,
    block_size: int,
    iters: int,
    *,
    device: Optional[str] = None,
    precision: Optional[Precision] = None,
    seed: int = 0,
) -> float:
    """Mean cross-entropy (no MoE auxiliary loss) of `model` on `iters` random batches of `data`.

    The batches depend only on `seed`, so every call sees the same ones: curves are not noisy
    from re-sampling. Perplexity is exp of this value."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    dev = device or str(next(model.parameters()).device)
    prec = precision or Precision(dev, torch.float32)
    was_training = model.training
    model.eval()
    try:
        total, n = _eval_sums(model, data, batch_size, block_size, iters, dev, prec, seed)
    finally:
        model.train(was_training)
    return total / n


# ---- state that makes resume exact ----------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every global generator's state as plain data (tensors, lists, numbers): weights_only-safe."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": int(py_version), "state": [int(v) for v in py_state], "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def _plain(x: Any) -> Any:
    """numpy scalars -> Python numbers, recursively (JSON- and weights_only-friendly)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    return x


# ---- plots ----------------------------------------------------------------------------------------


def save_curves(history: list[dict], log: list[dict], path: Union[str, os.PathLike], title: str = "") -> Optional[Path]:
    """Save the train (per log record) and validation (per evaluation) cross-entropy curves."""
    if not history and not log:
        return None
    import matplotlib.pyplot as plt

    from .plots import plot_curves

    runs = {
        "treino": [{"step": r["step"], "loss": r["ce"]} for r in log],
        "validação": [{"step": r["step"], "loss": r["val_loss"]} for r in history if r.get("val_loss") is not None],
    }
    fig = plot_curves(runs, x="step", y="loss", title=title or None, figsize=(7, 4))
    fig.axes[0].set_ylabel("entropia cruzada (nats/token)")
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)  # a reader never sees a half-written image
    plt.close(fig)
    return path


# ---- the loop -------------------------------------------------------------------------------------


def _sample(raw_model, tokenizer, tcfg: TrainConfig, precision: Precision, device: str) -> Optional[str]:
    """A short generation from `sample_prompt` with a fixed-seed generator (it does not touch the
    global RNG, so it cannot change the training run)."""
    if tokenizer is None or tcfg.sample_tokens <= 0:
        return None
    try:
        ids = tokenizer.encode(tcfg.sample_prompt)
    except Exception:
        ids = []
    if not ids:
        ids = [0]
    bs = raw_model.config.block_size
    ids = ids[-bs:]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(tcfg.seed)
    use_cache = len(ids) + tcfg.sample_tokens <= bs
    with precision.autocast():
        out = raw_model.generate(
            idx, tcfg.sample_tokens, temperature=tcfg.sample_temperature, use_cache=use_cache, generator=gen
        )
    return tokenizer.decode(out[0, len(ids) :].tolist())


def _progress_bar(total: int, initial: int, enabled: bool):
    """tqdm where it reads well: a widget in notebooks with ipywidgets (Colab), a live bar in a
    terminal, a bar refreshed every 30 s when the output goes to a file, and none in a notebook
    without widgets (its text bar would fill the saved notebook; the evaluation lines remain)."""
    import sys

    from tqdm import tqdm as text_tqdm

    from .cli import in_notebook

    kw = dict(total=total, initial=initial, desc="train", dynamic_ncols=True)
    if in_notebook():
        try:
            import ipywidgets  # noqa: F401
            from tqdm.notebook import tqdm as widget_tqdm

            return widget_tqdm(disable=not enabled, **kw)
        except ImportError:
            return text_tqdm(disable=True, **kw)
    interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return text_tqdm(disable=not enabled, mininterval=1.0 if interactive else 30.0, **kw)


def _uses_moe_bias(raw_model) -> bool:
    cfg = raw_model.config
    return cfg.n_experts > 0 and bool(getattr(cfg, "moe_bias_balance", False))


def _prepare_out_dir(out: Path, tokenizer) -> Optional[dict]:
    """Create out_dir; copy tokenizer files beside the checkpoints; return the tokenizer info to store."""
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        return None
    info = dict(tokenizer.info())
    src = info.get("path")
    if info.get("name") == "bpe" and src and Path(src).is_file():
        dst = out / "tokenizer.json"
        if Path(src).resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        info["path"] = "tokenizer.json"
    return info


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines an interrupted run wrote after its last checkpoint."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if rec.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(l + "\n" for l in keep), encoding="utf-8")
    os.replace(tmp, path)


def train(
    model: torch.nn.Module,
    train_data: TokenData,
    val_data: Optional[TokenData],
    tcfg: Optional[TrainConfig] = None,
    *,
    tokenizer=None,
    on_step: Optional[Callable[[int, torch.nn.Module, float], None]] = None,
    progress: bool = True,
    extra_state: Optional[dict] = None,
) -> TrainResult:
    """Train `model` (a nanomoe GPT) in place on token arrays; see the module docstring.

    train_data / val_data: 1-D token arrays (numpy, memmap or torch) or lists of shards.
    on_step(step, model, loss): called after every optimizer step; `step` counts the steps done
    (1 .. max_steps), `model` is the plain (unwrapped) model, `loss` the step's loss (CE + aux).
    extra_state: plain data stored in the checkpoints (e.g. where the data came from).
    Under torchrun, every rank calls train() with the same arguments."""
    tcfg = tcfg or TrainConfig()
    dist_info = setup_distributed(tcfg.device)
    try:
        return _train(model, train_data, val_data, tcfg, dist_info, tokenizer, on_step, progress, extra_state)
    finally:
        cleanup_distributed(dist_info)


def _train(model, train_data, val_data, tcfg: TrainConfig, dist_info: DistInfo, tokenizer, on_step, progress: bool,
           extra_state: Optional[dict]) -> TrainResult:
    rank, world, main = dist_info.rank, dist_info.world_size, dist_info.is_main
    if tcfg.grad_accum % world != 0:
        raise ValueError(
            f"grad_accum ({tcfg.grad_accum}) must be divisible by the number of processes ({world}): each rank "
            f"runs grad_accum / world_size micro-batches. Try --grad_accum={world * max(1, tcfg.grad_accum // world)}"
        )
    accum = tcfg.grad_accum // world  # micro-batches this rank runs per step
    if tcfg.threads:
        # On a CPU shared with other jobs, fewer threads than cores avoids threads spinning while they
        # wait for each other (we measured 10x slowdowns with 2 threads on 2 busy cores).
        torch.set_num_threads(tcfg.threads)
    precision = pick_precision(dist_info.device or tcfg.device, tcfg.dtype, verbose=False)
    device = precision.device
    raw = model
    cfg = raw.config
    T = tcfg.block_size or cfg.block_size
    if T > cfg.block_size:
        raise ValueError(f"TrainConfig.block_size={T} exceeds the model's block_size={cfg.block_size}")
    # Global batch g of the run is drawn from a generator seeded with (seed, g); rank r's n-th batch is
    # g = n * world + r, so W ranks x A micro-batches read what 1 process x W*A micro-batches reads.
    loader = BatchLoader(train_data, tcfg.batch_size, T, seed=tcfg.seed, rank=rank, world_size=world)
    has_val = val_data is not None and tcfg.eval_iters > 0
    if has_val:
        BatchLoader(val_data, tcfg.batch_size, T)  # fail now, not at the first evaluation, on bad val data

    out = Path(tcfg.out_dir) if tcfg.out_dir else None
    tok_info = tokenizer.info() if tokenizer is not None else None
    if out is not None and main:
        tok_info = _prepare_out_dir(out, tokenizer)
        ck.remove_stale_tmp(out)
    barrier(dist_info)

    raw.to(device)
    raw.train()
    optimizer = raw.configure_optimizers(tcfg.weight_decay, tcfg.lr, tcfg.betas, precision.device_type)
    scaler = torch.amp.GradScaler(precision.device_type, enabled=precision.use_scaler)

    res = TrainResult(out_dir=str(out) if out else None)
    start_step = 0
    ckpt_path = out / ck.LATEST if out is not None else None
    if tcfg.resume and ckpt_path is not None:
        if ckpt_path.is_file():
            state = ck.load_checkpoint(ckpt_path, map_location=device)
            ck.check_config(state, cfg)
            raw.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler") and precision.use_scaler:
                scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            try:
                loader.load_state_dict(state["loader"])
            except DataError as e:  # batch size / data changed: continue at the same step count
                loader.global_batches = int(state["step"]) * tcfg.grad_accum
                if main:
                    print(f"note: {e}; continuing at global batch {loader.global_batches}")
            start_step = int(state["step"])
            res.history, res.losses, res.log = list(state["history"]), list(state["losses"]), list(state["log"])
            res.tokens, res.train_time_s = int(state["tokens"]), float(state["train_time_s"])
            res.best_val_loss = float(state["best_val_loss"])
            exact_keys = ["batch_size", "block_size", "grad_accum", "seed", "lr", "min_lr", "warmup_steps",
                          "decay_steps", "weight_decay", "betas", "dtype"]
            if tcfg.decay_steps is None:
                exact_keys.append("max_steps")  # the cosine decay ends at max_steps: a new one reshapes it
            changed = [d for d in ck.config_diff(state.get("train_config", {}), tcfg.to_dict())
                       if d.split(":")[0] in exact_keys]
            if main:
                print(f"resuming from {ckpt_path} at step {start_step} ({res.tokens:,} tokens seen)")
                if changed:
                    print("note: the training config changed since the checkpoint, so this is not an exact "
                          "continuation:\n  " + "\n  ".join(changed))
                if state.get("world_size", 1) != world:
                    print(f"note: the checkpoint was written by {state.get('world_size', 1)} process(es), "
                          f"this run has {world}; batches are the same, float sums may differ slightly")
            del state
            if main:
                _trim_metrics(out / "metrics.jsonl", start_step)
        elif main:
            print(f"--resume: no checkpoint at {ckpt_path} yet, starting from scratch")

    if start_step == 0 and out is not None and main:
        _trim_metrics(out / "metrics.jsonl", -1)  # a fresh run starts a fresh log (resumed runs append)

    # Wrappers come after the weights are loaded, so checkpoints always see the plain model.
    fwd = torch.compile(raw) if tcfg.compile else raw
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_ids = [torch.device(device).index or 0] if precision.device_type == "cuda" else None
        fwd = DDP(fwd, device_ids=ddp_ids)
    moe_bias = _uses_moe_bias(raw)
    if moe_bias:
        from .moe import update_moe_bias  # chapter 03: DeepSeek-V3 bias balancing

    tokens_per_step = tcfg.batch_size * T * tcfg.grad_accum  # over all ranks
    flops_tok = raw.flops_per_token(T) if hasattr(raw, "flops_per_token") else None
    peak = peak_flops(device, precision.dtype)

    def mfu(tps: float) -> Optional[float]:
        return flops_tok * tps / (peak * world) if (peak and flops_tok) else None

    saved_step = start_step if start_step > 0 else None

    def save(step: int, is_best: bool) -> None:
        nonlocal saved_step
        if out is None or not tcfg.save_checkpoints:
            return
        saved_step = step
        if not main:
            return
        state = {
            "model": ck.model_state_dict(raw),
            "config": cfg.to_dict(),
            "train_config": tcfg.to_dict(),
            "tokenizer": tok_info,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if precision.use_scaler else None,
            "step": step,
            "tokens": res.tokens,
            "train_time_s": res.train_time_s,
            "best_val_loss": res.best_val_loss,
            "lr": get_lr(max(step - 1, 0), tcfg),
            "rng": rng_state(),
            "loader": loader.state_dict(),
            "history": _plain(res.history),
            "losses": list(res.losses),
            "log": _plain(res.log),
            "world_size": world,
            "extra": _plain(extra_state) if extra_state else None,
        }
        ck.save_checkpoint(out / ck.LATEST, state)
        if is_best:
            ck.copy_checkpoint(out / ck.LATEST, out / ck.BEST)

    def write_metrics(rec: dict) -> None:
        if out is not None and main:
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(_plain(rec), ensure_ascii=False) + "\n")

    def do_eval(step: int, train_ce: Optional[float], tps: float) -> dict:
        rec: dict[str, Any] = {"kind": "eval", "step": step, "tokens": res.tokens, "train_loss": train_ce,
                               "lr": get_lr(max(step - 1, 0), tcfg), "tokens_per_s": tps, "mfu": mfu(tps),
                               "elapsed_s": res.train_time_s}
        if has_val:
            fwd.eval()
            # Each rank evaluates every world-th batch; the sums are all-reduced: the same value everywhere.
            s, n = _eval_sums(fwd if world == 1 else raw, val_data, tcfg.batch_size, T, tcfg.eval_iters, device,
                              precision, seed=0, rank=rank, world=world)
            fwd.train()
            t = torch.tensor([s, float(n)], dtype=torch.float64, device=device)
            all_reduce_sum(t, dist_info)
            val = float(t[0] / t[1])
            rec["val_loss"], rec["val_ppl"] = val, math.exp(min(val, 700.0))
        if main:
            rec["sample"] = _sample(raw, tokenizer, tcfg, precision, device)
        res.history.append(rec)
        write_metrics(rec)
        if main and progress:
            vl = f"val {rec['val_loss']:.4f} (ppl {rec['val_ppl']:.2f})" if "val_loss" in rec else "no val data"
            tl = f"train {train_ce:.4f}, " if train_ce is not None else ""
            m = f", MFU {rec['mfu'] * 100:.1f}%" if rec.get("mfu") else ""
            _write(f"step {step:>6} | {tl}{vl} | {tps:,.0f} tok/s{m}")
            if rec.get("sample"):
                _write("  sample: " + rec["sample"].replace("\n", "\n          ")[:600])
        return rec

    bar = _progress_bar(tcfg.max_steps, min(start_step, tcfg.max_steps), enabled=progress and main)
    _write = bar.write if (progress and main) else print
    if main and progress:
        n_p = raw.num_params(non_embedding=False)
        _write(f"{precision.describe()} | {world} process(es) | {n_p / 1e6:.2f}M params | "
               f"{tokens_per_step:,} tokens/step ({tcfg.batch_size} x {T} x {tcfg.grad_accum} micro-batches)")

    if start_step == 0 and has_val and tcfg.max_steps > 0:
        do_eval(0, None, 0.0)
    win_ce, win_n, win_time, win_tokens = 0.0, 0, 0.0, 0  # since the last log record
    ev_ce, ev_n, ev_time, ev_tokens = 0.0, 0, 0.0, 0  # since the last evaluation
    reseed = cfg.dropout > 0  # nothing else in a training step draws from the global generator
    step = start_step
    for step in range(start_step, tcfg.max_steps):
        t0 = time.perf_counter()
        if reseed:  # dropout's randomness depends on (seed, rank, step) only: exact resume, distinct ranks
            torch.manual_seed(tcfg.seed * 1_000_003 + rank * 7919 + step)
        lr = get_lr(step, tcfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        ce_sum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = loader.next_batch(device)
            last = micro == accum - 1
            sync = fwd.no_sync() if (world > 1 and not last) else nullcontext()
            with sync:
                with precision.autocast():
                    _, loss = fwd(x, y)
                scaler.scale(loss / accum).backward()
            loss_sum += loss.detach().float()
            ce_sum += (raw.last_ce_loss if raw.last_ce_loss is not None else loss.detach()).float()
        # Decide on values all-reduced over ranks, so every rank takes the same decision.
        stats = torch.stack([loss_sum / accum, ce_sum / accum])
        all_reduce_mean(stats, dist_info)
        loss_v, ce_v = (float(v) for v in stats.tolist())
        scaler.unscale_(optimizer)  # true gradients (a no-op without fp16 loss scaling)
        # DDP already averaged the gradients, so this norm is the same on every rank.
        grad_norm = float(torch.nn.utils.clip_grad_norm_(raw.parameters(), tcfg.grad_clip or float("inf")))
        done = step + 1
        bad = None
        if not math.isfinite(loss_v):
            bad = f"the loss became {loss_v}"
        elif not math.isfinite(grad_norm) and not precision.use_scaler:
            # (with fp16 an inf gradient is routine: the GradScaler skips the step and lowers its scale)
            bad = f"the gradient norm became {grad_norm}"
        if bad:
            optimizer.zero_grad(set_to_none=True)  # never apply this step: the weights stay good
            last = f"{out / ck.LATEST} (step {saved_step})" if saved_step is not None else "none was written"
            res.stopped = (
                f"{bad} at step {done} (lr {lr:.3g}); training stopped before applying it. The last good "
                f"checkpoint is {last}. Try a lower lr, a longer warmup, grad_clip=1.0, or dtype=float32."
            )
            if main:
                _write("ERROR: " + res.stopped)
            break
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if moe_bias:
            update_moe_bias(raw)  # sums the expert loads over ranks: every rank keeps the same bias
        dt = time.perf_counter() - t0
        res.tokens += tokens_per_step
        res.train_time_s += dt
        res.losses.append(loss_v)
        win_ce += ce_v; win_n += 1; win_time += dt; win_tokens += tokens_per_step
        ev_ce += ce_v; ev_n += 1; ev_time += dt; ev_tokens += tokens_per_step
        if on_step is not None:
            on_step(done, raw, loss_v)
        bar.update(1)

        if done % tcfg.log_interval == 0 or done == tcfg.max_steps:
            tps = win_tokens / max(win_time, 1e-9)
            rec = {"kind": "train", "step": done, "tokens": res.tokens, "loss": loss_v, "ce": win_ce / win_n,
                   "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": tps, "mfu": mfu(tps), "elapsed_s": res.train_time_s}
            if raw.last_aux_loss is not None:
                rec["aux"] = float(raw.last_aux_loss)
            res.log.append(rec)
            write_metrics(rec)
            bar.set_postfix(loss=f"{win_ce / win_n:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
            win_ce, win_n, win_time, win_tokens = 0.0, 0, 0.0, 0

        is_eval = tcfg.eval_iters > 0 and (done % tcfg.eval_interval == 0 or done == tcfg.max_steps)
        if is_eval:
            rec = do_eval(done, ev_ce / max(ev_n, 1), ev_tokens / max(ev_time, 1e-9))
            ev_ce, ev_n, ev_time, ev_tokens = 0.0, 0, 0.0, 0
            val = rec.get("val_loss")
            is_best = val is not None and val < res.best_val_loss
            if is_best:
                res.best_val_loss = val
            save(done, is_best)
            if out is not None and main and tcfg.plot:
                save_curves(res.history, res.log, out / "curves.png")
        elif (tcfg.save_interval and done % tcfg.save_interval == 0) or (done == tcfg.max_steps):
            save(done, False)
    bar.close()

    res.steps = len(res.losses)
    res.tokens_per_s = res.tokens / res.train_time_s if res.train_time_s > 0 else 0.0
    if main and progress and res.stopped is None:
        f = res.final
        vl = f", val loss {f['val_loss']:.4f} (ppl {f['val_ppl']:.2f})" if f.get("val_loss") is not None else ""
        where = f" -> {out}" if out is not None else ""
        print(f"done: {res.steps} steps, {res.tokens:,} tokens in {res.train_time_s:.1f}s "
              f"({res.tokens_per_s:,.0f} tok/s){vl}{where}")
    return res


# ---- runs from a flat config (nanomoe/resources/configs/*.json + --key=value) ------------------------
#
# A run is described by one flat dict: data keys, "preset" plus any GPTConfig field (None = the
# preset's value), and any TrainConfig field. `scripts/04_train.py` reads it from a packaged JSON file
# (nanomoe/resources/configs/) or your own, and lets `--key=value` override any key. JSON only: a config never runs code.

DATA_KEYS = dict(data_dir="", dataset="machado", tokenizer="char", bpe_vocab=4096, max_chars=0)


def run_defaults() -> dict[str, Any]:
    """Every key a run config may set, with its default (model fields: None = preset default)."""
    from .config import GPTConfig

    d: dict[str, Any] = {"config": "", "quick": False, "preset": "modern", **DATA_KEYS}
    d.update({f.name: None for f in fields(GPTConfig)})
    t = TrainConfig().to_dict()
    t.pop("block_size")  # the model's block_size is the training sequence length
    t["betas"] = tuple(t["betas"])
    d.update(t)
    return d


def load_run_config(name: str) -> dict[str, Any]:
    """A run config: the name of a packaged one (`nanomoe.resources.config_names()`) or the path to a
    .json file of your own (a file that exists wins over a packaged name)."""
    if not name:
        return {}
    p = Path(name).expanduser()
    if p.is_file():
        text = p.read_text(encoding="utf-8")
    elif name in resources.config_names():
        text = resources.config_text(name)
    elif p.suffix == ".json":
        raise ValueError(f"config file {name} not found")
    else:
        raise ValueError(f"unknown config {name!r}; packaged configs: {', '.join(resources.config_names())} "
                         f"(or a path to a .json file)")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"config {name} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"config {name}: a JSON object of key: value pairs is expected")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}  # "_comment" keys are documentation
    known = run_defaults()
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise ValueError(f"config {name}: unknown key(s) {unknown}; known keys: {', '.join(sorted(known))}")
    if "betas" in cfg:
        cfg["betas"] = tuple(cfg["betas"])
    return cfg


def parse_run_args(argv=None, quick: Optional[dict] = None, defaults: Optional[dict] = None):
    """Read a run's parameters: defaults < the JSON config named by --config < --quick values <
    explicit --key=value. Returns a SimpleNamespace with every key (see `run_defaults`)."""
    from .cli import parse_args

    base = dict(defaults or run_defaults())
    first = parse_args(base, argv, quick=quick)
    merged = {**base, **load_run_config(first.config)}
    merged["config"] = first.config
    return parse_args(merged, argv, quick=quick)


def model_config_from_args(args, vocab_size: int):
    """GPTConfig from a run's preset + the model fields it sets (vocab_size from the data unless set)."""
    from .config import GPTConfig, preset

    over = {}
    for f in fields(GPTConfig):
        v = getattr(args, f.name, None)
        if v is None:
            continue
        if isinstance(f.default, bool) and isinstance(v, str):
            v = v.strip().lower() in ("1", "true", "yes", "y", "on")
        over[f.name] = v
    over.setdefault("vocab_size", vocab_size)
    if over["vocab_size"] < vocab_size:
        raise ValueError(f"vocab_size={over['vocab_size']} is smaller than the tokenizer's {vocab_size}")
    return preset(args.preset, **over)


def train_config_from_args(args) -> TrainConfig:
    keys = {f.name for f in fields(TrainConfig)} - {"block_size"}
    return TrainConfig(**{k: getattr(args, k) for k in keys if hasattr(args, k)})


def resolve_data_dir(args, dist_info: Optional[DistInfo] = None) -> Path:
    """The prepared data folder of a run: --data_dir when given (it must exist), else
    data/<dataset>_<tokenizer>[_<max_chars>] prepared on first use (by rank 0 under torchrun)."""
    from .data import gpt2_tokenizer, load_split, prepare, read_corpus

    if args.data_dir:
        folder = Path(args.data_dir)
        if not folder.is_dir():
            raise DataError(
                f"data folder {folder} does not exist: prepare it (e.g. `uv run -m data.prepare_machado "
                f"--out_dir {folder}`), or leave --data_dir empty to prepare --dataset/--tokenizer automatically"
            )
        load_split(folder, "train")  # a clear DataError when the folder holds no token shards
        return folder
    tok = args.tokenizer if args.tokenizer != "bpe" or args.bpe_vocab == 4096 else f"bpe{args.bpe_vocab}"
    name = f"{args.dataset}_{tok}" + (f"_{args.max_chars}" if args.max_chars else "")
    folder = data_root() / name
    main = dist_info is None or dist_info.is_main
    if main and not (folder / "meta.json").is_file():
        print(f"preparing {folder} ({args.dataset}, tokenizer {args.tokenizer}) ...")
        text = read_corpus(args.dataset)
        if args.max_chars:
            text = text[: args.max_chars]
        t = gpt2_tokenizer() if args.tokenizer == "gpt2" else args.tokenizer
        prepare(text, t, folder, vocab_size=args.bpe_vocab, corpus=args.dataset, progress=False)
    if dist_info is not None:
        barrier(dist_info)
    return folder


def short_errors() -> None:
    """In a script, print the clear ValueErrors that nanomoe raises (DataError, CheckpointError,
    CLIError, bad configs) as one line instead of a traceback. Every other exception, and a
    ValueError raised outside the nanomoe package, keeps its full traceback."""
    import sys

    previous = sys.excepthook
    pkg = str(Path(__file__).resolve().parent)

    def hook(kind, value, tb):
        last = tb
        while last is not None and last.tb_next is not None:
            last = last.tb_next
        where = str(Path(last.tb_frame.f_code.co_filename).resolve()) if last is not None else ""
        if issubclass(kind, ValueError) and where.startswith(pkg):
            print(f"error: {value}", file=sys.stderr)
            return
        previous(kind, value, tb)

    sys.excepthook = hook
