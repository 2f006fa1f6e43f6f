"""Figures of chapter 07: the expert-parallel dispatch, and the exchanges of a training run.
Labels are in Portuguese, like the chapter's prose (docs/glossario.md)."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

RANK_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")


def _rank_box(ax, x, y0, y1, color, label):
    ax.add_patch(FancyBboxPatch((x - 0.18, y0 - 0.45), 0.36, y1 - y0 + 0.9, boxstyle="round,pad=0.02",
                                fc=color, alpha=0.12, ec=color))
    ax.text(x, y1 + 0.7, label, ha="center", va="bottom", fontsize=9, color=color)


def plot_dispatch(topk_idx: torch.Tensor, n_experts: int, title: str = "") -> Figure:
    """topk_idx (W, n, k): the experts chosen by n tokens on each of W ranks. Draws tokens (left,
    grouped by their rank) -> experts (middle, grouped by the rank that owns them) -> back to the
    same tokens (right). Arrows that cross ranks travel through all_to_all; the others stay local."""
    W, n, k = topk_idx.shape
    L = n_experts // W
    tok_y = {(r, i): -(r * (n + 1) + i) for r in range(W) for i in range(n)}
    scale = (W * (n + 1) - 1) / max(1, W * (L + 1) - 1)
    exp_y = {e: -((e // L) * (L + 1) + e % L) * scale for e in range(n_experts)}
    fig, ax = plt.subplots(figsize=(9, 0.35 * W * (n + 1) + 1.2))
    for r in range(W):
        ys = [tok_y[(r, i)] for i in range(n)]
        for x in (0, 2):
            _rank_box(ax, x, min(ys), max(ys), RANK_COLORS[r % 8], f"rank {r}: tokens")
        eys = [exp_y[e] for e in range(r * L, (r + 1) * L)]
        _rank_box(ax, 1, min(eys), max(eys), RANK_COLORS[r % 8], f"rank {r}: especialistas {r * L}..{(r + 1) * L - 1}")
    for (r, i), y in tok_y.items():
        for x in (0, 2):
            ax.plot(x, y, "o", color=RANK_COLORS[r % 8], ms=7)
        ax.text(-0.23, y, f"t{i}", ha="right", va="center", fontsize=8)
        for e in topk_idx[r, i].tolist():
            crosses = e // L != r
            style = dict(color="#C44E52" if crosses else "#999999", lw=1.4 if crosses else 0.8, alpha=0.8)
            ax.annotate("", xy=(0.82, exp_y[e]), xytext=(0.05, y), arrowprops=dict(arrowstyle="->", **style))
            ax.annotate("", xy=(1.95, y), xytext=(1.18, exp_y[e]), arrowprops=dict(arrowstyle="->", ls="--", **style))
    for e, y in exp_y.items():
        ax.text(1, y, f"E{e}", ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="round", fc="white", ec=RANK_COLORS[(e // L) % 8]))
    ax.text(0.5, 1.0, "all_to_all (despacho)", transform=ax.transAxes, ha="left", va="bottom", fontsize=9)
    ax.text(0.75, 1.0, "all_to_all (combinação)", transform=ax.transAxes, ha="left", va="bottom", fontsize=9)
    ax.plot([], [], color="#C44E52", label="cruza ranks (rede)")
    ax.plot([], [], color="#999999", label="fica no seu rank (cópia)")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8, frameon=False)
    ax.set_xlim(-0.45, 2.3)
    ax.axis("off")
    ax.set_title(title or f"Paralelismo de especialistas: {W} ranks, {n_experts} especialistas, top-{k}",
                 fontsize=11, pad=18)
    fig.tight_layout()
    return fig


def plot_comm(log: Sequence[dict], title: str = "") -> Figure:
    """Three panels from the train records of an EP run (`nanomoe.training.train`, log_interval=1):
    rows each rank's experts computed per step,
    the imbalance max/mean across ranks, and who sends how many rows to whom (mean per step)."""
    steps = [r["step"] for r in log]
    received = np.array([r["received"] for r in log], dtype=float)  # (steps, W)
    sent = np.array([r["sent"] for r in log], dtype=float).mean(0)  # (W, W)
    W = received.shape[1]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for r in range(W):
        axes[0].plot(steps, received[:, r], color=RANK_COLORS[r % 8], label=f"rank {r}", lw=1)
    axes[0].set(xlabel="passo", ylabel="linhas calculadas pelos especialistas do rank",
                title="trabalho dos especialistas por rank")
    axes[0].legend(fontsize=8)
    axes[1].plot(steps, [r["imbalance"] for r in log], color="black", lw=1)
    axes[1].axhline(1.0, color="gray", ls=":")
    axes[1].set(xlabel="passo", ylabel="máximo / média entre os ranks",
                title="desequilíbrio (o rank mais lento dita o ritmo)")
    im = axes[2].imshow(sent, cmap="Blues")
    for s in range(W):
        for d in range(W):
            axes[2].text(d, s, f"{sent[s, d]:.0f}", ha="center", va="center", fontsize=8)
    axes[2].set(xlabel="para o rank", ylabel="do rank", title="linhas enviadas por passo (média)",
                xticks=range(W), yticks=range(W))
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    mb = np.mean([sum(r["bytes"]) for r in log]) / 1e6
    fig.suptitle(title or f"{W} ranks: {mb:.2f} MB pela rede por passo (todos os ranks, forward + backward)")
    fig.tight_layout()
    return fig
