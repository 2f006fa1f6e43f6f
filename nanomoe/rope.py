"""Rotary position embeddings (RoPE, Su et al. 2021, "RoFormer").

Each pair of dimensions of q and k is rotated by an angle proportional to the position m:
    theta_i = base^(-2i/d),   angle = m * theta_i
so that q_m . k_n depends only on the offset m - n (the rotation of q by m and of k by n
leaves a rotation by m - n in the dot product).

Convention: "rotate-half", the one Hugging Face Llama uses. Dimension i is paired with
dimension i + d/2 (not with i + 1 as in the interleaved original), so Llama weights load
without any permutation of the q/k projections.
"""

from __future__ import annotations

import torch


def rope_tables(head_dim: int, max_len: int, theta: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_len, head_dim), computed in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(max_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # (max_len, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (max_len, head_dim): halves share frequencies
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the angles of its positions; cos/sin are (T, D)."""
    dtype = x.dtype
    x = x.float()
    return (x * cos + rotate_half(x) * sin).to(dtype)
