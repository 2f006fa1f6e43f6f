"""Benchmark: expert-parallel training on CPU with W = 1, 2, 4 processes (gloo, 1 thread each).

Same model and the same global batch for every W (4 micro-batches per step: W = 1 accumulates 4,
W = 2 two per rank, W = 4 one), so the runs compute the same thing and only the split differs.
Rounds alternate the world sizes (W = 1, 2, 4, 1, 2, 4, ...) so a busy machine slows all of them
alike (on a machine shared with other programs, more processes also take a bigger share of the
cores: read the ratios with the load in mind). Each run reports the median tokens/s of its second
half (start-up excluded) and the bytes its ranks sent over the network per step. Every run is the one
training loop: `torchrun -m scripts.04_train --config=machado_moe_ep` (`nanomoe.course.ep_runs.launch`).

    uv run python -m scripts.bench_07_ep                # ~10 min on a 2-core CPU
    uv run python -m scripts.bench_07_ep --rounds=1 --steps=10
"""

from __future__ import annotations

import argparse
import statistics

from nanomoe.course.ep_runs import launch, summarize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out_dir", default="runs/bench_07")
    a = p.parse_args()
    worlds = [int(w) for w in a.worlds.split(",")]
    # per-micro-batch balance: a global balance with accumulation adds a routing pre-pass to W = 1
    # and W = 2 but not to W = 4 (one micro-batch per rank), which would skew the comparison
    opts = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, n_experts=8, moe_top_k=2, batch_size=8,
                moe_balance_scope="micro_batch", max_steps=a.steps, warmup_steps=5, log_interval=1,
                eval_interval=a.steps, eval_iters=4, sample_tokens=0, grad_accum=4)
    tps: dict[int, list[float]] = {w: [] for w in worlds}
    mb: dict[int, float] = {}
    for r in range(a.rounds):
        for w in worlds:
            launch(w, out_dir=f"{a.out_dir}/w{w}", **opts)
            s = summarize(f"{a.out_dir}/w{w}")
            tps[w].append(s["tok_per_s"])
            mb[w] = s.get("bytes_per_step", 0) / 1e6
            print(f"round {r + 1}: W={w} {s['tok_per_s']:.0f} tok/s, {mb[w]:.2f} MB/step", flush=True)
    base = statistics.median(tps[worlds[0]])
    print(f"\n| W | tokens/s (median of {a.rounds} runs) | vs W={worlds[0]} | MB sent over the network per step |")
    print("|---|---|---|---|")
    for w in worlds:
        t = statistics.median(tps[w])
        print(f"| {w} | {t:.0f} | {t / base:.2f}x | {mb[w]:.2f} |")


if __name__ == "__main__":
    main()
