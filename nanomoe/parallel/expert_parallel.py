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
from ..dispatch import scatter_back, sort_by_expert
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


class AllToAllDispatcher:
    """Expert parallelism's dispatcher (see `nanomoe.dispatch`): this rank holds experts
    first_expert .. first_expert + L - 1 (L = E/W) and exchanges rows with the other ranks of `group`.

    dispatch: `sort_by_expert` (the kept rows, by expert, hence by destination rank), all_to_all of
    the counts (sizes the receive buffer), all_to_all of the rows, regrouped by local expert.
    combine: back to (source rank, local expert) order, all_to_all home, gates, scatter to tokens.
    After each forward `last_comm` holds the rows sent to / received from each rank (int64 (W,)) and
    the bytes this rank sent over the network; `comm_total` sums them since `reset_comm`."""

    def __init__(self, n_experts: int, top_k: int, group: Optional[dist.ProcessGroup] = None):
        self.n_experts, self.top_k, self.group = n_experts, top_k, group
        self.world, self.rank = group_size(group), group_rank(group)
        check_world_size(n_experts, self.world)
        self.local_experts = n_experts // self.world
        self.first_expert = self.rank * self.local_experts
        self.last_comm: dict[str, Any] = {}
        self.comm_total: dict[str, Any] = {}

    def dispatch(self, x_ND, expert_A, gate_A, keep_A):
        """-> xs_MD (rows received for my L experts, grouped by local expert), counts_L, state."""
        W, L = self.world, self.local_experts
        s = sort_by_expert(expert_A, keep_A, self.n_experts, self.top_k)  # dropped rows never leave the rank
        # counts first: recv_WL[s, j] = rows rank s sends to my local expert j (sizes the receive buffer)
        recv_WL = torch.empty_like(s.counts_E)
        dist.all_to_all_single(recv_WL, s.counts_E, group=self.group)
        recv_WL = recv_WL.view(W, L)
        send_splits = s.counts_E.view(W, L).sum(1).tolist()  # host sync: the collective needs the sizes
        recv_splits = recv_WL.sum(1).tolist()
        rows_MD = x_ND.index_select(0, s.token_A[: sum(send_splits)])  # the kept rows, in expert order
        xs_RD = all_to_all(rows_MD, recv_splits, send_splits, self.group)
        # received rows are grouped (source rank, local expert): regroup by local expert for the kernel
        local_R = torch.arange(L, device=x_ND.device).repeat(W).repeat_interleave(recv_WL.reshape(-1))
        perm_R = torch.argsort(local_R, stable=True)
        self._account(send_splits, recv_splits, x_ND)
        return xs_RD[perm_R], recv_WL.sum(0), (s, gate_A, x_ND, perm_R, send_splits, recv_splits)

    def combine(self, out_RD, state):
        s, gate_A, x_ND, perm_R, send_splits, recv_splits = state
        out_RD = torch.empty_like(out_RD).index_copy(0, perm_R, out_RD)  # back to (source rank, local expert)
        out_MD = all_to_all(out_RD, send_splits, recv_splits, self.group)  # (M, D) in the order we sent
        return scatter_back(out_MD, gate_A, s, x_ND)

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


def expert_parallel_moe(config: GPTConfig, group: Optional[dist.ProcessGroup] = None) -> MoE:
    """An MoE layer whose experts are split over the ranks of `group` (the default group when None):
    the same `MoE` (routing, capacity, losses, statistics) with an `AllToAllDispatcher`; it builds
    only this rank's E/W experts."""
    layer = MoE(config, AllToAllDispatcher(config.n_experts, config.moe_top_k, group))
    layer.impl = "fast"  # the reference loop needs every expert locally
    return layer


def is_expert_parallel(m: nn.Module) -> bool:
    """An MoE layer whose experts are spread over ranks."""
    return isinstance(m, MoE) and isinstance(m.dispatcher, AllToAllDispatcher)


# ---- building, gradients, checkpoints -----------------------------------------------------------


def ep_layers(model: nn.Module) -> list[MoE]:
    """The expert-parallel layers of a model, in order."""
    return [m for m in model.modules() if is_expert_parallel(m)]


def expert_parameters(model: nn.Module) -> set[int]:
    """ids of the sharded expert parameters (each rank owns its own slice: never averaged)."""
    return {id(p) for m in ep_layers(model) for p in m.experts.parameters()}


def shard_model(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Turn every MoE layer of a GPT into an expert-parallel one (`expert_parallel_moe`) over `group`, in place.

    The model's current weights are kept: dense ones as they are, experts sliced for this rank. Build
    the same model with the same seed on every rank first (or load a checkpoint after)."""
    for block in model.transformer.h:
        if getattr(block, "is_moe", False) and not is_expert_parallel(block.mlp):
            full = block.mlp.state_dict()
            layer = expert_parallel_moe(model.config, group).to(next(block.mlp.parameters()).device)
            layer.load_state_dict(_slice_experts(full, layer))
            layer.kernel = block.mlp.kernel
            layer.train(block.mlp.training)
            block.mlp = layer
    return model


def _slice_experts(state: dict[str, torch.Tensor], layer: MoE, prefix: str = "") -> dict:
    out = dict(state)
    sl = slice(layer.dispatcher.first_expert, layer.dispatcher.first_expert + layer.dispatcher.local_experts)
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
            state[name + w] = _gather_rows(state[name + w], layer.dispatcher.group)
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
                f"({layer.n_experts} experts, split {layer.dispatcher.local_experts} per rank): was it saved from "
                f"another "
                "config, or as a shard instead of with full_state_dict?"
            )
        state = _slice_experts(state, layer, prefix=name)
    model.load_state_dict(state)


def _ep_layer_names(model: nn.Module) -> list[tuple[str, MoE]]:
    """(state-dict prefix, layer) of every expert-parallel layer ("" when `model` is the layer)."""
    return [(f"{n}." if n else "", m) for n, m in model.named_modules() if is_expert_parallel(m)]


def _expert_param_slices(model: nn.Module) -> dict[int, MoE]:
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
            if torch.is_tensor(v) and v.dim() > 0 and v.size(0) == layer.dispatcher.local_experts:
                state[key] = _gather_rows(v, layer.dispatcher.group)
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
        sl = slice(layer.dispatcher.first_expert, layer.dispatcher.first_expert + layer.dispatcher.local_experts)
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
        m.dispatcher.comm_total = {}


def comm_summary(model: nn.Module, total: bool = True) -> dict[str, Any]:
    """This rank's exchanges summed over layers, since `reset_comm` (total) or in the last forward:
    rows sent to and received from each rank (W,), and bytes sent over the network (dispatch +
    combine of the forwards; a backward sends as many bytes again)."""
    comms = [m.dispatcher.comm_total if total else m.dispatcher.last_comm for m in ep_layers(model)]
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


def gather_comm(sent: torch.Tensor, sent_bytes: int, dropped: int, group=None) -> dict[str, Any]:
    """Every rank's accounting of one step, on every rank (a collective): sent[s][d] rows rank s sent
    to rank d, received[d] rows rank d's experts computed, bytes[s] rank s sent over the network,
    dropped (assignments over capacity, all ranks) and the imbalance max/mean of received."""
    W = dist.get_world_size(group)
    mine = torch.cat([sent.cpu(), torch.tensor([sent_bytes, dropped])]).long()
    if dist.get_backend(group) == "nccl":
        mine = mine.cuda()
    rows = [torch.empty_like(mine) for _ in range(W)]
    dist.all_gather(rows, mine, group=group)
    table = torch.stack(rows).cpu()  # (W, W+2)
    received = table[:, :W].sum(0)  # what each rank's experts computed
    return {"sent": table[:, :W].tolist(), "received": received.tolist(), "bytes": table[:, W].tolist(),
            "dropped": int(table[:, W + 1].sum()), "imbalance": imbalance(received)}
