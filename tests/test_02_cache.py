"""Chapter 02: the KV cache, generation and logit soft-capping.

Each test guards a bug class found in peer implementations (see shared PITFALLS.md):
cached output differing from uncached (nanoGPT PR #613), `is_causal` wrong during a multi-token
prefill with a cache, position-pointer overflow, generation past the RoPE table, soft-capping
applied in one path but not the other, temperature 0 still sampling.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nanomoe.model as model_mod
from nanomoe import GPT, GPTConfig, KVCache
from nanomoe.sampling import sample_next

KV_HEADS = [4, 2, 1]  # n_head=4: MHA, GQA, MQA



def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    return GPTConfig(**{**base, **kw})


def make(seed: int = 0, **kw) -> GPT:
    """A random model with well-separated logits (embeddings scaled up), so greedy choices are
    decided by real differences, not by float rounding."""
    torch.manual_seed(seed)
    model = GPT(tiny(**kw)).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(25.0)
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms' gains/biases away from 1/0 so mix-ups show
                p.add_(torch.randn_like(p) * 0.3)
    return model


def record_logits(monkeypatch) -> list[torch.Tensor]:
    """Capture the logits generation hands to the sampler (model.py imports sample_next)."""
    seen: list[torch.Tensor] = []

    def spy(logits, *a, **kw):
        seen.append(logits.detach().clone())
        return sample_next(logits, *a, **kw)

    monkeypatch.setattr(model_mod, "sample_next", spy)
    return seen


# ---- cached generation == uncached generation -----------------------------------------------


@pytest.mark.parametrize("n_kv_head", KV_HEADS)
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
@pytest.mark.parametrize("prompt_len, batch", [(1, 1), (5, 3), (20, 2)])  # 20 = block_size - 4
def test_greedy_cache_equals_no_cache(pos_emb, n_kv_head, prompt_len, batch, monkeypatch):
    model = make(pos_emb=pos_emb, n_kv_head=n_kv_head)
    bs = model.config.block_size
    new = bs - prompt_len  # fill the context exactly
    idx = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    seen = record_logits(monkeypatch)
    with_cache = model.generate(idx, new, temperature=0.0, use_cache=True)
    cached_logits = torch.stack(seen)
    seen.clear()
    without = model.generate(idx, new, temperature=0.0, use_cache=False)
    plain_logits = torch.stack(seen)
    assert with_cache.shape == (batch, bs)
    assert torch.equal(with_cache, without)
    torch.testing.assert_close(cached_logits, plain_logits, atol=1e-4, rtol=1e-4)
    # and both are the argmax of a plain forward over the final sequence (teacher forcing)
    with torch.no_grad():
        full, _ = model(with_cache[:, :-1])
    torch.testing.assert_close(full[:, prompt_len - 1 :], cached_logits.transpose(0, 1), atol=1e-4, rtol=1e-4)
    assert torch.equal(full[:, prompt_len - 1 :].argmax(-1), with_cache[:, prompt_len:])


def test_sampled_generation_cache_equals_no_cache():
    """Same seed, same sampling options: the cache must not change which tokens are drawn."""
    model = make(pos_emb="rope", n_kv_head=2)
    idx = torch.zeros(2, 3, dtype=torch.long)
    outs = [
        model.generate(
            idx, 15, temperature=0.8, top_k=20, top_p=0.9, use_cache=c, generator=torch.Generator().manual_seed(7)
        )
        for c in (True, False)
    ]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("attn", ["sdpa", "manual"])
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_prefill_with_cache_is_causal(pos_emb, attn):
    """A multi-token prefill through the cache gives the uncached forward's logits at *every*
    position (the bug: is_causal=False whenever a cache exists lets position i see the future)."""
    model = make(pos_emb=pos_emb, attn=attn, n_kv_head=2)
    idx = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, _ = model(idx)
        for max_len in (10, model.config.block_size):  # exact fit, and a buffer with empty slots
            cache = model.new_cache(2, max_len=max_len)
            got, _ = model(idx, cache=cache)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            assert cache.pos == 10


@pytest.mark.parametrize("split", [1, 4, 9])
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_chunked_prefill_equals_one_shot(pos_emb, split):
    model = make(pos_emb=pos_emb, n_kv_head=1)
    idx = torch.randint(0, 61, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, _ = model(idx)
        cache = model.new_cache(2)
        a, _ = model(idx[:, :split], cache=cache)
        b, _ = model(idx[:, split:11], cache=cache)  # second chunk, same cache
        c = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(11, 14)]  # then decode steps
    torch.testing.assert_close(torch.cat([a, b, *c], dim=1), ref, atol=1e-5, rtol=1e-5)
    assert cache.pos == 14


def test_cache_reset_reuses_buffer():
    model = make(pos_emb="rope")
    idx = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = model.new_cache(1)
        first, _ = model(idx, cache=cache)
        cache.reset()
        again, _ = model(idx, cache=cache)
    torch.testing.assert_close(first, again)


# ---- bounds: clear errors, never silent ------------------------------------------------------


def test_cache_overflow_is_a_clear_error():
    model = make(pos_emb="rope")
    with torch.no_grad():
        cache = model.new_cache(1, max_len=8)
        model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="overflow"):
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        assert cache.pos == 6  # nothing advanced by the failed call
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)  # still usable up to max_len
        assert cache.pos == 8
        with pytest.raises(ValueError, match="overflow"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    raw = KVCache(1, 1, 1, 4, 2)
    with pytest.raises(ValueError, match="overflow"):
        raw.advance(5)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_cache_past_block_size_is_a_clear_error(pos_emb):
    """Even with a cache buffer longer than the context, positions stop at block_size (no reading
    past the position table / RoPE table)."""
    model = make(pos_emb=pos_emb)
    bs = model.config.block_size
    with torch.no_grad():
        cache = model.new_cache(1, max_len=bs + 8)
        model(torch.zeros(1, bs - 1, dtype=torch.long), cache=cache)
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="block_size"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_generate_with_cache_past_block_size_raises(pos_emb):
    model = make(pos_emb=pos_emb)
    bs = model.config.block_size
    idx = torch.zeros(1, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="block_size"):
        model.generate(idx, bs - 10 + 1, temperature=0.0)
    with pytest.raises(ValueError, match="block_size"):  # a prompt longer than the context
        model.generate(torch.zeros(1, bs + 1, dtype=torch.long), 1, temperature=0.0)
    assert model.generate(idx, bs - 10, temperature=0.0).shape == (1, bs)  # exactly full is fine


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_generate_without_cache_crops_past_block_size(pos_emb, monkeypatch):
    """use_cache=False slides a block_size window (nanoGPT): each step sees the last block_size tokens."""
    model = make(pos_emb=pos_emb, n_kv_head=2)
    bs = model.config.block_size
    idx = torch.randint(0, 61, (2, bs - 3), generator=torch.Generator().manual_seed(5))
    seen = record_logits(monkeypatch)
    out = model.generate(idx, 10, temperature=0.0, use_cache=False)  # ends 7 tokens past block_size
    assert out.shape == (2, bs + 7)
    with torch.no_grad():
        for i, logits in enumerate(seen):
            ctx = out[:, : bs - 3 + i][:, -bs:]
            ref, _ = model(ctx)
            torch.testing.assert_close(logits, ref[:, -1], atol=1e-5, rtol=1e-5)
            assert torch.equal(out[:, bs - 3 + i], ref[:, -1].argmax(-1))


def test_generate_argument_errors_and_mode_restored():
    model = make()
    idx = torch.zeros(1, 2, dtype=torch.long)
    for kw, match in [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ]:
        with pytest.raises(ValueError, match=match):
            model.generate(idx, 3, **kw)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(idx, -1)
    with pytest.raises(ValueError, match="out of range"):
        model.generate(torch.tensor([[61]]), 2)
    assert model.generate(idx, 0).shape == (1, 2)
    model.train()
    model.generate(idx, 2)
    assert model.training  # generate switches to eval (no dropout) and back


def test_temperature_zero_is_greedy_and_top_k_clipped():
    logits = torch.tensor([[0.1, 2.0, 1.9, -3.0], [5.0, 0.0, 0.0, 4.99]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # no sampling at all: always the argmax
        assert sample_next(logits, temperature=0.0, generator=g).flatten().tolist() == [1, 0]
        assert sample_next(logits, temperature=1.0, top_k=1, generator=g).flatten().tolist() == [1, 0]
    # top_k larger than the vocabulary keeps everything instead of crashing
    draws = torch.cat([sample_next(logits, 1.0, top_k=1000, generator=g) for _ in range(200)])
    assert draws.max() < 4 and len(set(draws[0::2].flatten().tolist())) >= 2
    # top_p keeps the smallest set reaching p: here only the two large logits of row 0
    draws = torch.cat([sample_next(logits[:1], 1.0, top_p=0.9, generator=g) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {1, 2}


# ---- cache memory ----------------------------------------------------------------------------


def test_cache_bytes_scale_with_n_kv_head():
    sizes = {}
    for n_kv in (8, 2, 1):
        cfg = GPTConfig(vocab_size=10, block_size=64, n_layer=3, n_head=8, n_embd=64, n_kv_head=n_kv)
        cache = GPT(cfg).new_cache(batch_size=2)
        sizes[n_kv] = cache.nbytes
        # 2 (k and v) * layers * batch * kv heads * positions * head_dim * 4 bytes (float32)
        assert cache.nbytes == 2 * 3 * 2 * n_kv * 64 * 8 * 4
        assert cache.k.shape == (3, 2, n_kv, 64, 8) and cache.v.shape == cache.k.shape
    assert sizes[8] == 4 * sizes[2] == 8 * sizes[1]  # MHA : GQA(2) : MQA = 8 : 2 : 1
    half = KVCache(3, 2, 2, 64, 8, dtype=torch.bfloat16)
    assert half.nbytes == sizes[2] // 2


def test_cache_is_not_built_by_training_forward():
    """Training/eval forwards take no cache: nothing is stored between calls, and a forward
    with targets is unaffected by a previous generation."""
    model = make(pos_emb="rope")
    idx = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a, loss_a = model(idx, targets=idx)
        model.generate(idx[:, :3], 5)
        b, loss_b = model(idx, targets=idx)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(loss_a, loss_b)


# ---- soft-capping ----------------------------------------------------------------------------


def test_softcap_bounds_logits_and_is_identity_for_small_values():
    """cap * tanh(z / cap): |logits| < cap always; ~z when |z| << cap (tanh(u) = u - u^3/3 + ...)."""
    cap = 5.0
    capped = make(logit_softcap=cap)
    plain = make(logit_softcap=None)  # same seed, same weights
    idx = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        z, _ = plain(idx)
        y, _ = capped(idx)
    assert z.abs().max() > 2 * cap  # the test model does produce large logits...
    assert y.abs().max() <= cap  # ...and the cap bounds them
    torch.testing.assert_close(y, cap * torch.tanh(z / cap), atol=1e-5, rtol=1e-5)
    small = z.abs() < 0.5
    assert small.any()
    assert ((y - z)[small].abs() <= (z[small].abs() ** 3) / (3 * cap**2) + 1e-5).all()
    # a huge cap is the identity
    huge = make(logit_softcap=1e6)
    with torch.no_grad():
        torch.testing.assert_close(huge(idx)[0], z, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_softcap_same_in_training_evaluation_and_generation(use_cache, monkeypatch):
    cap = 3.0
    model = make(logit_softcap=cap, pos_emb="rope", n_kv_head=2)
    idx = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(8))
    targets = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(9))
    # training and evaluation: the loss is the cross-entropy of the *capped* logits
    model.train()
    logits, loss = model(idx, targets)
    assert logits.abs().max() <= cap
    ref = F.cross_entropy(logits.float().reshape(-1, 61), targets.reshape(-1))
    torch.testing.assert_close(loss, ref)
    model.eval()
    with torch.no_grad():
        _, eval_loss = model(idx, targets)
        raw = model.lm_head(model.hidden_states(idx)[0])  # the uncapped logits
    torch.testing.assert_close(eval_loss, ref)
    uncapped_loss = F.cross_entropy(raw.reshape(-1, 61), targets.reshape(-1))
    assert (uncapped_loss - eval_loss).abs() > 1e-2  # the cap really changes the loss here
    # generation: the sampler receives exactly forward's capped last-position logits
    seen = record_logits(monkeypatch)
    out = model.generate(idx[:, :4], 6, temperature=0.0, use_cache=use_cache)
    with torch.no_grad():
        full, _ = model(out[:, :-1])
    got = torch.stack(seen, dim=1)  # (B, steps, V)
    assert got.abs().max() <= cap
    torch.testing.assert_close(got, full[:, 3:], atol=1e-5, rtol=1e-5)
    assert torch.equal(full[:, 3:].argmax(-1), out[:, 4:])
