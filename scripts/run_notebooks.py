"""Execute the chapter notebooks top to bottom and save their outputs in place.

    uv run -m scripts.run_notebooks                  # every notebooks/NN_*.ipynb, default configuration
    uv run -m scripts.run_notebooks 02 03            # only chapters 02 and 03
    uv run -m scripts.run_notebooks --quick          # quick mode (NANOMOE_ARGS=--quick): a check, nothing saved
    uv run -m scripts.run_notebooks --args="--threads=1" 04   # extra NANOMOE_ARGS for the run

Each notebook runs in a fresh kernel of this interpreter (the uv environment), with the repository
root as its working folder, so its runs land in `runs/` and prepared data in `data/`, exactly as a
reader's would. In the default mode the executed notebook (outputs and figures) replaces the file;
`--quick` never writes. A notebook that fails is left untouched and the command exits non-zero.
The summary at the end gives each notebook's wall time: quote it in the notebook and README.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Without ipywidgets, importing tqdm.auto (transformers and huggingface_hub do) warns "IProgress not
# found" with a path of this environment; Colab has ipywidgets. An IPython start-up file of the kernels
# run here keeps that noise out of the saved outputs.
QUIET_TQDM = "import warnings\nfrom tqdm import TqdmWarning\nwarnings.filterwarnings('ignore', category=TqdmWarning)\n"


def find_notebooks(folder: Path, chapters: list[str]) -> list[Path]:
    """notebooks/NN_*.ipynb, in order; only the chapters named (e.g. ["02", "3"]) when given."""
    found = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not chapters:
        return found
    wanted = {c.zfill(2) for c in chapters}
    missing = wanted - {p.name[:2] for p in found}
    if missing:
        raise SystemExit(f"run_notebooks: no notebook for chapter(s) {sorted(missing)} in {folder}")
    return [p for p in found if p.name[:2] in wanted]


def kernel_spec_dir(root: Path) -> Path:
    """A kernel spec named "python3" that runs this interpreter (found first through JUPYTER_PATH), and
    the IPython start-up folder its kernels read (through IPYTHONDIR)."""
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    startup = root / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    (startup / "00-quiet-tqdm.py").write_text(QUIET_TQDM)
    return root


def merge_streams(nb) -> None:
    """Consecutive stream outputs of a cell with the same name (stdout, stdout...) become one.

    The kernel sends printed text in many messages (one per token while a model generates) and
    nbclient saves one output per message; GitHub and the course's site would draw each as its own
    block, one character per line. Jupyter shows them as one text: so does the saved notebook."""
    for cell in nb.cells:
        merged = []
        for out in cell.get("outputs", []):
            last = merged[-1] if merged else None
            if (last is not None and out["output_type"] == "stream" and last["output_type"] == "stream"
                    and last["name"] == out["name"]):
                last["text"] += out["text"]
            else:
                merged.append(out)
        if cell.cell_type == "code":
            cell.outputs = merged


def execute(nb_path: Path, cwd: Path, cell_timeout: int | None, write: bool) -> float:
    """Run one notebook in a fresh kernel; save it in place when `write`. Returns the wall time (s)."""
    import nbclient
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=cell_timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    elapsed = time.perf_counter() - t0
    if write:
        merge_streams(nb)
        nbformat.write(nb, nb_path)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("chapters", nargs="*", help="chapter numbers to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="NANOMOE_ARGS=--quick and do not save the outputs")
    ap.add_argument("--args", default="", help="extra NANOMOE_ARGS for every notebook, e.g. --args='--threads=1'")
    ap.add_argument("--cell-timeout", type=int, default=None, help="seconds per cell (default: no limit)")
    ap.add_argument("--notebooks", type=Path, default=REPO / "notebooks", help=argparse.SUPPRESS)
    ap.add_argument("--cwd", type=Path, default=REPO, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    try:
        import nbclient  # noqa: F401
        import nbformat  # noqa: F401
    except ImportError:
        raise SystemExit("run_notebooks: needs nbclient, nbformat and ipykernel (`uv sync` installs them)") from None

    notebooks = find_notebooks(args.notebooks, args.chapters)
    os.environ["NANOMOE_ARGS"] = " ".join(a for a in ("--quick" if args.quick else "", args.args) if a)
    os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend puts the figures in the notebook
    mode = "quick check, outputs not saved" if args.quick else "full size, outputs saved in place"
    print(f"{len(notebooks)} notebook(s), {mode}; NANOMOE_ARGS={os.environ['NANOMOE_ARGS']!r}; "
          f"{platform.machine()}, {os.cpu_count()} CPU(s), python {platform.python_version()}", flush=True)

    times, failed = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["JUPYTER_PATH"] = str(kernel_spec_dir(Path(tmp))) + os.pathsep + os.environ.get("JUPYTER_PATH", "")
        os.environ["IPYTHONDIR"] = str(Path(tmp) / "ipython")
        for nb_path in notebooks:
            print(f"-> {nb_path.name} ...", flush=True)
            try:
                times[nb_path.name] = execute(nb_path, args.cwd, args.cell_timeout, write=not args.quick)
            except Exception as e:  # a failing cell: report it, keep the file, go on with the others
                failed.append(nb_path.name)
                print(f"   FAILED: {type(e).__name__}: {str(e)[-3000:]}", flush=True)
                continue
            print(f"   done in {times[nb_path.name]:.0f} s", flush=True)

    print("\nsummary (wall time per notebook):")
    for name, s in times.items():
        print(f"  {name:<28} {s / 60:6.1f} min")
    for name in failed:
        print(f"  {name:<28} FAILED")
    print(f"  total {sum(times.values()) / 60:.1f} min")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
