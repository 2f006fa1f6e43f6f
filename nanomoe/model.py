"""The model: `Block` and `GPT`. One class covers GPT-2, a modern dense model and an MoE model.

A token's trip (shapes for a batch of B sequences of T tokens, C = n_embd, V = vocab_size):
    idx (B, T) -> wte (+ wpe for learned positions) -> x (B, T, C)
    -> n_layer x Block:  x = x + attn(norm(x))          (RoPE inside attention, KV cache)
                         x = x + mlp_or_moe(norm(x))    (pre-norm, sequential residual: GPT-2/Llama)
    -> ln_f -> lm_head (B, T, V) -> optional soft-cap -> cross-entropy (+ MoE auxiliary losses)

`GPT` reads the config once, at construction, and builds the right parts; `forward` has no
architecture branches beyond "is there a cache" and "is this layer MoE".
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import CausalSelfAttention
from .config import GPTConfig
from .kv_cache import KVCache
from .mlp import MLP
from .moe import MoE
from .norm import build_norm
from .rope import rope_tables
from .sampling import check_sampling_args, sample_next


def check_fits(prompt_tokens: int, max_new_tokens: int, block_size: int, use_cache: bool) -> None:
    """With the KV cache, prompt + new tokens must fit in the context (the cache holds block_size positions)."""
    T, n, bs = prompt_tokens, max_new_tokens, block_size
    if use_cache and T + n > bs:
        room = f"generate at most {bs - T} new tokens" if T < bs else f"shorten the prompt below {bs} tokens"
        raise ValueError(
            f"prompt ({T} tokens) + max_new_tokens ({n}) = {T + n} exceeds the model's context of {bs} tokens "
            f"(block_size), all the KV cache can hold: {room}, or turn the cache off "
            f"(use_cache=False / --no-cache) to slide a {bs}-token window as nanoGPT does"
        )


@dataclass
class GPTOutput:
    """What `GPT.forward` computes; unpacks as `logits, loss = model(idx, targets)` (like
    transformers' `MoeCausalLMOutputWithPast`, which also carries the auxiliary loss and the routing).

    logits (B, T, V); loss: what training optimizes, cross-entropy + weighted MoE auxiliary losses
    (None without targets); ce_loss: the cross-entropy alone, detached (perplexity, validation);
    aux_loss: the weighted auxiliary losses, detached (None for a dense model); moe_stats: one
    `RoutingStats` per MoE layer, in order."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    ce_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    moe_stats: list = field(default_factory=list)

    def __iter__(self):
        return iter((self.logits, self.loss))

    def __getitem__(self, i):  # out[0] is the logits, out[1] the loss, as with the tuple it replaces
        return (self.logits, self.loss)[i]


def check_token_ids(idx: torch.Tensor, vocab_size: int) -> None:
    """Raise a clear ValueError when a token id is outside [0, vocab_size).

    Called where ids enter (the batch loader, prompt encoding, `GPT.generate`), never in `forward`:
    reading a min/max back to the host would stop the CPU from queuing work ahead of the GPU."""
    if idx.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(idx))
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"token id {bad} is out of range [0, {vocab_size}): the tokenizer's vocab_size must match config.vocab_size"
        )


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = build_norm(config.norm, config.n_embd, config.bias, config.norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = build_norm(config.norm, config.n_embd, config.bias, config.norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = MoE(config)  # chapter 03
        else:
            self.mlp = MLP(
                config.n_embd, config.hidden_dim, config.mlp, config.bias, config.dropout, config.gelu_approximate
            )

    def forward(self, x: torch.Tensor, rope=None, cache: Optional[KVCache] = None, step_load=None):
        """Returns (x, aux_loss, moe_stats); aux_loss and moe_stats are None for a dense layer.
        step_load: the step's expert counts for the global balance scope (see `nanomoe.moe`)."""
        x = x + self.attn(self.ln_1(x), rope, cache)
        if self.is_moe:
            y, aux, stats = self.mlp(self.ln_2(x), step_load)
            return x + y, aux, stats
        return x + self.mlp(self.ln_2(x)), None, None


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        parts = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=build_norm(config.norm, config.n_embd, config.bias, config.norm_eps),
        )
        if config.pos_emb == "learned":
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Weight tying (Press & Wolf 2017): the output layer reuses the embedding matrix.
            self.lm_head.weight = self.transformer.wte.weight
        if config.pos_emb == "rope":
            cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, head_dim)
            self.register_buffer("rope_sin", sin, persistent=False)

        # GPT-2 init: N(0, 0.02) everywhere, and residual output projections scaled by
        # 1/sqrt(2 * n_layer) (two residual additions per layer; GPT-2 paper, section 2.3).
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if "c_proj" in name and p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * config.n_layer) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---- sizes -------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = True, active: bool = False) -> int:
        """Parameter count. non_embedding drops the position table (and the token table when it
        is not tied to lm_head, as nanoGPT does); active counts only the top-k of each MoE layer's
        experts, i.e. the parameters one token actually uses."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        if non_embedding and not self.config.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        if active:
            for block in self.transformer.h:
                if block.is_moe:
                    E, k = self.config.n_experts, self.config.moe_top_k
                    n -= sum(p.numel() for p in block.mlp.experts.parameters()) * (E - k) // E
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L H Q T,
        with N the *active* parameters (lm_head included) and T the sequence length."""
        cfg = self.config
        T = seq_len or cfg.block_size
        N = self.num_params(non_embedding=True, active=True)  # tied or not, lm_head's matrix is in N
        return 6 * N + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T

    # ---- forward -----------------------------------------------------------------------------
    def _check_idx(self, idx: torch.Tensor, start: int) -> None:
        """Shape, dtype and length checks: metadata only, no host sync (the ids' range is checked where
        they enter, see `check_token_ids`)."""
        cfg = self.config
        if idx.dim() != 2:
            raise ValueError(f"idx must be a (batch, time) tensor of token ids, got shape {tuple(idx.shape)}")
        if idx.dtype not in (torch.long, torch.int32, torch.int64, torch.int16, torch.uint8):
            raise ValueError(f"idx must hold integer token ids, got dtype {idx.dtype}")
        T = idx.size(1)
        if T == 0:
            raise ValueError("idx is empty: give at least one token")
        if start + T > cfg.block_size:
            where = f" after {start} cached positions" if start else ""
            raise ValueError(
                f"sequence of {T} tokens{where} exceeds block_size={cfg.block_size}: "
                f"crop the input to the last {cfg.block_size - start} tokens or use a model with a larger block_size"
            )

    def hidden_states(self, idx: torch.Tensor, cache: Optional[KVCache] = None, moe_loads: Optional[list] = None):
        """idx (B, T) -> final normalized hidden states (B, T, C), summed MoE aux loss, MoE stats.
        moe_loads: one (E,) step count per MoE layer for the global balance scope, or
        `nanomoe.moe.BALANCE_AFTER_FORWARD` (the training step adds that term); see `nanomoe.moe`."""
        start = cache.pos if cache is not None else 0
        self._check_idx(idx, start)
        B, T = idx.shape
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if "wpe" in self.transformer:
            pos = torch.arange(start, start + T, device=idx.device)
            x = x + self.transformer.wpe(pos)  # (T, C) broadcast over B
        else:
            rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])  # (T, D) each
        x = self.transformer.drop(x)
        aux_total, stats = None, []
        for block in self.transformer.h:
            step_load = moe_loads[len(stats)] if isinstance(moe_loads, list) and block.is_moe else moe_loads
            x, aux, st = block(x, rope, cache, step_load)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
                stats.append(st)
        if cache is not None:
            cache.advance(T)
        return self.transformer.ln_f(x), aux_total, stats

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states -> logits, with the soft-cap (Gemma 2) when configured. Training,
        evaluation and generation all come through here, so they see the same logits."""
        logits = self.lm_head(h)
        cap = self.config.logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits.float() / cap)
        return logits

    def forward(
        self,
        idx: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        moe_loads: Optional[list] = None,
    ) -> GPTOutput:
        """idx (B, T) -> `GPTOutput`, which unpacks as (logits (B, T, V), loss or None).

        `loss` is what training optimizes: mean cross-entropy over targets != -1, plus the
        weighted MoE auxiliary losses when the model has MoE layers; `ce_loss` is the
        cross-entropy alone (use it for perplexity and validation), `aux_loss` the weighted
        auxiliary loss (or None), `moe_stats` one dict of routing statistics per MoE layer.
        moe_loads: the step's expert counts for the global balance scope (`global_balance_prepass`)."""
        h, aux, stats = self.hidden_states(idx, cache, moe_loads)
        logits = self.logits(h)
        loss = ce = None
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
            ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            loss = ce if aux is None else ce + aux
            ce = ce.detach()
        return GPTOutput(logits, loss, ce, None if aux is None else aux.detach(), stats)

    # ---- optimization ------------------------------------------------------------------------
    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95), device_type: str = "cpu"
    ):
        """AdamW with weight decay on matrices and embeddings only (dim >= 2); norms' gains and
        biases are not decayed. Fused kernel (one multi-tensor update) on CUDA and on CPU."""
        params = [p for p in self.parameters() if p.requires_grad]  # tied weights appear once
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        use_fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = {"fused": True} if use_fused else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas), **extra)

    # ---- generation --------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: Optional[int] = None, dtype=None, device=None) -> KVCache:
        cfg = self.config
        ref = self.transformer.wte.weight
        return KVCache(
            cfg.n_layer, batch_size, cfg.kv_heads, max_len or cfg.block_size, cfg.head_dim,
            dtype=dtype or ref.dtype, device=device or ref.device,
        )

    @torch.no_grad()
    def stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        use_cache: bool = True,
        generator: Optional[torch.Generator] = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token ids (B, 1) one at a time (see `generate`)."""
        check_sampling_args(temperature, top_k, top_p)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must be a non-empty (batch, time) tensor, got shape {tuple(idx.shape)}")
        bs = self.config.block_size
        B, T = idx.shape
        check_fits(T, max_new_tokens, bs, use_cache)
        check_token_ids(idx, self.config.vocab_size)  # once, here: the forward itself never syncs
        was_training = self.training
        self.eval()
        try:
            if use_cache:
                cache = self.new_cache(B, max_len=max(T + max_new_tokens - 1, T))
                h, _, _ = self.hidden_states(idx, cache)  # prefill: the whole prompt in one pass
                for i in range(max_new_tokens):
                    nxt = sample_next(self.logits(h[:, -1, :]), temperature, top_k, top_p, generator)
                    yield nxt
                    if i + 1 < max_new_tokens:
                        h, _, _ = self.hidden_states(nxt, cache)  # decode: one token, cache holds the rest
            else:
                seq = idx
                for _ in range(max_new_tokens):
                    h, _, _ = self.hidden_states(seq[:, -bs:])  # crop the context to block_size
                    nxt = sample_next(self.logits(h[:, -1, :]), temperature, top_k, top_p, generator)
                    yield nxt
                    seq = torch.cat((seq, nxt), dim=1)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        use_cache: bool = True,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Append max_new_tokens tokens to idx (B, T) and return (B, T + max_new_tokens).

        temperature=0 or top_k=1 is greedy and deterministic. With use_cache=True (default) the
        prompt is prefilled into a KV cache once and each step feeds only the new token; this
        needs prompt + max_new_tokens <= block_size (else a clear error). use_cache=False re-runs
        the last block_size tokens at each step (nanoGPT's sliding crop); both give the same tokens
        while the sequence fits in block_size."""
        out = [idx]
        for nxt in self.stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator):
            out.append(nxt)
        return torch.cat(out, dim=1)
