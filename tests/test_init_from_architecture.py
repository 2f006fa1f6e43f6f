"""`--init_from` a pretrained model takes its architecture (nanoGPT's init_from='gpt2') unless the run
sets an architecture field; a tiny random transformers GPT-2 saved to a temp folder stands in for
the hub (no network). And "gpt2" has one tokenizer path, with the offline fallback."""

import pytest
import torch

from nanomoe import preset
from nanomoe.interop import hf
from nanomoe.interop.init_from import init_model


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    return hf.save_random_gpt2(tmp_path_factory.mktemp("g") / "tiny_gpt2", n_layer=3, n_head=4, n_embd=64,
                               block_size=64, vocab_size=100)


def test_no_size_set_takes_the_source_architecture(tiny_gpt2, capsys):
    run = preset("modern", vocab_size=100)  # the run's default architecture (a modern model, 128 wide)
    model, report = init_model(str(tiny_gpt2), run, explicit={"dropout"})
    assert report is None and "takes the source's" in capsys.readouterr().out
    src = hf.from_pretrained(tiny_gpt2)
    assert (model.config.n_layer, model.config.n_embd, model.config.pos_emb) == (3, 64, "learned")
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())  # every tensor
    x = torch.randint(0, 100, (2, 16))
    torch.testing.assert_close(model.eval()(x).logits, src.eval()(x).logits, rtol=0, atol=0)


def test_block_size_alone_keeps_the_source_architecture(tiny_gpt2):
    model, report = init_model(str(tiny_gpt2), preset("modern", vocab_size=100, block_size=32),
                               explicit={"block_size"}, verbose=False)
    assert report is None and model.config.n_layer == 3 and model.config.block_size == 32  # wpe cropped


def test_explicit_sizes_go_through_the_transfer(tiny_gpt2):
    run = preset("modern", vocab_size=100, n_layer=2, n_head=4, n_embd=64, block_size=32)
    model, report = init_model(str(tiny_gpt2), run, explicit={"n_layer", "n_head", "n_embd"}, verbose=False)
    assert report is not None and model.config.n_layer == 2  # chapter 05's partial transfer, as before
    old, old_report = init_model(str(tiny_gpt2), run, verbose=False)  # explicit=None: the run decides
    assert old.config == model.config and str(old_report) == str(report)


def test_gpt2_tokenizer_has_one_path():
    from nanomoe import tokenizer as T

    try:
        a = T.gpt2_tokenizer()
    except T.TokenizerError:
        pytest.skip("no tiktoken cache and no $NANOMOE_DATA/gpt2 here")
    for b in (T.get_tokenizer("gpt2"), T.load_tokenizer({"name": "gpt2"})):
        assert b.encode("Capítulo I") == a.encode("Capítulo I") and b.vocab_size == 50257
