"""The batch loader: (x, y) windows from token arrays or memory-mapped shards, rank-aware and resumable.

`BatchLoader` draws (x, y) batches, y being x shifted by one token: random windows (nanoGPT's
`get_batch`) or sequential non-overlapping windows, rank-aware under DDP, and resumable: its whole
position is a tiny dict (`state_dict()`) that is the same on every rank.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from .errors import DataError

# The batch loader

# a 1-D array / tensor of token ids, or a list of them (shards)
TokenSource = Union[np.ndarray, torch.Tensor, Sequence[Union[np.ndarray, torch.Tensor]]]


def _as_arrays(tokens: TokenSource) -> list[np.ndarray]:
    if isinstance(tokens, (np.ndarray, torch.Tensor)):
        tokens = [tokens]
    arrays = []
    for t in tokens:
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().numpy()
        a = np.asarray(t)
        if a.ndim != 1:
            raise DataError(f"token arrays must be 1-D, got shape {a.shape}")
        arrays.append(a)
    if not arrays:
        raise DataError("no token arrays given to the loader (an empty list of shards)")
    return arrays


class BatchLoader:
    """(x, y) batches of shape (batch_size, block_size), int64, with y = x shifted by one token.

    random (default): each row is a window starting at a uniformly random position of the
      concatenated shards (windows never straddle two shards), like nanoGPT's `get_batch`.
    sequential: non-overlapping windows in order, shard after shard, wrapping around at the end
      (`epoch` counts the wraps); good for evaluation and for one pass over a large corpus.

    Under DDP every rank builds the loader with the same seed and its own `rank`/`world_size`.
    Batches are numbered globally: rank r's n-th call returns global batch n*world_size + r, so ranks
    never draw the same batch, world_size ranks with 1 micro-step see exactly what 1 process with
    world_size accumulation micro-steps sees, and the state (a count of global batches) is identical
    on every rank: rank 0's checkpoint resumes all of them. Random batch g is drawn from a generator
    seeded with (seed, g), so it does not depend on anything drawn before it.
    """

    def __init__(self, tokens: TokenSource, batch_size: int, block_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, sequential: bool = False, vocab_size: Optional[int] = None):
        if batch_size < 1 or block_size < 1:
            raise DataError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.shards = _as_arrays(tokens)
        self.batch_size, self.block_size = int(batch_size), int(block_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.sequential = bool(sequential)
        self.vocab_size = vocab_size  # when given, every batch's ids are checked on the host, before the device
        T = self.block_size
        for i, s in enumerate(self.shards):
            if len(s) < T + 1:  # a window needs T inputs plus the one extra target
                raise DataError(
                    f"shard {i} has {len(s)} tokens but block_size={T} needs at least {T + 1}; "
                    f"use a smaller block_size or more data"
                )
        # random mode: valid start positions per shard, s in [0, len - T - 1]
        self._starts = np.array([len(s) - T for s in self.shards], dtype=np.int64)
        self._starts_cum = np.cumsum(self._starts)
        # sequential mode: non-overlapping windows per shard (each uses T+1 tokens, consecutive windows share one)
        self._windows = np.array([(len(s) - 1) // T for s in self.shards], dtype=np.int64)
        self._windows_cum = np.cumsum(self._windows)
        self.global_batches = 0  # batches handed out so far, counted over all ranks

    @property
    def windows_per_epoch(self) -> int:
        """Number of non-overlapping windows in one sequential pass."""
        return int(self._windows_cum[-1])

    @property
    def epoch(self) -> int:
        """Completed sequential passes over the data (random mode: equivalent passes in tokens)."""
        rows = self.global_batches * self.batch_size
        return int(rows // self.windows_per_epoch)

    def _locate(self, flat: np.ndarray, cum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shard = np.searchsorted(cum, flat, side="right")
        offset = flat - np.concatenate(([0], cum[:-1]))[shard]
        return shard, offset

    def positions(self, global_batch: int) -> list[tuple[int, int]]:
        """(shard index, start token) of each row of global batch number `global_batch`."""
        B, T = self.batch_size, self.block_size
        if self.sequential:
            rows = (global_batch * B + np.arange(B)) % self.windows_per_epoch
            shard, w = self._locate(rows, self._windows_cum)
            start = w * T
        else:
            rng = np.random.default_rng([self.seed, global_batch])
            flat = rng.integers(0, int(self._starts_cum[-1]), size=B)
            shard, start = self._locate(flat, self._starts_cum)
        return [(int(a), int(b)) for a, b in zip(shard, start)]

    def next_batch(self, device: Union[str, torch.device] = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) for this rank, int64 (B, T), moved to `device` (pinned + non_blocking on CUDA)."""
        g = self.global_batches + self.rank
        T = self.block_size
        rows = [np.asarray(self.shards[s][p:p + T + 1], dtype=np.int64) for s, p in self.positions(g)]
        buf = np.stack(rows)  # (B, T+1)
        if self.vocab_size is not None:
            self._check_ids(buf)
        buf = torch.from_numpy(buf)
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        self.global_batches += self.world_size
        device = torch.device(device)
        if device.type == "cuda":
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            x, y = x.to(device), y.to(device)
        return x, y

    def _check_ids(self, buf: np.ndarray) -> None:
        lo, hi = int(buf.min()), int(buf.max())
        if lo < 0 or hi >= self.vocab_size:
            raise DataError(
                f"token id {lo if lo < 0 else hi} in the data is out of range [0, {self.vocab_size}): the data was "
                f"tokenized with another vocabulary than the model's vocab_size; prepare it with the run's tokenizer"
            )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The loader's position (the same on every rank); save it in the checkpoint."""
        return {
            "version": 1,
            "global_batches": int(self.global_batches),
            "seed": self.seed,
            "sequential": self.sequential,
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "n_tokens": int(sum(len(s) for s in self.shards)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from any rank; a different world_size continues from the same global
        batch count, rounded up to a whole step of the new world)."""
        if not isinstance(state, dict) or "global_batches" not in state:
            raise DataError(f"not a BatchLoader state: {state!r}")
        for key in ("seed", "sequential", "batch_size", "block_size", "n_tokens"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise DataError(
                    f"cannot resume this loader: saved {key}={state[key]!r} but this loader has {key}={mine!r} "
                    f"(resume with the same data and settings)"
                )
        g = int(state["global_batches"])
        self.global_batches = -(-g // self.world_size) * self.world_size

    def __repr__(self) -> str:
        mode = "sequential" if self.sequential else "random"
        n = sum(len(s) for s in self.shards)
        return (f"BatchLoader({mode}, {len(self.shards)} shard(s), {n:,} tokens, batch {self.batch_size}x"
                f"{self.block_size}, rank {self.rank}/{self.world_size})")
