"""Chapter 02 benchmark: modern architecture and KV cache, measured side by side in one run.

    uv run -m scripts.bench_02_modern              # full run (a few minutes on a 2-core CPU)
    uv run -m scripts.bench_02_modern --quick      # seconds: smaller sizes, checks nothing
    uv run -m scripts.bench_02_modern --threads=1  # intra-op threads (default: 2)

What it measures (medians after a warm-up; the compared runs alternate, so a busy machine
slows both sides alike):

1. training tokens/s of the GPT-2 baseline vs the modern preset at about equal parameters
   (the modern model's SwiGLU width is chosen so that both have about the same parameter count,
   position table excluded);
2. decode time per token at position 64 and at position 1023 (~1024), with and without the KV
   cache (4 layers, n_embd 128, block_size 1024, batch 1);
3. total time to generate 1000 tokens with and without the cache (median of 3 cached runs,
   one uncached run);
4. KV-cache bytes for MHA, GQA and MQA;
5. peak memory (RSS high-water mark, reset through /proc/self/clear_refs) during a 1000-token
   generation with the cache, compared to the cache's own size, and without the cache. Each
   memory run happens in a fresh child process so one run's peak cannot hide another's.

Targets (chapter 02 issue): cached time/token at 1024 <= 1.5x at 64; 1000 tokens >= 10x faster
with the cache; modern >= 0.9x baseline training tokens/s; memory growth with the cache <= the
cache's bytes + a small margin.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from nanomoe import GPT, GPTConfig, gpt2_config, modern_config
from nanomoe.course.roofline import time_steps
from nanomoe.training.cli import parse_args

DEFAULTS = dict(
    quick=False,
    threads=2,  # torch intra-op threads (this course's reference CPU has 2 cores)
    vocabs="128,50304",  # decode/generation: a character vocabulary (the chapter's model) and GPT-2's padded BPE one
    vocab_size=50304,  # memory benchmark's vocabulary
    train_vocab=128,  # training benchmark: a character-level vocabulary, as in the chapter's ablation
    n_layer=4,
    n_head=4,
    n_embd=128,
    block_size=1024,
    train_batch=8,
    train_seq=256,
    train_steps=20,  # timed steps per model (after 3 warm-up steps)
    decode_reps=40,  # timed decode steps per (position, cache) cell
    positions="64,1023",
    gen_tokens=1000,
    mem_margin_mb=8.0,  # "small margin" allowed above the cache's bytes
    mem_child="",  # internal: "cache" | "nocache" runs one memory measurement and prints JSON
    json_out="",  # optional path for the raw figures
    sections="train,decode,generate,bytes,memory",  # which parts to run
)
QUICK = dict(train_steps=2, decode_reps=2, gen_tokens=40, block_size=64, positions="8,60", train_seq=32, train_batch=2,
             vocabs="128,4096", vocab_size=4096, n_layer=2, n_embd=64, threads=1)


def decode_config(args, vocab_size=None, **kw) -> GPTConfig:
    """The modern preset at the benchmark's size (n_head 4 -> 1 kv head: MQA unless overridden)."""
    return modern_config(vocab_size=vocab_size or args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                         n_head=args.n_head, n_embd=args.n_embd, **kw)


def build(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


# ---- 1. training throughput -------------------------------------------------------------------


def equal_param_modern(base: GPT, **kw) -> GPTConfig:
    """The modern config whose SwiGLU width gives about `base`'s parameter count.

    Counted without the position table (`num_params(non_embedding=True)`, as nanoGPT and the
    scaling-law papers do): `wpe` costs no FLOPs, so giving its parameters to the modern model's
    MLP would hand the baseline a free speed advantage. The width is rounded to a multiple of
    `mlp_multiple_of` (unaligned widths make matrix kernels slower for no reason)."""
    cfg = modern_config(**kw)
    target = base.num_params(non_embedding=True)

    def count(h: int) -> int:
        return GPT(cfg.replace(mlp_hidden=h)).num_params(non_embedding=True)

    m = cfg.mlp_multiple_of
    n1, n2 = count(m), count(2 * m)  # the count is linear in the width
    h = m + (target - n1) * m / (n2 - n1)
    return cfg.replace(mlp_hidden=max(m, m * round(h / m)))


def bench_training(args) -> dict:
    shape = dict(vocab_size=args.train_vocab, block_size=args.train_seq, n_layer=args.n_layer,
                 n_head=args.n_head, n_embd=args.n_embd)
    base = GPT(gpt2_config(**shape))
    modern = GPT(equal_param_modern(base, **shape))
    models = {"gpt2 (baseline)": base, "modern": modern}
    opts = {k: m.configure_optimizers(0.1, 1e-3) for k, m in models.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.train_vocab, (args.train_batch, args.train_seq), generator=g)
    y = torch.randint(0, args.train_vocab, (args.train_batch, args.train_seq), generator=g)

    def step(name: str) -> float:
        m, opt = models[name], opts[name]
        t0 = time.perf_counter()
        _, loss = m(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in models:  # warm-up
        for _ in range(3):
            step(name)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.train_steps):
        for name in models:  # alternate, so machine noise hits both alike
            times[name].append(step(name))
    tok = args.train_batch * args.train_seq
    out = {}
    for name, m in models.items():
        c = m.config
        out[name] = dict(
            params=m.num_params(non_embedding=True),
            mlp_hidden=c.hidden_dim, kv_heads=c.kv_heads,
            step_s=statistics.median(times[name]),
            tokens_per_s=tok / statistics.median(times[name]),
        )
    out["ratio"] = out["modern"]["tokens_per_s"] / out["gpt2 (baseline)"]["tokens_per_s"]
    return out


# ---- 2./3. decoding ---------------------------------------------------------------------------


@torch.no_grad()
def bench_decode(args, V: int) -> dict:
    model = build(decode_config(args, V))
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, V, (1, args.block_size), generator=g)

    def cells_for(p: int) -> dict[str, Callable[[], object]]:
        # with the cache: prefill positions 0..p-1 once, then time the step that feeds position p
        cache = model.new_cache(1, max_len=args.block_size)
        model.hidden_states(seq[:, :p], cache)
        tok = seq[:, p : p + 1]

        def cached_step():
            cache.pos = p  # rewind: every timed step writes position p again
            h, _, _ = model.hidden_states(tok, cache)
            return model.logits(h[:, -1]).argmax(-1)

        def uncached_step():  # what generate(use_cache=False) does at this position
            h, _, _ = model.hidden_states(seq[:, : p + 1])
            return model.logits(h[:, -1]).argmax(-1)

        return {"cache": cached_step, "no_cache": uncached_step}

    positions = [int(s) for s in args.positions.split(",")]
    cells = {(p, kind): fn for p in positions for kind, fn in cells_for(p).items()}
    for fn in cells.values():  # warm-up
        fn()
        fn()
    times: dict = {c: [] for c in cells}
    for _ in range(args.decode_reps):  # every rep visits every cell: drifts in machine load hit all alike
        for c, fn in cells.items():
            fn()  # a step like the one before it (as in a real generation), then time three in a row
            times[c].append(time_steps(fn, 3, warmup=0))
    out: dict = {p: {f"{kind}_ms": 1e3 * statistics.median(times[(p, kind)]) for kind in ("cache", "no_cache")}
                 for p in positions}
    # the output layer for one token: the same work with or without the cache (Amdahl's bound)
    h = torch.randn(1, args.n_embd)
    out["lm_head_ms"] = 1e3 * time_steps(lambda: model.logits(h).argmax(-1), args.decode_reps, warmup=0)
    return out


@torch.no_grad()
def bench_generate(args, V: int) -> dict:
    model = build(decode_config(args, V))
    prompt = torch.zeros(1, 1, dtype=torch.long)
    n = args.gen_tokens
    model.generate(prompt, 8, temperature=0.0)  # warm-up
    model.generate(prompt, 8, temperature=0.0, use_cache=False)
    runs = []
    for _ in range(3):  # cheap: the median of three
        t0 = time.perf_counter()
        a = model.generate(prompt, n, temperature=0.0, use_cache=True)
        runs.append(time.perf_counter() - t0)
    t_cache = statistics.median(runs)
    t0 = time.perf_counter()
    b = model.generate(prompt, n, temperature=0.0, use_cache=False)
    t_plain = time.perf_counter() - t0
    same = bool(torch.equal(a, b))
    return dict(tokens=n, cache_s=t_cache, no_cache_s=t_plain, speedup=t_plain / t_cache, same_tokens=same)


def cache_bytes(args) -> dict:
    out = {}
    for name, kv in (("MHA", args.n_head), ("GQA", max(1, args.n_head // 2)), ("MQA", 1)):
        cfg = decode_config(args, n_kv_head=kv)
        out[f"{name} (n_kv_head={kv})"] = GPT(cfg).new_cache(1, max_len=args.block_size).nbytes
    return out


# ---- 5. memory (child processes) -----------------------------------------------------------------


def _rss_kb() -> tuple[int, int]:
    s = open("/proc/self/status").read()
    return (int(re.search(r"VmRSS:\s+(\d+)", s).group(1)), int(re.search(r"VmHWM:\s+(\d+)", s).group(1)))


@torch.no_grad()
def memory_child(args) -> dict:
    """Runs in a fresh process: warm up, reset the RSS high-water mark, generate, read the peak."""
    use_cache = args.mem_child == "cache"
    model = build(decode_config(args))
    prompt = torch.zeros(1, 1, dtype=torch.long)
    model.generate(prompt, 16, temperature=0.0, use_cache=use_cache)  # one-time initializations
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    rss0, _ = _rss_kb()
    model.generate(prompt, args.gen_tokens, temperature=0.0, use_cache=use_cache)
    _, hwm = _rss_kb()
    cache_nbytes = model.new_cache(1, max_len=args.gen_tokens).nbytes if use_cache else 0
    return dict(growth_bytes=(hwm - rss0) * 1024, cache_bytes=cache_nbytes)


def bench_memory(args) -> dict:
    if not os.path.exists("/proc/self/clear_refs"):
        return {"skipped": "needs Linux /proc/self/clear_refs"}
    out = {}
    for mode in ("cache", "nocache"):
        argv = [sys.executable, "-m", "scripts.bench_02_modern", f"--mem_child={mode}", f"--threads={args.threads}",
                f"--gen_tokens={args.gen_tokens}", f"--block_size={args.block_size}", f"--vocab_size={args.vocab_size}",
                f"--n_layer={args.n_layer}", f"--n_head={args.n_head}", f"--n_embd={args.n_embd}"]
        r = subprocess.run(argv, capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if r.returncode != 0:
            raise RuntimeError(f"memory child {mode} failed:\n{r.stderr[-2000:]}")
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


# ---- report -------------------------------------------------------------------------------------


def mb(b: float) -> str:
    return f"{b / 2**20:.2f} MiB"


def report_training(args, res: dict, checks: list) -> None:
    print("\n[1/5] training throughput, baseline vs modern at ~equal parameters ...", flush=True)
    tr = res["training"] = bench_training(args)
    for name in ("gpt2 (baseline)", "modern"):
        r = tr[name]
        print(f"  {name:16s} {r['params'] / 1e6:6.3f}M non-embedding params "
              f"(mlp hidden {r['mlp_hidden']}, kv heads {r['kv_heads']}): "
              f"{r['tokens_per_s']:,.0f} tok/s (median step {r['step_s'] * 1e3:.1f} ms)")
    checks.append(("modern trains >= 0.9x baseline tokens/s", tr["ratio"] >= 0.9, f"{tr['ratio']:.2f}x"))


def report_decode(args, res: dict, checks: list, vocabs: list[int]) -> None:
    print("\n[2/5] decode time per token (modern preset, batch 1) ...", flush=True)
    res["decode"] = {}
    for V in vocabs:
        dec = res["decode"][V] = bench_decode(args, V)
        p_lo, p_hi = sorted(k for k in dec if isinstance(k, int))
        print(f"  vocab {V}:")
        for p in (p_lo, p_hi):
            print(f"    position {p:5d}: cache {dec[p]['cache_ms']:7.3f} ms | no cache {dec[p]['no_cache_ms']:8.3f} ms")
        r_cache = dec[p_hi]["cache_ms"] / dec[p_lo]["cache_ms"]
        r_plain = dec[p_hi]["no_cache_ms"] / dec[p_lo]["no_cache_ms"]
        print(f"    ratio {p_hi}/{p_lo}: cache {r_cache:.2f}x, no cache {r_plain:.2f}x; "
              f"output layer alone {dec['lm_head_ms']:.3f} ms/token")
        checks.append((f"V={V}: cached time/token at {p_hi} <= 1.5x at {p_lo}", r_cache <= 1.5, f"{r_cache:.2f}x"))


def report_generate(args, res: dict, checks: list, vocabs: list[int]) -> None:
    print(f"\n[3/5] generating {args.gen_tokens} tokens (greedy, 1-token prompt) ...", flush=True)
    res["generate"] = {}
    for V in vocabs:
        gen = res["generate"][V] = bench_generate(args, V)
        print(f"  vocab {V}: cache {gen['cache_s']:.2f} s ({gen['tokens'] / gen['cache_s']:,.0f} tok/s) | no cache "
              f"{gen['no_cache_s']:.2f} s ({gen['tokens'] / gen['no_cache_s']:,.0f} tok/s) | "
              f"speed-up {gen['speedup']:.1f}x"
              f" | same tokens: {gen['same_tokens']}")
        checks.append((f"V={V}: {args.gen_tokens} tokens >= 10x faster with the cache", gen["speedup"] >= 10,
                       f"{gen['speedup']:.1f}x"))
        checks.append((f"V={V}: cached and uncached greedy tokens identical", gen["same_tokens"],
                       str(gen["same_tokens"])))


def report_memory(args, res: dict, checks: list, sections: set) -> None:
    print(f"\n[4/5] KV-cache bytes (batch 1, {args.block_size} positions, float32) ...")
    cb = res["cache_bytes"] = cache_bytes(args) if "bytes" in sections else {}
    base_b = next(iter(cb.values()), 1)
    for name, b in cb.items():
        print(f"  {name:22s} {mb(b):>10s}  ({base_b / b:.0f}x smaller than MHA)")
    print(f"\n[5/5] peak memory during a {args.gen_tokens}-token generation (fresh processes) ...", flush=True)
    mem = res["memory"] = bench_memory(args) if "memory" in sections else {"skipped": "not in --sections"}
    if "skipped" in mem:
        print("  skipped:", mem["skipped"])
        return
    c, n = mem["cache"], mem["nocache"]
    print(f"  with cache:    RSS peak grows {mb(c['growth_bytes'])} (the cache itself: {mb(c['cache_bytes'])})")
    print(f"  without cache: RSS peak grows {mb(n['growth_bytes'])}")
    limit = c["cache_bytes"] + args.mem_margin_mb * 2**20
    checks.append((f"memory growth with cache <= cache + {args.mem_margin_mb:g} MiB", c["growth_bytes"] <= limit,
                   f"{mb(c['growth_bytes'])} vs {mb(limit)}"))


def main() -> None:
    args = parse_args(DEFAULTS, quick=QUICK)
    torch.set_num_threads(args.threads)
    if args.mem_child:
        print(json.dumps(memory_child(args)))
        return
    t_start = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (load average {load:.1f}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (" (quick mode: tiny sizes, targets not checked)" if args.quick else ""))
    res: dict = {}
    checks: list[tuple[str, bool, str]] = []
    sections = set(args.sections.split(","))
    vocabs = [int(v) for v in args.vocabs.split(",")]
    if "train" in sections:
        report_training(args, res, checks)
    report_decode(args, res, checks, vocabs if "decode" in sections else [])
    report_generate(args, res, checks, vocabs if "generate" in sections else [])
    report_memory(args, res, checks, sections)
    print(f"\nsummary ({time.perf_counter() - t_start:.0f} s):")
    for what, ok, val in checks:
        print(f"  [{'ok' if ok else 'MISSED' if not args.quick else '--'}] {what}: {val}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2, default=str)


if __name__ == "__main__":
    main()
