"""Data preparation scripts: `uv run -m data.prepare_machado`, `data.prepare_tinyshakespeare`,
`data.prepare_fineweb` (the logic lives in nanomoe/data.py)."""
