"""Mixture-of-Experts feed-forward layer: router, experts, balance losses, capacity, two dispatches.

Shape suffixes (as in torchtitan; the same in `nanomoe.dispatch`): B batch, T time, N = B*T tokens,
D model width (n_embd, C in the other modules), E experts, L experts held by this process (E, or
E/W under expert parallelism), F an expert's hidden width (2H for SwiGLU's gate and up, else H),
k experts per token, A = N*k assignments, M rows handed to the expert kernel. `x_ND` is x with
shape (N, D); `w1_EFD`-style names spell a weight's shape the same way.

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

Sigmoid router (DeepSeek-V3, arXiv 2412.19437, section 2.1, eq. 12-16), `moe_router="sigmoid"`:
    s      = sigmoid(logits)             (E,)   independent affinities, they do not sum to 1
    S      = top-k(s (+ bias))                  the selection bias only chooses
    g_i    = scaling * s_i / sum_{j in S} s_j   gates renormalized over the chosen k, times the
                                                 routed scaling factor `moe_routed_scaling`
The balance loss then uses P from the normalized scores s / sum_j s_j (eq. 19).

Balance scope (`moe_balance_scope`), where f_i is counted:
    "micro_batch"  the tokens of this forward (chapter 03, Switch);
    "sequence"     each sequence alone, then the mean over sequences: DeepSeek-V3's
                   complementary sequence-wise loss (eq. 17-20), which keeps even one
                   sequence from piling onto a few experts;
    "global"       the whole optimizer step: every micro-batch of every rank (Qiu et al. 2025,
                   "Demons in the Detail", arXiv 2501.11873). f_i . P_i is not linear, so the
                   counts are summed first and the loss comes after. How, exactly:
                   - one micro-batch per rank: the training step passes
                     `moe_loads=BALANCE_AFTER_FORWARD`; the layer leaves its balance term out of the
                     aux loss and hands out P_i (with its gradient) and its counts; after the
                     forward the step sums the counts over the ranks and adds the term itself
                     (`balance_after_forward`): no extra forward, no collective in the layer;
                   - with gradient accumulation, the training step calls
                     `global_balance_prepass(model, micro_batches)`: a no-grad routing pass over
                     the step's micro-batches before the first backward (one extra forward,
                     ~+1/3 compute) whose counts it sums over the ranks, and passes them to every
                     training forward of the step (`model(x, y, moe_loads=...)`).
                   The layer decides nothing about ranks: what to sum is the step's. The loss of micro-batch
                     m is then N sum_i f_i P_i^(m); averaged over equal micro-batches (the loop
                     divides by grad_accum) and ranks (DDP) it is exactly N sum_i f_i P_i of the
                     whole step. Tests: 2 micro-batches == 1 batch, 2 gloo ranks == 1 process.

Aux-loss-free balancing (DeepSeek-V3, 2024, section 2.1.2), `moe_bias_balance=True`: a per-expert
bias b_i is added to p_i *for the top-k selection only*; gates still come from the unbiased p, and
the balance loss (any scope) counts f_i over the top-k of the unbiased scores (eq. 18), as
Megatron-LM's `compute_routing_scores_for_aux_loss` does; the bias update counts the real load.
After each optimizer step the training loop calls `update_moe_bias(model)`, which moves
b_i <- b_i + rate * sign(mean_load - load_i): overloaded experts become less attractive. The loads
are the step's training forwards' `stats["load"]`, summed by the training step (`add_loads`): the
layer keeps no state between forwards.

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
                 The grouped path has no host sync, dropless or with capacity (dropped
                 assignments sort after every expert's group instead of being removed with
                 `nonzero`), and compiles (torch.compile) to one graph; the loop and the padding
                 read a count on the host and break the graph there (tests/test_no_host_sync.py).

Routing statistics (`stats`) are computed only when read: a `RoutingStats` mapping holds the
tensors the forward already has and computes entropy, top-1 probability, ... on first access,
so a training step that never logs pays nothing for them.

The experts are stored as stacked 3-D parameters `c_fc` (E, C, 2H or H) and `c_proj` (E, H, C),
not a ModuleList: an expert that gets no tokens still has a (zero) gradient, so DDP never waits
for a gradient that does not come.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .dispatch import LocalDispatcher
from .mlp import MLP, activation
from .parallel.distributed import unwrap


def expert_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor, kind: str, approximate: str = "tanh"):
    """One expert: x (n, C) @ w_fc (C, 2H | H) -> activation -> @ w_proj (H, C) -> (n, C)."""
    return activation(x @ w_fc, kind, approximate) @ w_proj


class Experts(nn.Module):
    """E expert MLPs stored as stacked weights: `c_fc` (E, C, 2H | H), `c_proj` (E, H, C); y = x @ W.

    Expert e's `c_fc[e]` is the transpose of a dense `MLP.c_fc.weight` (rows [gate; up])."""

    def __init__(self, n_experts: int, n_embd: int, hidden: int, kind: str, gelu_approximate: str = "tanh"):
        super().__init__()
        self.n_experts, self.n_embd, self.hidden, self.kind = n_experts, n_embd, hidden, kind
        self.gelu_approximate = gelu_approximate
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
    # (B, T, E) 0/1: the k experts of a token are distinct (scatter, not one_hot, which checks the ids' range)
    chosen = torch.zeros(*topk_idx.shape[:-1], n_experts, dtype=torch.long, device=topk_idx.device)
    chosen.scatter_(-1, topk_idx, 1)
    earlier = chosen.cumsum(1) - chosen  # (B, T, E) how many earlier tokens chose each expert
    return earlier.gather(-1, topk_idx) < cap  # (B, T, k)


# Three ways to run E experts over rows already sorted by expert (counts[e] consecutive rows each).
# Same numbers (tests check it); they differ in how many kernels they launch.


def experts_grouped(xs, expert_sorted, counts, w_fc, w_proj, kind, approximate="tanh"):
    """Two `F.grouped_mm` calls: PyTorch's MoE kernel (fused on CUDA, no host sync)."""
    offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's group
    return F.grouped_mm(activation(F.grouped_mm(xs, w_fc, offs=offs), kind, approximate), w_proj, offs=offs)


def experts_loop(xs, expert_sorted, counts, w_fc, w_proj, kind, approximate="tanh"):
    """One matmul per expert over `W.unbind(0)` (indexing `W[e]` instead would make each
    backward write a full-size zero tensor of W)."""
    chunks = xs.split(counts.tolist())  # host sync; some chunks may be empty
    return torch.cat([expert_mlp(c, wf, wp, kind, approximate)
                      for c, wf, wp in zip(chunks, w_fc.unbind(0), w_proj.unbind(0))])


def experts_padded(xs, expert_sorted, counts, w_fc, w_proj, kind, approximate="tanh"):
    """Pad every expert's rows with zeros up to the largest count, then two `torch.bmm` over
    (E, max_count, .): two big kernels instead of 2E small ones, at the price of computing the
    padding (max/mean load - 1: ~10-20% once the router is balanced, much more before).
    Padded rows are zero in and never read out, so outputs and gradients are exact."""
    E, C = w_fc.size(0), xs.size(1)
    start = counts.cumsum(0) - counts
    slot = torch.arange(xs.size(0), device=xs.device) - start[expert_sorted]  # row within its expert
    buf = xs.new_zeros(E, int(counts.max()) if xs.size(0) else 0, C).index_put((expert_sorted, slot), xs)
    out = torch.bmm(activation(torch.bmm(buf, w_fc), kind, approximate), w_proj)  # (E, max_count, C)
    return out[expert_sorted, slot]  # (M, C)


# `moe_loads=BALANCE_AFTER_FORWARD`: the global balance term is added by the training step after the
# forward, from the counts summed over the ranks (`balance_after_forward`).
BALANCE_AFTER_FORWARD = "after_forward"

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


# ---- routing: small functions, one step each (expert parallelism reuses them) ----------------------


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., C), weight (E, C) -> logits (..., E) in float32 (the router stays fp32 under AMP)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), weight.float())


def router_scores(logits: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (..., E) -> (scores, probs), both (..., E).

    scores: what the top-k chooses among and the gates are read from; softmax(logits) for
    "softmax", sigmoid(logits) for "sigmoid" (DeepSeek-V3, eq. 15).
    probs: a distribution over experts (sums to 1) for the balance loss and the statistics;
    the softmax itself, or the normalized sigmoid scores s / sum_j s_j (DeepSeek-V3, eq. 19)."""
    if kind == "sigmoid":
        s = torch.sigmoid(logits)
        return s, s / s.sum(-1, keepdim=True)
    p = logits.softmax(dim=-1)
    return p, p


def select_experts(scores: torch.Tensor, top_k: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """scores (..., E) -> topk_idx (..., k). The DeepSeek-V3 bias (E,) only changes the choice."""
    chosen_by = scores if bias is None else scores + bias
    return chosen_by.topk(top_k, dim=-1).indices


def gate_weights(scores: torch.Tensor, topk_idx: torch.Tensor, renormalize: bool, scaling: float = 1.0):
    """scores (..., E), topk_idx (..., k) -> gates (..., k): the chosen scores (never the biased
    ones), renormalized over the chosen k when asked, times the routed scaling factor."""
    gates = scores.gather(-1, topk_idx)
    if renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return gates * scaling if scaling != 1.0 else gates


def expert_counts(topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """topk_idx (..., T, k) -> float32 counts (..., E) of assignments per expert, summed over T and k."""
    flat = topk_idx.flatten(-2)  # (..., T*k)
    counts = torch.zeros(*flat.shape[:-1], n_experts, device=topk_idx.device)
    return counts.scatter_add_(-1, flat, torch.ones(flat.shape, device=topk_idx.device))  # no host sync


def balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor, scope: str, load: Optional[torch.Tensor] = None):
    """N sum_i f_i P_i (Switch, eq. 4) with f_i counted over `scope`; probs (B, T, E), topk_idx (B, T, k).

    f_i = assignments to i / all assignments (sums to 1 for any k; no gradient), P_i = mean of probs_i.
    "micro_batch": f, P over all B*T tokens; "sequence": per sequence, then the mean over the B
    sequences (DeepSeek-V3's sequence-wise loss); "global": P over these tokens, f from `load`,
    the (E,) counts of the whole step (summed over micro-batches and ranks by the caller).
    = 1 at perfect balance, = N when every token goes to one expert."""
    E = probs.size(-1)
    if scope == "sequence":
        f = expert_counts(topk_idx, E)  # (B, E)
        f = f / f.sum(-1, keepdim=True)
        return E * (f * probs.mean(1)).sum(-1).mean()
    if load is None:
        load = expert_counts(topk_idx.reshape(1, -1, topk_idx.size(-1)), E)[0]
    f = load / load.sum()
    P = probs.reshape(-1, E).mean(0)  # (E,) carries the gradient
    return E * (f * P).sum()


class RoutingStats(Mapping):
    """One MoE layer's routing statistics, read like a dict; each value is computed (detached) on
    first access from the tensors the forward already has, so a forward nobody logs costs nothing.

    Keys: load (E,) assignments per expert (before capacity), importance (E,) mean of probs, tokens,
    dropped (assignments), entropy (mean router entropy / log E), top1_prob, balance_loss, z_loss
    (raw, before coefficients), topk_idx (B, T, k)."""

    pending_balance: Optional[tuple] = None  # (coef, P (E,) with gradient, counts (E,)): see balance_after_forward

    def __init__(self, values: dict[str, Callable[[], torch.Tensor]]):
        self._make, self._done = values, {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._done:
            with torch.no_grad():
                self._done[key] = self._make[key]().detach()
        return self._done[key]

    def __iter__(self):
        return iter(self._make)

    def __len__(self) -> int:
        return len(self._make)


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the rows of probs (N, E) divided by log E (1 = uniform, 0 = one-hot)."""
    E = probs.size(-1)
    return torch.special.entr(probs).sum(-1).mean() / math.log(E) if E > 1 else probs.new_zeros(())


class MoE(nn.Module):
    """Top-k routed Mixture-of-Experts MLP. forward(x (B, T, C)) -> (y (B, T, C), aux_loss, stats).

    `aux_loss` is the weighted scalar moe_aux_loss_coef * balance + moe_z_loss_coef * z_loss;
    `stats` a `RoutingStats` (computed when read): load, importance, tokens, dropped, entropy,
    top1_prob, balance_loss, z_loss, topk_idx."""

    def __init__(self, config: GPTConfig, dispatcher=None):
        super().__init__()
        if config.n_experts < 1:
            raise ValueError("MoE needs config.n_experts >= 1 (n_experts=0 builds a dense MLP instead)")
        self.n_experts = config.n_experts
        self.top_k = config.moe_top_k
        self.kind = config.mlp
        self.gelu_approximate = config.gelu_approximate
        self.router_kind = config.moe_router
        self.routed_scaling = config.moe_routed_scaling
        self.balance_scope = config.moe_balance_scope
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

        # How rows reach their experts: all here (`LocalDispatcher`), or spread over ranks
        # (`nanomoe.parallel.expert_parallel.AllToAllDispatcher`); this process builds only the
        # experts it holds (dispatcher.local_experts of them).
        self.dispatcher = dispatcher or LocalDispatcher(config.n_experts, config.moe_top_k)
        self.router = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.experts = Experts(self.dispatcher.local_experts, config.n_embd, config.expert_hidden_dim, config.mlp,
                               config.gelu_approximate)
        self.shared = None
        if config.n_shared_experts > 0:
            # DeepSeekMoE: always-on experts that hold the common knowledge.
            hidden = config.n_shared_experts * config.expert_hidden_dim
            self.shared = MLP(config.n_embd, hidden, config.mlp, config.bias, gelu_approximate=config.gelu_approximate)
        self.dropout = nn.Dropout(config.dropout)
        if config.moe_bias_balance:
            # DeepSeek-V3 selection bias: a buffer (not a parameter, no gradient), saved in checkpoints.
            self.register_buffer("expert_bias", torch.zeros(config.n_experts))
        else:
            self.expert_bias = None

    # ---- routing -------------------------------------------------------------------------------
    def route(self, x: torch.Tensor):
        """x (B, T, C) -> logits (B, T, E) fp32, probs (B, T, E), topk_idx (B, T, k), gates (B, T, k).

        probs is the distribution of the balance loss (the softmax, or the normalized sigmoid scores)."""
        logits = router_logits(x, self.router.weight)
        scores, probs = router_scores(logits, self.router_kind)
        topk_idx = select_experts(scores, self.top_k, self.expert_bias)  # (B, T, k)
        gates = gate_weights(scores, topk_idx, self.renormalize, self.routed_scaling)  # (B, T, k)
        return logits, probs, topk_idx, gates

    @staticmethod
    def _global_load(load: torch.Tensor, step_load) -> torch.Tensor:
        """The (E,) counts of the whole optimizer step for the global balance loss (training only):
        the training step's `step_load`, or this forward's own when it is the whole step."""
        if isinstance(step_load, torch.Tensor):
            return step_load
        if isinstance(step_load, str):  # BALANCE_AFTER_FORWARD
            return load  # only the stats read this: the step computes the loss term (balance_after_forward)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError("global balance across ranks: the training step must pass the step's counts, "
                               "model(x, y, moe_loads=global_balance_prepass(model, micro_batches))")
        return load

    def forward(self, x: torch.Tensor, step_load: Optional[torch.Tensor] = None):
        """x (B, T, C) -> (y (B, T, C), aux_loss, stats): route -> dispatch -> experts -> combine.
        step_load (E,): the step's expert counts for the global balance scope (from
        `global_balance_prepass`), `BALANCE_AFTER_FORWARD` (the step adds the term), else None."""
        B, T, C = x.shape
        E, k = self.n_experts, self.top_k
        logits, probs, topk_idx, gates = self.route(x)  # (B, T, E) x2, (B, T, k) x2
        keep = None
        if self.capacity_factor is not None:
            keep = capacity_keep(topk_idx, E, capacity(T, E, k, self.capacity_factor, self.min_capacity))

        x_ND = x.reshape(B * T, C)
        if self.impl == "reference":
            y_ND = self._dispatch_reference(x_ND, topk_idx.reshape(-1, k), gates.reshape(-1, k), keep)
        else:
            keep_A = None if keep is None else keep.reshape(-1)
            xs_MD, counts_L, state = self.dispatcher.dispatch(x_ND, topk_idx.reshape(-1), gates.reshape(-1), keep_A)
            out_MD = self._run_experts(xs_MD, counts_L)
            y_ND = self.dispatcher.combine(out_MD, state)
        y = y_ND.view(B, T, C)
        if self.shared is not None:
            y = y + self.shared(x)
        y = self.dropout(y)
        aux, stats = self._losses(logits, probs, topk_idx, keep, step_load)
        return y, aux, stats

    def _losses(self, logits, probs, topk_idx, keep, step_load):
        """The weighted auxiliary loss and the `RoutingStats`, from the full distribution (before
        any dropping): logits, probs (B, T, E), topk_idx (B, T, k), keep (B, T, k) or None."""
        B, T, k = topk_idx.shape
        E = self.n_experts
        load = expert_counts(topk_idx.reshape(1, B * T, k), E)[0]  # (E,) assignments of this forward
        # The balance loss counts f_i over the top-k of the UNBIASED scores (DeepSeek-V3, eq. 17-20:
        # the bias b_i of eq. 16 only chooses experts); probs ranks the experts like the scores.
        bal_idx = topk_idx if self.expert_bias is None else probs.topk(k, dim=-1).indices  # (B, T, k)
        bal_load = load if self.expert_bias is None else expert_counts(bal_idx.reshape(1, B * T, k), E)[0]

        def balance() -> torch.Tensor:
            if self.balance_scope == "global" and self.training:
                return balance_loss(probs, bal_idx, "global", self._global_load(bal_load, step_load))
            scope_load = bal_load if self.balance_scope != "sequence" else None
            return balance_loss(probs, bal_idx, self.balance_scope, scope_load)

        def z_loss() -> torch.Tensor:
            return torch.logsumexp(logits, dim=-1).square().mean()  # ST-MoE, eq. 5

        after = self.balance_scope == "global" and self.training and isinstance(step_load, str)
        bal = balance() if not after and (self.aux_coef or (self.balance_scope == "global" and self.training)) else None
        z = z_loss() if self.z_coef else None
        aux = probs.new_zeros(())
        if bal is not None:
            aux = aux + self.aux_coef * bal
        if z is not None:
            aux = aux + self.z_coef * z

        stats = RoutingStats({
            "load": lambda: load,  # the experts really chosen (the bias update counts these)
            "balance_load": lambda: bal_load,  # f_i's counts: top-k of the unbiased scores
            "importance": lambda: probs.reshape(-1, E).mean(0),
            "tokens": lambda: torch.tensor(B * T, device=logits.device),
            "dropped": lambda: (~keep).sum() if keep is not None else topk_idx.new_zeros(()),
            "entropy": lambda: _entropy(probs.reshape(-1, E)),
            "top1_prob": lambda: probs.reshape(-1, E).max(-1).values.mean(),
            "balance_loss": (lambda: bal) if bal is not None else balance,
            "z_loss": (lambda: z) if z is not None else z_loss,
            "topk_idx": lambda: topk_idx,
        })
        if after:  # P_i keeps its gradient: the step's term a * N * sum_i f_i P_i flows back through it
            stats.pending_balance = (self.aux_coef, probs.reshape(-1, E).mean(0), bal_load)
        return aux, stats

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
            out = expert_mlp(x.index_select(0, tok), self.experts.c_fc[e], self.experts.c_proj[e], self.kind,
                             self.gelu_approximate)
            g = gates[tok, slot].unsqueeze(1).to(out.dtype)  # (n_e, 1)
            y.index_add_(0, tok, (out * g).to(y.dtype))  # add (never overwrite): a token sums its k experts
        return y

    # ---- the experts: one kernel over rows grouped by expert ---------------------------------
    def _run_experts(self, xs_MD: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        """xs_MD rows grouped by local expert (counts_L[e] each; rows past them were dropped by
        capacity) -> (M, D): the chosen kernel (`KERNELS`) on this layer's stacked experts, in the
        autocast dtype when one is active."""
        w_fc, w_proj = self.experts.c_fc, self.experts.c_proj
        dev = xs_MD.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else xs_MD.dtype  # compute dtype
        kernel = self.kernel or pick_kernel(dt, xs_MD.device, xs_MD.size(1), self.experts.hidden)
        if kernel == "grouped":  # rows past the last group are left alone (no host sync)
            if dt != xs_MD.dtype or dt != w_fc.dtype:
                xs_MD, w_fc, w_proj = xs_MD.to(dt), w_fc.to(dt), w_proj.to(dt)  # grouped_mm is not on autocast's lists
            return experts_grouped(xs_MD, None, counts_L, w_fc, w_proj, self.kind, self.gelu_approximate)
        # the loop and the padding read the counts on the host anyway: run the kept rows only
        xs_MD = xs_MD[: int(counts_L.sum())]
        expert_M = torch.repeat_interleave(torch.arange(counts_L.numel(), device=xs_MD.device), counts_L)
        return KERNELS[kernel](xs_MD, expert_M, counts_L, w_fc, w_proj, self.kind, self.gelu_approximate)


def moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE layers of a model, in order (the order of a forward's `moe_stats`)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def balance_after_forward(stats: list) -> Optional[torch.Tensor]:
    """The global balance term of a step that is one micro-batch per rank, computed by the training
    step after `out = model(x, y, moe_loads=BALANCE_AFTER_FORWARD)`: for each layer that left its
    term out (`RoutingStats.pending_balance`), a * N * sum_i f_i P_i with f_i from the counts summed
    over the ranks (Qiu et al. 2025, arXiv 2501.11873) and P_i this rank's, with its gradient. Add it
    to `out.loss` before the backward. None when no layer left a term."""
    total = None
    for st in stats:
        if st.pending_balance is None:
            continue
        coef, P, load = st.pending_balance  # (E,) with gradient, (E,) counts of this rank
        load = load.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)  # the step's collective, between the forward and the backward
        term = coef * balance_loss(P.view(1, 1, -1), None, "global", load)
        total = term if total is None else total + term
    return total


def add_loads(acc: Optional[list], stats: list, key: str = "load") -> list:
    """Running per-layer sum of the (E,) expert loads of a step's training forwards:
    `acc = add_loads(acc, out.moe_stats)` after each micro-batch (acc starts as None). key="load"
    counts the experts really chosen; "balance_load" the balance loss's f_i counts (unbiased top-k)."""
    loads = [st[key] for st in stats]
    return loads if acc is None else [a + b for a, b in zip(acc, loads)]


@torch.no_grad()
def update_moe_bias(model: nn.Module, loads: Optional[list]) -> int:
    """DeepSeek-V3 auxiliary-loss-free balancing: the training step calls it once after each
    optimizer step with `loads`, one (E,) tensor per MoE layer summed over the step's training
    forwards (`add_loads`).

    For every MoE layer with `moe_bias_balance`, b_i += rate * sign(mean_load - load_i), the loads
    summed over ranks under torch.distributed so every rank keeps the same bias. Returns the
    number of layers updated (0 for a model without bias balancing, or no loads)."""
    n = 0
    for m, load in zip(moe_layers(unwrap(model)), loads or []):
        if m.expert_bias is None:
            continue
        load = load.to(m.expert_bias.device, copy=True)  # the all-reduce below must not touch the stats
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        m.expert_bias.add_(m.bias_update_rate * torch.sign(load.mean() - load))
        n += 1
    return n


@torch.no_grad()
def global_balance_prepass(model: nn.Module, micro_batches: Iterable[torch.Tensor]) -> Optional[list]:
    """Global-batch balance: the training step calls it once per optimizer step, before the step's
    first forward, with the step's input micro-batches (each (B, T) token ids, on this rank).

    Runs the model without gradients in eval mode (routing only; dropout must be 0, which the
    config enforces), sums each MoE layer's expert counts over the micro-batches and over the
    ranks (Qiu et al. 2025, arXiv 2501.11873: f_i of the whole global batch), and returns them,
    one (E,) tensor per MoE layer, for the step's training forwards: `model(x, y, moe_loads=...)`.
    Costs one extra forward per step. Returns None when no layer has moe_balance_scope="global"."""
    raw = unwrap(model)
    if not any(m.balance_scope == "global" for m in moe_layers(raw)):
        return None
    loads = None
    was_training = raw.training
    raw.eval()
    try:
        for idx in micro_batches:
            loads = add_loads(loads, raw.hidden_states(idx)[2], "balance_load")  # routing only, no lm_head
    finally:
        raw.train(was_training)
    if dist.is_available() and dist.is_initialized():
        loads = [load.clone() for load in loads]
        for load in loads:
            dist.all_reduce(load)
    return loads
