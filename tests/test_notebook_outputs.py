"""The committed notebooks' outputs show each thing once, as a reader expects.

For every code cell of every `notebooks/NN_*.ipynb`: no image stored twice (a cell that returns
its figure while inline plotting already shows it), no text split into many stream outputs (the
kernel sends printed text in many messages; `scripts.run_notebooks` saves them merged, otherwise
GitHub and the site draw one block per message, a character per line while a model generates), and
no bare return value nobody asked for (a cell ending with a call whose result is not the point,
such as `path.write_text(...)` printing `480`). New chapters are picked up automatically.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MAX_STREAMS = 4  # stdout and stderr may alternate a few times (a warning between prints), not hundreds


def _code_cells(nb_path: Path):
    for i, cell in enumerate(json.loads(nb_path.read_text(encoding="utf-8"))["cells"]):
        if cell["cell_type"] == "code":
            yield i, "".join(cell["source"]), cell.get("outputs", [])


def _last_is_call(source: str) -> bool:
    lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
    try:
        body = ast.parse("\n".join(lines)).body
    except SyntaxError:
        return False
    return bool(body) and isinstance(body[-1], ast.Expr) and isinstance(body[-1].value, ast.Call)


def _problems(nb_path: Path) -> list[str]:
    found = []
    for i, source, outputs in _code_cells(nb_path):
        images = ["".join(data) if isinstance(data, list) else data
                  for out in outputs for mime, data in out.get("data", {}).items() if mime.startswith("image/")]
        if len(images) != len(set(images)):
            found.append(f"cell {i}: the same image is stored twice (does the cell also return the figure?)")
        streams = [out for out in outputs if out["output_type"] == "stream"]
        split = any(a["output_type"] == b["output_type"] == "stream" and a["name"] == b["name"]
                    for a, b in zip(outputs, outputs[1:]))
        if len(streams) > MAX_STREAMS or split:
            found.append(f"cell {i}: printed text split into {len(streams)} stream outputs "
                         "(save with `uv run -m scripts.run_notebooks`, which merges them)")
        for out in outputs:
            if out["output_type"] == "execute_result" and set(out["data"]) == {"text/plain"} and _last_is_call(source):
                value = "".join(out["data"]["text/plain"])[:40]
                found.append(f"cell {i}: shows the return value {value!r} of its last call; assign it or print "
                             "what the reader should see")
    return found


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks/NN_*.ipynb found"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_output_shown_once(nb_path):
    problems = _problems(nb_path)
    assert not problems, f"{nb_path.name}:\n  " + "\n  ".join(problems)


def test_the_check_catches_what_it_should(tmp_path):
    """The three faults this file guards against, in a made-up notebook, are each reported."""
    png = {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure size 640x480 with 1 Axes>"}
    cells = [
        {"cell_type": "code", "source": "fig = plot()\nfig", "metadata": {}, "execution_count": 1,
         "outputs": [{"output_type": "display_data", "data": png, "metadata": {}},
                     {"output_type": "execute_result", "data": png, "metadata": {}, "execution_count": 1}]},
        {"cell_type": "code", "source": "generate(stream_to=sys.stdout)", "metadata": {}, "execution_count": 2,
         "outputs": [{"output_type": "stream", "name": "stdout", "text": ch} for ch in "Capitu"]},
        {"cell_type": "code", "source": "path.write_text(table)", "metadata": {}, "execution_count": 3,
         "outputs": [{"output_type": "execute_result", "data": {"text/plain": "480"}, "metadata": {},
                      "execution_count": 3}]},
        {"cell_type": "code", "source": "model", "metadata": {}, "execution_count": 4,
         "outputs": [{"output_type": "execute_result", "data": {"text/plain": "GPT(...)"}, "metadata": {},
                      "execution_count": 4}]},
    ]
    nb = tmp_path / "99_made_up.ipynb"
    nb.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    problems = _problems(nb)
    assert [p.split(":")[0] for p in problems] == ["cell 0", "cell 1", "cell 2"], problems
