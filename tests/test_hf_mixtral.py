"""MoE preset <-> transformers.MixtralForCausalLM, exactly, both ways (chapters 03 and 05).
Offline: tiny random models only."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM  # noqa: E402

from nanomoe import GPT  # noqa: E402
from nanomoe.config import moe_config  # noqa: E402
from nanomoe.interop.hf import HFConversionError, export_hf, from_hf, hf_family, load_hf, to_hf  # noqa: E402

V = 80


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    base = dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_experts=4, moe_top_k=2)
    model = GPT(moe_config(**{**base, **kw})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)
            if name.endswith("router.weight"):
                p.normal_(0.0, 0.5)  # a confident router: a swapped expert or gate changes the output
    return model


def ids(n: int = 24, b: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(7))


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
@pytest.mark.parametrize("impl,top_k", [("fast", 2), ("reference", 3)])
def test_to_mixtral_equal_logits_and_round_trip(impl, top_k):
    model = tiny(moe_impl=impl, moe_top_k=top_k, tie_embeddings=top_k == 2)
    assert hf_family(model.config) == "mixtral"
    hf = to_hf(model)
    c = hf.config
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert (c.num_local_experts, c.num_experts_per_tok, c.intermediate_size) == (
        4, top_k, model.config.expert_hidden_dim
    )
    x = ids()
    assert max_diff(model(x)[0], hf(x).logits) < 1e-5
    back = from_hf(hf, moe_impl=impl)
    assert back.config == model.config  # incl. moe_aux_loss_coef through HF's k-times-larger convention
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


@torch.no_grad()
def test_expert_orientation():
    model = tiny()
    hf = to_hf(model)
    ours = model.transformer.h[0].mlp.experts
    theirs = hf.model.layers[0].mlp.experts
    H = model.config.expert_hidden_dim
    # expert 3's gate projection: our columns [:H] of c_fc[3] (y = x @ W) = HF's rows [:H] (y = x @ W^T)
    assert torch.equal(ours.c_fc[3][:, :H], theirs.gate_up_proj[3][:H].t())
    assert torch.equal(ours.c_proj[1], theirs.down_proj[1].t())
    assert torch.equal(model.transformer.h[1].mlp.router.weight, hf.model.layers[1].mlp.gate.weight)


@torch.no_grad()
def test_from_random_mixtral_equal_logits():
    torch.manual_seed(3)
    hf = MixtralForCausalLM(MixtralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2, max_position_embeddings=48,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, bos_token_id=None, eos_token_id=None,
    )).eval()
    for name, p in hf.named_parameters():
        if name.endswith("gate.weight"):
            p.normal_(0.0, 0.5)
    model = from_hf(hf)
    cfg = model.config
    assert (cfg.n_experts, cfg.moe_top_k, cfg.moe_hidden, cfg.kv_heads, cfg.rope_theta) == (3, 2, 40, 1, 1e6)
    x = ids(n=40)
    assert max_diff(model(x)[0], hf(x).logits) < 1e-5


@torch.no_grad()
def test_export_folder_automodel_and_load_back(tmp_path):
    model = tiny(moe_aux_loss_coef=0.05, moe_z_loss_coef=0.0)  # aux coefs never change logits
    folder = export_hf(model, tmp_path / "mixtral")
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    x = ids()
    assert max_diff(model(x)[0], hf(x).logits) < 1e-5
    back, _ = load_hf(folder)
    assert back.config == model.config
    assert max_diff(back(x)[0], model(x)[0]) == 0.0


def test_unsupported_moe_switches_are_named():
    for kw, switch in [
        (dict(n_shared_experts=1), "n_shared_experts=1"),
        (dict(moe_capacity_factor=1.25), "moe_capacity_factor=1.25"),
        (dict(moe_every=2), "moe_every=2"),
        (dict(moe_top_k=1), "moe_top_k=1"),
        (dict(moe_renormalize=False), "moe_renormalize=False"),
        (dict(moe_bias_balance=True), "moe_bias_balance=True"),
        (dict(bias=True), "bias=True"),
        (dict(logit_softcap=20.0), "logit_softcap=20.0"),
    ]:
        with pytest.raises(HFConversionError, match=switch):
            to_hf(tiny(**kw))
    jitter = MixtralForCausalLM(MixtralConfig(
        vocab_size=V, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_local_experts=2, router_jitter_noise=0.1, bos_token_id=None, eos_token_id=None,
    ))
    with pytest.raises(HFConversionError, match="router_jitter_noise"):
        from_hf(jitter)
