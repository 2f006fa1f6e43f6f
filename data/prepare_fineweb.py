"""Tokenize FineWeb-Edu (sample-10BT) with GPT-2's BPE into build-nanogpt's layout: uint16 shards of
100M tokens, `data/edu_fineweb10B/fineweb_edu_{val,train}_NNNNNN.npy` (the first shard is val).

    uv pip install datasets                          # not a dependency: only this script needs it
    uv run -m data.prepare_fineweb                   # streams all ~10B tokens (hours, ~20 GB)
    uv run -m data.prepare_fineweb --max_tokens 200000000   # just the first 2 shards
    uv run -m data.prepare_fineweb --source folder/ --shard_size 1000000   # offline: local .parquet/.jsonl/.txt
"""

from nanomoe.data import prepare_fineweb_cli

if __name__ == "__main__":
    prepare_fineweb_cli()
