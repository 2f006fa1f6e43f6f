"""Tokenizers behind one small interface: `encode(text) -> list[int]`, `decode(ids) -> str`,
`vocab_size`, and `info()` (a JSON-able dict that `load_tokenizer` turns back into the tokenizer,
so checkpoints and data folders can say which tokenizer they were made with).

| name | what | offline |
|---|---|---|
| `char` | one id per distinct character of a text (Karpathy's char-rnn/nanoGPT shakespeare_char) | yes |
| `bytes` | the 256 UTF-8 byte values | yes |
| `gpt2` | GPT-2 BPE via `tiktoken.get_encoding("gpt2")` (50257 ids) | needs tiktoken's cache |
| `bpe` | a byte-level BPE trained on a corpus with Hugging Face `tokenizers`, saved as tokenizer.json | yes |
| `hf:NAME` | any Hugging Face tokenizer by hub name or local folder (`AutoTokenizer`) | local folders only |
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import tiktoken
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, trainers

from .paths import cache_dir, shared_data_dir


class TokenizerError(ValueError):
    """A tokenizer could not be built or used; the message says what to do."""


class Tokenizer:
    """The interface every tokenizer implements."""

    name: str = "base"

    @property
    def vocab_size(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """A JSON-able description; `load_tokenizer(info)` rebuilds the same tokenizer."""
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def _check_text(text: str) -> None:
    if not isinstance(text, str):
        raise TokenizerError(f"expected a str to encode, got {type(text).__name__}")


class CharTokenizer(Tokenizer):
    """One id per distinct character, in sorted order (ids are stable for a given text)."""

    name = "char"

    def __init__(self, chars: Sequence[str]):
        if not chars:
            raise TokenizerError("a char tokenizer needs a non-empty alphabet: build it from a non-empty text")
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        _check_text(text)
        if not text:
            raise TokenizerError("cannot build a char tokenizer from an empty text")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        _check_text(text)
        unknown = sorted({c for c in text if c not in self.stoi})
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:10])
            raise TokenizerError(
                f"the char tokenizer does not know {len(unknown)} character(s): {shown}; "
                f"it only knows the {self.vocab_size} characters of the text it was built from"
            )
        return [self.stoi[c] for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "chars": "".join(self.chars)}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: 256 ids, never an unknown character (accents take 2 bytes)."""

    name = "bytes"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        _check_text(text)
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class TiktokenGPT2(Tokenizer):
    """GPT-2's BPE (50257 ids) through tiktoken."""

    name = "gpt2"

    def __init__(self):
        try:
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # network error while downloading the BPE files
            raise TokenizerError(
                "could not load tiktoken's GPT-2 BPE (it downloads encoder.json and vocab.bpe on first use, "
                f"and that failed: {type(e).__name__}). Connect to the internet once, or pre-fill the cache: "
                "copy encoder.json and vocab.bpe into $TIKTOKEN_CACHE_DIR named by the sha1 of their URLs "
                "(see nanomoe.tokenizer.fill_tiktoken_cache)."
            ) from None
        self.eot = self.enc.eot_token

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        _check_text(text)
        return self.enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode([int(i) for i in ids])


# tiktoken caches each file under the sha1 of its URL.
TIKTOKEN_GPT2_FILES = {
    "encoder.json": "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6",
    "vocab.bpe": "6d1cbeee0f20b3d9449abfede4726ed8212e3aee",
}


def fill_tiktoken_cache(src_dir: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Copy GPT-2's encoder.json and vocab.bpe from src_dir into a tiktoken cache folder, so
    `tiktoken.get_encoding("gpt2")` works offline once TIKTOKEN_CACHE_DIR points there."""
    src, cache = Path(src_dir), Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    for fname, sha in TIKTOKEN_GPT2_FILES.items():
        if not (src / fname).is_file():
            raise TokenizerError(f"{src / fname} not found: need GPT-2's encoder.json and vocab.bpe")
        shutil.copyfile(src / fname, cache / sha)
    return cache


class HFTokenizer(Tokenizer):
    """Any Hugging Face tokenizer: a hub name (needs internet the first time) or a local folder."""

    name = "hf"

    def __init__(self, name_or_path: str):
        from transformers import AutoTokenizer  # lazy: transformers is heavy and only this class needs it

        self.name_or_path = str(name_or_path)
        try:
            self.tok = AutoTokenizer.from_pretrained(self.name_or_path)
        except Exception as e:
            raise TokenizerError(
                f"could not load the Hugging Face tokenizer {self.name_or_path!r} ({type(e).__name__}). "
                "A hub name needs internet the first time (then it is cached); offline, pass a local folder "
                "that holds tokenizer.json / tokenizer_config.json."
            ) from None

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        _check_text(text)
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.name_or_path}


class BPETokenizer(Tokenizer):
    """A byte-level BPE trained on our own corpus with Hugging Face `tokenizers`."""

    name = "bpe"

    def __init__(self, tok, path: Optional[str] = None):
        self.tok = tok
        self.path = path

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> "BPETokenizer":
        """Train a ByteLevel BPE (GPT-2's pre-tokenizer and byte alphabet) on `texts`."""
        tok = HFTok(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BPETokenizer":
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise TokenizerError(f"trained BPE tokenizer file {p} not found (it is saved next to the data shards)")
        return cls(HFTok.from_file(str(p)), str(p))

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        if p.suffix != ".json":
            p = p / "tokenizer.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(p))
        self.path = str(p)
        return p

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        _check_text(text)
        return self.tok.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path}


TOKENIZERS = ("char", "bytes", "gpt2", "bpe", "hf:<name or folder>")


def get_tokenizer(name: str, text: Optional[str] = None, path: Optional[str] = None) -> Tokenizer:
    """Build a tokenizer by name: "char" (needs `text`), "bytes", "gpt2", "bpe" (needs `path` to a
    tokenizer.json or its folder), or "hf:NAME" / "hf" with `path` (hub name or local folder)."""
    if name == "char":
        if text is None:
            raise TokenizerError("the char tokenizer is built from a text: pass text=...")
        return CharTokenizer.from_text(text)
    if name == "bytes":
        return ByteTokenizer()
    if name in ("gpt2", "tiktoken"):
        return gpt2_tokenizer()  # the one GPT-2 path: tiktoken's cache, or the offline $NANOMOE_DATA/gpt2
    if name == "bpe":
        if path is None:
            raise TokenizerError("the bpe tokenizer is loaded from a file: pass path=.../tokenizer.json")
        return BPETokenizer.load(path)
    if name.startswith("hf:") or name == "hf":
        target = name[3:] if name.startswith("hf:") else path
        if not target:
            raise TokenizerError("give the Hugging Face tokenizer as 'hf:NAME' (hub name or local folder)")
        return HFTokenizer(target)
    raise TokenizerError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")


def load_tokenizer(info: dict[str, Any], base_dir: Optional[str | os.PathLike] = None) -> Tokenizer:
    """Rebuild a tokenizer from its `info()` dict (as stored in checkpoints and data folders).
    A relative `path` is resolved against base_dir."""
    if not isinstance(info, dict) or "name" not in info:
        raise TokenizerError(f"tokenizer info must be a dict with a 'name', got {info!r}")
    name = info["name"]
    if name == "char":
        if not info.get("chars"):
            raise TokenizerError("char tokenizer info has no 'chars' alphabet")
        return CharTokenizer(list(info["chars"]))
    path = info.get("path")
    if path and base_dir is not None and not Path(path).is_absolute():
        candidate = Path(base_dir) / path
        if candidate.exists():
            path = str(candidate)
    if name == "bpe":
        return BPETokenizer.load(path) if path else get_tokenizer("bpe")
    if name == "hf":
        return get_tokenizer("hf", path=path)
    return get_tokenizer(name)


def gpt2_tokenizer() -> Tokenizer:
    """tiktoken's GPT-2 BPE, the one path every "gpt2" tokenizer takes (`get_tokenizer`,
    `load_tokenizer`, data preparation, `--tokenizer=gpt2`). Offline, tiktoken's cache is filled
    from $NANOMOE_DATA/gpt2 when that folder holds encoder.json and vocab.bpe (TIKTOKEN_CACHE_DIR is
    then set to ~/.cache/nanomoe/tiktoken)."""
    try:
        return TiktokenGPT2()
    except TokenizerError:
        shared = shared_data_dir()
        if shared is None or not (shared / "gpt2" / "encoder.json").is_file():
            raise
        os.environ["TIKTOKEN_CACHE_DIR"] = str(fill_tiktoken_cache(shared / "gpt2", cache_dir() / "tiktoken"))
        return TiktokenGPT2()
