"""Generate text from any model of the course.

    uv run -m scripts.generate runs/04/latest.pt "Era uma vez"
    uv run -m scripts.generate runs/04 "Era uma vez" --temperature 0.8 --top-k 50 --num-samples 3 --seed 1
    uv run -m scripts.generate hf_export/ "Capitu" --temperature 0          # a folder from nanomoe.hf.export_hf
    uv run -m scripts.generate gpt2 "The future of AI is" --top-p 0.9       # GPT-2 from the hub (internet)

The text streams to stdout as the tokens arrive; what the script says about the run (which model,
tokens/s, time to first token) goes to stderr, so `> out.txt` keeps only the text. Bad input ends
with one line `generate: error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_MAX_NEW_TOKENS = 200


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        self.exit(2, f"generate: error: {message} (see --help)\n")


def _positive_int():
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
        return v

    return parse


def _float_in(ok, what: str):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {v:g}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="uv run -m scripts.generate",
        description="Continue a prompt with a chapter-04 checkpoint, a Hugging Face export folder or GPT-2.",
    )
    p.add_argument(
        "checkpoint",
        help="checkpoint file (.pt) or its out_dir (latest.pt), a nanomoe.hf.export_hf folder, "
        "a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or hf:ORG/NAME",
    )
    p.add_argument("prompt", help='text to continue ("" starts from <|endoftext|> with GPT-2\'s tokenizer)')
    p.add_argument(
        "--max-new-tokens", type=_positive_int(), default=None,
        help=f"tokens to generate per sample (default {DEFAULT_MAX_NEW_TOKENS}, or fewer when that would not "
        "fit in the model's context with the KV cache)",
    )
    p.add_argument(
        "--temperature", type=_float_in(lambda v: v >= 0, ">= 0 (0 = greedy)"), default=1.0,
        help="softmax temperature; 0 = greedy (always the most likely token), default 1.0",
    )
    p.add_argument("--top-k", type=_positive_int(), default=None, help="sample among the k most likely tokens")
    p.add_argument(
        "--top-p", type=_float_in(lambda v: 0 < v <= 1, "in (0, 1]"), default=None,
        help="nucleus sampling: the smallest set of tokens whose probability reaches p",
    )
    p.add_argument("--num-samples", type=_positive_int(), default=1, help="how many continuations")
    p.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype (auto: bf16 on Ampere+ GPUs, fp16 on older GPUs, fp32 on CPU)",
    )
    p.add_argument(
        "--threads", type=_positive_int(), default=None,
        help="CPU threads for torch (default: torch's choice; 1 is often fastest for small models, "
        "and on a CPU shared with other jobs)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off for long runs on a GPU)")
    p.add_argument(
        "--no-cache", action="store_true",
        help="no KV cache: re-run the whole context at each token (nanoGPT's loop; slides past the context)",
    )
    return p


def _fail(message: str) -> int:
    print(f"generate: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def describe(model, tok) -> str:
    cfg = model.config
    n = model.num_params(non_embedding=False)
    kind = f"MoE {cfg.n_experts} experts top-{cfg.moe_top_k}, " if cfg.n_experts else ""
    w = model.transformer.wte.weight
    return (
        f"{n / 1e6:.2f}M parameters ({kind}{cfg.n_layer} layers, n_embd {cfg.n_embd}, context {cfg.block_size}), "
        f"tokenizer {tok.name} ({tok.vocab_size} ids), {w.device} {str(w.dtype).replace('torch.', '')}"
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character shows "?"

    # Imported after parsing so that --help and option errors answer at once.
    from nanomoe.checkpoint import CheckpointError
    from nanomoe.inference import InferenceError, encode_prompt, generate_text, load_model, warm_up
    from nanomoe.tokenizer import TokenizerError

    use_cache = not args.no_cache
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        model, tok = load_model(args.checkpoint, device=args.device, dtype=args.dtype, compile=args.compile)
        print(f"[generate] {args.checkpoint}: {describe(model, tok)}", file=sys.stderr)
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
                print(f"[generate] --max-new-tokens {n_new}: what fits in the context of {bs} tokens", file=sys.stderr)
        if args.compile:  # compile now, so the timing below is the compiled model's
            print("[generate] compiling (prefill + 3 decode steps)...", file=sys.stderr, flush=True)
            secs = warm_up(model, tok, args.prompt, n_new, use_cache)
            print(f"[generate] compiled in {secs:.1f} s", file=sys.stderr)
        out = generate_text(
            model, tok, args.prompt, max_new_tokens=n_new, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, num_samples=args.num_samples, seed=args.seed, use_cache=use_cache, stream_to=sys.stdout,
        )
    except (InferenceError, CheckpointError, TokenizerError, ValueError) as e:
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
