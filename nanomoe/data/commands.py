"""The command lines of data/prepare_*.py (kept here so the scripts stay thin).

They follow the course's one convention (`nanomoe.training.cli.parse_args`): `--key=value`, `--flag`/`--no-flag`,
`--help`; a bad option or input ends with one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Iterable, Optional, Sequence, Union

from ..paths import data_root, in_home
from ..tokenizer import Tokenizer, gpt2_tokenizer
from ..training.cli import CLIError, parse_args
from .corpora import iter_documents, read_corpus
from .errors import DataError
from .shards import FINEWEB_DIR, prepare, summary, write_document_shards

CORPUS_DEFAULTS = dict(
    tokenizer="char",  # char | bytes | gpt2 | bpe
    vocab_size=4096,  # vocabulary of the trained BPE (--tokenizer=bpe)
    source="",  # a local file or folder to read instead of $NANOMOE_DATA or the canonical URL
    out_dir="",  # output folder (default: data/<corpus>_<tokenizer>/)
    val_fraction=0.1,  # last fraction of the characters kept for validation
    shard_size=0,  # tokens per shard (0: one shard per split)
    progress=True,  # progress bars (--no-progress: none)
)

FINEWEB_DEFAULTS = dict(
    source="",  # a local .parquet/.jsonl/.txt file or folder (offline); empty: stream from the hub
    out_dir=f"data/{FINEWEB_DIR}",  # output folder (relative: under $NANOMOE_HOME when set)
    shard_size=100_000_000,  # tokens per shard
    max_tokens=0,  # stop after this many tokens (0: all)
    remote_name="sample-10BT",  # FineWeb-Edu subset on the Hugging Face hub
    progress=True,
)


def _fail(e: Exception) -> SystemExit:
    return SystemExit(f"error: {e}")


def prepare_corpus_cli(corpus: str, argv: Optional[Sequence[str]] = None) -> dict:
    """`uv run -m data.prepare_<corpus> [--tokenizer=char|bytes|gpt2|bpe] [--vocab_size=4096]
    [--source=PATH] [--out_dir=DIR] [--val_fraction=0.1]`: read, tokenize, write shards, print a summary."""
    try:
        a = parse_args(CORPUS_DEFAULTS, argv, description=f"Tokenize the {corpus} corpus into token shards.")
        if a.vocab_size < 257 and a.tokenizer == "bpe":
            raise DataError(f"--vocab_size must exceed the 256 byte symbols of a byte-level BPE, got {a.vocab_size}")
        name = a.tokenizer if a.tokenizer != "bpe" or a.vocab_size == 4096 else f"bpe{a.vocab_size}"
        out_dir = in_home(a.out_dir) if a.out_dir else data_root() / f"{corpus}_{name}"
        t0 = time.perf_counter()
        text = read_corpus(corpus, a.source or None)
        print(f"{corpus}: {len(text):,} characters, {len(text.encode('utf-8')):,} UTF-8 bytes, "
              f"{len(set(text))} distinct characters")
        tok: Union[str, Tokenizer] = gpt2_tokenizer() if a.tokenizer == "gpt2" else a.tokenizer
        meta = prepare(text, tok, out_dir, a.val_fraction, vocab_size=a.vocab_size, shard_size=a.shard_size or None,
                       corpus=corpus, progress=a.progress)
    except (DataError, CLIError, ValueError) as e:  # TokenizerError is a ValueError too
        raise _fail(e) from None
    print(summary(meta))
    print(f"wrote {out_dir} in {time.perf_counter() - t0:.1f} s")
    return meta


def _hub_documents(remote_name: str) -> Iterable[str]:
    try:
        import datasets  # optional and heavy: not a dependency of nanomoe, only this path needs it
    except ImportError:
        raise DataError("streaming FineWeb-Edu needs the `datasets` package: `uv pip install datasets` "
                        "(or pass --source with local .parquet/.jsonl/.txt files)") from None
    ds = datasets.load_dataset("HuggingFaceFW/fineweb-edu", name=remote_name, split="train", streaming=True)
    return (row["text"] for row in ds)


def prepare_fineweb_cli(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """`uv run -m data.prepare_fineweb`: FineWeb-Edu sample-10BT (HF `datasets`, streaming) or a local
    `--source` folder of .parquet/.jsonl/.txt, into build-nanogpt's layout of uint16 GPT-2 shards."""
    try:
        a = parse_args(FINEWEB_DEFAULTS, argv, description="Tokenize FineWeb-Edu with GPT-2's BPE into shards of "
                       "--shard_size tokens (first shard = val), like build-nanogpt's fineweb.py.")
        docs = iter(iter_documents(a.source) if a.source else _hub_documents(a.remote_name))
        first = next(docs, None)  # a malformed source fails here, before the tokenizer (a download) is needed
        docs = itertools.chain([] if first is None else [first], docs)
        t0 = time.perf_counter()
        meta = write_document_shards(docs, gpt2_tokenizer(), in_home(a.out_dir), shard_size=a.shard_size,
                                     max_tokens=a.max_tokens or None, progress=a.progress)
    except (DataError, CLIError, ValueError) as e:
        raise _fail(e) from None
    print(summary(meta))
    print(f"{meta['documents']:,} documents; wrote {a.out_dir} in {time.perf_counter() - t0:.1f} s")
    if not meta["shards"]["train"]:
        print("note: everything fit in the first (val) shard; use a smaller --shard_size or more --max_tokens "
              "to get train shards")
    return meta
