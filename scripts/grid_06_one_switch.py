"""Chapter 06's one-switch grid: every variant of `nanomoe.one_switch.VARIANTS`, each seed, one regime.

    uv run -m scripts.grid_06_one_switch --threads=1                  # characters
    uv run -m scripts.grid_06_one_switch --threads=1 --tokenizer=bpe  # the Portuguese BPE

Writes <out_dir>/one_switch.json (rewritten after every run, so a stopped grid keeps what it did);
finished trainings are cached under <out_dir>/treinos/ and reused (the chapter reads the same cache).
"""

import json
import time

import torch

from nanomoe.cli import parse_args
from nanomoe.crossover import regime_tokenizer, train_variant
from nanomoe.data import encode_splits, read_corpus
from nanomoe.one_switch import VARIANTS, evaluate_run, paired_delta, summarize, variant_config
from nanomoe.paths import in_home
from nanomoe.train import TrainConfig

DEFAULTS = dict(quick=False, corpus="machado", source="", tokenizer="char", bpe_vocab=1024, n_layer=2, n_head=4,
                n_embd=64, block_size=128, batch_size=16, steps=600, lr=2e-3, min_lr=2e-4, warmup_steps=30,
                eval_interval=30, eval_iters=8, seeds="0,1,2", variants="all", val_tokens=262144, probe_seqs=64,
                device="auto", out_dir="runs/06", threads=0)
QUICK = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, steps=8, warmup_steps=2, eval_interval=4,
             eval_iters=2, seeds="0", val_tokens=2048, probe_seqs=4, bpe_vocab=320, threads=1)
args = parse_args(DEFAULTS, quick=QUICK, description="Chapter 06's one-switch grid.")
if args.threads > 0:
    torch.set_num_threads(args.threads)
out_dir = in_home(args.out_dir if args.tokenizer == "char" else f"{args.out_dir}/{args.tokenizer}") / "one_switch"
out_dir.mkdir(parents=True, exist_ok=True)
names = list(VARIANTS) if args.variants == "all" else [n.strip() for n in args.variants.split(";")]
seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]

text = read_corpus(args.corpus, source=args.source or None)
if args.quick:
    text = text[:200_000]
tok = regime_tokenizer(args.tokenizer, text, args.bpe_vocab)
train_ids, val_ids = encode_splits(tok, text)
print(f"{args.tokenizer}: {len(train_ids):,} train / {len(val_ids):,} val tokens", flush=True)
shape = dict(vocab_size=tok.vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
             n_embd=args.n_embd, dropout=0.0)
probe = torch.tensor(val_ids[: args.probe_seqs * args.block_size], dtype=torch.long).view(args.probe_seqs, -1)
pieces = [tok.decode([i]) for i in probe.flatten().tolist()]

records, losses, t0 = [], {}, time.perf_counter()
for seed in seeds:
    for name in names:
        cfg, train_kw = variant_config(name, shape)
        tcfg = TrainConfig(**{**dict(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                     min_lr=args.min_lr, warmup_steps=args.warmup_steps,
                                     eval_interval=args.eval_interval, eval_iters=args.eval_iters, weight_decay=0.1,
                                     grad_clip=1.0, seed=seed, device=args.device, sample_tokens=0), **train_kw})
        run = train_variant(name, cfg, tcfg, train_ids, val_ids, probe, cache_dir=out_dir / "treinos", progress=False)
        measures, losses[name, seed] = evaluate_run(run, val_ids, args.block_size, args.val_tokens, probe, pieces)
        rec = {k: run[k] for k in ("name", "seed", "seconds", "tokens_per_s", "hardware", "active", "total")}
        rec.update(measures, cached=run["cached"], micro_batch=tcfg.batch_size, grad_accum=tcfg.grad_accum,
                   history=[{k: h.get(k) for k in ("step", "tokens", "elapsed_s", "val_loss")}
                            for h in run["history"] if h.get("val_loss") is not None])
        for ref in ("base (MoE top-2)", "micro-lotes de 4"):
            if (ref, seed) in losses and ref != name:
                rec.setdefault("paired", {})[ref] = paired_delta(losses[name, seed], losses[ref, seed])
        records.append(rec)
        print(f"{name:32s} seed {seed}  val {rec['val']['mean']:.4f} ± {rec['val']['se_blocks']:.4f}  "
              f"{run['seconds']:.0f} s  ({time.perf_counter() - t0:.0f} s total)", flush=True)
        result = {"args": dict(vars(args)), "regime": args.tokenizer, "vocab_size": tok.vocab_size,
                  "train_tokens": len(train_ids), "val_split_tokens": len(val_ids),
                  "wall_s": time.perf_counter() - t0, "summary": summarize(records), "runs": records}
        (out_dir / "one_switch.json").write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
print(f"done: {len(records)} runs in {time.perf_counter() - t0:.0f} s -> {out_dir / 'one_switch.json'}")
