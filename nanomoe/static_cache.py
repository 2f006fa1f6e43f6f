"""A static KV cache and a one-token decode step that `torch.compile` can capture whole.

Chapter 02's `KVCache` is already preallocated, but its write position `pos` is a Python int:
every decode step hands the model a different number, so a compiled model either recompiles or
treats the position as a dynamic size. Here the position is a *tensor* (`input_pos`), so every
decode step runs exactly the same graph on exactly the same buffers:

    cache.k, cache.v        (n_layer, B, n_kv_head, max_len, head_dim), written with index_copy_
    mask                    key j visible to the query at position p iff j <= p   (T, max_len)
    rope / wpe rows         gathered by input_pos, not sliced by a Python int

This is the recipe of gpt-fast (PyTorch team, "Accelerating Generative AI with PyTorch II: GPT,
Fast", https://pytorch.org/blog/accelerating-generative-ai-2/, code at
https://github.com/pytorch-labs/gpt-fast): static shapes + `torch.compile`, and on a GPU the
"reduce-overhead" mode, which records the step once as a CUDA graph and replays it.

The cache duck-types `KVCache` (`mask`, `write`), so the course's own `CausalSelfAttention` runs
unchanged; only the walk over the blocks (`static_hidden`) is new.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

from .model import GPT
from .sampling import check_sampling_args, sample_next


class StaticKVCache(nn.Module):
    """Keys and values of every layer in fixed buffers; positions come as a tensor.

    A module (buffers, not attributes) so that `model.to(...)` style moves and CUDA graphs see
    tensors whose addresses never change."""

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("key_pos", torch.arange(max_len, device=device), persistent=False)
        self.batch_size, self.max_len = batch_size, max_len
        self.input_pos: Optional[torch.Tensor] = None  # (T,) positions of the tokens being processed

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def mask(self, T: int, device=None) -> torch.Tensor:
        """(T, max_len) bool: query at input_pos[i] sees key j iff j <= input_pos[i] (causal, no empty slot)."""
        return self.key_pos.unsqueeze(0) <= self.input_pos.unsqueeze(1)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_head, T, D) at input_pos of `layer`; return (B, n_kv_head, max_len, D) views."""
        B = k.size(0)
        self.k[layer, :B].index_copy_(2, self.input_pos, k)
        self.v[layer, :B].index_copy_(2, self.input_pos, v)
        return self.k[layer, :B], self.v[layer, :B]


def new_static_cache(model: GPT, batch_size: int, max_len: Optional[int] = None) -> StaticKVCache:
    """A static cache for `model` (its weights' dtype and device; max_len defaults to block_size)."""
    cfg = model.config
    head = model.lm_head
    ref = head.scales if hasattr(head, "scales") else head.weight  # an int8 model computes in its scales' dtype
    dtype = ref.dtype
    return StaticKVCache(cfg.n_layer, batch_size, cfg.kv_heads, max_len or cfg.block_size, cfg.head_dim,
                         dtype=dtype, device=ref.device)


def static_hidden(model: GPT, idx: torch.Tensor, input_pos: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """idx (B, T) at positions input_pos (T,) -> final normalized hidden states (B, T, C), writing the cache."""
    tr = model.transformer
    x = tr.wte(idx)  # (B, T, C)
    rope = None
    if "wpe" in tr:
        x = x + tr.wpe(input_pos)  # (T, C) rows gathered by position
    else:
        rope = (model.rope_cos[input_pos], model.rope_sin[input_pos])  # (T, head_dim) each
    cache.input_pos = input_pos
    for block in tr.h:
        x, _, _ = block(x, rope, cache)
    return tr.ln_f(x)


def decode_step(model: GPT, idx: torch.Tensor, input_pos: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """One token per sequence, idx (B, 1) at position input_pos (1,) -> logits (B, V). Fixed shapes:
    this is the function `compile_step` hands to torch.compile."""
    return model.logits(static_hidden(model, idx, input_pos, cache)[:, -1, :])


def compile_step(device_type: str = "cpu") -> Callable:
    """torch.compile'd `decode_step`: on CUDA in "reduce-overhead" mode (CUDA graphs: the whole
    step is replayed with one launch); elsewhere the default mode, with every intermediate result
    stored once (`realize_opcount_threshold=0`). Why: by default inductor inlines a cheap producer
    (a LayerNorm's normalization, a GELU) into the loop of the reduction that reads it, and a
    matrix-vector product written as a reduction (`MatvecLinear`, `Int8Linear`) would then recompute
    that producer for every output row; on a 768-wide vector, storing it costs nothing."""
    if device_type == "cuda":
        return torch.compile(decode_step, mode="reduce-overhead", dynamic=False)
    return torch.compile(decode_step, dynamic=False, options={"realize_opcount_threshold": 0})


def compiled_one_row(x: torch.Tensor, dtypes: tuple = (torch.float32, torch.bfloat16)) -> bool:
    """True inside `torch.compile` for a single row x (..., in) on CPU in one of `dtypes`: the case
    where a Linear is a matrix-vector product best written as a reduction (`matvec_reduction`)."""
    return (torch.compiler.is_compiling() and x.numel() == x.size(-1) and x.device.type == "cpu"
            and x.dtype in dtypes)


def matvec_reduction(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., 1, in) row, w (out, in) of any dtype -> (..., out) in x's dtype: y_o = sum_i w_oi x_i,
    summed in fp32. Under torch.compile the conversion of w fuses into one loop that reads w once."""
    return (x.unsqueeze(-2).float() * w.float()).sum(-1).to(x.dtype)  # (..., 1, in) * (out, in) -> (..., out)


class MatvecLinear(nn.Linear):
    """An nn.Linear whose one-row product, inside `torch.compile` on CPU (fp32 or bf16), is written
    as the reduction it is: y_o = sum_i W_oi x_i, summed in fp32 like the BLAS call it replaces.
    Inductor then generates one vectorized loop that streams W once, where the BLAS call reads the
    (out, in) matrix more slowly for a single vector (chapter 08 measures both). gpt-fast gets the
    same effect on GPUs, where inductor itself rewrites matrix-vector products as reductions (its
    `mm` decomposition, with coordinate descent tuning). Eager calls, larger inputs and other
    dtypes/devices are a plain nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if compiled_one_row(x):
            y = matvec_reduction(x, self.weight)
            return y if self.bias is None else y + self.bias
        return super().forward(x)


def use_matvec_linears(model: nn.Module) -> nn.Module:
    """Make every nn.Linear of `model` a `MatvecLinear`, in place, sharing its parameters (tied
    weights stay tied); returns the model. Changes nothing outside a compiled one-token CPU step."""
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                new = MatvecLinear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                new.weight, new.bias = child.weight, child.bias  # the same Parameter objects
                setattr(module, name, new)
    return model


def check_static_fits(batch: int, prompt_tokens: int, max_new_tokens: int, cache: StaticKVCache) -> None:
    """The batch and prompt + new tokens must fit the cache; one clear line otherwise."""
    if batch > cache.batch_size:
        raise ValueError(f"batch of {batch} sequences is larger than the static cache's batch of {cache.batch_size}: "
                         f"build the cache with batch_size >= {batch}")
    if prompt_tokens + max_new_tokens - 1 > cache.max_len:
        raise ValueError(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) does not fit the static "
                         f"cache of {cache.max_len} positions: generate at most {cache.max_len - prompt_tokens + 1} "
                         f"new tokens")


@torch.no_grad()
def static_stream(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                  top_k: Optional[int] = None, top_p: Optional[float] = None,
                  generator: Optional[torch.Generator] = None, cache: Optional[StaticKVCache] = None,
                  step: Optional[Callable] = None) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B, 1) one at a time, like `GPT.stream`, through the static cache.

    The prompt is prefilled eagerly (its length varies); every decode step calls `step`
    (`decode_step`, or the compiled one from `compile_step`) with the same shapes."""
    check_sampling_args(temperature, top_k, top_p)
    B, T = idx.shape
    cache = cache if cache is not None else new_static_cache(model, B, T + max_new_tokens)
    check_static_fits(B, T, max_new_tokens, cache)
    step = step or decode_step
    was_training = model.training
    model.eval()
    try:
        pos = torch.arange(T, device=idx.device)
        logits = model.logits(static_hidden(model, idx, pos, cache)[:, -1, :])
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            yield nxt
            if i + 1 < max_new_tokens:
                pos = torch.tensor([T + i], device=idx.device)
                logits = step(model, nxt, pos, cache).clone()  # clone: a CUDA graph reuses its output buffer
    finally:
        model.train(was_training)


def static_generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                    cache: Optional[StaticKVCache] = None, step: Optional[Callable] = None, **kw) -> torch.Tensor:
    """idx (B, T) -> (B, T + max_new_tokens) through the static cache (greedy by default)."""
    out = [idx]
    for nxt in static_stream(model, idx, max_new_tokens, temperature, cache=cache, step=step, **kw):
        out.append(nxt)
    return torch.cat(out, dim=1)
