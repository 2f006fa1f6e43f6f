"""Data pipeline: corpora, prepare() shards + meta.json, both shard layouts, the BatchLoader
(targets, determinism, exact resume, DDP ranks), clear DataErrors, and the prepare scripts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nanomoe import data as D
from nanomoe.data import BatchLoader, DataError, load_split, prepare
from nanomoe.data.encode import _chunks
from nanomoe.tokenizer import BPETokenizer, Tokenizer, get_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent

TEXT = (
    "Não tive filhos, não transmiti a nenhuma criatura o legado da nossa miséria.\n"
    "Ao verme que primeiro roeu as frias carnes do meu cadáver dedico como saudosa lembrança\n"
    "estas memórias póstumas.  \n\n\n   Capítulo I — Óbito do autor…\n"
) * 40


# ---------------------------------------------------------------------------------------- corpora


def test_read_corpus_machado_matches_shared_readme(shared_data):
    text = D.read_corpus("machado")
    assert len(text) == 4_777_642
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == D.MACHADO_SHA256
    assert sorted(p.name for p in (shared_data / "machado").glob("*.txt")) == sorted(D.MACHADO_FILES)


def test_read_corpus_tinyshakespeare(shared_data):
    text = D.read_corpus("tinyshakespeare")
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == D.TINYSHAKESPEARE_SHA256


def test_read_corpus_from_source(tmp_path):
    folder = tmp_path / "machado"
    folder.mkdir()
    # C-locale order: uppercase before lowercase, like `LC_ALL=C ls` (the shared README's concatenation order)
    for name, body in [("b.txt", "bê\n"), ("A.txt", "A\n"), ("a.txt", "á\n")]:
        (folder / name).write_text(body, encoding="utf-8")
    assert D.read_corpus("machado", source=folder) == "A\ná\nbê\n"
    assert D.read_corpus("machado", source=tmp_path) == "A\ná\nbê\n"  # a parent holding machado/
    (tmp_path / "input.txt").write_text("To be\r\nor not\n", encoding="utf-8", newline="")
    assert D.read_corpus("tinyshakespeare", source=tmp_path / "input.txt") == "To be\r\nor not\n"  # byte-exact
    with pytest.raises(DataError, match="does not exist"):
        D.read_corpus("machado", source=tmp_path / "nope")
    with pytest.raises(DataError, match="unknown corpus 'quijote'"):
        D.read_corpus("quijote")


@pytest.mark.parametrize("offline_flag", ["1", ""])
def test_read_corpus_offline_without_local_copy_is_a_clear_error(tmp_path, monkeypatch, offline_flag):
    """No shared copy, no cache, no network (NANOMOE_OFFLINE, or the test network guard): a DataError
    that says how to pass a local copy, not a urllib traceback."""
    monkeypatch.delenv("NANOMOE_DATA", raising=False)
    monkeypatch.setenv("NANOMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NANOMOE_OFFLINE", offline_flag)
    with pytest.raises(DataError, match="--source") as e:
        D.read_corpus("tinyshakespeare")
    assert "raw.githubusercontent.com" in str(e.value) and "\n" not in str(e.value)  # which URL, one line


def test_shared_data_dir_env_override(tmp_path, monkeypatch):
    from nanomoe.paths import shared_data_dir

    monkeypatch.setenv("NANOMOE_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    monkeypatch.delenv("NANOMOE_DATA")
    assert shared_data_dir() is None  # never a folder guessed from where the package lives


# ---------------------------------------------------------------------------------------- prepare


def test_prepare_char_writes_shards_and_meta(tmp_path):
    meta = prepare(TEXT, "char", tmp_path, val_fraction=0.1, corpus="test", progress=False)
    n_train = int(len(TEXT) * 0.9)
    assert meta["train_chars"] == n_train and meta["val_chars"] == len(TEXT) - n_train
    assert meta["train_tokens"] == n_train and meta["val_tokens"] == len(TEXT) - n_train
    assert meta["vocab_size"] == len(set(TEXT)) and meta["dtype"] == "uint16"
    on_disk = json.loads((tmp_path / "meta.json").read_text(encoding="utf-8"))
    assert on_disk == meta
    train = np.load(tmp_path / "train_000000.npy")
    val = np.load(tmp_path / "val_000000.npy")
    assert train.dtype == np.uint16 and val.dtype == np.uint16
    tok = D.data_tokenizer(tmp_path)
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == TEXT  # nothing lost, nothing reordered


def test_prepare_bpe_trains_on_train_split_and_saves_tokenizer(tmp_path):
    meta = prepare(TEXT, "bpe", tmp_path, vocab_size=300, progress=False)
    assert (tmp_path / "tokenizer.json").is_file()
    assert meta["tokenizer"] == {"name": "bpe", "path": "tokenizer.json"}  # relative: the folder can move
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    tmp_path.rename(moved)
    tok = D.data_tokenizer(moved)
    assert tok.vocab_size == meta["vocab_size"] <= 300
    ids = np.concatenate([a.astype(np.int64) for a in load_split(moved, "train") + load_split(moved, "val")])
    assert tok.decode(ids.tolist()) == TEXT
    assert meta["tokens_per_char"] < 0.8  # merges compress Portuguese text


class _WideTokenizer(Tokenizer):
    """A fake tokenizer whose ids do not fit in 16 bits."""

    name = "bytes"

    @property
    def vocab_size(self):
        return 70_000

    def encode(self, text):
        return [69_000 + (b % 100) for b in text.encode("utf-8")]

    def decode(self, ids):
        raise NotImplementedError


def test_prepare_uses_uint32_for_large_vocab(tmp_path):
    meta = prepare(TEXT[:500], _WideTokenizer(), tmp_path, progress=False)
    train = load_split(tmp_path, "train")[0]
    assert meta["dtype"] == "uint32" and train.dtype == np.uint32
    assert int(train.max()) >= 69_000  # uint16 would have wrapped these ids around
    assert D.token_dtype(65_535) == np.uint16 and D.token_dtype(65_536) == np.uint32


def test_prepare_shard_size_and_rerun_leaves_no_stale_shards(tmp_path):
    prepare(TEXT, "bytes", tmp_path, shard_size=1000, progress=False)
    many = load_split(tmp_path, "train")
    assert len(many) > 2 and all(len(s) == 1000 for s in many[:-1])
    prepare(TEXT, "bytes", tmp_path, progress=False)
    assert len(load_split(tmp_path, "train")) == 1
    assert sum(len(s) for s in many) == len(load_split(tmp_path, "train")[0])


@pytest.mark.parametrize("name", ["bytes", "gpt2", "bpe"])
def test_chunked_encoding_equals_whole_encoding(name, tiktoken_cache):
    """Long texts are tokenized in chunks (for the progress bar); cutting at the wrong place would change
    BPE ids at the seams (e.g. inside "  \\n\\n\\n   "), so chunked ids must equal one-shot ids."""
    tok = {"bytes": lambda: get_tokenizer("bytes"), "gpt2": lambda: get_tokenizer("gpt2"),
           "bpe": lambda: BPETokenizer.train([TEXT], vocab_size=400)}[name]()
    whole = tok.encode(TEXT)
    chunked = D.encode_text(tok, TEXT, chunk_chars=97, progress=False)
    assert len(_chunks(TEXT, 97)) > 20
    assert chunked.tolist() == whole


# ---------------------------------------------------------------------------------------- load_split


def test_load_split_reads_fineweb_layouts(tmp_path):
    """build-nanogpt's FineWeb-Edu layout: uint16 GPT-2 shards, first shard val, inside edu_fineweb10B/."""
    fw = tmp_path / "edu_fineweb10B"
    fw.mkdir()
    rng = np.random.default_rng(0)
    shards = {name: rng.integers(0, 50257, size=n, dtype=np.uint16) for name, n in
              [("fineweb_edu_val_000000", 300), ("fineweb_edu_train_000001", 400), ("fineweb_edu_train_000002", 500)]}
    for name, arr in shards.items():
        np.save(fw / name, arr)
    for folder in (tmp_path, fw):
        train = load_split(folder, "train")
        assert [len(a) for a in train] == [400, 500]
        assert isinstance(train[0], np.memmap) and train[0].dtype == np.uint16  # memory-mapped, not loaded
        np.testing.assert_array_equal(train[1], shards["fineweb_edu_train_000002"])
        assert [len(a) for a in load_split(folder, "val")] == [300]
    assert D.load_meta(tmp_path)["tokenizer"] == {"name": "gpt2"}
    # build-nanogpt's own file names
    other = tmp_path / "other"
    other.mkdir()
    np.save(other / "edufineweb_val_000000", shards["fineweb_edu_val_000000"])
    assert len(load_split(other, "val")[0]) == 300


def test_load_split_reads_nanogpt_bin(tmp_path):
    ids = np.arange(1000, dtype=np.uint16)
    ids.tofile(tmp_path / "train.bin")
    (train,) = load_split(tmp_path, "train")
    np.testing.assert_array_equal(train, ids)


def test_missing_or_empty_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist.*prepare_machado"):
        load_split(tmp_path / "nope", "train")
    with pytest.raises(DataError, match="no 'train' shards.*empty folder"):
        load_split(tmp_path, "train")
    np.save(tmp_path / "train_000000.npy", np.zeros(0, dtype=np.uint16))
    with pytest.raises(DataError, match="empty"):
        load_split(tmp_path, "train")
    (tmp_path / "train_000000.npy").write_bytes(b"")  # e.g. a crash mid-write
    with pytest.raises(DataError, match="not a readable .npy"):
        load_split(tmp_path, "train")
    with pytest.raises(DataError, match="no meta.json"):
        D.load_meta(tmp_path)


# ---------------------------------------------------------------------------------------- BatchLoader


def _shards():
    return [np.arange(0, 1000, dtype=np.uint16), np.arange(5000, 5300, dtype=np.uint16)]


def test_batches_shapes_and_shifted_targets():
    loader = BatchLoader(_shards(), batch_size=6, block_size=16, seed=1)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (6, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[:, -1], x[:, -1] + 1)  # ids are consecutive in each shard: y is x + 1
    # every row is one contiguous window of one shard (never straddling two shards)
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(6, 15, dtype=torch.int64))


def test_random_batches_cover_both_shards_and_all_starts():
    loader = BatchLoader(_shards(), batch_size=64, block_size=8, seed=0)
    firsts = torch.cat([loader.next_batch()[0][:, 0] for _ in range(100)])
    assert ((firsts < 1000).sum() > 0) and ((firsts >= 5000).sum() > 0)
    assert int(firsts[firsts < 1000].max()) <= 1000 - 9 and int(firsts[firsts >= 5000].max()) <= 5300 - 9
    assert int(firsts[firsts < 1000].min()) == 0  # position 0 is reachable
    share = float((firsts >= 5000).float().mean())  # shards are drawn in proportion to their windows
    assert abs(share - 292 / (292 + 992)) < 0.05


def test_determinism_with_seed():
    a = BatchLoader(_shards(), 4, 8, seed=7)
    b = BatchLoader(_shards(), 4, 8, seed=7)
    c = BatchLoader(_shards(), 4, 8, seed=8)
    xa = [a.next_batch()[0] for _ in range(3)]
    xb = [b.next_batch()[0] for _ in range(3)]
    xc = [c.next_batch()[0] for _ in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(xa, xb))
    assert not all(torch.equal(p, q) for p, q in zip(xa, xc))


@pytest.mark.parametrize("sequential", [False, True])
def test_resume_continues_with_exactly_the_same_batches(sequential):
    straight = BatchLoader(_shards(), 5, 32, seed=3, sequential=sequential)
    expected = [straight.next_batch() for _ in range(12)]
    first = BatchLoader(_shards(), 5, 32, seed=3, sequential=sequential)
    for _ in range(7):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # it travels inside a checkpoint
    resumed = BatchLoader(_shards(), 5, 32, seed=3, sequential=sequential)
    resumed.load_state_dict(state)
    for x_exp, y_exp in expected[7:]:
        x, y = resumed.next_batch()
        assert torch.equal(x, x_exp) and torch.equal(y, y_exp)


def test_resume_refuses_other_settings():
    state = BatchLoader(_shards(), 5, 32, seed=3).state_dict()
    with pytest.raises(DataError, match="block_size"):
        BatchLoader(_shards(), 5, 16, seed=3).load_state_dict(state)
    with pytest.raises(DataError, match="n_tokens"):
        BatchLoader(_shards()[:1], 5, 32, seed=3).load_state_dict(state)
    with pytest.raises(DataError, match="not a BatchLoader state"):
        BatchLoader(_shards(), 5, 32).load_state_dict({"step": 3})


@pytest.mark.parametrize("sequential", [False, True])
def test_ddp_ranks_draw_the_micro_batches_of_gradient_accumulation(sequential):
    """World of 2 ranks: rank r's n-th batch is the single process's batch 2n + r, so DDP sees exactly
    the data of 1 process with 2 accumulation micro-steps; ranks differ; their states are equal."""
    single = BatchLoader(_shards(), 4, 16, seed=5, sequential=sequential)
    ranks = [BatchLoader(_shards(), 4, 16, seed=5, rank=r, world_size=2, sequential=sequential) for r in (0, 1)]
    for _ in range(5):
        x0, x1 = ranks[0].next_batch()[0], ranks[1].next_batch()[0]
        assert not torch.equal(x0, x1)
        assert torch.equal(x0, single.next_batch()[0]) and torch.equal(x1, single.next_batch()[0])
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_sequential_ranks_cover_the_data_once_without_overlap():
    tokens = np.arange(10 * 8 * 3 + 1, dtype=np.uint16)  # 30 windows of 8 (+1 for the last target)
    world = 3
    loaders = [BatchLoader(tokens, 2, 8, rank=r, world_size=world, sequential=True) for r in range(world)]
    assert loaders[0].windows_per_epoch == 30
    rows = []
    for _ in range(5):  # 5 steps x 3 ranks x 2 rows = 30 windows = one epoch
        for L in loaders:
            rows.append(L.next_batch()[0])
    starts = torch.cat(rows)[:, 0].tolist()
    assert sorted(starts) == list(range(0, 240, 8))  # each window exactly once
    assert loaders[0].epoch == 1
    x, _ = loaders[0].next_batch()  # the next epoch starts over
    assert x[0, 0].item() == 0


def test_loader_clear_errors():
    with pytest.raises(DataError, match=r"shard 1 has 300 tokens but block_size=300 needs at least 301"):
        BatchLoader(_shards(), 2, 300)
    with pytest.raises(DataError, match="rank"):
        BatchLoader(_shards(), 2, 8, rank=2, world_size=2)
    with pytest.raises(DataError, match="empty list"):
        BatchLoader([], 2, 8)
    with pytest.raises(DataError, match="1-D"):
        BatchLoader(np.zeros((4, 100), dtype=np.uint16), 2, 8)


def test_loader_takes_tensors_and_memmaps(tmp_path):
    prepare(TEXT, "bytes", tmp_path, progress=False)
    from_disk = BatchLoader(load_split(tmp_path, "train"), 3, 24, seed=2)
    in_memory = BatchLoader(torch.from_numpy(np.load(tmp_path / "train_000000.npy").astype(np.int64)), 3, 24, seed=2)
    assert torch.equal(from_disk.next_batch()[0], in_memory.next_batch()[0])


# ---------------------------------------------------------------------------------------- compare


def test_compare_tokenizers(tiktoken_cache):
    toks = {"char": get_tokenizer("char", text=TEXT), "bytes": get_tokenizer("bytes"), "gpt2": get_tokenizer("gpt2")}
    rows = {r["tokenizer"]: r for r in D.compare_tokenizers(TEXT, toks)}
    assert rows["char"]["tokens_per_char"] == 1.0
    assert rows["bytes"]["tokens"] == len(TEXT.encode("utf-8"))
    assert rows["gpt2"]["tokens"] == len(toks["gpt2"].encode(TEXT)) < rows["char"]["tokens"]
    assert all(r["roundtrip"] for r in rows.values())
    assert rows["gpt2"]["chars_per_token"] == pytest.approx(1 / rows["gpt2"]["tokens_per_char"])


# ---------------------------------------------------------------------------------------- scripts


def test_prepare_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match="error: source .* does not exist"):
        D.prepare_corpus_cli("machado", ["--source", str(tmp_path / "missing"), "--out_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="vocab_size"):
        D.prepare_corpus_cli("machado", ["--tokenizer", "bpe", "--vocab_size", "100", "--source", str(tmp_path)])
    with pytest.raises(SystemExit, match="no .jsonl, .parquet or .txt"):
        D.prepare_fineweb_cli(["--source", str(tmp_path), "--out_dir", str(tmp_path / "fw")])
    assert not (tmp_path / "fw").exists()  # nothing written before the source is checked
    (tmp_path / "bad.jsonl").write_text('{"txt": "no text field"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: expected a JSON object with a \"text\" field"):
        D.prepare_fineweb_cli(["--source", str(tmp_path), "--out_dir", str(tmp_path / "fw"), "--no_progress"])


def test_prepare_scripts_run(tmp_path, tiktoken_cache, monkeypatch, capsys):
    """`uv run -m data.prepare_machado` as a real subprocess; the other two scripts through runpy in this
    process (same `__main__` code path, without paying another torch import on a busy 2-core CI box)."""
    import runpy

    src = tmp_path / "corpus.txt"
    src.write_text(TEXT, encoding="utf-8")
    env = {**os.environ, "NANOMOE_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "data.prepare_machado", "--source", str(src), "--out_dir", str(tmp_path / "m")]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tokens/char" in proc.stdout and f"vocab {len(set(TEXT))}" in proc.stdout
    m = json.loads((tmp_path / "m" / "meta.json").read_text())
    assert m["train_tokens"] + m["val_tokens"] == len(TEXT) and m["corpus"] == "machado"

    def run_script(module, *args):
        monkeypatch.setattr(sys, "argv", [module, *args])
        runpy.run_module(module, run_name="__main__", alter_sys=False)
        return capsys.readouterr().out

    out = run_script("data.prepare_tinyshakespeare", "--tokenizer", "bpe", "--vocab_size", "300",
                     "--source", str(src), "--out_dir", str(tmp_path / "s"), "--no_progress")
    s = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert s["tokenizer"]["name"] == "bpe" and (tmp_path / "s" / "tokenizer.json").is_file()
    assert f"vocab {s['vocab_size']}" in out

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.jsonl").write_text("\n".join(json.dumps({"text": TEXT[i:i + 400]}) for i in range(0, 4000, 400)))
    (docs / "b.txt").write_text("A last document.", encoding="utf-8")
    out = run_script("data.prepare_fineweb", "--source", str(docs), "--shard_size", "500",
                     "--out_dir", str(tmp_path / "fw" / "edu_fineweb10B"), "--no_progress")
    assert "11 documents" in out
    # build-nanogpt layout: first shard val, then train shards of --shard_size tokens; each document
    # follows an <|endoftext|> token
    gpt2 = get_tokenizer("gpt2")
    val, train = load_split(tmp_path / "fw", "val"), load_split(tmp_path / "fw", "train")
    assert [len(a) for a in val] == [500] and all(len(a) == 500 for a in train[:-1])
    assert val[0].dtype == np.uint16
    ids = np.concatenate([a.astype(np.int64) for a in val + train])
    expected = []
    for doc in [TEXT[i:i + 400] for i in range(0, 4000, 400)] + ["A last document."]:
        expected += [50256, *gpt2.encode(doc)]
    assert ids.tolist() == expected
