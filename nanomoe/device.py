"""Device and precision choice: CUDA, Apple MPS or CPU, and the dtype each runs fast and safely.

| device | autocast dtype | GradScaler | why |
|---|---|---|---|
| CUDA, capability >= 8.0 (Ampere, Ada, Hopper) | bfloat16 | no | fp32's exponent range: no overflow, no scaling |
| CUDA, older (T4 = 7.5, V100 = 7.0) | float16 | yes | no fast bf16; fp16 gradients underflow without scaling |
| MPS (Apple) | float32 | no | autocast support on MPS is still partial; fp32 is the safe default |
| CPU | float32 | no | bf16 autocast on CPU is slower than fp32 on most laptops |
"""

from __future__ import annotations

import platform
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dense peak tensor throughput (FLOP/s) for MFU, from the vendors' datasheets (no sparsity).
PEAK_FLOPS = {
    ("Tesla T4", torch.float16): 65e12,
    ("V100", torch.float16): 125e12,
    ("A100", torch.bfloat16): 312e12,
    ("A100", torch.float16): 312e12,
    ("A10G", torch.bfloat16): 70e12,
    ("L4", torch.bfloat16): 121e12,
    ("RTX 4090", torch.bfloat16): 165e12,
    ("RTX 3090", torch.bfloat16): 71e12,
    ("H100", torch.bfloat16): 989e12,
    ("H100", torch.float16): 989e12,
    ("H200", torch.bfloat16): 989e12,
    ("H200", torch.float16): 989e12,
}


def pick_device(prefer: Optional[str] = None) -> str:
    """'cuda' if available, else 'mps', else 'cpu'; `prefer` ("cpu", "cuda", "cuda:1", "mps") wins
    when that device exists, and a clear error says so when it does not."""
    if prefer and prefer != "auto":
        kind = prefer.split(":")[0]
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {prefer!r} requested but CUDA is not available; use --device=cpu")
        if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device {prefer!r} requested but MPS is not available; use --device=cpu")
        if kind not in ("cuda", "mps", "cpu"):
            raise ValueError(f"unknown device {prefer!r}; use auto, cpu, cuda, cuda:N or mps")
        return prefer
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, prefer: Optional[str] = None) -> torch.dtype:
    """The compute dtype for `device` (table above); `prefer` ("float32"/"bfloat16"/"float16") wins."""
    if prefer and prefer != "auto":
        if prefer not in DTYPES:
            raise ValueError(f"unknown dtype {prefer!r}; use auto, float32, bfloat16 or float16")
        return DTYPES[prefer]
    if device.startswith("cuda"):
        major, _ = torch.cuda.get_device_capability(torch.device(device))
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.float32


@dataclass
class Precision:
    """What a training run uses: device, autocast dtype, and whether a GradScaler is needed."""

    device: str
    dtype: torch.dtype

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def use_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self):
        """A context that runs matmuls in `dtype` (weights stay fp32), or nothing for fp32."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def describe(self) -> str:
        name = self.device
        if self.device_type == "cuda":
            name += f" ({torch.cuda.get_device_name(torch.device(self.device))})"
        amp = {torch.float32: "fp32", torch.bfloat16: "bf16 autocast",
               torch.float16: "fp16 autocast + GradScaler"}[self.dtype]
        return f"device: {name}, precision: {amp}"


def pick_precision(device: Optional[str] = None, dtype: Optional[str] = None, verbose: bool = True) -> Precision:
    """Pick device and dtype (see the module table) and say what was picked."""
    dev = pick_device(device)
    p = Precision(dev, pick_dtype(dev, dtype))
    if verbose:
        print(p.describe())
    return p


def hardware(device: str) -> str:
    """Where a run happens, in words for a figure or a table: "CPU x86_64, 1 thread",
    "GPU NVIDIA A100-SXM4-80GB", "Apple MPS"."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(torch.device(device))}"
    if device.startswith("mps"):
        return "Apple MPS"
    threads = torch.get_num_threads()
    return f"CPU {platform.machine()}, {threads} thread{'s' if threads > 1 else ''}"


def peak_flops(device: str, dtype: torch.dtype) -> Optional[float]:
    """Peak dense FLOP/s of this GPU for `dtype`, or None when unknown (CPU, MPS, other GPUs)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for (key, dt), flops in PEAK_FLOPS.items():
        if key in name and dt == dtype:
            return flops
    return None
