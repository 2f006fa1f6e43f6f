"""A preallocated key/value cache for autoregressive generation.

During generation each new token attends to the keys and values of all earlier tokens. Those
never change, so we compute them once and keep them here instead of re-running the whole prefix
at every step (which makes generating n tokens O(n^2) in the MLPs and projections).

Design choices:
- Preallocated, fixed shape (n_layer, B, n_kv_head, max_len, head_dim): no tensor grows during
  generation, so memory is known up front, no allocator churn, and no ever-new shapes (on CPU,
  oneDNN caches one kernel per new shape, and that cache grows by ~1 GB over a long uncached
  generation). Attention reads the whole buffer under a mask, so every decode step has the same
  shapes (torch.compile-friendly).
- Only the n_kv_head key/value heads are stored: GQA/MQA shrink the cache by n_head / n_kv_head.
- `pos` is the number of positions already written; `advance` refuses to go past `max_len`
  (a position-pointer overflow would silently overwrite or read garbage).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0  # positions [0, pos) hold valid keys/values

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_head, T, D) at positions [pos, pos+T) of `layer`; return the full
        buffers (B, n_kv_head, max_len, D). Positions >= pos+T are zeros and must be masked."""
        T = k.size(2)
        if self.pos + T > self.max_len:
            raise ValueError(
                f"KV cache overflow: {self.pos} cached + {T} new positions > max_len {self.max_len}"
            )
        self.k[layer, :, :, self.pos : self.pos + T] = k
        self.v[layer, :, :, self.pos : self.pos + T] = v
        return self.k[layer], self.v[layer]

    def advance(self, T: int) -> None:
        """Move the position pointer after all layers have written T new positions."""
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache overflow: pos {self.pos} + {T} > max_len {self.max_len}")
        self.pos += T

    def mask(self, T: int, device=None) -> torch.Tensor:
        """Boolean (T, max_len) mask for T new queries at positions pos..pos+T-1:
        query i may attend to key j iff j <= pos + i (causal, and never to empty slots)."""
        q_pos = torch.arange(self.pos, self.pos + T, device=device).unsqueeze(1)  # (T, 1)
        k_pos = torch.arange(self.max_len, device=device).unsqueeze(0)  # (1, max_len)
        return k_pos <= q_pos

    def reset(self) -> None:
        self.pos = 0
