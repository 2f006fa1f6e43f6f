"""Chapter 04 at GPT-2 scale, on CPU: the four FineWeb / fine-tuning run configs, scaled down by
flags, train a few steps through the very code path of the real runs (GPT-2 token ids in uint16
FineWeb-layout shards written by `write_document_shards`, tokens per step -> gradient
accumulation, periodic validation, HellaSwag); `--init_from` a tiny random GPT-2 folder gives a
step-0 validation loss equal to transformers' own loss on the same batches; 2 ranks (gloo) and
1 rank derive their accumulation from the same tokens per step and take identical steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nanomoe import GPT, hf
from nanomoe.accumulation import grad_accum_for
from nanomoe.data import BatchLoader, gpt2_tokenizer, load_split, read_corpus, write_document_shards
from nanomoe.init_from import InitError, architecture_diff, init_model

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ("gpt2_124m_fineweb", "modern_124m_fineweb", "moe_124m_fineweb", "gpt2_finetune_machado")
# The real configs, scaled down to a CPU: everything else (tokenizer, preset, schedule shape,
# tokens_per_step -> accumulation, HellaSwag during evaluation) comes from the config file.
SMALL = ["--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=32", "--batch_size=2", "--tokens_per_step=128",
         "--max_steps=3", "--warmup_steps=1", "--eval_interval=3", "--eval_iters=2", "--log_interval=1",
         "--compile=false", "--dtype=float32", "--device=cpu", "--sample_tokens=4", "--compare_chars=0",
         "--threads=1"]
HELLASWAG = [
    {"ctx": "A man is sitting on a roof. He", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ctx": "To make tea, boil water,", "label": 1,
     "endings": ["then eat it.", "pour it over the leaves and wait.", "and freeze it.", "sing."]},
    {"ctx": "The cat sat on the mat and", "label": 0,
     "endings": ["purred.", "flew to the moon.", "sold the house.", "ate a piano."]},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, shared_data, _tiktoken_cache_dir):
    """A FineWeb-layout folder of GPT-2 ids (val shard first), a HellaSwag sample, a tiny GPT-2.
    The GPT-2 BPE comes from a pre-filled tiktoken cache (TIKTOKEN_CACHE_DIR, inherited by the runs)."""
    root = tmp_path_factory.mktemp("gpt2_runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(_tiktoken_cache_dir))
        mp.setenv("NANOMOE_DATA", str(shared_data))
        text = read_corpus("tinyshakespeare")[:60_000]
        docs = [d for d in text.split("\n\n") if d.strip()]
        write_document_shards(docs, gpt2_tokenizer(), root / "fineweb" / "edu_fineweb10B", shard_size=4096,
                              progress=False)
        (root / "hellaswag.jsonl").write_text("".join(json.dumps(d) + "\n" for d in HELLASWAG), encoding="utf-8")
        hf.save_random_gpt2(root / "tiny_gpt2", n_layer=2, n_head=4, n_embd=64, block_size=64)
        yield root


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def _run(files: Path, out: Path, *extra: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
    cmd = ([sys.executable, "-m"] if nproc == 1 else launcher) + [
        "scripts.04_train", *SMALL, f"--data_dir={files / 'fineweb'}", f"--hellaswag={files / 'hellaswag.jsonl'}",
        f"--out_dir={out}", *extra]
    return subprocess.run(cmd, cwd=out.parent, env=_env(), capture_output=True, text=True, timeout=600)


def _records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# ---- the configs say what they claim -------------------------------------------------------------


def test_configs_at_full_size():
    from nanomoe.runs import load_run_config, model_config_from_args, parse_run_args

    sizes = {}
    for name in CONFIGS:
        cfg = load_run_config(name)
        args = parse_run_args([f"--config={name}"])
        with torch.device("meta"):
            model = GPT(model_config_from_args(args, vocab_size=50257))
        sizes[name] = tuple(model.num_params(non_embedding=False, active=a) / 1e6 for a in (False, True))
        assert cfg["tokenizer"] == "gpt2" and args.block_size in (512, 1024)
        # tokens per step divide on 1 and 8 GPUs, and on 2 nodes x 8 GPUs with the documented batch size
        for world, bs in ((1, args.batch_size), (8, args.batch_size), (16, args.batch_size // 2)):
            accum, _ = grad_accum_for(bs, args.block_size, world, args.tokens_per_step)
            assert accum * bs * args.block_size == args.tokens_per_step
    assert sizes["gpt2_124m_fineweb"] == pytest.approx((124.48, 124.48), abs=0.01)
    assert sizes["modern_124m_fineweb"] == pytest.approx((123.59, 123.59), abs=0.01)
    assert sizes["moe_124m_fineweb"] == pytest.approx((293.53, 123.66), abs=0.01)  # total, active
    # OpenAI's 50,257 token rows, the position table cropped to 512
    assert sizes["gpt2_finetune_machado"][0] == pytest.approx(124.05, abs=0.01)
    for name in CONFIGS[:3]:
        args = parse_run_args([f"--config={name}"])
        assert args.tokens_per_step == 524_288
        assert args.max_steps * args.tokens_per_step / 1e9 == pytest.approx(10.0, abs=0.01)


# ---- tokens per step -> accumulation -------------------------------------------------------------


def test_grad_accum_from_tokens_per_step():
    assert grad_accum_for(64, 1024, 1, 524_288)[0] == 8
    assert grad_accum_for(64, 1024, 8, 524_288)[0] == 8  # 1 micro-batch on each of 8 ranks
    accum, line = grad_accum_for(64, 1024, 2, 524_288)
    assert accum == 8 and "524,288 tokens/step" in line and "2 process(es) x 4 micro-batch(es) x 64 x 1024" in line
    with pytest.raises(ValueError, match="try --batch_size=32"):  # 2 nodes x 8 GPUs
        grad_accum_for(64, 1024, 16, 524_288)
    with pytest.raises(ValueError, match="not a multiple.*try --tokens_per_step=1536"):
        grad_accum_for(12, 128, 1, 1000)
    # without tokens_per_step: grad_accum, rounded up to a multiple of the processes (said in the line)
    assert grad_accum_for(12, 128, 1, 0, 1) == (1, grad_accum_for(12, 128, 1, 0, 1)[1])
    accum, line = grad_accum_for(12, 128, 2, 0, 1)
    assert accum == 2 and "rounded up for 2 processes" in line and "3,072 tokens/step" in line
    assert grad_accum_for(12, 128, 3, 0, 4)[0] == 6


# ---- --init_from in-process ----------------------------------------------------------------------


def test_init_from_exact_and_transfer(files, capsys):
    from nanomoe import preset

    folder = files / "tiny_gpt2"
    same = preset("gpt2", n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=50257)
    model, report = init_model(str(folder), same)
    assert report is None and "loaded exactly" in capsys.readouterr().out
    src = hf.from_pretrained(folder)
    for k, v in model.state_dict().items():  # every tensor equal; the position table cropped to 32
        ref = src.state_dict()[k]
        assert torch.equal(v, ref[: v.shape[0]] if k == "transformer.wpe.weight" else ref), k
    modern = preset("modern", n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=50257)
    assert any(d.startswith("pos_emb") for d in architecture_diff(src.config, modern))
    _, report = init_model(str(folder), modern)
    out = capsys.readouterr().out
    assert report is not None and "partial transfer" in out and "copied" in out and "wpe.weight" in out
    assert "transformer.wte.weight" in report.copied
    longer = preset("gpt2", n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=50257)
    assert any("block_size" in d for d in architecture_diff(src.config, longer))  # 64 learned positions < 128
    with pytest.raises(InitError, match="not found"):
        init_model(str(files / "nope"), same)


# ---- the four configs through the script ---------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_scaled_down(files, tmp_path, name):
    extra = [f"--init_from={files / 'tiny_gpt2'}"] if name == "gpt2_finetune_machado" else []
    out = tmp_path / name
    proc = _run(files, out, f"--config={name}", *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "128 tokens/step (from tokens_per_step) = 1 process(es) x 2 micro-batch(es) x 2 x 32" in proc.stdout
    train_recs, evals = _records(out, "train"), _records(out, "eval")
    assert [r["step"] for r in train_recs] == [1, 2, 3] and [r["step"] for r in evals] == [0, 3]
    assert all(np.isfinite(r["loss"]) for r in train_recs)
    for r in evals:  # validation loss and HellaSwag at every evaluation
        assert r["hellaswag_n"] == 3 and 0 <= r["hellaswag_acc_norm"] <= 1 and np.isfinite(r["val_loss"])
    ck = torch.load(out / "latest.pt", weights_only=True)
    cfg = ck["config"]
    assert (cfg["n_layer"], cfg["n_embd"], cfg["block_size"]) == (2, 64, 32)  # scaled by the flags
    want = {"gpt2_124m_fineweb": ("learned", 0, 50304), "modern_124m_fineweb": ("rope", 0, 50304),
            "moe_124m_fineweb": ("rope", 8, 50304), "gpt2_finetune_machado": ("learned", 0, 50257)}[name]
    assert (cfg["pos_emb"], cfg["n_experts"], cfg["vocab_size"]) == want  # the rest from the config file
    assert ck["tokenizer"]["name"] == "gpt2"


def test_init_from_step0_val_loss_equals_transformers(files, tmp_path):
    """--init_from a Hugging Face folder: step-0 validation loss == GPT2LMHeadModel's own loss on
    the same validation batches (the first eval_iters batches of a loader seeded with 0)."""
    from transformers import GPT2LMHeadModel

    folder = files / "tiny_gpt2"
    out = tmp_path / "ft"
    proc = _run(files, out, "--config=gpt2_finetune_machado", f"--init_from={folder}", "--max_steps=1",
                "--eval_interval=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "loaded exactly" in proc.stdout
    step0 = _records(out, "eval")[0]
    assert step0["step"] == 0

    ref = GPT2LMHeadModel.from_pretrained(folder).eval()
    loader = BatchLoader(load_split(files / "fineweb", "val"), 2, 32, seed=0)
    losses = []
    with torch.no_grad():
        for _ in range(2):
            x, y = loader.next_batch()
            logits = ref(x).logits
            losses.append(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())))
    direct = sum(losses) / len(losses)
    print(f"step-0 val loss {step0['val_loss']:.6f}, transformers on the same batches {direct:.6f}")
    assert step0["val_loss"] == pytest.approx(direct, rel=1e-5)

    # a modern config from the same folder: the transfer report is printed
    proc = _run(files, tmp_path / "modern", "--config=modern_124m_fineweb", f"--init_from={folder}", "--max_steps=1",
                "--eval_interval=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "partial transfer" in proc.stdout and "initialized" in proc.stdout and "skipped" in proc.stdout

    proc = _run(files, tmp_path / "bad", "--config=gpt2_finetune_machado", f"--init_from={tmp_path / 'missing'}")
    assert proc.returncode != 0 and "--init_from" in proc.stderr and "Traceback" not in proc.stderr


# ---- DDP: the same tokens per step on 2 ranks and on 1 ---------------------------------------------


def test_two_ranks_take_the_steps_of_one(files, tmp_path):
    flags = ["--config=gpt2_124m_fineweb", "--max_steps=4", "--eval_interval=2"]
    one = _run(files, tmp_path / "one", *flags)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    two = _run(files, tmp_path / "two", *flags, nproc=2)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "1 process(es) x 2 micro-batch(es)" in one.stdout and "2 process(es) x 1 micro-batch(es)" in two.stdout
    a, b = _records(tmp_path / "one", "train"), _records(tmp_path / "two", "train")
    assert len(a) == len(b) == 4  # one writer (rank 0): no duplicated lines
    for key in ("loss", "grad_norm", "tokens"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5), key
    ea, eb = _records(tmp_path / "one", "eval"), _records(tmp_path / "two", "eval")
    assert [r["val_loss"] for r in eb] == pytest.approx([r["val_loss"] for r in ea], rel=1e-5)
    # HellaSwag split over the ranks, counts summed: the same result
    assert [(r["hellaswag_n"], r["hellaswag_acc"], r["hellaswag_acc_norm"]) for r in eb] == \
        [(r["hellaswag_n"], r["hellaswag_acc"], r["hellaswag_acc_norm"]) for r in ea]
    assert a[-1]["loss"] < a[0]["loss"]  # it trains

    bad = _run(files, tmp_path / "bad", *flags, "--tokens_per_step=100")
    assert bad.returncode != 0 and "tokens_per_step=100" in bad.stderr and "Traceback" not in bad.stderr


def test_readme_ddp_quick_command_runs_on_two_ranks(tmp_path, shared_data):
    """`torchrun --standalone --nproc_per_node=2 -m scripts.04_train --quick` (the README's command)
    runs with the default config, whose grad_accum=1 is rounded up to one micro-batch per rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scripts.04_train", "--quick", "--compare_chars=0", "--max_steps=4", "--eval_interval=4", "--threads=1",
           f"--out_dir={tmp_path / 'run'}"]
    env = {**_env(), "NANOMOE_DATA": str(shared_data), "NANOMOE_HOME": str(tmp_path)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rounded up" in proc.stdout and "2 process(es) x 1 micro-batch(es)" in proc.stdout
