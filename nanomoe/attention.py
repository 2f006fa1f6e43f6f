"""Causal self-attention: multi-head (MHA), grouped-query (GQA) and multi-query (MQA).

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + M) V        (Vaswani et al. 2017)

where M is the causal mask (0 where key j <= query i, -inf elsewhere). With GQA
(Ainslie et al. 2023) there are `n_kv_head` key/value heads, each shared by
n_head // n_kv_head query heads; n_kv_head = 1 is MQA (Shazeer 2019).

Two interchangeable kernels, chosen by `config.attn`:
- "sdpa":   `F.scaled_dot_product_attention`, which dispatches to FlashAttention /
            memory-efficient kernels when the device supports them.
- "manual": the formula above written out, kept for teaching. Tests check both agree.

q, k and v come from one fused projection `c_attn` (n_embd -> (n_head + 2 n_kv_head) * head_dim),
as in GPT-2; RoPE, when enabled, rotates q and k after the projection.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .kv_cache import KVCache
from .rope import apply_rope


def manual_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], dropout_p: float = 0.0
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) masked) v. q (B, H, T, D); k, v (B, H, S, D); mask (T, S) bool, True = attend."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, H, T, S)
    if mask is None:  # plain causal, T == S
        T, S = q.size(-2), k.size(-2)
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~mask, float("-inf"))
    att = F.softmax(att.float(), dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    return att @ v  # (B, H, T, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        self.use_rope = config.pos_emb == "rope"
        self.kernel = config.attn
        self.dropout = config.dropout
        qkv_out = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_out, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). `rope` holds the cos/sin rows of these T positions.
        With a cache, x holds the T tokens at positions cache.pos .. cache.pos+T-1."""
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, Hkv * D, Hkv * D], dim=2)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        if self.use_rope:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        mask = None  # None = plain causal attention over these T tokens
        if cache is not None:
            # Prefill (T > 1) and decode (T == 1) take the same path: write the new keys,
            # then attend over the whole fixed-size buffer with an explicit mask that is
            # causal *and* hides empty slots. Never `is_causal=True` here: with a cache, query i
            # sits at position pos+i, not i (a classic bug of peer implementations).
            mask = cache.mask(T, device=x.device)  # (T, max_len), read pos before write
            k, v = cache.write(self.layer_idx, k, v)  # (B, Hkv, max_len, D)

        dropout_p = self.dropout if self.training else 0.0
        if self.kernel == "sdpa":
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                is_causal=mask is None,
                dropout_p=dropout_p,
                enable_gqa=Hkv != H,  # shares each kv head with H // Hkv query heads
            )
        else:
            if Hkv != H:  # repeat kv heads for their groups: kv head j serves q heads j*r .. j*r+r-1
                k = k.repeat_interleave(H // Hkv, dim=1)
                v = v.repeat_interleave(H // Hkv, dim=1)
            y = manual_attention(q, k, v, mask, dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))
