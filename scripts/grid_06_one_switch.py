"""Chapter 06's one-switch grid: every variant of `nanomoe.course.one_switch.VARIANTS`, each seed, one regime.

    uv run -m scripts.grid_06_one_switch --threads=1                  # characters
    uv run -m scripts.grid_06_one_switch --threads=1 --tokenizer=bpe  # the Portuguese BPE

Writes <out_dir>[/bpe]/one_switch/one_switch.json (rewritten after every run, so a stopped grid keeps
what it did); finished trainings are cached beside it under treinos/ and reused. With `--extend=<json>`
(a recorded grid of the same settings, e.g. docs/results/06/one_switch.json) its runs are kept and
only the (variant, seed) pairs it lacks are trained: `--seeds=0,1,2,3,4,5 --extend=...` adds seeds.
"""

import json
import time
from pathlib import Path

import torch

from nanomoe.course.crossover import regime_tokenizer
from nanomoe.course.one_switch import VARIANTS, run_grid, summarize
from nanomoe.data import encode_splits, read_corpus
from nanomoe.paths import in_home
from nanomoe.training.cli import parse_args

DEFAULTS = dict(quick=False, corpus="machado", source="", tokenizer="char", bpe_vocab=1024, n_layer=2, n_head=4,
                n_embd=64, block_size=128, batch_size=16, steps=300, lr=2e-3, min_lr=2e-4, warmup_steps=30,
                eval_interval=30, eval_iters=8, seeds="0,1,2", variants="all", val_tokens=131072, probe_seqs=64,
                device="auto", out_dir="runs/06", threads=0, extend="")
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
train_kw = dict(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                warmup_steps=args.warmup_steps, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
                weight_decay=0.1, grad_clip=1.0, device=args.device, sample_tokens=0)
t0 = time.perf_counter()
previous, wall_before = [], 0.0
if args.extend:
    old = json.loads(Path(args.extend).read_text(encoding="utf-8"))
    same = ("tokenizer", "n_layer", "n_head", "n_embd", "block_size", "batch_size", "steps", "lr", "val_tokens")
    changed = [k for k in same if old["args"].get(k) != getattr(args, k)]
    if changed:
        raise SystemExit(f"--extend={args.extend} was recorded with other settings ({', '.join(changed)}); "
                         "extend a grid of the same settings")
    previous, wall_before = old["runs"], old["wall_s"]
    print(f"kept {len(previous)} recorded runs of {args.extend}", flush=True)


def save(records: list) -> None:
    r = records[-1]
    print(f"{r['name']:32s} seed {r['seed']}  val {r['val']['mean']:.4f} ± {r['val']['se_blocks']:.4f}  "
          f"{r['seconds']:.0f} s  ({time.perf_counter() - t0:.0f} s total)", flush=True)
    result = {"args": dict(vars(args)), "regime": args.tokenizer, "vocab_size": tok.vocab_size,
              "train_tokens": len(train_ids), "val_split_tokens": len(val_ids),
              "wall_s": wall_before + time.perf_counter() - t0,
              "summary": summarize(records), "runs": records}
    (out_dir / "one_switch.json").write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")


records, _ = run_grid(names, seeds, shape, train_kw, (train_ids, val_ids), probe, pieces, args.val_tokens,
                      cache_dir=out_dir / "treinos", on_record=save, previous=previous)
print(f"done: {len(records)} runs in {time.perf_counter() - t0:.0f} s -> {out_dir / 'one_switch.json'}")
