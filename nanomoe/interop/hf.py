"""Hugging Face `transformers` <-> nanomoe, exactly, both ways (chapter 05).

Three families of the course map onto three `transformers` architectures (nanomoe config ->
transformers class: what differs in storage):

- GPT-2 preset (learned positions, LayerNorm, GELU-tanh, MHA) -> `GPT2LMHeadModel`: GPT-2's
  `Conv1D` stores weights as (in, out): transpose into `nn.Linear` (out, in).
- modern dense (RoPE, RMSNorm, SwiGLU, MHA/GQA/MQA) -> `LlamaForCausalLM`: fused `c_attn` rows
  [q; k; v] <-> `q_proj`/`k_proj`/`v_proj`; `c_fc` rows [gate; up] <-> `gate_proj`/`up_proj`.
- modern MoE (every layer MoE, top-k renormalized) -> `MixtralForCausalLM`: experts `c_fc`
  (E, C, 2H), y = x @ W <-> `gate_up_proj` (E, 2H, C), y = x @ W^T.

Our RoPE is the rotate-half convention HF Llama uses, so q/k weights need no permutation.

    from nanomoe.interop.hf import from_pretrained, to_hf, from_hf, export_hf, load_hf
    model = from_pretrained("gpt2")          # hub (needs internet once) or a local folder
    hf_model = to_hf(model)                  # GPT2LMHeadModel / LlamaForCausalLM / MixtralForCausalLM
    export_hf(model, "out/my-model", tok)    # folder that AutoModelForCausalLM.from_pretrained loads
    model, tok = load_hf("out/my-model")

Every conversion builds the target's state dict and loads it with a strict check of names and
shapes, so nothing is silently left at its random init (the classic "transfer" bug: a
`load_state_dict(strict=False)` that copies almost nothing). Configs that one family cannot
express (soft-capping, shared experts, capacity dropping, ...) are refused with an error that
names the switch.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from ..config import GPTConfig
from ..model import GPT
from ..parallel.distributed import unwrap
from ..tokenizer import TIKTOKEN_GPT2_FILES, load_tokenizer

# transformers is imported inside the functions that need it: it is heavy (seconds to import), and
# chapters 01-04 and the training loop never need it.

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
FAMILIES = ("gpt2", "llama", "mixtral")
TOKENIZER_INFO_FILE = "nanomoe_tokenizer.json"
CONFIG_FILE = "nanomoe_config.json"

# Fields that do not change the function the weights compute; `from_hf` accepts them as overrides
# and `load_hf` restores them from nanomoe_config.json.
RUNTIME_FIELDS = (
    "dropout",
    "attn",
    "block_size",
    "mlp_multiple_of",
    "moe_impl",
    "moe_aux_loss_coef",
    "moe_z_loss_coef",
    "moe_min_capacity",
    "moe_bias_update_rate",
    "moe_balance_scope",  # where the training loss counts f_i: the forward is the same
)


class HFConversionError(ValueError):
    """A model or folder cannot be converted; the message says which switch or tensor and what to do."""


# ---- small utilities ---------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' progress bars and load reports (we check loading ourselves)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Copy `state` into `module`, requiring exactly its tensors with exactly its shapes."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [(k, _shape(state[k]), _shape(own[k])) for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        lines = [f"cannot load {what}:"]
        lines += [f"  missing tensor {k} (expected shape {_shape(own[k])})" for k in missing]
        lines += [f"  unexpected tensor {k} {_shape(state[k])}" for k in unexpected]
        lines += [f"  tensor {k} has shape {f} but the config expects {e}" for k, f, e in wrong]
        raise HFConversionError("\n".join(lines))
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state[k].to(p.dtype))


def _hidden_or_none(cfg: GPTConfig, hidden: int) -> GPTConfig:
    """Store mlp_hidden as None when the preset rule gives that width anyway (cleaner configs)."""
    return cfg.replace(mlp_hidden=None) if cfg.replace(mlp_hidden=None).hidden_dim == hidden else cfg


def _check_overrides(overrides: dict[str, Any]) -> None:
    bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise HFConversionError(
            f"cannot override {bad} when loading weights: they change the architecture the weights "
            f"were trained for. Overridable fields: {list(RUNTIME_FIELDS)}"
        )


# ---- which family -------------------------------------------------------------------------------


def _mismatches(cfg: GPTConfig, family: str) -> list[str]:
    """The switches of `cfg` that `family` cannot express (empty list = exportable)."""
    out = []
    if cfg.logit_softcap is not None:
        out.append(f"logit_softcap={cfg.logit_softcap} (no soft-capping in {family}; set logit_softcap=None)")
    if family == "gpt2":
        want = dict(pos_emb="learned", norm="layernorm", mlp="gelu")
        out += [f"{k}={getattr(cfg, k)!r} (GPT-2 needs {k}={v!r})" for k, v in want.items() if getattr(cfg, k) != v]
        if cfg.kv_heads != cfg.n_head:
            out.append(f"n_kv_head={cfg.n_kv_head} (GPT-2 is multi-head attention: n_kv_head=None)")
        if cfg.n_experts:
            out.append(f"n_experts={cfg.n_experts} (GPT-2 is dense: n_experts=0)")
        return out
    want = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu")
    out += [f"{k}={getattr(cfg, k)!r} ({family} needs {k}={v!r})" for k, v in want.items() if getattr(cfg, k) != v]
    if family == "llama":
        if cfg.n_experts:
            out.append(f"n_experts={cfg.n_experts} (Llama is dense; MoE models export as Mixtral)")
        return out
    # mixtral
    if cfg.n_experts == 0:
        out.append("n_experts=0 (Mixtral is MoE; dense models export as Llama)")
        return out
    if cfg.moe_every != 1:
        out.append(f"moe_every={cfg.moe_every} (every Mixtral layer is MoE: moe_every=1)")
    if cfg.moe_dense_layers:
        out.append(f"moe_dense_layers={cfg.moe_dense_layers} (every Mixtral layer is MoE: moe_dense_layers=0)")
    if cfg.moe_router != "softmax":
        out.append(f"moe_router={cfg.moe_router!r} (Mixtral's router is a softmax: moe_router='softmax')")
    if cfg.moe_routed_scaling != 1.0:
        out.append(f"moe_routed_scaling={cfg.moe_routed_scaling} (Mixtral does not scale its gates: 1.0)")
    if cfg.n_shared_experts:
        out.append(f"n_shared_experts={cfg.n_shared_experts} (Mixtral has no shared experts)")
    if cfg.moe_capacity_factor is not None:
        out.append(f"moe_capacity_factor={cfg.moe_capacity_factor} (Mixtral is dropless: moe_capacity_factor=None)")
    if not cfg.moe_renormalize:
        out.append("moe_renormalize=False (Mixtral renormalizes the top-k gates)")
    if cfg.moe_top_k == 1:
        # Mixtral renormalizes even one gate (p/p = 1); nanomoe keeps Switch's raw p for k = 1.
        out.append("moe_top_k=1 (nanomoe keeps the raw gate p with k=1, Switch-style; Mixtral renormalizes it to 1)")
    if cfg.moe_bias_balance:
        out.append("moe_bias_balance=True (Mixtral's router has no selection bias)")
    if cfg.bias:
        out.append("bias=True (Mixtral has no linear biases)")
    return out


def hf_family(config: GPTConfig) -> str:
    """"gpt2" | "llama" | "mixtral": the transformers architecture that computes the same function.
    Raises HFConversionError naming the incompatible switches when none does."""
    tries = ("mixtral",) if config.n_experts else ("gpt2", "llama")
    reasons = {}
    for fam in tries:
        bad = _mismatches(config, fam)
        if not bad:
            return fam
        reasons[fam] = bad
    lines = ["this config matches no Hugging Face family nanomoe can export:"]
    for fam, bad in reasons.items():
        lines.append(f"  as {fam}: " + "; ".join(bad))
    raise HFConversionError("\n".join(lines))


def _require(config: GPTConfig, family: str) -> None:
    bad = _mismatches(config, family)
    if bad:
        raise HFConversionError(f"cannot convert to {family}: incompatible switch(es): " + "; ".join(bad))


# ---- GPT-2 ----------------------------------------------------------------------------------------
# GPT-2's Conv1D computes y = x @ W + b with W (in, out); nn.Linear computes y = x @ W^T + b with
# W (out, in). Every 2-D Conv1D weight is therefore transposed; names are otherwise identical.
_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_hf_config(config: GPTConfig):
    """The `transformers.GPT2Config` of a GPT-2-family nanomoe config."""
    from transformers import GPT2Config

    _require(config, "gpt2")
    eot = 50256 if config.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, when it exists
    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=None if config.hidden_dim == 4 * config.n_embd else config.hidden_dim,
        # GPT-2's tanh approximation is "gelu_new" (= F.gelu(approximate="tanh")); "gelu" is exact erf
        activation_function="gelu_new" if config.gelu_approximate == "tanh" else "gelu",
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=eot,
        eos_token_id=eot,
    )


def to_hf_gpt2(model: GPT):
    """nanomoe GPT-2 -> `transformers.GPT2LMHeadModel` with the same logits.
    A nanomoe model with bias=False exports with zero biases (HF GPT-2 always has them)."""
    from transformers import GPT2LMHeadModel

    cfg = model.config
    with _quiet():
        hf = GPT2LMHeadModel(gpt2_hf_config(cfg))
    ours = model.state_dict()
    state = {}
    for name, t in hf.state_dict().items():
        src = ours.get(name)
        if src is None:
            if name.endswith(".bias"):  # bias=False: the function is the same with zero biases
                state[name] = torch.zeros_like(t)
                continue
            raise HFConversionError(f"nanomoe model has no tensor for GPT-2's {name}")
        state[name] = src.t() if name.endswith(_GPT2_CONV1D) else src
    _load_exact(hf, state, "nanomoe weights into GPT2LMHeadModel")
    return hf.to(model.transformer.wte.weight.dtype).eval()


def _gpt2_config_from_hf(c, overrides: dict[str, Any]) -> GPTConfig:
    bad = []
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        bad.append(
            f"activation_function={c.activation_function!r} (nanomoe supports gelu_new/gelu_pytorch_tanh and gelu)"
        )
    if getattr(c, "scale_attn_by_inverse_layer_idx", False):
        bad.append("scale_attn_by_inverse_layer_idx=True")
    if not getattr(c, "scale_attn_weights", True):
        bad.append("scale_attn_weights=False")
    if getattr(c, "add_cross_attention", False):
        bad.append("add_cross_attention=True")
    if bad:
        raise HFConversionError("unsupported GPT-2 config: " + "; ".join(bad))
    hidden = c.n_inner if c.n_inner is not None else 4 * c.n_embd
    base = dict(
        vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
        dropout=0.0, bias=True, pos_emb="learned", norm="layernorm", norm_eps=c.layer_norm_epsilon, mlp="gelu",
        gelu_approximate="none" if c.activation_function == "gelu" else "tanh", mlp_hidden=hidden, n_kv_head=None,
        logit_softcap=None, tie_embeddings=bool(c.tie_word_embeddings),
    )
    return _hidden_or_none(GPTConfig(**{**base, **overrides}), hidden)


def from_hf_gpt2(hf_model, **overrides: Any) -> GPT:
    """`transformers.GPT2LMHeadModel` -> nanomoe GPT-2 preset with the same logits (fp32).
    `overrides`: runtime fields only (dropout, attn, block_size <= n_positions, ...)."""
    _check_overrides(overrides)
    c = hf_model.config
    cfg = _gpt2_config_from_hf(c, overrides)
    if cfg.block_size > c.n_positions:
        raise HFConversionError(
            f"block_size={cfg.block_size} exceeds the {c.n_positions} learned positions of this GPT-2"
        )
    hf_state = hf_model.state_dict()
    state = {}
    for name, t in hf_state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old causal-mask buffers, not weights
        state[name] = t.t() if name.endswith(_GPT2_CONV1D) else t
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][: cfg.block_size]  # crop (nanoGPT)
    model = GPT(cfg)
    _load_exact(model, state, "GPT2LMHeadModel weights into nanomoe")
    return model.eval()


# ---- Llama / Mixtral (shared attention and norms) -------------------------------------------------


def _rope_hf(config: GPTConfig) -> dict:
    return {"rope_type": "default", "rope_theta": float(config.rope_theta)}


def _common_llama_kwargs(config: GPTConfig) -> dict:
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        rope_parameters=_rope_hf(config),
        tie_word_embeddings=config.tie_embeddings,
        attention_dropout=config.dropout,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def llama_hf_config(config: GPTConfig):
    """The `transformers.LlamaConfig` of a modern dense nanomoe config."""
    from transformers import LlamaConfig

    _require(config, "llama")
    return LlamaConfig(
        **_common_llama_kwargs(config),
        intermediate_size=config.hidden_dim,
        attention_bias=config.bias,
        mlp_bias=config.bias,
    )


def mixtral_hf_config(config: GPTConfig):
    """The `transformers.MixtralConfig` of a nanomoe MoE config (every layer MoE, no shared experts)."""
    from transformers import MixtralConfig

    _require(config, "mixtral")
    return MixtralConfig(
        **_common_llama_kwargs(config),
        intermediate_size=config.expert_hidden_dim,
        num_local_experts=config.n_experts,
        num_experts_per_tok=config.moe_top_k,
        # HF's load-balancing loss counts each of the k choices, so it is k x ours (= k at balance):
        # the same training signal needs coefficient / k. (Logits never depend on it.)
        router_aux_loss_coef=config.moe_aux_loss_coef / config.moe_top_k,
        router_jitter_noise=0.0,
        sliding_window=None,
    )


def _attn_norms_to_hf(ours: dict, cfg: GPTConfig, i: int, state: dict) -> None:
    p, q = f"transformer.h.{i}.", f"model.layers.{i}."
    H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    for kind in ("weight", "bias"):
        if f"{p}attn.c_attn.{kind}" not in ours:
            continue
        wq, wk, wv = ours[f"{p}attn.c_attn.{kind}"].split([H * D, Hkv * D, Hkv * D], dim=0)  # rows [q | k | v]
        state[f"{q}self_attn.q_proj.{kind}"] = wq
        state[f"{q}self_attn.k_proj.{kind}"] = wk
        state[f"{q}self_attn.v_proj.{kind}"] = wv
        state[f"{q}self_attn.o_proj.{kind}"] = ours[f"{p}attn.c_proj.{kind}"]
    state[f"{q}input_layernorm.weight"] = ours[f"{p}ln_1.weight"]
    state[f"{q}post_attention_layernorm.weight"] = ours[f"{p}ln_2.weight"]


def _attn_norms_from_hf(hf: dict, i: int, state: dict) -> None:
    p, q = f"transformer.h.{i}.", f"model.layers.{i}."
    for kind in ("weight", "bias"):
        if f"{q}self_attn.q_proj.{kind}" not in hf:
            continue
        parts = [hf[f"{q}self_attn.{n}_proj.{kind}"] for n in ("q", "k", "v")]
        state[f"{p}attn.c_attn.{kind}"] = torch.cat(parts, dim=0)
        state[f"{p}attn.c_proj.{kind}"] = hf[f"{q}self_attn.o_proj.{kind}"]
    state[f"{p}ln_1.weight"] = hf[f"{q}input_layernorm.weight"]
    state[f"{p}ln_2.weight"] = hf[f"{q}post_attention_layernorm.weight"]


def _ends_to_hf(ours: dict, state: dict) -> None:
    state["model.embed_tokens.weight"] = ours["transformer.wte.weight"]
    state["model.norm.weight"] = ours["transformer.ln_f.weight"]
    state["lm_head.weight"] = ours["lm_head.weight"]  # the same tensor as wte when tied


def _ends_from_hf(hf: dict, state: dict) -> None:
    state["transformer.wte.weight"] = hf["model.embed_tokens.weight"]
    state["transformer.ln_f.weight"] = hf["model.norm.weight"]
    state["lm_head.weight"] = hf.get("lm_head.weight", hf["model.embed_tokens.weight"])


def _llama_like_config_from_hf(c, family: str, overrides: dict[str, Any], **extra: Any) -> dict:
    bad = []
    rope = dict(getattr(c, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        bad.append(f"rope_parameters.rope_type={rope_type!r} (RoPE scaling is not implemented; only 'default')")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        bad.append(f"partial_rotary_factor={rope['partial_rotary_factor']} (nanomoe rotates the whole head)")
    theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
    if theta is None:
        bad.append("no rope_theta in the config")
    if c.hidden_act != "silu":
        bad.append(f"hidden_act={c.hidden_act!r} (SwiGLU uses silu)")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        bad.append(f"head_dim={head_dim} with {c.num_attention_heads} heads != hidden_size={c.hidden_size} "
                   "(nanomoe uses head_dim = n_embd // n_head)")
    if getattr(c, "sliding_window", None) is not None and c.sliding_window < c.max_position_embeddings:
        bad.append(f"sliding_window={c.sliding_window} (sliding-window attention is not implemented)")
    attn_bias, mlp_bias = getattr(c, "attention_bias", False), getattr(c, "mlp_bias", False)
    if family == "llama" and attn_bias != mlp_bias:
        bad.append(f"attention_bias={attn_bias} with mlp_bias={mlp_bias} (nanomoe has one switch, bias)")
    if family == "mixtral" and c.num_experts_per_tok == 1:
        bad.append("num_experts_per_tok=1 (Mixtral's gate is then always 1; nanomoe's k=1 gate is the raw "
                   "probability, Switch-style)")
    if family == "mixtral" and getattr(c, "router_jitter_noise", 0.0):
        bad.append(f"router_jitter_noise={c.router_jitter_noise} (nanomoe's router has no jitter)")
    if bad:
        raise HFConversionError(f"unsupported {family} config: " + "; ".join(bad))
    base = dict(
        vocab_size=c.vocab_size, block_size=c.max_position_embeddings, n_layer=c.num_hidden_layers,
        n_head=c.num_attention_heads, n_embd=c.hidden_size,
        n_kv_head=c.num_key_value_heads or c.num_attention_heads,
        dropout=0.0, bias=bool(attn_bias), pos_emb="rope", rope_theta=float(theta), norm="rmsnorm",
        norm_eps=c.rms_norm_eps, mlp="swiglu", logit_softcap=None, tie_embeddings=bool(c.tie_word_embeddings),
        attn="sdpa",
    )
    return {**base, **extra, **overrides}


# ---- Llama ----------------------------------------------------------------------------------------


def to_hf_llama(model: GPT):
    """nanomoe modern dense model -> `transformers.LlamaForCausalLM` with the same logits."""
    from transformers import LlamaForCausalLM

    cfg = model.config
    with _quiet():
        hf = LlamaForCausalLM(llama_hf_config(cfg))
    ours, state = model.state_dict(), {}
    H = cfg.hidden_dim
    for i in range(cfg.n_layer):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        _attn_norms_to_hf(ours, cfg, i, state)
        for kind in ("weight", "bias"):
            if f"{p}mlp.c_fc.{kind}" not in ours:
                continue
            gate, up = ours[f"{p}mlp.c_fc.{kind}"].split([H, H], dim=0)  # rows [gate ; up]
            state[f"{q}mlp.gate_proj.{kind}"] = gate
            state[f"{q}mlp.up_proj.{kind}"] = up
            state[f"{q}mlp.down_proj.{kind}"] = ours[f"{p}mlp.c_proj.{kind}"]
    _ends_to_hf(ours, state)
    _load_exact(hf, state, "nanomoe weights into LlamaForCausalLM")
    return hf.to(model.transformer.wte.weight.dtype).eval()


def from_hf_llama(hf_model, **overrides: Any) -> GPT:
    """`transformers.LlamaForCausalLM` -> nanomoe modern dense model with the same logits (fp32)."""
    _check_overrides(overrides)
    c = hf_model.config
    cfg = GPTConfig(**_llama_like_config_from_hf(c, "llama", overrides, mlp_hidden=c.intermediate_size))
    cfg = _hidden_or_none(cfg, c.intermediate_size)
    hf, state = hf_model.state_dict(), {}
    for i in range(cfg.n_layer):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        _attn_norms_from_hf(hf, i, state)
        for kind in ("weight", "bias"):
            if f"{q}mlp.gate_proj.{kind}" not in hf:
                continue
            state[f"{p}mlp.c_fc.{kind}"] = torch.cat(
                [hf[f"{q}mlp.gate_proj.{kind}"], hf[f"{q}mlp.up_proj.{kind}"]], dim=0
            )
            state[f"{p}mlp.c_proj.{kind}"] = hf[f"{q}mlp.down_proj.{kind}"]
    _ends_from_hf(hf, state)
    model = GPT(cfg)
    _load_exact(model, state, "LlamaForCausalLM weights into nanomoe")
    return model.eval()


# ---- Mixtral --------------------------------------------------------------------------------------
# nanomoe experts: c_fc (E, C, 2H) with y = x @ W ([gate | up] on the last dim), c_proj (E, H, C).
# transformers 5 Mixtral: gate_up_proj (E, 2H, C) with y = x @ W^T ([gate ; up] rows), down_proj
# (E, C, H). So each is the other's transpose of the last two dims. The router is `mlp.gate`
# (a MixtralTopKRouter whose `weight` is (E, C), like our nn.Linear `mlp.router.weight`).


def to_hf_mixtral(model: GPT):
    """nanomoe MoE model (every layer MoE) -> `transformers.MixtralForCausalLM` with the same logits."""
    from transformers import MixtralForCausalLM

    cfg = model.config
    with _quiet():
        hf = MixtralForCausalLM(mixtral_hf_config(cfg))
    ours, state = model.state_dict(), {}
    for i in range(cfg.n_layer):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        _attn_norms_to_hf(ours, cfg, i, state)
        state[f"{q}mlp.gate.weight"] = ours[f"{p}mlp.router.weight"]  # (E, C)
        state[f"{q}mlp.experts.gate_up_proj"] = ours[f"{p}mlp.experts.c_fc"].transpose(1, 2)  # (E, 2H, C)
        state[f"{q}mlp.experts.down_proj"] = ours[f"{p}mlp.experts.c_proj"].transpose(1, 2)  # (E, C, H)
    _ends_to_hf(ours, state)
    _load_exact(hf, state, "nanomoe weights into MixtralForCausalLM")
    return hf.to(model.transformer.wte.weight.dtype).eval()


def from_hf_mixtral(hf_model, **overrides: Any) -> GPT:
    """`transformers.MixtralForCausalLM` -> nanomoe MoE model with the same logits (fp32).
    Mixtral renormalizes the top-k gates, has no shared experts and drops no tokens."""
    _check_overrides(overrides)
    c = hf_model.config
    extra = dict(
        n_experts=c.num_local_experts, moe_top_k=c.num_experts_per_tok, moe_every=1, moe_hidden=c.intermediate_size,
        n_shared_experts=0, moe_renormalize=True, moe_capacity_factor=None, moe_bias_balance=False,
        moe_aux_loss_coef=float(c.router_aux_loss_coef) * c.num_experts_per_tok,
    )
    cfg = GPTConfig(**_llama_like_config_from_hf(c, "mixtral", overrides, **extra))
    if cfg.replace(moe_hidden=None).expert_hidden_dim == c.intermediate_size:
        cfg = cfg.replace(moe_hidden=None)
    hf, state = hf_model.state_dict(), {}
    for i in range(cfg.n_layer):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        _attn_norms_from_hf(hf, i, state)
        state[f"{p}mlp.router.weight"] = hf[f"{q}mlp.gate.weight"]
        state[f"{p}mlp.experts.c_fc"] = hf[f"{q}mlp.experts.gate_up_proj"].transpose(1, 2)
        state[f"{p}mlp.experts.c_proj"] = hf[f"{q}mlp.experts.down_proj"].transpose(1, 2)
    _ends_from_hf(hf, state)
    model = GPT(cfg)
    _load_exact(model, state, "MixtralForCausalLM weights into nanomoe")
    return model.eval()


# ---- dispatch by family -------------------------------------------------------------------------

_TO = {"gpt2": to_hf_gpt2, "llama": to_hf_llama, "mixtral": to_hf_mixtral}
_FROM = {"gpt2": from_hf_gpt2, "llama": from_hf_llama, "mixtral": from_hf_mixtral}


def to_hf(model: GPT):
    """nanomoe GPT -> the matching transformers model (GPT-2, Llama or Mixtral), same logits."""
    model = unwrap(model)  # torch.compile / DDP wrappers
    return _TO[hf_family(model.config)](model)


def from_hf(hf_model, **overrides: Any) -> GPT:
    """transformers GPT-2 / Llama / Mixtral causal LM -> nanomoe GPT with the same logits."""
    model_type = getattr(hf_model.config, "model_type", None)
    if model_type not in _FROM:
        raise HFConversionError(
            f"nanomoe converts {list(FAMILIES)} models; this one is model_type={model_type!r}"
        )
    return _FROM[model_type](hf_model, **overrides)


# ---- folders: export / load ---------------------------------------------------------------------


def _tiktoken_gpt2_files() -> Optional[tuple[Path, Path]]:
    """encoder.json and vocab.bpe from tiktoken's cache, when present (they are the HF GPT-2
    tokenizer's vocab.json and merges.txt)."""
    base = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    cache = Path(base) if base else Path(tempfile.gettempdir()) / "data-gym-cache"
    enc, bpe = cache / TIKTOKEN_GPT2_FILES["encoder.json"], cache / TIKTOKEN_GPT2_FILES["vocab.bpe"]
    return (enc, bpe) if enc.is_file() and bpe.is_file() else None


def _save_tokenizer(tokenizer, folder: Path) -> dict:
    """Write nanomoe_tokenizer.json (tokenizer.info(), paths relative to the folder) and, where
    possible, the Hugging Face tokenizer files so AutoTokenizer works on the folder too."""
    info = dict(tokenizer.info())
    name = info.get("name")
    if name == "bpe" and getattr(tokenizer, "tok", None) is not None:
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_object=tokenizer.tok).save_pretrained(str(folder))
        info["path"] = "tokenizer.json"
    elif name == "hf":
        tokenizer.tok.save_pretrained(str(folder))
        info["path"] = "."
    elif name == "gpt2":
        files = _tiktoken_gpt2_files()
        if files is not None:
            from transformers import GPT2TokenizerFast

            vocab = json.loads(files[0].read_text(encoding="utf-8"))
            lines = files[1].read_text(encoding="utf-8").split("\n")[1:]  # first line: "#version: 0.2"
            merges = [tuple(line.split()) for line in lines if line.strip()]
            GPT2TokenizerFast(vocab=vocab, merges=merges).save_pretrained(str(folder))
    (folder / TOKENIZER_INFO_FILE).write_text(json.dumps(info, ensure_ascii=False, indent=2), encoding="utf-8")
    return info


def export_hf(model: GPT, folder: Union[str, os.PathLike], tokenizer=None) -> Path:
    """Save `model` as a Hugging Face folder (config.json + model.safetensors) that
    `transformers.AutoModelForCausalLM.from_pretrained(folder)` loads with the same logits, plus
    nanomoe_config.json (the full GPTConfig) and, given a tokenizer, nanomoe_tokenizer.json
    (its info(), so `load_hf` and `scripts/generate.py` find it) and the HF tokenizer files
    when the tokenizer has them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    hf = to_hf(model)
    eot = getattr(tokenizer, "eot", None)
    if eot is not None and eot < model.config.vocab_size:
        for c in (hf.config, hf.generation_config):
            c.bos_token_id = c.eos_token_id = eot
    with _quiet():
        hf.save_pretrained(str(folder))  # safetensors
    (folder / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2), encoding="utf-8")
    if tokenizer is not None:
        _save_tokenizer(tokenizer, folder)
    return folder


def _describe_expected(model, name: str) -> str:
    own = model.state_dict()
    return str(_shape(own[name])) if name in own else "?"


def load_hf_model(name_or_folder: Union[str, os.PathLike], **kwargs: Any):
    """The transformers model of a folder or hub name (AutoModelForCausalLM.from_pretrained, float32,
    eval mode), with missing / mismatched tensors turned into errors that name the tensor and the
    expected vs found shape (transformers itself would only warn and leave them at random init)."""
    from transformers import AutoModelForCausalLM

    with _quiet():
        hf, info = AutoModelForCausalLM.from_pretrained(
            str(name_or_folder), output_loading_info=True, ignore_mismatched_sizes=True, dtype=torch.float32, **kwargs
        )
    lines = []
    for key, found, expected in sorted(info.get("mismatched_keys", ()), key=lambda x: x[0]):
        lines.append(f"  tensor {key} has shape {tuple(found)} but config.json expects {tuple(expected)}")
    for key in sorted(info.get("missing_keys", ())):
        lines.append(f"  missing tensor {key} (expected shape {_describe_expected(hf, key)})")
    if lines:
        raise HFConversionError(
            f"the weights in {name_or_folder} do not match its config.json ({hf.config.model_type}):\n"
            + "\n".join(lines)
            + "\nRe-export the folder (nanomoe.interop.hf.export_hf) or fix config.json."
        )
    return hf.eval()


def load_hf(folder: Union[str, os.PathLike], **overrides: Any):
    """A Hugging Face folder (export_hf's, or any GPT-2 / Llama / Mixtral save_pretrained folder)
    -> (GPT, tokenizer or None). Runtime fields come from nanomoe_config.json when present, then
    from `overrides`; the tokenizer from nanomoe_tokenizer.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HFConversionError(f"{folder} is not a folder (expected a save_pretrained / export_hf folder)")
    if not (folder / "config.json").is_file():
        raise HFConversionError(f"{folder} has no config.json: not a Hugging Face model folder")
    runtime = {}
    if (folder / CONFIG_FILE).is_file():
        saved = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        runtime = {k: saved[k] for k in RUNTIME_FIELDS if k in saved}
    hf = load_hf_model(folder, local_files_only=True)
    model = from_hf(hf, **{**runtime, **overrides})
    tokenizer = None
    if (folder / TOKENIZER_INFO_FILE).is_file():
        info = json.loads((folder / TOKENIZER_INFO_FILE).read_text(encoding="utf-8"))
        tokenizer = load_tokenizer(info, base_dir=folder)
    return model, tokenizer


def from_pretrained(
    name_or_folder: Union[str, os.PathLike],
    *,
    cache_dir: Optional[str] = None,
    local_files_only: bool = False,
    **overrides: Any,
) -> GPT:
    """Pretrained weights -> nanomoe GPT with the same logits as transformers'.

    `name_or_folder`: a local folder (save_pretrained / export_hf), "gpt2", "gpt2-medium",
    "gpt2-large", "gpt2-xl", or any GPT-2 / Llama / Mixtral hub name. Hub names need internet the
    first time (then the files are cached in ~/.cache/huggingface). `overrides`: runtime fields
    such as dropout=0.1 or block_size=256 (crops GPT-2's position table, as nanoGPT does)."""
    path = Path(name_or_folder)
    if path.is_dir():
        return load_hf(path, **overrides)[0]
    name = str(name_or_folder)
    try:
        hf = load_hf_model(name, cache_dir=cache_dir, local_files_only=local_files_only)
    except HFConversionError:
        raise
    except Exception as e:  # offline, unknown name, no access...
        hint = f" (one of {', '.join(GPT2_NAMES)})" if name.startswith("gpt") else ""
        raise HFConversionError(
            f"could not get {name!r}{hint} from the Hugging Face hub: "
            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}\n"
            "Downloading weights needs internet the first time (then they are cached). Offline, pass a local "
            "folder saved with save_pretrained or nanomoe.interop.hf.export_hf."
        ) from None
    return from_hf(hf, **overrides)


def save_random_gpt2(
    folder: Union[str, os.PathLike],
    *,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 64,
    block_size: int = 256,
    vocab_size: int = 50257,
    seed: int = 0,
) -> Path:
    """Save a small randomly initialized `GPT2LMHeadModel` (GPT-2's tokenizer size by default) with
    save_pretrained: an offline stand-in for the hub's "gpt2" folder, loaded through the very same
    path (`from_pretrained(folder)`). Its weights are random, not OpenAI's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    eot = 50256 if vocab_size > 50256 else None
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     bos_token_id=eot, eos_token_id=eot)
    folder = Path(folder)
    with _quiet():
        GPT2LMHeadModel(cfg).save_pretrained(str(folder))
    return folder
