"""The Colab simulation: every chapter notebook runs against the *installed wheel*, alone in an
empty folder, with nothing from the repository on the path — the situation of a reader who clicks
"Open in Colab" (whose first cell `pip install`s the package).

Once per test session: build the wheel, install it into a fresh virtual environment (with the
versions of `uv.lock`, from uv's cache when offline), register a Jupyter kernel for that
environment. Then each notebook is copied alone into an empty temporary folder and executed there
with NANOMOE_ARGS=--quick, two at a time. The only things taken from outside are the ones a Colab
reader downloads: the public corpora and GPT-2's BPE files (NANOMOE_DATA, a tiktoken cache).
Afterwards nothing may have been written into the environment's site-packages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from nanomoe.tokenizer import fill_tiktoken_cache

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 300
SLOW_S = 60.0
PARALLEL = 2  # two kernels at once: the machine has two cores and each kernel runs one thread

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def _uv() -> list[str]:
    exe = os.environ.get("UV") or shutil.which("uv")  # `uv run` exports UV
    return [exe] if exe else [sys.executable, "-m", "uv"]


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if res.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}", pytrace=False)
    return res


def _works(python) -> bool:
    return subprocess.run([str(python), "-c", "pass"], capture_output=True).returncode == 0


def _python_for_venv() -> str:
    """Python 3.12 (Colab's) when the machine has it (on PATH or as a pyenv version), else the
    running interpreter."""
    candidates = [shutil.which("python3.12")]
    if shutil.which("pyenv"):
        bare = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True).stdout.split()
        for v in (v for v in bare if v.startswith("3.12")):
            prefix = subprocess.run(["pyenv", "prefix", v], capture_output=True, text=True).stdout.strip()
            candidates.append(str(Path(prefix) / "bin" / "python3.12"))
    return next((c for c in candidates if c and _works(c)), sys.executable)


def _site_packages(python: Path) -> Path:
    out = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout
    return Path(out.strip())


def _snapshot(folder: Path) -> set[str]:
    """Every file under `folder` but Python's bytecode caches (which imports may write)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="session")
def colab_env(tmp_path_factory, shared_data) -> dict:
    root = tmp_path_factory.mktemp("colab")
    t0 = time.perf_counter()
    dist, venv = root / "dist", root / "venv"
    _run([*_uv(), "build", "--wheel", "--out-dir", dist, REPO], cwd=root)
    wheel = next(dist.glob("nanomoe-*.whl"))
    _run([*_uv(), "venv", "--quiet", "--python", _python_for_venv(), venv], cwd=root)
    python = venv / "bin" / "python"
    # the lock's versions (what `uv sync` installs), so the simulation tests what CI tests
    constraints = root / "constraints.txt"
    _run([*_uv(), "export", "--frozen", "--no-hashes", "--all-groups", "--no-emit-project", "-o", constraints],
         cwd=REPO)
    install = [*_uv(), "pip", "install", "--quiet", "--python", python, "-c", constraints, wheel, "ipykernel"]
    if subprocess.run([*map(str, install), "--offline"], capture_output=True).returncode != 0:
        _run(install, cwd=root)  # not everything in uv's cache: a reader's machine with internet
    kernels = root / "jupyter"
    spec = kernels / "kernels" / "colab-sim"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Colab simulation", "language": "python"}))
    site = _site_packages(python)
    return {"root": root, "python": python, "site": site, "before": _snapshot(site), "wheel": wheel,
            "jupyter_path": kernels, "tiktoken": fill_tiktoken_cache(shared_data / "gpt2", root / "tiktoken"),
            "setup_s": time.perf_counter() - t0}


def _execute(nb_path: Path, env: dict, shared_data: Path) -> dict:
    """Copy one notebook alone into an empty folder and run it there; return what happened."""
    folder = env["root"] / f"run_{nb_path.stem}"
    folder.mkdir()
    shutil.copy(nb_path, folder / nb_path.name)
    nb = nbformat.read(folder / nb_path.name, as_version=4)
    # one more cell, run last: the package came from the environment, never from the repository
    nb.cells.append(nbformat.v4.new_code_cell("import nanomoe, sys; print('NANOMOE_FILE', nanomoe.__file__)"))
    kernel_env = {k: v for k, v in os.environ.items()
                  if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MPLBACKEND", "NANOMOE_HOME")}
    kernel_env.update(NANOMOE_ARGS="--quick", OMP_NUM_THREADS="1",
                      NANOMOE_DATA=str(shared_data), TIKTOKEN_CACHE_DIR=str(env["tiktoken"]))
    specs = KernelSpecManager(kernel_dirs=[str(env["jupyter_path"] / "kernels")])
    km = AsyncKernelManager(kernel_name="colab-sim", kernel_spec_manager=specs)
    client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, kernel_name="colab-sim",
                                     resources={"metadata": {"path": str(folder)}})
    t0 = time.perf_counter()
    error = None
    try:
        client.execute(env=kernel_env)
    except (nbclient.exceptions.CellExecutionError, nbclient.exceptions.CellTimeoutError,
            nbclient.exceptions.DeadKernelError) as e:  # reported by that notebook's test, not by all
        error = f"{type(e).__name__}: {str(e)[-4000:]}"
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    return {"error": error, "text": text, "seconds": time.perf_counter() - t0, "folder": folder}


@pytest.fixture(scope="session")
def colab_runs(colab_env, shared_data) -> dict:
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        futures = {p.stem: pool.submit(_execute, p, colab_env, shared_data) for p in NOTEBOOKS}
        runs = {name: f.result() for name, f in futures.items()}
    slow = [k for k, v in runs.items() if v["seconds"] > SLOW_S]
    if slow:
        warnings.warn(f"notebooks slower than {SLOW_S:.0f}s in quick mode (make --quick smaller): {slow}")
    print(f"\ncolab simulation: set-up {colab_env['setup_s']:.0f}s, notebooks "
          + ", ".join(f"{k[:2]} {v['seconds']:.0f}s" for k, v in runs.items()))
    return runs


def test_wheel_holds_the_package_and_its_resources(colab_env):
    import zipfile

    names = zipfile.ZipFile(colab_env["wheel"]).namelist()
    assert "nanomoe/__init__.py" in names
    assert not any(n.startswith(("tests/", "scripts/", "notebooks/", "data/")) for n in names), names
    resources = [n for n in names if n.endswith((".json", ".txt")) and n.startswith("nanomoe/")]
    assert resources, "no package data (paragraph, run configs) in the wheel"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_from_an_empty_folder_against_the_wheel(nb_path, colab_runs, colab_env):
    run = colab_runs[nb_path.stem]
    if run["error"]:
        pytest.fail(f"{nb_path.name} failed in the Colab simulation (NANOMOE_ARGS=--quick):\n{run['error']}",
                    pytrace=False)
    file_line = [ln for ln in run["text"].splitlines() if ln.startswith("NANOMOE_FILE")][-1]
    assert str(colab_env["site"]) in file_line, f"nanomoe did not come from the installed wheel: {file_line}"
    assert "nanomoe 0" in run["text"] or "nanomoe 1" in run["text"], "the set-up cell did not print the versions"
    # nothing outside the notebook's folder but what it downloads: everything it wrote is beside it
    written = {p.name for p in run["folder"].iterdir()} - {nb_path.name}
    if nb_path.stem == "01_train_nanogpt":  # the parameters cell read NANOMOE_ARGS inside a real kernel
        assert "quick=True" in run["text"] and "=== Resumo ===" in run["text"]
    assert written <= {"data", "runs", "out"}, f"{nb_path.name} wrote unexpected entries: {sorted(written)}"


def test_nothing_written_into_site_packages(colab_runs, colab_env):
    after = _snapshot(colab_env["site"])
    assert after == colab_env["before"], f"written into site-packages: {sorted(after - colab_env['before'])[:10]}"
