"""Chapter 01: make a GPT memorize one sequence (the "overfit a single example" sanity check).

Before training on a corpus it pays to check that the model, the loss and the optimizer can
drive the loss of *one* sequence to ~0: if they cannot, something is broken. This module holds
the few pieces chapter 01 needs so the script and the notebook stay short:

- `shift_targets(ids)`: next-token targets with the blog's ignore trick (`targets[:, -1] = -1`);
- `reconstruct(model, ids)`: the model's argmax guess for every token, given the ones before it;
- `continue_text(model, ids, prefix, n)`: greedy continuation of the first `prefix` tokens;
- `overfit_sequence(...)`: the training loop (AdamW, one full-sequence batch per step) with a
  report at 25/50/75/100% of the steps.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import resources
from ..config import gpt2_config
from ..device import Precision
from ..model import GPT
from ..tokenizer import Tokenizer, get_tokenizer
from ..training.progress import tqdm


def shift_targets(ids: torch.Tensor) -> torch.Tensor:
    """ids (B, T) -> targets (B, T) with targets[:, t] = ids[:, t+1] and targets[:, -1] = -1.

    The model reads the whole sequence and, at every position t, must predict token t+1. The last
    position has no next token, so its target is -1, which the loss ignores (ignore_index=-1).
    Same as training on x = ids[:, :-1], y = ids[:, 1:], with one wasted position."""
    if ids.dim() != 2 or ids.size(1) < 2:
        raise ValueError(f"need a (batch, time) tensor with at least 2 tokens, got shape {tuple(ids.shape)}")
    targets = ids.clone()
    targets[:, :-1] = ids[:, 1:]
    targets[:, -1] = -1
    return targets


@torch.no_grad()
def reconstruct(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """The model's reading of `ids` (1-D or (1, T)), as a 1-D tensor of the same length T.

    Position 0 is copied (nothing comes before it to predict it from); position t >= 1 is the
    argmax of the logits at t-1, i.e. the model's best guess of token t given tokens 0..t-1.
    When the sequence is memorized, reconstruct(model, ids) equals ids. Runs in eval mode
    (dropout off) and restores the previous mode."""
    seq = ids.view(1, -1)
    was_training = model.training
    model.eval()
    try:
        logits, _ = model(seq)  # (1, T, V)
    finally:
        model.train(was_training)
    guess = logits[0, :-1].argmax(dim=-1)  # (T-1,) guesses for tokens 1..T-1
    return torch.cat([seq[0, :1], guess])


@torch.no_grad()
def continue_text(model: GPT, ids: torch.Tensor, prefix_tokens: int,
                  max_new_tokens: Optional[int] = None) -> torch.Tensor:
    """Greedy continuation (temperature=0) of the first `prefix_tokens` tokens of `ids`.

    max_new_tokens None generates as many tokens as the rest of the sequence, so a model that
    memorized it rewrites it whole. Returns prefix + generated tokens, 1-D."""
    seq = ids.view(1, -1)
    if not 1 <= prefix_tokens <= seq.size(1):
        raise ValueError(f"prefix_tokens must be between 1 and the sequence length {seq.size(1)}, got {prefix_tokens}")
    n = seq.size(1) - prefix_tokens if max_new_tokens is None else max_new_tokens
    prompt = seq[:, :prefix_tokens]
    # the KV cache needs prompt + new tokens <= block_size; beyond that, slide the window as nanoGPT
    use_cache = prefix_tokens + n <= model.config.block_size
    out = model.generate(prompt, n, temperature=0.0, use_cache=use_cache)
    return out[0]


@torch.no_grad()
def evaluate_sequence(
    model: GPT, ids: torch.Tensor, targets: torch.Tensor, precision: Optional[Precision] = None
) -> tuple[float, torch.Tensor]:
    """Eval-mode (dropout off) loss on (ids, targets) and the reconstruction of ids (see
    `reconstruct`), from one forward pass."""
    seq = ids.view(1, -1)
    was_training = model.training
    model.eval()
    try:
        with precision.autocast() if precision is not None else nullcontext():
            out = model(seq, targets.view(1, -1))
    finally:
        model.train(was_training)
    rec = torch.cat([seq[0, :1], out.logits[0, :-1].argmax(dim=-1)])
    return float(out.ce_loss), rec


def checkpoint_steps(epochs: int, n: int = 4) -> list[int]:
    """The steps at 1/n, 2/n, ..., n/n of training (25/50/75/100% for n=4), never 0, no repeats."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    return sorted({max(1, round(epochs * k / n)) for k in range(1, n + 1)})


@dataclass
class Report:
    """What the model knows at one checkpoint."""

    step: int
    train_loss: float  # the loss of this optimizer step (train mode: dropout on)
    loss: float  # eval-mode loss on the sequence (dropout off)
    reconstruction: torch.Tensor  # 1-D, see `reconstruct`
    continuation: torch.Tensor  # 1-D, prefix + greedy continuation
    errors: int  # tokens of the reconstruction that differ from the sequence
    seconds: float  # since the start of training

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    @property
    def exact(self) -> bool:
        return self.errors == 0


@dataclass
class OverfitResult:
    # one dict per step: step, train_loss (+ loss, ppl, errors when evaluated); step 0 = before training
    history: list[dict] = field(default_factory=list)
    reports: list[Report] = field(default_factory=list)
    seconds: float = 0.0
    first_exact_step: Optional[int] = None  # first evaluated step with an exact reconstruction
    first_ppl_below: dict = field(default_factory=dict)  # {threshold: first evaluated step with eval PPL below it}

    @property
    def final(self) -> Report:
        return self.reports[-1]


def overfit_sequence(
    model: GPT,
    ids: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 1e-2,
    betas: tuple = (0.9, 0.95),
    precision: Optional[Precision] = None,
    cont_prefix_tokens: int = 10,
    cont_new_tokens: Optional[int] = None,
    eval_every: int = 5,
    ppl_thresholds: tuple = (2.0, 1.5),
    stop_ppl: Optional[float] = None,
    on_report: Optional[Callable[[Report], None]] = None,
    progress: bool = True,
) -> OverfitResult:
    """Train `model` on the single sequence `ids` ((1, T) or 1-D, already on the model's device)
    for `epochs` AdamW steps (each step = the whole sequence, as in the blog) and report at
    25/50/75/100%: loss, perplexity, reconstruction and greedy continuation.

    Every `eval_every` steps (and at the reports) the eval-mode loss is measured too, so the
    curves show the loss without dropout noise and `first_exact_step` / `first_ppl_below` say
    when the paragraph was learned. `on_report(report)` is called at each checkpoint.
    `stop_ppl` stops at the first evaluated step whose perplexity is below it (with a last report
    there), for experiments that ask "how many steps until PPL < 2?"."""
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    seq = ids.view(1, -1)
    targets = shift_targets(seq)
    device_type = seq.device.type
    optimizer = model.configure_optimizers(weight_decay, lr, betas, device_type)
    scaler = torch.amp.GradScaler(device_type) if precision is not None and precision.use_scaler else None
    report_at = set(checkpoint_steps(epochs))
    result = OverfitResult(history=[{"step": 0}])  # step 0: before any update
    _measure(model, seq, targets, precision, result.history[0], result, ())
    t0 = time.perf_counter()
    bar = tqdm(range(1, epochs + 1), desc="treino", disable=not progress, leave=False, mininterval=0.5)
    model.train()
    for step in bar:
        row = {"step": step, "train_loss": _adamw_step(model, seq, targets, optimizer, scaler, precision)}
        result.history.append(row)
        if step % eval_every != 0 and step not in report_at:
            continue
        rec = _measure(model, seq, targets, precision, row, result, ppl_thresholds)
        bar.set_postfix(loss=f"{row['loss']:.4f}", ppl=f"{row['ppl']:.3f}")
        stop = stop_ppl is not None and row["ppl"] < stop_ppl
        if step in report_at or stop:
            cont = continue_text(model, seq, cont_prefix_tokens, cont_new_tokens).cpu()
            rep = Report(step=step, train_loss=row["train_loss"], loss=row["loss"], reconstruction=rec.cpu(),
                         continuation=cont, errors=row["errors"], seconds=time.perf_counter() - t0)
            result.reports.append(rep)
            if on_report is not None:
                bar.clear()
                on_report(rep)
        if stop:
            break
    bar.close()
    result.seconds = time.perf_counter() - t0
    return result


def _adamw_step(model: GPT, seq: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer,
                scaler: Optional[torch.amp.GradScaler], precision: Optional[Precision]) -> float:
    """One optimizer step on the whole sequence; returns its (train-mode) loss."""
    with precision.autocast() if precision is not None else nullcontext():
        _, loss = model(seq, targets)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def _measure(model: GPT, seq: torch.Tensor, targets: torch.Tensor, precision: Optional[Precision], row: dict,
             result: OverfitResult, ppl_thresholds: tuple) -> torch.Tensor:
    """Eval-mode loss, perplexity and reconstruction errors into `row`; the first step under each
    perplexity threshold and the first exact reconstruction into `result`. Returns the reconstruction."""
    row["loss"], rec = evaluate_sequence(model, seq, targets, precision)
    row["ppl"] = math.exp(row["loss"])
    row["errors"] = int((rec != seq[0]).sum())
    for thr in ppl_thresholds:
        if thr not in result.first_ppl_below and row["ppl"] < thr:
            result.first_ppl_below[thr] = row["step"]
    if row["step"] > 0 and result.first_exact_step is None and row["errors"] == 0:
        result.first_exact_step = row["step"]
    return rec


class TextFileNotFound(FileNotFoundError, ValueError):
    """A missing text file: an OSError for code that catches those, and a ValueError, the kind of error
    a script prints as one line (`nanomoe.training.cli.short_errors`)."""


def read_text(path: str, max_chars: int = 0) -> str:
    """Read a UTF-8 text file (stripped of surrounding whitespace), optionally only its first
    max_chars characters.

    A file at `path` wins; otherwise a file of that name packaged in `nanomoe.resources` (chapter
    01's "paragrafo.txt"), so the chapter runs the same from a checkout and from a pip install."""
    p = Path(path).expanduser()
    if p.is_file():
        text = p.read_text(encoding="utf-8")
    elif resources.is_resource(p.name):
        text = resources.resource_text(p.name)
    else:
        raise TextFileNotFound(
            f"text file {path!r} not found (nor a packaged file of that name); pass --text_file=PATH to a UTF-8 "
            "text file"
        )
    text = text.strip()
    if max_chars:
        text = text[:max_chars].strip()
    if not text:
        raise ValueError(f"text file {path!r} is empty: the model needs at least 2 tokens to learn from")
    return text


def run_overfit(
    text: str,
    *,
    tokenizer: str = "char",
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    dropout: float = 0.2,
    bias: bool = True,
    block_size: Optional[int] = None,
    seed: int = 1337,
    precision: Optional[Precision] = None,
    **train_kw,
) -> tuple[GPT, Tokenizer, torch.Tensor, OverfitResult]:
    """The whole chapter in one call (for experiments): tokenize `text`, build a GPT-2 style model
    whose block_size fits it, and `overfit_sequence` it (train_kw: epochs, lr, weight_decay, betas,
    cont_prefix_tokens, stop_ppl, ...). Returns (model, tokenizer, ids (1, T), result)."""
    device = precision.device if precision is not None else "cpu"
    tok = get_tokenizer(tokenizer, text=text)
    ids = torch.tensor([tok.encode(text)], dtype=torch.long, device=device)  # (1, T)
    torch.manual_seed(seed)
    cfg = gpt2_config(
        vocab_size=tok.vocab_size, block_size=block_size or ids.size(1), n_layer=n_layer, n_head=n_head,
        n_embd=n_embd, dropout=dropout, bias=bias,
    )
    model = GPT(cfg).to(device)
    train_kw.setdefault("progress", False)
    result = overfit_sequence(model, ids, precision=precision, **train_kw)
    return model, tok, ids, result


def set_cpu_threads(requested: int = 0, verbose: bool = True) -> int:
    """Set torch's CPU threads: `requested` when > 0, else an automatic choice.

    torch splits every operation across its threads, and they wait for each other at the end of
    each one. On a CPU that other programs keep busy, a thread often waits for a core, and a tiny
    model like this chapter's then runs 10x *slower* with 2 threads than with 1 (measured on a
    shared 2-core machine). So, automatically: torch's default when the CPU is idle, fewer
    threads (down to 1) when the 1-minute load average says the cores are taken."""
    if requested > 0:
        torch.set_num_threads(requested)
        n, why = requested, "requested"
    else:
        n = default = torch.get_num_threads()
        why = "torch default"
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):  # Windows has no load average
            load = None
        if load is not None:
            cpus = os.cpu_count() or default
            free = int(cpus - load + 1)  # +1: our own start-up is part of the load
            if free < default:
                n = max(1, free)
                torch.set_num_threads(n)
                why = f"CPU busy: load {load:.1f} on {cpus} cores"
    if verbose:
        print(f"CPU threads: {n} ({why}; --threads=N to choose)")
    return n
