"""One progress bar for the whole package.

A terminal gets tqdm's text bar; a notebook with ipywidgets (Colab, JupyterLab) gets the widget bar;
a notebook without ipywidgets gets no bar, because a text bar there fills the saved notebook with
redraws (and `tqdm.auto` would print a warning naming a local folder). The lines a run prints stay.
"""

from __future__ import annotations

import importlib.util
import sys

from tqdm import tqdm as text_tqdm

from .cli import in_notebook


def tqdm(*args, **kw):
    """`tqdm.tqdm` with the display chosen as the module docstring says (same arguments)."""
    if in_notebook():
        if importlib.util.find_spec("ipywidgets") is None:
            kw["disable"] = True
            return text_tqdm(*args, **kw)
        from tqdm.notebook import tqdm as widget_tqdm  # imported here: it needs ipywidgets

        return widget_tqdm(*args, **kw)
    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        kw.setdefault("mininterval", 30.0)  # output to a log file: a line every 30 s, not every redraw
    return text_tqdm(*args, **kw)
