"""Chapter 06 experiment: where does an MoE overtake its dense twin?

Every variant trains with the same recipe, the same tokens in the same order (per seed) and the
same *active* parameters; `train_variant` records the validation curve, the training time and,
for MoE models, the routing of a fixed probe batch at every evaluation (for the saturation
figure). A finished run is saved under `cache_dir` (atomically, with its config) and reused when
the same variant is asked for again, so an interrupted experiment resumes where it stopped.

`crossover` reads two curves: the first point from which the MoE stays below the dense model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config import GPTConfig
from ..data import corpus_tokenizer
from ..device import hardware, pick_device
from ..files import atomic_write
from ..model import GPT
from ..tokenizer import Tokenizer
from ..training.cli import CLIError
from ..training.train import TrainConfig, train
from .routing_analysis import routing_of

REGIMES = ("char", "bpe")


def regime_tokenizer(regime: str, text: str, bpe_vocab: int = 1024) -> Tokenizer:
    """The experiment's two regimes: "char" (the characters of the whole corpus) or "bpe" (the
    course's Portuguese byte-level BPE with `bpe_vocab` tokens, trained on the training split only)."""
    if regime not in REGIMES:
        raise CLIError(f"--tokenizer must be one of {', '.join(REGIMES)}, got {regime!r}")
    return corpus_tokenizer(regime, text, vocab_size=bpe_vocab)


def _evals(history: Sequence[dict]) -> list[dict]:
    return [r for r in history if r.get("val_loss") is not None]


def crossover(dense: Sequence[dict], moe: Sequence[dict], x: str = "tokens") -> Optional[float]:
    """The `x` ("tokens" or "elapsed_s") of the first evaluation from which the MoE's validation loss
    is below the dense model's at every later evaluation; None when it never gets (and stays) there.

    With x="tokens" the curves are compared at equal steps. With x="elapsed_s" each MoE point is
    compared with the dense loss linearly interpolated at the same training time (MoE points
    later than the dense run's last one are not compared)."""
    d = _evals(dense)
    if x == "tokens":
        ref = {r["step"]: r["val_loss"] for r in d}
        pts = [(r[x], r["val_loss"] < ref[r["step"]]) for r in _evals(moe) if r["step"] in ref]
    else:
        times, losses = [r[x] for r in d], [r["val_loss"] for r in d]
        pts = []
        for r in _evals(moe):
            t = r[x]
            if not times or t < times[0] or t > times[-1]:
                continue
            i = max(j for j in range(len(times)) if times[j] <= t)
            if i + 1 < len(times) and times[i + 1] > times[i]:
                w = (t - times[i]) / (times[i + 1] - times[i])
                dense_at = losses[i] + w * (losses[i + 1] - losses[i])
            else:
                dense_at = losses[i]
            pts.append((t, r["val_loss"] < dense_at))
    first = None
    for xv, below in pts:
        if not below:
            first = None
        elif first is None:
            first = xv
    return first


def _key(cfg: GPTConfig, tcfg: TrainConfig) -> str:
    return json.dumps({"model": cfg.to_dict(), "train": tcfg.to_dict()}, sort_keys=True, default=str)


def run_file(name: str, seed: int, key: str) -> str:
    """File name of a finished run: readable, plus a hash of its full config (another recipe never
    overwrites it)."""
    slug = "".join(c if c.isalnum() or c in "-+" else "_" for c in name)
    return f"{slug}_seed{seed}_{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt"


def train_variant(
    name: str,
    cfg: GPTConfig,
    tcfg: TrainConfig,
    train_ids,
    val_ids,
    probe: torch.Tensor,
    cache_dir: Optional[Path] = None,
    progress: bool = True,
) -> dict:
    """Train (or reload) one variant; returns {"name", "seed", "model", "history", "seconds",
    "tokens_per_s", "hardware", "active", "total", "snapshots", "cached"} ("hardware": where it was
    trained, which its times belong to). `snapshots` is a list of
    {"step", "tokens", "topk": [one (B, T, k) tensor per MoE layer]} for the probe batch (B, T)."""
    path, key = None, _key(cfg, tcfg)
    if cache_dir is not None:
        path = Path(cache_dir) / run_file(name, tcfg.seed, key)
        if path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["key"] == key:
                model = GPT(cfg)
                model.load_state_dict(saved["state"])
                return {**saved["record"], "model": model.eval(), "cached": True}
    torch.manual_seed(tcfg.seed)  # same initialization stream for every variant of a seed
    model = GPT(cfg)
    snapshots = []
    tokens_per_step = tcfg.batch_size * tcfg.grad_accum * (tcfg.block_size or cfg.block_size)

    def on_step(step: int, raw, st) -> None:
        if step % tcfg.eval_interval == 0 or step == tcfg.max_steps:
            topk = [t.to(torch.int16) for t in routing_of(raw, probe.to(next(raw.parameters()).device))]
            snapshots.append({"step": step, "tokens": step * tokens_per_step, "topk": topk})

    res = train(model, train_ids, val_ids, tcfg, on_step=on_step if cfg.n_experts else None, progress=progress)
    history = [{k: v for k, v in r.items() if k != "sample"} for r in res.history]
    record = {
        "name": name, "seed": tcfg.seed, "history": history,
        "seconds": res.train_time_s, "tokens_per_s": res.tokens_per_s, "snapshots": snapshots,
        "hardware": hardware(pick_device(tcfg.device)),
        "active": model.num_params(active=True), "total": model.num_params(),
    }
    model = model.cpu().eval()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            torch.save({"key": key, "record": record, "state": model.state_dict()}, f)
    return {**record, "model": model, "cached": False}
