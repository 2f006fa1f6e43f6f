"""Files every chapter needs that are not a public corpus: shipped inside the package.

    paragraph()              # chapter 01's paragraph (paragrafo.txt, written for this course)
    config_names()           # the run configs of chapter 04: ["machado_char_modern", ...]
    config_text("machado_moe")   # the JSON text of one of them

They are read with `importlib.resources`, so they are found the same way in a git checkout, an
editable install and a wheel installed by `pip` in Colab. Nothing is ever written here: a run
writes into the reader's folder (see `nanomoe.paths`).
"""

from __future__ import annotations

from importlib.resources import files

PARAGRAPH = "paragrafo.txt"


def resource_text(name: str) -> str:
    """The text of a packaged file by its name inside nanomoe/resources (e.g. "paragrafo.txt")."""
    path = files(__name__).joinpath(name)
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not a packaged nanomoe resource")
    return path.read_text(encoding="utf-8")


def is_resource(name: str) -> bool:
    """True when nanomoe/resources holds a file of that name."""
    return files(__name__).joinpath(name).is_file()


def paragraph() -> str:
    """Chapter 01's paragraph (UTF-8 text, as written)."""
    return resource_text(PARAGRAPH)


def config_names() -> list[str]:
    """Names of the packaged run configs (resources/configs/NAME.json), sorted."""
    folder = files(__name__).joinpath("configs")
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def config_text(name: str) -> str:
    """The JSON text of the packaged run config `name` (without .json)."""
    return resource_text(f"configs/{name}.json")
