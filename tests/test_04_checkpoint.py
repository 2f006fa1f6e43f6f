"""Chapter 04: checkpoints load safely (weights_only), refuse what they must, and never carry
wrapper prefixes; clear messages for missing data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nanomoe import GPT, preset
from nanomoe.training.checkpoint import (
    CheckpointError,
    check_config,
    load_checkpoint,
    model_from_checkpoint,
    model_state_dict,
    save_checkpoint,
    strip_prefixes,
    tokenizer_from_checkpoint,
)
from nanomoe.training.train import TrainConfig, train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(**kw):
    torch.manual_seed(0)
    return GPT(preset("modern", **{**dict(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32), **kw}))


def _trained_run(out: Path, **kw) -> GPT:
    ids = np.random.default_rng(0).integers(0, 32, 3000).astype(np.uint16)
    model = _model(**kw)
    train(model, ids[:2500], ids[2500:], TrainConfig(max_steps=2, batch_size=2, eval_interval=2, eval_iters=1,
                                                     out_dir=str(out), plot=False), progress=False)
    return model


class Evil:
    """A pickle payload: unpickling it calls open(path, "w"), i.e. runs code and creates a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned.txt"
    bad = tmp_path / "evil.pt"
    torch.save({"format": "nanomoe", "version": 1, "model": {}, "config": {}, "x": Evil(marker)}, bad)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(bad)
    assert not marker.exists()
    # the payload is real: an unsafe load would have run it
    torch.load(bad, weights_only=False)
    assert marker.exists()


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="no latest.pt"):
        load_checkpoint(tmp_path)  # a run folder without a checkpoint
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.pt")
    torch.save({"weight": torch.ones(3)}, tmp_path / "plain.pt")  # a raw state_dict
    with pytest.raises(CheckpointError, match="not a nanomoe checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"model": _model().state_dict(), "config": _model().config.to_dict()})
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])  # a truncated copy
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "noise.pt").write_bytes(os.urandom(2000))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "noise.pt")


def test_training_checkpoint_roundtrip(tmp_path):
    """A full training checkpoint (optimizer, RNG states, loader, history...) loads with
    weights_only=True, rebuilds the same model and its tokenizer, and has no leftover temp file."""
    from nanomoe.tokenizer import get_tokenizer

    tok = get_tokenizer("char", text="".join(chr(65 + i) for i in range(32)))
    ids = np.random.default_rng(0).integers(0, 32, 3000).astype(np.uint16)
    model = _model()
    train(model, ids[:2500], ids[2500:], TrainConfig(max_steps=2, batch_size=2, eval_interval=2, eval_iters=1,
                                                     out_dir=str(tmp_path), plot=False, sample_tokens=5),
          tokenizer=tok, progress=False)
    ck = torch.load(tmp_path / "latest.pt", weights_only=True)  # plain torch, safe mode
    assert ck["format"] == "nanomoe" and ck["step"] == 2
    for key in ("optimizer", "rng", "loader", "config", "train_config", "tokenizer", "history"):
        assert key in ck, key
    assert (tmp_path / "best.pt").is_file()
    assert not list(tmp_path.glob(".*tmp*"))
    loaded = model_from_checkpoint(tmp_path / "latest.pt")
    x = torch.randint(0, 32, (2, 16))
    model.eval()
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)
    assert tokenizer_from_checkpoint(load_checkpoint(tmp_path)).decode([0, 1, 2]) == "ABC"
    assert ck["history"][-1]["sample"]  # a sample generation was recorded at the evaluation


def test_other_config_is_refused_with_the_differing_fields(tmp_path):
    _trained_run(tmp_path)
    other = _model(n_layer=3, n_embd=48)
    ids = np.random.default_rng(0).integers(0, 32, 3000).astype(np.uint16)
    with pytest.raises(CheckpointError) as e:
        train(other, ids[:2500], ids[2500:], TrainConfig(max_steps=4, batch_size=2, out_dir=str(tmp_path),
                                                         resume=True, plot=False), progress=False)
    msg = str(e.value)
    assert "n_layer: checkpoint has 2, this run has 3" in msg and "n_embd" in msg and "vocab_size" not in msg
    check_config(load_checkpoint(tmp_path), _model().config)  # the same config passes


def test_no_wrapper_prefixes_in_checkpoints(tmp_path):
    sd = {"_orig_mod.transformer.wte.weight": 1, "module._orig_mod.lm_head.weight": 2, "module.x": 3, "y": 4}
    assert strip_prefixes(sd) == {"transformer.wte.weight": 1, "lm_head.weight": 2, "x": 3, "y": 4}
    model = _model()
    compiled = torch.compile(model)  # wrapping is lazy: nothing is compiled until a forward
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    clean = model_state_dict(compiled)
    assert clean.keys() == model.state_dict().keys()
    # save_checkpoint cleans keys too, and load_checkpoint cleans old checkpoints that kept them
    save_checkpoint(tmp_path / "c.pt", {"model": compiled.state_dict(), "config": model.config.to_dict()})
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert not any("_orig_mod." in k for k in raw["model"])
    torch.save({"format": "nanomoe", "version": 1, "model": compiled.state_dict(), "config": model.config.to_dict()},
               tmp_path / "old.pt")
    assert model_from_checkpoint(tmp_path / "old.pt") is not None


def test_script_missing_data_folder_is_one_clear_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "scripts.04_train", f"--data_dir={tmp_path / 'nope'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_empty_data_folder_message(tmp_path):
    from types import SimpleNamespace

    from nanomoe.data import DataError
    from nanomoe.training.runs import resolve_data_dir

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no 'train' shards"):
        resolve_data_dir(SimpleNamespace(data_dir=str(tmp_path / "empty")))
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir(SimpleNamespace(data_dir=str(tmp_path / "missing")))
