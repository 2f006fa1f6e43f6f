"""`GPTConfig`: one dataclass that describes GPT-2, a modern dense model and an MoE model.

Every architectural idea of the course is one field here (a "switch"). Its default is the
chapter-01 behaviour (nanoGPT's GPT-2), so a chapter turns switches on one at a time:

| chapter | switches |
|---|---|
| 01 | vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias |
| 02 | pos_emb/rope_theta, norm/norm_eps, mlp/mlp_hidden, n_kv_head, attn, logit_softcap, tie_embeddings |
| 03 | n_experts, moe_top_k, moe_every, moe_hidden, n_shared_experts, moe_* (router, losses, capacity) |
| 06 | moe_router, moe_routed_scaling, moe_balance_scope, moe_dense_layers (modern routers) |

`GPTConfig.__post_init__` validates everything with messages that say what to change, and the
named presets at the bottom (`gpt2_config`, `modern_config`, `moe_config`) build the three
families of the course.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from typing import Any, Optional

POS_EMBS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
ATTNS = ("sdpa", "manual")
MOE_IMPLS = ("reference", "fast")
MOE_ROUTERS = ("softmax", "sigmoid")
MOE_BALANCE_SCOPES = ("micro_batch", "sequence", "global")
GELU_APPROXIMATES = ("tanh", "none")


def require(cond: bool, msg: str, owner: str) -> None:
    """Raise ValueError("<owner>: <msg>") when `cond` is false: how every config dataclass validates."""
    if not cond:
        raise ValueError(f"{owner}: {msg}")


def from_dict(cls: type, d: dict[str, Any]) -> Any:
    """Build the dataclass `cls` from a dict, naming unknown keys (they would be a TypeError otherwise)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    return cls(**d)


@dataclass
class GPTConfig:
    # ---- chapter 01: nanoGPT's GPT-2 --------------------------------------------------------
    vocab_size: int = 50304
    block_size: int = 1024  # maximum context length (positions 0 .. block_size-1)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms (GPT-2: True; Llama: False)

    # ---- chapter 02: the modern architecture -------------------------------------------------
    pos_emb: str = "learned"  # "learned" (GPT-2 table) | "rope" (rotary, Su et al. 2021)
    rope_theta: float = 10000.0  # RoPE base frequency (Llama 2: 1e4, Llama 3: 5e5)
    norm: str = "layernorm"  # "layernorm" | "rmsnorm" (Zhang & Sennrich 2019)
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # "gelu" (4x, GPT-2) | "swiglu" (Shazeer 2020, Llama)
    mlp_hidden: Optional[int] = None  # None: 4*n_embd for gelu, ~8/3*n_embd for swiglu
    mlp_multiple_of: int = 32  # swiglu hidden width is rounded up to a multiple of this
    # GELU flavour: "tanh" is GPT-2's approximation (HF "gelu_new", needed for exact GPT-2 logits);
    # "none" is the exact erf GELU that nanoGPT uses (nn.GELU()), ~35% cheaper on CPU.
    gelu_approximate: str = "tanh"
    # n_kv_head is a *head count*, not a group size: the number of key/value heads.
    # None (= n_head) is multi-head attention, 1 is multi-query (MQA), values in between are
    # grouped-query attention (GQA, Ainslie et al. 2023) with n_head // n_kv_head query heads per group.
    n_kv_head: Optional[int] = None
    attn: str = "sdpa"  # "sdpa" (F.scaled_dot_product_attention) | "manual" (explicit softmax)
    logit_softcap: Optional[float] = None  # Gemma 2: cap * tanh(logits / cap); None = off
    tie_embeddings: bool = True  # lm_head shares the token-embedding matrix (GPT-2, Gemma)

    # ---- chapter 03: Mixture of Experts ---------------------------------------------------------
    n_experts: int = 0  # 0 = dense model (every layer has an MLP)
    moe_top_k: int = 2  # experts per token (distinct from generate()'s sampling top_k)
    moe_every: int = 1  # layer i is MoE when (i + 1) % moe_every == 0
    moe_hidden: Optional[int] = None  # None: dense hidden // (moe_top_k + n_shared_experts)
    n_shared_experts: int = 0  # DeepSeekMoE always-on experts
    moe_renormalize: bool = True  # renormalize the top-k gate weights to sum to 1 (Mixtral)
    moe_aux_loss_coef: float = 1e-2  # Switch load-balancing loss coefficient (alpha)
    moe_z_loss_coef: float = 1e-3  # ST-MoE router z-loss coefficient
    moe_capacity_factor: Optional[float] = None  # None = dropless; float = Switch capacity
    moe_min_capacity: int = 4  # capacity never falls below this (a 1-token prompt is never dropped)
    moe_impl: str = "fast"  # "reference" (loop, readable) | "fast" (sorted dispatch)
    moe_bias_balance: bool = False  # DeepSeek-V3 auxiliary-loss-free balancing bias
    moe_bias_update_rate: float = 1e-3  # gamma of the bias update

    # ---- chapter 06: modern routers ----------------------------------------------------------
    moe_router: str = "softmax"  # "softmax" (Mixtral) | "sigmoid" (DeepSeek-V3: gates = top-k scores renormalized)
    moe_routed_scaling: float = 1.0  # DeepSeek-V3's routed scaling factor: multiplies the k gates
    # Where the balance loss's f_i is counted: "micro_batch" (chapter 03), "sequence" (DeepSeek-V3's
    # complementary sequence-wise loss) or "global" (the whole optimizer step, all micro-batches
    # and all ranks; Qiu et al. 2025, "Demons in the Detail", arXiv 2501.11873).
    moe_balance_scope: str = "micro_batch"
    moe_dense_layers: int = 0  # the first layers keep a dense MLP (DeepSeek-V3: first 3)

    def __post_init__(self) -> None:
        need = partial(require, owner="GPTConfig")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        need(
            self.n_embd % self.n_head == 0,
            f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
            f"each head gets n_embd // n_head dimensions. "
            f"Try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}.",
        )
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.pos_emb in POS_EMBS, f"pos_emb must be one of {POS_EMBS}, got {self.pos_emb!r}")
        need(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
        need(self.mlp in MLPS, f"mlp must be one of {MLPS}, got {self.mlp!r}")
        need(self.attn in ATTNS, f"attn must be one of {ATTNS}, got {self.attn!r}")
        need(
            self.gelu_approximate in GELU_APPROXIMATES,
            f"gelu_approximate must be one of {GELU_APPROXIMATES}, got {self.gelu_approximate!r}",
        )
        if self.pos_emb == "rope":
            need(self.head_dim % 2 == 0, f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.n_kv_head is not None:
            need(
                isinstance(self.n_kv_head, int) and 1 <= self.n_kv_head <= self.n_head
                and self.n_head % self.n_kv_head == 0,
                f"n_kv_head ({self.n_kv_head}) is the number of key/value heads and must divide "
                f"n_head ({self.n_head}): 1 = MQA, n_head = MHA, a divisor in between = GQA",
            )
        if self.logit_softcap is not None:
            need(self.logit_softcap > 0, f"logit_softcap must be > 0 or None, got {self.logit_softcap}")
        if self.mlp_hidden is not None:
            need(self.mlp_hidden > 0, f"mlp_hidden must be positive, got {self.mlp_hidden}")
        need(self.n_experts >= 0, f"n_experts must be >= 0 (0 = dense), got {self.n_experts}")
        if self.n_experts > 0:
            self._check_moe(need)

    def _check_moe(self, need) -> None:
        """The MoE switches' checks (n_experts > 0), one clear message each."""
        need(
            1 <= self.moe_top_k <= self.n_experts,
            f"moe_top_k ({self.moe_top_k}) must be between 1 and n_experts ({self.n_experts})",
        )
        need(self.moe_every >= 1, f"moe_every must be >= 1, got {self.moe_every}")
        need(self.moe_impl in MOE_IMPLS, f"moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        need(self.n_shared_experts >= 0, f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.moe_capacity_factor is not None:
            need(
                self.moe_capacity_factor > 0,
                f"moe_capacity_factor must be > 0 or None, got {self.moe_capacity_factor}",
            )
        need(self.moe_min_capacity >= 1, f"moe_min_capacity must be >= 1, got {self.moe_min_capacity}")
        if self.moe_hidden is not None:
            need(self.moe_hidden > 0, f"moe_hidden must be positive, got {self.moe_hidden}")
        need(self.moe_router in MOE_ROUTERS, f"moe_router must be one of {MOE_ROUTERS}, got {self.moe_router!r}")
        need(self.moe_routed_scaling > 0, f"moe_routed_scaling must be > 0, got {self.moe_routed_scaling}")
        need(
            self.moe_balance_scope in MOE_BALANCE_SCOPES,
            f"moe_balance_scope must be one of {MOE_BALANCE_SCOPES}, got {self.moe_balance_scope!r}",
        )
        need(
            self.moe_balance_scope != "global" or self.dropout == 0.0,
            f"moe_balance_scope='global' needs dropout=0.0 (got {self.dropout}): the step's routing pre-pass "
            "must route exactly like the training forward",
        )
        need(
            isinstance(self.moe_dense_layers, int) and 0 <= self.moe_dense_layers < self.n_layer,
            f"moe_dense_layers must be between 0 and n_layer - 1 = {self.n_layer - 1} (at least one MoE "
            f"layer), got {self.moe_dense_layers!r}",
        )
        need(
            self.moe_dense_layers == 0 or any(self.is_moe_layer(i) for i in range(self.n_layer)),
            f"moe_dense_layers={self.moe_dense_layers} with moe_every={self.moe_every} leaves no MoE layer "
            f"in {self.n_layer} layers",
        )

    # ---- derived sizes (one place, so every module agrees) -----------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (n_kv_head resolved: None means n_head)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def hidden_dim(self) -> int:
        """Hidden width of the dense MLP."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.n_embd
        # SwiGLU has three matrices instead of two: 2/3 of 4x keeps the parameter count
        # (Shazeer 2020, "GLU Variants Improve Transformer"; Llama rounds to a multiple).
        m = self.mlp_multiple_of
        return m * math.ceil(8 * self.n_embd / 3 / m)

    @property
    def expert_hidden_dim(self) -> int:
        """Hidden width of one expert: by default the *active* parameters equal the dense MLP's."""
        if self.moe_hidden is not None:
            return self.moe_hidden
        return max(1, self.hidden_dim // (self.moe_top_k + self.n_shared_experts))

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_experts > 0 and layer >= self.moe_dense_layers and (layer + 1) % self.moe_every == 0

    # ---- (de)serialization -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        return from_dict(cls, d)

    def replace(self, **changes: Any) -> "GPTConfig":
        return replace(self, **changes)


# ---- presets -------------------------------------------------------------------------------------


def gpt2_config(**overrides: Any) -> GPTConfig:
    """nanoGPT's GPT-2: learned positions, LayerNorm, GELU 4x MLP, MHA, biases, tied embeddings."""
    base = dict(pos_emb="learned", norm="layernorm", mlp="gelu", n_kv_head=None, bias=True, tie_embeddings=True)
    return GPTConfig(**{**base, **overrides})


def modern_config(**overrides: Any) -> GPTConfig:
    """Llama/Mistral-style dense model: RoPE, RMSNorm, SwiGLU, GQA (n_kv_head = n_head // 4 when
    possible), SDPA, no biases. Embeddings stay tied (as in Gemma and small Llama 3.2 models):
    at course scale the embedding matrix is a large share of the parameters."""
    n_head = overrides.get("n_head", GPTConfig.n_head)
    base = dict(
        pos_emb="rope",
        norm="rmsnorm",
        mlp="swiglu",
        n_kv_head=max(1, n_head // 4) if n_head % max(1, n_head // 4) == 0 else n_head,
        attn="sdpa",
        bias=False,
        tie_embeddings=True,
        logit_softcap=None,
    )
    return GPTConfig(**{**base, **overrides})


def moe_config(**overrides: Any) -> GPTConfig:
    """The modern model with Mixtral-style MoE layers: 8 experts, top-2, every layer."""
    base = dict(n_experts=8, moe_top_k=2, moe_every=1)
    return modern_config(**{**base, **overrides})


PRESETS = {"gpt2": gpt2_config, "modern": modern_config, "moe": moe_config}


def preset(name: str, **overrides: Any) -> GPTConfig:
    """Build a named preset ("gpt2", "modern", "moe") with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
