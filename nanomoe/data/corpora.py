"""Public corpora: where they come from (canonical URLs + sha256), and reading them or a local copy.

| corpus | text | source |
|---|---|---|
| `machado` | Machado de Assis (pt-br): 10 novels + 7 story collections, 4.8M chars | luxedo/dataset-machado-de-assis |
| `tinyshakespeare` | Karpathy's char-rnn TinyShakespeare, 1.1M characters of English | karpathy/char-rnn |

Lookup order: a `source` you pass (file or folder), the offline copy in $NANOMOE_DATA, the download
cache (~/.cache/nanomoe), and last a download (`nanomoe.files.download`) checked against its sha256.
`iter_documents` reads your own .jsonl/.parquet/.txt documents (FineWeb-Edu offline).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional, Union

from ..files import DownloadError, download
from ..paths import cache_dir, shared_data_dir
from .errors import DataError

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
            data = download(MACHADO_BASE_URL + rel)
            (dest / fname).write_bytes(data)
    text = _read_machado_folder(dest)
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != MACHADO_SHA256:
        raise DataError(f"the downloaded Machado corpus in {dest} does not match its sha256; delete the folder and "
                        f"retry")
    return text


def _download_tinyshakespeare() -> str:
    dest = cache_dir() / "tinyshakespeare" / "input.txt"
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        data = download(TINYSHAKESPEARE_URL)
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
    except (DataError, DownloadError) as e:
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
            raise DataError("reading .parquet files needs pyarrow: `uv pip install pyarrow` (or convert them to "
                            ".jsonl)") from None
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
