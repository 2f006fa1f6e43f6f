"""Chapter 02: each modern switch checked against its formula or code nobody here wrote.

- attention: attn="sdpa" equals attn="manual" (MHA/GQA/MQA, with and without the KV cache)
- RoPE: relative-position property, and equality with Hugging Face Llama's rotary embedding
- RMSNorm: its formula and torch's `F.rms_norm`
- SwiGLU: hidden width and parameter count; GELU is GPT-2's tanh approximation
- bias=False removes every bias; the block is sequential pre-norm (not a parallel residual)
- n_kv_head is a head count that must divide n_head; presets carry the documented switches

Tiny models on CPU, float32, a few milliseconds each.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nanomoe import GPT, GPTConfig, gpt2_config, modern_config, preset
from nanomoe.attention import CausalSelfAttention, manual_attention
from nanomoe.mlp import MLP
from nanomoe.norm import LayerNorm, RMSNorm
from nanomoe.rope import apply_rope, rope_tables, rotate_half

KV_HEADS = [4, 2, 1]
  # with n_head=4: MHA, GQA (2 query heads per kv head), MQA


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    return GPTConfig(**{**base, **kw})


def perturb_(model: GPT, std: float = 0.05, seed: int = 0) -> GPT:
    """Give norms' gains/biases random values too (they start at 1/0, which would hide mix-ups)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * std * 10)
    return model


# ---- attention kernels -----------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_head", KV_HEADS)
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_sdpa_equals_manual_forward(n_kv_head, pos_emb):
    torch.manual_seed(0)
    cfg = tiny(n_kv_head=n_kv_head, pos_emb=pos_emb, attn="manual")
    manual = perturb_(GPT(cfg)).eval()
    sdpa = GPT(cfg.replace(attn="sdpa")).eval()
    sdpa.load_state_dict(manual.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.block_size))
    with torch.no_grad():
        a, _ = manual(idx)
        b, _ = sdpa(idx)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_head", KV_HEADS)
def test_sdpa_equals_manual_with_cache(n_kv_head):
    """Prefill of 5 tokens then 4 single-token steps, both kernels, same cache protocol."""
    torch.manual_seed(1)
    cfg = tiny(n_kv_head=n_kv_head, pos_emb="rope", attn="manual")
    manual = perturb_(GPT(cfg)).eval()
    sdpa = GPT(cfg.replace(attn="sdpa")).eval()
    sdpa.load_state_dict(manual.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    outs = []
    with torch.no_grad():
        for model in (manual, sdpa):
            cache = model.new_cache(2, max_len=16)
            steps = [model(idx[:, :5], cache=cache)[0]]
            steps += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 9)]
            outs.append(torch.cat(steps, dim=1))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_manual_attention_is_the_formula():
    """manual_attention = softmax(q k^T / sqrt(d) + causal mask) v, written independently here."""
    torch.manual_seed(2)
    B, H, T, D = 2, 3, 7, 8
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    scores = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(D)
    future = torch.arange(T)[None, :] > torch.arange(T)[:, None]
    ref = torch.softmax(scores.masked_fill(future, -1e30), dim=-1) @ v
    torch.testing.assert_close(manual_attention(q, k, v, None), ref, atol=1e-6, rtol=1e-5)
    ref_sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ref_sdpa, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "manual"])
@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_gqa_equals_mha_with_repeated_kv_heads(attn, n_kv_head):
    """GQA semantics: kv head j serves query heads j*r .. j*r+r-1 (r = n_head // n_kv_head), the
    convention of HF's `repeat_kv`. An MHA layer whose k/v rows are those heads repeated must agree."""
    torch.manual_seed(3)
    H, D = 4, 8
    cfg = tiny(n_kv_head=n_kv_head, attn=attn, bias=True)
    gqa = CausalSelfAttention(cfg)
    mha = CausalSelfAttention(cfg.replace(n_kv_head=None))
    r = H // n_kv_head
    with torch.no_grad():
        w, b = gqa.c_attn.weight, gqa.c_attn.bias
        b.normal_()
        q_w, k_w, v_w = w.split([H * D, n_kv_head * D, n_kv_head * D])
        q_b, k_b, v_b = b.split([H * D, n_kv_head * D, n_kv_head * D])

        def rep(t):  # (n_kv*D, ...) -> (H*D, ...), head j repeated r times in place
            return t.view(n_kv_head, D, *t.shape[1:]).repeat_interleave(r, dim=0).reshape(H * D, *t.shape[1:])

        mha.c_attn.weight.copy_(torch.cat([q_w, rep(k_w), rep(v_w)]))
        mha.c_attn.bias.copy_(torch.cat([q_b, rep(k_b), rep(v_b)]))
        mha.c_proj.load_state_dict(gqa.c_proj.state_dict())
        x = torch.randn(2, 6, cfg.n_embd)
        torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "manual"])
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_causal_no_future_leak(attn, pos_emb):
    """Changing a later token never changes an earlier position's logits."""
    torch.manual_seed(4)
    cfg = tiny(attn=attn, pos_emb=pos_emb, n_kv_head=2)
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 12))
    idx2 = idx.clone()
    idx2[0, 8] = (idx[0, 8] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(idx2)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-6, rtol=0)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4  # the change does reach later positions


# ---- RoPE ------------------------------------------------------------------------------------


def test_rope_relative_position_property():
    """q_m . k_n after rotation depends only on m - n (Su et al. 2021, eq. 11-16)."""
    torch.manual_seed(5)
    D = 16
    cos, sin = rope_tables(D, 256, theta=10000.0)
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    cos, sin = cos.double(), sin.double()

    def score(m: int, n: int) -> float:
        return float(apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n]))

    for m, n in [(5, 2), (0, 0), (3, 17), (40, 1)]:
        base = score(m, n)
        for s in (1, 7, 100, 200):
            assert score(m + s, n + s) == pytest.approx(base, abs=1e-4)  # table is float32
    # ...and it does depend on the offset (otherwise the property above would be trivial)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3
    # a rotation preserves norms; position 0 is the identity
    torch.testing.assert_close(apply_rope(q, cos[37], sin[37]).norm(), q.norm())
    torch.testing.assert_close(apply_rope(q, cos[0], sin[0]), q)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_hf_llama(theta):
    """Same cos/sin and same rotated q, k as transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    torch.manual_seed(6)
    B, H, T, D = 2, 3, 50, 16
    hf_cfg = LlamaConfig(
        hidden_size=H * D, num_attention_heads=H, head_dim=D, max_position_embeddings=64, rope_theta=theta
    )
    if getattr(hf_cfg, "rope_parameters", None) is not None:
        hf_cfg.rope_parameters["rope_theta"] = theta
    rotary = LlamaRotaryEmbedding(config=hf_cfg)
    q, k = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    pos_ids = torch.arange(T).unsqueeze(0).expand(B, T)
    hf_cos, hf_sin = rotary(q, pos_ids)  # (B, T, D)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)

    cos, sin = rope_tables(D, 64, theta=theta)
    torch.testing.assert_close(cos[:T], hf_cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[:T], hf_sin[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(apply_rope(q, cos[:T], sin[:T]), hf_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(apply_rope(k, cos[:T], sin[:T]), hf_k, atol=1e-5, rtol=1e-5)
    # offset positions (what the KV cache uses) too
    hf_cos2, hf_sin2 = rotary(q, pos_ids + 10)
    torch.testing.assert_close(apply_rope(q, cos[10 : T + 10], sin[10 : T + 10]),
                               apply_rotary_pos_emb(q, k, hf_cos2, hf_sin2)[0], atol=1e-5, rtol=1e-5)


def test_rope_is_rotate_half_not_interleaved():
    """Dimension i pairs with i + D/2 (HF Llama), not with i + 1 (the original interleaved form)."""
    D = 8
    cos, sin = rope_tables(D, 4)
    x = torch.zeros(D)
    x[0] = 1.0  # only dim 0: rotation moves mass into dim D/2 = 4, never into dim 1
    y = apply_rope(x, cos[1], sin[1])
    assert y[4].abs() > 0.5 and y[1] == 0
    torch.testing.assert_close(rotate_half(torch.arange(4.0)), torch.tensor([-2.0, -3.0, 0.0, 1.0]))


def test_rope_keeps_dtype_and_uses_fp32_inside():
    torch.manual_seed(7)
    cos, sin = rope_tables(16, 8)
    x = torch.randn(1, 2, 8, 16)
    y16 = apply_rope(x.bfloat16(), cos, sin)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), apply_rope(x.bfloat16().float(), cos, sin), atol=1e-2, rtol=1e-2)


# ---- norms -----------------------------------------------------------------------------------


def test_rmsnorm_formula_and_torch():
    torch.manual_seed(8)
    C, eps = 24, 1e-5
    norm = RMSNorm(C, eps=eps)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, C) * 3 + 1
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * norm.weight
    torch.testing.assert_close(norm(x), ref, atol=1e-6, rtol=1e-5)
    if hasattr(F, "rms_norm"):
        torch.testing.assert_close(norm(x), F.rms_norm(x, (C,), norm.weight, eps), atol=1e-6, rtol=1e-5)
    # no centering: RMSNorm(x + c) != RMSNorm(x) (LayerNorm would be invariant to the shift)
    assert (norm(x + 5.0) - norm(x)).abs().max() > 1e-2
    # half precision (as HF Llama): normalized in float32, cast back to the input dtype before
    # the gain, so a bfloat16 model stays bfloat16 and matches the float32 result closely
    norm16 = RMSNorm(C, eps=eps).bfloat16()
    with torch.no_grad():
        norm16.weight.copy_(norm.weight)
    y = norm16(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=2e-2)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]


def test_layernorm_matches_torch_with_and_without_bias():
    torch.manual_seed(9)
    x = torch.randn(4, 10)
    for bias in (True, False):
        ln = LayerNorm(10, bias=bias)
        ref = torch.nn.LayerNorm(10, bias=bias)
        with torch.no_grad():
            ln.weight.normal_()
            ref.weight.copy_(ln.weight)
            if bias:
                ln.bias.normal_()
                ref.bias.copy_(ln.bias)
        torch.testing.assert_close(ln(x), ref(x))


# ---- MLP -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_embd", [32, 128, 384, 768, 4096])
def test_swiglu_width_and_params(n_embd):
    cfg = GPTConfig(n_embd=n_embd, n_head=8 if n_embd % 8 == 0 else 4, mlp="swiglu")
    H = cfg.hidden_dim
    assert H % cfg.mlp_multiple_of == 0
    assert 8 * n_embd / 3 <= H < 8 * n_embd / 3 + cfg.mlp_multiple_of  # 8/3 C, rounded *up*
    # Llama's own rule (int(8C/3) rounded up to multiple_of) gives the same width
    assert H == cfg.mlp_multiple_of * math.ceil(int(8 * n_embd / 3) / cfg.mlp_multiple_of)
    if n_embd <= 768:  # count real modules (the formula 3CH vs 8C^2 for the big one)
        swiglu = MLP(n_embd, H, "swiglu", bias=False)
        gelu = MLP(n_embd, 4 * n_embd, "gelu", bias=False)
        ratio = sum(p.numel() for p in swiglu.parameters()) / sum(p.numel() for p in gelu.parameters())
    else:
        ratio = 3 * n_embd * H / (8 * n_embd * n_embd)
    # rounding up adds < mlp_multiple_of columns: about the GELU MLP's parameters once C >> 32
    assert 1.0 <= ratio < 1 + 3 * cfg.mlp_multiple_of / (8 * n_embd)
    if n_embd >= 128:
        assert ratio < 1.05
    if n_embd % 3 == 0 and (8 * n_embd // 3) % 32 == 0:
        assert ratio == 1.0  # e.g. 768 -> 2048: exactly the GELU MLP's parameters
    assert cfg.replace(mlp_hidden=100).hidden_dim == 100  # explicit width wins


def test_swiglu_formula():
    torch.manual_seed(10)
    mlp = MLP(16, 40, "swiglu", bias=False)
    x = torch.randn(3, 16)
    wg, wu = mlp.c_fc.weight[:40], mlp.c_fc.weight[40:]  # rows [gate ; up]
    ref = (F.silu(x @ wg.T) * (x @ wu.T)) @ mlp.c_proj.weight.T
    torch.testing.assert_close(mlp(x), ref, atol=1e-6, rtol=1e-5)


def test_gelu_is_tanh_approximation():
    torch.manual_seed(11)
    mlp = MLP(8, 32, "gelu", bias=True)
    x = torch.randn(5, 8) * 3
    h = mlp.c_fc(x)
    gelu_new = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))  # HF gelu_new
    torch.testing.assert_close(mlp(x), mlp.c_proj(gelu_new), atol=1e-6, rtol=1e-5)


# ---- bias, block structure, config ---------------------------------------------------------


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_bias_false_removes_every_bias(norm, mlp):
    model = GPT(tiny(bias=False, norm=norm, mlp=mlp, n_kv_head=2))
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if "bias" in n]
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, LayerNorm)):
            assert m.bias is None
    with_bias = GPT(tiny(bias=True, norm=norm, mlp=mlp, n_kv_head=2))
    biased = {n for n, _ in with_bias.named_parameters() if n.endswith("bias")}
    # every Linear of every block (and LayerNorms) gets a bias when bias=True
    assert {f"transformer.h.0.{m}.bias" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")} <= biased
    assert ("transformer.ln_f.bias" in biased) == (norm == "layernorm")  # RMSNorm never has one


def test_block_is_sequential_pre_norm():
    """x1 = x + attn(ln_1(x)); x2 = x1 + mlp(ln_2(x1)) — not the parallel form where both read x."""
    torch.manual_seed(12)
    model = perturb_(GPT(tiny(n_layer=1))).eval()
    block = model.transformer.h[0]
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        out, aux, stats = block(x)
        x1 = x + block.attn(block.ln_1(x))
        ref = x1 + block.mlp(block.ln_2(x1))
        parallel = x + block.attn(block.ln_1(x)) + block.mlp(block.ln_2(x))
    assert aux is None and stats is None
    torch.testing.assert_close(out, ref)
    assert (out - parallel).abs().max() > 1e-4


@pytest.mark.parametrize("bad", [3, 5, 0, 8, -1])
def test_n_kv_head_must_divide_n_head(bad):
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=4, n_embd=32, n_kv_head=bad)


def test_n_kv_head_is_a_head_count():
    """The cache and the k/v projections hold n_kv_head heads (not n_head / n_kv_head)."""
    for n_kv in KV_HEADS:
        model = GPT(tiny(n_kv_head=n_kv))
        attn = model.transformer.h[0].attn
        D = 32 // 4
        assert attn.c_attn.weight.shape == ((4 + 2 * n_kv) * D, 32)
        assert model.new_cache(1).k.shape[2] == n_kv
    assert GPTConfig(n_head=4, n_embd=32).kv_heads == 4  # None means MHA


def test_presets_have_the_documented_switches():
    g = gpt2_config()
    assert (g.pos_emb, g.norm, g.mlp, g.kv_heads, g.bias, g.tie_embeddings, g.logit_softcap) == (
        "learned", "layernorm", "gelu", g.n_head, True, True, None)
    assert g == GPTConfig()  # the defaults are chapter 01's GPT-2
    m = modern_config(n_head=8, n_embd=256)
    assert (m.pos_emb, m.norm, m.mlp, m.kv_heads, m.attn, m.bias, m.logit_softcap) == (
        "rope", "rmsnorm", "swiglu", 2, "sdpa", False, None)
    assert modern_config().kv_heads == 3  # 12 heads -> 3 kv heads (GQA, 4 query heads per kv head)
    assert modern_config(n_head=8, n_embd=256, n_kv_head=8).kv_heads == 8  # overrides win
    assert modern_config(logit_softcap=30.0).logit_softcap == 30.0
    assert preset("modern", n_head=8, n_embd=256) == m and preset("gpt2") == g
    with pytest.raises(ValueError, match="preset"):
        preset("llama")
    # the modern model builds and runs: no wpe, rope tables, no biases
    model = GPT(modern_config(vocab_size=50, block_size=16, n_layer=1, n_head=4, n_embd=32))
    assert "wpe" not in model.transformer and model.rope_cos.shape == (16, 8)
    model(torch.zeros(1, 16, dtype=torch.long))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(pos_emb="alibi"), "pos_emb"),
        (dict(norm="batchnorm"), "norm"),
        (dict(mlp="relu"), "mlp"),
        (dict(attn="flash"), "attn"),
        (dict(logit_softcap=0.0), "logit_softcap"),
        (dict(pos_emb="rope", n_embd=36, n_head=4), "even head_dim"),
        (dict(n_embd=30, n_head=4), "divisible"),
    ],
)
def test_config_errors_are_clear(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_config_round_trip():
    cfg = modern_config(n_head=8, n_embd=256, logit_softcap=30.0)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_kv_groups": 2})
