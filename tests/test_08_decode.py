"""Chapter 08: static KV cache, compiled decode step, weight-only int8 and its checkpoints.

References nobody here wrote: chapter 02's cache and the uncached forward (token for token), the
eager step for the compiled one, the float matmul for the int8 one (within its rounding bound).
No timings here: speed lives in scripts/bench_08_decode.py.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from nanomoe import GPT, GPTConfig
from nanomoe.course.roofline import ExpertCounter, decode_bytes, expected_experts
from nanomoe.quantize import (
    Int8Linear,
    check_int8,
    int8_error_bound,
    int8_matmul,
    load_quantized,
    quantize_int8,
    quantize_model_int8,
    save_quantized,
)
from nanomoe.static_cache import (
    MatvecLinear,
    compile_step,
    decode_step,
    new_static_cache,
    static_generate,
    static_hidden,
    use_matvec_linears,
)

KINDS = {
    "dense": dict(),
    "gqa_rope": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False),
    "moe": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False, n_experts=4, moe_top_k=2),
}


def make(kind: str, seed: int = 0) -> GPT:
    """A tiny random model with well-separated logits (as tests/test_02_cache.py does)."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=64, block_size=24, n_layer=2, n_head=4, n_embd=32, **KINDS[kind])
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(25.0)
    return model


def prompt(batch: int, T: int) -> torch.Tensor:
    return torch.randint(0, 64, (batch, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("batch, T", [(1, 1), (3, 5)])
def test_static_equals_dynamic_equals_no_cache(kind, batch, T):
    model = make(kind)
    new = model.config.block_size - T
    idx = prompt(batch, T)
    static = static_generate(model, idx, new)
    assert torch.equal(static, model.generate(idx, new, temperature=0, use_cache=True))
    assert torch.equal(static, model.generate(idx, new, temperature=0, use_cache=False))


@pytest.mark.parametrize("kind", list(KINDS))
def test_static_logits_equal_full_forward(kind):
    """The prefill + decode steps' logits are those of one plain forward over the whole sequence."""
    model = make(kind)
    idx = prompt(2, 12)
    with torch.no_grad():
        full, _ = model(idx)
        cache = new_static_cache(model, 2, 12)
        h = static_hidden(model, idx[:, :4], torch.arange(4), cache)
        steps = [model.logits(h)]
        for t in range(4, 12):
            steps.append(decode_step(model, idx[:, t : t + 1], torch.tensor([t]), cache).unsqueeze(1))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_smaller_batch_in_a_larger_static_cache():
    model = make("gqa_rope")
    idx = prompt(2, 3)
    cache = new_static_cache(model, 4, 24)
    assert torch.equal(static_generate(model, idx, 10, cache=cache), model.generate(idx, 10, temperature=0))


def test_static_cache_refuses_a_larger_batch_or_too_many_tokens():
    model = make("dense")
    with pytest.raises(ValueError, match="larger than the static cache's batch of 2"):
        static_generate(model, prompt(3, 2), 4, cache=new_static_cache(model, 2, 24))
    with pytest.raises(ValueError, match="does not fit the static cache of 8 positions"):
        static_generate(model, prompt(1, 4), 10, cache=new_static_cache(model, 1, 8))


def _inductor_works() -> bool:
    try:
        from torch._inductor import config  # noqa: F401
    except Exception:
        return False
    return True


@torch.no_grad()
def _step_logits(model: GPT, step, idx: torch.Tensor) -> torch.Tensor:
    """Prefill idx (B, T) eagerly into a fresh static cache, then one `step` at position T: logits (B, V)."""
    T = idx.size(1)
    cache = new_static_cache(model, idx.size(0), 24)
    static_hidden(model, idx, torch.arange(T), cache)
    return step(model, idx[:, -1:], torch.tensor([T]), cache)


@pytest.mark.skipif(not _inductor_works(), reason="torch.compile's inductor backend is not available")
def test_compiled_step_equals_eager_step():
    """One tiny model, two compiles (tens of seconds on a 2-core CPU): same tokens and logits."""
    model = make("gqa_rope")
    idx = prompt(2, 3)
    step = compile_step("cpu")
    try:
        compiled = static_generate(model, idx, 12, step=step)
    except Exception as e:  # no C compiler or a broken toolchain: not this test's business
        pytest.skip(f"torch.compile cannot build kernels here: {type(e).__name__}")
    assert torch.equal(compiled, static_generate(model, idx, 12))
    torch.testing.assert_close(_step_logits(model, step, idx), _step_logits(model, decode_step, idx),
                               atol=1e-5, rtol=1e-5)
    # batch 1 with MatvecLinear: inside the compiled step each one-row product is a reduction
    mv, one, mv_step = use_matvec_linears(copy.deepcopy(model)), idx[:1], compile_step("cpu")
    assert torch.equal(static_generate(mv, one, 12, step=mv_step), static_generate(model, one, 12))
    torch.testing.assert_close(_step_logits(mv, mv_step, one), _step_logits(model, decode_step, one),
                               atol=1e-4, rtol=1e-5)
    b16 = model.to(torch.bfloat16)  # bf16 too (summed in fp32, like the BLAS call it replaces)
    mv16, step16 = use_matvec_linears(copy.deepcopy(b16)), compile_step("cpu")
    torch.testing.assert_close(_step_logits(mv16, step16, one), _step_logits(b16, decode_step, one),
                               atol=0.1, rtol=1e-2)


def test_matvec_linears_share_the_weights_and_change_nothing_eager():
    model = make("dense")
    mv = use_matvec_linears(copy.deepcopy(model))
    linears = [m for m in mv.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, MatvecLinear) for m in linears)
    assert mv.lm_head.weight is mv.transformer.wte.weight  # tied weights stay one tensor
    assert mv.state_dict().keys() == model.state_dict().keys()
    x = prompt(1, 5)
    assert torch.equal(mv(x).logits, model(x).logits)  # eager: the plain nn.Linear path
    lin = linears[0]
    v = torch.randn(1, lin.in_features)
    # the reduction it becomes under compile is the same product
    torch.testing.assert_close((v.unsqueeze(-2) * lin.weight).sum(-1), lin(v), atol=1e-5, rtol=1e-5)


# ---- int8 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matmul_within_its_bound(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    x = torch.randn(5, 64, generator=g)
    w8, s = quantize_int8(w)
    assert w8.dtype == torch.int8 and int(w8.abs().max()) == 127  # each row uses the whole range
    exact = x @ w.t()
    got = int8_matmul(x.to(dtype), w8, s).float()
    bound = int8_error_bound(x, s)
    slack = 0 if dtype == torch.float32 else exact.abs() * 2 ** -7 + 1e-3  # bf16 rounds the result too
    assert ((got - exact).abs() <= bound + slack + 1e-5).all()
    # and it equals the dequantized float reference (same numbers, up to float rounding)
    ref = x @ (w8.float() * s.unsqueeze(1)).t()
    torch.testing.assert_close(int8_matmul(x, w8, s), ref, atol=1e-4, rtol=1e-4)


def test_int8_linear_and_tied_embedding():
    model = make("gqa_rope")
    emb = model.transformer.wte.weight.detach().clone()
    quantize_model_int8(model)
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.transformer.h[0].attn.c_attn, Int8Linear)
    idx = prompt(1, 4)
    rows = model.transformer.wte(idx)  # dequantized rows of the same int8 matrix
    assert ((rows - emb[idx]).abs() <= model.lm_head.scales[idx].unsqueeze(-1) / 2 + 1e-6).all()
    names = [k for k in model.state_dict() if "int8" in k]
    assert "lm_head.weight_int8" in names and not any("wte" in k for k in model.state_dict())  # stored once


def test_int8_model_greedy_mostly_agrees():
    model = make("dense")
    idx = prompt(2, 2)
    ref = model.generate(idx, 20, temperature=0)
    quantize_model_int8(model)
    assert (static_generate(model, idx, 20) == ref).float().mean() > 0.9


def test_quantized_checkpoint_save_and_load(tmp_path):
    model = quantize_model_int8(make("moe"))
    path = tmp_path / "int8.pt"
    save_quantized(model, path)
    loaded = load_quantized(path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    idx = prompt(1, 3)
    assert torch.equal(static_generate(loaded, idx, 10), static_generate(model, idx, 10))
    torch.save({"not": "int8"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an int8 checkpoint"):
        load_quantized(tmp_path / "other.pt")


def test_int8_refuses_devices_and_dtypes_without_a_path():
    check_int8("cpu", torch.bfloat16)
    check_int8("cpu", torch.float32)
    with pytest.raises(ValueError, match="no fast CPU kernel"):
        check_int8("cpu", torch.float16)
    with pytest.raises(ValueError, match="cpu and cuda only"):
        check_int8("mps", torch.float32)


# ---- roofline bookkeeping -------------------------------------------------------------------------


def test_decode_bytes_counts_tied_head_once_and_topk_experts():
    dense = make("dense")
    cfg = dense.config
    b = decode_bytes(dense, batch=1)
    table = cfg.vocab_size * cfg.n_embd * 4
    everything = sum(p.numel() * 4 for p in dense.parameters())  # tied: parameters() lists it once
    assert b["weights"] == everything - cfg.block_size * cfg.n_embd * 4  # all but the position table
    assert b["rows"] == 2 * cfg.n_embd * 4  # one wte row + one wpe row
    assert table < b["weights"]
    moe = make("moe")
    full, one = decode_bytes(moe, 1, experts=4)["weights"], decode_bytes(moe, 1, experts=2)["weights"]
    per_expert = sum(p.numel() * 4 for p in moe.transformer.h[0].mlp.experts.parameters()) / 4
    assert full - one == pytest.approx(2 * per_expert * moe.config.n_layer)
    assert expected_experts(8, 2, 1) == pytest.approx(2) and expected_experts(8, 2, 64) > 7.9


def test_expert_counter_sees_topk_at_batch_one():
    model = make("moe")
    counter = ExpertCounter(model)
    static_generate(model, prompt(1, 1), 5)
    assert counter.counts and all(c == 2 for c in counter.counts[model.config.n_layer:])  # decode steps: k of E
    counter.remove()


# ---- scripts.generate flags ---------------------------------------------------------------------------


def _generate(*args):
    return subprocess.run([sys.executable, "-m", "scripts.generate", *args], capture_output=True, text=True,
                          timeout=120)


def test_generate_bad_flags_one_line(tmp_path):
    r = _generate(str(tmp_path / "missing.pt"), "Oi", "--int8", "--dtype=float16", "--device=cpu")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "generate: error:" in r.stderr and "float16" in r.stderr
    r = _generate(str(tmp_path / "missing.pt"), "Oi", "--int8", "--no-static")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "static KV cache" in r.stderr


def test_bench_quick_runs():
    """The benchmark's code path (transformers side included) at a tiny shape; its figures are not checked."""
    r = subprocess.run([sys.executable, "-m", "scripts.bench_08_decode", "--quick"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "best nanomoe fp32 / transformers" in r.stdout and "MoE per-token time / dense twin" in r.stdout
