"""Benchmark: forward + backward of one MoE layer against the dense SwiGLU MLP it replaces.

The MoE layer has 8 experts, top-2, and the *same active parameters* as the dense MLP (each
expert is half as wide), so ideally it costs the same. We time, side by side and interleaved
(so a busy machine slows every variant alike):

    dense        nanomoe.mlp.MLP (SwiGLU)
    reference    MoE, loop over experts with index_select / index_add
    fast-loop    MoE, tokens sorted by expert, one matmul per expert over W.unbind(0)
    fast-padded  MoE, tokens sorted by expert, padded to the largest expert, two torch.bmm
    fast-grouped MoE, tokens sorted by expert, torch.nn.functional.grouped_mm (when available)

"(auto)" marks the kernel `moe_impl="fast"` picks by itself here (`nanomoe.moe.pick_kernel`).

    uv run -m scripts.bench_03_moe                 # d_model 256 and 512, 4096 tokens, 2 threads
    uv run -m scripts.bench_03_moe --quick         # seconds
    uv run -m scripts.bench_03_moe --device=cuda --dtype=bfloat16

On a CPU shared with other jobs, run it as `OMP_WAIT_POLICY=PASSIVE uv run -m scripts.bench_03_moe`:
by default OpenMP threads spin while they wait for each other, and when the machine is busy the
second thread is often descheduled, so every parallel op waits a scheduler time slice. The MoE
layer runs ~8x more matmuls than the dense MLP (one per expert), so spinning inflates its
time far more (measured here: 1.5-6x the dense MLP instead of ~1.05x).
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from nanomoe import moe_config
from nanomoe.mlp import MLP
from nanomoe.moe import MoE, pick_kernel
from nanomoe.training.cli import parse_args

DEFAULTS = dict(
    quick=False,
    d_models="256,512",
    tokens=4096,
    seq_len=1024,
    n_experts=8,
    top_k=2,
    threads=2,
    warmup=3,
    runs=15,
    device="cpu",
    dtype="float32",
    seed=0,
)
QUICK = dict(d_models="64", tokens=256, seq_len=128, warmup=1, runs=3)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_variants(d: int, args, device: str, dtype: torch.dtype) -> dict:
    """name -> (module, forward function returning the tensor to backprop)."""
    cfg = moe_config(n_embd=d, n_head=max(1, d // 64), n_experts=args.n_experts, moe_top_k=args.top_k)
    torch.manual_seed(args.seed)
    dense = MLP(d, cfg.hidden_dim, "swiglu", bias=False).to(device, dtype)
    moe = MoE(cfg).to(device, dtype)
    torch.nn.init.normal_(moe.router.weight, std=0.02)
    variants = {"dense": (dense, lambda x: dense(x))}

    def moe_fn(impl: str, kernel):
        def fn(x):
            moe.impl, moe.kernel = impl, kernel
            y, aux, _ = moe(x)
            return y, aux
        return fn

    variants["reference"] = (moe, moe_fn("reference", None))
    variants["fast-loop"] = (moe, moe_fn("fast", "loop"))
    variants["fast-padded"] = (moe, moe_fn("fast", "padded"))
    if hasattr(F, "grouped_mm"):
        variants["fast-grouped"] = (moe, moe_fn("fast", "grouped"))
    auto = pick_kernel(dtype, torch.device(device), d, cfg.expert_hidden_dim)
    n_active = args.top_k * sum(p.numel() for p in moe.experts.parameters()) // args.n_experts
    n_dense = sum(p.numel() for p in dense.parameters())
    return variants, cfg, n_active, n_dense, f"fast-{auto}"


def step(fn, x, g) -> None:
    out = fn(x)
    if isinstance(out, tuple):
        y, aux = out
        (y * g).sum().add(aux).backward()
    else:
        (out * g).sum().backward()


def bench_one(d: int, args, device: str, dtype: torch.dtype) -> list[dict]:
    variants, cfg, n_active, n_dense, auto = make_variants(d, args, device, dtype)
    B = max(1, args.tokens // args.seq_len)
    x = torch.randn(B, args.tokens // B, d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for name, (_, fn) in variants.items():  # warm-up (allocator, kernels, lazy init)
        for _ in range(args.warmup):
            step(fn, x, g)
    for _ in range(args.runs):  # interleaved: each round times every variant once
        for name, (mod, fn) in variants.items():
            mod.zero_grad(set_to_none=True)
            x.grad = None
            _sync(device)
            t0 = time.perf_counter()
            step(fn, x, g)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    dense_ms = 1000 * statistics.median(times["dense"])
    rows = []
    for name, ts in times.items():
        ms = 1000 * statistics.median(ts)
        rows.append(dict(d_model=d, variant=name + (" (auto)" if name == auto else ""), ms=ms, ratio=ms / dense_ms,
                         hidden=cfg.expert_hidden_dim if name != "dense" else cfg.hidden_dim,
                         active_params=n_dense if name == "dense" else n_active))
    return rows


def main(argv=None) -> list[dict]:
    args = parse_args(DEFAULTS, argv=argv, quick=QUICK)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device=cuda but no CUDA GPU is visible; use --device=cpu")
    dtype = getattr(torch, args.dtype)
    if device == "cpu":
        torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    where = (torch.cuda.get_device_name() if device == "cuda"
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    if device == "cpu":
        where += f", OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    print(f"torch {torch.__version__} | {device} ({where}) | {args.dtype} | {args.tokens} tokens | "
          f"{args.n_experts} experts top-{args.top_k} | median of {args.runs} after {args.warmup} warm-up")
    if load:
        print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    rows = []
    for d in [int(s) for s in str(args.d_models).split(",")]:
        rows += bench_one(d, args, device, dtype)
    print("\n| d_model | variant | hidden | active params | fwd+bwd ms | / dense |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['d_model']} | {r['variant']} | {r['hidden']} | {r['active_params']:,} | "
              f"{r['ms']:.2f} | {r['ratio']:.2f}x |")
    if load:
        load = os.getloadavg()
        print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return rows


if __name__ == "__main__":
    main()
