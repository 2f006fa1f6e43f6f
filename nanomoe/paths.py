"""Where a run reads and writes: always the reader's folders, never the package.

| what | where | override |
|---|---|---|
| prepared token shards | `./data/<name>/` | `NANOMOE_HOME` (then `$NANOMOE_HOME/data/`) |
| training runs (checkpoints, metrics, curves) | `./runs/<name>/` (relative `out_dir`) | `NANOMOE_HOME` |
| downloaded corpora, tiktoken cache | `~/.cache/nanomoe/` | `NANOMOE_CACHE` |
| offline copies of the public corpora | none | `NANOMOE_DATA` (a folder with `machado/`, `tinyshakespeare/`, `gpt2/`) |

Installed with `pip`, the package lives in site-packages; writing beside the package's own files
would hide the reader's data there, or fail on a read-only install. So every path a run writes is
relative to the current folder, which is what a notebook reader sees beside the notebook.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union


def home() -> Path:
    """The folder runs write into: $NANOMOE_HOME when set, else the current folder."""
    return Path(os.environ.get("NANOMOE_HOME") or ".")


def data_root() -> Path:
    """Where prepared data folders go: <home>/data."""
    return home() / "data"


def in_home(path: Union[str, os.PathLike]) -> Path:
    """A relative path placed under home() (absolute paths are kept as they are)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else home() / p


def cache_dir() -> Path:
    """Where downloads are kept: $NANOMOE_CACHE or ~/.cache/nanomoe."""
    return Path(os.environ.get("NANOMOE_CACHE") or Path.home() / ".cache" / "nanomoe")


def shared_data_dir() -> Optional[Path]:
    """The offline copies of the public corpora: the folder $NANOMOE_DATA names, or None."""
    env = os.environ.get("NANOMOE_DATA")
    return Path(env) if env and Path(env).is_dir() else None


def checkout_with(rel_path: str) -> Optional[Path]:
    """The current folder or the nearest parent that holds rel_path (a clone of the repository,
    where a notebook runs in notebooks/), else None (a pip install, such as Colab's)."""
    return next((d for d in (Path.cwd(), *Path.cwd().parents) if (d / rel_path).is_file()), None)
