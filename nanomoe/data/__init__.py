"""Data: from a public corpus to the (x, y) batches of the training loop.

| module | holds |
|---|---|
| `corpora.py` | the public corpora (URLs + sha256), `read_corpus`, your own documents (`iter_documents`) |
| `encode.py` | long text -> token ids (`encode_text`), the train/val split, the tokenizer comparison |
| `shards.py` | prepared folders: `prepare` / `write_document_shards` write them, `load_split` reads them |
| `loader.py` | `BatchLoader`: random or sequential windows, rank-aware under DDP, resumable |
| `commands.py` | the command lines of `data/prepare_*.py` |

Everything is importable from `nanomoe.data` directly.
"""

from ..tokenizer import gpt2_tokenizer
from .commands import prepare_corpus_cli, prepare_fineweb_cli
from .corpora import CORPORA, MACHADO_FILES, MACHADO_SHA256, TINYSHAKESPEARE_SHA256, iter_documents, read_corpus
from .encode import compare_tokenizers, corpus_tokenizer, encode_splits, encode_text, split_text, train_bpe
from .errors import DataError
from .loader import BatchLoader, TokenSource
from .shards import (
                      FINEWEB_DIR,
                      data_tokenizer,
                      load_meta,
                      load_split,
                      prepare,
                      summary,
                      token_dtype,
                      write_document_shards,
)

__all__ = [
    "BatchLoader", "CORPORA", "DataError", "FINEWEB_DIR", "MACHADO_FILES", "MACHADO_SHA256",
    "TINYSHAKESPEARE_SHA256", "TokenSource", "compare_tokenizers", "corpus_tokenizer", "data_tokenizer",
    "encode_splits", "encode_text", "gpt2_tokenizer", "iter_documents", "load_meta", "load_split", "prepare",
    "prepare_corpus_cli", "prepare_fineweb_cli", "read_corpus", "split_text", "summary", "token_dtype", "train_bpe",
    "write_document_shards",
]
