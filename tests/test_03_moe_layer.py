"""Chapter 03: the MoE layer on its own — routing, losses, capacity, both dispatches, metrics."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanomoe import GPT, GPTConfig, modern_config, moe_config
from nanomoe.course.moe_metrics import MoEMetrics
from nanomoe.mlp import MLP
from nanomoe.moe import MoE, add_loads, capacity, capacity_keep, moe_layers, update_moe_bias


def layer_config(**kw) -> GPTConfig:
    base = dict(vocab_size=32, block_size=32, n_layer=2, n_head=4, n_embd=32, n_experts=4, moe_top_k=2)
    return moe_config(**{**base, **kw})


def make_moe(seed=0, **kw) -> MoE:
    torch.manual_seed(seed)
    return MoE(layer_config(**kw))


def set_router(moe: MoE, w: torch.Tensor) -> None:
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, : w.size(1)] = w


# ---- balance loss ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_balance_loss_is_one_for_uniform_router(k):
    moe = make_moe(moe_top_k=k)
    with torch.no_grad():
        moe.router.weight.zero_()  # every expert equally likely: P_i = 1/E
    _, _, st = moe(torch.randn(2, 16, 32))
    assert st["balance_loss"].item() == pytest.approx(1.0, abs=1e-6)
    assert st["importance"].allclose(torch.full((4,), 0.25))


@pytest.mark.parametrize("k", [1, 2])
def test_balance_loss_is_one_for_balanced_load(k):
    # Token t prefers expert e = t % E (logit 1 + e), then expert (e + 1) % E (logit 0.5): every
    # expert gets the same number of assignments, while the mean router probabilities P_i differ.
    E, T = 4, 16
    moe = make_moe(moe_top_k=k)
    set_router(moe, torch.eye(E))
    x = torch.zeros(1, T, 32)
    for t in range(T):
        x[0, t, t % E] = 1.0 + t % E
        x[0, t, (t + 1) % E] = 0.5
    _, _, st = moe(x)
    assert st["load"].tolist() == [T * k / E] * E
    assert st["importance"].max() - st["importance"].min() > 0.05  # P is not uniform
    assert st["balance_loss"].item() == pytest.approx(1.0, abs=1e-6)


def test_balance_loss_is_n_when_routing_collapses():
    E = 4
    moe = make_moe(moe_top_k=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 100.0  # x[..., 0] = 1 below: logit 100 for expert 0, 0 for the others
    x = torch.randn(2, 8, 32)
    x[..., 0] = 1.0
    _, _, st = moe(x)
    assert st["load"].tolist() == [16.0, 0.0, 0.0, 0.0]
    assert st["balance_loss"].item() == pytest.approx(E, rel=1e-5)


def test_balance_loss_gradient_reaches_router_through_full_softmax():
    moe = make_moe(moe_aux_loss_coef=1.0, moe_z_loss_coef=0.0)
    x = torch.randn(2, 8, 32)
    _, aux, st = moe(x)
    assert aux.item() == pytest.approx(st["balance_loss"].item())
    aux.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_balance_loss_uses_full_softmax_and_assignment_fractions():
    moe = make_moe(n_experts=4, moe_top_k=2)
    x = torch.randn(3, 10, 32)
    _, _, st = moe(x)
    p = F.linear(x, moe.router.weight.detach()).softmax(-1).reshape(-1, 4)  # full softmax, not the top-k gates
    f = torch.bincount(p.topk(2, dim=-1).indices.flatten(), minlength=4).float() / (30 * 2)
    torch.testing.assert_close(st["importance"], p.mean(0))
    assert st["balance_loss"].item() == pytest.approx(4 * float((f * p.mean(0)).sum()), rel=1e-5)


def test_model_loss_is_ce_plus_aux_and_ce_is_kept_apart():
    torch.manual_seed(0)
    model = GPT(layer_config(moe_aux_loss_coef=0.5, moe_z_loss_coef=0.1))
    idx = torch.randint(0, 32, (2, 16))
    out = model(idx, idx)
    logits = out.logits
    ce = F.cross_entropy(logits.view(-1, logits.size(-1)), idx.view(-1))
    assert out.ce_loss.item() == pytest.approx(ce.item(), rel=1e-6)  # perplexity = exp(this)
    aux = sum(0.5 * st["balance_loss"] + 0.1 * st["z_loss"] for st in out.moe_stats)
    assert out.aux_loss.item() == pytest.approx(float(aux), rel=1e-5) and aux > 0.5
    assert out.loss.item() == pytest.approx(ce.item() + float(aux), rel=1e-6)


def test_z_loss_and_aux_weighting():
    moe = make_moe(moe_aux_loss_coef=0.3, moe_z_loss_coef=0.7)
    x = torch.randn(2, 8, 32)
    _, aux, st = moe(x)
    logits = F.linear(x, moe.router.weight)
    z = torch.logsumexp(logits, -1).square().mean()
    assert st["z_loss"].item() == pytest.approx(z.item(), rel=1e-5)
    assert aux.item() == pytest.approx(0.3 * st["balance_loss"].item() + 0.7 * z.item(), rel=1e-5)


# ---- gates and outputs ------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_router_gets_gradient_from_cross_entropy_alone(k):
    torch.manual_seed(0)
    cfg = layer_config(moe_top_k=k, moe_aux_loss_coef=0.0, moe_z_loss_coef=0.0)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model(idx, idx)
    assert out.loss.item() == pytest.approx(out.ce_loss.item())  # aux coefficients 0
    out.loss.backward()
    for moe in moe_layers(model):
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_top2_output_is_the_gated_sum_of_both_experts():
    moe = make_moe(moe_top_k=2)
    x = torch.randn(1, 5, 32)
    y, _, st = moe(x)
    logits = F.linear(x, moe.router.weight)
    p = logits.softmax(-1)
    for t in range(5):
        top = p[0, t].topk(2)
        g = top.values / top.values.sum()
        want = sum(
            g[j] * MLP_from_expert(moe, int(top.indices[j]))(x[0, t]) for j in range(2)
        )
        assert torch.allclose(y[0, t], want, atol=1e-6)
        assert set(st["topk_idx"][0, t].tolist()) == set(top.indices.tolist())


def MLP_from_expert(moe: MoE, e: int) -> MLP:
    mlp = MLP(moe.experts.n_embd, moe.experts.hidden, moe.kind, bias=False)
    with torch.no_grad():
        mlp.c_fc.weight.copy_(moe.experts.c_fc[e].T)
        mlp.c_proj.weight.copy_(moe.experts.c_proj[e].T)
    return mlp


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_single_expert_top1_equals_dense_mlp(kind):
    cfg = layer_config(mlp=kind, n_experts=1, moe_top_k=1)
    assert cfg.expert_hidden_dim == cfg.hidden_dim
    torch.manual_seed(0)
    moe = MoE(cfg)
    dense = MLP(cfg.n_embd, cfg.hidden_dim, kind, bias=False)
    with torch.no_grad():
        moe.experts.c_fc[0].copy_(dense.c_fc.weight.T)
        moe.experts.c_proj[0].copy_(dense.c_proj.weight.T)
    x = torch.randn(3, 7, cfg.n_embd)
    y, _, _ = moe(x)
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-6)


def test_single_expert_model_equals_dense_model():
    dense_cfg = modern_config(vocab_size=32, block_size=16, n_layer=2, n_head=4, n_embd=32)
    torch.manual_seed(0)
    dense = GPT(dense_cfg)
    moe = GPT(dense_cfg.replace(n_experts=1, moe_top_k=1))
    sd = dense.state_dict()
    for i in range(dense_cfg.n_layer):
        pre = f"transformer.h.{i}.mlp."
        sd[pre + "experts.c_fc"] = sd.pop(pre + "c_fc.weight").T.unsqueeze(0)
        sd[pre + "experts.c_proj"] = sd.pop(pre + "c_proj.weight").T.unsqueeze(0)
        sd[pre + "router.weight"] = moe.state_dict()[pre + "router.weight"]
    moe.load_state_dict(sd)
    idx = torch.randint(0, 32, (2, 16))
    torch.testing.assert_close(moe(idx)[0], dense(idx)[0], rtol=1e-5, atol=1e-5)


# ---- reference == fast ----------------------------------------------------------------------


def _run(moe, x, impl, kernel):
    moe.impl, moe.kernel = impl, kernel
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y, aux, st = moe(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().add(aux).backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    return y.detach(), x.grad, grads, st


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(moe_top_k=1),
        dict(mlp="gelu"),
        dict(n_shared_experts=1),
        dict(moe_capacity_factor=0.75, moe_min_capacity=1),
        dict(moe_capacity_factor=1.0, moe_top_k=1, moe_min_capacity=2),
        dict(moe_renormalize=False, n_experts=8, moe_top_k=3, n_embd=64),
    ],
)
def test_reference_equals_fast_outputs_and_gradients(kw):
    moe = make_moe(**kw)
    x = torch.randn(3, 16, moe.experts.n_embd)
    ref = _run(moe, x, "reference", None)
    if kw.get("moe_capacity_factor"):
        assert ref[3]["dropped"] > 0  # capacity really drops something here
    for kernel in ("grouped", "loop", "padded"):
        fast = _run(moe, x, "fast", kernel)
        torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast[1], ref[1], rtol=1e-5, atol=1e-6)
        assert fast[2].keys() == ref[2].keys()
        for n in ref[2]:
            torch.testing.assert_close(fast[2][n], ref[2][n], rtol=1e-5, atol=1e-6, msg=n)
        assert torch.equal(fast[3]["load"], ref[3]["load"]) and fast[3]["dropped"] == ref[3]["dropped"]


def test_autocast_keeps_router_fp32_and_paths_agree():
    moe = make_moe(n_embd=64, moe_top_k=2)
    x = torch.randn(2, 16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, probs, _, gates = moe.route(x)
        assert logits.dtype == probs.dtype == gates.dtype == torch.float32  # router in fp32 under AMP
        outs = {}
        for impl, kernel in (("reference", None), ("fast", "grouped"), ("fast", "loop"), ("fast", "padded")):
            moe.impl, moe.kernel = impl, kernel
            outs[(impl, kernel)] = moe(x)[0].float()
    ref = outs[("reference", None)]
    for key, y in outs.items():
        torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-3, msg=str(key))
    assert (ref - moe(x)[0]).abs().max() > 0  # bf16 really was used


@pytest.mark.parametrize(
    "impl,kernel", [("reference", None), ("fast", "grouped"), ("fast", "loop"), ("fast", "padded")]
)
def test_expert_without_tokens_gets_zero_gradient(impl, kernel):
    moe = make_moe(moe_impl=impl, moe_top_k=1)
    moe.kernel = kernel
    with torch.no_grad():  # x > 0 below and a negative row: expert 3 is never chosen
        moe.router.weight[3] = -1.0
        moe.router.weight[:3].abs_()
    x = torch.rand(2, 8, 32) + 0.1
    y, aux, st = moe(x)
    assert st["load"][3] == 0
    (y.square().sum() + aux).backward()
    for p in (moe.experts.c_fc, moe.experts.c_proj):
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert torch.equal(p.grad[3], torch.zeros_like(p.grad[3]))
        assert p.grad[: 3].abs().sum() > 0


# ---- capacity -------------------------------------------------------------------------------


def test_capacity_formula_has_a_floor():
    assert capacity(1, 8, 2, 1.0, 1) == 1  # int(1 * 2 / 8 * 1.0) would be 0: every token dropped
    assert capacity(1, 8, 2, 1.25, 4) == 4
    assert capacity(64, 8, 2, 1.25, 4) == 20  # ceil(1.25 * 64 * 2 / 8)


def test_capacity_drop_counts_on_crafted_routing():
    E, T = 4, 8
    moe = make_moe(moe_top_k=1, moe_capacity_factor=1.0, moe_min_capacity=1)  # capacity ceil(8/4) = 2
    set_router(moe, 10 * torch.eye(E))
    route = [0, 0, 0, 1, 1, 2, 0, 3]  # expert 0 gets 4 tokens: the 3rd and 4th (positions 2, 6) drop
    x = torch.zeros(2, T, 32)
    for t, e in enumerate(route):
        x[:, t, e] = 1.0
    x[:, :, E:] = torch.randn(T, 32 - E)  # distinct tokens (columns the router ignores)
    for impl in ("reference", "fast"):
        moe.impl = impl
        y, _, st = moe(x)
        assert st["topk_idx"][0, :, 0].tolist() == route
        assert st["dropped"].item() == 2 * 2  # 2 per sequence: capacity counts per sequence
        assert st["load"].tolist() == [8.0, 4.0, 2.0, 2.0]  # routed load, before dropping
        dropped = torch.tensor([t in (2, 6) for t in range(T)])
        assert torch.equal(y[:, dropped], torch.zeros_like(y[:, dropped]))  # residual only
        assert (y[:, ~dropped].abs().sum(-1) > 0).all()


def test_capacity_keep_with_top2_is_position_ordered():
    topk = torch.tensor([[[0, 1], [0, 2], [1, 0], [0, 3]]])  # (1, 4, 2)
    keep = capacity_keep(topk, 4, cap=2)
    # expert 0 is chosen at positions 0, 1, 2, 3: positions 2 and 3 lose it; all else fits
    assert keep.tolist() == [[[True, True], [True, True], [True, False], [False, True]]]


def test_single_token_is_never_dropped():
    for cf in (0.01, 1.0):
        moe = make_moe(n_experts=8, moe_top_k=2, moe_capacity_factor=cf, moe_min_capacity=1)
        y, _, st = moe(torch.randn(3, 1, 32))
        assert st["dropped"].item() == 0
        assert (y.abs().sum(-1) > 0).all()


# ---- aux-loss-free balancing (DeepSeek-V3) ----------------------------------------------------


def test_bias_changes_selection_not_gates():
    moe = make_moe(n_experts=4, moe_top_k=2, moe_bias_balance=True)
    x = torch.randn(2, 8, 32)
    logits, probs, idx0, gates0 = moe.route(x)
    assert not (idx0 == 3).any(dim=-1).all()
    with torch.no_grad():
        moe.expert_bias[3] = 10.0  # expert 3 now always selected
    logits1, probs1, idx1, gates1 = moe.route(x)
    assert torch.equal(probs1, probs)  # the bias does not touch the probabilities
    assert (idx1 == 3).any(dim=-1).all()
    chosen = probs.gather(-1, idx1)
    torch.testing.assert_close(gates1, chosen / chosen.sum(-1, keepdim=True))  # unbiased gate values
    assert not torch.equal(idx1, idx0)


def test_update_moe_bias_moves_towards_balance():
    torch.manual_seed(0)
    cfg = layer_config(moe_top_k=1, moe_bias_balance=True, moe_bias_update_rate=0.01)
    model = GPT(cfg)
    assert update_moe_bias(model, None) == 0  # nothing accumulated yet
    idx = torch.randint(0, 32, (4, 16))
    loads = add_loads(add_loads(None, model(idx).moe_stats), model(idx).moe_stats)  # two micro-batches
    assert all(torch.equal(a, 2 * st["load"]) for a, st in zip(loads, model(idx).moe_stats))
    loads = [2 * st["load"] for st in model(idx).moe_stats]
    assert update_moe_bias(model, loads) == 2
    for moe, load in zip(moe_layers(model), loads):
        want = 0.01 * torch.sign(load.mean() - load)
        torch.testing.assert_close(moe.expert_bias, want)
    assert "transformer.h.0.mlp.expert_bias" in model.state_dict()  # saved with checkpoints


# ---- where MoE layers go ----------------------------------------------------------------------


def test_moe_every_places_layers():
    cfg = layer_config(n_layer=4, moe_every=2)
    model = GPT(cfg)
    assert [isinstance(b.mlp, MoE) for b in model.transformer.h] == [False, True, False, True]
    assert len(model(torch.randint(0, 32, (1, 8))).moe_stats) == 2
    active = model.num_params(active=True)
    assert active < model.num_params()


def test_dense_configs_never_build_moe():
    assert GPTConfig().n_experts == 0
    for cfg in (GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16),
                modern_config(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16)):
        model = GPT(cfg)
        assert not moe_layers(model)
        assert not any("router" in n or "experts" in n for n, _ in model.named_parameters())
        idx = torch.randint(0, 32, (1, 8))
        out = model(idx, idx)
        assert out.aux_loss is None and out.moe_stats == []
        assert out.loss.item() == out.ce_loss.item()


def test_active_params_equal_dense_mlp():
    cfg = layer_config(n_experts=8, moe_top_k=2, n_embd=64)
    moe, dense = MoE(cfg), MLP(cfg.n_embd, cfg.hidden_dim, cfg.mlp, bias=False)
    per_expert = sum(p.numel() for p in moe.experts.parameters()) // cfg.n_experts
    n_dense = sum(p.numel() for p in dense.parameters())
    assert cfg.moe_top_k * per_expert == n_dense  # fair comparison: same compute per token


# ---- metrics --------------------------------------------------------------------------------


def test_moe_metrics_window():
    m = MoEMetrics()
    base = dict(entropy=torch.tensor(0.5), top1_prob=torch.tensor(0.4), balance_loss=torch.tensor(1.2),
                z_loss=torch.tensor(3.0), importance=torch.full((4,), 0.25), tokens=torch.tensor(10))
    m.update([dict(base, load=torch.tensor([6.0, 6.0, 8.0, 0.0]), dropped=torch.tensor(2))])
    m.update([dict(base, load=torch.tensor([4.0, 4.0, 12.0, 0.0]), dropped=torch.tensor(0), entropy=torch.tensor(0.7))])
    s = m.summary()
    layer = s["layers"][0]
    assert s["steps"] == 2
    assert layer["load_frac"] == pytest.approx([0.25, 0.25, 0.5, 0.0])
    load = torch.tensor([10.0, 10.0, 20.0, 0.0])
    assert layer["load_cv"] == pytest.approx(float(load.std(unbiased=False) / load.mean()))
    assert layer["max_over_mean"] == pytest.approx(2.0)
    assert layer["dead"] == 1 and s["dead"] == 1
    assert layer["dropped_frac"] == pytest.approx(2 / 40)
    assert layer["entropy"] == pytest.approx(0.6)
    assert m.load_fractions().shape == (1, 4)
    m.reset()
    assert m.summary()["steps"] == 0 and m.summary()["layers"] == []


def test_moe_metrics_from_model():
    torch.manual_seed(0)
    model = GPT(layer_config(n_layer=3))
    m = MoEMetrics()
    for _ in range(2):
        m.update(model(torch.randint(0, 32, (2, 8))).moe_stats)
    s = m.summary()
    assert len(s["layers"]) == 3
    for layer in s["layers"]:
        assert sum(layer["load_frac"]) == pytest.approx(1.0)
        assert layer["tokens"] == 32
        assert 0.0 <= layer["entropy"] <= 1.0
    assert math.isfinite(s["balance_loss"]) and "cv" in m.format()
