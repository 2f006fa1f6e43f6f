"""Tokenizers: round trips, GPT-2's known ids, trained BPE save/load, local HF folders, info() round
trips, and the clear errors (offline, unknown names, unknown characters)."""

from __future__ import annotations

import json
import socket

import pytest

from nanomoe.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    TiktokenGPT2,
    TokenizerError,
    get_tokenizer,
    load_tokenizer,
)

PT = "Capítulo I — Do título. Uma noite destas, vindo da cidade para o Engenho Novo, encontrei no trem…\n"
TEXT = PT * 3 + "Ação, coração; à noite, é ó! 123\n"


def test_network_guard_blocks_remote_connections():
    """conftest's autouse guard: a test that reaches for the network fails at once."""
    with pytest.raises(ConnectionError, match="blocked"):
        socket.create_connection(("example.com", 443), timeout=1)
    with pytest.raises(ConnectionError, match="blocked"):
        s = socket.socket()
        try:
            s.connect(("93.184.216.34", 80))
        finally:
            s.close()


def test_char_round_trip_and_sorted_ids():
    tok = get_tokenizer("char", text=TEXT)
    assert tok.vocab_size == len(set(TEXT))
    assert tok.chars == sorted(set(TEXT))  # ids follow sorted order, as in nanoGPT's shakespeare_char
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT) and max(ids) == tok.vocab_size - 1
    assert tok.decode(ids) == TEXT


def test_bytes_round_trip_counts_utf8_bytes():
    tok = get_tokenizer("bytes")
    ids = tok.encode(TEXT)
    assert tok.vocab_size == 256
    assert len(ids) == len(TEXT.encode("utf-8")) > len(TEXT)  # accents take 2 bytes, "—" and "…" take 3
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode(ids) == TEXT


def test_gpt2_known_ids_and_round_trip(tiktoken_cache):
    tok = get_tokenizer("gpt2")
    assert tok.vocab_size == 50257
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>") != [50256]  # special tokens in text are plain text (encode_ordinary)
    assert tok.eot == 50256
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_gpt2_offline_with_empty_cache_is_a_clear_error(tmp_path, monkeypatch):
    import tiktoken.registry

    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)  # no in-process copy either
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.delenv("NANOMOE_DATA", raising=False)  # and no offline copy of GPT-2's files to fall back on
    with pytest.raises(TokenizerError, match="fill_tiktoken_cache|TIKTOKEN_CACHE_DIR") as e:
        get_tokenizer("gpt2")
    assert "internet" in str(e.value)


def test_fill_tiktoken_cache_needs_both_files(tmp_path):
    from nanomoe.tokenizer import fill_tiktoken_cache

    with pytest.raises(TokenizerError, match="encoder.json"):
        fill_tiktoken_cache(tmp_path, tmp_path / "cache")


def test_trained_bpe_save_load_round_trip(tmp_path):
    corpus = [TEXT * 20]
    tok = BPETokenizer.train(corpus, vocab_size=300)
    assert 256 < tok.vocab_size <= 300  # 256 byte symbols + merges
    ids = tok.encode(TEXT)
    assert len(ids) < len(TEXT.encode("utf-8"))  # merges compress
    assert tok.decode(ids) == TEXT
    # byte-level: text never seen in training still round-trips (no unknown token)
    unseen = "Zebra ξ 漢字 🙂"
    assert tok.decode(tok.encode(unseen)) == unseen
    path = tok.save(tmp_path / "tok")
    assert path.name == "tokenizer.json" and path.is_file()
    again = get_tokenizer("bpe", path=str(tmp_path / "tok"))
    assert again.encode(TEXT) == ids and again.vocab_size == tok.vocab_size


def _tiny_hf_folder(folder):
    """A small byte-level BPE wrapped in transformers' PreTrainedTokenizerFast, saved like a hub repo."""
    from transformers import PreTrainedTokenizerFast

    bpe = BPETokenizer.train([TEXT * 10], vocab_size=280)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe.tok, eos_token=None)
    fast.save_pretrained(str(folder))
    return bpe


def test_hf_tokenizer_from_local_folder(tmp_path):
    bpe = _tiny_hf_folder(tmp_path / "hf")
    tok = get_tokenizer("hf:" + str(tmp_path / "hf"))
    assert tok.encode(TEXT) == bpe.encode(TEXT)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.vocab_size == bpe.vocab_size
    same = load_tokenizer(tok.info())
    assert same.encode(TEXT) == bpe.encode(TEXT)


def test_hf_hub_name_offline_is_a_clear_error():
    with pytest.raises(TokenizerError, match="internet|local folder"):
        get_tokenizer("hf:pierreguillou/gpt2-small-portuguese")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: get_tokenizer("char", text=""), "empty"),
        (lambda: get_tokenizer("char"), "text="),
        (lambda: get_tokenizer("sentencepiece"), "unknown tokenizer 'sentencepiece'.*char.*gpt2"),
        (lambda: get_tokenizer("bpe"), "path="),
        (lambda: get_tokenizer("hf:"), "hf:NAME"),
        (lambda: load_tokenizer({"chars": "ab"}), "name"),
        (lambda: load_tokenizer({"name": "char"}), "chars"),
    ],
)
def test_clear_errors(call, match):
    with pytest.raises(TokenizerError, match=match):
        call()


def test_char_unknown_characters_are_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenizerError, match=r"2 character\(s\): 'x', 'z'"):
        tok.encode("abxzx")


def test_bpe_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        get_tokenizer("bpe", path=str(tmp_path))


def test_load_tokenizer_round_trip_every_kind(tmp_path, tiktoken_cache):
    """info() goes through JSON (as in meta.json and checkpoints) and comes back as the same tokenizer;
    a relative BPE path resolves against base_dir."""
    bpe = BPETokenizer.train([TEXT * 20], vocab_size=300)
    bpe.save(tmp_path / "tokenizer.json")
    _tiny_hf_folder(tmp_path / "hf")
    toks = {
        "char": get_tokenizer("char", text=TEXT),
        "bytes": ByteTokenizer(),
        "gpt2": TiktokenGPT2(),
        "bpe": bpe,
        "hf": get_tokenizer("hf:" + str(tmp_path / "hf")),
    }
    for name, tok in toks.items():
        info = json.loads(json.dumps(tok.info()))
        again = load_tokenizer(info)
        assert type(again) is type(tok), name
        assert again.vocab_size == tok.vocab_size, name
        assert again.encode(TEXT) == tok.encode(TEXT), name
        assert again.decode(tok.encode(TEXT)) == TEXT, name
    rel = load_tokenizer({"name": "bpe", "path": "tokenizer.json"}, base_dir=tmp_path)
    assert rel.encode(TEXT) == bpe.encode(TEXT)
