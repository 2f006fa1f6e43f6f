"""Writing files so that no crash leaves half of one, and fetching them: the one place for both.

`atomic_write(path)` is how every file of a run is written (checkpoints, token shards, meta.json,
metrics, plots): the bytes go to a hidden temporary file in the same folder (`.NAME.tmp.PID`), are
flushed and fsync'ed, and only then `os.replace` renames it over `path` (atomic on POSIX and
Windows). A reader, or a run resumed after a SIGKILL, sees the old file or the new one, never half.

`download(url)` is the one network fetch of the package (corpora): a clear one-line error when it
fails, and none at all when NANOMOE_OFFLINE is set (the tests set it).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Union

PathLike = Union[str, os.PathLike]


class DownloadError(ValueError):
    """A download failed (or was not allowed); the message names the URL and the reason."""


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: PathLike) -> Path:
    """The temporary name `atomic_write` uses for `path` (hidden, per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


@contextmanager
def atomic_write(path: PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit, fsync it and rename it over `path`.
    On an exception the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text(path: PathLike, text: str) -> Path:
    """Atomically write a UTF-8 text file."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def remove_stale_temps(folder: PathLike, pattern: str = "*") -> None:
    """Delete temporary files that a write killed before its rename left in `folder`."""
    for p in Path(folder).glob(f".{pattern}.tmp.*"):
        p.unlink(missing_ok=True)


def download(url: str, timeout: float = 30.0) -> bytes:
    """The bytes at `url`. Raises DownloadError (one line) when NANOMOE_OFFLINE is set or the fetch fails."""
    if os.environ.get("NANOMOE_OFFLINE", "") not in ("", "0"):
        raise DownloadError(f"NANOMOE_OFFLINE is set, so {url} is not downloaded")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read()
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"could not download {url} ({type(e).__name__}: {e})") from None
