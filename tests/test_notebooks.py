"""Every chapter notebook `notebooks/NN_*.ipynb`:

(a) is in sync with its paired script `scripts/NN_*.py` (jupytext percent format): same cells,
    same types, same sources, in the same order;
and every script has its notebook. Execution is tested where it matters, against the installed
wheel in an empty folder (tests/test_colab.py). New chapters are picked up automatically.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))

jupytext = pytest.importorskip("jupytext")


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_every_notebook_has_a_script_and_vice_versa():
    scripts = {p.stem for p in (REPO / "scripts").glob("[0-9][0-9]_*.py")}
    notebooks = {p.stem for p in NOTEBOOKS}
    assert notebooks, "no notebooks/NN_*.ipynb found"
    assert notebooks <= scripts, f"notebooks without a paired script: {sorted(notebooks - scripts)}"
    assert scripts <= notebooks, (
        f"scripts without a notebook: {sorted(scripts - notebooks)}; create it with "
        "`uv run jupytext --to ipynb scripts/NN_name.py -o notebooks/NN_name.ipynb`"
    )


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_in_sync_with_script(nb_path):
    script = REPO / "scripts" / f"{nb_path.stem}.py"
    assert script.is_file(), f"{nb_path.name} has no paired script {script}"
    nb = jupytext.read(nb_path)
    py = jupytext.read(script, fmt="py:percent")
    a, b = _cells(nb), _cells(py)
    for i, (ca, cb) in enumerate(zip(a, b)):
        if ca != cb:
            lines = difflib.unified_diff(ca[1].splitlines(), cb[1].splitlines(), "notebook", "script", lineterm="", n=1)
            diff = "\n".join(list(lines)[:20])
            pytest.fail(
                f"cell {i} ({ca[0]} in the notebook, {cb[0]} in the script) differs between {nb_path.name} and "
                f"{script.name}; run `uv run jupytext --sync {script.relative_to(REPO)}`\n{diff}",
                pytrace=False,
            )
    assert len(a) == len(b), f"{len(a)} cells in the notebook, {len(b)} in the script: run jupytext --sync"
