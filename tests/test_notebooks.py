"""Every chapter notebook `notebooks/NN_*.ipynb`:

(a) is in sync with its paired script `scripts/NN_*.py` (jupytext percent format): same cells,
    same types, same sources, in the same order;
(b) executes top to bottom in a fresh Jupyter kernel with NANOMOE_ARGS="--quick" (the chapter's
    small test mode), from the repository root, with the Python of this virtual environment.

New chapters are picked up automatically. A notebook that takes more than SLOW_S seconds in quick
mode gets a warning in the test summary: make its `--quick` smaller.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 300
SLOW_S = 30.0

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
            diff = "\n".join(
                list(difflib.unified_diff(ca[1].splitlines(), cb[1].splitlines(), "notebook", "script", lineterm="", n=1))[:20]
            )
            pytest.fail(
                f"cell {i} ({ca[0]} in the notebook, {cb[0]} in the script) differs between {nb_path.name} and "
                f"{script.name}; run `uv run jupytext --sync {script.relative_to(REPO)}`\n{diff}",
                pytrace=False,
            )
    assert len(a) == len(b), f"{len(a)} cells in the notebook, {len(b)} in the script: run jupytext --sync"


@pytest.fixture(scope="module")
def kernel_spec_dir(tmp_path_factory) -> Path:
    """A kernel spec named "python3" that runs *this* interpreter (the uv venv), found before any
    user- or system-wide "python3" spec because JUPYTER_PATH comes first."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (nanomoe venv)",
                "language": "python",
            }
        )
    )
    return root


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(nb_path, kernel_spec_dir, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    monkeypatch.setenv("JUPYTER_PATH", str(kernel_spec_dir) + os.pathsep + os.environ.get("JUPYTER_PATH", ""))
    monkeypatch.setenv("NANOMOE_ARGS", "--quick")
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models; much faster when the CPU is shared
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel uses its inline backend

    from jupyter_client.kernelspec import KernelSpecManager

    ksm = KernelSpecManager()
    spec = ksm.get_kernel_spec("python3")
    assert spec.argv[0] == sys.executable, f"kernel 'python3' resolves to {spec.argv[0]}, not this venv"

    nb = nbformat.read(nb_path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO)}},  # cwd of the kernel: the repository root
    )
    t0 = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:  # show the failing cell, not nbclient's internals
        pytest.fail(f"{nb_path.name} failed with NANOMOE_ARGS=--quick:\n{str(e)[-4000:]}", pytrace=False)
    elapsed = time.perf_counter() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code" and c.source.strip()), (
        f"not every code cell of {nb_path.name} ran ({n_code} code cells)"
    )
    if nb_path.stem == "01_train_nanogpt":
        # chapter 01 prints its parameters: proves that nanomoe.cli read NANOMOE_ARGS inside a real kernel
        text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
        assert "quick=True" in text and "=== Resumo ===" in text
    if elapsed > SLOW_S:
        warnings.warn(f"{nb_path.name} took {elapsed:.0f}s with --quick (> {SLOW_S:.0f}s): make its quick mode smaller")
