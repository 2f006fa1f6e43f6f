"""Chapter 04: the training loop's pieces — LR schedule, gradient accumulation, precision choice,
fp16 + GradScaler, NaN stop, validation = cross-entropy only, run configs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nanomoe import GPT, preset
from nanomoe.data import BatchLoader
from nanomoe.device import pick_precision
from nanomoe.training.checkpoint import load_checkpoint
from nanomoe.training.train import TrainConfig, evaluate, get_lr, train


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(n=6000, vocab=32, seed=0):
    """A learnable stream: one random 53-token "sentence" repeated, 10% of tokens replaced by noise.
    Different seeds give different noise on the same sentence (a validation set of the same text)."""
    base = np.tile(np.random.default_rng(0).integers(0, vocab, 53), n // 53 + 1)[:n]
    rng = np.random.default_rng(seed + 1)
    return np.where(rng.random(n) < 0.1, rng.integers(0, vocab, n), base).astype(np.uint16)


def _model(moe=False, **kw):
    torch.manual_seed(0)
    extra = dict(n_experts=4, moe_top_k=2) if moe else {}
    return GPT(preset("modern", vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, **{**extra, **kw}))


# ---- learning-rate schedule ------------------------------------------------------------------------


def test_lr_schedule_matches_nanogpt():
    t = TrainConfig(max_steps=2000, lr=1e-3, min_lr=1e-4, warmup_steps=100)

    def nanogpt(it, lr=1e-3, min_lr=1e-4, warmup=100, decay=2000):  # nanoGPT train.py get_lr
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > decay:
            return min_lr
        ratio = (it - warmup) / (decay - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    for it in (0, 1, 50, 99, 100, 101, 500, 1050, 1999, 2000, 2500):
        assert get_lr(it, t) == pytest.approx(nanogpt(it), rel=1e-12)
    lrs = [get_lr(i, t) for i in range(2000)]
    assert all(a < b for a, b in zip(lrs[:100], lrs[1:101]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))  # then decays
    assert max(lrs) == pytest.approx(1e-3, rel=1e-3) and lrs[-1] == pytest.approx(1e-4, rel=1e-3)
    # decay_steps decouples the schedule from max_steps (what exact resume tests rely on)
    assert get_lr(30, TrainConfig(max_steps=50, decay_steps=200)) == get_lr(30, TrainConfig(max_steps=200))


def test_train_config_errors_are_clear():
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="unknown field"):
        TrainConfig.from_dict({"max_step": 3})


# ---- one optimizer step by hand ----------------------------------------------------------------------


def test_grad_accumulation_equals_one_big_batch():
    """grad_accum=2 x batch 4 == one batch of the same 8 rows: each micro-loss is divided by the number
    of micro-batches and no row is thrown away."""
    data = _data()
    tcfg = TrainConfig(max_steps=1, batch_size=4, grad_accum=2, warmup_steps=0, lr=1e-2, min_lr=1e-2, eval_iters=0,
                       grad_clip=0.0, log_interval=1)
    model = _model()
    res = train(model, data, None, tcfg, progress=False)

    ref = _model()
    loader = BatchLoader(data, 4, 16, seed=tcfg.seed)
    (x1, y1), (x2, y2) = loader.next_batch(), loader.next_batch()
    _, loss = ref(torch.cat([x1, x2]), torch.cat([y1, y2]))
    opt = ref.configure_optimizers(tcfg.weight_decay, 1e-2, tcfg.betas, "cpu")
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ref.parameters() if p.grad is not None))
    opt.step()
    assert res.losses[0] == pytest.approx(loss.item(), rel=1e-5)
    assert res.log[0]["grad_norm"] == pytest.approx(float(norm), rel=1e-4)
    # Adam's first step is ~lr * sign(g): float noise flips a few near-zero coordinates, so compare
    # the whole update direction rather than each weight
    w0 = torch.cat([p.flatten() for p in _model().state_dict().values()])
    d_train = torch.cat([p.flatten() for p in model.state_dict().values()]) - w0
    d_ref = torch.cat([p.flatten() for p in ref.state_dict().values()]) - w0
    assert float(torch.nn.functional.cosine_similarity(d_train, d_ref, dim=0)) > 0.999


def test_on_step_sees_every_step_and_training_learns():
    calls = []
    res = train(_model(), _data(), _data(seed=1), TrainConfig(max_steps=30, batch_size=8, warmup_steps=3, lr=1e-2,
                                                               eval_interval=15, eval_iters=2),
                on_step=lambda step, m, st: calls.append((step, st.loss)), progress=False)
    assert [c[0] for c in calls] == list(range(1, 31))
    assert [c[1] for c in calls] == res.losses
    assert [h["step"] for h in res.history] == [0, 15, 30]
    assert res.final["val_loss"] < res.history[0]["val_loss"] - 0.3
    assert res.final["val_ppl"] == pytest.approx(math.exp(res.final["val_loss"]))


def test_validation_is_cross_entropy_only_for_moe():
    """Validation loss and perplexity never include the MoE auxiliary losses."""
    model = _model(moe=True, moe_aux_loss_coef=1.0, moe_z_loss_coef=1.0)  # a big aux loss, impossible to miss
    val = _data(seed=2)
    ce = evaluate(model, val, 4, 16, 3)
    loader = BatchLoader(val, 4, 16, seed=0)
    model.eval()
    totals, ces = [], []
    with torch.no_grad():
        for _ in range(3):
            x, y = loader.next_batch()
            out = model(x, y)
            totals.append(out.loss.item())
            ces.append(out.ce_loss.item())
    assert ce == pytest.approx(float(np.mean(ces)), rel=1e-6)
    assert float(np.mean(totals)) > ce + 0.01  # the aux loss is there, and left out
    tcfg = TrainConfig(max_steps=2, eval_interval=2, eval_iters=3, batch_size=4, lr=1e-5, min_lr=1e-6)
    res = train(model, _data(), val, tcfg,
                progress=False)
    h = res.history[0]
    assert h["val_loss"] == pytest.approx(ce, rel=1e-6)  # step 0 evaluation, before any update
    assert h["val_ppl"] == pytest.approx(math.exp(ce), rel=1e-6)


# ---- precision -------------------------------------------------------------------------------------


@pytest.mark.parametrize("capability, dtype, scaler", [((9, 0), torch.bfloat16, False), ((8, 0), torch.bfloat16, False),
                                                        ((7, 5), torch.float16, True), ((7, 0), torch.float16, True)])
def test_precision_chooser_per_gpu(monkeypatch, capability, dtype, scaler):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    p = pick_precision("auto", "auto", verbose=False)
    assert p.device == "cuda" and p.dtype == dtype and p.use_scaler is scaler


def test_precision_chooser_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = pick_precision("auto", "auto", verbose=False)
    assert p.device in ("cpu", "mps") and p.dtype == torch.float32 and not p.use_scaler
    assert isinstance(p.autocast(), type(pick_precision("cpu", "float32", verbose=False).autocast()))
    assert pick_precision("cpu", "bfloat16", verbose=False).dtype == torch.bfloat16


def test_fp16_gradscaler_path_runs_on_cpu(tmp_path):
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        torch.amp.GradScaler("cpu")
    except Exception as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"this torch cannot run fp16 autocast + GradScaler on CPU: {e}")
    tcfg = TrainConfig(max_steps=4, batch_size=4, dtype="float16", device="cpu", eval_interval=4, eval_iters=1,
                       out_dir=str(tmp_path), plot=False, warmup_steps=1)
    res = train(_model(), _data(), _data(seed=3), tcfg, progress=False)
    assert res.stopped is None and len(res.losses) == 4 and all(math.isfinite(v) for v in res.losses)
    ck = load_checkpoint(tmp_path)
    assert ck["scaler"] is not None and ck["scaler"]["scale"] > 0  # the scaler state travels with the checkpoint


# ---- NaN -------------------------------------------------------------------------------------------------


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    model = _model()
    poison = {"on": False}

    def hook(module, inputs, output):
        return output * float("nan") if poison["on"] else output

    model.lm_head.register_forward_hook(hook)

    def on_step(step, m, st):
        if step == 3:
            poison["on"] = True  # step 4's forward returns NaN logits

    tcfg = TrainConfig(max_steps=10, batch_size=4, save_interval=1, eval_interval=100, eval_iters=1,
                       out_dir=str(tmp_path), plot=False)
    res = train(model, _data(), _data(seed=4), tcfg, on_step=on_step, progress=False)
    assert res.stopped is not None and "nan" in res.stopped and "step 4" in res.stopped
    assert "latest.pt (step 3)" in res.stopped
    assert "nan" in capsys.readouterr().out  # said out loud, not only returned
    assert len(res.losses) == 3
    ck = load_checkpoint(tmp_path)
    assert ck["step"] == 3
    assert all(torch.isfinite(t).all() for t in ck["model"].values())
    # the NaN step was never applied: the weights in memory are still those of the checkpoint
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck["model"][k]), k


# ---- run configs (nanomoe.training.runs: packaged JSON + --key=value) ------------------------------------------------


def test_run_config_precedence():
    from nanomoe.training.runs import load_run_config, model_config_from_args, parse_run_args, train_config_from_args

    cfg = load_run_config("shakespeare_char_gpt2")
    assert cfg["n_layer"] == 4 and cfg["block_size"] == 64 and cfg["batch_size"] == 12 and cfg["max_steps"] == 2000
    args = parse_run_args(["--config=shakespeare_char_gpt2", "--n_layer=3", "--lr=3e-4", "--bias=true"])
    assert args.n_layer == 3 and args.lr == 3e-4 and args.n_embd == 128  # CLI beats JSON, JSON beats defaults
    quick = parse_run_args(["--config=shakespeare_char_gpt2", "--quick", "--max_steps=7"],
                           quick={"max_steps": 3, "n_embd": 32})
    assert quick.max_steps == 7 and quick.n_embd == 32  # --quick beats JSON, explicit beats --quick
    mc = model_config_from_args(args, vocab_size=65)
    assert (mc.n_layer, mc.n_embd, mc.vocab_size, mc.pos_emb, mc.bias) == (3, 128, 65, "learned", True)
    tc = train_config_from_args(args)
    assert tc.lr == 3e-4 and tc.betas == (0.9, 0.99) and tc.decay_steps == 2000
    with pytest.raises(ValueError, match="unknown config"):
        load_run_config("no_such_config")
