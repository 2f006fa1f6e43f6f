"""Mixture-of-Experts feed-forward layer: router, experts, balance losses, capacity, two dispatches.

A token x (C,) picks k of E experts (Shazeer et al. 2017, "Outrageously Large Neural Networks"):

    logits = W_r x                       (E,)   router, float32, no bias
    p      = softmax(logits)             (E,)   full softmax over experts
    S      = top-k(p)                           chosen experts (Switch 2021: k=1; Mixtral 2024: k=2)
    g_i    = p_i / sum_{j in S} p_j             gates renormalized over the chosen k (Mixtral;
                                                 switch with `moe_renormalize`; with k = 1 the
                                                 gate stays p_i as in Switch: p_i/p_i = 1 would
                                                 cut the router off from the loss)
    y      = sum_{i in S} g_i * E_i(x)  (+ shared(x))
                                                 summed, never overwritten: the gates multiply the
                                                 expert outputs, which is what gives the router a
                                                 gradient from the language-model loss.

Each expert E_i is a small MLP of the config's kind (SwiGLU or GELU) with `expert_hidden_dim`
hidden units; by default k experts together have the dense MLP's width, so an MoE model has the
same *active* parameters (compute per token) as its dense twin.

Auxiliary losses (returned already weighted; the model adds them to the cross-entropy):
    balance = N * sum_i f_i * P_i                Switch Transformer (Fedus et al. 2021), eq. 4
        f_i = (assignments routed to i) / (tokens * k)    fraction, sums to 1 for any k
        P_i = mean over tokens of the FULL softmax p_i    (differentiable part)
        = 1 at perfect balance (or uniform p), = N when every token goes to one expert.
    z      = mean_tokens( logsumexp(logits)^2 )  ST-MoE router z-loss (Zoph et al. 2022, eq. 5)
    aux    = moe_aux_loss_coef * balance + moe_z_loss_coef * z

Aux-loss-free balancing (DeepSeek-V3, 2024, section 2.1.2), `moe_bias_balance=True`: a per-expert
bias b_i is added to p_i *for the top-k selection only*; gates still come from the unbiased p.
After each optimizer step the training loop calls `update_moe_bias(model)`, which moves
b_i <- b_i + rate * sign(mean_load - load_i): overloaded experts become less attractive.

Capacity (Switch Transformer; `moe_capacity_factor=None` is dropless, the default):
    capacity = max(moe_min_capacity, ceil(cf * T * k / E))      per sequence of T tokens
Tokens claim an expert's slots in position order, so a token's fate depends only on itself and
earlier tokens of its own sequence (no causality leak, no dependence on the rest of the batch).
A dropped assignment contributes zero: the token goes on through the residual connection.
The minimum capacity means a 1-token prompt (and every 1-token decode step) is never dropped.
Note: with capacity, a KV-cached decode step sees one token at a time and never drops, while a
full-sequence pass may drop later tokens; dropless MoE (the default) has no such difference.

Two dispatches with identical results (tests check outputs and gradients):
    "reference": a loop over experts, each gathering its tokens (index_select) and adding its
                 weighted output back (index_add). Easy to read.
    "fast":      sort the (token, expert) assignments by expert so each expert's tokens are
                 contiguous, run the experts with one of three kernels (`pick_kernel`):
                 `F.grouped_mm` (PyTorch's MoE kernel), a loop of matmuls over `W.unbind(0)`
                 (not `W[e]`: each `W[e]`'s backward writes a full-size zero tensor), or two
                 `bmm` over the experts padded to the largest count; then scatter back.
                 The dropless grouped path has no host sync and compiles (torch.compile) to
                 one graph; capacity (`nonzero`), the loop and the padding read a count on the
                 host and break the graph there.

The experts are stored as stacked 3-D parameters `c_fc` (E, C, 2H or H) and `c_proj` (E, H, C),
not a ModuleList: an expert that gets no tokens still has a (zero) gradient, so DDP never waits
for a gradient that does not come.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .mlp import MLP


def _activation(h: torch.Tensor, kind: str) -> torch.Tensor:
    """SwiGLU: silu(gate) * up with h = [gate | up] along the last dim (like MLP.c_fc); or GELU."""
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate="tanh")


def expert_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor, kind: str) -> torch.Tensor:
    """One expert: x (n, C) @ w_fc (C, 2H | H) -> activation -> @ w_proj (H, C) -> (n, C)."""
    return _activation(x @ w_fc, kind) @ w_proj


class Experts(nn.Module):
    """E expert MLPs stored as stacked weights: `c_fc` (E, C, 2H | H), `c_proj` (E, H, C); y = x @ W.

    Expert e's `c_fc[e]` is the transpose of a dense `MLP.c_fc.weight` (rows [gate; up])."""

    def __init__(self, n_experts: int, n_embd: int, hidden: int, kind: str):
        super().__init__()
        self.n_experts, self.n_embd, self.hidden, self.kind = n_experts, n_embd, hidden, kind
        n_in = 2 * hidden if kind == "swiglu" else hidden
        self.c_fc = nn.Parameter(torch.empty(n_experts, n_embd, n_in))
        self.c_proj = nn.Parameter(torch.empty(n_experts, hidden, n_embd))
        # N(0, 0.02) like every Linear; GPT's init then rescales every "c_proj" by 1/sqrt(2 n_layer).
        nn.init.normal_(self.c_fc, mean=0.0, std=0.02)
        nn.init.normal_(self.c_proj, mean=0.0, std=0.02)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, n_embd={self.n_embd}, hidden={self.hidden}, kind={self.kind!r}"


def capacity(tokens: int, n_experts: int, top_k: int, factor: float, min_capacity: int) -> int:
    """Slots per expert for one sequence of `tokens` tokens (Switch Transformer, eq. 3, with a floor)."""
    return max(min_capacity, math.ceil(factor * tokens * top_k / n_experts))


def capacity_keep(topk_idx: torch.Tensor, n_experts: int, cap: int) -> torch.Tensor:
    """topk_idx (B, T, k) -> keep (B, T, k) bool: assignment kept iff fewer than `cap` EARLIER
    tokens of the same sequence chose that expert. Tokens claim slots in position order, so
    nothing a later token does (or another sequence does) can drop an earlier token."""
    chosen = F.one_hot(topk_idx, n_experts).sum(2)  # (B, T, E) 0/1: the k experts of a token are distinct
    earlier = chosen.cumsum(1) - chosen  # (B, T, E) how many earlier tokens chose each expert
    return earlier.gather(-1, topk_idx) < cap  # (B, T, k)


# Three ways to run E experts over rows already sorted by expert (counts[e] consecutive rows each).
# Same numbers (tests check it); they differ in how many kernels they launch.


def experts_grouped(xs, expert_sorted, counts, w_fc, w_proj, kind):
    """Two `F.grouped_mm` calls: PyTorch's MoE kernel (fused on CUDA, no host sync)."""
    offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's group
    return F.grouped_mm(_activation(F.grouped_mm(xs, w_fc, offs=offs), kind), w_proj, offs=offs)


def experts_loop(xs, expert_sorted, counts, w_fc, w_proj, kind):
    """One matmul per expert over `W.unbind(0)` (indexing `W[e]` instead would make each
    backward write a full-size zero tensor of W)."""
    chunks = xs.split(counts.tolist())  # host sync; some chunks may be empty
    return torch.cat([expert_mlp(c, wf, wp, kind) for c, wf, wp in zip(chunks, w_fc.unbind(0), w_proj.unbind(0))])


def experts_padded(xs, expert_sorted, counts, w_fc, w_proj, kind):
    """Pad every expert's rows with zeros up to the largest count, then two `torch.bmm` over
    (E, max_count, .): two big kernels instead of 2E small ones, at the price of computing the
    padding (max/mean load - 1: ~10-20% once the router is balanced, much more before).
    Padded rows are zero in and never read out, so outputs and gradients are exact."""
    E, C = w_fc.size(0), xs.size(1)
    start = counts.cumsum(0) - counts
    slot = torch.arange(xs.size(0), device=xs.device) - start[expert_sorted]  # row within its expert
    buf = xs.new_zeros(E, int(counts.max()) if xs.size(0) else 0, C).index_put((expert_sorted, slot), xs)
    out = torch.bmm(_activation(torch.bmm(buf, w_fc), kind), w_proj)  # (E, max_count, C)
    return out[expert_sorted, slot]  # (M, C)


KERNELS = {"grouped": experts_grouped, "loop": experts_loop, "padded": experts_padded}


def pick_kernel(dtype: torch.dtype, device: torch.device, n_embd: int, hidden: int) -> str:
    """The expert kernel of the fast path.

    - "grouped" (`F.grouped_mm`) where it runs: on CUDA it is the fused MoE kernel (bf16, sm80+);
      on CPU it is exact and as fast as the unbind loop (scripts/bench_03_moe.py, torch 2.15,
      4096 tokens, 8 experts top-2: 1.04-1.10x the dense MLP, the loop 1.01-1.07x, padded bmm
      1.16-1.27x), and it leaves no graph break for torch.compile;
    - "loop" on CPU when grouped_mm cannot run (sizes not 16-byte aligned, float64);
    - "padded" on other GPUs (a T4 runs fp16): two bmm launches instead of 2E small matmuls.
      This GPU choice is not measured here (the course machine has no GPU)."""
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 0
    grouped_ok = (
        hasattr(F, "grouped_mm")
        and dtype in (torch.float32, torch.bfloat16, torch.float16)
        and (n_embd * size) % 16 == 0
        and (hidden * size) % 16 == 0  # its kernels need 16-byte aligned rows
    )
    if device.type == "cuda":
        fused = dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
        return "grouped" if grouped_ok and fused else "padded"
    return "grouped" if grouped_ok else "loop"


class MoE(nn.Module):
    """Top-k routed Mixture-of-Experts MLP. forward(x (B, T, C)) -> (y (B, T, C), aux_loss, stats).

    `aux_loss` is the weighted scalar moe_aux_loss_coef * balance + moe_z_loss_coef * z_loss;
    `stats` a dict of detached tensors: load (E,) routed assignments per expert (before capacity),
    importance (E,) mean full-softmax probability, tokens, dropped (assignments), entropy
    (mean router entropy / log E), top1_prob, balance_loss, z_loss (raw, before coefficients),
    topk_idx (B, T, k) the chosen experts."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_experts < 1:
            raise ValueError("MoE needs config.n_experts >= 1 (n_experts=0 builds a dense MLP instead)")
        self.n_experts = config.n_experts
        self.top_k = config.moe_top_k
        self.kind = config.mlp
        # With k = 1 a renormalized gate is p/p = 1: the router would get no gradient from the
        # language-model loss. Switch (k = 1) uses the raw probability, so we do too.
        self.renormalize = config.moe_renormalize and config.moe_top_k > 1
        self.aux_coef = config.moe_aux_loss_coef
        self.z_coef = config.moe_z_loss_coef
        self.capacity_factor = config.moe_capacity_factor
        self.min_capacity = config.moe_min_capacity
        self.impl = config.moe_impl
        self.bias_update_rate = config.moe_bias_update_rate
        # Expert kernel of the fast path: None = `pick_kernel` decides per call; or force one of
        # KERNELS ("grouped", "loop", "padded") for benchmarks and tests.
        self.kernel: Optional[str] = None

        self.router = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.experts = Experts(config.n_experts, config.n_embd, config.expert_hidden_dim, config.mlp)
        self.shared = None
        if config.n_shared_experts > 0:
            # DeepSeekMoE: always-on experts that hold the common knowledge.
            self.shared = MLP(config.n_embd, config.n_shared_experts * config.expert_hidden_dim, config.mlp, config.bias)
        self.dropout = nn.Dropout(config.dropout)
        if config.moe_bias_balance:
            # DeepSeek-V3 selection bias: a buffer (not a parameter, no gradient), saved in checkpoints.
            self.register_buffer("expert_bias", torch.zeros(config.n_experts))
        else:
            self.expert_bias = None
        # Load accumulated over training forwards since the last `update_moe_bias` call. A plain
        # attribute, not a buffer: DDP would broadcast rank 0's buffer over the others'.
        self._load_since_update: Optional[torch.Tensor] = None

    # ---- routing -------------------------------------------------------------------------------
    def route(self, x: torch.Tensor):
        """x (B, T, C) -> logits (B, T, E) fp32, probs (B, T, E), topk_idx (B, T, k), gates (B, T, k)."""
        with torch.autocast(x.device.type, enabled=False):  # the router stays in float32 under AMP
            logits = F.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(dim=-1)
        scores = probs if self.expert_bias is None else probs + self.expert_bias  # bias: selection only
        topk_idx = scores.topk(self.top_k, dim=-1).indices  # (B, T, k)
        gates = probs.gather(-1, topk_idx)  # (B, T, k) from the unbiased probabilities
        if self.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return logits, probs, topk_idx, gates

    def forward(self, x: torch.Tensor):
        B, T, C = x.shape
        E, k = self.n_experts, self.top_k
        logits, probs, topk_idx, gates = self.route(x)

        keep = None
        if self.capacity_factor is not None:
            keep = capacity_keep(topk_idx, E, capacity(T, E, k, self.capacity_factor, self.min_capacity))

        x_flat = x.reshape(B * T, C)
        if self.impl == "reference":
            y = self._dispatch_reference(x_flat, topk_idx.reshape(-1, k), gates.reshape(-1, k), keep)
        else:
            y = self._dispatch_fast(x_flat, topk_idx.reshape(-1), gates.reshape(-1), keep)
        y = y.view(B, T, C)
        if self.shared is not None:
            y = y + self.shared(x)
        y = self.dropout(y)

        # ---- auxiliary losses (from the full softmax, before any dropping) ----
        N = B * T
        load = torch.zeros(E, device=x.device, dtype=torch.float32)
        load.scatter_add_(0, topk_idx.reshape(-1), torch.ones(N * k, device=x.device))  # (E,) assignments
        f = load / (N * k)  # fraction of assignments, sums to 1 for any k (no gradient: top-k)
        P = probs.reshape(N, E).mean(0)  # (E,) mean full-softmax probability (carries the gradient)
        balance = E * (f * P).sum()
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        aux = self.aux_coef * balance + self.z_coef * z_loss

        if self.expert_bias is not None and self.training:
            acc = self._load_since_update
            self._load_since_update = load.detach() if acc is None else acc + load.detach()

        with torch.no_grad():
            p = probs.reshape(N, E)
            entropy = torch.special.entr(p).sum(-1).mean() / math.log(E) if E > 1 else p.new_zeros(())
            stats = {
                "load": load.detach(),
                "importance": P.detach(),
                "tokens": torch.tensor(N, device=x.device),
                "dropped": (~keep).sum() if keep is not None else torch.zeros((), dtype=torch.long, device=x.device),
                "entropy": entropy,
                "top1_prob": p.max(-1).values.mean(),
                "balance_loss": balance.detach(),
                "z_loss": z_loss.detach(),
                "topk_idx": topk_idx.detach(),
            }
        return y, aux, stats

    # ---- dispatch: readable reference --------------------------------------------------------
    def _dispatch_reference(self, x, topk_idx, gates, keep):
        """x (N, C), topk_idx (N, k), gates (N, k), keep (B, T, k) or None -> y (N, C)."""
        y = torch.zeros_like(x)
        if keep is not None:
            keep = keep.reshape(topk_idx.shape)
        for e in range(self.n_experts):
            chosen = topk_idx == e  # (N, k): at most one True per row
            if keep is not None:
                chosen = chosen & keep  # a dropped assignment is simply not computed
            tok, slot = torch.where(chosen)  # tokens routed to e, and which of their k choices it was
            out = expert_mlp(x.index_select(0, tok), self.experts.c_fc[e], self.experts.c_proj[e], self.kind)
            g = gates[tok, slot].unsqueeze(1).to(out.dtype)  # (n_e, 1)
            y.index_add_(0, tok, (out * g).to(y.dtype))  # add (never overwrite): a token sums its k experts
        return y

    # ---- dispatch: sorted, one (grouped) matmul per expert ----------------------------------
    def _dispatch_fast(self, x, expert_of, gates, keep):
        """x (N, C), expert_of (N*k,), gates (N*k,), keep (B, T, k) or None -> y (N, C)."""
        E, k = self.n_experts, self.top_k
        token_of = torch.arange(expert_of.numel(), device=x.device) // k  # (N*k,) assignment -> token
        if keep is not None:  # capacity: remove dropped assignments before dispatch
            kept = keep.reshape(-1).nonzero().squeeze(1)
            expert_of, gates, token_of = expert_of[kept], gates[kept], token_of[kept]
        order = torch.argsort(expert_of, stable=True)  # group assignments by expert
        token_sorted = token_of[order]
        counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, expert_of, torch.ones_like(expert_of))
        xs = x.index_select(0, token_sorted)  # (M, C) tokens in expert order
        w_fc, w_proj = self.experts.c_fc, self.experts.c_proj
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else xs.dtype  # compute dtype
        kernel = self.kernel or pick_kernel(dt, x.device, x.size(1), self.experts.hidden)
        if kernel == "grouped" and (dt != xs.dtype or dt != w_fc.dtype):
            xs, w_fc, w_proj = xs.to(dt), w_fc.to(dt), w_proj.to(dt)  # grouped_mm is not on autocast's lists
        out = KERNELS[kernel](xs, expert_of[order], counts, w_fc, w_proj, self.kind)  # (M, C)
        out = out * gates[order].unsqueeze(1).to(out.dtype)
        return torch.zeros(x.shape, dtype=out.dtype, device=x.device).index_add_(0, token_sorted, out).to(x.dtype)


def moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE layers of a model, in order (the order of `model.last_moe_stats`)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def update_moe_bias(model: nn.Module) -> int:
    """DeepSeek-V3 auxiliary-loss-free balancing: call once after each optimizer step.

    For every MoE layer with `moe_bias_balance`, b_i += rate * sign(mean_load - load_i) using the
    load accumulated by the training forwards since the previous call (all micro-batches; summed
    over ranks under torch.distributed so every rank keeps the same bias), then resets it.
    Returns the number of layers updated (0 for a model without bias balancing)."""
    model = getattr(model, "module", model)  # DDP wrapper
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    n = 0
    for m in moe_layers(model):
        if m.expert_bias is None or m._load_since_update is None:
            continue
        load = m._load_since_update.to(m.expert_bias.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        m.expert_bias.add_(m.bias_update_rate * torch.sign(load.mean() - load))
        m._load_since_update = None
        n += 1
    return n
