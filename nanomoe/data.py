"""Data: corpora, token shards on disk, and the batch loader.

A prepared data folder holds token shards (`train_000000.npy`, `val_000000.npy`, ...; uint16 when the
vocabulary fits in 16 bits, else uint32) and a `meta.json` describing the tokenizer and the counts
(+ `tokenizer.json` for a BPE trained on the corpus). The loader also reads the FineWeb-Edu layout of
Karpathy's build-nanogpt (`edu_fineweb10B/fineweb_edu_{train,val}_NNNNNN.npy`, uint16 GPT-2 tokens;
`edufineweb_*` as that repository names them works too) and nanoGPT's `train.bin` / `val.bin`.

`BatchLoader` draws (x, y) batches from memory-mapped shards, y being x shifted by one token:
random windows (nanoGPT's `get_batch`) or sequential non-overlapping windows, rank-aware under DDP,
and resumable: its whole position is a tiny dict (`state_dict()`) that is the same on every rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from .paths import cache_dir, data_root, in_home, shared_data_dir
from .tokenizer import BPETokenizer, Tokenizer, get_tokenizer, load_tokenizer


class DataError(ValueError):
    """A data folder, corpus or loader setting is unusable; the message says what to do."""


# ----------------------------------------------------------------------------------------------
# Corpora (canonical sources: shared/data/README.md)

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

MACHADO_BASE_URL = (
    "https://raw.githubusercontent.com/luxedo/dataset-machado-de-assis/a13ca4a72f268f46db64804a67930d4c0f6db8e7/"
)
# file name -> path in the source repository (the corpus is their concatenation in sorted name order)
MACHADO_FILES = {
    "casaVelha.txt": "txt/romance/casaVelha.txt",
    "contosFluminenses.txt": "txt/conto/contosFluminenses.txt",
    "domCasmurro.txt": "txt/romance/domCasmurro.txt",
    "esau.txt": "txt/romance/esau.txt",
    "helena.txt": "txt/romance/helena.txt",
    "historiasMeiaNoite.txt": "txt/conto/historiasMeiaNoite.txt",
    "historiasSemData.txt": "txt/conto/historiasSemData.txt",
    "iaia.txt": "txt/romance/iaia.txt",
    "maoLuva.txt": "txt/romance/maoLuva.txt",
    "memorial-de-aires.txt": "txt/romance/memorial-de-aires.txt",
    "memoriasBras.txt": "txt/romance/memoriasBras.txt",
    "paginasRecolhidas.txt": "txt/conto/paginasRecolhidas.txt",
    "papeisAvulsos.txt": "txt/conto/papeisAvulsos.txt",
    "quincas.txt": "txt/romance/quincas.txt",
    "reliquias.txt": "txt/conto/reliquias.txt",
    "ressurreicao.txt": "txt/romance/ressurreicao.txt",
    "variasHistorias.txt": "txt/conto/variasHistorias.txt",
}
MACHADO_SHA256 = "ea5647a27157101a7ba2ba7d966bcf54231cfdecc53c22b3c784e16a5281eedf"  # of the concatenation

CORPORA = ("machado", "tinyshakespeare")


def _download(url: str, timeout: float = 30.0) -> bytes:
    if os.environ.get("NANOMOE_OFFLINE", "") not in ("", "0"):
        raise DataError(f"NANOMOE_OFFLINE is set, so {url} is not downloaded")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read()
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"could not download {url} ({type(e).__name__}: {e})") from None


def _read_text_file(path: Path) -> str:
    # newline="" keeps the text byte-exact (no \r\n translation surprises)
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def _read_machado_folder(folder: Path) -> str:
    files = sorted(folder.glob("*.txt"), key=lambda p: p.name.encode("utf-8"))  # LC_ALL=C order
    if not files:
        raise DataError(f"no .txt files in {folder}: expected Machado's {len(MACHADO_FILES)} files")
    return "".join(_read_text_file(p) for p in files)


def _download_machado() -> str:
    dest = cache_dir() / "machado"
    dest.mkdir(parents=True, exist_ok=True)
    for fname, rel in MACHADO_FILES.items():
        if not (dest / fname).is_file():
            data = _download(MACHADO_BASE_URL + rel)
            (dest / fname).write_bytes(data)
    text = _read_machado_folder(dest)
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != MACHADO_SHA256:
        raise DataError(f"the downloaded Machado corpus in {dest} does not match its sha256; delete the folder and retry")
    return text


def _download_tinyshakespeare() -> str:
    dest = cache_dir() / "tinyshakespeare" / "input.txt"
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        data = _download(TINYSHAKESPEARE_URL)
        if hashlib.sha256(data).hexdigest() != TINYSHAKESPEARE_SHA256:
            raise DataError(f"the file downloaded from {TINYSHAKESPEARE_URL} does not match its sha256")
        dest.write_bytes(data)
    return _read_text_file(dest)


def read_corpus(name: str, source: Optional[Union[str, os.PathLike]] = None) -> str:
    """The text of a corpus: "machado" (Machado de Assis, pt-br: the concatenation of machado/*.txt in
    sorted order) or "tinyshakespeare".

    `source` is a local .txt file or a folder (for machado, of its .txt files; for tinyshakespeare,
    holding input.txt). Without it: the offline copy under shared_data_dir(), else a download from the
    canonical URL (cached in ~/.cache/nanomoe, checked against its sha256)."""
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)} (or pass your own text)")
    if source is not None:
        src = Path(source)
        if not src.exists():
            raise DataError(f"source {src} does not exist")
        if src.is_file():
            text = _read_text_file(src)
        elif name == "tinyshakespeare" and (src / "input.txt").is_file():
            text = _read_text_file(src / "input.txt")
        elif name == "tinyshakespeare" and (src / "tinyshakespeare" / "input.txt").is_file():
            text = _read_text_file(src / "tinyshakespeare" / "input.txt")
        elif name == "machado" and (src / "machado").is_dir():
            text = _read_machado_folder(src / "machado")
        else:
            text = _read_machado_folder(src) if name == "machado" else _single_txt(src)
        if not text:
            raise DataError(f"source {src} is empty")
        return text
    shared = shared_data_dir()
    if shared is not None:
        if name == "machado" and (shared / "machado").is_dir():
            return _read_machado_folder(shared / "machado")
        if name == "tinyshakespeare" and (shared / "tinyshakespeare" / "input.txt").is_file():
            return _read_text_file(shared / "tinyshakespeare" / "input.txt")
    try:
        return _download_machado() if name == "machado" else _download_tinyshakespeare()
    except DataError as e:
        raise DataError(
            f"corpus {name!r} is not available offline and its download failed ({e}); pass a local copy: "
            f"`uv run -m data.prepare_{name} --source PATH` (a .txt file or folder), or set NANOMOE_DATA to a "
            f"folder holding machado/*.txt and tinyshakespeare/input.txt"
        ) from None


def _single_txt(folder: Path) -> str:
    files = sorted(folder.glob("*.txt"))
    if len(files) != 1:
        raise DataError(f"{folder} should hold exactly one .txt file (found {len(files)}); pass the file itself")
    return _read_text_file(files[0])


# ----------------------------------------------------------------------------------------------
# Tokenizing and writing shards


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits (vocab < 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


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
    from tqdm.auto import tqdm

    chunks = _chunks(text, chunk_chars)
    parts = []
    with tqdm(total=len(text), desc=desc, unit="char", unit_scale=True, disable=not progress or len(chunks) < 2) as bar:
        for c in chunks:
            parts.append(np.asarray(tok.encode(c), dtype=np.int64))
            bar.update(len(c))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _save_shards(ids: np.ndarray, folder: Path, prefix: str, dtype: np.dtype, shard_size: Optional[int]) -> list[str]:
    size = len(ids) if not shard_size else int(shard_size)
    names = []
    for k, start in enumerate(range(0, max(len(ids), 1), max(size, 1))):
        name = f"{prefix}_{k:06d}.npy"
        _atomic_save(folder / name, ids[start:start + size].astype(dtype))
        names.append(name)
    return names


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


def encode_splits(tok: Tokenizer, text: str, val_fraction: float = 0.1, *, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """In-memory train/val token ids of a text (the split of `split_text`), for chapter experiments."""
    train_text, val_text = split_text(text, val_fraction)
    return encode_text(tok, train_text, progress=progress), encode_text(tok, val_text, progress=progress)


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
    if isinstance(tokenizer, str):
        if tokenizer == "char":
            tok = get_tokenizer("char", text=text)
        elif tokenizer == "bpe":
            tok = BPETokenizer.train(_chunks(train_text, 1 << 16), vocab_size=vocab_size)
        else:
            tok = get_tokenizer(tokenizer)
    else:
        tok = tokenizer
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


# ----------------------------------------------------------------------------------------------
# Reading shards

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


# ----------------------------------------------------------------------------------------------
# The batch loader

# a 1-D array / tensor of token ids, or a list of them (shards)
TokenSource = Union[np.ndarray, torch.Tensor, Sequence[Union[np.ndarray, torch.Tensor]]]


def _as_arrays(tokens: TokenSource) -> list[np.ndarray]:
    if isinstance(tokens, (np.ndarray, torch.Tensor)):
        tokens = [tokens]
    arrays = []
    for t in tokens:
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().numpy()
        a = np.asarray(t)
        if a.ndim != 1:
            raise DataError(f"token arrays must be 1-D, got shape {a.shape}")
        arrays.append(a)
    if not arrays:
        raise DataError("no token arrays given to the loader (an empty list of shards)")
    return arrays


class BatchLoader:
    """(x, y) batches of shape (batch_size, block_size), int64, with y = x shifted by one token.

    random (default): each row is a window starting at a uniformly random position of the
      concatenated shards (windows never straddle two shards), like nanoGPT's `get_batch`.
    sequential: non-overlapping windows in order, shard after shard, wrapping around at the end
      (`epoch` counts the wraps); good for evaluation and for one pass over a large corpus.

    Under DDP every rank builds the loader with the same seed and its own `rank`/`world_size`.
    Batches are numbered globally: rank r's n-th call returns global batch n*world_size + r, so ranks
    never draw the same batch, world_size ranks with 1 micro-step see exactly what 1 process with
    world_size accumulation micro-steps sees, and the state (a count of global batches) is identical
    on every rank: rank 0's checkpoint resumes all of them. Random batch g is drawn from a generator
    seeded with (seed, g), so it does not depend on anything drawn before it.
    """

    def __init__(self, tokens: TokenSource, batch_size: int, block_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, sequential: bool = False):
        if batch_size < 1 or block_size < 1:
            raise DataError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.shards = _as_arrays(tokens)
        self.batch_size, self.block_size = int(batch_size), int(block_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.sequential = bool(sequential)
        T = self.block_size
        for i, s in enumerate(self.shards):
            if len(s) < T + 1:  # a window needs T inputs plus the one extra target
                raise DataError(
                    f"shard {i} has {len(s)} tokens but block_size={T} needs at least {T + 1}; "
                    f"use a smaller block_size or more data"
                )
        # random mode: valid start positions per shard, s in [0, len - T - 1]
        self._starts = np.array([len(s) - T for s in self.shards], dtype=np.int64)
        self._starts_cum = np.cumsum(self._starts)
        # sequential mode: non-overlapping windows per shard (each uses T+1 tokens, consecutive windows share one)
        self._windows = np.array([(len(s) - 1) // T for s in self.shards], dtype=np.int64)
        self._windows_cum = np.cumsum(self._windows)
        self.global_batches = 0  # batches handed out so far, counted over all ranks

    @property
    def windows_per_epoch(self) -> int:
        """Number of non-overlapping windows in one sequential pass."""
        return int(self._windows_cum[-1])

    @property
    def epoch(self) -> int:
        """Completed sequential passes over the data (random mode: equivalent passes in tokens)."""
        rows = self.global_batches * self.batch_size
        return int(rows // self.windows_per_epoch)

    def _locate(self, flat: np.ndarray, cum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shard = np.searchsorted(cum, flat, side="right")
        offset = flat - np.concatenate(([0], cum[:-1]))[shard]
        return shard, offset

    def positions(self, global_batch: int) -> list[tuple[int, int]]:
        """(shard index, start token) of each row of global batch number `global_batch`."""
        B, T = self.batch_size, self.block_size
        if self.sequential:
            rows = (global_batch * B + np.arange(B)) % self.windows_per_epoch
            shard, w = self._locate(rows, self._windows_cum)
            start = w * T
        else:
            rng = np.random.default_rng([self.seed, global_batch])
            flat = rng.integers(0, int(self._starts_cum[-1]), size=B)
            shard, start = self._locate(flat, self._starts_cum)
        return [(int(a), int(b)) for a, b in zip(shard, start)]

    def next_batch(self, device: Union[str, torch.device] = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) for this rank, int64 (B, T), moved to `device` (pinned + non_blocking on CUDA)."""
        g = self.global_batches + self.rank
        T = self.block_size
        rows = [np.asarray(self.shards[s][p:p + T + 1], dtype=np.int64) for s, p in self.positions(g)]
        buf = torch.from_numpy(np.stack(rows))  # (B, T+1)
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        self.global_batches += self.world_size
        device = torch.device(device)
        if device.type == "cuda":
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            x, y = x.to(device), y.to(device)
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The loader's position (the same on every rank); save it in the checkpoint."""
        return {
            "version": 1,
            "global_batches": int(self.global_batches),
            "seed": self.seed,
            "sequential": self.sequential,
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "n_tokens": int(sum(len(s) for s in self.shards)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from any rank; a different world_size continues from the same global
        batch count, rounded up to a whole step of the new world)."""
        if not isinstance(state, dict) or "global_batches" not in state:
            raise DataError(f"not a BatchLoader state: {state!r}")
        for key in ("seed", "sequential", "batch_size", "block_size", "n_tokens"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise DataError(
                    f"cannot resume this loader: saved {key}={state[key]!r} but this loader has {key}={mine!r} "
                    f"(resume with the same data and settings)"
                )
        g = int(state["global_batches"])
        self.global_batches = -(-g // self.world_size) * self.world_size

    def __repr__(self) -> str:
        mode = "sequential" if self.sequential else "random"
        n = sum(len(s) for s in self.shards)
        return (f"BatchLoader({mode}, {len(self.shards)} shard(s), {n:,} tokens, batch {self.batch_size}x"
                f"{self.block_size}, rank {self.rank}/{self.world_size})")


# ----------------------------------------------------------------------------------------------
# Comparing tokenizers (chapter 04)


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


def iter_documents(source: Union[str, os.PathLike]) -> Iterator[str]:
    """Documents from a local file or folder: .jsonl (a "text" field per line), .parquet (a "text"
    column; needs pyarrow), .txt (the whole file is one document). Folders are read in sorted order.
    A missing or empty source raises DataError at once (before anything is written)."""
    src = Path(source)
    if not src.exists():
        raise DataError(f"source {src} does not exist")
    kinds = (".jsonl", ".parquet", ".txt")
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.suffix in kinds)
    if not files:
        raise DataError(f"no .jsonl, .parquet or .txt files in {src}")
    bad = [f for f in files if f.suffix not in kinds]
    if bad:
        raise DataError(f"{bad[0]}: expected a .jsonl, .parquet or .txt file")
    if any(f.suffix == ".parquet" for f in files):
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise DataError("reading .parquet files needs pyarrow: `uv pip install pyarrow` (or convert them to .jsonl)") from None
    return _read_documents(files)


def _read_documents(files: list[Path]) -> Iterator[str]:
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)["text"]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise DataError(f"{f}:{n}: expected a JSON object with a \"text\" field") from None
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(f).iter_batches(columns=["text"]):
                yield from batch.column(0).to_pylist()
        else:
            yield _read_text_file(f)


def write_document_shards(documents: Iterable[str], tok: Tokenizer, out_dir: Union[str, os.PathLike], *,
                          prefix: str = "fineweb_edu", shard_size: int = 100_000_000,
                          max_tokens: Optional[int] = None, progress: bool = True) -> dict:
    """Tokenize a stream of documents into fixed-size shards, build-nanogpt style: each document is
    preceded by the end-of-text token (GPT-2's 50256) so documents are delimited; the first shard is
    `{prefix}_val_000000.npy` and the rest `{prefix}_train_NNNNNN.npy`. Writes meta.json too."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eot = getattr(tok, "eot", None)
    if eot is None:
        raise DataError(f"the {tok.name} tokenizer has no end-of-text token to delimit documents; use gpt2")
    dtype = token_dtype(tok.vocab_size)
    buf = np.empty(shard_size, dtype=dtype)
    filled, shard_index, total, n_docs = 0, 0, 0, 0
    shards: dict[str, list[str]] = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}

    def flush(n: int) -> None:
        nonlocal shard_index
        split = "val" if shard_index == 0 else "train"
        name = f"{prefix}_{split}_{shard_index:06d}.npy"
        _atomic_save(out / name, buf[:n].copy())
        shards[split].append(name)
        counts[split] += n
        shard_index += 1

    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="tokenizing", disable=not progress)
    for doc in documents:
        ids = np.asarray([eot] + tok.encode(doc), dtype=np.int64)
        if max_tokens is not None:
            ids = ids[: max_tokens - total]
        n_docs += 1
        pos = 0
        while pos < len(ids):
            take = min(shard_size - filled, len(ids) - pos)
            buf[filled:filled + take] = ids[pos:pos + take]
            filled, pos = filled + take, pos + take
            if filled == shard_size:
                flush(filled)
                filled = 0
        total += len(ids)
        bar.update(len(ids))
        if max_tokens is not None and total >= max_tokens:
            break
    bar.close()
    if total == 0:
        raise DataError("no documents to tokenize (the source yielded nothing)")
    if filled:
        flush(filled)
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


# ----------------------------------------------------------------------------------------------
# Command-line front ends of the data/prepare_*.py scripts (kept here so the scripts stay thin)

def gpt2_tokenizer() -> Tokenizer:
    """tiktoken's GPT-2 BPE; offline, tiktoken's cache is filled from shared_data_dir()/gpt2 when
    that folder exists (TIKTOKEN_CACHE_DIR is then set to ~/.cache/nanomoe/tiktoken)."""
    from .tokenizer import TokenizerError, fill_tiktoken_cache

    try:
        return get_tokenizer("gpt2")
    except TokenizerError:
        shared = shared_data_dir()
        if shared is None or not (shared / "gpt2" / "encoder.json").is_file():
            raise
        os.environ["TIKTOKEN_CACHE_DIR"] = str(fill_tiktoken_cache(shared / "gpt2", cache_dir() / "tiktoken"))
        return get_tokenizer("gpt2")


def _parser(description: str):
    import argparse

    return argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def prepare_corpus_cli(corpus: str, argv: Optional[Sequence[str]] = None) -> dict:
    """`uv run -m data.prepare_<corpus> [--tokenizer char|bytes|gpt2|bpe] [--vocab_size 4096]
    [--source PATH] [--out_dir DIR] [--val_fraction 0.1]`: read, tokenize, write shards, print a summary."""
    p = _parser(f"Tokenize the {corpus} corpus into token shards + meta.json (nanomoe.data.prepare).")
    p.add_argument("--tokenizer", default="char", choices=["char", "bytes", "gpt2", "bpe"])
    p.add_argument("--vocab_size", type=int, default=4096, help="vocabulary of the trained BPE (--tokenizer bpe)")
    p.add_argument("--source", default=None,
                   help="local file or folder to read instead of ../shared/data or the canonical URL")
    p.add_argument("--out_dir", default=None, help="output folder (default: data/<corpus>_<tokenizer>/)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="last fraction of the characters kept for validation")
    p.add_argument("--shard_size", type=int, default=0, help="tokens per shard (0: one shard per split)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    try:
        if a.vocab_size < 257 and a.tokenizer == "bpe":
            raise DataError(f"--vocab_size must exceed the 256 byte symbols of a byte-level BPE, got {a.vocab_size}")
        name = a.tokenizer if a.tokenizer != "bpe" or a.vocab_size == 4096 else f"bpe{a.vocab_size}"
        out_dir = Path(a.out_dir) if a.out_dir else data_root() / f"{corpus}_{name}"
        t0 = time.perf_counter()
        text = read_corpus(corpus, a.source)
        print(f"{corpus}: {len(text):,} characters, {len(text.encode('utf-8')):,} UTF-8 bytes, "
              f"{len(set(text))} distinct characters")
        tok: Union[str, Tokenizer] = gpt2_tokenizer() if a.tokenizer == "gpt2" else a.tokenizer
        meta = prepare(text, tok, out_dir, a.val_fraction, vocab_size=a.vocab_size, shard_size=a.shard_size or None,
                       corpus=corpus, progress=not a.no_progress)
    except (DataError, ValueError) as e:  # TokenizerError is a ValueError too
        raise SystemExit(f"error: {e}") from None
    print(summary(meta))
    print(f"wrote {out_dir} in {time.perf_counter() - t0:.1f} s")
    return meta


def prepare_fineweb_cli(argv: Optional[Sequence[str]] = None) -> dict:
    """`uv run -m data.prepare_fineweb`: FineWeb-Edu sample-10BT (HF `datasets`, streaming) or a local
    `--source` folder of .parquet/.jsonl/.txt, into build-nanogpt's layout of uint16 GPT-2 shards."""
    p = _parser("Tokenize FineWeb-Edu (sample-10BT) with GPT-2's BPE into shards of --shard_size tokens "
                "(first shard = val), like build-nanogpt's fineweb.py.")
    p.add_argument("--tokenizer", default="gpt2", choices=["gpt2"],
                   help="GPT-2's BPE (documents are delimited by its <|endoftext|> token)")
    p.add_argument("--source", default=None, help="local .parquet/.jsonl/.txt file or folder (offline)")
    p.add_argument("--out_dir", default=f"data/{FINEWEB_DIR}", help="output folder (relative: under $NANOMOE_HOME when set)")
    p.add_argument("--shard_size", type=int, default=100_000_000, help="tokens per shard")
    p.add_argument("--max_tokens", type=int, default=0, help="stop after this many tokens (0: all)")
    p.add_argument("--remote_name", default="sample-10BT", help="FineWeb-Edu subset on the Hugging Face hub")
    p.add_argument("--no_progress", action="store_true")
    a = p.parse_args(argv)
    try:
        if a.source:
            docs: Iterable[str] = iter_documents(a.source)
        else:
            try:
                import datasets  # optional: not a dependency of nanomoe
            except ImportError:
                raise DataError("streaming FineWeb-Edu needs the `datasets` package: `uv pip install datasets` "
                                "(or pass --source with local .parquet/.jsonl/.txt files)") from None
            ds = datasets.load_dataset("HuggingFaceFW/fineweb-edu", name=a.remote_name, split="train", streaming=True)
            docs = (row["text"] for row in ds)
        t0 = time.perf_counter()
        meta = write_document_shards(docs, gpt2_tokenizer(), in_home(a.out_dir), shard_size=a.shard_size,
                                     max_tokens=a.max_tokens or None, progress=not a.no_progress)
    except (DataError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(summary(meta))
    print(f"{meta['documents']:,} documents; wrote {a.out_dir} in {time.perf_counter() - t0:.1f} s")
    if not meta["shards"]["train"]:
        print(f"note: everything fit in the first (val) shard; use a smaller --shard_size or more --max_tokens "
              f"to get train shards")
    return meta
