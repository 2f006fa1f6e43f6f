"""Expert parallelism: each of W ranks holds E/W experts, and tokens travel to their experts and back.

GShard (Lepikhin et al. 2020, https://arxiv.org/abs/2006.16668) and Switch Transformer (Fedus et al.
2021, https://arxiv.org/abs/2101.03961) place different experts on different devices; DeepSeek-V3
(https://arxiv.org/abs/2412.19437, section 3.2) and Megablocks (https://arxiv.org/abs/2211.15841)
make the exchange fast. One MoE layer on rank r of W (E experts, k per token, E % W == 0):

    route       every rank holds the full router (replicated) and routes ITS OWN tokens; capacity
                drops are decided here, per sequence, before anything moves (`MoE.forward`)
    sort        the kept (token, expert) assignments sorted by expert; expert e lives on rank
                e // (E/W), so the rows for each destination rank are one contiguous block
    counts      all_to_all of the per-expert counts (E,): rank r learns how many rows each rank
                sends to each of its E/W experts, so receive buffers are sized from them
    dispatch    all_to_all of the rows (M, C) -> (R, C), grouped by source rank, then local expert
    compute     the rows regrouped by local expert and run with the same expert kernel as one
                process (`nanomoe.moe.KERNELS`) on the local slice c_fc[E/W...], c_proj[E/W...]
    combine     all_to_all back (R, C) -> (M, C) in the order the rows were sent, multiplied by
                their gates and added to their tokens in the original token order

Gradients flow back through the same two exchanges in reverse (`AllToAll` is an autograd function
whose backward is the transposed all_to_all). The dense parameters (embeddings, attention, norms,
router, shared experts) are replicated and averaged over ranks like DDP; the expert parameters are
NOT all-reduced: rank r's shard already received the gradient of every rank's tokens through the
exchange, and only needs the same 1/W that DDP's average gives the dense parameters
(`sync_gradients`).

Checkpoints always hold the full experts (`full_state_dict` gathers the shards), so a run saved on
W ranks resumes on 1 rank or W ranks, and a single-process checkpoint starts an expert-parallel run
(`load_full_state_dict` slices it).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import GPTConfig
from ..moe import MoE


class ExpertParallelError(ValueError):
    """Expert parallelism cannot be set up as asked; the message says what to change."""


def group_size(group: Optional[dist.ProcessGroup] = None) -> int:
    """Ranks in `group` (the default group when None); 1 without torch.distributed."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def group_rank(group: Optional[dist.ProcessGroup] = None) -> int:
    """This process's rank in `group`; 0 without torch.distributed."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def check_world_size(n_experts: int, world: int) -> None:
    """Refuse a world size that does not divide the number of experts, naming the sizes that do."""
    if world < 1 or n_experts % world:
        fits = [w for w in range(1, n_experts + 1) if n_experts % w == 0]
        raise ExpertParallelError(
            f"expert parallelism splits the {n_experts} experts evenly over the ranks, but there are {world} "
            f"ranks; launch with --nproc_per_node in {fits} (or change n_experts)"
        )


# ---- the collective, with autograd ----------------------------------------------------------------


class AllToAll(torch.autograd.Function):
    """y = all_to_all(x): rows x[in_splits[0] rows] go to rank 0, the next in_splits[1] to rank 1, ...;
    y holds out_splits[s] rows from each rank s, in rank order. Backward sends the gradients back
    along the same routes (the same collective with the splits swapped)."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        y = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(y, x.contiguous(), out_splits, in_splits, group=group)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        out_splits, in_splits = ctx.splits
        grad_x = grad_y.new_empty((sum(in_splits),) + tuple(grad_y.shape[1:]))
        dist.all_to_all_single(grad_x, grad_y.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_x, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Differentiable all_to_all over dim 0 (see `AllToAll`)."""
    return AllToAll.apply(x, out_splits, in_splits, group)


# ---- the layer -------------------------------------------------------------------------------------


class ExpertParallelMoE(MoE):
    """An MoE layer whose experts are split over the ranks of `group` (the default group when None).

    Same routing, capacity, auxiliary losses and statistics as `MoE` (inherited); only the dispatch
    differs. `experts.c_fc` / `experts.c_proj` hold this rank's slice (E/W, ., .) of the stacked
    weights: experts first_expert .. first_expert + E/W - 1. After each forward `last_comm` holds
    the rows sent to / received from each rank (int64 tensors (W,)) and the bytes this rank sent
    over the network; `comm_total` sums them over the forwards since `reset_comm`."""

    def __init__(self, config: GPTConfig, group: Optional[dist.ProcessGroup] = None):
        super().__init__(config)
        self.group = group
        self.world, self.rank = group_size(group), group_rank(group)
        check_world_size(config.n_experts, self.world)
        self.local_experts = config.n_experts // self.world
        self.first_expert = self.rank * self.local_experts
        sl = slice(self.first_expert, self.first_expert + self.local_experts)
        # keep only this rank's slice (the full init is drawn first, so every world size starts
        # from the same weights as one process with the same seed)
        self.experts.c_fc = nn.Parameter(self.experts.c_fc.detach()[sl].clone())
        self.experts.c_proj = nn.Parameter(self.experts.c_proj.detach()[sl].clone())
        self.experts.n_experts = self.local_experts
        self.impl = "fast"  # the reference loop needs every expert locally
        self.last_comm: dict[str, Any] = {}
        self.comm_total: dict[str, Any] = {}

    def extra_repr(self) -> str:
        last = self.first_expert + self.local_experts - 1
        return f"experts {self.first_expert}..{last} of {self.n_experts} on rank {self.rank}/{self.world}"

    def _dispatch_fast(self, x, expert_of, gates, keep):
        """x (N, C), expert_of (N*k,), gates (N*k,), keep (B, T, k) or None -> y (N, C)."""
        E, k, W, L = self.n_experts, self.top_k, self.world, self.local_experts
        token_of = torch.arange(expert_of.numel(), device=x.device) // k  # (N*k,) assignment -> token
        if keep is not None:  # capacity: dropped assignments never leave the rank
            kept = keep.reshape(-1).nonzero().squeeze(1)
            expert_of, gates, token_of = expert_of[kept], gates[kept], token_of[kept]
        order = torch.argsort(expert_of, stable=True)  # by expert, hence by destination rank
        token_sorted = token_of[order]
        counts = torch.bincount(expert_of, minlength=E)  # (E,) rows for each expert, in the order sent
        # counts first: recv[s, j] = rows rank s sends to my local expert j (sizes the receive buffer)
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)
        recv = recv.view(W, L)
        send_splits = counts.view(W, L).sum(1).tolist()  # host sync: the collective needs the sizes
        recv_splits = recv.sum(1).tolist()
        xs = all_to_all(x.index_select(0, token_sorted), recv_splits, send_splits, self.group)  # (R, C)
        # received rows are grouped (source rank, local expert): regroup by local expert for the kernel
        local_of = torch.arange(L, device=x.device).repeat(W).repeat_interleave(recv.reshape(-1))  # (R,)
        perm = torch.argsort(local_of, stable=True)
        out = self._run_experts(xs[perm], local_of[perm], recv.sum(0))  # (R, C) by local expert
        out = torch.empty_like(out).index_copy(0, perm, out)  # back to (source rank, local expert) order
        out = all_to_all(out, send_splits, recv_splits, self.group)  # (M, C) in the order we sent
        out = out * gates[order].unsqueeze(1).to(out.dtype)
        self._account(send_splits, recv_splits, x)
        return torch.zeros(x.shape, dtype=out.dtype, device=x.device).index_add_(0, token_sorted, out).to(x.dtype)

    def _account(self, send_splits: list[int], recv_splits: list[int], x: torch.Tensor) -> None:
        """Rows and bytes of this forward's exchanges (the backward moves as many bytes again)."""
        sent, received = torch.tensor(send_splits), torch.tensor(recv_splits)
        row_bytes = x.size(1) * x.element_size()
        off_rank = int(sent.sum() - sent[self.rank]) + int(received.sum() - received[self.rank])
        # bytes this rank sends over the network: its tokens out (dispatch) and the results of other
        # ranks' tokens back (combine); rows a rank keeps for itself are copied, not sent
        self.last_comm = {"sent": sent, "received": received, "bytes": off_rank * row_bytes}
        t = self.comm_total
        self.comm_total = {k: t[k] + v for k, v in self.last_comm.items()} if t else dict(self.last_comm)


# ---- building, gradients, checkpoints -----------------------------------------------------------


def ep_layers(model: nn.Module) -> list[ExpertParallelMoE]:
    """The expert-parallel layers of a model, in order."""
    return [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]


def expert_parameters(model: nn.Module) -> set[int]:
    """ids of the sharded expert parameters (each rank owns its own slice: never averaged)."""
    return {id(p) for m in ep_layers(model) for p in m.experts.parameters()}


def shard_model(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Turn every MoE layer of a GPT into an `ExpertParallelMoE` over `group`, in place.

    The model's current weights are kept: dense ones as they are, experts sliced for this rank. Build
    the same model with the same seed on every rank first (or load a checkpoint after)."""
    for block in model.transformer.h:
        if getattr(block, "is_moe", False) and not isinstance(block.mlp, ExpertParallelMoE):
            full = block.mlp.state_dict()
            layer = ExpertParallelMoE(model.config, group).to(next(block.mlp.parameters()).device)
            layer.load_state_dict(_slice_experts(full, layer))
            layer.kernel = block.mlp.kernel
            layer.train(block.mlp.training)
            block.mlp = layer
    return model


def _slice_experts(state: dict[str, torch.Tensor], layer: ExpertParallelMoE, prefix: str = "") -> dict:
    out = dict(state)
    sl = slice(layer.first_expert, layer.first_expert + layer.local_experts)
    for name in ("experts.c_fc", "experts.c_proj"):
        out[prefix + name] = state[prefix + name][sl]
    return out


@torch.no_grad()
def sync_gradients(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> None:
    """After the backward of the step's last micro-batch: average the dense gradients over ranks (one
    flat all-reduce, like DDP's buckets) and scale the expert gradients by 1/W (not all-reduced:
    each rank's shard already holds the gradient from every rank's tokens)."""
    W = group_size(group)
    if W == 1:
        return
    experts = expert_parameters(model)
    dense = [p for p in model.parameters() if p.grad is not None and id(p) not in experts]
    flat = torch.cat([p.grad.reshape(-1) for p in dense])
    dist.all_reduce(flat, group=group)
    flat /= W
    for p, g in zip(dense, flat.split([p.numel() for p in dense])):
        p.grad.copy_(g.view_as(p.grad))
    for p in model.parameters():
        if id(p) in experts and p.grad is not None:
            p.grad /= W


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, group: Optional[dist.ProcessGroup] = None) -> float:
    """Clip to the GLOBAL gradient norm (Pascanu et al. 2013) and return it: the dense gradients are
    the same on every rank (count them once), the expert shards are summed over ranks. Clipping each
    rank to its own norm would scale the shards differently from one process. max_norm <= 0: no clip."""
    experts = expert_parameters(model)
    dense_sq = torch.zeros((), dtype=torch.float64)
    expert_sq = torch.zeros((), dtype=torch.float64)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for p in model.parameters():
        if p.grad is not None:
            sq = p.grad.detach().double().square().sum().cpu()
            if id(p) in experts:
                expert_sq += sq
            else:
                dense_sq += sq
    if group_size(group) > 1:
        dev = grads[0].device if grads else "cpu"
        t = expert_sq.to(dev)
        dist.all_reduce(t, group=group)
        expert_sq = t.cpu()
    norm = float((dense_sq + expert_sq).sqrt())
    if max_norm > 0:
        coef = min(1.0, max_norm / (norm + 1e-6))  # torch.nn.utils.clip_grad_norm_'s formula
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return norm


def _gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(group_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def full_state_dict(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> dict[str, torch.Tensor]:
    """The model's state dict with the FULL experts (E, ., .) gathered from every rank: the same keys
    and shapes as a single-process model. A collective: every rank calls it."""
    state = model.state_dict()
    for name, layer in _ep_layer_names(model):
        for w in ("experts.c_fc", "experts.c_proj"):
            state[name + w] = _gather_rows(state[name + w], layer.group)
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full (single-process layout) state dict into a sharded model: each rank keeps its slice.
    A checkpoint whose experts do not have the model's shapes is refused, saying what differs."""
    state = dict(state)
    for name, layer in _ep_layer_names(model):
        key = f"{name}experts.c_fc"
        if key not in state:
            raise ExpertParallelError(f"the state dict has no {key}: it was not saved from this MoE model")
        have = tuple(state[key].shape)
        want = (layer.n_experts, *layer.experts.c_fc.shape[1:])
        if have != want:
            raise ExpertParallelError(
                f"{key} has shape {have} in the checkpoint but this model needs the full {want} "
                f"({layer.n_experts} experts, split {layer.local_experts} per rank): was it saved from another "
                "config, or as a shard instead of with full_state_dict?"
            )
        state = _slice_experts(state, layer, prefix=name)
    model.load_state_dict(state)


def _ep_layer_names(model: nn.Module) -> list[tuple[str, ExpertParallelMoE]]:
    """(state-dict prefix, layer) of every expert-parallel layer ("" when `model` is the layer)."""
    return [(f"{n}." if n else "", m) for n, m in model.named_modules() if isinstance(m, ExpertParallelMoE)]


def _expert_param_slices(model: nn.Module) -> dict[int, ExpertParallelMoE]:
    """id of each sharded expert parameter -> its layer."""
    return {id(p): m for m in ep_layers(model) for p in m.experts.parameters()}


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, group=None) -> dict:
    """The optimizer state dict with every expert tensor state (AdamW's exp_avg, exp_avg_sq) gathered
    to the full (E, ., .) shape, as one process would save it. A collective."""
    owner = _expert_param_slices(model)
    sd = optimizer.state_dict()
    # state_dict() shares the live per-parameter dicts: copy them before swapping in the gathered
    # tensors, or the running optimizer would continue with the full (E, ., .) moments
    sd["state"] = {i: dict(s) for i, s in sd["state"].items()}
    index = _param_index(optimizer)
    for i, state in sd["state"].items():
        layer = owner.get(index[i])
        if layer is None:
            continue
        for key, v in state.items():
            if torch.is_tensor(v) and v.dim() > 0 and v.size(0) == layer.local_experts:
                state[key] = _gather_rows(v, layer.group)
    return sd


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, sd: dict) -> None:
    """Load a full (single-process layout) optimizer state: each rank keeps its experts' rows."""
    owner = _expert_param_slices(model)
    index = _param_index(optimizer)
    sd = {"state": {i: dict(s) for i, s in sd["state"].items()}, "param_groups": sd["param_groups"]}
    for i, state in sd["state"].items():
        layer = owner.get(index[int(i)])
        if layer is None:
            continue
        sl = slice(layer.first_expert, layer.first_expert + layer.local_experts)
        for key, v in state.items():
            if torch.is_tensor(v) and v.dim() > 0 and v.size(0) == layer.n_experts:
                state[key] = v[sl].clone()
    optimizer.load_state_dict(sd)


def _param_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """optimizer state index -> id of the parameter (state dicts number params across groups)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {i: id(p) for i, p in enumerate(params)}


def reset_comm(model: nn.Module) -> None:
    """Start counting the exchanges afresh (see `comm_summary`)."""
    for m in ep_layers(model):
        m.comm_total = {}


def comm_summary(model: nn.Module, total: bool = True) -> dict[str, Any]:
    """This rank's exchanges summed over layers, since `reset_comm` (total) or in the last forward:
    rows sent to and received from each rank (W,), and bytes sent over the network (dispatch +
    combine of the forwards; a backward sends as many bytes again)."""
    comms = [m.comm_total if total else m.last_comm for m in ep_layers(model)]
    comms = [c for c in comms if c]
    if not comms:
        return {}
    return {
        "sent": sum(c["sent"] for c in comms),
        "received": sum(c["received"] for c in comms),
        "bytes": sum(c["bytes"] for c in comms),
    }


def imbalance(received_per_rank: torch.Tensor) -> float:
    """max / mean of the rows each rank's experts computed: the slowest rank sets the pace, so 1.5
    means the step waits 1.5x as long as a perfectly balanced one would."""
    r = received_per_rank.double()
    return float(r.max() / r.mean()) if r.sum() > 0 else math.nan
