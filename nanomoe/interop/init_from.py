"""Where a training run's weights start: `--init_from` (nanoGPT's `init_from`, extended).

| init_from | weights |
|---|---|
| `scratch` (default) | random init of the run's config |
| `resume` | the run's own `out_dir/latest.pt`, optimizer and data position included (exact resume, `training.train`) |
| `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl` | OpenAI's GPT-2 from the Hugging Face hub (`hf.from_pretrained`) |
| a folder with `config.json` | a Hugging Face folder (`save_pretrained`, or `nanomoe.interop.hf.export_hf`) |
| a `.pt` file, or a run folder with `latest.pt` | a nanomoe checkpoint (`training.checkpoint`): weights only, new run |

A pretrained source brings its architecture, as nanoGPT's `init_from='gpt2'` does, unless the run
sets an architecture field itself (`explicit`, e.g. n_layer or n_embd from a run config or the
command line): then the run's own config (preset + fields) decides. When the source has the same
architecture, every tensor is loaded exactly (GPT-2's position table cropped to a smaller
block_size, as nanoGPT does). Otherwise chapter 05's `transfer_weights` copies what keeps a
meaning, adapts what can be adapted, initializes the rest, and its report is printed: nothing is
silently left at random init. A run whose vocabulary is padded beyond the source's (GPT-2's 50,257
rows -> 50,304, a multiple of 64 for faster matmuls) keeps the source's rows (`pad_vocab`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..config import GPTConfig
from ..model import GPT
from ..training import checkpoint as ck
from . import hf
from .hf import GPT2_NAMES
from .transfer import TransferReport, transfer_weights

SCRATCH, RESUME = "scratch", "resume"
# Fields that do not change which tensors exist or what they compute at init, or that are compared
# through what they resolve to (widths, key/value heads, block_size: see `architecture_diff`).
_RUNTIME = ("dropout", "attn", "moe_impl", "moe_aux_loss_coef", "moe_z_loss_coef", "moe_min_capacity",
            "moe_bias_update_rate", "moe_capacity_factor", "block_size", "mlp_multiple_of", "mlp_hidden",
            "moe_hidden", "n_kv_head")


class InitError(ValueError):
    """--init_from names something that cannot be loaded; the message says what to pass."""


def describe() -> str:
    return ("--init_from takes scratch, resume, a GPT-2 name (" + ", ".join(GPT2_NAMES) + "), a Hugging Face folder "
            "(with config.json), or a nanomoe checkpoint (.pt file or run folder with latest.pt)")


def load_source(init_from: str) -> GPT:
    """The pretrained model `init_from` names, on CPU in float32 (see the module docstring)."""
    path = Path(init_from).expanduser()
    if (path.is_dir() and (path / "config.json").is_file()) or init_from in GPT2_NAMES:
        try:  # (nanomoe.interop.hf imports transformers only inside its functions)
            return hf.from_pretrained(str(path) if path.is_dir() else init_from)
        except hf.HFConversionError as e:
            raise InitError(f"--init_from={init_from}: " + " ".join(str(e).split())) from None
    if path.is_file() or (path.is_dir() and (path / ck.LATEST).is_file()):
        try:
            return ck.model_from_checkpoint(ck.load_checkpoint(path))
        except ck.CheckpointError as e:
            raise InitError(f"--init_from={init_from}: {e}") from None
    raise InitError(f"--init_from={init_from!r} not found: {describe()}")


def architecture_diff(src: GPTConfig, dst: GPTConfig) -> list[str]:
    """Why `src`'s weights cannot be loaded exactly into `dst` (empty list: they can)."""
    out = [f"{k}: source {getattr(src, k)!r}, run {getattr(dst, k)!r}"
           for k in src.to_dict() if k not in _RUNTIME and getattr(src, k) != getattr(dst, k)]
    if src.kv_heads != dst.kv_heads:  # n_kv_head=None and n_kv_head=n_head are the same attention
        out.append(f"key/value heads: source {src.kv_heads}, run {dst.kv_heads}")
    if not out and src.hidden_dim != dst.hidden_dim:  # same switches: the widths must agree too
        out.append(f"MLP width: source {src.hidden_dim}, run {dst.hidden_dim}")
    if not out and dst.n_experts and src.expert_hidden_dim != dst.expert_hidden_dim:
        out.append(f"expert width: source {src.expert_hidden_dim}, run {dst.expert_hidden_dim}")
    if dst.pos_emb == "learned" and dst.block_size > src.block_size:
        out.append(f"block_size: the source learned {src.block_size} positions, the run needs {dst.block_size}")
    return out


@torch.no_grad()
def _load_exact(src: GPT, dst: GPT) -> None:
    state = src.state_dict()
    if "transformer.wpe.weight" in state:  # nanoGPT's crop: keep the first block_size positions
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][: dst.config.block_size]
    dst.load_state_dict(state, strict=True)


@torch.no_grad()
def pad_vocab(src: GPT, dst: GPT) -> GPT:
    """`src` with its token rows (wte, and lm_head when untied) grown to dst's vocab_size: the
    source's rows copied, the extra rows taken from dst's own init. A vocabulary padded to a
    multiple of 64 (nanoGPT's 50,257 -> 50,304, for faster matmuls) is the same tokenizer: the
    extra ids never occur in the data, so only the softmax sees them."""
    V, own = dst.config.vocab_size, dst.state_dict()
    state = src.state_dict()
    for key in ("transformer.wte.weight", "lm_head.weight"):
        if key in state:
            rows = own[key].clone()
            rows[: src.config.vocab_size] = state[key]
            state[key] = rows
    grown = GPT(src.config.replace(vocab_size=V))
    grown.load_state_dict(state, strict=True)
    return grown


def architecture_fields() -> set[str]:
    """The GPTConfig fields that decide which tensors exist (all but the runtime ones and vocab_size)."""
    return set(GPTConfig().to_dict()) - set(_RUNTIME) - {"vocab_size"}


def source_config(src: GPTConfig, run: GPTConfig, explicit: set[str]) -> GPTConfig:
    """The source's architecture with the run's runtime settings: dropout and the implementation
    switches always, block_size when the run sets it, a vocabulary padded to the run's when larger."""
    keep = {k: getattr(run, k) for k in _RUNTIME if k in explicit and k not in ("mlp_hidden", "moe_hidden",
                                                                               "mlp_multiple_of", "n_kv_head")}
    keep.setdefault("dropout", run.dropout)
    return src.replace(vocab_size=max(src.vocab_size, run.vocab_size), **keep)


def init_model(init_from: str, config: GPTConfig, *, verbose: bool = True,
               explicit: Optional[set[str]] = None) -> tuple[GPT, Optional[TransferReport]]:
    """The model a run starts from: GPT(config) with its weights taken from `init_from`.
    explicit: the config fields the run set itself; when none of them is an architecture field, a
    pretrained source's architecture is used (None: the run's config always decides).
    Returns (model, transfer report or None when the load was exact or there was no source).
    The random init is drawn first in every case, so call torch.manual_seed before."""
    if init_from in (SCRATCH, RESUME, "", None):
        return GPT(config), None
    if explicit is None or explicit & architecture_fields():
        model = GPT(config)  # the run's init is drawn before the source is loaded (same random tensors as before)
        src = load_source(init_from)
    else:
        src = load_source(init_from)
        config = source_config(src.config, config, explicit)
        model = GPT(config)
        if verbose:
            print(f"init_from {init_from}: the run sets no architecture field, so it takes the source's "
                  f"({config.n_layer} layers, {config.n_embd} wide, {config.n_head} heads)")
    padded = ""
    if config.vocab_size > src.config.vocab_size and src.config.n_embd == config.n_embd:
        padded = f" (vocabulary padded from {src.config.vocab_size:,} to {config.vocab_size:,} rows: new rows at init)"
        src = pad_vocab(src, model)
    diffs = architecture_diff(src.config, config)
    if not diffs:
        _load_exact(src, model)
        if verbose:
            n = sum(p.numel() for p in model.parameters())
            print(f"init_from {init_from}: every tensor loaded exactly ({n / 1e6:.2f}M parameters){padded}")
        return model, None
    report = transfer_weights(src, model)
    if verbose:
        print(f"init_from {init_from}{padded}: the architecture differs ({'; '.join(diffs)}),\n"
              f"so the weights go through chapter 05's partial transfer:\n{report}")
    return model, report
