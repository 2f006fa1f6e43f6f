"""Reusing weights across architectures: partial transfer and sparse upcycling (chapter 05).

`transfer_weights(src, dst)` copies from one nanomoe model into another of a different
architecture (typically GPT-2 -> the modern preset) every tensor that keeps a meaning there,
adapts the ones that can be adapted, leaves the rest at dst's own initialization, and returns a
`TransferReport` that says what happened to *every* tensor of both models. Nothing hides behind
`load_state_dict(strict=False)`.

| dst tensor | rule |
|---|---|
| token embeddings `wte`, `lm_head` | copied when vocab_size and n_embd match (same tokenizer) |
| attention `c_attn` (q, k, v rows) | q copied; k, v copied (MHA) or *adapted*: each GQA group's src heads mean-pooled |
|   | into one kv head (Ainslie et al. 2023, "GQA", arXiv 2305.13245, section 2.2 uptraining) |
| attention `c_proj` | copied when shapes match |
| norm gains `ln_1`, `ln_2`, `ln_f` | copied (a LayerNorm gain becomes an RMSNorm gain) |
| dense MLP | copied only for the same activation and width (a GELU MLP is not a SwiGLU MLP) |
| MoE experts | *adapted*: each expert a copy of the dense MLP when activation and width match (sparse upcycling) |
| router, anything else | initialized (dst's init) |

src tensors with no counterpart are listed as skipped with the reason: GPT-2's learned position
table under RoPE, biases when dst has bias=False, LayerNorm biases under RMSNorm, ...

`upcycle_to_moe(dense, n_experts, moe_top_k)` is sparse upcycling (Komatsuzaki et al. 2022,
"Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints"): every expert starts as
a copy of the dense MLP and the router is new. With renormalized gates (they sum to 1) and no
noise, sum_i g_i * MLP(x) = MLP(x): the upcycled model computes exactly the dense model's logits
at step 0, and training then lets the experts diverge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..config import GPTConfig
from ..model import GPT
from ..parallel.distributed import unwrap

ACTIONS = ("copied", "adapted", "initialized", "skipped")


@dataclass
class TransferEntry:
    action: str  # copied | adapted | initialized (dst tensor kept at init) | skipped (src tensor unused)
    dst: Optional[str]  # dst tensor name (None for a skipped src tensor)
    src: Optional[str]  # src tensor name (None for an initialized dst tensor)
    dst_shape: Optional[tuple[int, ...]]
    src_shape: Optional[tuple[int, ...]]
    note: str = ""


@dataclass
class TransferReport:
    """What happened to every tensor: dst tensors copied / adapted / initialized, src tensors skipped."""

    entries: list[TransferEntry] = field(default_factory=list)
    dst_numel: int = 0  # parameters of dst (tied tensors once)
    tied: list[str] = field(default_factory=list)  # dst names that share storage with another dst tensor

    def names(self, action: str) -> list[str]:
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        return [e.src if action == "skipped" else e.dst for e in self.entries if e.action == action]

    @property
    def copied(self) -> list[str]:
        return self.names("copied")

    @property
    def adapted(self) -> list[str]:
        return self.names("adapted")

    @property
    def initialized(self) -> list[str]:
        return self.names("initialized")

    @property
    def skipped(self) -> list[str]:
        return self.names("skipped")

    def entry(self, name: str) -> TransferEntry:
        """The entry of a dst tensor (or of a skipped src tensor) by name."""
        for e in self.entries:
            if e.dst == name or (e.dst is None and e.src == name):
                return e
        raise KeyError(f"no tensor {name!r} in this report")

    def fraction(self, *actions: str) -> float:
        """Share of dst parameters whose entry has one of `actions` (e.g. "copied", "adapted")."""
        n = sum(_numel(e.dst_shape) for e in self.entries if e.action in actions and e.dst is not None)
        return n / max(1, self.dst_numel)

    def summary(self) -> str:
        counts = {a: sum(e.action == a for e in self.entries) for a in ACTIONS}
        return (
            f"{counts['copied']} copied, {counts['adapted']} adapted, {counts['initialized']} initialized "
            f"(dst tensors); {counts['skipped']} skipped (src tensors). Parameters of dst from src: "
            f"{self.fraction('copied'):.1%} copied + {self.fraction('adapted'):.1%} adapted, "
            f"{self.fraction('initialized'):.1%} initialized."
        )

    def table(self, max_rows: Optional[int] = None) -> str:
        """A fixed-width table of the entries (collapsed per layer index to stay short)."""
        rows = _collapse(self.entries)
        if max_rows is not None and len(rows) > max_rows:
            rows = rows[:max_rows] + [("...", f"({len(rows) - max_rows} more rows)", "", "", "", "")]
        head = ("action", "tensor", "shape", "from", "shape", "note")
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(5)]
        line = lambda r: "  ".join(str(r[i]).ljust(widths[i]) for i in range(5)) + "  " + str(r[5])  # noqa: E731
        sep = "  ".join("-" * w for w in widths) + "  " + "-" * 4
        return "\n".join([line(head), sep, *map(line, rows)])

    def __str__(self) -> str:
        return self.table() + "\n" + self.summary()


def _numel(shape: Optional[tuple[int, ...]]) -> int:
    n = 1
    for s in shape or (0,):
        n *= s
    return n


def _collapse(entries: list[TransferEntry]) -> list[tuple]:
    """Merge entries that differ only by the layer index into one row `h.{0-11}.attn.c_proj.weight`."""
    groups: dict[tuple, list[int]] = {}
    order = []
    for e in entries:
        key_name = e.dst if e.dst is not None else e.src
        m = re.search(r"\.h\.(\d+)\.", key_name or "")
        layer = int(m.group(1)) if m else None
        pat = lambda s: None if s is None else re.sub(r"\.h\.\d+\.", ".h.{L}.", s)  # noqa: E731
        key = (e.action, pat(e.dst), pat(e.src), e.dst_shape, e.src_shape, e.note)
        if key not in groups:
            groups[key] = []
            order.append(key)
        if layer is not None:
            groups[key].append(layer)
    rows = []
    for key in order:
        action, dst, src, ds, ss, note = key
        layers = groups[key]
        span = _span(layers)
        fmt = lambda s: "" if s is None else s.replace("{L}", span).replace("transformer.", "")  # noqa: E731
        shape = lambda s: "" if s is None else "x".join(map(str, s))  # noqa: E731
        rows.append((action, fmt(dst), shape(ds), fmt(src), shape(ss), note))
    return rows


def _span(layers: list[int]) -> str:
    if not layers:
        return ""
    layers = sorted(set(layers))
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


# ---- the transfer --------------------------------------------------------------------------------


class _Plan:
    """Collects, for every dst tensor, the value to copy and the entry describing it."""

    def __init__(self, src: GPT, dst: GPT):
        self.S = src.state_dict()
        self.D = dst.state_dict()
        self.values: dict[str, torch.Tensor] = {}
        self.entries: list[TransferEntry] = []
        self.used: set[str] = set()
        self.skip_reasons: dict[str, str] = {}

    def put(self, dst: str, value: torch.Tensor, src: str, action: str, note: str = "", used=()) -> None:
        if tuple(value.shape) != tuple(self.D[dst].shape):  # an internal invariant, never user-facing
            raise AssertionError(f"transfer bug: {dst} {tuple(self.D[dst].shape)} <- {tuple(value.shape)}")
        self.values[dst] = value
        self.entries.append(TransferEntry(action, dst, src, tuple(self.D[dst].shape), tuple(self.S[src].shape), note))
        self.used.update((src, *used))

    def init(self, dst: str, note: str, src: Optional[str] = None) -> None:
        s = tuple(self.S[src].shape) if src is not None and src in self.S else None
        self.entries.append(TransferEntry("initialized", dst, src if s else None, tuple(self.D[dst].shape), s, note))

    def skip(self, src: str, reason: str) -> None:
        self.skip_reasons.setdefault(src, reason)


def _pool_kv(w: torch.Tensor, h_src: int, h_dst: int, d: int) -> torch.Tensor:
    """Mean-pool key/value heads: rows (h_src*d, ...) -> (h_dst*d, ...). kv head j of dst serves
    query heads j*r .. j*r+r-1 (r = h_src // h_dst), so it becomes the mean of those src heads."""
    r = h_src // h_dst
    rest = w.shape[1:]
    return w.reshape(h_dst, r, d, *rest).mean(dim=1).reshape(h_dst * d, *rest)


def _attention(p: _Plan, i: int, sc: GPTConfig, dc: GPTConfig) -> None:
    pre = f"transformer.h.{i}.attn."
    H, D = dc.n_head, dc.head_dim
    hs, hd = sc.kv_heads, dc.kv_heads
    shape_why = None
    if sc.n_embd != dc.n_embd or sc.n_head != dc.n_head:
        shape_why = f"n_embd/n_head differ (src {sc.n_embd}/{sc.n_head}, dst {dc.n_embd}/{dc.n_head})"
    elif hs % hd:
        shape_why = f"src kv heads ({hs}) are not a multiple of dst kv heads ({hd})"
    pos_note = " (trained with learned positions, now rotated by RoPE)" if sc.pos_emb != dc.pos_emb else ""
    for kind in ("weight", "bias"):
        qkv, proj = pre + f"c_attn.{kind}", pre + f"c_proj.{kind}"
        if qkv not in p.D:  # dst without biases
            for n in (qkv, proj):
                if n in p.S:
                    p.skip(n, "dst has bias=False")
            continue
        if qkv not in p.S:  # src without biases
            p.init(qkv, "src has no bias")
            p.init(proj, "src has no bias")
            continue
        if shape_why is not None:
            for n in (qkv, proj):
                p.init(n, shape_why, n)
                p.skip(n, shape_why)
            continue
        q, k, v = p.S[qkv].split([H * D, hs * D, hs * D], dim=0)  # rows [q heads | k heads | v heads]
        if hd == hs:
            p.put(qkv, p.S[qkv], qkv, "copied", "q, k, v" + pos_note)
        else:
            k, v = _pool_kv(k, hs, hd, D), _pool_kv(v, hs, hd, D)
            p.put(qkv, torch.cat([q, k, v]), qkv, "adapted",
                  f"q copied; k, v mean-pooled {hs}->{hd} heads (GQA uptraining){pos_note}")
        p.put(proj, p.S[proj], proj, "copied")


def _norm(p: _Plan, name: str, sc: GPTConfig, dc: GPTConfig) -> None:
    """A norm's gain (weight) and, for LayerNorm, its bias."""
    w, b = name + ".weight", name + ".bias"
    if p.S[w].shape == p.D[w].shape:
        note = "LayerNorm gain -> RMSNorm gain" if (sc.norm, dc.norm) == ("layernorm", "rmsnorm") else ""
        p.put(w, p.S[w], w, "copied", note)
    else:
        p.init(w, "n_embd differs", w)
        p.skip(w, "n_embd differs")
    if b in p.D:
        if b in p.S and p.S[b].shape == p.D[b].shape:
            p.put(b, p.S[b], b, "copied")
        else:
            p.init(b, "no matching src bias", b if b in p.S else None)
    if b in p.S and b not in p.D:
        p.skip(b, "RMSNorm has no bias" if dc.norm == "rmsnorm" else "dst has bias=False")


def _dense_mlp(p: _Plan, i: int, sc: GPTConfig, dc: GPTConfig, src_is_moe: bool) -> None:
    pre = f"transformer.h.{i}.mlp."
    why = None
    if src_is_moe:
        why = "src layer is MoE"
    elif sc.mlp != dc.mlp:
        why = f"{sc.mlp} MLP (hidden {sc.hidden_dim}) -> {dc.mlp} MLP (hidden {dc.hidden_dim}): a different function"
    elif sc.hidden_dim != dc.hidden_dim or sc.n_embd != dc.n_embd:
        why = f"MLP width differs (src {sc.n_embd}x{sc.hidden_dim}, dst {dc.n_embd}x{dc.hidden_dim})"
    for k in ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"):
        n = pre + k
        if n in p.D:
            if why is None and n in p.S:
                p.put(n, p.S[n], n, "copied")
            else:
                p.init(n, why or "src has no bias", n if n in p.S else None)
        if n in p.S and n not in p.used:
            p.skip(n, why or "dst has bias=False")


def _moe_from_dense(p: _Plan, i: int, sc: GPTConfig, dc: GPTConfig, src_is_moe: bool, dst_mlp) -> None:
    """dst MoE layer: experts = copies of src's dense MLP (upcycling) when compatible; router fresh."""
    pre = f"transformer.h.{i}.mlp."
    E = dc.n_experts
    p.init(pre + "router.weight", "new router (no counterpart in a dense model)")
    fc, proj = pre + "c_fc.weight", pre + "c_proj.weight"
    why = None
    if src_is_moe:
        why = "src layer is MoE too: use the same architecture or a plain load_state_dict"
    elif sc.mlp != dc.mlp:
        why = f"src {sc.mlp} MLP vs dst {dc.mlp} experts: a different function"
    elif sc.hidden_dim != dc.expert_hidden_dim or sc.n_embd != dc.n_embd:
        why = (f"expert width {dc.expert_hidden_dim} != dense hidden {sc.hidden_dim} "
               f"(upcycling needs moe_hidden={sc.hidden_dim})")
    e_fc, e_proj = pre + "experts.c_fc", pre + "experts.c_proj"
    if why is None:
        # expert e: y = x @ W with W = dense Linear weight^T; c_fc rows [gate; up] -> columns [gate | up]
        note = f"dense MLP copied into {E} experts"
        p.put(e_fc, p.S[fc].t().unsqueeze(0).expand(E, -1, -1).clone(), fc, "adapted", note)
        p.put(e_proj, p.S[proj].t().unsqueeze(0).expand(E, -1, -1).clone(), proj, "adapted", note)
    else:
        p.init(e_fc, why, fc if fc in p.S else None)
        p.init(e_proj, why, proj if proj in p.S else None)
    if dst_mlp.shared is not None:
        for k in dst_mlp.shared.state_dict():
            p.init(pre + "shared." + k, "shared expert starts at init")
    for k in p.D:
        if k.startswith(pre) and k not in p.values and not any(e.dst == k for e in p.entries):
            p.init(k, "MoE state (starts at init)")
    for b in (pre + "c_fc.bias", pre + "c_proj.bias"):
        if b in p.S:
            p.skip(b, "experts have no biases")


def _embeddings(p: "_Plan", sc: GPTConfig, dc: GPTConfig) -> list[str]:
    """Token embeddings and lm_head; returns the dst names tied to another tensor."""
    wte = "transformer.wte.weight"
    if p.S[wte].shape == p.D[wte].shape:
        p.put(wte, p.S[wte], wte, "copied")
    else:
        why = (f"vocab_size/n_embd differ (src {sc.vocab_size}x{sc.n_embd}, dst {dc.vocab_size}x{dc.n_embd}): "
               "a different tokenizer gives the rows other meanings")
        p.init(wte, why, wte)
        p.skip(wte, why)
    if sc.tie_embeddings:
        p.used.add("lm_head.weight")  # the same tensor as src's wte
    if dc.tie_embeddings:
        if not sc.tie_embeddings:
            p.skip("lm_head.weight", "dst ties lm_head to wte")
        return ["lm_head.weight"]
    head = "lm_head.weight"
    if p.S[head].shape == p.D[head].shape:
        p.put(head, p.S[head], head, "copied", "src ties it to wte" if sc.tie_embeddings else "")
    else:
        p.init(head, "vocab_size/n_embd differ", head)
        p.skip(head, "vocab_size/n_embd differ")
    return []


def _positions(p: "_Plan") -> None:
    """The learned position table: copied (or its first rows), or reported as having no counterpart."""
    wpe = "transformer.wpe.weight"
    if wpe not in p.D:
        if wpe in p.S:
            p.skip(wpe, "learned position table has no counterpart with RoPE (positions are rotations)")
        return
    if wpe not in p.S or p.S[wpe].shape[1] != p.D[wpe].shape[1]:
        why = "src has no learned positions" if wpe not in p.S else "n_embd differs"
        p.init(wpe, why, wpe if wpe in p.S else None)
        return
    n_src, n_dst = p.S[wpe].shape[0], p.D[wpe].shape[0]
    if n_src < n_dst:
        p.init(wpe, f"src has only {n_src} positions", wpe)
        p.skip(wpe, f"src has only {n_src} positions")
    else:
        p.put(wpe, p.S[wpe][:n_dst], wpe, "copied" if n_dst == n_src else "adapted",
              "" if n_dst == n_src else f"first {n_dst} positions")


def _blocks(p: "_Plan", sc: GPTConfig, dc: GPTConfig, dst: GPT) -> None:
    """Attention, norms and MLP/MoE of every dst layer, then the final norm."""
    for i in range(dc.n_layer):
        pre = f"transformer.h.{i}."
        if i >= sc.n_layer:
            for k in p.D:
                if k.startswith(pre):
                    p.init(k, f"src has only {sc.n_layer} layers")
            continue
        _attention(p, i, sc, dc)
        _norm(p, pre + "ln_1", sc, dc)
        _norm(p, pre + "ln_2", sc, dc)
        src_is_moe = sc.is_moe_layer(i)
        if dc.is_moe_layer(i):
            _moe_from_dense(p, i, sc, dc, src_is_moe, dst.transformer.h[i].mlp)
        else:
            _dense_mlp(p, i, sc, dc, src_is_moe)
    _norm(p, "transformer.ln_f", sc, dc)


def _report_unused(p: "_Plan", dc: GPTConfig) -> None:
    """Every src tensor not used is reported as skipped, with its reason."""
    for k in p.S:
        if k in p.used:
            continue
        m = k.split(".")
        if k.startswith("transformer.h.") and int(m[2]) >= dc.n_layer:
            reason = f"dst has only {dc.n_layer} layers"
        else:
            reason = p.skip_reasons.get(k, "no counterpart in dst")
        p.entries.append(TransferEntry("skipped", None, k, None, tuple(p.S[k].shape), reason))


@torch.no_grad()
def transfer_weights(src: GPT, dst: GPT) -> TransferReport:
    """Copy into `dst` (in place) every tensor of `src` that has a meaning in dst's architecture,
    adapt what can be adapted (GQA kv-head pooling, MLP -> experts), keep dst's own init for the
    rest, and return a report covering every tensor of both models.

    Typical use: GPT-2 (learned positions, LayerNorm, GELU, MHA, biases) -> the modern preset
    (RoPE, RMSNorm, SwiGLU, GQA, no biases): embeddings, attention and norm gains transfer; the
    position table, biases and the GELU MLP cannot."""
    src, dst = unwrap(src), unwrap(dst)
    p = _Plan(src, dst)
    tied = _embeddings(p, src.config, dst.config)
    _positions(p)
    _blocks(p, src.config, dst.config, dst)
    _report_unused(p, dst.config)
    # every dst tensor accounted for exactly once (tied lm_head aside): the report must be complete
    reported = [e.dst for e in p.entries if e.dst is not None]
    expected = [k for k in p.D if k not in tied]
    if sorted(reported) != sorted(expected):
        raise AssertionError(f"transfer bug: report covers {sorted(set(expected) ^ set(reported))} wrongly")
    params, buffers = dict(dst.named_parameters()), dict(dst.named_buffers())
    for k, v in p.values.items():
        target = params.get(k, buffers.get(k))
        target.copy_(v.to(target.dtype))
    return TransferReport(entries=p.entries, dst_numel=sum(t.numel() for t in dst.parameters()), tied=tied)


# ---- sparse upcycling ----------------------------------------------------------------------------


@torch.no_grad()
def upcycle_to_moe(
    dense: GPT,
    n_experts: int,
    moe_top_k: int,
    noise_std: float = 0.0,
    *,
    seed: int = 0,
    return_report: bool = False,
    **moe_overrides: Any,
):
    """Sparse upcycling (Komatsuzaki et al. 2022): an MoE model whose experts all start as copies
    of `dense`'s MLP (so the expert width is the dense width: moe_hidden = dense hidden_dim, not
    the equal-active default) with a fresh router; every other tensor is copied.

    With moe_renormalize=True (default) and noise_std=0 the gates of each token sum to 1 over k
    identical experts, so the upcycled model's logits equal the dense model's at step 0.
    `noise_std` > 0 adds N(0, (noise_std * std(W))^2) independently to each expert's copy, so the
    experts are not identical from the start. Returns the model, or (model, TransferReport) with
    return_report=True."""
    dense = unwrap(dense)
    dc = dense.config
    if dc.n_experts:
        raise ValueError("upcycle_to_moe needs a dense model (config.n_experts == 0)")
    if moe_overrides.get("n_shared_experts", 0):
        raise ValueError("upcycle_to_moe does not build shared experts (n_shared_experts must be 0): "
                         "a shared copy of the MLP would add the dense output twice")
    if "moe_hidden" in moe_overrides and moe_overrides["moe_hidden"] != dc.hidden_dim:
        raise ValueError(f"upcycled experts are copies of the dense MLP: moe_hidden must be {dc.hidden_dim}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    cfg = dc.replace(n_experts=n_experts, moe_top_k=moe_top_k, moe_hidden=dc.hidden_dim, n_shared_experts=0,
                     **moe_overrides)
    moe = GPT(cfg).to(dense.transformer.wte.weight.device)
    report = transfer_weights(dense, moe)
    if noise_std > 0:
        g = torch.Generator(device="cpu").manual_seed(seed)
        for block in moe.transformer.h:
            if block.is_moe:
                for w in (block.mlp.experts.c_fc, block.mlp.experts.c_proj):
                    std = w[0].float().std()
                    noise = torch.randn(w.shape, generator=g) * (noise_std * std)
                    w.add_(noise.to(w.device, w.dtype))
    moe.train(dense.training)
    return (moe, report) if return_report else moe
