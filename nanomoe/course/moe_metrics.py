"""Routing health of an MoE model, accumulated over a logging window.

Every forward returns `out.moe_stats`, one dict per MoE layer (see `nanomoe.moe.MoE`).
`MoEMetrics.update(out.moe_stats)` adds them up; `summary()` turns the window into numbers
you can log, and `reset()` starts a new window:

    metrics = MoEMetrics()
    for step in ...:
        out = model(x, y); out.loss.backward(); opt.step()
        metrics.update(out.moe_stats)
        if step % log_interval == 0:
            print(metrics.summary()); metrics.reset()

Per layer:
- load_frac (E,): share of routed assignments each expert received (1/E each when balanced)
- load_cv: coefficient of variation std/mean of the load (0 = perfect balance)
- max_over_mean: max load / mean load, the capacity factor that would have dropped nothing
  (aggregated over the window; the per-sequence capacity can need a little more)
- dead: experts that received no assignment at all in the window
- dropped_frac: dropped assignments / routed assignments (0 when dropless)
- entropy: mean router entropy / log E (1 = uniform router, 0 = one-hot)
- top1_prob: mean probability of the top expert
- balance_loss, z_loss: raw values, before their coefficients (balance: 1 = balanced, E = collapsed)
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

_MEAN_KEYS = ("entropy", "top1_prob", "balance_loss", "z_loss")


class MoEMetrics:
    """Accumulates `out.moe_stats` (a forward's output) over a window; see the module docstring."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self._load: list[torch.Tensor] = []  # per layer, summed (E,)
        self._importance: list[torch.Tensor] = []
        self._tokens: list[float] = []
        self._dropped: list[float] = []
        self._sums: list[dict[str, float]] = []

    def update(self, stats: Optional[Iterable[dict]]) -> None:
        """Add one forward's statistics (a list with one dict per MoE layer)."""
        stats = list(stats or [])
        if not stats:
            return
        if self._load and len(stats) != len(self._load):
            raise ValueError(f"got stats for {len(stats)} MoE layers, the window has {len(self._load)}; call reset()")
        for i, st in enumerate(stats):
            load = st["load"].detach().float().cpu()
            imp = st["importance"].detach().float().cpu()
            if i == len(self._load):
                self._load.append(torch.zeros_like(load))
                self._importance.append(torch.zeros_like(imp))
                self._tokens.append(0.0)
                self._dropped.append(0.0)
                self._sums.append({k: 0.0 for k in _MEAN_KEYS})
            self._load[i] += load
            self._importance[i] += imp
            self._tokens[i] += float(st["tokens"])
            self._dropped[i] += float(st["dropped"])
            for k in _MEAN_KEYS:
                self._sums[i][k] += float(st[k])
        self.steps += 1

    @property
    def n_layers(self) -> int:
        return len(self._load)

    def load_fractions(self) -> torch.Tensor:
        """(n_moe_layers, E) share of assignments per expert over the window (rows sum to 1)."""
        if not self._load:
            return torch.empty(0, 0)
        load = torch.stack(self._load)
        return load / load.sum(1, keepdim=True).clamp_min(1)

    def summary(self) -> dict:
        """{"steps", "layers": [per-layer dict], and the means over layers of the scalar metrics}."""
        layers = []
        for i, load in enumerate(self._load):
            total = float(load.sum())
            mean = load.mean()
            layer = {
                "load_frac": (load / max(total, 1.0)).tolist(),
                "importance": (self._importance[i] / max(self.steps, 1)).tolist(),
                "load_cv": float(load.std(unbiased=False) / mean) if mean > 0 else 0.0,
                "max_over_mean": float(load.max() / mean) if mean > 0 else 0.0,
                "dead": int((load == 0).sum()),
                "dropped_frac": self._dropped[i] / total if total > 0 else 0.0,
                "tokens": int(self._tokens[i]),
            }
            for k in _MEAN_KEYS:
                layer[k] = self._sums[i][k] / max(self.steps, 1)
            layers.append(layer)
        out: dict = {"steps": self.steps, "layers": layers}
        for k in ("load_cv", "max_over_mean", "dropped_frac", *_MEAN_KEYS):
            out[k] = sum(lay[k] for lay in layers) / len(layers) if layers else float("nan")
        out["dead"] = sum(lay["dead"] for lay in layers)
        return out

    def format(self) -> str:
        """One log line with the layer-averaged metrics."""
        s = self.summary()
        return (
            f"moe: cv {s['load_cv']:.3f} max/mean {s['max_over_mean']:.2f} dead {s['dead']} "
            f"dropped {100 * s['dropped_frac']:.1f}% entropy {s['entropy']:.3f} top1 {s['top1_prob']:.3f} "
            f"balance {s['balance_loss']:.3f} z {s['z_loss']:.2f}"
        )
