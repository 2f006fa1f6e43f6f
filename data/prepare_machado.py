"""Tokenize Machado de Assis (pt-br), the course's default corpus: 10 novels + 7 story collections, 4.8M characters.

    uv run -m data.prepare_machado                      # char tokenizer -> data/machado_char/
    uv run -m data.prepare_machado --tokenizer gpt2     # GPT-2 BPE (tiktoken) -> data/machado_gpt2/
    uv run -m data.prepare_machado --tokenizer bpe --vocab_size 4096   # BPE trained on the train split
    uv run -m data.prepare_machado --source path/to/copy  # offline: a local file or folder

Without --source it reads ../shared/data when present, else downloads from the canonical URL.
"""

from nanomoe.data import prepare_corpus_cli

if __name__ == "__main__":
    prepare_corpus_cli("machado")
