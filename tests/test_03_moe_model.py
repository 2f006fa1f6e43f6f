"""Chapter 03: MoE inside the GPT — causality with capacity, generation, memorization."""

import pytest
import torch

from nanomoe import GPT, moe_config
from nanomoe.resources import paragraph
from nanomoe.tokenizer import get_tokenizer


def tiny(**kw):
    base = dict(vocab_size=48, block_size=64, n_layer=2, n_head=4, n_embd=32, n_experts=4, moe_top_k=2)
    return moe_config(**{**base, **kw})


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_capacity_has_no_causality_leak(impl):
    """Changing later tokens (or other sequences of the batch) never changes earlier outputs."""
    torch.manual_seed(0)
    model = GPT(tiny(moe_capacity_factor=0.5, moe_min_capacity=1, moe_impl=impl)).eval()
    T, cut = 48, 24
    a = torch.randint(0, 48, (2, T))
    b = a.clone()
    b[0, cut:] = torch.randint(0, 48, (T - cut,))  # new future for sequence 0
    b[1] = torch.randint(0, 48, (T,))  # a different neighbour in the batch
    out_a = model(a)
    la = out_a.logits
    dropped = sum(int(st["dropped"]) for st in out_a.moe_stats)
    assert dropped > 0  # capacity really drops tokens here, so the test can fail
    lb, _ = model(b)
    torch.testing.assert_close(lb[0, :cut], la[0, :cut], rtol=0, atol=0)
    lone, _ = model(a[:1])  # the same sequence alone
    torch.testing.assert_close(lone[0], la[0], rtol=1e-5, atol=1e-5)


def test_one_token_prompt_never_dropped_at_generation():
    torch.manual_seed(0)
    model = GPT(tiny(n_experts=8, moe_capacity_factor=0.01, moe_min_capacity=1)).eval()
    prompt = model(torch.randint(0, 48, (3, 1)))
    assert all(int(st["dropped"]) == 0 for st in prompt.moe_stats)
    out = model.generate(torch.zeros(3, 1, dtype=torch.long), 5, temperature=0)
    assert out.shape == (3, 6)
    step = model(out[:, -1:])  # a 1-token decode step
    assert all(int(st["dropped"]) == 0 for st in step.moe_stats)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_kv_cache_generation_equals_uncached(impl):
    torch.manual_seed(0)
    model = GPT(tiny(moe_impl=impl, moe_every=1, n_shared_experts=1)).eval()
    prompt = torch.randint(0, 48, (2, 7))
    cached = model.generate(prompt, 20, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    # and the logits themselves: prefill + one-token decode steps vs one full pass
    full, _ = model(cached)
    cache = model.new_cache(2, cached.size(1))
    h, _, _ = model.hidden_states(cached[:, :7], cache)
    steps = [model.logits(h)]
    for t in range(7, cached.size(1)):
        h, _, _ = model.hidden_states(cached[:, t : t + 1], cache)
        steps.append(model.logits(h))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def _paragraph() -> str:
    return paragraph().strip()  # chapter 01's paragraph, shipped in the package


def test_moe_memorizes_the_paragraph():
    """The original blog MoE could not learn; this one memorizes the chapter-01 paragraph."""
    text = _paragraph()
    tok = get_tokenizer("char", text=text)
    ids = torch.tensor(tok.encode(text))
    T = len(ids) - 1
    torch.manual_seed(0)
    cfg = moe_config(vocab_size=tok.vocab_size, block_size=T + 1, n_layer=2, n_head=4, n_embd=64,
                     n_experts=4, moe_top_k=2)
    model = GPT(cfg)
    opt = model.configure_optimizers(weight_decay=0.0, learning_rate=3e-3)
    x, y = ids[:-1].unsqueeze(0), ids[1:].unsqueeze(0)
    for _ in range(400):  # ~250 full-batch steps on this seed
        res = model(x, y)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        opt.step()
        if res.ce_loss.item() < 0.01:
            break
    assert res.ce_loss.item() < 0.01
    out = model.generate(ids[:1].unsqueeze(0), T, temperature=0)
    assert tok.decode(out[0].tolist()) == text
    loads = torch.stack([st["load"] for st in res.moe_stats])
    assert (loads > 0).sum() >= 2 * cfg.n_layer  # the router uses more than one expert per layer
