"""Long texts to token ids: chunked encoding (equal to encoding the whole), the train/val split,
and the tokenizer comparison of chapter 04."""

from __future__ import annotations

import time
from typing import Sequence, Union

import numpy as np

from ..tokenizer import BPETokenizer, Tokenizer, get_tokenizer
from ..training.progress import tqdm
from .errors import DataError


def _safe_cut(text: str, target: int) -> int:
    """A cut position near `target` where tokenizing the two halves separately gives the same ids as
    tokenizing the whole: right after a "\\n" that sits between two non-space characters. GPT-2's
    pre-tokenizer regex then ends a piece at the newline on both sides, so chunked BPE is exact."""
    n = len(text)
    if target >= n:
        return n
    i = text.find("\n", target)
    while i != -1 and i + 1 < n:
        if i > 0 and not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.find("\n", i + 1)
    return n


def _chunks(text: str, chunk_chars: int) -> list[str]:
    out, start = [], 0
    while start < len(text):
        end = _safe_cut(text, start + chunk_chars)
        out.append(text[start:end])
        start = end
    return out


def encode_text(tok: Tokenizer, text: str, *, chunk_chars: int = 1 << 20, progress: bool = True,
                desc: str = "tokenizing") -> np.ndarray:
    """Encode a long text in chunks (cut at safe newlines, so the ids equal `tok.encode(text)`) with a
    progress bar; returns an int64 array."""
    chunks = _chunks(text, chunk_chars)
    parts = []
    with tqdm(total=len(text), desc=desc, unit="char", unit_scale=True, disable=not progress or len(chunks) < 2) as bar:
        for c in chunks:
            parts.append(np.asarray(tok.encode(c), dtype=np.int64))
            bar.update(len(c))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """Cut a text by characters, like nanoGPT: the first (1 - val_fraction) is train, the rest val."""
    if not isinstance(text, str) or not text:
        raise DataError("prepare needs a non-empty text")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_train = int(len(text) * (1.0 - val_fraction))
    if n_train == 0:
        raise DataError("the train split is empty: use a longer text or a smaller val_fraction")
    return text[:n_train], text[n_train:]


def train_bpe(train_text: str, vocab_size: int) -> BPETokenizer:
    """The course's Portuguese BPE: a byte-level BPE trained on `train_text` (pass the training split
    only, so validation stays unseen), fed to the trainer in chunks cut where BPE is exact."""
    return BPETokenizer.train(_chunks(train_text, 1 << 16), vocab_size=vocab_size)


def corpus_tokenizer(name: str, text: str, vocab_size: int = 4096, val_fraction: float = 0.1) -> Tokenizer:
    """The tokenizer `name` for this corpus: "char" = the alphabet of the whole text (so validation
    has no unknown characters), "bpe" = `train_bpe` on the training split only (validation stays
    unseen), any other name = `get_tokenizer(name)` ("bytes", "gpt2", "hf:...")."""
    if name == "char":
        return get_tokenizer("char", text=text)
    if name == "bpe":
        return train_bpe(split_text(text, val_fraction)[0], vocab_size)
    return get_tokenizer(name)


def encode_splits(tok: Tokenizer, text: str, val_fraction: float = 0.1, *,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """In-memory train/val token ids of a text (the split of `split_text`), for chapter experiments."""
    train_text, val_text = split_text(text, val_fraction)
    return encode_text(tok, train_text, progress=progress), encode_text(tok, val_text, progress=progress)

def compare_tokenizers(text: str, tokenizers: Union[dict[str, Tokenizer], Sequence[Tokenizer]],
                       progress: bool = False) -> list[dict]:
    """Encode `text` with each tokenizer; one row per tokenizer with vocab size, token count,
    tokens/char, chars/token, bytes/token, encode time and whether decode(encode(text)) == text."""
    if isinstance(tokenizers, dict):
        items = list(tokenizers.items())
    else:
        items = [(getattr(t, "name", type(t).__name__), t) for t in tokenizers]
    n_chars, n_bytes = len(text), len(text.encode("utf-8"))
    rows = []
    for name, tok in items:
        t0 = time.perf_counter()
        ids = encode_text(tok, text, progress=progress, desc=name)
        dt = time.perf_counter() - t0
        n = len(ids)
        rows.append({
            "tokenizer": name,
            "vocab_size": tok.vocab_size,
            "tokens": n,
            "chars": n_chars,
            "tokens_per_char": n / max(n_chars, 1),
            "chars_per_token": n_chars / max(n, 1),
            "bytes_per_token": n_bytes / max(n, 1),
            "roundtrip": tok.decode(ids.tolist()) == text,
            "seconds": dt,
        })
    return rows
