"""Every script turns bad input into one clear line on stderr and a non-zero exit, never a traceback.

The scripts run as real subprocesses from an empty folder (as a reader runs them), several at once.
Bad option values and unknown options of every script go through `nanomoe.training.cli` (tested in process in
test_01_overfit.py and test_generate.py); here, one subprocess per kind of failure."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# (name, argv after `python`, words the one error line must contain, expected exit status or None = any non-zero)
CASES = [
    ("01 missing text file", ["-m", "scripts.01_train_nanogpt", "--text_file=missing.txt"], "not found", 1),
    ("01 empty text file", ["-m", "scripts.01_train_nanogpt", "--text_file=blank.txt"], "is empty", 1),
    ("01 unknown tokenizer", ["-m", "scripts.01_train_nanogpt", "--tokenizer=klingon"], "unknown tokenizer", 1),
    ("04 invalid JSON config", ["-m", "scripts.04_train", "--config=bad.json"], "not valid JSON", 1),
    ("04 unknown option", ["-m", "scripts.04_train", "--n-layr=3"], "Did you mean --n_layer?", 2),
    ("04 corpus offline", ["-m", "scripts.04_train", "--dataset=tinyshakespeare", "--quick"], "download failed", 1),
    ("prepare empty source", ["-m", "data.prepare_machado", "--source=empty.txt"], "is empty", 1),
    ("generate missing checkpoint", ["-m", "scripts.generate", "missing.pt", "oi"], "not found", 2),
]


def _run(argv: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("reader")
    (cwd / "blank.txt").write_text("  \n", encoding="utf-8")
    (cwd / "empty.txt").write_text("", encoding="utf-8")
    (cwd / "bad.json").write_text('{"n_layer": 2,}', encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "NANOMOE_DATA"}  # no offline copy of the corpora
    env.update(PYTHONPATH=str(REPO), NANOMOE_OFFLINE="1", NANOMOE_CACHE=str(cwd / "cache"), OMP_NUM_THREADS="1",
               MPLBACKEND="Agg")
    with ThreadPoolExecutor(max_workers=3) as pool:
        procs = list(pool.map(lambda case: _run(case[1], cwd, env), CASES))
    return {case[0]: proc for case, proc in zip(CASES, procs)} | {"_cwd": cwd}


@pytest.mark.parametrize("name, argv, words, status", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(results, name, argv, words, status):
    proc = results[name]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == status, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and "error:" in lines[0] and words in lines[0], proc.stderr[-3000:]


def test_nothing_written_outside_the_readers_folder(results):
    """The failing runs wrote nothing into the repository (a package folder, once installed)."""
    assert not (REPO / "nanomoe" / "data" / "tinyshakespeare_char").exists()
    assert not any((REPO / "nanomoe").rglob("*.npy"))
