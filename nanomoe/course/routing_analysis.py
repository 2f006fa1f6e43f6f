"""What the router learned (chapter 06): co-activation, specialization, position, saturation.

Every function reads routing decisions, the `topk_idx` (B, T, k) that each MoE layer reports in
a forward's `moe_stats` (see `routing_of`), and returns plain tensors that `nanomoe.course.plots` draws.
The measures follow the OLMoE paper's routing analysis (Muennighoff et al. 2024, arXiv 2409.02060,
section 5): co-activation of expert pairs, specialization by token, and router saturation.

    decisions = routing_of(model, idx)             # one (B, T, k) tensor per MoE layer
    C = coactivation(decisions[0], n_experts)      # (E, E): P(j chosen | i chosen)
    M = routing_share(decisions[0], labels, L, E)  # (E, L): where each label's tokens go
    s = saturation(early, final)                   # share of tokens with the final top-k set
"""

from __future__ import annotations

import unicodedata
from typing import Sequence

import torch
import torch.nn.functional as F

from ..parallel.distributed import unwrap

# Character classes a reader understands, in the order the figures show them.
CHAR_CLASSES = ("space", "punctuation", "vowel", "accented", "consonant", "capital", "digit", "other")
CHAR_CLASS_PT = {
    "space": "espaço/quebra", "punctuation": "pontuação", "vowel": "vogal", "accented": "letra acentuada",
    "consonant": "consoante", "capital": "maiúscula", "digit": "dígito", "other": "outro",
}
VOWELS = set("aeiou")


@torch.no_grad()
def routing_of(model: torch.nn.Module, idx: torch.Tensor) -> list[torch.Tensor]:
    """Run `model` on idx (B, T) in eval mode; one topk_idx (B, T, k) per MoE layer, on the CPU."""
    raw = unwrap(model)
    was_training = raw.training
    raw.eval()
    try:
        _, _, stats = raw.hidden_states(idx)
    finally:
        raw.train(was_training)
    return [st["topk_idx"].cpu() for st in stats]


def chosen_mask(topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """topk_idx (..., k) -> (N, E) 0/1 float: row n marks the experts token n chose."""
    k = topk_idx.size(-1)
    return F.one_hot(topk_idx.reshape(-1, k), n_experts).sum(1).float()


def coactivation(topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E, E) with C[i, j] = share of the tokens that chose i which also chose j (OLMoE, sec. 5.2).
    The diagonal is 0; a row of an expert nobody chose is 0."""
    m = chosen_mask(topk_idx, n_experts)  # (N, E)
    both = m.T @ m  # (E, E) tokens that chose i and j; the diagonal counts i alone
    alone = both.diagonal().clone()
    both.fill_diagonal_(0)
    return both / alone.clamp_min(1).unsqueeze(1)


def routing_share(topk_idx: torch.Tensor, labels: torch.Tensor, n_labels: int, n_experts: int) -> torch.Tensor:
    """(E, L): M[e, l] = share of the assignments of tokens labelled l that went to expert e.

    labels: one integer in [0, n_labels) per token, shaped like topk_idx without its last dim
    (a class, a position, a token id). Columns sum to 1 (a label nobody had is 0); a router that
    ignores the label puts 1/E everywhere."""
    m = chosen_mask(topk_idx, n_experts)  # (N, E)
    onehot = F.one_hot(labels.reshape(-1).long(), n_labels).float()  # (N, L)
    counts = m.T @ onehot  # (E, L) assignments of label l to expert e
    return counts / counts.sum(0, keepdim=True).clamp_min(1)


def char_class(ch: str) -> str:
    """One of CHAR_CLASSES for a single character (capitals first, then accents, vowels...)."""
    if ch.isspace():
        return "space"
    if ch.isdigit():
        return "digit"
    if ch.isalpha():
        if ch.isupper():
            return "capital"
        if unicodedata.decomposition(ch):  # á = a + combining acute, ç = c + cedilla
            return "accented"
        return "vowel" if ch in VOWELS else "consonant"
    if unicodedata.category(ch).startswith("P"):
        return "punctuation"
    return "other"


def char_class_ids(chars: Sequence[str]) -> torch.Tensor:
    """Index into CHAR_CLASSES of each character (a tensor of len(chars))."""
    return torch.tensor([CHAR_CLASSES.index(char_class(c)) for c in chars], dtype=torch.long)


def position_in_word(chars: Sequence[str], max_pos: int = 8) -> torch.Tensor:
    """For each character: 0 for a non-letter, else 1 + its position in its word (1 = first
    letter), capped at max_pos. Values lie in [0, max_pos]."""
    out, run = [], 0
    for c in chars:
        run = run + 1 if c.isalpha() else 0
        out.append(min(run, max_pos))
    return torch.tensor(out, dtype=torch.long)


def position_bins(B: int, T: int, n_bins: int) -> torch.Tensor:
    """(B, T) bin of each position in its sequence: t * n_bins // T (n_bins equal slices)."""
    return (torch.arange(T) * n_bins // T).expand(B, T)


def top_tokens_per_expert(topk_idx: torch.Tensor, token_ids: torch.Tensor, n_experts: int, n: int = 8,
                          min_count: int = 5) -> list[list[tuple[int, float]]]:
    """For each expert, the n token ids it receives most in proportion to their occurrences:
    [(token id, share of that token's assignments going to e)], tokens seen >= min_count times.
    Equal shares (with top-k, many tokens always go to the same experts) rank the commoner token first."""
    ids, inverse = torch.unique(token_ids.reshape(-1), return_inverse=True)
    share = routing_share(topk_idx, inverse, len(ids), n_experts)  # (E, U)
    seen = torch.bincount(inverse.reshape(-1), minlength=len(ids))
    share = share.masked_fill(seen.unsqueeze(0) < min_count, -1.0)
    by_count = seen.argsort(descending=True, stable=True)  # the tie-break: commoner tokens first
    out = []
    for e in range(n_experts):
        vals, pos = share[e, by_count].sort(descending=True, stable=True)
        order = by_count[pos]
        out.append([(int(ids[i]), float(v)) for v, i in zip(vals[:n], order[:n]) if v >= 0])
    return out


def saturation(topk_idx: torch.Tensor, final_topk_idx: torch.Tensor) -> float:
    """Share of tokens whose set of k experts equals the final model's set (OLMoE, sec. 5.1:
    routing saturation). Order within the top-k does not matter."""
    if topk_idx.shape != final_topk_idx.shape:
        raise ValueError(f"saturation: shapes differ, {tuple(topk_idx.shape)} vs {tuple(final_topk_idx.shape)}")
    a, _ = topk_idx.sort(-1)
    b, _ = final_topk_idx.sort(-1)
    return float((a == b).all(-1).float().mean())


def saturation_overlap(topk_idx: torch.Tensor, final_topk_idx: torch.Tensor) -> float:
    """Routing saturation as OLMoE defines it (arXiv 2409.02060, sec. 5.1): the mean share of each
    token's k experts that are also among its k experts in the final model, |S_t ∩ S_final| / k,
    averaged over tokens. 1 = the same sets; with random sets of k of E, about k / E."""
    if topk_idx.shape != final_topk_idx.shape:
        raise ValueError(f"saturation: shapes differ, {tuple(topk_idx.shape)} vs {tuple(final_topk_idx.shape)}")
    same = (topk_idx.unsqueeze(-1) == final_topk_idx.unsqueeze(-2)).any(-1)  # (..., k): expert j also final
    return float(same.float().mean())
