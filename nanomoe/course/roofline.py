"""The roofline of decoding, measured: bandwidth, bytes per token, the limit, and the achieved share.

At batch 1 a decode step multiplies one vector by every weight matrix: 2 FLOPs per weight read,
far below what a CPU or GPU computes per byte it can fetch. So the step is memory-bound and

    tokens/s <= bandwidth / bytes read per step * batch                 (the "roofline" limit;
                                                                          Williams et al. 2009)

Bytes read per step (`decode_bytes`):
- every weight of the blocks and the final norm, once (the batch shares them);
- the output head, once; with tied embeddings the same matrix is the token table, and the
  embedding lookup adds only one row per sequence;
- the position table (GPT-2) or the RoPE tables: one row each;
- in an MoE layer, the router and only the experts some token of the batch is routed to
  (`experts_touched`): at batch 1 that is top-k of E;
- the KV cache: the keys and values this step attends over (the static cache reads its whole
  buffer, masked; chapter 02's cache too).

Course-side helper for chapter 08 (not needed by the package itself).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Optional

import torch

from ..moe import MoE


def measure_bandwidth(megabytes: int = 256, reps: int = 5) -> float:
    """Read bandwidth in bytes/s: the median time of `x.sum()` over a float32 buffer much larger
    than any cache (256 MB by default), with the current torch thread count."""
    x = torch.ones(megabytes * 2**20 // 4)
    x.sum()  # touch every page once
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(ts)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def expected_experts(n_experts: int, top_k: int, tokens: int) -> float:
    """Experts a layer touches when `tokens` tokens each pick top_k of n_experts uniformly at random:
    E * (1 - (1 - k/E)^tokens). 1 token: k; many tokens: -> E."""
    return n_experts * (1 - (1 - top_k / n_experts) ** tokens)


def decode_bytes(model: torch.nn.Module, batch: int = 1, kv_positions: int = 0,
                 experts: Optional[float] = None) -> dict[str, float]:
    """Bytes one decode step reads, by part: weights, embedding rows, KV cache; and their total.

    experts: experts touched per MoE layer (default: the uniform-routing expectation at this batch)."""
    cfg = model.config
    seen, weights = set(), 0
    tables = {"transformer.wpe.weight", "rope_cos", "rope_sin"}
    if not cfg.tie_embeddings:
        tables.add("transformer.wte.weight")
    rows = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.data_ptr() in seen:
            continue  # tied: the embedding matrix is read once, as the output head
        seen.add(t.data_ptr())
        if name in tables:
            rows += _nbytes(t) // t.size(0) * (batch if "wte" in name or "wpe" in name else 1)
            continue
        weights += _nbytes(t)
    if cfg.tie_embeddings:  # the lookup reads one row per sequence of the same (already counted) table
        w = getattr(model.lm_head, "weight_int8", None)
        w = model.lm_head.weight if w is None else w
        rows += batch * cfg.n_embd * w.element_size()
    for m in model.modules():
        if isinstance(m, MoE):
            touched = experts if experts is not None else expected_experts(m.n_experts, m.top_k, batch)
            per_expert = sum(_nbytes(p) for p in m.experts.parameters()) / m.n_experts
            weights -= per_expert * (m.n_experts - touched)
    kv = 0
    if kv_positions:
        elt = activation_dtype(model).itemsize
        kv = 2 * cfg.n_layer * batch * cfg.kv_heads * cfg.head_dim * kv_positions * elt
    return dict(weights=weights, rows=rows, kv=kv, total=weights + rows + kv)


def activation_dtype(model: torch.nn.Module) -> torch.dtype:
    """The float dtype the model computes in (an int8 model: its scales' dtype)."""
    head = model.lm_head
    return head.scales.dtype if hasattr(head, "scales") else head.weight.dtype


def roofline_limit(bandwidth: float, step_bytes: float, batch: int = 1) -> float:
    """Tokens/s the bandwidth allows: batch tokens per step, each step reads step_bytes."""
    return bandwidth / step_bytes * batch


def time_steps(step: Callable[[], object], n: int, warmup: int = 2) -> float:
    """Median seconds of `step()` over n calls after `warmup` calls."""
    for _ in range(warmup):
        step()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


class ExpertCounter:
    """Counts the distinct experts each MoE layer routes to, per forward (a forward hook per layer).
    `mean()` is the mean over layers and forwards since the last `reset()`."""

    def __init__(self, model: torch.nn.Module):
        self.counts: list[int] = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, MoE)]

    def _hook(self, module, inputs, output) -> None:
        self.counts.append(int(torch.unique(output[2]["topk_idx"]).numel()))

    def mean(self) -> float:
        return sum(self.counts) / len(self.counts) if self.counts else math.nan

    def reset(self) -> None:
        self.counts = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
