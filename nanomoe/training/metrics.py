"""What a training run shows and records: running averages, the progress bar, metrics.jsonl, curves.

`Meter` sums a window of steps (since the last log line, since the last evaluation) and gives its
mean cross-entropy and tokens/s. `RunLog` is the run's voice: a tqdm bar, the console lines, and
one JSON line per record in `out_dir/metrics.jsonl` (rank 0 only). `save_curves` draws the train
and validation cross-entropy into `out_dir/curves.png`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import matplotlib.pyplot as plt

from ..course.plots import plot_curves
from ..files import atomic_write, write_text
from .checkpoint import plain
from .progress import tqdm


@dataclass
class Meter:
    """Running sums over a window of optimizer steps."""

    ce: float = 0.0  # sum of the steps' cross-entropies
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0

    def add(self, ce: float, seconds: float, tokens: int) -> None:
        self.ce += ce
        self.steps += 1
        self.seconds += seconds
        self.tokens += tokens

    @property
    def mean_ce(self) -> float:
        return self.ce / max(self.steps, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def progress_bar(total: int, initial: int, enabled: bool):
    """The training bar (see nanomoe.training.progress for what shows where)."""
    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, disable=not enabled)


class RunLog:
    """The run's console and metrics file. Only rank 0 writes; `show` turns the bar and lines on."""

    def __init__(self, out_dir: Optional[Path], total_steps: int, start_step: int, show: bool, main: bool):
        self.path = out_dir / "metrics.jsonl" if out_dir is not None and main else None
        self.main, self.show = main, show and main
        self.bar = progress_bar(total_steps, min(start_step, total_steps), enabled=self.show)

    def record(self, rec: dict) -> None:
        """Append one record to metrics.jsonl."""
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(plain(rec), ensure_ascii=False) + "\n")

    def info(self, text: str) -> None:
        """A progress line (rank 0, when showing progress)."""
        if self.show:
            self.bar.write(text)

    def error(self, text: str) -> None:
        """A line rank 0 always prints."""
        if self.main:
            (self.bar.write if self.show else print)(text)

    def eval_line(self, rec: dict) -> None:
        vl = f"val {rec['val_loss']:.4f} (ppl {rec['val_ppl']:.2f})" if "val_loss" in rec else "no val data"
        tl = f"train {rec['train_loss']:.4f}, " if rec["train_loss"] is not None else ""
        m = f", MFU {rec['mfu'] * 100:.1f}%" if rec.get("mfu") else ""
        hs = f" | HellaSwag {rec['hellaswag_acc_norm']:.4f} (n {rec['hellaswag_n']:,})" if "hellaswag_n" in rec else ""
        self.info(f"step {rec['step']:>6} | {tl}{vl}{hs} | {rec['tokens_per_s']:,.0f} tok/s{m}")
        if rec.get("sample"):
            self.info("  sample: " + rec["sample"].replace("\n", "\n          ")[:600])

    def close(self) -> None:
        self.bar.close()


def trim_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines an interrupted run wrote after its last checkpoint (step -1: all)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if rec.get("step", 0) <= step:
            keep.append(line)
    write_text(path, "".join(line + "\n" for line in keep))


def save_curves(history: list[dict], log: list[dict], path: Union[str, os.PathLike], title: str = "") -> Optional[Path]:
    """Save the train (per log record) and validation (per evaluation) cross-entropy curves."""
    if not history and not log:
        return None
    runs = {
        "treino": [{"step": r["step"], "loss": r["ce"]} for r in log],
        "validação": [{"step": r["step"], "loss": r["val_loss"]} for r in history if r.get("val_loss") is not None],
    }
    fig = plot_curves(runs, x="step", y="loss", title=title or None, figsize=(7, 4))
    fig.axes[0].set_ylabel("entropia cruzada (nats/token)")
    path = Path(path)
    with atomic_write(path) as f:  # a reader never sees a half-written image
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
