"""Chapter 06's one-switch experiment: each router idea alone on top of chapter 03's MoE.

The baseline is chapter 03's top-2 softmax MoE (8 experts, alpha = 0.01 balance loss over the
micro-batch, ST-MoE z-loss 1e-3) at the dense model's active parameters; every other variant turns
ONE switch of `GPTConfig` (or of the batch layout, for the global-batch pair), and the last one is
DeepSeek-V3's recipe (arXiv 2412.19437) as a whole. `VARIANTS` lists them; `variant_config` builds
one. After training, `evaluate_run` measures what the chapter compares:

- the validation loss of every token of the first `val_tokens` validation tokens (consecutive
  blocks of `block_size`), so the estimate's standard error can be stated (`loss_stats`);
- specialization: how much the token (its class, or its id) tells about the experts it goes to
  (`specialization`), the measure the global-batch balance paper (arXiv 2501.11873) argues about;
- saturation (OLMoE, arXiv 2409.02060, sec. 5.1) from the training snapshots, as OLMoE defines
  it (mean overlap of the top-k sets with the final ones) and as the exact-set share.
"""

from __future__ import annotations

import json
import math
import urllib.request
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import GPTConfig, modern_config, moe_config
from ..paths import checkout_with
from ..training.train import TrainConfig
from .crossover import train_variant
from .routing_analysis import char_class_ids, chosen_mask, routing_of, saturation, saturation_overlap

# name -> (GPTConfig overrides on top of moe_config, TrainConfig overrides); "denso" is the dense model.
MICRO4 = dict(batch_size=4, grad_accum=4)  # the same 16 sequences per step, in 4 micro-batches of 4
V3_RECIPE = dict(
    moe_router="sigmoid",  # eq. 15: sigmoid affinities, gates renormalized over the chosen k (eq. 13)
    moe_bias_balance=True, moe_bias_update_rate=1e-3,  # sec. 2.1.2 / Loss-Free Balancing: b_i += gamma sign(.)
    moe_balance_scope="sequence", moe_aux_loss_coef=1e-4,  # eq. 17-20, the small complementary alpha
    moe_z_loss_coef=0.0,  # V3 has no router z-loss
    moe_routed_scaling=2.5,  # routed_scaling_factor of V3's released config.json (not in the equations)
    n_experts=32, moe_top_k=7, n_shared_experts=1,  # fine-grained + 1 shared (V3: 256 routed top-8 + 1 shared)
    moe_dense_layers=1,  # V3: the first 3 of 61 layers dense; here the first of 2
)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "denso": ({}, {}),
    "base (MoE top-2)": ({}, {}),
    "sigmoide": (dict(moe_router="sigmoid"), {}),
    "viés, α = 0": (dict(moe_bias_balance=True, moe_aux_loss_coef=0.0), {}),
    "loss por sequência": (dict(moe_balance_scope="sequence"), {}),
    "micro-lotes de 4": ({}, MICRO4),
    "lote global (micro-lotes de 4)": (dict(moe_balance_scope="global"), MICRO4),
    "1 compartilhado": (dict(n_shared_experts=1), {}),
    "finos 32×top-8": (dict(n_experts=32, moe_top_k=8), {}),
    "1ª camada densa": (dict(moe_dense_layers=1), {}),
    "receita DeepSeek-V3": (V3_RECIPE, {}),
}


def variant_config(name: str, shape: dict) -> tuple[GPTConfig, dict]:
    """(model config, TrainConfig overrides) of one variant for the model `shape` (vocab, sizes)."""
    model_kw, train_kw = VARIANTS[name]
    cfg = modern_config(**shape) if name == "denso" else moe_config(**shape, **model_kw)
    return cfg, dict(train_kw)


@torch.no_grad()
def token_losses(model: torch.nn.Module, ids: Sequence[int], block_size: int, max_tokens: int,
                 batch: int = 64) -> torch.Tensor:
    """Cross-entropy of every token of the first `max_tokens` tokens of `ids`, read as consecutive
    blocks of `block_size` (each predicts its next token): (n_blocks, block_size) float32."""
    data = torch.as_tensor(ids[: max_tokens + 1], dtype=torch.long)
    n = (len(data) - 1) // block_size
    x = data[: n * block_size].view(n, block_size)
    y = data[1: n * block_size + 1].view(n, block_size)
    model.eval()
    out = []
    for i in range(0, n, batch):
        h, _, _ = model.hidden_states(x[i:i + batch])
        logits = model.logits(h).float()
        out.append(F.cross_entropy(logits.transpose(1, 2), y[i:i + batch], reduction="none"))
    return torch.cat(out)


def loss_stats(losses: torch.Tensor) -> dict:
    """Mean of (n_blocks, T) per-token losses and its standard error, naive (tokens independent) and
    by blocks (the spread of block means / sqrt(n_blocks): tokens of a block are correlated)."""
    flat, blocks = losses.flatten().double(), losses.double().mean(1)
    return {"tokens": flat.numel(), "mean": float(flat.mean()),
            "se_tokens": float(flat.std() / math.sqrt(flat.numel())),
            "se_blocks": float(blocks.std() / math.sqrt(blocks.numel()))}


def paired_delta(losses: torch.Tensor, ref: torch.Tensor) -> dict:
    """Mean difference of two models' losses on the same tokens, with its block standard error."""
    d = (losses.double() - ref.double()).mean(1)
    return {"delta": float(d.mean()), "se_blocks": float(d.std() / math.sqrt(d.numel()))}


def _cond_entropy(mask: torch.Tensor, labels: torch.Tensor, n_labels: int) -> tuple[float, float]:
    """mask (N, E) 0/1 assignments, labels (N,) -> (H(expert | label), H(expert)) / log E: the expert
    of an assignment, drawn uniformly among all assignments."""
    E = mask.size(1)
    counts = torch.zeros(n_labels, E, dtype=torch.float64).index_add_(0, labels, mask.double())  # (L, E)
    w = counts.sum(1) / counts.sum()
    p = counts / counts.sum(1, keepdim=True).clamp_min(1e-12)
    h_cond = float((w * torch.special.entr(p).sum(1)).sum()) / math.log(E)
    marg = counts.sum(0) / counts.sum()
    return h_cond, float(torch.special.entr(marg).sum()) / math.log(E)


def specialization(model: torch.nn.Module, probe: torch.Tensor, pieces: Sequence[str]) -> list[dict]:
    """Per MoE layer, on the probe batch (B, T): the normalized entropy of the expert chosen given the
    token's class (its first character's class) and given the token id, and without condition.
    1 - H(e | x)/H(e) is the share of the routing the token explains: higher = more specialized."""
    classes = char_class_ids([p[:1] for p in pieces])  # (B*T,)
    ids = torch.unique(probe.reshape(-1), return_inverse=True)[1]
    out = []
    for d in routing_of(model, probe):  # (B, T, k) per MoE layer
        E = int(model.config.n_experts)
        mask = chosen_mask(d, E).reshape(-1, E)  # (B*T, E)
        h_class, h = _cond_entropy(mask, classes, int(classes.max()) + 1)
        h_token, _ = _cond_entropy(mask, ids, int(ids.max()) + 1)
        out.append({"h_expert": h, "h_given_class": h_class, "h_given_token": h_token})
    return out


def saturation_curves(snapshots: Sequence[dict]) -> dict:
    """From the training snapshots ({"tokens", "topk": [(B, T, k) per layer]}): per layer, at each
    snapshot, OLMoE's saturation (mean top-k overlap with the final sets) and the exact-set share."""
    if not snapshots:
        return {"tokens": [], "overlap": [], "exact": []}
    final = snapshots[-1]["topk"]
    return {
        "tokens": [s["tokens"] for s in snapshots],
        "overlap": [[saturation_overlap(s["topk"][i], f) for s in snapshots] for i, f in enumerate(final)],
        "exact": [[saturation(s["topk"][i], f) for s in snapshots] for i, f in enumerate(final)],
    }


def evaluate_run(run: dict, val_ids, block_size: int, val_tokens: int, probe: torch.Tensor,
                 pieces: Sequence[str]) -> tuple[dict, torch.Tensor]:
    """The measures of one trained run (a `train_variant` record): ({"val": loss_stats,
    "specialization", "saturation"}, per-token losses (n_blocks, T) for paired differences)."""
    model = run["model"]
    losses = token_losses(model, val_ids, block_size, val_tokens)
    out = {"val": loss_stats(losses)}
    if model.config.n_experts:
        out["specialization"] = specialization(model, probe, pieces)
        out["saturation"] = saturation_curves(run["snapshots"])
    return out, losses


def summarize(records: Sequence[dict], ref: str = "base (MoE top-2)") -> list[dict]:
    """Per variant: Δ of the final validation loss against `ref` per seed (the seeds both have), its
    mean and sample standard deviation over seeds, and the variant's own val loss spread."""
    by = {}
    for r in records:
        by.setdefault(r["name"], {})[r["seed"]] = r
    out = []
    for name, runs in by.items():
        seeds = sorted(s for s in runs if s in by.get(ref, {}))
        deltas = [runs[s]["val"]["mean"] - by[ref][s]["val"]["mean"] for s in seeds]
        vals = [runs[s]["val"]["mean"] for s in sorted(runs)]
        out.append({
            "name": name, "seeds": seeds, "delta": deltas,
            "delta_mean": sum(deltas) / len(deltas) if deltas else None,
            "delta_sd": _sd(deltas), "delta_ci95": ci95(deltas), "delta_below_0": sum(d < 0 for d in deltas),
            "val_mean": sum(vals) / len(vals), "val_sd": _sd(vals),
        })
    return out


# Student's t, 97.5% quantile by degrees of freedom (from any statistics table): the 95% interval of
# a mean of n values is mean ± t[n-1] * sd / sqrt(n). Degrees of freedom missing here use the next
# smaller key (a slightly wider, conservative interval).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def ci95(xs: Sequence[float]) -> Optional[float]:
    """Half width of the 95% confidence interval of the mean of `xs` (t with n-1 degrees of freedom);
    None for fewer than 2 values. The chapter calls an effect measurable when mean ± this excludes 0."""
    sd = _sd(xs)
    if sd is None:
        return None
    df = max(k for k in T975 if k <= len(xs) - 1)
    return T975[df] * sd / math.sqrt(len(xs))


def _sd(xs: Sequence[float]):
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def run_grid(names: Sequence[str], seeds: Sequence[int], shape: dict, train_kw: dict, data: tuple,
             probe: torch.Tensor, pieces: Sequence[str], val_tokens: int, cache_dir=None,
             on_record: Optional[Callable[[list[dict]], None]] = None, progress: bool = False,
             previous: Sequence[dict] = ()):
    """Train (or reload from `cache_dir`) every variant of `names` for every seed, seed by seed, and
    measure it (`evaluate_run`). data = (train_ids, val_ids); train_kw: the TrainConfig fields all
    runs share (each variant may override some, e.g. the micro-batch layout). Returns (records: one
    JSON-ready dict per run, runs: {(name, seed): the `train_variant` record, with its model}).
    `on_record(records)` is called after every run (to save partial results). `previous`: records of
    an earlier grid with the same settings; the (variant, seed) pairs they hold are kept, not retrained
    (paired differences need both runs of a seed, so a seed is completed in one grid)."""
    train_ids, val_ids = data
    records, losses, runs = list(previous), {}, {}
    done = {(r["name"], r["seed"]) for r in records}
    for seed in seeds:
        for name in names:
            if (name, seed) in done:
                continue
            cfg, overrides = variant_config(name, shape)
            tcfg = TrainConfig(**{**train_kw, "seed": seed, **overrides})
            run = train_variant(name, cfg, tcfg, train_ids, val_ids, probe, cache_dir=cache_dir, progress=progress)
            measures, losses[name, seed] = evaluate_run(run, val_ids, shape["block_size"], val_tokens, probe, pieces)
            rec = {k: run[k] for k in ("name", "seed", "seconds", "tokens_per_s", "hardware", "active", "total")}
            rec.update(measures, cached=run["cached"], micro_batch=tcfg.batch_size, grad_accum=tcfg.grad_accum,
                       history=[{k: h.get(k) for k in ("step", "tokens", "elapsed_s", "val_loss")}
                                for h in run["history"] if h.get("val_loss") is not None])
            records.append(rec)
            for ref in ("base (MoE top-2)", "micro-lotes de 4"):  # paired with the reference, whichever ran first
                for other in records:
                    if other["seed"] == seed and (ref, seed) in losses and other["name"] != ref:
                        other.setdefault("paired", {})[ref] = paired_delta(losses[other["name"], seed],
                                                                            losses[ref, seed])
            runs[name, seed] = run
            if on_record is not None:
                on_record(records)
    return records, runs


def load_recorded(rel_path: str, ref: str = "main") -> Optional[dict]:
    """A recorded result of the repository (e.g. "docs/results/06/one_switch.json"): from the
    current folder or one of its parents (a clone; a notebook runs in notebooks/), else from the
    repository on GitHub at `ref` (Colab). None, with one line saying why, when neither answers."""
    folder = checkout_with(rel_path)
    if folder is not None:
        return json.loads((folder / rel_path).read_text(encoding="utf-8"))
    url = f"https://raw.githubusercontent.com/sagui-nlp/nanomoe/{ref}/{rel_path}"
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return json.loads(r.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        print(f"recorded result {rel_path} not found here nor at {url} ({e}); run the grid to make it")
        return None


# ---- reading a recorded grid (the chapter's tables) ---------------------------------------------------


def pt(v: Optional[float], digits: int = 4, sign: bool = False) -> str:
    """A number in pt-br: decimal comma, "−" for minus; "—" for None."""
    if v is None:
        return "—"
    text = f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"
    return text.replace("-", "−").replace(".", ",")


def _mean_sd(xs: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    return (sum(xs) / len(xs) if xs else None), _sd(xs)


def one_switch_panel(result: dict, ref: str = "base (MoE top-2)") -> dict:
    """What `plots.plot_one_switch` draws for one regime: Δ per seed of each variant, the half width
    of the 95% interval of its mean, the dense model's seed standard deviation."""
    summary = {s["name"]: s for s in result["summary"]}
    return {"delta": {n: s["delta"] for n, s in summary.items() if n != ref},
            "ci95": {n: s["delta_ci95"] for n, s in summary.items() if n != ref},
            "dense_sd": summary.get("denso", {}).get("val_sd")}


def one_switch_caption(result: dict) -> str:
    """One line: validation tokens, the standard error of one run's loss, the dense seed spread."""
    runs = result["runs"]
    se = [r["val"]["se_blocks"] for r in runs]
    dense = next((s for s in result["summary"] if s["name"] == "denso"), None)
    return (f"{runs[0]['val']['tokens']:,} tokens de validação por treino; erro-padrão (por blocos) da loss de um "
            f"treino {pt(min(se))}–{pt(max(se))}; desvio da loss do denso entre sementes "
            f"{pt(dense['val_sd'] if dense else None)}").replace(",", "\u2009", 1)


def _paired_deltas(runs: dict, name: str, ref: str, seeds: Sequence[int]) -> list[tuple[int, float]]:
    """(seed, val loss of `name` − val loss of `ref`) for the seeds both ran; runs: {(name, seed): record}."""
    return [(s, runs[name, s]["val"]["mean"] - runs[ref, s]["val"]["mean"]) for s in seeds
            if (name, s) in runs and (ref, s) in runs]


def one_switch_table(result: dict, ref: str = "base (MoE top-2)") -> str:
    """Markdown table: per variant, Δ val loss against `ref` per seed (in seed order), mean ± sd over
    seeds, the 95% interval of the mean, how many seeds went below the base, and the mean paired
    standard error of Δ (the measurement's own noise, far below the seeds')."""
    runs = {(r["name"], r["seed"]): r for r in result["runs"]}
    seeds = sorted({s for _, s in runs})
    names = [n for n in VARIANTS if any((n, s) in runs for s in seeds)]
    rows = [f"| variante | Δ por semente ({seeds[0]} a {seeds[-1]}) | média ± desvio | IC 95% da média "
            "| sementes com Δ < 0 | erro-padrão pareado |", "|---|---|---:|---:|---:|---:|"]
    for n in names:
        if n == ref:
            vals = [runs[n, s]["val"]["mean"] for s in seeds if (n, s) in runs]
            m, sd = _mean_sd(vals)
            rows.append(f"| {n} (a loss, não Δ) | " + " ".join(pt(v, 3) for v in vals)
                        + f" | {pt(m)} ± {pt(sd)} | — | — | — |")
            continue
        ds = [d for _, d in _paired_deltas(runs, n, ref, seeds)]
        m, sd = _mean_sd(ds)
        half = ci95(ds)
        ci = "—" if half is None else f"{pt(m - half, sign=True)} a {pt(m + half, sign=True)}"
        ses = [runs[n, s]["paired"][ref]["se_blocks"] for s in seeds
               if (n, s) in runs and ref in runs[n, s].get("paired", {})]
        rows.append(f"| {n} | " + " ".join(pt(d, 3, sign=True) for d in ds)
                    + f" | {pt(m, sign=True)} ± {pt(sd)} | {ci} | {sum(d < 0 for d in ds)} de {len(ds)} "
                    f"| {pt(_mean_sd(ses)[0])} |")
    return "\n".join(rows)


def recorded_hardware(recorded: dict) -> str:
    """The hardware the recorded runs name, e.g. "CPU x86_64, 1 thread"."""
    hw = sorted({r.get("hardware") or "?" for res in recorded.values() if res for r in res["runs"]})
    return " + ".join(hw)


def specialization_table(result: dict, names: Sequence[str]) -> str:
    """Markdown: per variant and MoE layer, 1 - H(e|class)/H(e) and 1 - H(e|token)/H(e), mean ± sd
    over the recorded seeds."""
    rows = ["| variante | camada | pela classe do token | pelo token |", "|---|---:|---:|---:|"]
    for n in names:
        runs = [r for r in result["runs"] if r["name"] == n and r.get("specialization")]
        if not runs:
            continue
        for li in range(len(runs[0]["specialization"])):
            cls = [1 - r["specialization"][li]["h_given_class"] / r["specialization"][li]["h_expert"] for r in runs]
            tok = [1 - r["specialization"][li]["h_given_token"] / r["specialization"][li]["h_expert"] for r in runs]
            (mc, sc), (mt, st) = _mean_sd(cls), _mean_sd(tok)
            rows.append(f"| {n} | {li} | {pt(mc, 3)} ± {pt(sc, 3)} | {pt(mt, 3)} ± {pt(st, 3)} |")
    return "\n".join(rows)


def pair_line(result: dict, name: str, ref: str) -> str:
    """One line: Δ val loss of `name` against `ref` per seed (paired standard error in brackets), then
    the mean and the half width of its 95% interval."""
    runs = {(r["name"], r["seed"]): r for r in result["runs"]}
    pairs = _paired_deltas(runs, name, ref, sorted({s for _, s in runs}))
    cells = [f"semente {s}: {pt(d, sign=True)} "
             f"(erro-padrão {pt(runs[name, s].get('paired', {}).get(ref, {}).get('se_blocks'))})" for s, d in pairs]
    ds = [d for _, d in pairs]
    return (f"{name} − {ref}: " + "; ".join(cells)
            + f"\nmédia {pt(_mean_sd(ds)[0], sign=True)}, IC 95% ± {pt(ci95(ds))}")


def specialization_pairs(result: dict, name: str, ref: str) -> str:
    """Markdown: per MoE layer, the paired difference `name` − `ref` (same seed) of the
    specialization by class and by token: mean, 95% interval half width, seeds below zero."""
    runs = {(r["name"], r["seed"]): r for r in result["runs"] if r.get("specialization")}
    seeds = sorted(s for n, s in runs if n == name and (ref, s) in runs)
    if not seeds:
        return ""
    rows = [f"| camada | medida | {name} − {ref} (média) | IC 95% ± | sementes abaixo de 0 |",
            "|---:|---|---:|---:|---:|"]
    for li in range(len(runs[name, seeds[0]]["specialization"])):
        for key, label in (("h_given_class", "pela classe do token"), ("h_given_token", "pelo token")):
            def spec(r):
                layer = r["specialization"][li]
                return 1 - layer[key] / layer["h_expert"]
            ds = [spec(runs[name, s]) - spec(runs[ref, s]) for s in seeds]
            rows.append(f"| {li} | {label} | {pt(_mean_sd(ds)[0], sign=True)} | {pt(ci95(ds))} "
                        f"| {sum(d < 0 for d in ds)} de {len(ds)} |")
    return "\n".join(rows)
