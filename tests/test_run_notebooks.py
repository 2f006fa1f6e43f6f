"""scripts/run_notebooks.py executes notebooks in a fresh kernel and saves them in place (or only
checks them with --quick); run on small notebooks written by the test, never the chapters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parent.parent


def _notebook(path: Path, *sources: str) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nbformat.write(nb, path)


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "scripts.run_notebooks", "--notebooks", str(tmp_path / "nb"), "--cwd", str(tmp_path),
           *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def _outputs(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))


@pytest.fixture
def nbs(tmp_path):
    (tmp_path / "nb").mkdir()
    _notebook(tmp_path / "nb" / "01_a.ipynb", "import os\nprint('args=' + os.environ['NANOMOE_ARGS'])",
              "import warnings\nfrom tqdm import TqdmWarning\nwarnings.warn('IProgress not found', TqdmWarning)",
              "from pathlib import Path\nprint('cwd=' + str(Path.cwd()))")
    _notebook(tmp_path / "nb" / "02_b.ipynb", "print('second')")
    return tmp_path


def test_full_mode_saves_the_outputs_in_place(nbs):
    res = _run(nbs, "01", "--args=--threads=1")
    assert res.returncode == 0, res.stdout + res.stderr
    out = _outputs(nbs / "nb" / "01_a.ipynb")
    assert "args=--threads=1" in out and f"cwd={nbs}" in out
    nb = nbformat.read(nbs / "nb" / "01_a.ipynb", as_version=4)
    assert not any(o.get("name") == "stderr" for c in nb.cells for o in c.outputs)  # tqdm's widget warning
    assert _outputs(nbs / "nb" / "02_b.ipynb") == ""  # not selected: untouched
    assert "01_a.ipynb" in res.stdout and "min" in res.stdout  # the summary with its time


def test_quick_mode_runs_but_does_not_write(nbs):
    before = (nbs / "nb" / "01_a.ipynb").read_bytes()
    res = _run(nbs, "--quick")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 notebook(s)" in res.stdout
    assert (nbs / "nb" / "01_a.ipynb").read_bytes() == before


def test_a_failing_notebook_is_reported_left_untouched_and_exits_non_zero(nbs):
    _notebook(nbs / "nb" / "03_bad.ipynb", "print('before')", "raise RuntimeError('boom')")
    before = (nbs / "nb" / "03_bad.ipynb").read_bytes()
    res = _run(nbs, "03", "2")
    assert res.returncode == 1
    assert "03_bad.ipynb" in res.stdout and "FAILED" in res.stdout and "boom" in res.stdout
    assert (nbs / "nb" / "03_bad.ipynb").read_bytes() == before
    assert "second" in _outputs(nbs / "nb" / "02_b.ipynb")  # the others still ran and were saved


def test_an_unknown_chapter_is_one_clear_line(nbs):
    res = _run(nbs, "09")
    assert res.returncode != 0
    assert "no notebook for chapter(s) ['09']" in res.stderr
    assert "Traceback" not in res.stderr
