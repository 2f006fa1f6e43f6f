"""Normalization layers: LayerNorm (GPT-2) and RMSNorm (Llama).

LayerNorm (Ba et al. 2016):  y = (x - mean(x)) / sqrt(var(x) + eps) * g + b
RMSNorm  (Zhang & Sennrich 2019): y = x / sqrt(mean(x^2) + eps) * g
RMSNorm drops the centering and the bias: one reduction instead of two, same quality.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's `nn.LayerNorm` has no bias=False before 2.1)."""

    def __init__(self, dim: int, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, normalized x cast back to the input dtype, then scaled by the
    gain (exactly HF Llama's order: with fp32 gains and bf16 input the result is fp32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def build_norm(kind: str, dim: int, bias: bool, eps: float) -> nn.Module:
    """The norm a config asks for (`config.norm`)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    return LayerNorm(dim, bias=bias, eps=eps)
