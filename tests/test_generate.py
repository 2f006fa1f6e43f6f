"""Generation from checkpoints and exported folders: nanomoe.interop.inference and scripts/generate.py.

Tiny models are trained for a few steps here with chapter 04's `nanomoe.training.train.train` (which writes
latest.pt / best.pt through nanomoe.training.checkpoint), so the checkpoints are the real thing. Every
expected text is computed in this process with `model.generate` and compared with what the
script prints in its own process. Only three subprocesses (each pays torch's import); the other
CLI paths call `scripts.generate.main(argv)` in-process, which runs the same code."""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nanomoe import GPT, gpt2_config, modern_config, moe_config
from nanomoe.interop.inference import InferenceError, StreamDecoder, encode_prompt, generate_text, load_model
from nanomoe.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, get_tokenizer
from nanomoe.training.checkpoint import save_checkpoint
from nanomoe.training.train import TrainConfig, train
from scripts.generate import main

REPO = Path(__file__).resolve().parent.parent

# Our own few lines (with accents, so byte-level BPE splits characters across tokens).
TEXT = (
    "O sagui pulou do galho para a janela e olhou a cozinha. Na mesa havia bananas, pão e café.\n"
    "A menina riu: o macaquinho pegou uma banana e voltou correndo para a árvore da praça.\n"
    "À tarde a chuva caiu forte; o sagui se escondeu no telhado e esperou o sol voltar.\n"
    "Quando a noite chegou, a família dormiu cedo, e o sagui sonhou com mais bananas.\n"
) * 4
PROMPT = "O sagui"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and a CPU shared with other jobs makes 2+ OpenMP
    threads spin-wait for each other (10x slower); subprocesses get OMP_NUM_THREADS=1 too."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train_run(model: GPT, tok, out_dir: Path, steps: int = 40) -> Path:
    ids = np.array(tok.encode(TEXT), dtype=np.int64)
    split = int(0.9 * len(ids))
    tcfg = TrainConfig(
        max_steps=steps, batch_size=8, lr=3e-3, warmup_steps=5, eval_interval=steps, eval_iters=1,
        device="cpu", out_dir=str(out_dir), sample_tokens=0, plot=False, seed=0,
    )
    train(model, ids[:split], ids[split:], tcfg, tokenizer=tok, progress=False)
    return out_dir


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """GPT-2-style model, char tokenizer, trained 40 steps -> out_dir with latest.pt."""
    tok = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    model = GPT(gpt2_config(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    return _train_run(model, tok, tmp_path_factory.mktemp("char_run")), model.eval(), tok


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """MoE model (Mixtral-style), trained byte-level BPE, vocab padded to a multiple of 64, trained
    30 steps -> out_dir with latest.pt + tokenizer.json; also exported as a Hugging Face folder."""
    from nanomoe.interop.hf import export_hf

    tok = BPETokenizer.train([TEXT], vocab_size=300)
    tok.save(tmp_path_factory.mktemp("bpe_tok") / "tokenizer.json")
    torch.manual_seed(0)
    cfg = moe_config(vocab_size=320, block_size=64, n_layer=2, n_head=4, n_embd=32, n_experts=4)
    model = GPT(cfg)
    out = _train_run(model, tok, tmp_path_factory.mktemp("bpe_run"), steps=30)
    hf_dir = export_hf(model.eval(), tmp_path_factory.mktemp("bpe_hf") / "export", tok)
    return out, hf_dir, model, tok


def greedy_text(model: GPT, tok, prompt: str, n: int) -> str:
    ids = tok.encode(prompt)
    out = model.generate(torch.tensor([ids]), n, temperature=0)
    return prompt + tok.decode(out[0, len(ids) :].tolist())


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "scripts.generate", *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, encoding="utf-8", timeout=300,
    )


# ---- the script, end to end (subprocesses) ---------------------------------------------------------


def test_script_greedy_checkpoint_continues_the_prompt(char_run):
    out_dir, model, tok = char_run
    r = run_script(out_dir / "latest.pt", PROMPT, "--temperature", "0", "--max-new-tokens", "40")
    assert r.returncode == 0, r.stderr
    expected = greedy_text(model, tok, PROMPT, 40)
    assert r.stdout == expected + "\n"  # the prompt, then exactly the model's greedy continuation
    assert len(expected) == len(PROMPT) + 40
    summary = r.stderr.strip().splitlines()[-1]
    assert "tokens/s" in summary and "time to first token" in summary and "KV cache on" in summary


def test_script_seed_is_reproducible_across_processes(char_run):
    out_dir, _, _ = char_run
    args = dict(max_new_tokens=30, temperature=0.9, top_k=20, top_p=0.95, num_samples=2, seed=7)
    r = run_script(out_dir, PROMPT, "--max-new-tokens", "30", "--temperature", "0.9", "--top-k", "20",
                   "--top-p", "0.95", "--num-samples", "2", "--seed", "7")
    assert r.returncode == 0, r.stderr
    model, tok = load_model(out_dir)
    buf = io.StringIO()
    texts = generate_text(model, tok, PROMPT, stream_to=buf, **args)
    assert r.stdout == buf.getvalue()  # same seed, same text, in another process
    assert r.stdout.count("--- sample") == 2 and texts[0] != texts[1]  # the generator moves on between samples
    assert all(t.startswith(PROMPT) for t in texts)


def test_script_missing_file_is_one_line_exit_2(tmp_path):
    r = run_script(tmp_path / "nope.pt", "oi")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # one line
    assert "generate: error:" in r.stderr and "nope.pt not found" in r.stderr


# ---- the script in-process: every bad input -> its message, exit code 2 ---------------------------


def _err(capsys, argv) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("generate: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_checkpoints(char_run, bpe_run, tmp_path, capsys, monkeypatch):
    not_ckpt = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.zeros(2)}, not_ckpt)
    assert "not a nanomoe checkpoint" in _err(capsys, [not_ckpt, "oi"])

    text_file = tmp_path / "notes.pt"
    text_file.write_text("not a checkpoint at all")
    assert "is not a PyTorch checkpoint" in _err(capsys, [text_file, "oi"])

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((char_run[0] / "latest.pt").read_bytes()[:5000])
    assert "corrupt or truncated" in _err(capsys, [truncated, "oi"])

    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert "holds no checkpoint" in _err(capsys, [empty, "oi"])

    # a BPE checkpoint copied without its tokenizer.json
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(bpe_run[0] / "latest.pt", lonely / "latest.pt")
    msg = _err(capsys, [lonely / "latest.pt", "oi"])
    assert "tokenizer" in msg and "missing" in msg and "tokenizer.json" in msg
    # ... even when the current directory happens to hold some other tokenizer.json
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    shutil.copy(bpe_run[0] / "tokenizer.json", decoy / "tokenizer.json")
    monkeypatch.chdir(decoy)
    assert "missing" in _err(capsys, [lonely / "latest.pt", "oi"])
    monkeypatch.chdir(REPO)

    # an exported folder without a tokenizer
    from nanomoe.interop.hf import export_hf

    export_hf(char_run[1], tmp_path / "hf_no_tok")
    assert "no tokenizer" in _err(capsys, [tmp_path / "hf_no_tok", "oi"])


def test_bad_prompts(char_run, capsys):
    out_dir = char_run[0]
    msg = _err(capsys, [out_dir, "a" * 100])
    assert "100 tokens" in msg and "context (block_size) is 64" in msg

    msg = _err(capsys, [out_dir, "O sagui 🙂 disse olá ☃"])  # 'ç', 'ã', 'é' are in TEXT; these are not
    assert "does not know 2 character(s)" in msg and "'🙂'" in msg and "'☃'" in msg

    assert "prompt is empty" in _err(capsys, [out_dir, ""])

    msg = _err(capsys, [out_dir, PROMPT, "--max-new-tokens", "100"])  # explicit value that does not fit the cache
    assert "exceeds the model's context of 64" in msg and "at most 57 new tokens" in msg and "--no-cache" in msg


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--temperature", "-1", ">= 0"),
        ("--top-p", "0", "in (0, 1]"),
        ("--top-p", "1.5", "in (0, 1]"),
        ("--top-k", "0", ">= 1"),
        ("--num-samples", "0", ">= 1"),
        ("--max-new-tokens", "0", ">= 1"),
        ("--max-new-tokens", "ten", "must be an integer"),
        ("--dtype", "half", "must be one of auto, float32"),
        ("--threads", "0", ">= 1"),
    ],
)
def test_bad_options(option, value, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(["some.pt", "oi", option, value])
    err = capsys.readouterr().err
    assert e.value.code == 2
    canonical = "--" + option[2:].replace("-", "_")  # dashes are accepted, underscores are the spelling
    assert err.count("\n") == 1 and err.startswith("generate: error:") and canonical in err and words in err


def test_hub_name_offline_is_a_clear_error(capsys):
    # conftest puts the hub offline and blocks the network: no minute of retries, one clear line
    msg = _err(capsys, ["gpt2", "oi"])
    assert "'gpt2'" in msg and "internet" in msg


def test_hf_export_folder_no_cache_equals_cached_generation(bpe_run, capsys):
    """The exported Hugging Face folder (Mixtral-style MoE, trained BPE) through the script's main:
    the tokenizer comes from the folder, and --no-cache gives the cached generation's text."""
    _, hf_dir, model, tok = bpe_run
    prompt = "À tarde a chuva"
    assert main([str(hf_dir), prompt, "--temperature", "0", "--max-new-tokens", "30", "--no-cache"]) == 0
    cap = capsys.readouterr()
    assert cap.out == greedy_text(model, tok, prompt, 30) + "\n"  # computed with the KV cache
    assert "KV cache off" in cap.err and "MoE 4 experts" in cap.err and "tokenizer bpe" in cap.err


def test_no_cache_flag_in_process_matches(char_run, capsys):
    out_dir, model, tok = char_run
    assert main([str(out_dir), PROMPT, "--temperature", "0", "--max-new-tokens", "40", "--no-cache"]) == 0
    assert capsys.readouterr().out == greedy_text(model, tok, PROMPT, 40) + "\n"
    # without the cache the window slides, so it may go past the context (64 tokens)
    assert main([str(out_dir), PROMPT, "--temperature", "0", "--max-new-tokens", "80", "--no-cache"]) == 0
    assert len(capsys.readouterr().out) == len(PROMPT) + 80 + 1


def test_default_max_new_tokens_shrinks_to_fit(char_run, capsys):
    assert main([str(char_run[0]), PROMPT, "--temperature", "0"]) == 0
    cap = capsys.readouterr()
    assert len(cap.out) == 64 + 1  # prompt + new tokens fill the 64-token context exactly (char tokenizer)
    assert "--max_new_tokens 57" in cap.err


# ---- load_model / generate_text ---------------------------------------------------------------------


@pytest.mark.parametrize("make", [gpt2_config, modern_config, moe_config])
def test_every_family_roundtrips_through_a_checkpoint(make, tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    kw = dict(n_experts=4) if make is moe_config else {}
    model = GPT(make(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=4, n_embd=32, **kw)).eval()
    save_checkpoint(tmp_path / "m.pt", {"model": model.state_dict(), "config": model.config.to_dict(),
                                        "tokenizer": tok.info()})
    loaded, tok2 = load_model(tmp_path / "m.pt")
    assert isinstance(tok2, CharTokenizer) and tok2.chars == tok.chars
    assert not loaded.training
    out = generate_text(loaded, tok2, PROMPT, max_new_tokens=20, temperature=0)
    assert out[0] == greedy_text(model, tok, PROMPT, 20)
    assert out.continuations[0] == out[0][len(PROMPT) :]


def test_vocab_mismatch_is_refused(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    model = GPT(gpt2_config(vocab_size=10, block_size=16, n_layer=1, n_head=1, n_embd=8))
    save_checkpoint(tmp_path / "m.pt", {"model": model.state_dict(), "config": model.config.to_dict(),
                                        "tokenizer": tok.info()})
    with pytest.raises(InferenceError, match=f"tokenizer has {tok.vocab_size} ids but the model only 10"):
        load_model(tmp_path / "m.pt")


def test_stream_and_stats(char_run):
    _, model, tok = char_run
    buf = io.StringIO()
    out = generate_text(model, tok, PROMPT, max_new_tokens=25, temperature=0, stream_to=buf)
    assert buf.getvalue() == out[0] + "\n"
    s = out.stats
    assert (s.num_samples, s.prompt_tokens, s.new_tokens, s.use_cache) == (1, len(PROMPT), 25, True)
    assert s.seconds > 0 and 0 < s.ttft_s <= s.seconds and s.tokens_per_s > 0 and s.decode_tokens_per_s > 0
    assert "tokens/s" in s.summary() and "time to first token" in s.summary()


def test_padded_vocab_ids_are_never_sampled():
    """GPT-2's vocab is padded (50257 -> 50304): ids the tokenizer cannot decode must never come out."""
    tok = CharTokenizer.from_text(TEXT)
    V = tok.vocab_size
    model = GPT(gpt2_config(vocab_size=V + 6, block_size=32, n_layer=1, n_head=1, n_embd=8, tie_embeddings=False))
    with torch.no_grad():  # make the padded ids the most likely: h = ones, logits = row sums of lm_head
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[V:] = 1.0
        model.lm_head.weight[3] = 0.5
    ids = torch.tensor([tok.encode(PROMPT)])
    assert model.generate(ids, 1, temperature=0).max() >= V  # the raw model would pick a padded id
    out = generate_text(model, tok, PROMPT, max_new_tokens=5, temperature=0)
    assert out[0] == PROMPT + tok.decode([3] * 5)  # the best id the tokenizer knows
    out = generate_text(model, tok, PROMPT, max_new_tokens=20, temperature=1.0, seed=0)
    assert len(out[0]) == len(PROMPT) + 20  # sampling never hits a padded id either (decode would fail)
    assert not model.lm_head._forward_hooks  # the mask is removed afterwards


def test_load_model_dtype(char_run):
    model, tok = load_model(char_run[0], dtype="bfloat16")
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    out = generate_text(model, tok, PROMPT, max_new_tokens=10, temperature=0)
    assert out[0].startswith(PROMPT) and out.stats.dtype == "bfloat16"


def test_generate_text_argument_errors(char_run):
    _, model, tok = char_run
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate_text(model, tok, PROMPT, temperature=-0.5)
    with pytest.raises(InferenceError, match="num_samples must be an integer >= 1"):
        generate_text(model, tok, PROMPT, num_samples=0)
    with pytest.raises(InferenceError, match="max_new_tokens must be an integer >= 1"):
        generate_text(model, tok, PROMPT, max_new_tokens=0)
    with pytest.raises(InferenceError, match="at most 57 new tokens"):
        generate_text(model, tok, PROMPT, max_new_tokens=58)
    with pytest.raises(InferenceError, match="context"):
        encode_prompt(tok, "a" * 65, 64)


# ---- streaming decode: never print half a UTF-8 character ------------------------------------------


def test_stream_decoder_holds_back_split_characters():
    tok = ByteTokenizer()  # "ã" = 2 byte-tokens, "🙂" = 4
    text = "Olá, ação! 🙂 fim"
    ids = tok.encode(text)
    dec = StreamDecoder(tok, tok.encode("> "))
    pieces = [dec.push(i) for i in ids]
    assert dec.flush() == ""
    assert "".join(pieces) == dec.text == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces.count("") == 1 + 1 + 1 + 3  # á, ç, ã: 1 byte held back each; 🙂: 3
    assert pieces[ids.index(0xF0) + 3] == "🙂"


def test_stream_decoder_equals_full_decode_on_random_bytes():
    """Random continuation bytes (invalid UTF-8 included): what is printed, then flushed, is exactly
    the decode of the whole sequence."""
    tok = ByteTokenizer()
    rng = random.Random(0)
    for _ in range(200):
        prompt = tok.encode("".join(rng.choice("aé🙂") for _ in range(rng.randrange(1, 4))))  # valid text
        ids = [rng.choice([rng.randrange(128), rng.randrange(128, 256)]) for _ in range(rng.randrange(1, 30))]
        dec = StreamDecoder(tok, prompt)
        for i in ids:
            dec.push(i)
        dec.flush()
        full = tok.decode(prompt + ids)
        assert tok.decode(prompt) + dec.text == full


def test_stream_decoder_gpt2_bpe(tiktoken_cache):
    tok = get_tokenizer("gpt2")
    text = " São Paulo, coração 🙂🙂 naïve — 東京"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens hold part of a character
    dec = StreamDecoder(tok, tok.encode("Era uma vez"))
    pieces = [dec.push(i) for i in ids]
    dec.flush()
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_stream_decoder_trained_bpe(bpe_run):
    tok = bpe_run[3]
    text = "À tarde, a família do sagui comeu pão e maçã."
    ids = tok.encode(text)
    dec = StreamDecoder(tok, tok.encode("Era"))
    pieces = [dec.push(i) for i in ids]
    dec.flush()
    assert "".join(pieces) == tok.decode(ids) and all("\ufffd" not in p for p in pieces)
