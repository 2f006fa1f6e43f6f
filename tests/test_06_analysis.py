"""Chapter 06: the routing analysis functions and the crossover reader, on routings written by hand."""

import pytest
import torch

from nanomoe import GPT, moe_config
from nanomoe.course.crossover import crossover, regime_tokenizer, train_variant
from nanomoe.course.one_switch import (
    VARIANTS,
    _cond_entropy,
    ci95,
    loss_stats,
    one_switch_table,
    paired_delta,
    summarize,
    token_losses,
    variant_config,
)
from nanomoe.course.routing_analysis import (
    CHAR_CLASSES,
    char_class,
    char_class_ids,
    coactivation,
    position_bins,
    position_in_word,
    routing_of,
    routing_share,
    saturation,
    saturation_overlap,
    top_tokens_per_expert,
)
from nanomoe.data import split_text
from nanomoe.training.cli import CLIError
from nanomoe.training.train import TrainConfig

# 4 tokens, top-2 of 4 experts: {0,1}, {0,1}, {0,2}, {3,1}
TOPK = torch.tensor([[[0, 1], [1, 0], [0, 2], [3, 1]]])


def test_coactivation_by_hand():
    C = coactivation(TOPK, 4)
    # expert 0 chosen by tokens 0,1,2: with 1 twice, with 2 once
    assert C[0].tolist() == pytest.approx([0, 2 / 3, 1 / 3, 0])
    # expert 1 chosen by tokens 0,1,3: with 0 twice, with 3 once
    assert C[1].tolist() == pytest.approx([2 / 3, 0, 0, 1 / 3])
    assert C[2].tolist() == pytest.approx([1, 0, 0, 0])
    assert C[3].tolist() == pytest.approx([0, 1, 0, 0])
    assert coactivation(torch.tensor([[[0, 1]]]), 3)[2].tolist() == [0, 0, 0]  # nobody chose 2: a zero row


def test_routing_share_by_hand():
    labels = torch.tensor([[0, 0, 1, 1]])  # two labels, two tokens each
    M = routing_share(TOPK, labels, 3, 4)
    # label 0 (tokens 0, 1): 4 assignments, 2 to expert 0 and 2 to expert 1
    assert M[:, 0].tolist() == pytest.approx([0.5, 0.5, 0, 0])
    # label 1 (tokens 2, 3): experts 0, 2, 3, 1 once each
    assert M[:, 1].tolist() == pytest.approx([0.25, 0.25, 0.25, 0.25])
    assert M[:, 2].tolist() == [0, 0, 0, 0]  # a label nobody has


def test_char_classes():
    want = {" ": "space", "\n": "space", ",": "punctuation", "—": "punctuation", "a": "vowel", "u": "vowel",
            "é": "accented", "ç": "accented", "ã": "accented", "b": "consonant", "q": "consonant", "A": "capital",
            "É": "capital", "7": "digit", "+": "other"}
    assert {c: char_class(c) for c in want} == want
    assert char_class_ids("a A").tolist() == [CHAR_CLASSES.index(c) for c in ("vowel", "space", "capital")]


def test_positions():
    assert position_in_word("Ora, viva!").tolist() == [1, 2, 3, 0, 0, 1, 2, 3, 4, 0]
    assert position_in_word("abcdef", max_pos=3).tolist() == [1, 2, 3, 3, 3, 3]
    assert position_bins(2, 8, 4).tolist() == [[0, 0, 1, 1, 2, 2, 3, 3]] * 2


def test_top_tokens_per_expert_by_hand():
    topk = torch.tensor([[[0], [0], [1], [0], [1], [1]]])  # top-1
    ids = torch.tensor([[7, 7, 7, 9, 9, 5]])
    top = top_tokens_per_expert(topk, ids, 2, n=3, min_count=2)
    # token 7: 2 of 3 to expert 0; token 9: 1 of 2 to each; token 5 seen once: left out
    assert top[0] == [(7, pytest.approx(2 / 3)), (9, pytest.approx(0.5))]
    assert top[1] == [(9, pytest.approx(0.5)), (7, pytest.approx(1 / 3))]
    # equal shares: the commoner token first (8 seen 3 times, 6 twice, both always to expert 0)
    top = top_tokens_per_expert(torch.zeros(1, 5, 1, dtype=torch.long), torch.tensor([[6, 8, 6, 8, 8]]), 2, n=2,
                                min_count=1)
    assert top[0] == [(8, 1.0), (6, 1.0)]


def test_saturation_by_hand():
    final = torch.tensor([[[0, 1], [2, 3], [1, 2], [0, 3]]])
    early = torch.tensor([[[1, 0], [2, 1], [1, 2], [3, 2]]])  # same sets for tokens 0 and 2 (order ignored)
    assert saturation(early, final) == 0.5
    assert saturation(final, final) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        saturation(early[:, :2], final)


def test_routing_of_matches_the_forward_in_eval_mode():
    torch.manual_seed(0)
    model = GPT(moe_config(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16, n_experts=4))
    idx = torch.randint(0, 16, (3, 8))
    got = routing_of(model, idx)
    assert model.training  # mode restored
    model.eval()
    out = model(idx)
    assert len(got) == 2 and all(torch.equal(g, st["topk_idx"]) for g, st in zip(got, out.moe_stats))


def _hist(pairs, dt=1.0):
    return [{"step": i, "tokens": 100 * i, "elapsed_s": dt * i, "val_loss": v} for i, v in enumerate(pairs)]


def test_crossover_by_hand():
    dense = _hist([3.0, 2.0, 1.8, 1.7, 1.6])
    moe = _hist([3.0, 2.1, 1.7, 1.8, 1.5])  # below at step 2, above at 3, below from 4 on
    assert crossover(dense, moe) == 400
    assert crossover(dense, _hist([3.0, 1.9, 1.7, 1.6, 1.5])) == 100
    assert crossover(dense, _hist([3.0, 2.1, 1.9, 1.8, 1.7])) is None
    # against time: the MoE is twice as slow; its point at t=2 (loss 1.9) meets the dense at t=2 (1.8)
    slow = _hist([3.0, 1.9, 1.75, 1.65, 1.5], dt=2.0)
    # t=0: 3.0 vs 3.0 (not below); t=2: 1.9 vs 1.8; t=4: 1.75 vs 1.6; t=6, t=8: past the dense run
    assert crossover(dense, slow, "elapsed_s") is None
    fast = _hist([3.0, 1.9, 1.75, 1.65, 1.5], dt=0.5)
    # t=0.5: 1.9 vs 2.5 (interpolated), t=1: 1.75 vs 2.0, t=1.5: 1.65 vs 1.9, t=2: 1.5 vs 1.8
    assert crossover(dense, fast, "elapsed_s") == 0.5


def test_train_variant_records_and_reuses_a_finished_run(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    data = rng.integers(0, 16, 5000).astype(np.uint16)
    cfg = moe_config(vocab_size=16, block_size=16, n_layer=1, n_head=2, n_embd=16, n_experts=4)
    tcfg = TrainConfig(max_steps=4, batch_size=2, eval_interval=2, eval_iters=1, warmup_steps=1, seed=3,
                       device="cpu", sample_tokens=0)
    probe = torch.tensor(data[:32].astype(np.int64)).view(2, 16)
    first = train_variant("moe x", cfg, tcfg, data, data, probe, cache_dir=tmp_path, progress=False)
    assert not first["cached"] and [s["step"] for s in first["snapshots"]] == [2, 4]
    assert first["snapshots"][-1]["topk"][0].shape == (2, 16, 2)
    assert [h["step"] for h in first["history"] if h.get("val_loss") is not None][-1] == 4
    again = train_variant("moe x", cfg, tcfg, data, data, probe, cache_dir=tmp_path, progress=False)
    assert again["cached"] and again["history"] == first["history"]
    assert first["hardware"].startswith("CPU ") and again["hardware"] == first["hardware"]  # where its times belong
    for a, b in zip(again["model"].state_dict().values(), first["model"].state_dict().values()):
        assert torch.equal(a, b)
    other = train_variant("moe x", cfg, tcfg.__class__(**{**tcfg.to_dict(), "max_steps": 2}), data, data, probe,
                          cache_dir=tmp_path, progress=False)
    assert not other["cached"]  # a different recipe is trained, not read back


def test_regime_tokenizer_bpe_never_sees_the_validation_split():
    # training part: only "casa" words; validation part (last 10%): only "quilo" words
    text = "casa mesa " * 900 + "quilo " * 150
    train_text, val_text = split_text(text)
    assert "quilo" not in train_text and "quilo" in val_text
    bpe = regime_tokenizer("bpe", text, bpe_vocab=300)
    assert len(bpe.encode(" casa")) == 1  # merged: seen in training
    assert len(bpe.encode(" quilo")) > 1  # never merged: validation stays unseen
    assert bpe.decode(bpe.encode(val_text)) == val_text
    char = regime_tokenizer("char", text)
    assert char.vocab_size == len(set(text))  # characters of the whole corpus


def test_regime_tokenizer_refuses_an_unknown_regime():
    with pytest.raises(CLIError, match="--tokenizer must be one of char, bpe, got 'words'"):
        regime_tokenizer("words", "abc")


def test_hardware_names_where_a_run_happens():
    import platform

    from nanomoe.device import hardware

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert hardware("cpu") == f"CPU {platform.machine()}, 1 thread"
        torch.set_num_threads(2)
        assert hardware("cpu") == f"CPU {platform.machine()}, 2 threads"
    finally:
        torch.set_num_threads(threads)
    assert hardware("mps") == "Apple MPS"


# ---- the one-switch measures -------------------------------------------------------------------


def test_saturation_overlap_is_olmoe_mean_topk_overlap():
    final = torch.tensor([[[0, 1], [2, 3], [0, 2]]])
    now = torch.tensor([[[1, 0], [2, 1], [3, 1]]])  # overlaps 2/2, 1/2, 0/2
    assert saturation_overlap(now, final) == pytest.approx((1 + 0.5 + 0) / 3)
    assert saturation(now, final) == pytest.approx(1 / 3)  # the exact-set share is harder
    assert saturation_overlap(final, final) == 1.0


def test_loss_stats_and_paired_delta_by_hand():
    losses = torch.tensor([[1.0, 3.0], [2.0, 2.0], [3.0, 5.0]])  # 3 blocks of 2 tokens
    st = loss_stats(losses)
    assert st["tokens"] == 6 and st["mean"] == pytest.approx(16 / 6)
    blocks = torch.tensor([2.0, 2.0, 4.0], dtype=torch.float64)
    assert st["se_blocks"] == pytest.approx(float(blocks.std() / 3 ** 0.5))
    flat = losses.flatten().double()
    assert st["se_tokens"] == pytest.approx(float(flat.std() / 6 ** 0.5))
    d = paired_delta(losses + torch.tensor([[0.1], [0.3], [0.2]]), losses)
    assert d["delta"] == pytest.approx(0.2) and d["se_blocks"] == pytest.approx(0.1 / 3 ** 0.5)


def test_token_losses_match_the_model_loss():
    torch.manual_seed(0)
    model = GPT(moe_config(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16, n_experts=4))
    ids = torch.randint(0, 16, (50,)).tolist()
    losses = token_losses(model, ids, 8, 40)  # 5 blocks of 8
    assert losses.shape == (5, 8)
    x = torch.tensor(ids[:40]).view(5, 8)
    y = torch.tensor(ids[1:41]).view(5, 8)
    assert float(losses.mean()) == pytest.approx(float(model(x, y).ce_loss), rel=1e-5)


def test_specialization_entropies_at_the_extremes():
    # every vowel to experts {0, 1}, every consonant to {2, 3}: the class explains all the routing
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]] * 4, dtype=torch.float)
    labels = torch.tensor([0, 1] * 4)
    h_cond, h = _cond_entropy(mask, labels, 2)
    assert h == pytest.approx(1.0) and h_cond == pytest.approx(0.5)  # log 2 / log 4 left: which of the two
    h_cond, _ = _cond_entropy(mask, torch.zeros(8, dtype=torch.long), 1)  # one class: explains nothing
    assert h_cond == pytest.approx(h)


def test_variants_turn_one_switch_and_keep_active_parameters():
    shape = dict(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    base, _ = variant_config("base (MoE top-2)", shape)
    dense_active = GPT(variant_config("denso", shape)[0]).num_params(active=True)
    for name in VARIANTS:
        cfg, train_kw = variant_config(name, shape)
        changed = {k for k, v in cfg.to_dict().items() if v != base.to_dict()[k]}
        if name not in ("denso", "receita DeepSeek-V3", "viés, α = 0", "finos 32×top-8"):
            assert len(changed) <= 1, (name, changed)  # one switch (the micro-batch pair: none, the batch layout)
        if name != "denso":  # the same active parameters but the routers (C x E per MoE layer)
            extra = GPT(cfg).num_params(active=True) - dense_active
            assert extra == sum(cfg.is_moe_layer(i) for i in range(2)) * 32 * cfg.n_experts
    v3, _ = variant_config("receita DeepSeek-V3", shape)
    assert (v3.moe_router, v3.moe_bias_balance, v3.moe_balance_scope, v3.moe_aux_loss_coef, v3.moe_z_loss_coef,
            v3.moe_routed_scaling, v3.n_shared_experts, v3.moe_dense_layers) == ("sigmoid", True, "sequence", 1e-4,
                                                                                  0.0, 2.5, 1, 1)
    assert variant_config("lote global (micro-lotes de 4)", shape)[1] == {"batch_size": 4, "grad_accum": 4}


def test_ci95_is_students_t_interval():
    # mean 2, sd 1, n 3: t(0.975, 2 df) = 4.303 -> 4.303 / sqrt(3)
    assert ci95([1.0, 2.0, 3.0]) == pytest.approx(4.303 / 3**0.5)
    assert ci95([0.5]) is None
    # 10 seeds use 9 degrees of freedom (2.262); 50 values fall back to the 40-df entry (wider)
    xs = [float(i % 2) for i in range(10)]
    assert ci95(xs) == pytest.approx(2.262 * torch.tensor(xs).std().item() / 10**0.5)
    assert ci95([float(i % 2) for i in range(50)]) == pytest.approx(2.021 * torch.tensor(
        [float(i % 2) for i in range(50)]).std().item() / 50**0.5)


def test_summary_and_table_report_the_interval_and_the_signs():
    base = [2.0, 2.1, 2.2]
    runs = [{"name": "base (MoE top-2)", "seed": s, "val": {"mean": v}} for s, v in enumerate(base)]
    paired = {"base (MoE top-2)": {"se_blocks": 0.001}}
    runs += [{"name": "sigmoide", "seed": s, "val": {"mean": v + d}, "paired": paired}
             for s, (v, d) in enumerate(zip(base, [-0.01, -0.02, 0.03]))]
    row = {s["name"]: s for s in summarize(runs)}["sigmoide"]
    assert row["delta"] == pytest.approx([-0.01, -0.02, 0.03])
    assert row["delta_below_0"] == 2 and row["delta_ci95"] == pytest.approx(ci95(row["delta"]))
    table = one_switch_table({"runs": runs})
    line = next(x for x in table.splitlines() if x.startswith("| sigmoide"))
    lo, hi = row["delta_mean"] - row["delta_ci95"], row["delta_mean"] + row["delta_ci95"]
    assert "−0,010 −0,020 +0,030" in line and "2 de 3" in line
    assert f"{lo:+.4f} a {hi:+.4f}".replace("-", "−").replace(".", ",") in line
