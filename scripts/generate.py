"""Generate text from any model of the course.

    uv run -m scripts.generate runs/04/latest.pt "Era uma vez"
    uv run -m scripts.generate runs/04 "Era uma vez" --temperature=0.8 --top_k=50 --num_samples=3 --seed=1
    uv run -m scripts.generate hf_export/ "Capitu" --temperature 0          # a folder from nanomoe.interop.hf.export_hf
    uv run -m scripts.generate gpt2 "The future of AI is" --top_p=0.9       # GPT-2 from the hub (internet)
    uv run -m scripts.generate runs/04 "Era uma vez" --int8 --dtype=bfloat16  # int8 weights (chapter 08)

Decoding goes through chapter 08's static KV cache by default on every device (same tokens as
chapter 02's cache; `--no-static` for that one); `--compile` compiles the static decode step
(CUDA graphs on a GPU); `--int8` quantizes the weights to int8 per output channel (off by
default: it changes the numbers a little). The first line says what was chosen.

The text streams to stdout as the tokens arrive; what the script says about the run (which model,
tokens/s, time to first token) goes to stderr, so `> out.txt` keeps only the text. Options follow
the course's one convention (`nanomoe.training.cli`: `--key=value` or `--key value`, dashes or underscores,
`--no-cache`, `--help`). Bad input ends with one line `generate: error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys

import torch

from nanomoe.interop.inference import InferenceError, encode_prompt, generate_text, load_model, warm_up, weights_ref
from nanomoe.tokenizer import TokenizerError
from nanomoe.training.checkpoint import CheckpointError
from nanomoe.training.cli import CLIError, parse_args

DEFAULT_MAX_NEW_TOKENS = 200
DEFAULTS = dict(
    max_new_tokens=None,  # tokens per sample (None: 200, or fewer when that would not fit the context with the cache)
    temperature=1.0,  # softmax temperature; 0 = greedy (always the most likely token)
    top_k=None,  # sample among the k most likely tokens
    top_p=None,  # nucleus sampling: the smallest set of tokens whose probability reaches p
    num_samples=1,  # how many continuations
    seed=None,  # random seed: the same seed gives the same text
    device="auto",  # auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps
    dtype="auto",  # weights dtype (auto: bf16 on Ampere+ GPUs, fp16 on older GPUs, fp32 on CPU)
    threads=None,  # CPU threads for torch (1 is often fastest for small models and on a shared CPU)
    compile=False,  # torch.compile the model (pays off for long runs on a GPU)
    cache=True,  # --no-cache: re-run the whole context at each token (nanoGPT's loop; slides past the context)
    static=True,  # static KV cache (chapter 08), on every device; off with --no-cache
    int8=False,  # int8 weight-only quantization (chapter 08); fast on CPU with --dtype=bfloat16
)
POSITIONALS = {
    "checkpoint": "checkpoint file (.pt) or its out_dir (latest.pt), a nanomoe.interop.hf.export_hf folder, "
                  "a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or hf:ORG/NAME",
    "prompt": 'text to continue ("" starts from <|endoftext|> with GPT-2\'s tokenizer)',
}


def _positive_int(v) -> bool:
    return v is None or (type(v) is int and v >= 1)


CHECKS = {  # option: (test, what a good value is)
    "max_new_tokens": (_positive_int, "an integer >= 1"),
    "temperature": (lambda v: v >= 0, ">= 0 (0 = greedy)"),
    "top_k": (_positive_int, "an integer >= 1"),
    "top_p": (lambda v: v is None or (type(v) in (int, float) and 0 < v <= 1), "in (0, 1]"),
    "num_samples": (lambda v: v >= 1, ">= 1"),
    "threads": (_positive_int, "an integer >= 1"),
    "dtype": (lambda v: v in ("auto", "float32", "bfloat16", "float16"), "one of auto, float32, bfloat16, float16"),
}


def read_options(argv=None):
    """The command line, checked: a bad option raises CLIError with one line."""
    args = parse_args(DEFAULTS, argv, positionals=POSITIONALS,
                      description="Continue a prompt with a chapter-04 checkpoint, a Hugging Face export folder "
                      "or GPT-2.")
    for key, (ok, what) in CHECKS.items():
        if not ok(getattr(args, key)):
            raise CLIError(f"--{key} must be {what}, got {getattr(args, key)!r}")
    if args.int8 and not args.cache:
        raise CLIError("--int8 generates through the static KV cache: drop --no-cache")
    args.static = args.static and args.cache
    if args.int8 and not args.static:
        raise CLIError("--int8 generates through the static KV cache: drop --no-static / --no-cache")
    return args


def _fail(message: str) -> int:
    print(f"generate: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def describe(model, tok) -> str:
    cfg = model.config
    n = model.num_params(non_embedding=False) + sum(  # int8 weights are buffers, not parameters
        b.numel() for name, b in model.named_buffers() if name.endswith("weight_int8"))
    kind = f"MoE {cfg.n_experts} experts top-{cfg.moe_top_k}, " if cfg.n_experts else ""
    w = weights_ref(model)
    return (
        f"{n / 1e6:.2f}M parameters ({kind}{cfg.n_layer} layers, n_embd {cfg.n_embd}, context {cfg.block_size}), "
        f"tokenizer {tok.name} ({tok.vocab_size} ids), {w.device} {str(w.dtype).replace('torch.', '')}"
    )


def main(argv=None) -> int:
    try:
        args = read_options(sys.argv[1:] if argv is None else [str(a) for a in argv])
    except CLIError as e:
        print(f"generate: error: {e} (see --help)", file=sys.stderr)
        raise SystemExit(2) from None
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character shows "?"
    use_cache = args.cache
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        model, tok = load_model(args.checkpoint, device=args.device, dtype=args.dtype, compile=args.compile,
                                int8=args.int8)
        cache = "static KV cache" if args.static else ("KV cache" if use_cache else "no KV cache")
        print(f"[generate] {args.checkpoint}: {describe(model, tok)}, {cache}, int8 {'on' if args.int8 else 'off'}"
              f"{', compiled' if args.compile else ''}", file=sys.stderr)
        n_new = args.max_new_tokens
        if n_new is None:  # the default shrinks to what fits; an explicit value that does not fit is an error
            bs = model.config.block_size
            n_new = DEFAULT_MAX_NEW_TOKENS
            T = len(encode_prompt(tok, args.prompt, bs))
            if use_cache and T + n_new > bs:
                n_new = bs - T
                if n_new < 1:
                    return _fail(
                        f"the prompt ({T} tokens) fills the model's context of {bs} tokens: shorten it, "
                        "or use --no-cache to slide the context window"
                    )
                print(f"[generate] --max_new_tokens {n_new}: what fits in the context of {bs} tokens", file=sys.stderr)
        if args.compile:  # compile now, so the timing below is the compiled model's
            print("[generate] compiling (prefill + 3 decode steps)...", file=sys.stderr, flush=True)
            secs = warm_up(model, tok, args.prompt, n_new, use_cache, static=args.static)
            print(f"[generate] compiled in {secs:.1f} s", file=sys.stderr)
        out = generate_text(
            model, tok, args.prompt, max_new_tokens=n_new, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, num_samples=args.num_samples, seed=args.seed, use_cache=use_cache, stream_to=sys.stdout,
            static=args.static,
        )
    except (InferenceError, CheckpointError, TokenizerError, ValueError) as e:  # all one-line, user-fixable
        sys.stdout.flush()
        return _fail(str(e))
    except KeyboardInterrupt:
        print("\n[generate] interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    print(f"[generate] {out.stats.summary()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
