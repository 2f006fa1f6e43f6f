"""Modern dense preset <-> transformers.LlamaForCausalLM, exactly, both ways (chapters 02 and 05).
Offline: tiny random models only."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from nanomoe import GPT  # noqa: E402
from nanomoe.config import modern_config  # noqa: E402
from nanomoe.interop.hf import HFConversionError, export_hf, from_hf, hf_family, llama_hf_config, load_hf, to_hf  # noqa: E402

V = 80


def tiny(n_kv_head: int, tie: bool = True, **kw) -> GPT:
    torch.manual_seed(n_kv_head + 10 * tie)
    cfg = modern_config(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=32,
                        tie_embeddings=tie, rope_theta=5e5, norm_eps=1e-6, **kw)
    model = GPT(cfg).eval()
    with torch.no_grad():  # non-trivial RMSNorm gains so a swapped norm shows in the logits
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    return model


def ids(n: int = 24, b: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(7))


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


KV = [pytest.param(4, id="MHA"), pytest.param(2, id="GQA"), pytest.param(1, id="MQA")]


@torch.no_grad()
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("n_kv_head", KV)
def test_to_llama_equal_logits_and_round_trip(n_kv_head, tie):
    model = tiny(n_kv_head, tie)
    assert hf_family(model.config) == "llama"
    hf = to_hf(model)
    c = hf.config
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert (c.num_key_value_heads, c.tie_word_embeddings, c.rms_norm_eps) == (n_kv_head, tie, 1e-6)
    assert c.rope_parameters["rope_theta"] == 5e5 and not c.attention_bias and not c.mlp_bias
    assert c.intermediate_size == model.config.hidden_dim and c.head_dim == 8
    x = ids()
    assert max_diff(model(x)[0], hf(x).logits) < 1e-5
    back = from_hf(hf)
    assert back.config == model.config
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert (back.lm_head.weight is back.transformer.wte.weight) == tie


@torch.no_grad()
@pytest.mark.parametrize("n_kv_head", KV)
def test_from_random_llama_equal_logits(n_kv_head):
    torch.manual_seed(1)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_head, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4}, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None,
    )).eval()
    for name, p in hf.named_parameters():
        if name.endswith("norm.weight"):
            p.normal_(1.0, 0.2)
    model = from_hf(hf)
    assert model.config.kv_heads == n_kv_head and model.config.mlp_hidden == 72 and model.config.block_size == 64
    x = ids(n=40)
    assert max_diff(model(x)[0], hf(x).logits) < 1e-5
    # q/k/v rows of the fused c_attn are [q heads | k heads | v heads]
    D = 12
    c_attn = model.transformer.h[1].attn.c_attn.weight
    assert torch.equal(c_attn[4 * D : (4 + n_kv_head) * D], hf.model.layers[1].self_attn.k_proj.weight)


@torch.no_grad()
def test_bias_maps_to_attention_and_mlp_bias():
    model = tiny(2, bias=True)
    hf = to_hf(model)
    assert hf.config.attention_bias and hf.config.mlp_bias
    x = ids()
    assert max_diff(model(x)[0], hf(x).logits) < 1e-5
    assert from_hf(hf).config == model.config


@torch.no_grad()
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_export_folder_automodel_and_load_back(tmp_path, tie):
    model = tiny(2, tie)
    folder = export_hf(model, tmp_path / "llama")
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = ids()
    assert max_diff(model(x)[0], hf(x).logits) < 1e-5
    back, tok = load_hf(folder)
    assert tok is None and back.config == model.config
    assert max_diff(back(x)[0], model(x)[0]) == 0.0


@torch.no_grad()
def test_greedy_generation_matches_hf_llama():
    model = tiny(2)
    hf = to_hf(model)
    prompt = ids(n=4, b=1)
    out_hf = hf.generate(prompt, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert model.generate(prompt, 20, temperature=0.0).tolist() == out_hf.tolist()


def test_incompatible_switches_are_named():
    with pytest.raises(HFConversionError, match="logit_softcap=30.0"):
        to_hf(tiny(2, logit_softcap=30.0))
    with pytest.raises(HFConversionError, match="as llama: pos_emb='learned'"):
        hf_family(modern_config(vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=16, pos_emb="learned"))
    with pytest.raises(HFConversionError, match="mlp='gelu'"):
        llama_hf_config(modern_config(vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=16, mlp="gelu"))
    llama3 = LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        bos_token_id=None, eos_token_id=None,
    ))
    with pytest.raises(HFConversionError, match="rope_type='llama3'"):
        from_hf(llama3)


@torch.no_grad()
def test_compiled_model_exports_without_orig_mod_prefix(tmp_path):
    """torch.compile wraps the model in a module whose parameters are named `_orig_mod.*`
    (checkpoints saved from it carry the prefix): export unwraps it. The wrapper is mimicked
    here so the test does not pay for importing torch._dynamo."""
    model = tiny(2)

    class Compiled(torch.nn.Module):  # the structure of torch._dynamo's OptimizedModule
        def __init__(self, mod):
            super().__init__()
            self._orig_mod = mod

    compiled = Compiled(model)
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    folder = export_hf(compiled, tmp_path / "compiled")
    from safetensors.torch import load_file

    keys = load_file(folder / "model.safetensors").keys()
    assert keys and not any("_orig_mod" in k for k in keys)
    back, _ = load_hf(folder)
    x = ids()
    assert max_diff(back(x)[0], model(x)[0]) == 0.0
