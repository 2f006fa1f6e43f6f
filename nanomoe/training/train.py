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
`latest.pt` / `best.pt` (atomic, see `nanomoe.training.checkpoint`).

Exact resume. The randomness of a step is a function of (seed, step) only: the batch of the g-th
micro-batch of the run is drawn by a generator seeded with (seed, g), and the dropout generator is
reseeded with (seed, rank, step) at the start of every step (when the model has dropout, the only
other user of randomness in a step). So training N steps, stopping and
resuming for N more replays exactly the same batches and dropout masks as 2N steps straight, and on
CPU the losses and the final weights are bitwise identical (tests/test_04_resume.py).
The same trick makes W ranks under DDP read exactly the batches one process reads with the same
`grad_accum`: rank r's n-th batch is global batch n*W + r (`nanomoe.data.loader.BatchLoader`), so each step
consumes global batches step*grad_accum .. step*grad_accum + grad_accum - 1 whatever W is.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import from_dict, require
from ..data import BatchLoader, DataError, TokenSource
from ..device import Precision, peak_flops, pick_precision
from ..interop.hellaswag import Example, evaluate_hellaswag, for_training
from ..moe import BALANCE_AFTER_FORWARD, add_loads, balance_after_forward, global_balance_prepass, update_moe_bias
from ..parallel.distributed import DistInfo, all_reduce_mean, barrier, count_ranks, process_group
from ..parallel.strategy import STRATEGIES, DDPStrategy, make_strategy
from . import checkpoint as ck
from .accumulation import grad_accum_for
from .evaluate import evaluate, sample_text, validation_loss
from .metrics import Meter, RunLog, save_curves, trim_metrics

TokenData = TokenSource  # 1-D ids or a list of shards
# `evaluate` and `save_curves` live in their own modules; the chapters import them from here too.
__all__ = ["TrainConfig", "TrainResult", "get_lr", "train", "evaluate", "save_curves"]


@dataclass
class TrainConfig:
    """Everything about *how* to train (the model's shape lives in GPTConfig)."""

    max_steps: int = 1000  # optimizer steps
    batch_size: int = 12  # sequences per micro-batch (per rank)
    block_size: Optional[int] = None  # tokens per sequence; None = model.config.block_size
    grad_accum: int = 1  # micro-batches per optimizer step, over all ranks (rounded up to a multiple of them)
    tokens_per_step: int = 0  # > 0: grad_accum derived from it and the world size (nanomoe.training.accumulation)
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
    hellaswag: str = ""  # HellaSwag .jsonl scored at each evaluation when the file exists ("" = off)
    hellaswag_examples: int = 0  # score its first N examples (0 = all)
    parallel: str = "ddp"  # how ranks share the run: ddp (whole model each) | ep (experts split; nanomoe.parallel)

    def __post_init__(self) -> None:
        need = partial(require, owner="TrainConfig")
        self.betas = tuple(float(b) for b in self.betas)
        need(self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(self.tokens_per_step >= 0, f"tokens_per_step must be >= 0 (0: grad_accum), got {self.tokens_per_step}")
        need(self.hellaswag_examples >= 0, f"hellaswag_examples must be >= 0 (0 = all), got {self.hellaswag_examples}")
        need(self.block_size is None or self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        need(self.lr > 0 and self.min_lr >= 0,
             f"lr must be > 0 and min_lr >= 0, got lr={self.lr}, min_lr={self.min_lr}")
        need(self.min_lr <= self.lr, f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.eval_interval >= 1, f"eval_interval must be >= 1, got {self.eval_interval}")
        need(self.eval_iters >= 0, f"eval_iters must be >= 0, got {self.eval_iters}")
        need(self.log_interval >= 1, f"log_interval must be >= 1, got {self.log_interval}")
        need(len(self.betas) == 2, f"betas must be two numbers, got {self.betas}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        need(self.threads >= 0, f"threads must be >= 0 (0 = torch's default), got {self.threads}")
        need(self.parallel in STRATEGIES, f"parallel must be one of {list(STRATEGIES)}, got {self.parallel!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return from_dict(cls, d)


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


# ---- one run: what the loop holds -----------------------------------------------------------------


@dataclass
class Run:
    """Everything one training run holds, built once by `start_run` and handed to each piece below."""

    tcfg: TrainConfig
    dist: DistInfo
    precision: Precision
    raw: torch.nn.Module  # the plain model: checkpoints, sampling and MoE updates see this one
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: BatchLoader
    val_data: Optional[TokenSource]
    block_size: int  # tokens per training sequence
    accum: int  # micro-batches this rank runs per step (grad_accum / world_size)
    step_line: str  # what one step is made of, e.g. "524,288 tokens/step (...) = 8 process(es) x 1 micro-batch(es) ..."
    out: Optional[Path]
    tokenizer: Any
    tok_info: Optional[dict]
    hellaswag: Optional[list[Example]]  # scored at each evaluation (None = off)
    extra_state: Optional[dict]
    result: TrainResult
    strategy: DDPStrategy  # how the ranks share the model (nanomoe.parallel.strategy)
    fwd: Optional[torch.nn.Module] = None  # what the steps call: raw, compiled and/or DDP-wrapped
    saved_step: Optional[int] = None  # the step of the last checkpoint written (for the NaN message)
    flops_per_token: Optional[float] = None
    peak_flops: Optional[float] = None

    @property
    def main(self) -> bool:
        return self.dist.is_main

    @property
    def has_val(self) -> bool:
        return self.val_data is not None and self.tcfg.eval_iters > 0

    @property
    def tokens_per_step(self) -> int:
        return self.tcfg.batch_size * self.block_size * self.tcfg.grad_accum  # over all ranks

    def mfu(self, tokens_per_s: float) -> Optional[float]:
        """Model FLOPs utilization: achieved FLOP/s over the GPUs' peak (None when the peak is unknown)."""
        if not (self.peak_flops and self.flops_per_token):
            return None
        return self.flops_per_token * tokens_per_s / (self.peak_flops * self.dist.world_size)


@dataclass
class StepStats:
    """One optimizer step, all-reduced over ranks: the same numbers on every rank."""

    lr: float
    loss: float  # the optimized loss (CE + MoE aux), mean over the step's micro-batches
    ce: float  # cross-entropy alone
    grad_norm: float
    aux: Optional[torch.Tensor] = None  # this rank's last micro-batch's weighted MoE aux loss (None when dense)
    moe_stats: list = field(default_factory=list)  # this rank's last micro-batch's routing, one per MoE layer
    moe_loads: Optional[list] = None  # this rank's expert loads summed over the step (bias balancing only)
    traffic: dict = field(default_factory=dict)  # EP on several ranks: the step's exchanges (strategy.traffic)


def start_run(model, train_data, val_data, tcfg: TrainConfig, dist: DistInfo, tokenizer, extra_state) -> Run:
    """Check the settings, pick device and precision, build loader and optimizer, prepare out_dir."""
    world = dist.world_size
    if tcfg.threads:
        # On a CPU shared with other jobs, fewer threads than cores avoids threads spinning while they
        # wait for each other (we measured 10x slowdowns with 2 threads on 2 busy cores).
        torch.set_num_threads(tcfg.threads)
    precision = pick_precision(dist.device or tcfg.device, tcfg.dtype, verbose=False)
    T = tcfg.block_size or model.config.block_size
    if T > model.config.block_size:
        raise ValueError(f"TrainConfig.block_size={T} exceeds the model's block_size={model.config.block_size}")
    # The same tokens per step on any number of processes (build-nanogpt's grad_accum_steps).
    accum, step_line = grad_accum_for(tcfg.batch_size, T, world, tcfg.tokens_per_step, tcfg.grad_accum)
    tcfg = replace(tcfg, grad_accum=accum)  # what the steps, the checkpoints and resume see
    # Global batch g of the run is drawn from a generator seeded with (seed, g); rank r's n-th batch is
    # g = n * world + r, so W ranks x A micro-batches read what 1 process x W*A micro-batches reads.
    V = model.config.vocab_size  # token ids are checked where they enter, never inside the forward
    loader = BatchLoader(train_data, tcfg.batch_size, T, seed=tcfg.seed, rank=dist.rank, world_size=world, vocab_size=V)
    if val_data is not None and tcfg.eval_iters > 0:
        BatchLoader(val_data, tcfg.batch_size, T)  # fail now, not at the first evaluation, on bad val data
    out = Path(tcfg.out_dir) if tcfg.out_dir else None
    tok_info = tokenizer.info() if tokenizer is not None else None
    if out is not None and dist.is_main:
        tok_info = _prepare_out_dir(out, tokenizer)
        ck.remove_stale_tmp(out)
    barrier(dist)
    model.to(precision.device)
    model.train()
    strategy = make_strategy(tcfg.parallel, world)
    _check_strategy(strategy, tcfg, val_data)
    model = strategy.shard(model)  # before the optimizer: EP replaces the expert parameters by this rank's shard
    optimizer = model.configure_optimizers(tcfg.weight_decay, tcfg.lr, tcfg.betas, precision.device_type)
    return Run(
        tcfg=tcfg, dist=dist, precision=precision, raw=model, optimizer=optimizer,
        scaler=torch.amp.GradScaler(precision.device_type, enabled=precision.use_scaler), loader=loader,
        val_data=val_data, block_size=T, accum=accum // world, step_line=step_line, out=out, tokenizer=tokenizer,
        tok_info=tok_info, extra_state=extra_state, result=TrainResult(out_dir=str(out) if out else None),
        strategy=strategy,
        hellaswag=for_training(tcfg.hellaswag, tcfg.hellaswag_examples, tokenizer, dist, precision.device),
        flops_per_token=model.flops_per_token(T) if hasattr(model, "flops_per_token") else None,
        peak_flops=peak_flops(precision.device, precision.dtype),
    )


def _check_strategy(strategy: DDPStrategy, tcfg: TrainConfig, val_data) -> None:
    """Under expert parallelism every forward needs every rank: evaluations must give each rank the
    same number of batches, and HellaSwag (examples split unevenly over ranks) is not supported."""
    if not strategy.every_rank_runs_the_model:
        return
    W = strategy.world
    if val_data is not None and tcfg.eval_iters % W:
        raise ValueError(f"parallel='ep' on {W} ranks needs eval_iters to be a multiple of {W} (every rank runs "
                         f"every evaluation forward), got eval_iters={tcfg.eval_iters}")
    if tcfg.hellaswag:
        raise ValueError("parallel='ep' does not score HellaSwag during training: set hellaswag='' (score the "
                         "checkpoint afterwards with one process)")


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


def wrap_model(run: Run) -> None:
    """torch.compile and/or DDP around the plain model, after its weights are loaded (so checkpoints
    always see the plain model)."""
    fwd = torch.compile(run.raw) if run.tcfg.compile else run.raw
    ids = [torch.device(run.precision.device).index or 0] if run.precision.device_type == "cuda" else None
    run.fwd = run.strategy.wrap(fwd, ids)  # DDP for "ddp" on several ranks; EP was sharded in start_run


# ---- checkpoint and resume ------------------------------------------------------------------------


def training_state(run: Run, step: int) -> dict[str, Any]:
    """Everything a checkpoint needs to continue exactly at `step` (plain data: weights_only-safe)."""
    res, tcfg = run.result, run.tcfg
    return {
        "model": run.strategy.model_state(run.raw),  # EP: the full experts, gathered from the ranks
        "config": run.raw.config.to_dict(),
        "train_config": tcfg.to_dict(),
        "tokenizer": run.tok_info,
        "optimizer": run.strategy.optimizer_state(run.optimizer, run.raw),
        "scaler": run.scaler.state_dict() if run.precision.use_scaler else None,
        "step": step,
        "tokens": res.tokens,
        "train_time_s": res.train_time_s,
        "best_val_loss": res.best_val_loss,
        "lr": get_lr(max(step - 1, 0), tcfg),
        "rng": ck.rng_state(),
        "loader": run.loader.state_dict(),
        "history": ck.plain(res.history),
        "losses": list(res.losses),
        "log": ck.plain(res.log),
        "world_size": run.dist.world_size,
        "extra": ck.plain(run.extra_state) if run.extra_state else None,
    }


def save(run: Run, step: int, is_best: bool) -> None:
    """Write out_dir/latest.pt (and copy it to best.pt) on rank 0; every rank remembers the step."""
    if run.out is None or not run.tcfg.save_checkpoints:
        return
    run.saved_step = step
    state = training_state(run, step) if run.main or run.strategy.collective_save else None  # EP: a collective
    if run.main:
        ck.save_checkpoint(run.out / ck.LATEST, state)
        if is_best:
            ck.copy_checkpoint(run.out / ck.LATEST, run.out / ck.BEST)


# Settings whose change makes a resumed run differ from an uninterrupted one.
EXACT_RESUME_KEYS = ["batch_size", "block_size", "grad_accum", "seed", "lr", "min_lr", "warmup_steps", "decay_steps",
                     "weight_decay", "betas", "dtype"]


def resume(run: Run) -> int:
    """Continue from out_dir/latest.pt when it exists: weights, optimizer, scaler, RNG, data position
    and history. Returns the step to start from (0 without a checkpoint)."""
    path = run.out / ck.LATEST if run.out is not None else None
    found = path is not None and path.is_file()
    seen_by = count_ranks(found, run.dist, run.precision.device)
    if 0 < seen_by < run.dist.world_size:  # rank 0 writes out_dir: other machines may not see it
        raise ck.CheckpointError(f"{path} is visible to {seen_by} of {run.dist.world_size} processes: resuming on "
                                 "several machines needs out_dir on a filesystem they all see (or a copy on each)")
    if not found:
        if path is not None and run.main:
            print(f"--resume: no checkpoint at {path} yet, starting from scratch")
        return 0
    state = ck.load_checkpoint(path, map_location=run.precision.device)
    ck.check_config(state, run.raw.config)
    run.strategy.load(run.raw, run.optimizer, state)  # EP: this rank's slice of the full experts
    if state.get("scaler") and run.precision.use_scaler:
        run.scaler.load_state_dict(state["scaler"])
    ck.set_rng_state(state["rng"])
    step = int(state["step"])
    try:
        run.loader.load_state_dict(state["loader"])
    except DataError as e:  # batch size / data changed: continue at the same step count
        run.loader.global_batches = step * run.tcfg.grad_accum
        if run.main:
            print(f"note: {e}; continuing at global batch {run.loader.global_batches}")
    res = run.result
    res.history, res.losses, res.log = list(state["history"]), list(state["losses"]), list(state["log"])
    res.tokens, res.train_time_s = int(state["tokens"]), float(state["train_time_s"])
    res.best_val_loss = float(state["best_val_loss"])
    run.saved_step = step
    if run.main:
        _resume_notes(run, state, path)
        trim_metrics(run.out / "metrics.jsonl", step)
    return step


def _resume_notes(run: Run, state: dict, path: Path) -> None:
    """Say where the run continues from, and what makes it not an exact continuation."""
    keys = EXACT_RESUME_KEYS + (["max_steps"] if run.tcfg.decay_steps is None else [])  # cosine ends at max_steps
    changed = [d for d in ck.config_diff(state.get("train_config", {}), run.tcfg.to_dict()) if d.split(":")[0] in keys]
    print(f"resuming from {path} at step {state['step']} ({run.result.tokens:,} tokens seen)")
    if changed:
        print("note: the training config changed since the checkpoint, so this is not an exact "
              "continuation:\n  " + "\n  ".join(changed))
    if state.get("world_size", 1) != run.dist.world_size:
        print(f"note: the checkpoint was written by {state.get('world_size', 1)} process(es), this run has "
              f"{run.dist.world_size}; batches are the same, float sums may differ slightly")


# ---- one optimizer step ---------------------------------------------------------------------------


def _global_balance_counts(run: Run, batches: list):
    """What the step's training forwards get as `moe_loads` for the global balance scope (see
    `nanomoe.moe`): the pre-pass's counts with gradient accumulation, `BALANCE_AFTER_FORWARD` with
    one micro-batch per rank over several ranks, else None (the forward is the whole step)."""
    raw = run.raw
    if raw.config.n_experts == 0:
        return None
    if run.accum > 1:
        with run.precision.autocast():  # route exactly as the training forwards will (same dtype)
            step_loads = global_balance_prepass(raw, [x for x, _ in batches])  # None unless scope is global
        run.strategy.end_prepass(raw)
        return step_loads
    if run.dist.world_size > 1 and raw.config.moe_balance_scope == "global":
        return BALANCE_AFTER_FORWARD  # no extra forward: the counts are summed over ranks after it
    return None


def compute_gradients(run: Run, step: int) -> StepStats:
    """Forward and backward over the step's micro-batches, gradients unscaled and clipped (not applied)."""
    tcfg, raw, fwd = run.tcfg, run.raw, run.fwd
    if raw.config.dropout > 0:  # dropout's randomness depends on (seed, rank, step) only: exact resume
        torch.manual_seed(tcfg.seed * 1_000_003 + run.dist.rank * 7919 + step)
    lr = get_lr(step, tcfg)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    batches = [run.loader.next_batch(run.precision.device) for _ in range(run.accum)]
    run.strategy.start_step(raw)
    step_loads = _global_balance_counts(run, batches)
    loss_sum = torch.zeros((), device=run.precision.device)
    ce_sum = torch.zeros((), device=run.precision.device)
    out = moe_loads = None
    for micro, (x, y) in enumerate(batches):
        # DDP all-reduces the gradients only on the last micro-batch (Li et al. 2020, arXiv 2006.15704)
        with run.strategy.no_sync(fwd, micro == run.accum - 1):
            with run.precision.autocast():
                out = fwd(x, y, moe_loads=step_loads)
            loss = out.loss
            if step_loads == BALANCE_AFTER_FORWARD:  # the layers left the global balance term to the step
                term = balance_after_forward(out.moe_stats)
                loss, out.aux_loss = loss + term, out.aux_loss + term.detach()
            run.scaler.scale(loss / run.accum).backward()
        loss_sum += loss.detach().float()
        ce_sum += out.ce_loss.float()
        run.strategy.after_micro(out.moe_stats)
        if raw.config.moe_bias_balance:
            moe_loads = add_loads(moe_loads, out.moe_stats)
    # Decide on values all-reduced over ranks, so every rank takes the same decision.
    stats = torch.stack([loss_sum / run.accum, ce_sum / run.accum])
    all_reduce_mean(stats, run.dist)
    loss_v, ce_v = (float(v) for v in stats.tolist())
    run.scaler.unscale_(run.optimizer)  # true gradients (a no-op without fp16 loss scaling)
    grad_norm = run.strategy.clip(raw, tcfg.grad_clip)  # synced over ranks first; the same norm on every rank
    return StepStats(lr=lr, loss=loss_v, ce=ce_v, grad_norm=grad_norm, aux=out.aux_loss, moe_stats=out.moe_stats,
                     moe_loads=moe_loads, traffic=run.strategy.traffic(raw))


def bad_step(st: StepStats, precision: Precision) -> Optional[str]:
    """Why this step must not be applied (a non-finite loss or gradient), or None."""
    if not math.isfinite(st.loss):
        return f"the loss became {st.loss}"
    if not math.isfinite(st.grad_norm) and not precision.use_scaler:
        # (with fp16 an inf gradient is routine: the GradScaler skips the step and lowers its scale)
        return f"the gradient norm became {st.grad_norm}"
    return None


def apply_update(run: Run, st: StepStats) -> None:
    """The optimizer step (through the GradScaler), then the DeepSeek-V3 routing bias for MoE models."""
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.raw.config.n_experts > 0 and run.raw.config.moe_bias_balance:
        update_moe_bias(run.raw, st.moe_loads)  # sums the step's loads over ranks: every rank keeps the same bias


def stop(run: Run, log: RunLog, why: str, step: int, lr: float) -> None:
    """Drop the bad step's gradients (the weights stay good) and say where the last good checkpoint is."""
    run.optimizer.zero_grad(set_to_none=True)
    last = f"{run.out / ck.LATEST} (step {run.saved_step})" if run.saved_step is not None else "none was written"
    run.result.stopped = (
        f"{why} at step {step} (lr {lr:.3g}); training stopped before applying it. The last good "
        f"checkpoint is {last}. Try a lower lr, a longer warmup, grad_clip=1.0, or dtype=float32."
    )
    log.error("ERROR: " + run.result.stopped)


# ---- logging and evaluation -----------------------------------------------------------------------


def log_train(run: Run, log: RunLog, step: int, st: StepStats, window: Meter) -> None:
    """A train record: the window's mean CE and speed, this step's loss, lr and gradient norm."""
    res, tps = run.result, window.tokens_per_s
    rec = {"kind": "train", "step": step, "tokens": res.tokens, "loss": st.loss, "ce": window.mean_ce, "lr": st.lr,
           "grad_norm": st.grad_norm, "tokens_per_s": tps, "mfu": run.mfu(tps), "elapsed_s": res.train_time_s}
    if st.aux is not None:
        rec["aux"] = float(st.aux)
    rec.update(st.traffic)  # EP: this step's rows sent rank to rank, bytes, drops, imbalance
    res.log.append(rec)
    log.record(rec)
    log.bar.set_postfix(loss=f"{window.mean_ce:.4f}", lr=f"{st.lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)


def evaluate_step(run: Run, log: RunLog, step: int, window: Optional[Meter]) -> dict:
    """An eval record: validation CE over all ranks, a sample, the window's train CE and speed."""
    res, tcfg = run.result, run.tcfg
    tps = window.tokens_per_s if window is not None else 0.0
    rec: dict[str, Any] = {"kind": "eval", "step": step, "tokens": res.tokens,
                           "train_loss": window.mean_ce if window is not None else None,
                           "lr": get_lr(max(step - 1, 0), tcfg), "tokens_per_s": tps, "mfu": run.mfu(tps),
                           "elapsed_s": res.train_time_s}
    if run.has_val:
        val = validation_loss(run.fwd, run.val_data, tcfg.batch_size, run.block_size, tcfg.eval_iters,
                              run.precision, run.dist)
        rec["val_loss"], rec["val_ppl"] = val, math.exp(min(val, 700.0))
    if run.hellaswag:  # completion-style accuracy (nanomoe.interop.hellaswag), examples split over the ranks
        hs = evaluate_hellaswag(run.raw, run.tokenizer, run.hellaswag, device=run.precision.device,
                                autocast=run.precision.autocast(), dist_info=run.dist)
        rec.update(hellaswag_n=hs.n, hellaswag_acc=hs.acc, hellaswag_acc_norm=hs.acc_norm)
    if run.main or run.strategy.every_rank_runs_the_model:  # EP: every rank takes part in each forward
        rec["sample"] = sample_text(run.raw, run.tokenizer, tcfg.sample_prompt, tcfg.sample_tokens,
                                    tcfg.sample_temperature, tcfg.seed, run.precision)
    res.history.append(rec)
    log.record(rec)
    log.eval_line(rec)
    return rec


def is_new_best(res: TrainResult, rec: dict) -> bool:
    """True (and remembered) when this evaluation's validation loss is the lowest so far."""
    val = rec.get("val_loss")
    if val is None or val >= res.best_val_loss:
        return False
    res.best_val_loss = val
    return True


# ---- the loop -------------------------------------------------------------------------------------


def record_step(run: Run, log: RunLog, meters: dict, st: StepStats, dt: float) -> None:
    """Count an applied step (that took `dt` seconds) in the result and the running meters."""
    res = run.result
    res.tokens += run.tokens_per_step
    res.train_time_s += dt
    res.losses.append(st.loss)
    for meter in meters.values():
        meter.add(st.ce, dt, run.tokens_per_step)
    log.bar.update(1)


def log_eval_save(run: Run, log: RunLog, meters: dict, done: int, st: StepStats) -> None:
    """After step `done`: the log line, the evaluation (with its checkpoint and curves) or the
    periodic checkpoint, each when its interval (or the last step) comes; resets the meters used."""
    tcfg, res = run.tcfg, run.result
    last = done == tcfg.max_steps
    if done % tcfg.log_interval == 0 or last:
        log_train(run, log, done, st, meters["log"])
        meters["log"] = Meter()
    if tcfg.eval_iters > 0 and (done % tcfg.eval_interval == 0 or last):
        rec = evaluate_step(run, log, done, meters["eval"])
        meters["eval"] = Meter()
        save(run, done, is_best=is_new_best(res, rec))
        if run.out is not None and run.main and tcfg.plot:
            save_curves(res.history, res.log, run.out / "curves.png")
    elif (tcfg.save_interval and done % tcfg.save_interval == 0) or last:
        save(run, done, is_best=False)


def train(
    model: torch.nn.Module,
    train_data: TokenSource,
    val_data: Optional[TokenSource],
    tcfg: Optional[TrainConfig] = None,
    *,
    tokenizer=None,
    on_step: Optional[Callable[[int, torch.nn.Module, StepStats], None]] = None,
    progress: bool = True,
    extra_state: Optional[dict] = None,
) -> TrainResult:
    """Train `model` (a nanomoe GPT) in place on token arrays; see the module docstring.

    train_data / val_data: 1-D token arrays (numpy, memmap or torch) or lists of shards.
    on_step(step, model, st): called after every optimizer step; `step` counts the steps done
    (1 .. max_steps), `model` is the plain (unwrapped) model, `st` the step's `StepStats` (`st.loss`:
    CE + aux; `st.moe_stats`: the routing of the step's last micro-batch).
    extra_state: plain data stored in the checkpoints (e.g. where the data came from).
    Under torchrun, every rank calls train() with the same arguments."""
    tcfg = tcfg or TrainConfig()
    with process_group(tcfg.device) as dist:
        run = start_run(model, train_data, val_data, tcfg, dist, tokenizer, extra_state)
        res = run.result
        start = resume(run) if tcfg.resume else 0
        if start == 0 and run.out is not None and run.main:
            trim_metrics(run.out / "metrics.jsonl", -1)  # a fresh run starts a fresh log (resumed runs append)
        wrap_model(run)
        log = RunLog(run.out, tcfg.max_steps, start, show=progress, main=run.main)
        log.info(f"{run.precision.describe()} | {run.raw.num_params(non_embedding=False) / 1e6:.2f}M params | "
                 f"{run.step_line}")
        if start == 0 and run.has_val and tcfg.max_steps > 0:
            evaluate_step(run, log, 0, None)
        meters = {"log": Meter(), "eval": Meter()}  # running sums since the last log line / evaluation
        for step in range(start, tcfg.max_steps):
            t0 = time.perf_counter()
            st = compute_gradients(run, step)
            why = bad_step(st, run.precision)
            if why is not None:
                stop(run, log, why, step + 1, st.lr)
                break
            apply_update(run, st)
            record_step(run, log, meters, st, time.perf_counter() - t0)
            if on_step is not None:
                on_step(step + 1, run.raw, st)
            log_eval_save(run, log, meters, step + 1, st)
        if tcfg.max_steps == 0 and start == 0:
            save(run, 0, is_best=False)  # max_steps=0: the initial weights as a checkpoint (chapter 07 perturbs them)
        log.close()
        res.steps = len(res.losses)
        res.tokens_per_s = res.tokens / res.train_time_s if res.train_time_s > 0 else 0.0
        if run.main and progress and res.stopped is None:
            _summary(res, run.out)
        return res


def _summary(res: TrainResult, out: Optional[Path]) -> None:
    f = res.final
    vl = f", val loss {f['val_loss']:.4f} (ppl {f['val_ppl']:.2f})" if f.get("val_loss") is not None else ""
    where = f" -> {out}" if out is not None else ""
    print(f"done: {res.steps} steps, {res.tokens:,} tokens in {res.train_time_s:.1f}s "
          f"({res.tokens_per_s:,.0f} tok/s){vl}{where}")
