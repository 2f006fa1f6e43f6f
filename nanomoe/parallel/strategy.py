"""How the one training loop (`nanomoe.training.train`) spreads a run over processes: the parallel
strategy, `TrainConfig.parallel`. Parallelism is applied from outside the model (as torchtitan's
Trainer does): the loop asks its strategy to shard and wrap the model, to sync and clip the
gradients, and to gather and restore a checkpoint.

    ddp   every rank holds the whole model; DDP averages the gradients in the backward
          (`torch.nn.parallel.DistributedDataParallel`, Li et al. 2020, arXiv 2006.15704)
    ep    expert parallelism: every MoE layer keeps E/W experts per rank and exchanges tokens
          (`nanomoe.parallel.expert_parallel`); the dense gradients are averaged after the backward,
          the norm is the global one, checkpoints hold the full experts (any world size reads them)

With one process both are the plain single-process loop.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ..training import checkpoint as ck
from . import expert_parallel as ep

STRATEGIES = ("ddp", "ep")


class DDPStrategy:
    """Data parallel: the whole model on every rank, gradients averaged by DDP during the backward."""

    name = "ddp"

    def __init__(self, world_size: int):
        self.world = world_size

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Before the optimizer is built: nothing to split."""
        return model

    def wrap(self, fwd: torch.nn.Module, device_ids) -> torch.nn.Module:
        return DDP(fwd, device_ids=device_ids) if self.world > 1 else fwd

    def no_sync(self, fwd, last_micro: bool):
        """DDP all-reduces only on the last micro-batch of the step."""
        return fwd.no_sync() if self.world > 1 and not last_micro else nullcontext()

    def clip(self, raw: torch.nn.Module, grad_clip: float) -> float:
        """The gradients are already averaged (DDP), so this norm is the same on every rank."""
        return float(torch.nn.utils.clip_grad_norm_(raw.parameters(), grad_clip or float("inf")))

    def model_state(self, raw: torch.nn.Module) -> dict[str, Any]:
        return ck.model_state_dict(raw)

    def optimizer_state(self, optimizer, raw) -> dict[str, Any]:
        return optimizer.state_dict()

    def load(self, raw: torch.nn.Module, optimizer, state: dict) -> None:
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def start_step(self, raw: torch.nn.Module) -> None:
        """Before a step's first forward (EP: start counting the exchanged rows)."""

    def end_prepass(self, raw: torch.nn.Module) -> None:
        """After the global-balance pre-pass (routing-only forwards), before the training forwards."""

    def after_micro(self, moe_stats: list) -> None:
        """After each micro-batch's forward and backward."""

    def traffic(self, raw: torch.nn.Module) -> dict[str, Any]:
        """The step's exchanges over the network, for the train records (empty: none)."""
        return {}

    @property
    def collective_save(self) -> bool:
        """Whether every rank takes part in building a checkpoint (rank 0 still writes it alone)."""
        return False

    @property
    def every_rank_runs_the_model(self) -> bool:
        """Whether a forward needs every rank (so samples are drawn on all of them)."""
        return False


class EPStrategy(DDPStrategy):
    """Expert parallelism (chapter 07): shard the MoE experts over the ranks, no DDP wrapper."""

    name = "ep"

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        if not any(getattr(b, "is_moe", False) for b in model.transformer.h):
            raise ValueError("parallel='ep' needs an MoE model (n_experts > 0): use parallel='ddp' for a dense one")
        ep.check_world_size(model.config.n_experts, self.world)
        return ep.shard_model(model) if self.world > 1 else model

    def wrap(self, fwd: torch.nn.Module, device_ids) -> torch.nn.Module:
        return fwd

    def no_sync(self, fwd, last_micro: bool):
        return nullcontext()

    def clip(self, raw: torch.nn.Module, grad_clip: float) -> float:
        ep.sync_gradients(raw)  # dense: mean over ranks; experts: 1/W (they saw every rank's tokens)
        return ep.clip_grad_norm(raw, grad_clip)

    def model_state(self, raw: torch.nn.Module) -> dict[str, Any]:
        return ep.full_state_dict(raw) if self.world > 1 else ck.model_state_dict(raw)

    def optimizer_state(self, optimizer, raw) -> dict[str, Any]:
        return ep.full_optimizer_state(optimizer, raw) if self.world > 1 else optimizer.state_dict()

    def load(self, raw: torch.nn.Module, optimizer, state: dict) -> None:
        if self.world == 1:
            return super().load(raw, optimizer, state)
        ep.load_full_state_dict(raw, state["model"])
        ep.load_full_optimizer_state(optimizer, raw, state["optimizer"])

    def start_step(self, raw: torch.nn.Module) -> None:
        ep.reset_comm(raw)
        self._prepass_bytes, self._dropped = 0, 0

    def end_prepass(self, raw: torch.nn.Module) -> None:
        self._prepass_bytes = ep.comm_summary(raw).get("bytes", 0)  # forwards only: no backward
        ep.reset_comm(raw)

    def after_micro(self, moe_stats: list) -> None:
        if self.world > 1:  # capacity drops (assignments); a host sync, so only when there is traffic to show
            self._dropped += sum(int(st["dropped"]) for st in moe_stats)

    def traffic(self, raw: torch.nn.Module) -> dict[str, Any]:
        """Who sent how many rows to whom (every rank's counts: a collective), bytes (the training
        forwards' exchanges twice, as their backward sends as many again, plus the pre-pass), drops."""
        if self.world == 1:
            return {}
        comm = ep.comm_summary(raw)
        sent_bytes = self._prepass_bytes + 2 * comm.get("bytes", 0)
        return ep.gather_comm(comm["sent"], sent_bytes, self._dropped)

    @property
    def collective_save(self) -> bool:
        return self.world > 1

    @property
    def every_rank_runs_the_model(self) -> bool:
        return self.world > 1


def make_strategy(name: str, world_size: int) -> DDPStrategy:
    """The strategy called `name` ("ddp" or "ep") for `world_size` processes."""
    if name not in STRATEGIES:
        raise ValueError(f"parallel must be one of {list(STRATEGIES)}, got {name!r}")
    return (EPStrategy if name == "ep" else DDPStrategy)(world_size)
