"""Matplotlib figures that the chapter scripts and notebooks share.

Every function returns a `matplotlib.figure.Figure` and never calls `plt.show()`: in a notebook
the inline backend shows the figure at the end of the cell; a script saves it with `save_path`.
Without a display (CI, ssh) matplotlib falls back to the non-interactive Agg backend by itself,
so importing this module never needs a screen.

Histories are lists of dicts, one dict per logged step, e.g.
`[{"step": 0, "train_loss": 3.9, "val_loss": 3.9}, {"step": 100, ...}]` (what `nanomoe.training.train`
returns in `TrainResult.history`); a key missing from a dict is simply not plotted there.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

PathLike = Union[str, os.PathLike]

# readable names for the usual history keys
LABELS = {
    "step": "passo",
    "epoch": "época",
    "tokens": "tokens vistos",
    "train_loss": "loss de treino",
    "val_loss": "loss de validação",
    "loss": "loss",
    "ppl": "perplexidade",
    "val_ppl": "perplexidade (validação)",
    "train_ppl": "perplexidade (treino)",
    "lr": "taxa de aprendizado",
    "tokens_per_s": "tokens/s",
}


def _label(key: str) -> str:
    return LABELS.get(key, key)


def _pt_number(v: float, digits: int = 2) -> str:
    """A number with a decimal comma (pt-br), trailing zeros trimmed: 0.25 -> "0,25", 1.0 -> "1"."""
    text = f"{v:.{digits}f}".rstrip("0").rstrip(".") if digits else f"{v:.0f}"
    return ("0" if text in ("-0", "") else text).replace(".", ",")


def tokens_axis(ax, axis: str = "x", label: str = "tokens vistos") -> None:
    """Token counts in millions with a decimal comma ("0,5"), said in the label: never a "1e6" offset."""
    fmt = FuncFormatter(lambda v, _: _pt_number(v / 1e6))
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_formatter(fmt)
    (ax.set_xlabel if axis == "x" else ax.set_ylabel)(f"{label} (milhões)")


def decimal_comma_axis(ax, axis: str = "y", digits: int = 3) -> None:
    """Tick labels with a decimal comma (pt-br) and no offset."""
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_formatter(FuncFormatter(lambda v, _: _pt_number(v, digits)))


def save_figure(fig: Figure, save_path: Optional[PathLike], dpi: int = 120) -> None:
    """Save `fig` to save_path (creating the folder); nothing when save_path is None.

    Returns nothing, so a notebook cell that ends with it shows the figure once (inline plotting)
    and no stray return value."""
    if save_path is None:
        return
    p = Path(save_path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=dpi, bbox_inches="tight")



def _finish(fig: Figure, title: Optional[str], save_path: Optional[PathLike]) -> Figure:
    """Every figure's last lines: the overall title (when given), a tight layout, the optional save."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, save_path)
    return fig


def plot_curves(
    histories: Union[Mapping[str, Sequence[Mapping]], Sequence[Mapping]],
    x: str = "step",
    y: Union[str, Sequence[str]] = ("train_loss", "val_loss"),
    *,
    logy: Union[bool, Sequence[bool]] = False,
    title: Optional[str] = None,
    hlines: Optional[Mapping[str, Mapping[str, float]]] = None,
    ncols: Optional[int] = None,
    figsize: Optional[tuple] = None,
    save_path: Optional[PathLike] = None,
) -> Figure:
    """One panel per key in `y`, one line per run in `histories` ({run name: history}).

    A single history (a list of dicts) is accepted too. `logy` is one flag or one per panel;
    `hlines` draws reference lines, e.g. `{"loss": {"ln(V)": 4.0}}`. Same run, same colour
    in every panel."""
    if not isinstance(histories, Mapping):
        histories = {"": histories}
    ys = [y] if isinstance(y, str) else list(y)
    if not ys:
        raise ValueError("plot_curves: give at least one key in y")
    logys = [logy] * len(ys) if isinstance(logy, bool) else list(logy)
    if len(logys) != len(ys):
        raise ValueError(f"plot_curves: logy has {len(logys)} entries for {len(ys)} panels")
    ncols = ncols or min(len(ys), 3)
    nrows = math.ceil(len(ys) / ncols)
    figsize = figsize or (4.6 * ncols, 3.4 * nrows)
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])
    for pi, (key, log) in enumerate(zip(ys, logys)):
        ax = axes[pi // ncols][pi % ncols]
        for ri, (name, hist) in enumerate(histories.items()):
            pts = [(h[x], h[key]) for h in hist if x in h and key in h and h[key] is not None]
            if not pts:
                continue
            xs, vs = zip(*pts)
            style = "-o" if len(pts) <= 12 else "-"
            ax.plot(xs, vs, style, ms=3, color=colors[ri % len(colors)], label=name or _label(key))
        for lname, val in (hlines or {}).get(key, {}).items():
            ax.axhline(val, ls="--", lw=1, color="gray")
            ax.annotate(lname, (0.99, val), xycoords=("axes fraction", "data"), ha="right", va="top",
                        fontsize=8, color="gray")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel(_label(x))
        ax.set_ylabel(_label(key))
        ax.grid(alpha=0.3)
        if len(histories) > 1:
            ax.legend(fontsize=8)
    for pi in range(len(ys), nrows * ncols):
        axes[pi // ncols][pi % ncols].set_visible(False)
    return _finish(fig, title, save_path)


def plot_loss_ppl(
    history: Sequence[Mapping],
    vocab_size: Optional[int] = None,
    *,
    x: str = "step",
    loss_key: str = "loss",
    ppl_key: str = "ppl",
    train_key: Optional[str] = "train_loss",
    target_ppl: Optional[float] = None,
    title: Optional[str] = None,
    save_path: Optional[PathLike] = None,
) -> Figure:
    """Chapter 01: loss and perplexity of one run side by side (perplexity on a log scale).

    With `vocab_size` the chance level is drawn: loss ln(V) and perplexity V, where a randomly
    initialized model starts (uniform prediction over V tokens). `target_ppl` draws a goal line.
    `train_key` (when present in the history) adds the per-step training loss, measured with
    dropout on, as a thin line beside the evaluated loss."""
    hlines: dict[str, dict[str, float]] = {loss_key: {}, ppl_key: {}}
    if vocab_size:
        hlines[loss_key][f"ln(V) = {math.log(vocab_size):.2f}"] = math.log(vocab_size)
        hlines[ppl_key][f"V = {vocab_size}"] = float(vocab_size)
    if target_ppl:
        hlines[ppl_key][f"PPL = {target_ppl:g}"] = float(target_ppl)
    fig = plot_curves(
        {"": history}, x=x, y=(loss_key, ppl_key), logy=(False, True), title=title, hlines=hlines,
    )
    pts = [(h[x], h[train_key]) for h in history if train_key and x in h and h.get(train_key) is not None]
    if pts:
        xs, vs = zip(*pts)
        ax_loss, ax_ppl = fig.axes[0], fig.axes[1]
        ax_loss.lines[0].set_label("sem dropout (modo eval)")
        ax_loss.plot(xs, vs, "-", lw=0.8, alpha=0.6, color="C1", label="treino (com dropout)")
        ax_ppl.lines[0].set_label("sem dropout (modo eval)")
        ax_ppl.plot(xs, [math.exp(v) for v in vs], "-", lw=0.8, alpha=0.6, color="C1", label="treino (com dropout)")
        for ax in (ax_loss, ax_ppl):
            ax.legend(fontsize=8, loc="center right")
    save_figure(fig, save_path)
    return fig


def plot_panels(
    panels: Mapping[str, Mapping[str, Sequence[Mapping]]],
    x: str = "step",
    y: str = "val_loss",
    *,
    title: Optional[str] = None,
    sharey: bool = False,
    save_path: Optional[PathLike] = None,
) -> Figure:
    """Chapter 05: one panel per comparison, `{panel title: {run name: history}}`, plotting `y`
    against `x` for every run of the panel (e.g. pretrained vs from scratch, transfer vs scratch)."""
    if not panels:
        raise ValueError("plot_panels: give at least one panel")
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.6), squeeze=False, sharey=sharey)
    for ax, (ptitle, runs) in zip(axes[0], panels.items()):
        for name, hist in runs.items():
            pts = [(h[x], h[y]) for h in hist if h.get(x) is not None and h.get(y) is not None]
            if pts:
                xs, vs = zip(*pts)
                ax.plot(xs, vs, "-o" if len(pts) <= 12 else "-", ms=3, label=name)
        ax.set_title(ptitle, fontsize=10)
        ax.set_xlabel(_label(x))
        ax.set_ylabel(_label(y))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _finish(fig, title, save_path)


def plot_expert_load(
    loads: Sequence,
    steps: Sequence[int],
    *,
    title: Optional[str] = None,
    save_path: Optional[PathLike] = None,
) -> Figure:
    """Chapter 03: heatmap of the expert load over training, one panel per MoE layer.

    `loads[w]` is the (n_layers, E) load fraction of logging window w (`MoEMetrics.load_fractions()`),
    `steps[w]` the step at the end of that window. Colour = share of the layer's assignments the
    expert got; 1/E everywhere is perfect balance (the colour scale is centred on it)."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    arr = np.stack([np.asarray(step_load, dtype=float) for step_load in loads])  # (W, L, E)
    if arr.ndim != 3 or arr.shape[0] != len(steps):
        raise ValueError(
            f"plot_expert_load: loads must be {len(steps)} arrays of shape (layers, experts), got {arr.shape}"
        )
    W, L, E = arr.shape
    fig, axes = plt.subplots(1, L, figsize=(min(4.2 * L, 16), 3.2), squeeze=False)
    # white = 1/E (balanced), blue = starved, red = overloaded
    norm = TwoSlopeNorm(vcenter=1.0 / E, vmin=0.0, vmax=max(2.0 / E, float(arr.max())))
    for li, ax in enumerate(axes[0]):
        im = ax.imshow(arr[:, li, :].T, aspect="auto", origin="lower", cmap="RdBu_r", norm=norm,
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, E - 0.5), interpolation="nearest")
        ax.set_title(f"camada MoE {li}", fontsize=10)
        ax.set_xlabel(_label("step"))
        ax.set_ylabel("especialista")
        ax.set_yticks(range(E))
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label=f"fração da carga (equilíbrio = 1/{E})")
    if title:
        fig.suptitle(title, y=1.04)
    save_figure(fig, save_path)
    return fig


def plot_token_routing(
    tokens: Sequence[str],
    experts: Sequence[Sequence[int]],
    n_experts: int,
    *,
    title: Optional[str] = None,
    save_path: Optional[PathLike] = None,
) -> Figure:
    """Chapter 03: which expert each token of a sentence goes to (its top-1 choice).

    `tokens`: the T token strings; `experts`: (n_layers, T) expert ids. One row per MoE layer,
    one cell per token, coloured by expert, with the token written in it."""
    import numpy as np

    ids = np.asarray(experts, dtype=int)  # (L, T)
    L, T = ids.shape
    if T != len(tokens):
        raise ValueError(f"plot_token_routing: {len(tokens)} tokens but expert ids for {T}")
    fig, ax = plt.subplots(figsize=(min(0.32 * T + 1.5, 24), 0.55 * L + 1.2))
    cmap = plt.get_cmap("tab10" if n_experts <= 10 else "tab20", n_experts)
    ax.imshow(ids, aspect="auto", cmap=cmap, vmin=-0.5, vmax=n_experts - 0.5, interpolation="nearest")
    for li in range(L):
        for t, s in enumerate(tokens):
            shown = {" ": "␣", "\n": "⏎"}.get(s, s)
            ax.text(t, li, shown, ha="center", va="center", fontsize=9, color="white")
    ax.set_yticks(range(L))
    ax.set_yticklabels([f"camada {i}" for i in range(L)])
    ax.set_xticks([])
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(e)) for e in range(n_experts)]
    ax.legend(handles, [f"E{e}" for e in range(n_experts)], ncol=min(n_experts, 8), fontsize=8,
              loc="upper center", bbox_to_anchor=(0.5, -0.05), frameon=False)
    ax.set_title(title or "especialista escolhido (top-1) por token")
    fig.tight_layout()
    save_figure(fig, save_path)
    return fig


def plot_balance_sweep(
    coefs: Sequence[float],
    load_cv: Sequence[float],
    val_loss: Sequence[float],
    *,
    title: Optional[str] = None,
    save_path: Optional[PathLike] = None,
) -> Figure:
    """Chapter 03: the balance-loss coefficient against the load imbalance (coefficient of
    variation of the expert load) and the validation loss. A coefficient of 0 is drawn at the
    left end of the log axis."""
    xs = list(coefs)
    pos = [c for c in xs if c > 0]
    zero_at = (min(pos) / 10) if pos else 1e-4
    px = [c if c > 0 else zero_at for c in xs]
    labels = [f"{c:g}" for c in xs]
    fig, axes = plt.subplots(1, 2, figsize=(9.2, 3.4))
    for ax, ys, name in ((axes[0], load_cv, "CV da carga (0 = equilibrado)"), (axes[1], val_loss, _label("val_loss"))):
        ax.plot(px, ys, "-o")
        ax.set_xscale("log")
        ax.set_xticks(px)
        ax.set_xticklabels(labels)
        ax.minorticks_off()
        ax.set_xlabel("coeficiente da loss de balanceamento")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    return _finish(fig, title, save_path)


def plot_crossover(
    runs: Mapping[str, Mapping[int, Sequence[Mapping]]],
    *,
    reference: Optional[str] = None,
    xs: Sequence[str] = ("tokens", "elapsed_s"),
    title: Optional[str] = None,
    hardware: Optional[str] = None,
    save_path: Optional[PathLike] = None,
) -> Figure:
    """Chapter 06: validation loss of each variant against tokens seen and against training time
    (`hardware`, e.g. "CPU x86_64, 1 thread", names where that time was measured).

    `runs` maps a variant name to {seed: history} (one colour per variant, one line style per seed).
    With `reference` (e.g. "denso") a last panel shows each variant's validation loss minus the
    reference's of the same seed, at the same steps: below zero, the variant is ahead."""
    styles = ("-", "--", ":", "-.")
    seeds = sorted({s for hists in runs.values() for s in hists})
    n = len(xs) + (reference is not None)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.0), squeeze=False)
    for ax, xk in zip(axes[0], xs):
        for ci, (name, hists) in enumerate(runs.items()):
            for seed, hist in hists.items():
                pts = [(r[xk], r["val_loss"]) for r in hist if r.get("val_loss") is not None and xk in r]
                if pts:
                    ax.plot(*zip(*pts), styles[seeds.index(seed) % len(styles)], color=f"C{ci}", lw=1.4,
                            label=f"{name} (semente {seed})")
        time_label = f"tempo de treino (s; {hardware})" if hardware else "tempo de treino (s)"
        ax.set_xlabel({"elapsed_s": time_label}.get(xk, _label(xk)))
        if xk == "tokens":
            tokens_axis(ax)
        ax.set_ylabel(_label("val_loss"))
        decimal_comma_axis(ax)
        ax.grid(alpha=0.3)
    if reference is not None:
        ax, shown = axes[0][-1], []
        for ci, (name, hists) in enumerate(runs.items()):
            for seed, hist in hists.items():
                ref = {r["step"]: r["val_loss"] for r in runs[reference].get(seed, []) if r.get("val_loss") is not None}
                pts = [(r["tokens"], r["val_loss"] - ref[r["step"]]) for r in hist
                       if r.get("val_loss") is not None and r["step"] in ref and r["step"] > 0]
                if pts and name != reference:
                    ax.plot(*zip(*pts), styles[seeds.index(seed) % len(styles)], color=f"C{ci}", lw=1.4)
                    shown += pts
        late = [y for x, y in shown if x >= 0.25 * max(x for x, _ in shown)] if shown else []
        if late:  # zoom on the last three quarters: the start of training is much noisier
            pad = 0.15 * (max(late) - min(late)) + 1e-3
            ax.set_ylim(min(min(late), 0) - pad, max(max(late), 0) + pad)
        ax.axhline(0, color="gray", lw=1)
        tokens_axis(ax)
        decimal_comma_axis(ax)
        ax.set_ylabel(f"loss de validação − {reference} (mesma semente)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _finish(fig, title, save_path)


def plot_matrices(
    mats: Sequence,
    titles: Sequence[str],
    *,
    xlabels: Optional[Sequence[str]] = None,
    ylabel: str = "especialista",
    xlabel: str = "especialista",
    center: Optional[float] = None,
    title: Optional[str] = None,
    save_path: Optional[PathLike] = None,
) -> Figure:
    """Chapter 06: one heatmap per matrix (co-activation per layer, routing share per class...).

    Shares are never negative: one sequential colour map (viridis) from 0; `center` (e.g. 1/E for
    a routing share, the level where the router ignores what the columns measure) is marked on
    the colour bar."""
    import numpy as np

    mats = [np.asarray(m, dtype=float) for m in mats]
    fig, axes = plt.subplots(1, len(mats), figsize=(min(4.2 * len(mats), 20), 3.9), squeeze=False)
    top = max(float(m.max()) for m in mats) if mats else 1.0
    for ax, m, name in zip(axes[0], mats, titles):
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=top, aspect="auto")  # shares: never negative, sequential
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.set_yticks(range(m.shape[0]))
        if xlabels is not None:
            ax.set_xticks(range(len(xlabels)))
            ax.set_xticklabels(xlabels, rotation=60, ha="right", fontsize=8)
        else:
            ax.set_xlabel(xlabel)
        bar = fig.colorbar(im, ax=ax, fraction=0.046)
        bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _pt_number(v)))
        if center is not None:  # the router-ignores-it level (e.g. 1/E), marked on the colour bar
            bar.ax.axhline(center, color="white", lw=2)
            bar.ax.text(1.6, center, _pt_number(center, 3), va="center", fontsize=7,
                        transform=bar.ax.get_yaxis_transform())
    return _finish(fig, title, save_path)


def plot_saturation(
    tokens: Sequence[float],
    per_layer: Sequence[Sequence[float]],
    *,
    overlap: Optional[Sequence[Sequence[float]]] = None,
    title: Optional[str] = None,
    save_path: Optional[PathLike] = None,
) -> Figure:
    """Chapter 06: routing saturation along a run, `per_layer[l][i]` at `tokens[i]`: the share of
    tokens whose top-k set equals the final model's; with `overlap`, a second panel with OLMoE's
    definition (arXiv 2409.02060, sec. 5.1: the mean share of each token's k experts that are
    among its final k)."""
    panels = [(per_layer, "tokens com o conjunto top-k final (%)", "conjunto exato")]
    if overlap is not None:
        panels.append((overlap, "especialistas do top-k final (%, média)", "sobreposição (definição do OLMoE)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 3.8), squeeze=False)
    for ax, (vals_by_layer, ylabel, name) in zip(axes[0], panels):
        for li, vals in enumerate(vals_by_layer):
            ax.plot(tokens, [100 * v for v in vals], "-o", ms=3, label=f"camada {li}")
        tokens_axis(ax)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 101)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _finish(fig, title, save_path)


def plot_one_switch(
    regimes: Mapping[str, Mapping],
    *,
    order: Sequence[str],
    clip: Union[None, float, Mapping[str, float]] = None,
    title: Optional[str] = None,
    save_path: Optional[PathLike] = None,
) -> Figure:
    """Chapter 06: Δ validation loss of each variant against the baseline, one panel per regime.

    regimes: {panel title: {"delta": {variant: [Δ per seed]}, "ci95": {variant: half width of the
    95% interval of the mean}, "dense_sd": the dense model's seed standard deviation}}. Dots: seeds;
    square and bar: the mean and its 95% interval (a bar that crosses 0: no measurable difference);
    grey band: ± the dense model's seed spread around 0. With `clip` (one value, or one per panel),
    the axis stops at ±clip and a variant beyond it is drawn at the edge with its mean written."""
    fig, axes = plt.subplots(1, len(regimes), figsize=(5.6 * len(regimes), 0.42 * len(order) + 1.8),
                             squeeze=False, sharey=True)
    for ax, (name, r) in zip(axes[0], regimes.items()):
        lim = clip.get(name) if isinstance(clip, Mapping) else clip
        if r.get("dense_sd"):
            ax.axvspan(-r["dense_sd"], r["dense_sd"], color="0.85", label="± desvio do denso entre sementes")
        ax.axvline(0, color="gray", lw=1)
        first = True
        for y, v in enumerate(order):
            ds = r["delta"].get(v) or []
            if not ds:
                continue
            mean = sum(ds) / len(ds)
            half = (r.get("ci95") or {}).get(v) or 0.0
            if lim is not None and abs(mean) > lim:  # off the axis: an arrow at the edge, the value written
                edge = math.copysign(lim, mean)
                ax.plot([edge], [y], ">" if mean > 0 else "<", color="k", ms=7)
                ax.text(edge * 0.97, y - 0.25, f"média {_pt_number(mean, 3)}", ha="right" if mean > 0 else "left",
                        fontsize=7)
                continue
            ax.plot(ds, [y] * len(ds), "o", color="C0", ms=4, alpha=0.6, label="uma semente" if first else None)
            ax.errorbar([mean], [y], xerr=[half], fmt="s", color="k", ms=5, capsize=3,
                        label="média e IC 95% da média" if first else None)
            first = False
        if lim is not None:
            ax.set_xlim(-lim, lim)
        ax.set_yticks(range(len(order)))
        ax.set_yticklabels(order)
        ax.set_ylim(len(order) + 1.3, -0.6)  # first variant on top; a free band at the bottom for the legend
        decimal_comma_axis(ax, "x")
        ax.set_xlabel("Δ loss de validação contra a base (nats/token)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=7, loc="lower right")
    return _finish(fig, title, save_path)
