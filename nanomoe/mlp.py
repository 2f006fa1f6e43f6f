"""The position-wise feed-forward network of a Transformer block.

GELU MLP (GPT-2):   y = W2 gelu(W1 x)                    hidden = 4 * n_embd
                    (GPT-2 uses GELU's tanh approximation; nanoGPT the exact erf form)
SwiGLU   (Llama):   y = W2 (silu(Wg x) * Wu x)            hidden ~ 8/3 * n_embd
(Shazeer 2020, "GLU Variants Improve Transformer"). The gate and up projections are stored
fused in one `c_fc` matrix ([gate; up] along the output dimension): one matmul instead of two.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def activation(h: torch.Tensor, kind: str, gelu_approximate: str = "tanh") -> torch.Tensor:
    """The MLP non-linearity, shared by the dense MLP and the MoE experts (`nanomoe.moe`).

    "swiglu": h = [gate | up] along the last dim -> silu(gate) * up (half the width);
    "gelu": GELU with `gelu_approximate` ("tanh" = GPT-2, "none" = nanoGPT's exact erf form)."""
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate=gelu_approximate)


class MLP(nn.Module):
    def __init__(
        self, n_embd: int, hidden: int, kind: str = "gelu", bias: bool = True, dropout: float = 0.0,
        gelu_approximate: str = "tanh",
    ):
        super().__init__()
        self.kind = kind
        self.gelu_approximate = gelu_approximate
        self.hidden = hidden
        n_in = 2 * hidden if kind == "swiglu" else hidden
        self.c_fc = nn.Linear(n_embd, n_in, bias=bias)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = activation(self.c_fc(x), self.kind, self.gelu_approximate)  # (B, T, hidden)
        return self.dropout(self.c_proj(h))
