"""Package-level tests of `GPT` (chapter 01 contract): shapes, initial loss, weight tying, the -1
ignore index, greedy/cropped generation, clear errors and the optimizer's parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nanomoe import GPT, GPTConfig, get_tokenizer, preset
from nanomoe.tokenizer import TokenizerError

TINY = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
PRESETS = ["gpt2", "modern", "moe"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one CPU thread is faster, and much faster when other processes share the CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(name: str = "gpt2", **kw) -> GPT:
    if name == "moe":
        pytest.importorskip("nanomoe.moe")
        kw = {"n_experts": 4, **kw}
    torch.manual_seed(0)
    return GPT(preset(name, **{**TINY, **kw}))


def random_targets(idx: torch.Tensor, vocab: int) -> torch.Tensor:
    """Targets that never equal the input token at the same position (with tied embeddings an
    untrained model slightly favours repeating its input, which would bias the loss)."""
    return (idx + torch.randint(1, vocab, idx.shape)) % vocab


@pytest.mark.parametrize("name", PRESETS)
def test_shapes(name):
    model = tiny(name)
    idx = torch.randint(0, TINY["vocab_size"], (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, TINY["vocab_size"])
    assert loss is None
    out = model(idx, random_targets(idx, TINY["vocab_size"]))
    logits, loss = out
    assert logits.shape == (3, 17, TINY["vocab_size"])
    assert loss.shape == () and torch.isfinite(loss)
    assert out.ce_loss.shape == ()


@pytest.mark.parametrize("name", PRESETS)
def test_initial_loss_is_ln_vocab(name):
    """At init the logits are ~0, so the prediction is ~uniform: loss ~ ln(V), perplexity ~ V."""
    V = 500
    model = tiny(name, vocab_size=V).eval()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (4, 32), generator=g)
    targets = (idx + torch.randint(1, V, idx.shape, generator=g)) % V
    with torch.no_grad():
        ce = model(idx, targets).ce_loss.item()
    assert abs(ce - math.log(V)) < 0.05, (ce, math.log(V))
    assert 0.95 * V < math.exp(ce) < 1.05 * V


def test_weight_tying_same_tensor_and_grads_flow():
    model = tiny("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    n_unique = len({id(p) for p in model.parameters()})
    assert n_unique == len(list(model.parameters()))  # the shared matrix is counted once
    # tokens 0..9 appear in the input, tokens >= 10 only as possible outputs: their embedding
    # rows get gradient only through lm_head, so a non-zero gradient there proves the tie.
    idx = torch.randint(0, 10, (2, 16))
    _, loss = model(idx, random_targets(idx, TINY["vocab_size"]))
    loss.backward()
    grad = model.transformer.wte.weight.grad
    assert grad is not None
    assert grad[10:].abs().sum() > 0
    assert model.lm_head.weight.grad is grad  # one tensor, one gradient


def test_untied_embeddings_are_separate():
    model = tiny("gpt2", tie_embeddings=False)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.num_params(non_embedding=False) == sum(p.numel() for p in model.parameters())


def test_ignore_index_minus_one():
    """Targets equal to -1 are left out of the mean: same value as the cross-entropy computed by
    hand over the other positions."""
    model = tiny("gpt2")
    V = TINY["vocab_size"]
    idx = torch.randint(0, V, (2, 12))
    targets = random_targets(idx, V)
    targets[:, -1] = -1  # the blog's trick: no next token after the last one
    targets[0, 3] = -1
    logits, loss = model(idx, targets)
    keep = targets != -1
    logp = F.log_softmax(logits.float(), dim=-1)
    by_hand = -logp[keep].gather(1, targets[keep].unsqueeze(1)).mean()
    assert keep.sum() == 2 * 12 - 3
    assert torch.allclose(loss, by_hand, rtol=1e-5, atol=1e-6), (loss, by_hand)
    # and it differs from the loss that (wrongly) counts the ignored positions as token 0
    filled = targets.clone()
    filled[~keep] = 0
    _, loss_filled = model(idx, filled)
    assert not torch.allclose(loss, loss_filled)


@pytest.mark.parametrize("name", ["gpt2", "modern"])
def test_greedy_generation_is_deterministic(name):
    model = tiny(name)
    prompt = torch.randint(0, TINY["vocab_size"], (2, 5))
    a = model.generate(prompt, 12, temperature=0.0)
    b = model.generate(prompt, 12, temperature=1.0, top_k=1)
    c = model.generate(prompt, 12, temperature=0.0)
    assert a.shape == (2, 17)
    assert torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b) and torch.equal(a, c)
    # greedy = argmax of the uncached forward at every step
    seq = prompt
    for _ in range(12):
        logits, _ = model(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(a, seq)
    # the KV cache gives the same tokens as re-running the whole sequence
    assert torch.equal(model.generate(prompt, 12, temperature=0.0, use_cache=False), a)


def test_generation_crops_context_to_block_size():
    model = tiny("gpt2", block_size=8)
    V, bs = TINY["vocab_size"], 8
    tail = torch.randint(0, V, (1, bs))
    p1 = torch.cat([torch.randint(0, V, (1, 7)), tail], dim=1)  # 15 tokens > block_size
    p2 = torch.cat([torch.randint(0, V, (1, 3)), tail], dim=1)  # different head, same last 8
    out1 = model.generate(p1, 10, temperature=0.0, use_cache=False)
    out2 = model.generate(p2, 10, temperature=0.0, use_cache=False)
    assert out1.shape == (1, 25)
    assert torch.equal(out1[:, -10:], out2[:, -10:])  # only the last block_size tokens matter
    with pytest.raises(ValueError, match="block_size"):
        model.generate(p1, 2, temperature=0.0, use_cache=True)  # the cache cannot hold them: clear error


def test_error_n_embd_not_divisible_by_n_head():
    with pytest.raises(ValueError, match=r"n_embd \(30\) must be divisible by n_head \(4\)"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=4, n_embd=30)


def test_error_sequence_longer_than_block_size():
    model = tiny("gpt2", block_size=8)
    with pytest.raises(ValueError, match=r"sequence of 9 tokens exceeds block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("bad", [-1, TINY["vocab_size"], TINY["vocab_size"] + 5])
def test_error_token_id_out_of_range(bad):
    model = tiny("gpt2")
    idx = torch.zeros(1, 5, dtype=torch.long)
    idx[0, 2] = bad
    with pytest.raises(ValueError, match=rf"token id {bad} is out of range \[0, {TINY['vocab_size']}\)"):
        model.generate(idx, 1)  # checked where ids enter, not in the forward (no host sync there)


def test_error_empty_text_for_char_tokenizer():
    with pytest.raises(ValueError, match="empty text"):
        get_tokenizer("char", text="")


def test_error_unknown_tokenizer():
    with pytest.raises(TokenizerError, match="unknown tokenizer 'wordpiece'.*char"):
        get_tokenizer("wordpiece", text="abc")
    assert issubclass(TokenizerError, ValueError)


def test_error_targets_shape():
    model = tiny("gpt2")
    idx = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="targets shape"):
        model(idx, torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("name", ["gpt2", "modern"])
def test_configure_optimizers_decays_exactly_the_matrices(name):
    model = tiny(name)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type="cpu")
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    params = list(model.parameters())
    assert {id(p) for p in decay["params"]} == {id(p) for p in params if p.dim() >= 2}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in params if p.dim() < 2}
    # every parameter exactly once (the tied matrix is not duplicated)
    all_ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(params)
    assert any(p is model.transformer.wte.weight for p in decay["params"])
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["betas"] == (0.9, 0.95)
