"""Token shards on disk: writing a prepared folder, and reading it back as memory maps.

A prepared data folder holds token shards (`train_000000.npy`, `val_000000.npy`, ...; uint16 when the
vocabulary fits in 16 bits, else uint32) and a `meta.json` describing the tokenizer and the counts
(+ `tokenizer.json` for a BPE trained on the corpus). Reading also accepts the FineWeb-Edu layout of
Karpathy's build-nanogpt (`edu_fineweb10B/fineweb_edu_{train,val}_NNNNNN.npy`, uint16 GPT-2 tokens;
`edufineweb_*` as that repository names them works too) and nanoGPT's `train.bin` / `val.bin`.
Every file is written atomically (`nanomoe.files.atomic_write`).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np

from ..files import atomic_write, write_text
from ..tokenizer import BPETokenizer, Tokenizer, load_tokenizer
from ..training.progress import tqdm
from .encode import corpus_tokenizer, encode_text, split_text
from .errors import DataError


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits (vocab < 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)

def _save_array(path: Path, arr: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, arr)


def _write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def _save_shards(ids: np.ndarray, folder: Path, prefix: str, dtype: np.dtype, shard_size: Optional[int]) -> list[str]:
    size = len(ids) if not shard_size else int(shard_size)
    names = []
    for k, start in enumerate(range(0, max(len(ids), 1), max(size, 1))):
        name = f"{prefix}_{k:06d}.npy"
        _save_array(folder / name, ids[start:start + size].astype(dtype))
        names.append(name)
    return names

def prepare(text: str, tokenizer: Union[str, Tokenizer], out_dir: Union[str, os.PathLike], val_fraction: float = 0.1,
            *, vocab_size: int = 4096, shard_size: Optional[int] = None, corpus: Optional[str] = None,
            progress: bool = True) -> dict:
    """Tokenize `text` into `out_dir`: `train_000000.npy`, `val_000000.npy` (more shards when
    `shard_size` tokens are exceeded), `meta.json`, and `tokenizer.json` for a trained BPE.

    Like nanoGPT, the text is cut by characters: the first (1 - val_fraction) is train, the rest val.
    `tokenizer` is a Tokenizer or a name: "char" (alphabet of the whole text, so val has no unknown
    characters), "bytes", "gpt2", or "bpe" (a byte-level BPE of `vocab_size` trained on the train part
    only, so validation stays unseen). Returns the meta dict."""
    train_text, val_text = split_text(text, val_fraction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    tok_files = []
    tok = corpus_tokenizer(tokenizer, text, vocab_size, val_fraction) if isinstance(tokenizer, str) else tokenizer
    info = dict(tok.info())
    if isinstance(tok, BPETokenizer):
        tok.save(out / "tokenizer.json")
        info["path"] = "tokenizer.json"  # relative: load_tokenizer(info, base_dir=out_dir)
        tok_files.append("tokenizer.json")
    train_ids = encode_text(tok, train_text, progress=progress, desc="tokenizing train")
    val_ids = encode_text(tok, val_text, progress=progress, desc="tokenizing val")
    if len(train_ids) and int(train_ids.max()) >= tok.vocab_size:
        raise DataError(f"token id {int(train_ids.max())} >= vocab_size {tok.vocab_size}")
    dtype = token_dtype(tok.vocab_size)
    for old in list(out.glob("train_*.npy")) + list(out.glob("val_*.npy")):
        old.unlink()  # a re-run must not leave stale shards behind
    shards = {
        "train": _save_shards(train_ids, out, "train", dtype, shard_size),
        "val": _save_shards(val_ids, out, "val", dtype, shard_size) if len(val_ids) else [],
    }
    n_tok = len(train_ids) + len(val_ids)
    meta = {
        "format": "nanomoe-data",
        "version": 1,
        "corpus": corpus,
        "tokenizer": info,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "train_tokens": int(len(train_ids)),
        "val_tokens": int(len(val_ids)),
        "train_chars": len(train_text),
        "val_chars": len(val_text),
        "tokens_per_char": n_tok / len(text),
        "shards": shards,
        "files": tok_files,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    _write_json(out / "meta.json", meta)
    return meta


def summary(meta: dict) -> str:
    """One readable paragraph about a prepared folder (printed by the prepare scripts)."""
    tok = meta["tokenizer"]["name"]
    lines = [
        f"tokenizer {tok} (vocab {meta['vocab_size']:,}, {meta['dtype']})",
        f"train {meta['train_tokens']:,} tokens in {len(meta['shards']['train'])} shard(s), "
        f"val {meta['val_tokens']:,} tokens in {len(meta['shards']['val'])} shard(s)",
    ]
    if meta.get("tokens_per_char") is not None:
        chars = meta.get("train_chars", 0) + meta.get("val_chars", 0)
        lines.append(f"{chars:,} characters -> {meta['tokens_per_char']:.3f} tokens/char")
    return "\n".join(lines)

def _document_ids(documents: Iterable[str], tok: Tokenizer, eot: int, max_tokens: Optional[int],
                  bar: tqdm) -> Iterator[np.ndarray]:
    """Each document's ids preceded by the end-of-text token; the stream stops at max_tokens."""
    total = 0
    for doc in documents:
        ids = np.asarray([eot] + tok.encode(doc), dtype=np.int64)
        if max_tokens is not None:
            ids = ids[: max_tokens - total]
        total += len(ids)
        bar.update(len(ids))
        yield ids
        if max_tokens is not None and total >= max_tokens:
            return


def _fixed_size(pieces: Iterable[np.ndarray], size: int, dtype: np.dtype) -> Iterator[np.ndarray]:
    """The concatenation of `pieces` cut into arrays of `size` tokens (the last one may be shorter)."""
    buf, filled = np.empty(size, dtype=dtype), 0
    for ids in pieces:
        pos = 0
        while pos < len(ids):
            take = min(size - filled, len(ids) - pos)
            buf[filled:filled + take] = ids[pos:pos + take]
            filled, pos = filled + take, pos + take
            if filled == size:
                yield buf.copy()
                filled = 0
    if filled:
        yield buf[:filled].copy()


def write_document_shards(documents: Iterable[str], tok: Tokenizer, out_dir: Union[str, os.PathLike], *,
                          prefix: str = "fineweb_edu", shard_size: int = 100_000_000,
                          max_tokens: Optional[int] = None, progress: bool = True) -> dict:
    """Tokenize a stream of documents into fixed-size shards, build-nanogpt style: each document is
    preceded by the end-of-text token (GPT-2's 50256) so documents are delimited; the first shard is
    `{prefix}_val_000000.npy` and the rest `{prefix}_train_NNNNNN.npy`. Writes meta.json too."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eot = getattr(tok, "eot", None)
    if eot is None:
        raise DataError(f"the {tok.name} tokenizer has no end-of-text token to delimit documents; use gpt2")
    dtype = token_dtype(tok.vocab_size)
    shards: dict[str, list[str]] = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}
    n_docs = 0  # every document starts with one end-of-text token (plain text never encodes to it)
    with tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
        stream = _document_ids(documents, tok, eot, max_tokens, bar)
        for k, chunk in enumerate(_fixed_size(stream, shard_size, dtype)):
            split = "val" if k == 0 else "train"
            name = f"{prefix}_{split}_{k:06d}.npy"
            _save_array(out / name, chunk)
            shards[split].append(name)
            counts[split] += len(chunk)
            n_docs += int((chunk == eot).sum())
    if not shards["val"]:
        raise DataError("no documents to tokenize (the source yielded nothing)")
    meta = {
        "format": "nanomoe-data",
        "version": 1,
        "corpus": prefix,
        "tokenizer": dict(tok.info()),
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "documents": n_docs,
        "shard_size": shard_size,
        "shards": shards,
        "tokens_per_char": None,
    }
    _write_json(out / "meta.json", meta)
    return meta

FINEWEB_DIR = "edu_fineweb10B"
_SHARD_PATTERNS = (
    r"{split}_\d+\.npy",  # ours
    r"fineweb_edu_{split}_\d+\.npy",  # FineWeb-Edu, as this course names it
    r"edufineweb_{split}_\d+\.npy",  # FineWeb-Edu, as build-nanogpt's fineweb.py names it
)


def _shard_files(folder: Path, split: str) -> list[Path]:
    pats = [re.compile(p.format(split=re.escape(split))) for p in _SHARD_PATTERNS]
    return sorted(p for p in folder.iterdir() if p.is_file() and any(r.fullmatch(p.name) for r in pats))


def load_meta(folder: Union[str, os.PathLike]) -> dict:
    """meta.json of a prepared folder; for a FineWeb-Edu folder without one, GPT-2 tokens are assumed."""
    folder = Path(folder)
    for f in (folder / "meta.json", folder / FINEWEB_DIR / "meta.json"):
        if f.is_file():
            return json.loads(f.read_text(encoding="utf-8"))
    if folder.is_dir() and (
        any(folder.glob("*fineweb*_train_*.npy")) or any((folder / FINEWEB_DIR).glob("*fineweb*_train_*.npy"))
    ):
        return {"format": "fineweb-edu", "tokenizer": {"name": "gpt2"}, "vocab_size": 50257, "dtype": "uint16"}
    raise DataError(f"no meta.json in {folder}: prepare the folder with a data/prepare_*.py script")


def data_tokenizer(folder: Union[str, os.PathLike]) -> Tokenizer:
    """The tokenizer a prepared folder was made with (from its meta.json)."""
    folder = Path(folder)
    meta = load_meta(folder)
    base = folder if (folder / "meta.json").is_file() else folder / FINEWEB_DIR
    return load_tokenizer(meta["tokenizer"], base_dir=base)


def load_split(folder: Union[str, os.PathLike], split: str) -> list[np.ndarray]:
    """The token shards of one split ("train" or "val") as read-only memory maps, in order.

    Reads our layout (`train_000000.npy`, ...), FineWeb-Edu's (`fineweb_edu_train_000001.npy` /
    `edufineweb_train_...`, directly in `folder` or in `folder/edu_fineweb10B/`) and nanoGPT's
    `train.bin` (uint16 unless meta.json says otherwise)."""
    folder = Path(folder)
    hint = "prepare it first, e.g. `uv run -m data.prepare_machado` (options: --help)"
    if not folder.exists():
        raise DataError(f"data folder {folder} does not exist: {hint}")
    if not folder.is_dir():
        raise DataError(f"data folder {folder} is not a folder: {hint}")
    files = _shard_files(folder, split)
    if not files and (folder / FINEWEB_DIR).is_dir():
        files = _shard_files(folder / FINEWEB_DIR, split)
    if files:
        arrays = []
        for f in files:
            try:
                a = np.load(f, mmap_mode="r", allow_pickle=False)
            except (ValueError, EOFError, OSError) as e:  # an empty, truncated or corrupt file
                raise DataError(f"shard {f} is not a readable .npy file ({e}); prepare the folder again") from None
            if a.ndim != 1 or a.dtype.kind not in "ui":
                raise DataError(f"shard {f} should be a 1-D integer array, got {a.dtype} with shape {a.shape}")
            if a.size == 0:
                raise DataError(f"shard {f} is empty; prepare the folder again")
            arrays.append(a)
        return arrays
    bin_file = folder / f"{split}.bin"
    if bin_file.is_file():
        dtype = np.uint16
        if (folder / "meta.json").is_file():
            dtype = np.dtype(json.loads((folder / "meta.json").read_text()).get("dtype", "uint16"))
        if bin_file.stat().st_size == 0:
            raise DataError(f"{bin_file} is empty; prepare the folder again")
        return [np.memmap(bin_file, dtype=dtype, mode="r")]
    present = sorted(p.name for p in folder.iterdir())[:10]
    raise DataError(
        f"no {split!r} shards in {folder} (expected {split}_000000.npy, fineweb_edu_{split}_000000.npy in it or in "
        f"{FINEWEB_DIR}/, or {split}.bin); found {present if present else 'an empty folder'}: {hint}"
    )
