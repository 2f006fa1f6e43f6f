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

from nanomoe import GPT
from nanomoe.data import BatchLoader, gpt2_tokenizer, load_split, read_corpus, write_document_shards
from nanomoe.interop import hf
from nanomoe.interop.init_from import InitError, architecture_diff, init_model
from nanomoe.training.accumulation import grad_accum_for

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ("gpt2_124m_fineweb", "modern_124m_fineweb", "moe_124m_fineweb", "gpt2_finetune_machado")
# The real configs, scaled down to a CPU: everything else (tokenizer, preset, schedule shape,
# tokens_per_step -> accumulation, HellaSwag during evaluation) comes from the config file.
SMALL = ["--n_layer=2", "--n_head=4", "--n_kv_head=4", "--n_embd=64", "--block_size=32", "--batch_size=2",
         "--tokens_per_step=128", "--max_steps=3", "--warmup_steps=1", "--eval_interval=3", "--eval_iters=2",
         "--log_interval=1", "--compile=false", "--dtype=float32", "--device=cpu", "--sample_tokens=4",
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
    The GPT-2 BPE comes from a pre-filled tiktoken cache (TIKTOKEN_CACHE_DIR)."""
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


@pytest.fixture(scope="module")
def env(shared_data, _tiktoken_cache_dir) -> dict:
    """The environment of the runs: one thread, the repository importable, offline corpora and BPE."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "NANOMOE_DATA": str(shared_data),
           "TIKTOKEN_CACHE_DIR": str(_tiktoken_cache_dir)}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def _run(files: Path, env: dict, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "scripts.04_train", *SMALL, f"--data_dir={files / 'fineweb'}",
           f"--hellaswag={files / 'hellaswag.jsonl'}", f"--out_dir={out}", *extra]
    return subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)


def _records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# ---- the configs say what they claim -------------------------------------------------------------


def test_configs_at_full_size():
    from nanomoe.training.runs import load_run_config, model_config_from_args, parse_run_args

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
    same = preset("gpt2", n_layer=2, n_head=4, n_kv_head=4, n_embd=64, block_size=32, vocab_size=50257)
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
    _, report = init_model(str(folder), modern.replace(vocab_size=50304))  # padded: the rows still transfer
    assert "transformer.wte.weight" in report.copied
    capsys.readouterr()
    # a vocabulary padded to 50,304 (nanoGPT's) keeps the 50,257 rows of the same tokenizer
    padded = preset("gpt2", n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=50304)
    model, report = init_model(str(folder), padded)
    assert report is None and "padded from 50,257 to 50,304" in capsys.readouterr().out
    wte = model.transformer.wte.weight
    assert torch.equal(wte[:50257], src.transformer.wte.weight) and wte[50257:].abs().sum() > 0
    longer = preset("gpt2", n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=50257)
    assert any("block_size" in d for d in architecture_diff(src.config, longer))  # 64 learned positions < 128
    with pytest.raises(InitError, match="not found"):
        init_model(str(files / "nope"), same)


# ---- the four configs through the script ---------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_scaled_down(files, env, tmp_path, name):
    """Each config through the script. The fine-tuning config starts from the tiny GPT-2 folder
    (exact load: its step-0 validation loss equals transformers' own loss on the same batches);
    the modern one from the same folder through the partial transfer, whose report is printed."""
    init = {"gpt2_finetune_machado": [f"--init_from={files / 'tiny_gpt2'}"],
            "modern_124m_fineweb": [f"--init_from={files / 'tiny_gpt2'}"]}.get(name, [])
    out = tmp_path / name
    proc = _run(files, env, out, f"--config={name}", *init)
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
    # a prepared folder is not Machado: no Machado tokenizer comparison, and generation starts from the
    # config's prompt (the FineWeb configs: "Hello, I'm a language model,"), never from "Capitu"
    assert "characters of Machado" not in proc.stdout and "Capitu" not in proc.stdout
    if name == "gpt2_finetune_machado":
        assert "every tensor loaded exactly" in proc.stdout
        direct = _transformers_val_loss(files, batches=2)
        print(f"\n{name}: step-0 val loss {evals[0]['val_loss']:.6f}, transformers on the same batches {direct:.6f}")
        assert evals[0]["val_loss"] == pytest.approx(direct, rel=1e-5)
    if name == "modern_124m_fineweb":
        assert "partial transfer" in proc.stdout and "initialized" in proc.stdout and "skipped" in proc.stdout


def _transformers_val_loss(files: Path, batches: int) -> float:
    """GPT2LMHeadModel's own mean cross-entropy on the run's fixed validation batches (the first
    `batches` batches of a loader seeded with 0, as `nanomoe.training.evaluate` draws them)."""
    from transformers import GPT2LMHeadModel

    ref = GPT2LMHeadModel.from_pretrained(files / "tiny_gpt2").eval()
    loader = BatchLoader(load_split(files / "fineweb", "val"), 2, 32, seed=0)
    losses = []
    with torch.no_grad():
        for _ in range(batches):
            x, y = loader.next_batch()
            logits = ref(x).logits
            losses.append(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())))
    return sum(losses) / len(losses)


# ---- DDP: the same tokens per step on 2 ranks and on 1 ---------------------------------------------

DRIVER = r'''
import json
import sys

import torch


def run(files, out_dir):
    torch.set_num_threads(1)
    from nanomoe import GPT, preset
    from nanomoe.data import load_split
    from nanomoe.tokenizer import gpt2_tokenizer
    from nanomoe.training.train import TrainConfig, train

    torch.manual_seed(0)
    model = GPT(preset("gpt2", vocab_size=50304, block_size=32, n_layer=2, n_head=4, n_embd=64))
    cfg = TrainConfig(max_steps=4, warmup_steps=1, batch_size=2, tokens_per_step=128, lr=3e-3, eval_interval=2,
                      eval_iters=2, log_interval=1, out_dir=out_dir, plot=False, device="cpu", sample_tokens=0,
                      hellaswag=f"{files}/hellaswag.jsonl")
    res = train(model, load_split(f"{files}/fineweb", "train"), load_split(f"{files}/fineweb", "val"), cfg,
                tokenizer=gpt2_tokenizer(), progress=False)
    checksum = sum(float(p.double().abs().sum()) for p in model.state_dict().values())
    return {"losses": res.losses, "grad_norms": [r["grad_norm"] for r in res.log], "checksum": checksum,
            "evals": [[h["val_loss"], h["hellaswag_n"], h["hellaswag_acc"], h["hellaswag_acc_norm"]]
                      for h in res.history]}


if __name__ == "__main__":
    from nanomoe.parallel.distributed import cleanup_distributed, setup_distributed

    files, out = sys.argv[1], sys.argv[2]
    info = setup_distributed("cpu")
    result = run(files, f"{out}/ddp")
    with open(f"{out}/rank{info.rank}.json", "w") as f:
        json.dump(result, f)
    cleanup_distributed(info)
'''


def test_two_ranks_take_the_steps_of_one(files, env, tmp_path):
    """tokens_per_step=128 with batch 2 x 32: 1 process accumulates 2 micro-batches, 2 ranks 1 each;
    losses, gradient norms, weights, validation loss and HellaSwag counts are the same."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           str(files), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    ns: dict = {"__name__": "driver"}
    exec(DRIVER, ns)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", env["TIKTOKEN_CACHE_DIR"])
        one = ns["run"](str(files), str(tmp_path / "one"))
    assert r0["losses"] == r1["losses"] and r0["checksum"] == r1["checksum"]  # ranks never diverge
    assert len(one["losses"]) == 4 and one["losses"][-1] < one["losses"][0]  # it trains
    assert r0["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert r0["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-4)
    assert r0["checksum"] == pytest.approx(one["checksum"], rel=1e-5)
    for a, b in zip(r0["evals"], one["evals"]):
        assert a[0] == pytest.approx(b[0], rel=1e-5) and a[1:] == b[1:]  # HellaSwag: counts summed over ranks
    assert len(one["evals"]) == 3 and one["evals"][0][1] == 3


def test_readme_ddp_quick_command_runs_on_two_ranks(env, tmp_path):
    """`torchrun --standalone --nproc_per_node=2 -m scripts.04_train --quick` (the README's command
    with the chapter's quick mode) runs with the default config, whose grad_accum=1 is rounded up to
    one micro-batch per rank, and says so."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scripts.04_train", "--quick", "--compare_chars=0", "--max_steps=4", "--eval_interval=4", "--threads=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**env, "NANOMOE_HOME": str(tmp_path)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rounded up for 2 processes" in proc.stdout and "2 process(es) x 1 micro-batch(es)" in proc.stdout
