"""Benchmark (chapter 06): one training step (forward + backward) of each router variant against the
dense model with the same active parameters, side by side and interleaved (a busy machine slows
every variant alike).

Every variant runs the step as `micro_batches` micro-batches (gradient accumulation), so the
global balance variant pays its routing pre-pass (one extra forward without gradients) where it
really would. Variants (the chapter's, on a 4-layer d_model-48 model by default):

    dense           the modern dense model
    top-2           8 experts, softmax, balance per micro-batch (chapter 03)
    top-2 sequence  the same, balance per sequence (DeepSeek-V3's sequence-wise loss)
    top-2 global    the same, balance over the step: `global_balance_prepass` + the micro-batches
    sigmoid         sigmoid router + selection bias + sequence-wise loss (DeepSeek-V3)
    fine 32x7+1     32 experts top-7 + 1 shared (DeepSeekMoE), same active parameters
    dense-first     top-2 with the first layer dense

    uv run -m scripts.bench_06_routers              # 1 thread, the chapter's model
    uv run -m scripts.bench_06_routers --quick      # seconds
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from nanomoe import GPT, modern_config, moe_config
from nanomoe.moe import global_balance_prepass
from nanomoe.training.cli import parse_args

DEFAULTS = dict(quick=False, n_layer=4, n_head=4, n_embd=48, block_size=128, batch_size=16, micro_batches=2,
                vocab_size=96, threads=1, warmup=2, runs=9, seed=0)
QUICK = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, warmup=1, runs=2)


def variants(args) -> dict:
    shape = dict(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                 n_embd=args.n_embd)
    return {
        "dense": modern_config(**shape),
        "top-2": moe_config(**shape),
        "top-2 sequence": moe_config(**shape, moe_balance_scope="sequence"),
        "top-2 global": moe_config(**shape, moe_balance_scope="global"),
        "sigmoid": moe_config(**shape, moe_router="sigmoid", moe_bias_balance=True, moe_balance_scope="sequence",
                              moe_aux_loss_coef=1e-4),
        "fine 32x7+1": moe_config(**shape, n_experts=32, moe_top_k=7, n_shared_experts=1),
        "dense-first": moe_config(**shape, moe_dense_layers=1),
    }


def train_step(model: GPT, micro: list[torch.Tensor]) -> None:
    """Forward + backward of one optimizer step over the micro-batches (no optimizer update)."""
    model.zero_grad(set_to_none=True)
    step_loads = global_balance_prepass(model, micro)  # None unless the scope is global
    for x in micro:
        _, loss = model(x, x, moe_loads=step_loads)
        (loss / len(micro)).backward()


def main(argv=None) -> list[dict]:
    args = parse_args(DEFAULTS, argv=argv, quick=QUICK)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size))
    micro = list(x.chunk(args.micro_batches))
    models = {}
    for name, cfg in variants(args).items():
        torch.manual_seed(args.seed)
        models[name] = GPT(cfg)
    print(f"torch {torch.__version__} | cpu ({platform.processor() or platform.machine()}, {args.threads} thread(s)) | "
          f"{args.batch_size}x{args.block_size} tokens in {args.micro_batches} micro-batches | "
          f"median of {args.runs} after {args.warmup} warm-up")
    if hasattr(os, "getloadavg"):
        print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    for model in models.values():
        for _ in range(args.warmup):
            train_step(model, micro)
    times: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(args.runs):  # interleaved rounds
        for name, model in models.items():
            t0 = time.perf_counter()
            train_step(model, micro)
            times[name].append(time.perf_counter() - t0)
    dense = statistics.median(times["dense"])
    rows = []
    print("\n| variant | active params | total params | step ms (median) | / dense |")
    print("|---|---:|---:|---:|---:|")
    for name, ts in times.items():
        ms = 1000 * statistics.median(ts)
        m = models[name]
        rows.append(dict(variant=name, ms=ms, ratio=ms / (1000 * dense), active=m.num_params(active=True),
                         total=m.num_params()))
        print(f"| {name} | {rows[-1]['active']:,} | {rows[-1]['total']:,} | {ms:.1f} | {rows[-1]['ratio']:.2f}x |")
    if hasattr(os, "getloadavg"):
        print("\nload average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return rows


if __name__ == "__main__":
    main()
