"""Explanatory diagrams for the chapters, drawn with matplotlib from the package's own code.

Each diagram is computed, not drawn by hand: the RoPE figure rotates vectors with
`nanomoe.rope.apply_rope`, the GQA figure uses the head-to-group map of `CausalSelfAttention`
(kv head h // (n_head // n_kv_head)), the MoE figure shows the experts and gates that
`MoE.route` chose, and the schedule figure calls `nanomoe.training.train.get_lr` at every step. So a figure
changes when the code does.

Every function returns a `matplotlib.figure.Figure` (never `plt.show()`), like `nanomoe.course.plots`.
The links of the GQA and MoE diagrams carry a `gid` ("q3-kv1", "t2-e5", "e5-y2") so tests can read
the structure back from the figure.
"""

from __future__ import annotations

from typing import Optional, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

from ..rope import apply_rope, rope_tables
from ..training.train import get_lr
from .plots import PathLike, save_figure


def rope_pairs(x: torch.Tensor, positions: Sequence[int], theta: float = 10000.0) -> torch.Tensor:
    """x (D,) rotated by RoPE at each position -> (len(positions), D/2, 2): the pairs
    (x_i, x_{i+D/2}) of the rotate-half convention, one 2-D point per pair and position."""
    D = x.numel()
    cos, sin = rope_tables(D, max(positions) + 1, theta)
    rot = torch.stack([apply_rope(x, cos[m], sin[m]) for m in positions])  # (P, D)
    return torch.stack((rot[:, : D // 2], rot[:, D // 2 :]), dim=-1)  # (P, D/2, 2)


def plot_rope_rotation(
    head_dim: int = 16,
    positions: Sequence[int] = (0, 1, 2, 3, 4, 5, 6, 7),
    pairs: Sequence[int] = (0, 2, 7),
    theta: float = 10000.0,
    *,
    seed: int = 0,
    save_path: Optional[PathLike] = None,
) -> Figure:
    """RoPE as rotations: one panel per pair of dimensions (i, i + head_dim/2), the same vector
    drawn at each position m, rotated by m * theta_i. Early pairs (high frequency) turn fast,
    late pairs barely move; the length of each 2-D piece never changes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(head_dim, generator=g)
    pts = rope_pairs(x, positions, theta)  # (P, D/2, 2)
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.2 * len(pairs), 3.4), squeeze=False)
    cmap = plt.get_cmap("viridis", len(positions))
    for ax, i in zip(axes[0], pairs):
        r = float(pts[0, i].norm())
        circle = plt.Circle((0, 0), r, fill=False, ls=":", color="gray")
        ax.add_patch(circle)
        for j, m in enumerate(positions):
            px, py = pts[j, i].tolist()
            ax.annotate("", xy=(px, py), xytext=(0, 0),
                        arrowprops=dict(arrowstyle="->", color=cmap(j), lw=1.6), annotation_clip=False)
            ax.text(1.1 * px, 1.1 * py, f"m={m}", fontsize=7, color=cmap(j), ha="center", va="center")
        theta_i = theta ** (-2 * i / head_dim)
        ax.set_title(f"par ({i}, {i + head_dim // 2}): θ_{i} = {theta_i:.3g} rad/posição", fontsize=9)
        lim = 1.3 * r
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.axhline(0, color="gray", lw=0.5)
        ax.axvline(0, color="gray", lw=0.5)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"RoPE: o mesmo vetor (head_dim = {head_dim}) nas posições {positions[0]}..{positions[-1]}; "
                 f"cada par de dimensões gira pelo ângulo m·θ_i", fontsize=10)
    fig.tight_layout()
    save_figure(fig, save_path)
    return fig


def gqa_groups(n_head: int, n_kv_head: int) -> list[int]:
    """The key/value head each query head reads: h -> h // (n_head // n_kv_head), the map of
    `repeat_interleave` in `CausalSelfAttention` and of SDPA's `enable_gqa`."""
    if n_kv_head < 1 or n_head % n_kv_head:
        raise ValueError(f"n_kv_head ({n_kv_head}) must divide n_head ({n_head})")
    return [h // (n_head // n_kv_head) for h in range(n_head)]


def _box(ax, x: float, y: float, text: str, color: str, w: float = 0.8, h: float = 0.5) -> None:
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.03", fc=color, ec="black", lw=0.8,
                                zorder=3))
    ax.text(x, y, text, ha="center", va="center", fontsize=8, zorder=4)


def plot_gqa_heads(
    configs: Sequence[tuple[int, int]] = ((8, 8), (8, 2), (8, 1)),
    *,
    save_path: Optional[PathLike] = None,
) -> Figure:
    """Query heads on top, key/value heads below, one link per query head to the kv head it reads;
    one panel per (n_head, n_kv_head): MHA (n_kv_head = n_head), GQA, MQA (n_kv_head = 1)."""
    fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs), 2.8), squeeze=False)
    for ax, (H, Hkv) in zip(axes[0], configs):
        groups = gqa_groups(H, Hkv)
        kv_x = [(g + 0.5) * H / Hkv - 0.5 for g in range(Hkv)]  # each kv head centred under its group
        colors = plt.get_cmap("tab10")
        for h, g in enumerate(groups):
            ax.plot([h, kv_x[g]], [1.75, 0.25], color=colors(g % 10), lw=1.2, gid=f"q{h}-kv{g}")
        for h, g in enumerate(groups):
            _box(ax, h, 2.0, f"q{h}", "white", w=0.8)
        for g in range(Hkv):
            _box(ax, kv_x[g], 0.0, f"k,v {g}", colors(g % 10), w=min(0.9 * H / Hkv, 1.6))
        kind = "MHA" if Hkv == H else "MQA" if Hkv == 1 else f"GQA-{Hkv}"
        ax.set_title(f"{kind}: n_head={H}, n_kv_head={Hkv}\nKV cache: {Hkv}/{H} do MHA", fontsize=9)
        ax.set_xlim(-0.8, H - 0.2)
        ax.set_ylim(-0.6, 2.6)
        ax.axis("off")
    fig.suptitle("cada cabeça de consulta lê as chaves e valores do seu grupo", fontsize=10)
    fig.tight_layout()
    save_figure(fig, save_path)
    return fig


def plot_moe_dispatch(
    topk_idx: torch.Tensor,
    gates: torch.Tensor,
    n_experts: int,
    *,
    token_labels: Optional[Sequence[str]] = None,
    save_path: Optional[PathLike] = None,
) -> Figure:
    """An MoE layer for a few tokens: token t (left) goes to its k experts (middle), and each expert
    output comes back, multiplied by its gate g, to be summed into y_t (right).

    `topk_idx`, `gates`: (T, k) from `MoE.route` (one sequence). Line width ~ gate."""
    topk_idx, gates = topk_idx.detach().cpu(), gates.detach().float().cpu()
    if topk_idx.dim() != 2 or topk_idx.shape != gates.shape:
        shapes = f"{tuple(topk_idx.shape)} and {tuple(gates.shape)}"
        raise ValueError(f"topk_idx and gates must both be (T, k), got {shapes}")
    T, k = topk_idx.shape
    labels = list(token_labels) if token_labels is not None else [f"x{t}" for t in range(T)]
    if len(labels) != T:
        raise ValueError(f"{len(labels)} token labels for {T} tokens")
    height = max(T, n_experts)
    ty = [height - 1 - (t + 0.5) * height / T + 0.5 for t in range(T)]
    ey = [height - 1 - (e + 0.5) * height / n_experts + 0.5 for e in range(n_experts)]
    fig, ax = plt.subplots(figsize=(8, 0.55 * height + 1.4))
    colors = plt.get_cmap("tab10")
    for t in range(T):
        for j in range(k):
            e, g = int(topk_idx[t, j]), float(gates[t, j])
            c = colors(t % 10)
            ax.plot([0.4, 2.6], [ty[t], ey[e]], color=c, lw=0.5 + 4 * g, alpha=0.8, gid=f"t{t}-e{e}")
            ax.plot([3.4, 5.6], [ey[e], ty[t]], color=c, lw=0.5 + 4 * g, alpha=0.8, ls="--", gid=f"e{e}-y{t}")
            ax.text(5.0, ey[e] + 0.7 * (ty[t] - ey[e]), f"g={g:.2f}", fontsize=7, color=c, ha="center",
                    va="bottom", bbox=dict(fc="white", ec="none", pad=0.5, alpha=0.7))
    used = set(topk_idx.flatten().tolist())
    for e in range(n_experts):
        _box(ax, 3.0, ey[e], f"E{e}", "#ffe9b3" if e in used else "#eeeeee", w=0.8, h=0.6)
    for t in range(T):
        _box(ax, 0.0, ty[t], labels[t], "white", w=0.8, h=0.6)
        _box(ax, 6.0, ty[t], f"y{t} = Σ g·E", "#d9ecff", w=1.0, h=0.6)
    ax.text(0.0, height + 0.1, "tokens", ha="center", fontsize=9)
    ax.text(3.0, height + 0.1, "especialistas", ha="center", fontsize=9)
    ax.text(6.0, height + 0.1, "soma ponderada", ha="center", fontsize=9)
    ax.set_xlim(-0.6, 6.7)
    ax.set_ylim(-0.8, height + 0.5)
    ax.axis("off")
    ax.set_title(f"MoE top-{k}: cada token vai a {k} de {n_experts} especialistas e volta somado com os pesos g "
                 "(espessura = g)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, save_path)
    return fig


def plot_lr_schedule(tcfg, *, save_path: Optional[PathLike] = None) -> Figure:
    """The learning rate `nanomoe.training.train.train` uses at every optimizer step of `tcfg` (a
    TrainConfig): linear warmup, cosine decay to min_lr (`nanomoe.training.train.get_lr`)."""
    steps = list(range(tcfg.max_steps))
    lrs = [get_lr(s, tcfg) for s in steps]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, lrs, gid="lr")
    ax.axvline(tcfg.warmup_steps, color="gray", ls="--", lw=0.8)
    ax.text(tcfg.warmup_steps, tcfg.lr, f" fim do warmup (passo {tcfg.warmup_steps})", fontsize=8, va="top")
    ax.axhline(tcfg.min_lr, color="gray", ls=":", lw=0.8)
    ax.text(0, tcfg.min_lr, f" min_lr = {tcfg.min_lr:g}", fontsize=8, va="bottom")
    ax.set_xlabel("passo do otimizador")
    ax.set_ylabel("taxa de aprendizado")
    ax.set_title(f"warmup linear + decaimento cosseno (lr = {tcfg.lr:g}, {tcfg.max_steps} passos)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, save_path)
    return fig
