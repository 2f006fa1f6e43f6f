"""Text generation from any model of the course, with one call each for loading and generating.

    model, tok = load_model("runs/04/latest.pt")          # or an HF export folder, or "gpt2"
    out = generate_text(model, tok, "Era uma vez", max_new_tokens=100, stream_to=sys.stdout)
    out[0]            # the prompt and its continuation
    out.stats         # time to first token, tokens/s

`load_model` accepts:
- a checkpoint file written by chapter 04's training (`nanomoe.training.checkpoint`), or the `out_dir` that
  holds it (latest.pt, else best.pt);
- a folder written by `nanomoe.interop.hf.export_hf` (config.json + safetensors + nanomoe_tokenizer.json);
- a GPT-2 name ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl") or "hf:ORG/NAME" for another hub
  model: downloaded by Hugging Face (needs internet the first time, then it is cached).
The tokenizer always comes from the source's own metadata (char alphabet, trained BPE file,
GPT-2, Hugging Face name), so nothing about it is passed by hand.

`generate_text` streams the text while the tokens arrive. A byte-level BPE token can hold half of
a UTF-8 character ("ã" is two bytes, and GPT-2 may put them in two tokens), so decoding token by
token would print garbage. `StreamDecoder` decodes a small window of recent tokens and prints only
the new text once it no longer ends in an incomplete character (the "prefix/read offset" scheme of
Hugging Face text-generation-inference and vLLM).
"""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, TextIO
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, try_to_load_from_cache

from ..device import pick_device, pick_dtype
from ..model import GPT
from ..model import check_fits as model_check_fits
from ..quantize import check_int8, quantize_model_int8
from ..sampling import check_sampling_args
from ..static_cache import StaticKVCache, compile_step, new_static_cache, static_stream, use_matvec_linears
from ..tokenizer import Tokenizer, TokenizerError, load_tokenizer
from ..training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from . import hf
from .hf import GPT2_NAMES

# File names looked for, in this order, when the source is a training out_dir.
CHECKPOINT_NAMES = ("latest.pt", "best.pt", "ckpt.pt")
REPLACEMENT = "\ufffd"  # what a decoder prints for an incomplete or invalid UTF-8 sequence


class InferenceError(ValueError):
    """Bad input for loading or generation; the message says what to change (one line)."""


# ---- loading -------------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


def _describe_sources() -> str:
    return (
        "give a chapter-04 checkpoint (.pt) or its out_dir, a folder written by nanomoe.interop.hf.export_hf, "
        f"a GPT-2 name ({', '.join(GPT2_NAMES)}) or hf:ORG/NAME for another Hugging Face model"
    )


def _find_checkpoint(folder: Path) -> Path:
    for name in CHECKPOINT_NAMES:
        if (folder / name).is_file():
            return folder / name
    pts = sorted(folder.glob("*.pt"))
    if len(pts) == 1:
        return pts[0]
    if pts:
        raise InferenceError(
            f"{folder} holds several checkpoints ({', '.join(p.name for p in pts)}): pass the file you want"
        )
    raise InferenceError(f"{folder} holds no checkpoint (.pt) and no Hugging Face config.json: {_describe_sources()}")


def _load_checkpoint_file(path: Path) -> tuple[GPT, Tokenizer]:
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive (b"PK\x03\x04"); very old PyTorch wrote a pickle (b"\x80").
    if magic and not (magic.startswith(b"PK\x03\x04") or magic.startswith(b"\x80")):
        raise InferenceError(
            f"{path} is not a PyTorch checkpoint (not a file written by torch.save): {_describe_sources()}"
        )
    try:
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt)
    except CheckpointError as e:
        raise InferenceError(_one_line(e)) from None
    except Exception as e:  # anything torch.load or the state dict can throw
        why = f"{type(e).__name__}: {_one_line(e)}"
        raise InferenceError(f"{path} is not a usable nanomoe checkpoint ({why})") from None
    info = ckpt.get("tokenizer")
    if not info:
        raise InferenceError(
            f"{path} does not say which tokenizer it was trained with (no 'tokenizer' entry): "
            "save checkpoints with nanomoe.training.train so the tokenizer travels with the weights"
        )
    return model, _tokenizer_from_info(info, path.parent, path)


def _tokenizer_from_info(info: dict, base_dir: Path, owner: Path) -> Tokenizer:
    """Rebuild the tokenizer a checkpoint/folder names, with a clear error when its files are gone."""
    name, rel = info.get("name"), info.get("path")
    if name == "bpe":
        p = Path(rel) if rel else None
        # a relative path is relative to the checkpoint's folder, never to the current directory
        if p is None or not (p.exists() if p.is_absolute() else (base_dir / p).exists()):
            raise InferenceError(
                f"{owner} was trained with a BPE tokenizer whose file is missing ({rel or 'no path recorded'}, "
                f"looked in {base_dir}): copy its tokenizer.json next to the checkpoint"
            )
    try:
        return load_tokenizer(info, base_dir)
    except TokenizerError as e:
        raise InferenceError(f"cannot rebuild the tokenizer of {owner}: {_one_line(e)}") from None


def _load_hf_folder(folder: Path) -> tuple[GPT, Tokenizer]:
    try:
        model, tok = hf.load_hf(folder)
    except hf.HFConversionError as e:
        raise InferenceError(" ".join(str(e).split())) from None
    except TokenizerError as e:
        raise InferenceError(f"cannot rebuild the tokenizer of {folder}: {_one_line(e)}") from None
    except Exception as e:  # a broken config.json or safetensors file
        why = f"{type(e).__name__}: {_one_line(e)}"
        raise InferenceError(f"cannot load the Hugging Face folder {folder} ({why})") from None
    if tok is None:  # a plain save_pretrained folder: use its Hugging Face tokenizer files
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            tok = _tokenizer_from_info({"name": "hf", "path": str(folder)}, folder, folder)
        else:
            raise InferenceError(
                f"{folder} has weights but no tokenizer ({hf.TOKENIZER_INFO_FILE} or tokenizer.json): "
                "export it with nanomoe.interop.hf.export_hf(model, folder, tokenizer)"
            )
    return model, tok


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a connection to the Hugging Face hub? (A quick check, so that offline we fail
    in a second with a clear message instead of after transformers' minute of retries.)"""
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub(name: str) -> tuple[GPT, Tokenizer]:
    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError as e:  # huggingface_hub's HFValidationError: not a valid repo id
        raise InferenceError(f"{name!r} is not a valid Hugging Face model name ({_one_line(e)})") from None
    if not cached and not _hub_reachable():
        raise InferenceError(
            f"{name!r} is not in the Hugging Face cache and the hub cannot be reached (offline?): "
            "downloading it needs internet once (then it is cached); or pass a local checkpoint or folder"
        )
    try:
        model = hf.from_pretrained(name)
    except hf.HFConversionError as e:  # unknown name, no access, weights that do not fit
        raise InferenceError(" ".join(str(e).split())) from None
    info = {"name": "gpt2"} if name in GPT2_NAMES else {"name": "hf", "path": name}
    return model, _tokenizer_from_info(info, Path("."), Path(name))


def load_model(
    source: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    compile: bool = False,
    int8: bool = False,
) -> tuple[GPT, Tokenizer]:
    """Load a model and its tokenizer for generation, in eval mode on `device`.

    source: a chapter-04 checkpoint file or its out_dir, a Hugging Face export folder, a GPT-2
    name or "hf:ORG/NAME" (see the module docstring). device: "auto" | "cpu" | "cuda" | "mps".
    dtype: "auto" (bf16 on Ampere+ GPUs, fp16 on older ones, fp32 on CPU/MPS), "float32",
    "bfloat16" or "float16": the weights are cast to it (no autocast needed for inference).
    compile: torch.compile the per-token computation (worth it on GPUs, for long generations).
    int8: quantize the weights to int8 per output channel (`nanomoe.quantize`, chapter 08); such a
    model generates through the static cache (`generate_text(..., static=True)`).
    Raises InferenceError with a one-line message for anything the user can fix."""
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    if int8:
        try:
            check_int8(dev, dt)
        except ValueError as e:
            raise InferenceError(str(e)) from None
    src = str(source)
    path = Path(src).expanduser()
    if path.is_file():
        model, tok = _load_checkpoint_file(path)
    elif path.is_dir():
        if (path / "config.json").is_file():
            model, tok = _load_hf_folder(path)
        else:
            model, tok = _load_checkpoint_file(_find_checkpoint(path))
    elif src in GPT2_NAMES or src.startswith("hf:"):
        model, tok = _load_hub(src[3:] if src.startswith("hf:") else src)
    else:
        raise InferenceError(f"{src} not found: {_describe_sources()}")

    if tok.vocab_size > model.config.vocab_size:
        raise InferenceError(
            f"the tokenizer has {tok.vocab_size} ids but the model only {model.config.vocab_size}: "
            "they do not belong together"
        )
    to_inference_dtype(model.to(device=dev), dt).eval()
    if int8:
        quantize_model_int8(model)
    if compile:
        compile_for_generation(model)
    return model, tok


def weights_ref(model: GPT) -> torch.Tensor:
    """A tensor with the model's device and compute dtype (an int8 model has no float wte.weight)."""
    head = model.lm_head
    return head.scales if hasattr(head, "scales") else head.weight


def to_inference_dtype(model: GPT, dtype: torch.dtype) -> GPT:
    """Cast `model`'s weights to `dtype` in place, keeping the RoPE tables in fp32 (positions near
    block_size need more than fp16's 11 bits of mantissa); returns the model."""
    model.to(dtype=dtype)
    if dtype != torch.float32 and hasattr(model, "rope_cos"):
        model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()
    return model


def compile_for_generation(model: GPT) -> GPT:
    """torch.compile the model's per-token computation (`hidden_states`), in place.

    `stream` calls `self.hidden_states` for the prefill and for every decode step; the compiled
    version fuses the small kernels of each layer. The first prompt compiles twice (prefill, then
    decode); when the cache position changes, torch.compile marks it dynamic instead of compiling
    once per position ("automatic dynamic shapes"), so later tokens reuse the same graph. Worth it
    for long generations on a GPU; the compilation itself takes tens of seconds."""
    model.hidden_states = torch.compile(model.hidden_states)  # instance attribute shadows the method
    use_matvec_linears(model)  # one-row products as reductions inside the compiled step (chapter 08)
    model.compiled_step = compile_step(weights_ref(model).device.type)  # the static cache's step (chapter 08)
    return model


def warm_up(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, use_cache: bool = True,
            steps: int = 3, static: bool = False) -> float:
    """Run the prefill and the first `steps` decode steps once, with the same shapes as the real
    generation (same prompt, same cache size), and return the seconds it took. For a compiled
    model that is the compilation (prefill, first decode step, then the step where the position
    becomes dynamic), so the timed generation that follows measures the compiled speed."""
    ids = encode_prompt(tokenizer, prompt, model.config.block_size)
    check_fits(len(ids), max_new_tokens, model.config.block_size, use_cache)
    idx = torch.tensor([ids], dtype=torch.long, device=weights_ref(model).device)
    t0 = time.perf_counter()
    if static:
        it = static_stream(model, idx, max_new_tokens, temperature=0, step=getattr(model, "compiled_step", None))
    else:
        it = model.stream(idx, max_new_tokens, temperature=0, use_cache=use_cache)
    for _, nxt in zip(range(min(steps, max_new_tokens)), it):
        nxt.item()
    it.close()
    return time.perf_counter() - t0


# ---- streaming decode -----------------------------------------------------------------------------


class StreamDecoder:
    """Turns token ids, fed one at a time, into text pieces that are safe to print.

    Decoding each token alone breaks on tokens that hold part of a UTF-8 character, and on
    tokenizers whose decode of a lone token drops its leading space (SentencePiece). So we decode
    a short window: ids[prefix:read] were already printed and ids[read:] not yet; the new text is
    decode(ids[prefix:]) minus decode(ids[prefix:read]), emitted only when it does not end in an
    incomplete character (shown by decoders as U+FFFD). Each step costs O(window), not O(length)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], context: int = 4):
        self.tok = tokenizer
        self.ids = [int(i) for i in prompt_ids]
        self.prefix = max(0, len(self.ids) - context)
        self.read = len(self.ids)
        self.pieces: list[str] = []

    def _pending(self) -> str:
        done = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        # Byte-level decoders are prefix-stable (text starts with done); if a tokenizer's clean-up
        # ever rewrites earlier text, we still only print what is new by length.
        return text[len(done) :]

    def push(self, token_id: int) -> str:
        """Add one token id; return the text that became printable ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        piece = self._pending()
        if not piece or piece.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        self.pieces.append(piece)
        return piece

    def flush(self) -> str:
        """At the end of generation: return whatever is still held back (even an incomplete character)."""
        if self.read == len(self.ids):
            return ""
        piece = self._pending()
        self.prefix, self.read = self.read, len(self.ids)
        self.pieces.append(piece)
        return piece

    @property
    def text(self) -> str:
        """Everything emitted so far (the continuation, without the prompt)."""
        return "".join(self.pieces)


# ---- generation -----------------------------------------------------------------------------------


@dataclass
class GenerationStats:
    """Timing of one `generate_text` call (all samples)."""

    num_samples: int
    prompt_tokens: int
    new_tokens: int  # per sample
    seconds: float  # wall time of all samples, prefill included
    ttft_s: float  # time to first token, mean over samples: prompt prefill + first sampling step
    decode_s: float  # time after the first token, summed over samples
    use_cache: bool
    device: str
    dtype: str
    static: bool = False
    int8: bool = False

    @property
    def tokens_per_s(self) -> float:
        """End-to-end speed: all generated tokens over all the time (prefill included)."""
        return self.num_samples * self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> Optional[float]:
        """Steady-state speed: tokens after the first over the time after the first."""
        n = self.num_samples * (self.new_tokens - 1)
        return n / self.decode_s if n > 0 and self.decode_s > 0 else None

    def summary(self) -> str:
        s = "" if self.num_samples == 1 else f" ({self.num_samples} samples)"
        dec = self.decode_tokens_per_s
        dec = f" (decode {dec:.1f} tokens/s)" if dec is not None else ""
        cache = ("KV cache on (static)" if self.static else "KV cache on") if self.use_cache else "KV cache off"
        cache += ", int8 weights" if self.int8 else ""
        return (
            f"{self.num_samples * self.new_tokens} tokens in {self.seconds:.2f} s{s}: "
            f"{self.tokens_per_s:.1f} tokens/s{dec}, time to first token {1000 * self.ttft_s:.1f} ms "
            f"| prompt {self.prompt_tokens} tokens | {cache} | {self.device} {self.dtype}"
        )


class Generations(list):
    """The generated texts (prompt + continuation, one per sample), with `.stats` and
    `.continuations` (the generated text alone)."""

    stats: GenerationStats
    continuations: list[str]


def encode_prompt(tokenizer: Tokenizer, prompt: str, block_size: int) -> list[int]:
    """Prompt -> token ids, with clear errors: unknown characters, too long for the context.
    An empty prompt starts from the end-of-text token when the tokenizer has one (GPT-2)."""
    if not isinstance(prompt, str):
        raise InferenceError(f"the prompt must be a str, got {type(prompt).__name__}")
    if prompt == "":
        eot = getattr(tokenizer, "eot", None)
        if eot is None:
            raise InferenceError("the prompt is empty: give at least one character to continue")
        return [eot]
    try:
        ids = tokenizer.encode(prompt)
    except TokenizerError as e:
        raise InferenceError(f"cannot encode the prompt: {_one_line(e)}") from None
    if not ids:
        raise InferenceError("the prompt encodes to no tokens: give some text to continue")
    if len(ids) > block_size:
        raise InferenceError(
            f"the prompt is {len(ids)} tokens long but the model's context (block_size) is {block_size} "
            f"tokens: shorten the prompt to at most {block_size} tokens"
        )
    return ids


def check_fits(prompt_tokens: int, max_new_tokens: int, block_size: int, use_cache: bool) -> None:
    """`nanomoe.model.check_fits` as an InferenceError (prompt + new tokens must fit the KV cache)."""
    try:
        model_check_fits(prompt_tokens, max_new_tokens, block_size, use_cache)
    except ValueError as e:
        raise InferenceError(str(e)) from None


@contextmanager
def _only_tokenizer_ids(model: GPT, n_ids: int):
    """The model's vocabulary is often padded (GPT-2's 50257 ids -> 50304, a multiple of 64, for
    speed): those extra ids are never trained and the tokenizer cannot decode them, so their
    logits are set to -inf while generating (through a hook on lm_head, removed afterwards)."""
    if n_ids >= model.config.vocab_size:
        yield
        return

    def mask(_module, _inputs, logits):
        return logits.index_fill(-1, torch.arange(n_ids, logits.size(-1), device=logits.device), float("-inf"))

    handle = model.lm_head.register_forward_hook(mask)
    try:
        yield
    finally:
        handle.remove()


def _stream_sample(tokens: Iterator[torch.Tensor], dec: StreamDecoder,
                   stream_to: Optional[TextIO]) -> tuple[float, float]:
    """Decode one sample's tokens as they arrive (printing the safe pieces to `stream_to`); returns
    the times of its first and last token."""
    t_first = None
    for nxt in tokens:
        piece = dec.push(nxt.item())  # .item() waits for the GPU: the token is really there
        if t_first is None:
            t_first = time.perf_counter()
        if piece and stream_to is not None:
            stream_to.write(piece)
            stream_to.flush()
    t_end = time.perf_counter()
    rest = dec.flush()
    if stream_to is not None:
        stream_to.write(rest + "\n")
        stream_to.flush()
    return t_first, t_end


def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    num_samples: int = 1,
    seed: Optional[int] = None,
    use_cache: bool = True,
    stream_to: Optional[TextIO] = None,
    static: bool = False,
) -> Generations:
    """Continue `prompt` num_samples times; return the texts (prompt + continuation).

    temperature 0 is greedy (deterministic); otherwise sampling with optional top-k / top-p,
    reproducible when `seed` is given. use_cache=False re-runs the whole context at every step
    (nanoGPT's loop; slides a block_size window, so it can go past block_size). stream_to: a
    file such as sys.stdout that receives the text as the tokens arrive. static: decode through
    chapter 08's static cache (with the model's compiled step when `compile_for_generation` made
    one). The result is a list of str with `.stats` (GenerationStats: time to first token,
    tokens/s) and `.continuations`."""
    int8 = _check_generation(model, temperature, top_k, top_p, max_new_tokens, num_samples, static and use_cache)
    bs = model.config.block_size
    ids = encode_prompt(tokenizer, prompt, bs)
    T = len(ids)
    check_fits(T, max_new_tokens, bs, use_cache)
    device = weights_ref(model).device
    dtype = str(weights_ref(model).dtype).replace("torch.", "")
    cache: Optional[StaticKVCache] = new_static_cache(model, 1, T + max_new_tokens) if static and use_cache else None
    generator = torch.Generator(device=device).manual_seed(int(seed)) if seed is not None else None
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    texts, conts = Generations(), []
    ttfts, decode_s = [], 0.0
    t_start = time.perf_counter()
    with _only_tokenizer_ids(model, tokenizer.vocab_size):
        for s in range(num_samples):
            if stream_to is not None:
                _stream_header(stream_to, prompt, s, num_samples)
            dec = StreamDecoder(tokenizer, ids)
            t0 = time.perf_counter()
            if cache is not None:
                tokens = static_stream(model, idx, max_new_tokens, temperature, top_k, top_p, generator, cache=cache,
                                       step=getattr(model, "compiled_step", None))
            else:
                tokens = model.stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator)
            t_first, t_end = _stream_sample(tokens, dec, stream_to)
            ttfts.append(t_first - t0)
            decode_s += t_end - t_first
            texts.append(prompt + dec.text)
            conts.append(dec.text)
    texts.continuations = conts
    texts.stats = GenerationStats(
        num_samples=num_samples, prompt_tokens=T, new_tokens=max_new_tokens, seconds=time.perf_counter() - t_start,
        ttft_s=sum(ttfts) / len(ttfts), decode_s=decode_s, use_cache=use_cache, device=str(device), dtype=dtype,
        static=cache is not None, int8=int8)
    return texts


def _check_generation(model: GPT, temperature, top_k, top_p, max_new_tokens, num_samples, static_cache: bool) -> bool:
    """generate_text's arguments, each refused with one clear InferenceError; returns whether the
    model's weights are int8 (which decode only through the static KV cache)."""
    check_sampling_args(temperature, top_k, top_p)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InferenceError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise InferenceError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    int8 = getattr(model, "quantization", None) == "int8"
    if int8 and not static_cache:
        raise InferenceError("int8 weights generate through the static KV cache: drop --no-static / --no-cache")
    return int8


def _stream_header(stream_to: TextIO, prompt: str, s: int, num_samples: int) -> None:
    """Before sample s: a separator line when there are several samples, then the prompt."""
    if num_samples > 1:
        stream_to.write(f"{'' if s == 0 else chr(10)}--- sample {s + 1}/{num_samples} ---\n")
    stream_to.write(prompt)
    stream_to.flush()
