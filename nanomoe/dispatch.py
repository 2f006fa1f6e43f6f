"""Token dispatch: how an MoE layer's (token, expert) assignments reach their experts and come back.

`MoE.forward` reads route -> dispatch -> experts -> combine. A dispatcher has two methods:

    xs_MD, counts_L, state = dispatcher.dispatch(x_ND, expert_A, gate_A, keep_A)
    y_ND = dispatcher.combine(out_MD, state)

`LocalDispatcher` (here) keeps every expert in this process; `AllToAllDispatcher`
(`nanomoe.parallel.expert_parallel`) sends each row to the rank that holds its expert and back.
Both start from `sort_by_expert`, so one process and W ranks order the rows the same way.

Shape suffixes (as in torchtitan): N tokens, D model width (n_embd), E experts, L experts held
here (E, or E/W under expert parallelism), k experts per token, A = N*k assignments, M rows handed
to the expert kernel (A, or fewer once dropped or sent away). `x_ND` is x with shape (N, D).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Sorted(NamedTuple):
    """The assignments in expert order: `order_A` sorts them, `token_A` is each sorted row's token,
    `counts_E` how many rows each expert gets, `kept_A1` (A, 1) bool (None when dropless) marks the
    rows kept by capacity; dropped rows sort after every expert's group."""

    order_A: torch.Tensor
    token_A: torch.Tensor
    counts_E: torch.Tensor
    kept_A1: Optional[torch.Tensor]


def sort_by_expert(expert_A: torch.Tensor, keep_A: Optional[torch.Tensor], n_experts: int, top_k: int) -> Sorted:
    """Group the assignments by expert (stable: a token's rows keep their order within an expert).

    A dropped assignment gets the key E, after every expert, instead of being removed with
    `nonzero` (which reads a count back to the host): no host sync, dropless or not."""
    E = n_experts
    token_A = torch.arange(expert_A.numel(), device=expert_A.device) // top_k  # assignment -> token
    key_A = expert_A if keep_A is None else torch.where(keep_A, expert_A, E)
    order_A = torch.argsort(key_A, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.long, device=expert_A.device).scatter_add_(0, key_A, torch.ones_like(key_A))
    kept_A1 = None if keep_A is None else keep_A[order_A].unsqueeze(1)
    return Sorted(order_A, token_A[order_A], counts[:E], kept_A1)


def scatter_back(out_MD: torch.Tensor, gate_A: torch.Tensor, s: Sorted, x_ND: torch.Tensor) -> torch.Tensor:
    """Weight each row by its gate and add it to its token: y_ND (a token sums its k experts).
    Rows past the kept ones (dropped by capacity) are zero; `where`, not `*`, keeps them from
    carrying anything (not even a NaN) into y or the gradients."""
    if s.kept_A1 is not None:
        if out_MD.size(0) < s.kept_A1.size(0):  # the kernel ran on the kept rows only
            out_MD = torch.cat([out_MD, out_MD.new_zeros(s.kept_A1.size(0) - out_MD.size(0), out_MD.size(1))])
        out_MD = torch.where(s.kept_A1, out_MD, 0.0)
    out_MD = out_MD * gate_A[s.order_A].unsqueeze(1).to(out_MD.dtype)
    y_ND = torch.zeros(x_ND.shape, dtype=out_MD.dtype, device=x_ND.device)
    return y_ND.index_add_(0, s.token_A, out_MD).to(x_ND.dtype)


class LocalDispatcher:
    """Every expert in this process: gather the tokens in expert order, run, scatter back."""

    def __init__(self, n_experts: int, top_k: int):
        self.n_experts, self.top_k = n_experts, top_k
        self.local_experts, self.first_expert = n_experts, 0

    def dispatch(self, x_ND, expert_A, gate_A, keep_A):
        """-> xs_MD (the token of each row, in expert order), counts_E, state for `combine`."""
        s = sort_by_expert(expert_A, keep_A, self.n_experts, self.top_k)
        xs_MD = x_ND.index_select(0, s.token_A)
        if s.kept_A1 is not None:  # rows past the last group are never written by the kernel:
            xs_MD = torch.where(s.kept_A1, xs_MD, 0.0)  # where (not *) keeps their gradient out of x
        return xs_MD, s.counts_E, (s, gate_A, x_ND)

    def combine(self, out_MD, state):
        s, gate_A, x_ND = state
        return scatter_back(out_MD, gate_A, s, x_ND)
