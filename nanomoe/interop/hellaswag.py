"""HellaSwag accuracy: the standard yardstick of small language models.

HellaSwag (Zellers et al. 2019, https://arxiv.org/abs/1905.07830) gives a context and four
endings; one is right. A base model is scored "completion style" (as in build-nanogpt and llm.c's
`dev/data/hellaswag.py`): each ending is appended to the context, the model's cross-entropy is
computed **over the ending's tokens only**, and the ending with the lowest loss is the model's
answer. Two ways to read "lowest loss" give the two numbers every report quotes:

- `acc`: lowest *summed* loss (favours short endings: fewer tokens, fewer nats);
- `acc_norm`: lowest *mean* loss per ending token (length-normalized). This is the headline
  number of build-nanogpt's training log: GPT-2 124M scores acc 0.2859 / acc_norm 0.2955 on the
  10,042 validation examples (llm.c, dev/data/hellaswag.py). Chance is 0.25.

    examples = load_examples("data/hellaswag/hellaswag_val.jsonl")
    result = evaluate_hellaswag(model, tokenizer, examples)
    result.acc, result.acc_norm

Under DDP each rank scores every world_size-th example and the counts are summed, so every rank
gets the same result (`nanomoe.parallel.distributed.all_reduce_sum`).
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .. import files
from ..parallel.distributed import DistInfo, all_reduce_sum, count_ranks, unwrap
from ..paths import in_home

URLS = {
    split: f"https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
    for split in ("train", "val", "test")
}
DEFAULT_PATH = Path("data") / "hellaswag" / "hellaswag_val.jsonl"  # under nanomoe.paths.home()


class HellaSwagError(ValueError):
    """A HellaSwag file is missing or malformed; the message says what to do."""


@dataclass
class Example:
    ctx: str
    endings: list[str]  # four candidate endings
    label: int  # index of the right one


@dataclass
class HellaSwagResult:
    n: int = 0  # examples scored
    correct: int = 0  # lowest summed loss was the right ending
    correct_norm: int = 0  # lowest mean loss was the right ending

    @property
    def acc(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / self.n if self.n else float("nan")


# ---- data ----------------------------------------------------------------------------------------


def download(split: str = "val", dest: Union[str, os.PathLike, None] = None, timeout: float = 60.0) -> Path:
    """Download a HellaSwag split (jsonl, from the authors' repository) to `dest` (relative paths are
    under `nanomoe.paths.home()`; default data/hellaswag/hellaswag_SPLIT.jsonl); returns the path."""
    if split not in URLS:
        raise HellaSwagError(f"unknown HellaSwag split {split!r}; choose one of {sorted(URLS)}")
    dest = in_home(dest if dest is not None else DEFAULT_PATH.with_name(f"hellaswag_{split}.jsonl"))
    if dest.is_file():
        return dest
    try:
        data = files.download(URLS[split], timeout=timeout)
    except files.DownloadError as e:
        raise HellaSwagError(f"{e}; offline, copy hellaswag_{split}.jsonl to {dest} by hand") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_write(dest) as f:  # a reader never sees half a file
        f.write(data)
    return dest


def load_examples(path: Union[str, os.PathLike], limit: int = 0) -> list[Example]:
    """Examples of a HellaSwag jsonl file (one JSON object per line with ctx, endings, label);
    `limit` > 0 keeps the first `limit` of them. A relative path is under `nanomoe.paths.home()`."""
    path = in_home(path)
    if not path.is_file():
        raise HellaSwagError(f"HellaSwag file {path} not found: run `uv run -m data.prepare_hellaswag` "
                             "(needs internet once)")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                ex = Example(str(d["ctx"]), [str(e) for e in d["endings"]], int(d["label"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise HellaSwagError(f"{path}, line {i}: not a HellaSwag example ({type(e).__name__}: {e})") from None
            if len(ex.endings) < 2 or not 0 <= ex.label < len(ex.endings):
                raise HellaSwagError(f"{path}, line {i}: label {ex.label} for {len(ex.endings)} endings")
            out.append(ex)
            if limit and len(out) >= limit:
                break
    if not out:
        raise HellaSwagError(f"{path} holds no examples")
    return out


def for_training(path: str, limit: int, tokenizer, dist_info: Optional[DistInfo] = None,
                 device: str = "cpu") -> Optional[list[Example]]:
    """The examples a training run evaluates at each evaluation, or None (with a note on rank 0) when
    `path` is empty, the file is absent or the run has no tokenizer. Every rank must take the same
    decision (a rank that skips a collective hangs the others), so when the file is present on some
    nodes only this raises instead."""
    if not path:
        return None
    main = dist_info is None or dist_info.is_main
    present = count_ranks(in_home(path).is_file(), dist_info, device)
    world = dist_info.world_size if dist_info is not None else 1
    if 0 < present < world:
        raise HellaSwagError(f"{in_home(path)} exists for {present} of {world} processes: copy it to "
                             "every node (same path) or put it on a shared filesystem")
    if present == 0 or tokenizer is None:
        if main:
            why = "no tokenizer was given" if present else f"{in_home(path)} not found"
            print(f"note: HellaSwag is skipped ({why}; `uv run -m data.prepare_hellaswag` downloads it)")
        return None
    return load_examples(path, limit)


# ---- scoring -------------------------------------------------------------------------------------


def render(example: Example, tokenizer, block_size: int) -> list[tuple[list[int], int]]:
    """One (token ids, number of ending tokens) per ending: context + " " + ending, the way GPT-2's
    BPE sees a continuation (the space belongs to the ending's first token). When a row is longer
    than `block_size`, its first tokens are dropped: the ending is what gets scored."""
    ctx = tokenizer.encode(example.ctx)
    rows = []
    for ending in example.endings:
        end = tokenizer.encode(" " + ending)
        ids = (ctx + end)[-block_size:]
        rows.append((ids, min(len(end), len(ids) - 1)))  # the first kept token is never predicted
    return rows


@torch.no_grad()
def ending_losses(model, rows: Sequence[tuple[list[int], int]], device: Union[str, torch.device] = "cpu",
                  autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and mean cross-entropy of each row's last `n_end` tokens, each predicted from the
    tokens before it. Rows are right-padded into one batch; causal attention means the padding
    never changes the positions that are scored. Returns two (rows,) float tensors."""
    T = max(len(ids) for ids, _ in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)  # True where the token is part of the ending
    for r, (ids, n_end) in enumerate(rows):
        tokens[r, : len(ids)] = torch.tensor(ids)
        mask[r, len(ids) - n_end : len(ids)] = True
    tokens, mask = tokens.to(device), mask.to(device)
    with autocast or nullcontext():
        logits, _ = model(tokens)  # (R, T, V)
    # position t predicts token t+1
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")  # (R, T-1)
    m = mask[:, 1:].float()
    total = (ce * m).sum(dim=1)
    return total, total / m.sum(dim=1).clamp(min=1)


def evaluate_hellaswag(model, tokenizer, examples: Sequence[Example], *, device: Optional[str] = None,
                       autocast=None, dist_info: Optional[DistInfo] = None,
                       examples_per_batch: int = 16) -> HellaSwagResult:
    """Completion-style HellaSwag accuracy of `model` (see the module docstring). Under DDP pass
    `dist_info`: rank r scores examples r, r + W, ... and the counts are summed over ranks."""
    raw = unwrap(model)
    dev = device or str(next(raw.parameters()).device)
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info is not None else (0, 1)
    mine = list(examples)[rank::world]
    was_training = raw.training
    raw.eval()
    counts = torch.zeros(3, dtype=torch.float64)
    try:
        for start in range(0, len(mine), examples_per_batch):
            batch = mine[start : start + examples_per_batch]
            rows = [r for ex in batch for r in render(ex, tokenizer, raw.config.block_size)]
            total, mean = ending_losses(raw, rows, dev, autocast)
            k = 0
            for ex in batch:
                n = len(ex.endings)
                counts[0] += 1
                counts[1] += int(total[k : k + n].argmin()) == ex.label
                counts[2] += int(mean[k : k + n].argmin()) == ex.label
                k += n
    finally:
        raw.train(was_training)
    if dist_info is not None and dist_info.enabled:
        counts = counts.to(dev)
        all_reduce_sum(counts, dist_info)
    n, correct, correct_norm = (int(v) for v in counts.tolist())
    return HellaSwagResult(n, correct, correct_norm)
