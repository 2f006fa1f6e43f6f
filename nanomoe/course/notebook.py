"""What the chapter notebooks share: the Colab set-up report and `show_source`.

A notebook's first cell installs the course's pinned release when `nanomoe` is missing (Colab, a
bare Jupyter) and then calls `setup("NN")`, which prints the versions it runs on, the device and
precision it will use, where the run writes, and how long the chapter's default run took where it
was measured. Every chapter calls the same function, so the set-up is written once.
"""

from __future__ import annotations

import inspect
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

import torch

from ..device import pick_precision
from ..paths import home

# How long each chapter's default configuration took, and where. Only measured figures: a GPU time
# is quoted once a run on that GPU was recorded in the chapter (`None` = not measured yet).
CHAPTER_TIMES: dict[str, dict[str, str | None]] = {
    "01": {"cpu": "~10 s of training, ~20 s for the whole notebook", "gpu": None},
    "02": {"cpu": "~12 min (shared with another notebook)", "gpu": None},
    "03": {"cpu": "~13 min (shared with another notebook)", "gpu": None},
    "04": {"cpu": "~5 min", "gpu": None},
    "05": {"cpu": "~2.7 min (tiny GPT-2 stand-in)", "gpu": None},
    "06": {"cpu": "~1 min (3 training runs; the 220-run grid is read from docs/results/06)", "gpu": None},
    "07": {"cpu": "~3.5 min", "gpu": None},
    "08": {"cpu": "~2 min", "gpu": None},
}
CPU_NAME = "2-core CPU"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules


def versions() -> str:
    """One line with the versions a result depends on."""
    return (f"nanomoe {_version('nanomoe')} | torch {torch.__version__} | transformers {_version('transformers')}"
            f" | python {platform.python_version()}")


def setup(chapter: str, written_for: str | None = None) -> str:
    """Print versions, device and precision, the output folder and the chapter's measured run time.

    `written_for` is the release tag the notebook pins (e.g. "v0.3.0"); a different installed
    version is pointed out, since figures and outputs in the text came from that release.
    Returns the device name the chapter will use (`cuda`, `mps` or `cpu`)."""
    print(versions())
    installed = _version("nanomoe")
    if written_for is not None and written_for.lstrip("v") != installed:
        print(f"note: this notebook was written for nanomoe {written_for}; installed is {installed}")
    precision = pick_precision(verbose=False)
    print(precision.describe())
    where = "the current folder" if str(home()) == "." else str(home())
    print(f"runs and prepared data are written under {where}: data/, runs/ (NANOMOE_HOME to change)")
    times = CHAPTER_TIMES.get(chapter)
    if times is not None:
        gpu = times["gpu"] or "not measured yet"
        print(f"default run of chapter {chapter}: {times['cpu']} on a {CPU_NAME}; on a GPU: {gpu}")
    if precision.device == "cpu" and in_colab():
        print("No GPU in this runtime: Runtime > Change runtime type > T4 GPU, or keep the CPU and "
              "run the quick mode (set NANOMOE_ARGS=--quick before the parameters cell).")
    return precision.device


def show_source(*objs) -> None:
    """Print the source code of package functions/classes, so a notebook teaches from the real code."""
    for obj in objs:
        print(inspect.getsource(obj))
