"""Tokenize TinyShakespeare (Karpathy's char-rnn), 1.1M characters of English.

    uv run -m data.prepare_tinyshakespeare                      # char tokenizer -> data/tinyshakespeare_char/
    uv run -m data.prepare_tinyshakespeare --tokenizer gpt2     # GPT-2 BPE (tiktoken) -> data/tinyshakespeare_gpt2/
    uv run -m data.prepare_tinyshakespeare --tokenizer bpe --vocab_size 4096   # BPE trained on the train split
    uv run -m data.prepare_tinyshakespeare --source path/to/copy  # offline: a local file or folder

Without --source it reads ../shared/data when present, else downloads from the canonical URL.
"""

from nanomoe.data import prepare_corpus_cli

if __name__ == "__main__":
    prepare_corpus_cli("tinyshakespeare")
