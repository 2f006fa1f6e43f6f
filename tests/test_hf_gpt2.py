"""GPT-2 weights <-> transformers.GPT2LMHeadModel, exactly (chapter 05). Offline: tiny random
GPT-2 models are saved to temp folders with save_pretrained; the hub is never used."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel  # noqa: E402

from nanomoe import GPT  # noqa: E402
from nanomoe.config import gpt2_config, modern_config  # noqa: E402
from nanomoe.interop.hf import (  # noqa: E402
    HFConversionError,
    export_hf,
    from_hf,
    from_pretrained,
    hf_family,
    load_hf,
    to_hf,
)

V = 96


def tiny_hf_gpt2(seed: int = 0, **kw) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, n_positions=48, n_embd=32, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None,
               layer_norm_epsilon=1e-5)
    model = GPT2LMHeadModel(GPT2Config(**{**cfg, **kw})).eval()
    # HF initializes biases and LayerNorm parameters to 0/1: randomize them so a bias or gain that
    # is dropped, transposed or swapped changes the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    return model


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    tiny_hf_gpt2().save_pretrained(folder)
    return folder


def ids(n: int = 20, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def test_from_pretrained_folder_equal_logits_and_preset(hf_folder):
    ref = GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    model = from_pretrained(hf_folder)
    cfg = model.config
    assert (cfg.pos_emb, cfg.norm, cfg.mlp, cfg.bias, cfg.tie_embeddings) == (
        "learned", "layernorm", "gelu", True, True
    )
    assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd) == (V, 48, 2, 4, 32)
    assert cfg.mlp_hidden is None and cfg.hidden_dim == 128  # 4 * n_embd, the preset rule
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied after loading
    x = ids()
    assert max_diff(model(x)[0], ref(x).logits) < 1e-5


@torch.no_grad()
def test_conv1d_transposed_not_just_reshaped(hf_folder):
    ref = GPT2LMHeadModel.from_pretrained(hf_folder)
    model = from_pretrained(hf_folder)
    w_hf = ref.transformer.h[0].mlp.c_fc.weight  # Conv1D: (in=32, out=128)
    w = model.transformer.h[0].mlp.c_fc.weight  # Linear: (out=128, in=32)
    assert tuple(w_hf.shape) == (32, 128) and tuple(w.shape) == (128, 32)
    assert torch.equal(w, w_hf.t())


@torch.no_grad()
def test_greedy_generation_equals_hf_generate(hf_folder):
    ref = GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    model = from_pretrained(hf_folder)
    prompt = ids(n=5, b=1, seed=3)
    out_hf = ref.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0,
                          attention_mask=torch.ones_like(prompt))
    for use_cache in (True, False):
        out = model.generate(prompt, 16, temperature=0.0, use_cache=use_cache)
        assert out.tolist() == out_hf.tolist()


@torch.no_grad()
def test_block_size_override_crops_position_table(hf_folder):
    ref = GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    model = from_pretrained(hf_folder, block_size=16, dropout=0.1)
    assert model.config.block_size == 16 and model.config.dropout == 0.1
    assert tuple(model.transformer.wpe.weight.shape) == (16, 32)
    model.eval()
    x = ids(n=16)
    assert max_diff(model(x)[0], ref(x).logits) < 1e-5
    with pytest.raises(HFConversionError, match="block_size=64 exceeds the 48"):
        from_pretrained(hf_folder, block_size=64)
    with pytest.raises(HFConversionError, match="n_layer"):
        from_pretrained(hf_folder, n_layer=1)  # architecture fields are not overridable


@torch.no_grad()
@pytest.mark.parametrize("tie", [True, False])
def test_to_hf_and_round_trip(tie):
    torch.manual_seed(0)
    model = GPT(gpt2_config(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=32, tie_embeddings=tie)).eval()
    for block in model.transformer.h:  # non-trivial gains and biases
        for p in (block.ln_1.weight, block.ln_2.bias, block.attn.c_attn.bias, block.mlp.c_fc.bias):
            p.normal_(0.5, 0.2)
    assert hf_family(model.config) == "gpt2"
    hf = to_hf(model)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert hf.config.tie_word_embeddings == tie
    x = ids(n=16)
    assert max_diff(model(x)[0], hf(x).logits) < 1e-5
    back = from_hf(hf)
    assert back.config == model.config
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


@torch.no_grad()
def test_bias_false_exports_zero_biases():
    torch.manual_seed(0)
    model = GPT(gpt2_config(vocab_size=V, block_size=32, n_layer=1, n_head=2, n_embd=16, bias=False)).eval()
    hf = to_hf(model)
    assert torch.count_nonzero(hf.transformer.h[0].attn.c_attn.bias) == 0
    x = ids(n=8)
    assert max_diff(model(x)[0], hf(x).logits) < 1e-5


@torch.no_grad()
def test_export_folder_loads_with_automodel_and_back(tmp_path, tiktoken_cache):
    from nanomoe.tokenizer import get_tokenizer

    tok = get_tokenizer("gpt2")
    torch.manual_seed(0)
    model = GPT(
        gpt2_config(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16, dropout=0.1)
    ).eval()
    folder = export_hf(model, tmp_path / "export", tokenizer=tok)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert json.loads((folder / "nanomoe_tokenizer.json").read_text())["name"] == "gpt2"
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.config.eos_token_id == tok.eot
    x = torch.tensor([tok.encode("Capitu tinha olhos de ressaca.")])
    assert max_diff(model(x)[0], hf(x).logits) < 1e-5
    back, tok2 = load_hf(folder)
    assert back.config == model.config  # runtime fields (dropout) restored from nanomoe_config.json
    assert tok2 is not None and tok2.encode("olhos de ressaca") == tok.encode("olhos de ressaca")
    assert max_diff(back(x)[0], model(x)[0]) == 0.0
    # the HF tokenizer files written from tiktoken's cache give the same ids
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder)("olhos de ressaca")["input_ids"] == tok.encode("olhos de ressaca")


def test_export_bpe_tokenizer_round_trip(tmp_path):
    from nanomoe.tokenizer import BPETokenizer

    text = "Capitu tinha olhos de ressaca, olhos de cigana oblíqua e dissimulada. " * 20
    tok = BPETokenizer.train([text], vocab_size=300)
    model = GPT(modern_config(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    folder = export_hf(model, tmp_path / "bpe", tokenizer=tok)
    _, tok2 = load_hf(folder)
    assert type(tok2).__name__ == "BPETokenizer"
    assert tok2.encode("olhos de cigana") == tok.encode("olhos de cigana")


def test_missing_tensor_gives_clear_error(hf_folder, tmp_path):
    sd = load_file(hf_folder / "model.safetensors")
    del sd["transformer.h.1.attn.c_attn.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((hf_folder / "config.json").read_text())
    with pytest.raises(HFConversionError, match=r"missing tensor transformer\.h\.1\.attn\.c_attn\.weight "
                                                r"\(expected shape \(32, 96\)\)"):
        load_hf(tmp_path)


def test_wrong_shape_gives_clear_error(hf_folder, tmp_path):
    sd = load_file(hf_folder / "model.safetensors")
    sd["transformer.h.0.mlp.c_proj.weight"] = torch.zeros(100, 32)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((hf_folder / "config.json").read_text())
    with pytest.raises(HFConversionError, match=r"transformer\.h\.0\.mlp\.c_proj\.weight has shape \(100, 32\) "
                                                r"but config\.json expects \(128, 32\)"):
        from_pretrained(tmp_path)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(HFConversionError, match="no config.json"):
        load_hf(tmp_path)
    with pytest.raises(HFConversionError, match="not a folder"):
        load_hf(tmp_path / "nope")


def test_hub_name_offline_says_internet(tmp_path):
    with pytest.raises(HFConversionError, match="needs internet"):
        from_pretrained("gpt2", cache_dir=str(tmp_path), local_files_only=True)


def test_unsupported_configs_name_the_switch():
    with pytest.raises(HFConversionError, match="logit_softcap"):
        to_hf(GPT(gpt2_config(vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=16, logit_softcap=30.0)))
    # learned positions + RMSNorm: neither GPT-2 (norm) nor Llama (pos_emb)
    mixed = gpt2_config(vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=16, norm="rmsnorm")
    with pytest.raises(HFConversionError, match=r"as gpt2: norm='rmsnorm'.*\n.*as llama: pos_emb='learned'"):
        hf_family(mixed)
    with pytest.raises(HFConversionError, match="n_kv_head=1"):
        to_hf(GPT(gpt2_config(vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=16, n_kv_head=1)).eval())
    with pytest.raises(HFConversionError, match="activation_function='relu'"):
        from_hf(tiny_hf_gpt2(activation_function="relu"))


@torch.no_grad()
def test_exact_gelu_maps_to_hf_gelu_both_ways():
    """gelu_approximate="none" (nanoGPT's exact GELU) exports as activation_function="gelu" with
    equal logits, differs from the tanh model on the same weights, and comes back unchanged."""
    torch.manual_seed(0)
    cfg = gpt2_config(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=32, gelu_approximate="none")
    model = GPT(cfg).eval()
    for block in model.transformer.h:  # large pre-activations, where the two GELUs differ most
        block.mlp.c_fc.weight.mul_(50)
    hf = to_hf(model)
    assert hf.config.activation_function == "gelu"
    x = ids(n=16)
    assert max_diff(model(x)[0], hf(x).logits) < 1e-5
    tanh_model = GPT(cfg.replace(gelu_approximate="tanh")).eval()
    tanh_model.load_state_dict(model.state_dict())
    z = torch.randn(4, 32) * 3  # the switch really changes the function (GELUs differ up to ~1e-3)
    mlp, tanh_mlp = model.transformer.h[0].mlp, tanh_model.transformer.h[0].mlp
    assert max_diff(mlp(z), tanh_mlp(z)) > 1e-5  # vs < 1e-6 for the HF export above
    assert max_diff(model(x)[0], tanh_model(x)[0]) > 0
    assert from_hf(hf).config.gelu_approximate == "none"


def test_gelu_approximate_is_validated():
    with pytest.raises(ValueError, match="gelu_approximate"):
        gpt2_config(gelu_approximate="erf")
