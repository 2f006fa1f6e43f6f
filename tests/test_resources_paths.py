"""Everything a chapter needs ships inside the package (nanomoe.resources), and everything a run
writes goes to the reader's folder or $NANOMOE_HOME, never beside the package (issue: Colab first)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import nanomoe
from nanomoe import paths, resources
from nanomoe.course.overfit import read_text
from nanomoe.training.runs import load_run_config, resolve_data_dir

PKG = Path(nanomoe.__file__).resolve().parent


def test_packaged_resources_are_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "shakespeare_char_gpt2" in resources.config_names() and "machado_moe" in resources.config_names()
    for name in resources.config_names():
        assert isinstance(json.loads(resources.config_text(name)), dict)
    for name in ("machado_char_modern", "machado_moe", "shakespeare_char_gpt2", "shakespeare_char_modern"):
        assert load_run_config(name)  # by name, with no file of that name around
    assert len(resources.paragraph()) > 200 and read_text("paragrafo.txt") == resources.paragraph().strip()


def test_own_config_file_wins_and_bad_json_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "mine.json"
    own.write_text('{"n_layer": 1, "_comment": "mine"}', encoding="utf-8")
    assert load_run_config(str(own)) == {"n_layer": 1}
    own.write_text('{"n_layer": 1,}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"not valid JSON .*line 1"):
        load_run_config(str(own))
    with pytest.raises(ValueError, match="packaged configs: .*machado_char_modern"):
        load_run_config("no_such_config")
    with pytest.raises(ValueError, match="not found"):
        load_run_config("missing.json")


def test_runs_write_under_the_current_folder_or_nanomoe_home(tmp_path, monkeypatch, shared_data):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NANOMOE_DATA", str(shared_data))
    assert paths.data_root() == Path("data") and paths.in_home("runs/04") == Path("runs/04")
    monkeypatch.setenv("NANOMOE_HOME", str(tmp_path / "home"))
    assert paths.data_root() == tmp_path / "home" / "data"
    assert paths.in_home("runs/04") == tmp_path / "home" / "runs" / "04"
    assert paths.in_home(tmp_path / "abs") == tmp_path / "abs"
    args = SimpleNamespace(data_dir="", dataset="tinyshakespeare", tokenizer="char", bpe_vocab=4096, max_chars=20_000)
    folder = resolve_data_dir(args)
    assert folder == tmp_path / "home" / "data" / "tinyshakespeare_char_20000" and (folder / "meta.json").is_file()
    assert not any(PKG.rglob("*.npy")) and not any(PKG.rglob("tinyshakespeare_char*"))


def test_no_module_writes_beside_itself():
    """No module builds a path from its own location (that is site-packages once installed); the one
    use of __file__ is the error hook recognising exceptions raised inside the package."""
    users = sorted(p.name for p in PKG.rglob("*.py") if "__file__" in p.read_text(encoding="utf-8"))
    assert users == ["cli.py"]
