"""Chapter 06: the modern router switches — sigmoid router, routed scaling, balance scope, fine-grained
and shared experts, dense first layers — each with the proofs chapter 03's switches have: reference
dispatch == fast dispatch (outputs and gradients), KV cache == no cache, no causality leak, and
export to transformers only where the family matches (refused by name otherwise)."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanomoe import GPT, GPTConfig, modern_config, moe_config
from nanomoe.interop.hf import HFConversionError, hf_family
from nanomoe.mlp import MLP
from nanomoe.moe import MoE, add_loads, balance_loss, global_balance_prepass, moe_layers, update_moe_bias


def layer_config(**kw) -> GPTConfig:
    base = dict(vocab_size=32, block_size=32, n_layer=2, n_head=4, n_embd=32, n_experts=4, moe_top_k=2)
    return moe_config(**{**base, **kw})


SWITCHES = {
    "sigmoid": dict(moe_router="sigmoid", moe_routed_scaling=2.5),
    "sigmoid+bias": dict(moe_router="sigmoid", moe_bias_balance=True),
    "sequence": dict(moe_balance_scope="sequence"),
    "global": dict(moe_balance_scope="global"),
    "fine+shared": dict(n_experts=16, moe_top_k=6, n_shared_experts=2),
    "dense-first": dict(n_layer=3, moe_dense_layers=1),
    "exact-gelu": dict(mlp="gelu", gelu_approximate="none", bias=False),
}


# ---- defaults: chapter 03 unchanged --------------------------------------------------------------


def test_defaults_route_exactly_like_chapter_03():
    """Default switches: softmax over all experts, top-k of the probabilities, gates renormalized
    over the k, no scaling; compared bit for bit with the computation written out."""
    torch.manual_seed(0)
    moe = MoE(layer_config())
    x = torch.randn(2, 7, 32)
    logits, probs, idx, gates = moe.route(x)
    want_logits = F.linear(x.float(), moe.router.weight.float())
    want_probs = want_logits.softmax(-1)
    want_idx = want_probs.topk(2, dim=-1).indices
    g = want_probs.gather(-1, want_idx)
    assert torch.equal(logits, want_logits) and torch.equal(probs, want_probs)
    assert torch.equal(idx, want_idx) and torch.equal(gates, g / g.sum(-1, keepdim=True))
    cfg = GPTConfig()
    assert (cfg.moe_router, cfg.moe_routed_scaling, cfg.moe_balance_scope, cfg.moe_dense_layers) == (
        "softmax", 1.0, "micro_batch", 0)


# ---- sigmoid router ------------------------------------------------------------------------------


def test_sigmoid_gates_are_renormalized_chosen_scores_times_scaling():
    torch.manual_seed(1)
    moe = MoE(layer_config(moe_router="sigmoid", moe_routed_scaling=2.5))
    x = torch.randn(2, 5, 32)
    _, probs, idx, gates = moe.route(x)
    s = torch.sigmoid(x @ moe.router.weight.T)
    assert torch.equal(idx, s.topk(2, -1).indices)
    chosen = s.gather(-1, idx)
    torch.testing.assert_close(gates, 2.5 * chosen / chosen.sum(-1, keepdim=True))
    torch.testing.assert_close(gates.sum(-1), torch.full((2, 5), 2.5))  # over the chosen k, not all E
    torch.testing.assert_close(probs, s / s.sum(-1, keepdim=True))  # DeepSeek-V3 eq. 19


def test_selection_bias_chooses_but_never_weighs():
    torch.manual_seed(2)
    moe = MoE(layer_config(moe_router="sigmoid", moe_bias_balance=True))
    x = torch.randn(1, 8, 32)
    _, _, idx0, _ = moe.route(x)
    moe.expert_bias.copy_(torch.tensor([5.0, 5.0, 0.0, 0.0]))  # experts 0 and 1 always chosen
    _, _, idx, gates = moe.route(x)
    assert (idx.sort(-1).values == torch.tensor([0, 1])).all()
    assert not torch.equal(idx0.sort(-1).values, idx.sort(-1).values)
    s = torch.sigmoid(x @ moe.router.weight.T)[..., :2]  # unbiased scores of experts 0, 1
    torch.testing.assert_close(gates.sort(-1).values, (s / s.sum(-1, keepdim=True)).sort(-1).values)


def test_sigmoid_router_gets_gradient_from_the_lm_loss():
    torch.manual_seed(3)
    moe = MoE(layer_config(moe_router="sigmoid", moe_aux_loss_coef=0.0, moe_z_loss_coef=0.0))
    y, aux, _ = moe(torch.randn(2, 6, 32))
    assert float(aux) == 0.0
    y.square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_sigmoid_bias_update_balances_the_load():
    torch.manual_seed(4)
    cfg = layer_config(moe_router="sigmoid", moe_bias_balance=True, moe_bias_update_rate=0.05)
    model = GPT(cfg)
    idx = torch.randint(0, 32, (4, 32))
    out = model(idx, idx)
    loads = [st["load"].clone() for st in out.moe_stats]
    assert update_moe_bias(model, add_loads(None, out.moe_stats)) == 2
    for m, load in zip(moe_layers(model), loads):
        torch.testing.assert_close(m.expert_bias, 0.05 * torch.sign(load.mean() - load))


# ---- balance scope -------------------------------------------------------------------------------


def test_sequence_balance_by_hand_and_its_extremes():
    B, T, E, k = 2, 4, 4, 2
    torch.manual_seed(5)
    p = torch.randn(B, T, E).softmax(-1)
    idx = p.topk(k, -1).indices
    want = 0.0
    for b in range(B):
        f = torch.bincount(idx[b].flatten(), minlength=E).float() / (T * k)
        want += E * (f * p[b].mean(0)).sum() / B
    torch.testing.assert_close(balance_loss(p, idx, "sequence"), want)
    # every sequence on the same two experts: f = P = (1/2, 1/2, 0, 0) -> E * 1/2 = 2 (= E/k, the top-2 collapse)
    p = torch.tensor([0.5, 0.5, 0.0, 0.0]).expand(B, T, E)
    idx = torch.tensor([0, 1]).expand(B, T, 2)
    assert float(balance_loss(p, idx, "sequence")) == pytest.approx(2.0)
    # two sequences each collapsed on different experts: balanced over the batch (1), not per sequence
    p = torch.stack([torch.tensor([0.5, 0.5, 0, 0]).expand(T, E), torch.tensor([0, 0, 0.5, 0.5]).expand(T, E)])
    idx = torch.stack([torch.tensor([0, 1]).expand(T, 2), torch.tensor([2, 3]).expand(T, 2)])
    assert float(balance_loss(p, idx, "micro_batch")) == pytest.approx(1.0)
    assert float(balance_loss(p, idx, "sequence")) == pytest.approx(2.0)


def _eq18_by_hand(s: torch.Tensor, k: int) -> float:
    """DeepSeek-V3 eq. 17-20 written out with loops: s (B, T, E) unbiased sigmoid scores of each
    sequence; f_i = E/(k T) * #{t: s_i,t in top-k of s_t} (unbiased!), P_i = mean_t s_i,t / sum_j s_j,t;
    loss = mean over sequences of sum_i f_i P_i."""
    B, T, E = s.shape
    total = 0.0
    for b in range(B):
        for i in range(E):
            hits = sum(1 for t in range(T) if s[b, t, i] >= sorted(s[b, t].tolist(), reverse=True)[k - 1])
            f_i = E / (k * T) * hits
            P_i = sum(float(s[b, t, i] / s[b, t].sum()) for t in range(T)) / T
            total += f_i * P_i
    return total / B


@pytest.mark.parametrize("scope", ["sequence", "micro_batch", "global"])
def test_balance_counts_the_unbiased_top_k_even_when_a_bias_moves_the_choice(scope):
    """DeepSeek-V3 (arXiv 2412.19437) eq. 16: the bias b_i only selects experts; eq. 17-20: the
    balance loss counts f_i over the top-k of the UNBIASED scores. A +3 bias on expert 0 moves
    selections; the loss must not see it. 3 sequences x 5 tokens, E = 4, k = 2."""
    torch.manual_seed(11)
    moe = MoE(layer_config(moe_router="sigmoid", moe_bias_balance=True, moe_balance_scope=scope,
                           moe_aux_loss_coef=1.0, moe_z_loss_coef=0.0))
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        s = torch.sigmoid(x.double() @ moe.router.weight.double().T)  # (3, 5, 4) written out, not the package
    moe.expert_bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))
    _, _, biased_idx, _ = moe.route(x)
    assert not torch.equal(biased_idx.sort(-1).values, s.topk(2, -1).indices.sort(-1).values)  # the bias moved some
    if scope == "sequence":
        want = _eq18_by_hand(s, 2)
    else:  # micro-batch / global on one process, one micro-batch: the 15 tokens as one sequence
        want = _eq18_by_hand(s.reshape(1, 15, 4), 2)
    moe.train()
    _, aux, st = moe(x)
    assert float(aux.detach()) == pytest.approx(want, rel=1e-5)
    assert float(st["balance_loss"]) == pytest.approx(want, rel=1e-5)
    # the biased count would give another number: the test can tell the two apart
    biased = balance_loss(s.float() / s.float().sum(-1, keepdim=True), biased_idx, scope if scope == "sequence"
                          else "micro_batch")
    assert abs(float(biased) - want) > 1e-3
    # the bias update still counts the experts really chosen (eq. 16's load), not the unbiased top-k
    torch.testing.assert_close(st["load"], torch.bincount(biased_idx.flatten(), minlength=4).float())


def test_global_balance_prepass_counts_the_unbiased_top_k():
    """Global scope with gradient accumulation: the pre-pass sums unbiased counts too, so 2
    micro-batches give eq. 18 of the whole batch."""
    torch.manual_seed(12)
    cfg = layer_config(n_layer=1, moe_router="sigmoid", moe_bias_balance=True, moe_balance_scope="global",
                       moe_aux_loss_coef=1.0, moe_z_loss_coef=0.0)
    model = GPT(cfg).train()
    moe_layers(model)[0].expert_bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))
    xb = torch.randint(0, 32, (4, 16))
    full = GPT(cfg)
    full.load_state_dict(model.state_dict())
    want = float(full(xb, xb).aux_loss)  # one batch of 4: f over all 64 tokens
    step_loads = global_balance_prepass(model, [xb[:2], xb[2:]])
    aux = 0.0
    for part in (xb[:2], xb[2:]):
        aux += float(model(part, part, moe_loads=step_loads).aux_loss) / 2
    assert aux == pytest.approx(want, rel=1e-5)


def _grads(model, loss):
    return torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=False)


def test_global_balance_two_micro_batches_equal_one_batch():
    """f counted over the whole step: 2 micro-batches (+ the routing pre-pass, loss / 2 each)
    give the aux loss and every gradient of one forward over the 4 sequences."""
    torch.manual_seed(6)
    cfg = layer_config(moe_balance_scope="global", moe_aux_loss_coef=1.0, moe_z_loss_coef=0.0)
    model = GPT(cfg)
    x = torch.randint(0, 32, (4, 32))
    res = model(x, x)
    full, aux_full = res.loss, res.aux_loss
    g_full = _grads(model, full)
    step_loads = global_balance_prepass(model, [x[:2], x[2:]])
    assert len(step_loads) == 2
    total, aux = 0.0, 0.0
    for part in (x[:2], x[2:]):
        res = model(part, part, moe_loads=step_loads)
        total, aux = total + res.loss / 2, aux + res.aux_loss / 2
    torch.testing.assert_close(aux, aux_full)
    for a, b in zip(_grads(model, total), g_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the micro-batch scope is a different loss: it balances each half on its own
    model_mb = GPT(cfg.replace(moe_balance_scope="micro_batch"))
    model_mb.load_state_dict(model.state_dict())
    aux_mb = 0.0
    for part in (x[:2], x[2:]):
        aux_mb = aux_mb + model_mb(part, part).aux_loss / 2
    assert not torch.allclose(aux_mb, aux_full)


def test_global_prepass_counts_are_the_step_ones():
    torch.manual_seed(7)
    model = GPT(layer_config(moe_balance_scope="global"))
    x = torch.randint(0, 32, (4, 32))
    step_loads = global_balance_prepass(model, [x[:2], x[2:]])
    whole = model(x, x)  # one forward over the whole step counts the same
    assert all(torch.equal(a, st["load"]) for a, st in zip(step_loads, whole.moe_stats))
    half = model(x[:2], x[:2])
    assert not torch.equal(half.aux_loss, model(x[:2], x[:2], moe_loads=step_loads).aux_loss)
    assert global_balance_prepass(GPT(layer_config()), [x]) is None  # nothing to do for other scopes


def test_global_scope_needs_no_dropout():
    with pytest.raises(ValueError, match="dropout=0.0"):
        layer_config(moe_balance_scope="global", dropout=0.1)


# ---- fine-grained experts, dense first layers ------------------------------------------------------


def test_fine_grained_experts_keep_the_active_parameters():
    coarse = GPT(layer_config(n_embd=64, n_experts=8, moe_top_k=2))
    fine = GPT(layer_config(n_embd=64, n_experts=32, moe_top_k=7, n_shared_experts=1))
    assert coarse.config.expert_hidden_dim == 4 * fine.config.expert_hidden_dim  # 8 / 2 = 4x narrower
    router_extra = 2 * 64 * (32 - 8)  # the only difference: a wider router in each of the 2 layers
    assert fine.num_params(active=True) - coarse.num_params(active=True) == router_extra
    assert fine.num_params() > fine.num_params(active=True)


def test_dense_first_layers():
    model = GPT(layer_config(n_layer=4, moe_dense_layers=2))
    assert [b.is_moe for b in model.transformer.h] == [False, False, True, True]
    assert isinstance(model.transformer.h[0].mlp, MLP) and len(moe_layers(model)) == 2
    idx = torch.randint(0, 32, (2, 8))
    assert len(model(idx, idx).moe_stats) == 2
    for bad, msg in ((4, "at least one MoE"), (-1, "between 0")):
        with pytest.raises(ValueError, match=msg):
            layer_config(n_layer=4, moe_dense_layers=bad)
    with pytest.raises(ValueError, match="leaves no MoE layer"):
        layer_config(n_layer=4, moe_dense_layers=3, moe_every=3)


@pytest.mark.parametrize("field,value,msg", [
    ("moe_router", "tanh", "moe_router must be one of"),
    ("moe_balance_scope", "batch", "moe_balance_scope must be one of"),
    ("moe_routed_scaling", 0.0, "moe_routed_scaling must be > 0"),
])
def test_config_errors_say_what_to_change(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        layer_config(**{field: value})


def test_exact_gelu_experts_equal_an_exact_gelu_mlp():
    """One activation helper: an expert with gelu_approximate='none' is nanoGPT's exact-GELU MLP."""
    torch.manual_seed(8)
    cfg = layer_config(mlp="gelu", gelu_approximate="none", bias=False, n_experts=2, moe_top_k=1)
    moe = MoE(cfg)
    mlp = MLP(32, cfg.expert_hidden_dim, "gelu", bias=False, gelu_approximate="none")
    with torch.no_grad():
        mlp.c_fc.weight.copy_(moe.experts.c_fc[0].T)
        mlp.c_proj.weight.copy_(moe.experts.c_proj[0].T)
    x = torch.randn(5, 32)
    from nanomoe.moe import expert_mlp

    want = F.linear(F.gelu(F.linear(x, mlp.c_fc.weight)), mlp.c_proj.weight)  # erf GELU
    torch.testing.assert_close(expert_mlp(x, moe.experts.c_fc[0], moe.experts.c_proj[0], "gelu", "none"), want)
    torch.testing.assert_close(mlp(x), want)
    assert not torch.allclose(F.gelu(x, approximate="tanh"), F.gelu(x))


# ---- the proofs every switch gets ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(SWITCHES))
def test_reference_equals_fast_outputs_and_grads(name):
    cfg = layer_config(**SWITCHES[name])
    torch.manual_seed(9)
    ref = GPT(cfg.replace(moe_impl="reference"))
    fast = GPT(cfg.replace(moe_impl="fast"))
    fast.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 32, (2, 16))
    outs = []
    for model in (ref, fast):
        logits, loss = model(idx, idx)
        outs.append((logits, loss, _grads(model, loss)))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)
    for a, b in zip(outs[0][2], outs[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", list(SWITCHES))
def test_cache_equals_no_cache(name):
    torch.manual_seed(10)
    model = GPT(layer_config(**SWITCHES[name])).eval()
    prompt = torch.randint(0, 32, (2, 5))
    cached = model.generate(prompt, 10, temperature=0, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, 10, temperature=0, use_cache=False))
    full, _ = model(cached)
    cache = model.new_cache(2, cached.size(1))
    h, _, _ = model.hidden_states(cached[:, :5], cache)
    steps = [model.logits(h)]
    for t in range(5, cached.size(1)):
        h, _, _ = model.hidden_states(cached[:, t : t + 1], cache)
        steps.append(model.logits(h))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(SWITCHES))
def test_no_causality_leak(name):
    """Changing the last tokens changes nothing before them (logits and routing), in training mode."""
    torch.manual_seed(11)
    model = GPT(layer_config(**SWITCHES[name]))
    a = torch.randint(0, 32, (2, 16))
    b = a.clone()
    b[:, 10:] = (b[:, 10:] + 7) % 32
    out_a, out_b = model(a), model(b)
    la, lb = out_a.logits, out_b.logits
    ra = [st["topk_idx"] for st in out_a.moe_stats]
    rb = [st["topk_idx"] for st in out_b.moe_stats]
    torch.testing.assert_close(la[:, :10], lb[:, :10])
    assert all(torch.equal(x[:, :10], y[:, :10]) for x, y in zip(ra, rb))
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


# ---- export: Mixtral only where the family matches -----------------------------------------------


def test_export_mixtral_only_for_the_matching_family():
    base = dict(vocab_size=32, block_size=32, n_layer=2, n_head=4, n_embd=32, n_experts=4, moe_top_k=2)
    assert hf_family(moe_config(**base)) == "mixtral"
    assert hf_family(moe_config(**base, moe_balance_scope="global")) == "mixtral"  # training-only switch
    assert hf_family(modern_config(**{k: v for k, v in base.items() if k not in ("n_experts", "moe_top_k")})) == "llama"
    for kw, named in (
        (dict(moe_router="sigmoid"), "moe_router='sigmoid'"),
        (dict(moe_routed_scaling=2.5), "moe_routed_scaling=2.5"),
        (dict(moe_dense_layers=1), "moe_dense_layers=1"),
        (dict(n_shared_experts=1), "n_shared_experts=1"),
        (dict(moe_bias_balance=True), "moe_bias_balance=True"),
    ):
        with pytest.raises(HFConversionError, match=named.replace("(", r"\(")):
            hf_family(moe_config(**base, **kw))


# ---- statistics only when asked --------------------------------------------------------------------


def test_routing_statistics_are_computed_only_when_read(monkeypatch):
    calls = []
    real = torch.special.entr
    monkeypatch.setattr(torch.special, "entr", lambda t: calls.append(1) or real(t))
    torch.manual_seed(12)
    moe = MoE(layer_config())
    x = torch.randn(2, 6, 32)
    _, _, st = moe(x)
    assert calls == []  # a training forward computes no entropy
    _, probs, _, _ = moe.route(x)
    p = probs.reshape(-1, 4)
    want = (-(p * p.log()).sum(-1)).mean() / math.log(4)
    torch.testing.assert_close(st["entropy"], want)
    assert len(calls) == 1 and st["entropy"] is st["entropy"] and len(calls) == 1  # computed once
    assert set(st) == {"load", "balance_load", "importance", "tokens", "dropped", "entropy", "top1_prob",
                       "balance_loss", "z_loss", "topk_idx"}
    assert not st["load"].requires_grad and not st["balance_loss"].requires_grad
