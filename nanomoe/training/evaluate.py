"""Evaluation during training: validation cross-entropy on fixed batches, and a sample.

The validation loss is the cross-entropy alone (never CE + MoE auxiliary losses), so perplexity =
exp(CE) compares dense and MoE models. Its batches depend only on a seed, so every evaluation of a
run sees the same ones: the curve is not noisy from re-sampling. Under DDP each rank evaluates every
world-th batch and the sums are all-reduced, so every rank gets the same value.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..data import BatchLoader, TokenSource
from ..device import Precision
from ..parallel.distributed import DistInfo, all_reduce_sum, unwrap


@torch.no_grad()
def eval_sums(model: torch.nn.Module, data: TokenSource, batch_size: int, block_size: int, iters: int,
              device: str, precision: Precision, seed: int, rank: int = 0, world: int = 1) -> tuple[float, int]:
    """Sum of the per-batch mean CE over this rank's share of `iters` fixed validation batches
    (global batches 0 .. iters-1 of a loader seeded with `seed`; rank r takes r, r+world, ...)."""
    loader = BatchLoader(data, batch_size, block_size, seed=seed, rank=rank, world_size=world,
                         vocab_size=unwrap(model).config.vocab_size)
    total, n = 0.0, 0
    for _ in range(rank, iters, world):
        x, y = loader.next_batch(device)
        with precision.autocast():
            ce = model(x, y).ce_loss  # CE only, never CE + aux
        total += float(ce)
        n += 1
    return total, n


def evaluate(
    model: torch.nn.Module,
    data: TokenSource,
    batch_size: int,
    block_size: int,
    iters: int,
    *,
    device: Optional[str] = None,
    precision: Optional[Precision] = None,
    seed: int = 0,
) -> float:
    """Mean cross-entropy (no MoE auxiliary loss) of `model` on `iters` random batches of `data`.

    The batches depend only on `seed`, so every call sees the same ones. Perplexity is exp of this."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    dev = device or str(next(model.parameters()).device)
    prec = precision or Precision(dev, torch.float32)
    was_training = model.training
    model.eval()
    try:
        total, n = eval_sums(model, data, batch_size, block_size, iters, dev, prec, seed)
    finally:
        model.train(was_training)
    return total / n


def validation_loss(model: torch.nn.Module, data: TokenSource, batch_size: int, block_size: int, iters: int,
                    precision: Precision, dist: DistInfo) -> float:
    """The run's validation CE over all ranks (`model` may be DDP-wrapped; it is left in train mode)."""
    model.eval()
    # Under DDP the ranks evaluate the plain model: ranks may run different numbers of batches, and a
    # DDP forward is a collective (it broadcasts buffers), which would then hang.
    fwd = model if dist.world_size == 1 else unwrap(model)
    s, n = eval_sums(fwd, data, batch_size, block_size, iters, precision.device, precision, seed=0,
                     rank=dist.rank, world=dist.world_size)
    model.train()
    t = torch.tensor([s, float(n)], dtype=torch.float64, device=precision.device)
    all_reduce_sum(t, dist)
    return float(t[0] / t[1])


def sample_text(raw_model, tokenizer, prompt: str, n_tokens: int, temperature: float, seed: int,
                precision: Precision) -> Optional[str]:
    """A short generation from `prompt` with a fixed-seed generator (it does not touch the global
    RNG, so it cannot change the training run); None without a tokenizer or tokens to make."""
    if tokenizer is None or n_tokens <= 0:
        return None
    try:
        ids = tokenizer.encode(prompt)
    except Exception:  # a char tokenizer may not know the prompt's characters: start from id 0
        ids = []
    ids = (ids or [0])[-raw_model.config.block_size:]
    device = precision.device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    use_cache = len(ids) + n_tokens <= raw_model.config.block_size
    with precision.autocast():
        out = raw_model.generate(idx, n_tokens, temperature=temperature, use_cache=use_cache, generator=gen)
    return tokenizer.decode(out[0, len(ids):].tolist())
