"""Chapter 08 benchmark: decoding speed at the GPT-2 124M shape against its bandwidth limit.

    uv run -m scripts.bench_08_decode                # ~5-10 min on a 2-core CPU (two torch.compile runs)
    uv run -m scripts.bench_08_decode --quick        # a tiny shape, seconds: checks that it runs
    uv run -m scripts.bench_08_decode --no-compile   # skip the compiled variants

Everything runs in one process with 1 thread; the variants alternate round by round, so a busy
machine slows them alike. Greedy decoding, random weights (same GPT-2 config for nanomoe and
transformers, the same weights copied into both), batch 1, a short prompt.

1. read bandwidth (`x.sum()` over 256 MB) and, for each variant, the bytes a decode step reads and
   the limit bandwidth / bytes; the achieved tokens/s and its fraction of that limit;
2. nanomoe fp32 (chapter 02's cache, "today") vs transformers' `generate`;
   static cache eager and compiled; bf16; int8 weight-only (bf16 activations);
3. MoE (8 experts, top-2, every layer) at batch 1 vs its dense twin with the same active
   parameters (the modern preset at the same shape), static cache.

Goals (chapter 08 issue): fp32 >= 1.5x transformers and >= 60% of its limit; bf16 >= 60%;
int8 >= 3x today's fp32; MoE <= 1.3x its dense twin.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time

import torch

from nanomoe import GPT, gpt2_config, modern_config, moe_config
from nanomoe.course.roofline import decode_bytes, measure_bandwidth, roofline_limit
from nanomoe.interop.inference import to_inference_dtype
from nanomoe.quantize import quantize_model_int8
from nanomoe.static_cache import compile_step, new_static_cache, static_generate, use_matvec_linears
from nanomoe.training.cli import parse_args

DEFAULTS = dict(
    quick=False,
    threads=1,
    new_tokens=32,  # tokens generated per timed run
    prompt=8,  # prompt tokens
    rounds=5,  # alternating rounds (the median is reported)
    n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024,
    compile=True,  # also time the torch.compile'd static step (fp32, bf16)
    hf=True,  # also time transformers' generate
    moe=True,
    json_out="",
)
QUICK = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=512, block_size=64, new_tokens=8, rounds=2, compile=False)


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def gpt2_pair(args):
    """nanomoe's GPT-2 and transformers' GPT2LMHeadModel with the same random weights (or only ours)."""
    cfg = gpt2_config(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                      n_head=args.n_head, n_embd=args.n_embd)
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    ref = None
    if args.hf:
        from nanomoe.interop.hf import to_hf_gpt2
        ref = to_hf_gpt2(ours).eval()
    return ours, ref


def bf16_copy(model: GPT) -> GPT:
    return to_inference_dtype(copy.deepcopy(model), torch.bfloat16)  # RoPE tables stay fp32


def runners(args, ours: GPT, ref) -> dict:
    """name -> (callable generating args.new_tokens tokens, model whose bytes set the limit)."""
    n, T = args.new_tokens, args.prompt
    idx = torch.randint(0, args.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    b16 = bf16_copy(ours)
    i8 = quantize_model_int8(bf16_copy(ours))
    out = {
        "fp32, chapter-02 cache (today)": (lambda: ours.generate(idx, n, temperature=0), ours),
        "fp32, static cache": (lambda: static_generate(ours, idx, n), ours),
        "bf16, static cache": (lambda: static_generate(b16, idx, n), b16),
        "int8 weights (bf16 activations), static": (lambda: static_generate(i8, idx, n), i8),
    }
    if ref is not None:
        out["transformers generate, fp32"] = (lambda: ref.generate(idx, max_new_tokens=n, min_new_tokens=n,
                                                                 do_sample=False, use_cache=True,
                                                                 pad_token_id=0), ours)
    if args.compile:
        mv = use_matvec_linears(copy.deepcopy(ours))  # one-row products as fused reductions (compiled only)
        mv16 = use_matvec_linears(bf16_copy(ours))
        i8_32 = quantize_model_int8(copy.deepcopy(ours))  # int8 weights, fp32 activations
        for name, m in (("fp32", ours), ("bf16", b16), ("fp32 reductions", mv), ("bf16 reductions", mv16),
                        ("int8 weights (fp32 activations), reductions", i8_32)):
            step, cache = compile_step("cpu"), new_static_cache(m, 1, T + n)
            t0 = time.perf_counter()
            static_generate(m, idx, n, cache=cache, step=step)  # compiles here
            print(f"  compiled the {name} step in {time.perf_counter() - t0:.0f} s", flush=True)
            out[f"{name}, static cache, compiled"] = (
                lambda m=m, step=step, cache=cache: static_generate(m, idx, n, cache=cache, step=step), m)
    return out, idx


def alternate(fns: dict, rounds: int, bws: list) -> dict:
    """Median seconds per call of each fn, calling them in turn `rounds` times (after one warm-up each);
    the read bandwidth is probed once per round too (appended to `bws`), so the limit is measured under
    the same load as the runs."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        bws.append(measure_bandwidth(reps=3))
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def median(v: list) -> float:
    return sorted(v)[len(v) // 2]


def bench_dense(args) -> tuple[dict, float]:
    ours, ref = gpt2_pair(args)
    fns, idx = runners(args, ours, ref)
    bws = []
    with torch.no_grad():
        secs = alternate({k: f for k, (f, _) in fns.items()}, args.rounds, bws)
    bw = median(bws)
    kv = args.prompt + args.new_tokens
    rows = {}
    for k, (_, m) in fns.items():
        tps = args.new_tokens / secs[k]
        limit = roofline_limit(bw, decode_bytes(m, 1, kv)["total"])
        rows[k] = dict(tokens_per_s=tps, limit=limit, fraction=tps / limit)
    return rows, bw


def bench_moe(args) -> tuple[dict, float]:
    shape = dict(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                 n_head=args.n_head, n_embd=args.n_embd)
    torch.manual_seed(0)
    models = {"dense twin (modern, same active params)": GPT(modern_config(**shape)).eval(),
              "MoE 8 experts top-2": GPT(moe_config(**shape)).eval()}
    idx = torch.randint(0, args.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    fns = {k: (lambda m=m: static_generate(m, idx, args.new_tokens)) for k, m in models.items()}
    bws = []
    with torch.no_grad():
        secs = alternate(fns, args.rounds, bws)
    bw = median(bws)
    rows = {}
    for k, m in models.items():
        tps = args.new_tokens / secs[k]
        limit = roofline_limit(bw, decode_bytes(m, 1, args.prompt + args.new_tokens, experts=2)["total"])
        rows[k] = dict(tokens_per_s=tps, limit=limit, fraction=tps / limit,
                       params_M=m.num_params(non_embedding=False) / 1e6,
                       active_M=m.num_params(non_embedding=False, active=True) / 1e6)
    return rows, bw


def main() -> None:
    args = parse_args(DEFAULTS, quick=QUICK, description="Chapter 08: decoding speed vs the bandwidth limit.")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s), "
          f"load average {load_avg()}", flush=True)
    res = dict(load_start=load_avg())
    res["dense"], bw = bench_dense(args)
    res["bandwidth"] = bw
    print(f"\nGPT-2 shape ({args.n_layer} layers, n_embd {args.n_embd}, V {args.vocab_size}), batch 1, "
          f"{args.new_tokens} new tokens after a {args.prompt}-token prompt (load {load_avg()}):")
    print(f"read bandwidth (x.sum over 256 MB, median of one probe per round): {bw / 1e9:.1f} GB/s")
    print(f"{'variant':45s} {'tokens/s':>9s} {'limit':>7s} {'of limit':>9s}")
    for k, r in res["dense"].items():
        print(f"{k:45s} {r['tokens_per_s']:9.1f} {r['limit']:7.1f} {r['fraction']:8.0%}")
    d = res["dense"]
    today = d["fp32, chapter-02 cache (today)"]["tokens_per_s"]
    best32 = max(v["tokens_per_s"] for k, v in d.items() if k.startswith("fp32"))
    if "transformers generate, fp32" in d:
        print(f"best nanomoe fp32 / transformers: {best32 / d['transformers generate, fp32']['tokens_per_s']:.2f}x "
              f"(today's path: {today / d['transformers generate, fp32']['tokens_per_s']:.2f}x)")
    best8 = max(v["tokens_per_s"] for k, v in d.items() if k.startswith("int8"))
    print(f"int8 / today's fp32: {d['int8 weights (bf16 activations), static']['tokens_per_s'] / today:.2f}x "
          f"(best int8 variant: {best8 / today:.2f}x)")
    if args.moe:
        res["moe"], bw_moe = bench_moe(args)
        print(f"\nMoE vs dense twin, static cache, batch 1 (load {load_avg()}, bandwidth {bw_moe / 1e9:.1f} GB/s):")
        for k, r in res["moe"].items():
            print(f"{k:45s} {r['tokens_per_s']:9.1f} tokens/s, limit {r['limit']:6.1f} ({r['fraction']:.0%}), "
                  f"{r['params_M']:.1f}M params, {r['active_M']:.1f}M active")
        m = res["moe"]
        ratio = m["dense twin (modern, same active params)"]["tokens_per_s"] / m["MoE 8 experts top-2"]["tokens_per_s"]
        print(f"MoE per-token time / dense twin: {ratio:.2f}x")
    res["load_end"] = load_avg()
    print(f"load average at the end: {res['load_end']}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
