"""Weight-only int8 quantization, one scale per output channel, and quantized checkpoints.

Decoding one token reads every weight once and does 2 FLOPs per weight: the time is the bytes.
Storing each weight in 1 byte instead of 4 (fp32) or 2 (bf16) cuts the bytes read per token;
activations stay in floating point ("weight-only", as in gpt-fast; LLM.int8, Dettmers et al.
2022, arXiv 2208.07339, studies why int8 *activations* are the hard part).

For a weight W (out, in), row o gets its own scale (symmetric, per output channel):

    s_o = max_i |W_oi| / 127        W8_oi = round(W_oi / s_o) in [-127, 127]        W ~ s_o * W8_oi

so each weight is off by at most s_o / 2, and y_o = sum_i W_oi x_i is off by at most
s_o / 2 * sum_i |x_i| (`int8_error_bound`). The matmul is x @ W8^T * s: the scale is per output,
so it comes out of the sum.

Kernels (`int8_path`): PyTorch's `torch._weight_int8pack_mm` (int8 weights, float activations,
per-channel scales) where the device has it (CPU; CUDA with bf16/fp16), else a dequantize-then-
matmul fallback (W8 -> float, times s, then a plain matmul), which is exact but reads more bytes.
On CPU the kernel is fastest with bf16 activations (see `int8_path`).

The tied embedding is quantized once: `lm_head` becomes an `Int8Linear`, and `wte` an
`Int8Embedding` that reads its rows from the same int8 matrix and scales (scales per vocabulary
row serve both). The MoE router stays in float (tiny, and it decides the routing); stacked MoE
experts stay in float too (not quantized here).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .model import GPT
from .static_cache import compiled_one_row, matvec_reduction

QUANT_FORMAT = "nanomoe-int8-weight-only-v1"


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) float -> (w8 (out, in) int8, scales (out,) float32), symmetric per output channel."""
    w = w.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,) an all-zero row keeps a tiny scale
    w8 = torch.round(w / scales.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return w8, scales


def int8_error_bound(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Largest |x @ W^T - x @ (s W8)^T| the rounding allows: s_o / 2 * sum_i |x_i|, x (N, in) -> (N, out)."""
    return 0.5 * x.abs().sum(-1, keepdim=True).float() * scales.float().unsqueeze(0)


def int8_path(device: torch.device | str, dtype: torch.dtype) -> str:
    """Which int8 matmul runs for activations of `dtype` on `device`: "int8pack" or "dequantize".

    CPU: `_weight_int8pack_mm` for bf16 and fp16 activations, dequantize-then-matmul for fp32.
    Measured with torch 2.15 on the course's 2-core CPU, 1 thread, the 49 matrices of the GPT-2
    124M shape (head included) times M rows: M = 1, int8pack 18-19 ms with bf16 activations, 102 ms
    with fp32, dequantize 103-106 ms; M = 8 (a prompt), 41-43 ms, 822 ms and 144 ms. (Inside a
    compiled one-token step, fp32 activations take neither: `Int8Linear` becomes a fused reduction.)
    CUDA: int8pack for bf16/fp16 (not measured here: no GPU in the course's runs), the fallback for fp32."""
    dev = torch.device(device).type
    if not hasattr(torch, "_weight_int8pack_mm"):
        return "dequantize"
    if dev in ("cpu", "cuda"):
        return "int8pack" if dtype in (torch.bfloat16, torch.float16) else "dequantize"
    return "dequantize"


def check_int8(device: torch.device | str, dtype: torch.dtype) -> None:
    """Raise ValueError (one line) where int8 weights have no sensible path."""
    dev = torch.device(device).type
    if dev not in ("cpu", "cuda"):
        raise ValueError(f"int8 weights run on cpu and cuda only, not on {dev}: drop --int8 or use --device=cpu")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"int8 weights need float32, bfloat16 or float16 activations, got {dtype}")
    if dev == "cpu" and dtype == torch.float16:
        raise ValueError("int8 weights with float16 activations have no fast CPU kernel: use --dtype=bfloat16 "
                         "(the fast int8 path on CPU) or float32")


def int8_matmul(x: torch.Tensor, w8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ (scales * w8)^T -> (..., out) in x's dtype, by the path `int8_path` picks."""
    shape = x.shape[:-1]
    x2 = x.reshape(-1, x.size(-1))
    if int8_path(x.device, x.dtype) == "int8pack":
        y = torch._weight_int8pack_mm(x2.contiguous(), w8, scales.to(x.dtype))
    else:  # dequantize, then a plain matmul: exact, but reads the float copy it makes
        y = F.linear(x2, w8.to(x.dtype)) * scales.to(x.dtype)
    return y.reshape(*shape, w8.size(0))


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with one float scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        q = cls(lin.in_features, lin.out_features, bias=lin.bias is not None).to(lin.weight.device)
        q.weight_int8, q.scales = quantize_int8(lin.weight)
        q.scales = q.scales.to(lin.weight.dtype)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().clone())
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if compiled_one_row(x, (torch.float32,)):
            # one row inside torch.compile: the reduction sum_i W8_oi x_i, with the int8 -> float
            # conversion fused into the loop, reads each weight byte once (as static_cache.MatvecLinear)
            y = matvec_reduction(x, self.weight_int8) * self.scales.to(x.dtype)
        else:
            y = int8_matmul(x, self.weight_int8, self.scales)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per output channel"


class Int8Embedding(nn.Module):
    """Embedding rows read from an `Int8Linear`'s int8 matrix (tied embeddings): row i = s_i * W8_i."""

    def __init__(self, head: Int8Linear):
        super().__init__()
        self.head = [head]  # a list: not a submodule, so its buffers are saved once, under lm_head

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        rows = F.embedding(idx, head.weight_int8)  # (B, T, C) int8: one row per token, 1 byte a weight
        return rows.to(head.scales.dtype) * head.scales[idx].unsqueeze(-1)


def _swap_linears(module: nn.Module) -> None:
    """Replace every nn.Linear under `module` by an Int8Linear, except MoE routers."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and name != "router":
            setattr(module, name, Int8Linear.from_linear(child))
        else:
            _swap_linears(child)


@torch.no_grad()
def quantize_model_int8(model: GPT) -> GPT:
    """Quantize `model`'s Linear weights (and the tied embedding, once) to int8, in place; returns it."""
    _swap_linears(model.transformer.h)
    tied = model.config.tie_embeddings
    model.lm_head = Int8Linear.from_linear(model.lm_head)
    if tied:
        model.transformer.wte = Int8Embedding(model.lm_head)
    model.quantization = "int8"
    return model


def save_quantized(model: GPT, path: str | Path) -> None:
    """Write an int8 model: its config, the quantization format and the state dict (int8 + scales)."""
    if getattr(model, "quantization", None) != "int8":
        raise ValueError("save_quantized needs a model quantized by quantize_model_int8")
    torch.save({"format": QUANT_FORMAT, "config": model.config.to_dict(), "model": model.state_dict()}, path)


def load_quantized(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> GPT:
    """Read a file written by `save_quantized` (weights_only=True: no code runs on load)."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != QUANT_FORMAT:
        raise ValueError(f"{path} is not an int8 checkpoint written by nanomoe.quantize.save_quantized")
    model = GPT(GPTConfig.from_dict(ckpt["config"]))
    quantize_model_int8(model)
    model.load_state_dict(ckpt["model"])
    return model.to(device=device, dtype=dtype).eval()
