"""Chapter 04: HellaSwag, completion style. On a small sample written here, the evaluator's
per-ending losses and its accuracies (acc: lowest summed loss; acc_norm: lowest mean loss over the
ending's tokens) equal a by-hand computation with transformers' own GPT-2, one unpadded row at a
time."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nanomoe.interop import hf
from nanomoe.interop.hellaswag import (
    Example,
    HellaSwagError,
    ending_losses,
    evaluate_hellaswag,
    load_examples,
    render,
)
from nanomoe.tokenizer import get_tokenizer

BLOCK = 48  # small enough that the long example below is cropped from the left

SAMPLE = [
    {"ctx": "A man is sitting on a roof. He", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ctx": "The cat sat on the mat and", "label": 0,
     "endings": ["purred.", "flew to the moon with a rocket made of cheese.", "sold the house.", "ate a piano."]},
    {"ctx": "She opened the oven, took out the bread and", "label": 2,
     "endings": ["drove it to Paris", "painted it blue", "put it on the table to cool", "it"]},
    {"ctx": " ".join(["A long and winding context that goes on and on about nothing in particular."] * 6) + " Then",
     "label": 1, "endings": ["the end.", "everyone went home after a long day.", "sky.", "blue cars are fast."]},
    {"ctx": "To make tea, boil water,", "label": 1,
     "endings": ["then eat it.", "pour it over the leaves and wait.", "and freeze it.", "sing."]},
]


@pytest.fixture
def setup(tmp_path, tiktoken_cache):
    path = tmp_path / "hellaswag_sample.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in SAMPLE), encoding="utf-8")
    folder = hf.save_random_gpt2(tmp_path / "gpt2", n_layer=2, n_head=2, n_embd=32, block_size=BLOCK)
    from transformers import GPT2LMHeadModel

    ref = GPT2LMHeadModel.from_pretrained(folder).eval()  # transformers' own model: the reference
    return path, hf.from_pretrained(folder), ref, get_tokenizer("gpt2")


def _by_hand(ref, tok, ex: Example) -> tuple[list[float], list[float]]:
    """Summed and mean loss of each ending, one row at a time, position by position."""
    ctx = tok.encode(ex.ctx)
    sums, means = [], []
    for ending in ex.endings:
        end = tok.encode(" " + ending)
        ids = (ctx + end)[-BLOCK:]
        first = max(len(ids) - len(end), 1)  # first ending position that has a token before it
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), dim=-1)
        losses = [-float(logp[t - 1, ids[t]]) for t in range(first, len(ids))]
        sums.append(sum(losses))
        means.append(sum(losses) / len(losses))
    return sums, means


def test_hellaswag_equals_by_hand(setup):
    path, model, ref, tok = setup
    examples = load_examples(path)
    assert len(examples) == 5 and examples[0].label == 3
    assert any(len(tok.encode(ex.ctx)) > BLOCK for ex in examples)  # the crop path is exercised

    correct = correct_norm = 0
    for ex in examples:
        sums, means = _by_hand(ref, tok, ex)
        total, mean = ending_losses(model, render(ex, tok, BLOCK))  # one padded batch of 4 rows
        assert total.tolist() == pytest.approx(sums, rel=1e-4)
        assert mean.tolist() == pytest.approx(means, rel=1e-4)
        correct += min(range(4), key=sums.__getitem__) == ex.label
        correct_norm += min(range(4), key=means.__getitem__) == ex.label

    for per_batch in (1, 2, 16):  # padding across examples changes nothing
        res = evaluate_hellaswag(model, tok, examples, examples_per_batch=per_batch)
        assert (res.n, res.correct, res.correct_norm) == (5, correct, correct_norm)
        assert res.acc == correct / 5 and res.acc_norm == correct_norm / 5


def test_hellaswag_restores_train_mode_and_limits(setup):
    path, model, _, tok = setup
    model.train()
    evaluate_hellaswag(model, tok, load_examples(path, limit=2))
    assert model.training
    assert len(load_examples(path, limit=2)) == 2
    assert math.isnan(evaluate_hellaswag(model, tok, []).acc)


def test_hellaswag_errors_are_one_line(tmp_path):
    with pytest.raises(HellaSwagError, match="prepare_hellaswag"):
        load_examples(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "x", "endings": ["a", "b"], "label": 1}\n{"ctx": "y"}\n', encoding="utf-8")
    with pytest.raises(HellaSwagError, match="line 2"):
        load_examples(bad)
    bad.write_text('{"ctx": "x", "endings": ["a", "b"], "label": 5}\n', encoding="utf-8")
    with pytest.raises(HellaSwagError, match="label 5"):
        load_examples(bad)


def test_for_training_skips_with_a_note(tmp_path, capsys):
    from nanomoe.interop.hellaswag import for_training

    assert for_training("", 0, object()) is None
    assert for_training(str(tmp_path / "missing.jsonl"), 0, object()) is None
    out = capsys.readouterr().out
    assert "HellaSwag is skipped" in out and "prepare_hellaswag" in out
    path = tmp_path / "h.jsonl"
    path.write_text('{"ctx": "x", "endings": ["a", "b"], "label": 1}\n' * 3, encoding="utf-8")
    assert for_training(str(path), 0, None) is None  # no tokenizer: nothing to score with
    assert len(for_training(str(path), 2, object())) == 2
