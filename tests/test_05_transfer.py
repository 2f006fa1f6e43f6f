"""Chapter 05: partial transfer GPT-2 -> modern architecture, and sparse upcycling to MoE."""

from __future__ import annotations

import pytest
import torch

from nanomoe import GPT
from nanomoe.config import gpt2_config, modern_config
from nanomoe.interop.transfer import transfer_weights, upcycle_to_moe

V, C, NH, L = 64, 32, 4, 3


def gpt2(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(gpt2_config(vocab_size=V, block_size=32, n_layer=L, n_head=NH, n_embd=C, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # non-trivial gains/biases, so "copied" is distinguishable from "init"
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    return model


def modern(seed: int = 1, **kw) -> GPT:
    torch.manual_seed(seed)
    base = dict(vocab_size=V, block_size=32, n_layer=L, n_head=NH, n_embd=C)
    return GPT(modern_config(**{**base, **kw}))


def ids(n: int = 16) -> torch.Tensor:
    return torch.randint(0, V, (2, n), generator=torch.Generator().manual_seed(5))


def test_report_lists_the_right_tensors_gpt2_to_modern_gqa():
    src, dst = gpt2(), modern(n_kv_head=2)
    init_before = {k: v.clone() for k, v in dst.state_dict().items()}
    rep = transfer_weights(src, dst)
    S, D = src.state_dict(), dst.state_dict()

    layer = lambda i, k: f"transformer.h.{i}.{k}"  # noqa: E731
    copied = {"transformer.wte.weight", "transformer.ln_f.weight"}
    copied |= {layer(i, k) for i in range(L) for k in ("attn.c_proj.weight", "ln_1.weight", "ln_2.weight")}
    assert set(rep.copied) == copied
    assert set(rep.adapted) == {layer(i, "attn.c_attn.weight") for i in range(L)}
    assert set(rep.initialized) == {layer(i, k) for i in range(L) for k in ("mlp.c_fc.weight", "mlp.c_proj.weight")}
    skipped = {"transformer.wpe.weight", "transformer.ln_f.bias"}
    skipped |= {
        layer(i, k)
        for i in range(L)
        for k in ("ln_1.bias", "ln_2.bias", "attn.c_attn.bias", "attn.c_proj.bias",
                  "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
    }
    assert set(rep.skipped) == skipped
    # every src tensor is used or skipped; every dst tensor (tied lm_head aside) appears exactly once
    used = {e.src for e in rep.entries if e.action in ("copied", "adapted")}
    assert used | set(rep.skipped) | {"lm_head.weight"} == set(S)
    assert sorted(rep.copied + rep.adapted + rep.initialized) == sorted(k for k in D if k != "lm_head.weight")
    # reasons are given
    assert "RoPE" in rep.entry("transformer.wpe.weight").note
    assert "bias=False" in rep.entry(layer(0, "attn.c_attn.bias")).note
    assert "swiglu" in rep.entry(layer(1, "mlp.c_fc.weight")).note

    # copied tensors really equal, initialized ones really untouched
    for k in rep.copied:
        assert torch.equal(D[k], S[k]), k
    for k in rep.initialized:
        assert torch.equal(D[k], init_before[k]), k
    assert dst.lm_head.weight is dst.transformer.wte.weight  # tying survives the copy

    # adapted c_attn: q rows copied, each kv head = mean of its group's 2 source heads
    hd = C // NH
    w_src, w_dst = S[layer(2, "attn.c_attn.weight")], D[layer(2, "attn.c_attn.weight")]
    assert torch.equal(w_dst[: C], w_src[: C])
    k_src = w_src[C : 2 * C].view(NH, hd, C)
    k_dst = w_dst[C : C + 2 * hd].view(2, hd, C)
    assert torch.allclose(k_dst[1], (k_src[2] + k_src[3]) / 2)
    v_src = w_src[2 * C :].view(NH, hd, C)
    assert torch.allclose(w_dst[C + 2 * hd :].view(2, hd, C)[0], (v_src[0] + v_src[1]) / 2)

    text = str(rep)
    assert "adapted" in text and "mean-pooled 4->2" in text and "wpe.weight" in text
    assert 0.0 < rep.fraction("copied") < 1.0


def test_mha_dst_copies_attention_and_matching_mlp():
    """Same MLP kind and width: the MLP is copied too; MHA attention copied verbatim."""
    src = gpt2()
    dst = modern(n_kv_head=NH, mlp="gelu", mlp_hidden=4 * C, bias=True, norm="layernorm", pos_emb="learned")
    rep = transfer_weights(src, dst)
    assert rep.adapted == [] and rep.skipped == [] and rep.initialized == []
    x = ids()
    with torch.no_grad():  # then dst computes exactly src's function
        assert torch.allclose(dst.eval()(x)[0], src.eval()(x)[0], atol=1e-6)


def test_vocab_mismatch_and_extra_layers():
    src = gpt2()
    dst = modern(vocab_size=V + 8, n_layer=L + 1, tie_embeddings=False)
    rep = transfer_weights(src, dst)
    assert "transformer.wte.weight" in rep.initialized and "transformer.wte.weight" in rep.skipped
    assert "lm_head.weight" in rep.initialized
    assert all(k in rep.initialized for k in dst.state_dict() if k.startswith(f"transformer.h.{L}."))
    assert "tokenizer" in rep.entry("lm_head.weight").note or "vocab" in rep.entry("lm_head.weight").note


@pytest.mark.parametrize("n_experts,top_k", [(4, 2), (3, 3)])
def test_upcycled_moe_equals_dense_at_step_zero(n_experts, top_k):
    dense = modern(n_kv_head=2).eval()
    with torch.no_grad():
        for p in dense.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.3)
    moe, rep = upcycle_to_moe(dense, n_experts, top_k, return_report=True, moe_impl="reference")
    cfg = moe.config
    assert cfg.n_experts == n_experts and cfg.moe_top_k == top_k
    assert cfg.expert_hidden_dim == dense.config.hidden_dim  # experts as wide as the dense MLP
    assert set(rep.initialized) == {f"transformer.h.{i}.mlp.router.weight" for i in range(L)}
    assert len(rep.adapted) == 2 * L and rep.skipped == []
    ex = moe.transformer.h[1].mlp.experts
    w = dense.transformer.h[1].mlp.c_fc.weight
    assert all(torch.equal(ex.c_fc[e], w.t()) for e in range(n_experts))
    x = ids()
    with torch.no_grad():
        d, m = dense(x)[0], moe.eval()(x)[0]
        assert (d - m).abs().max().item() < 1e-5
        # the fast dispatch agrees too
        fast = upcycle_to_moe(dense, n_experts, top_k, moe_impl="fast").eval()
        assert (d - fast(x)[0]).abs().max().item() < 1e-5


def test_upcycling_noise_and_errors():
    dense = modern().eval()
    noisy = upcycle_to_moe(dense, 4, 2, noise_std=0.05).eval()
    ex = noisy.transformer.h[0].mlp.experts.c_fc
    assert not torch.equal(ex[0], ex[1])  # experts now differ
    x = ids()
    with torch.no_grad():
        diff = (dense(x)[0] - noisy(x)[0]).abs().max().item()
    assert 0 < diff < 1.0
    with pytest.raises(ValueError, match="n_shared_experts"):
        upcycle_to_moe(dense, 4, 2, n_shared_experts=1)
    with pytest.raises(ValueError, match="moe_hidden must be"):
        upcycle_to_moe(dense, 4, 2, moe_hidden=8)
    moe = upcycle_to_moe(dense, 4, 2)
    with pytest.raises(ValueError, match="dense model"):
        upcycle_to_moe(moe, 4, 2)


def test_transfer_then_upcycle_chain_trains():
    """GPT-2 -> modern -> MoE, then one optimizer step: gradients flow to the fresh router."""
    modern_model = modern(n_kv_head=2)
    transfer_weights(gpt2(), modern_model)
    moe = upcycle_to_moe(modern_model, 4, 2)
    x = ids()
    _, loss = moe(x, targets=x)
    loss.backward()
    g = moe.transformer.h[0].mlp.router.weight.grad
    assert g is not None and g.abs().sum() > 0
