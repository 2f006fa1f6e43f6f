"""Checkpoints that never lose work and never run code.

A checkpoint is one file written by `torch.save`, holding a plain dict:

    {"format": "nanomoe", "version": 1,
     "model": state_dict (no "_orig_mod." / "module." prefixes), "config": GPTConfig.to_dict(),
     "tokenizer": tokenizer.info() or None (files such as tokenizer.json copied beside it, path relative),
     ... and, for training checkpoints: "train_config", "optimizer", "scaler", "step", "tokens",
     "rng" (CPU/CUDA/numpy/python generator states), "loader", "history", "best_val_loss", ...}

Writing is atomic (`nanomoe.files.atomic_write`): the bytes go to a temporary file in the same
folder, are flushed and fsync'ed to disk, and only then `os.replace` renames it over the old file.
A crash or a SIGKILL at any
moment leaves either the old checkpoint or the new one, never half of one.

Reading uses `torch.load(weights_only=True)`: the unpickler only rebuilds tensors and plain Python
data (dict, list, tuple, str, numbers, None). A pickle is a small program; a checkpoint that carries
an object with a `__reduce__` could run arbitrary code when loaded with `weights_only=False`.
Everything this module saves is plain data, so nothing legitimate is lost.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from ..config import GPTConfig
from ..files import atomic_write, remove_stale_temps
from ..model import GPT
from ..parallel.distributed import unwrap
from ..tokenizer import load_tokenizer

FORMAT = "nanomoe"
VERSION = 1
LATEST = "latest.pt"
BEST = "best.pt"
PREFIXES = ("_orig_mod.", "module.")

# Test hook: seconds to sleep between writing the temporary file and renaming it (for checkpoints
# of step >= NANOMOE_CKPT_SLEEP_FROM_STEP), so a test can kill the process in the middle of a save.
# Never set in normal use.
_SLEEP_ENV = "NANOMOE_CKPT_SLEEP_BEFORE_REPLACE"
_SLEEP_FROM_ENV = "NANOMOE_CKPT_SLEEP_FROM_STEP"

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint could not be used; the message says why and what to do."""


# ---- state dict hygiene -----------------------------------------------------------------------


def strip_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Remove the wrapper prefixes that torch.compile ("_orig_mod.") and DDP ("module.") add to
    every key, in any nesting ("module._orig_mod.transformer..." -> "transformer...")."""
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model under any DDP / torch.compile wrapper, with clean keys."""
    return strip_prefixes(unwrap(model).state_dict())


# ---- save ---------------------------------------------------------------------------------------


def _pause_for_tests(state: dict[str, Any]) -> None:
    """The test hook above: sleep with the temporary file written and the rename not yet done."""
    delay = float(os.environ.get(_SLEEP_ENV, "0") or 0)
    if delay > 0 and int(state.get("step", 0)) >= int(os.environ.get(_SLEEP_FROM_ENV, "0") or 0):
        time.sleep(delay)


def save_checkpoint(path: PathLike, state: dict[str, Any]) -> Path:
    """Atomically write `state` to `path` (`nanomoe.files.atomic_write`: temp file + fsync + os.replace).

    `state` gets "format" and "version" added when missing; its "model" keys are cleaned of
    wrapper prefixes."""
    state = dict(state)
    state.setdefault("format", FORMAT)
    state.setdefault("version", VERSION)
    if "model" in state:
        state["model"] = strip_prefixes(state["model"])
    with atomic_write(path) as f:
        torch.save(state, f)
        _pause_for_tests(state)
    return Path(path)


def copy_checkpoint(src: PathLike, dst: PathLike) -> Path:
    """Atomically copy a checkpoint file (e.g. latest.pt -> best.pt)."""
    with open(src, "rb") as fi, atomic_write(dst) as fo:
        shutil.copyfileobj(fi, fo, 1 << 24)
    return Path(dst)


def remove_stale_tmp(folder: PathLike) -> None:
    """Delete temporary files left by a save that was killed before its rename."""
    remove_stale_temps(folder, "*.pt")


# ---- the random state that makes resume exact ---------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every global generator's state as plain data (tensors, lists, numbers): weights_only-safe."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": int(py_version), "state": [int(v) for v in py_state], "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def plain(x: Any) -> Any:
    """numpy scalars and 1-element tensors -> Python numbers, recursively (JSON- and weights_only-friendly)."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    return x


# ---- load ---------------------------------------------------------------------------------------


def resolve_checkpoint_path(path: PathLike) -> Path:
    """A checkpoint file, or a run folder (then its latest.pt)."""
    p = Path(path)
    if p.is_dir():
        p = p / LATEST
    return p


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a nanomoe checkpoint safely (`torch.load(weights_only=True)`).

    `path` is a .pt file or a run folder (its latest.pt). Raises CheckpointError for a missing
    file, a file that is not a nanomoe checkpoint, a corrupt/truncated file, or a file that holds
    Python objects other than tensors and plain data (refused: loading it could run code)."""
    p = resolve_checkpoint_path(path)
    if not p.is_file():
        hint = f" (the folder {Path(path)} has no {LATEST})" if Path(path).is_dir() else ""
        raise CheckpointError(f"checkpoint {p} not found{hint}; train first or check the path")
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {p} is empty (0 bytes): the file is corrupt; use another checkpoint")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        m = re.search(r"Unsupported (global|class)[^\n]*", text)
        if m:  # the file asks the unpickler to import and call something: code, not data
            raise CheckpointError(
                f"refused to load {p}: it holds Python objects that are not tensors or plain data, and "
                f"unpickling them could run arbitrary code (torch.load with weights_only=True stopped it: "
                f"{m.group(0)[:160]}). nanomoe checkpoints never contain such objects; do not load this file "
                "unless you made it yourself."
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        why = reason.group(1).strip() if reason else type(e).__name__
        raise CheckpointError(f"checkpoint {p} is corrupt ({why[:160]}); use another checkpoint") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:  # random bytes reach any
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {p} is corrupt or truncated and cannot be read ({type(e).__name__}: {msg[:200]}); "
            "use another checkpoint (best.pt, or an earlier copy)"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        what = (f"a {type(ckpt).__name__}" if not isinstance(ckpt, dict)
                else f"a dict with keys {sorted(map(str, ckpt))[:8]}")
        raise CheckpointError(
            f"{p} is not a nanomoe checkpoint (it holds {what}, without format='nanomoe'). "
            "For Hugging Face weights use nanomoe.interop.hf.load_hf; for a raw state_dict build GPT(config) and "
            "call load_state_dict yourself."
        )
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{p} is a nanomoe checkpoint of version {ckpt.get('version')}, newer than this code "
            f"understands ({VERSION}); update nanomoe"
        )
    for key in ("model", "config"):
        if key not in ckpt:
            raise CheckpointError(f"{p} is a nanomoe checkpoint without '{key}': the file is incomplete")
    ckpt["model"] = strip_prefixes(ckpt["model"])
    ckpt["_path"] = str(p)  # where it came from (not saved): lets tokenizer files be found beside it
    return ckpt


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two config dicts, one 'field: a -> b' per field."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            out.append(f"{k}: checkpoint has {a!r}, this run has {b!r}")
    return out


def check_config(ckpt: dict[str, Any], config: GPTConfig) -> None:
    """Refuse a checkpoint that was built for another model config, naming the differing fields."""
    diffs = config_diff(ckpt["config"], config.to_dict())
    if diffs:
        where = ckpt.get("_path", "the checkpoint")
        raise CheckpointError(
            f"{where} was saved for a different model config ({len(diffs)} field(s) differ):\n  "
            + "\n  ".join(diffs)
            + "\nUse the same config to resume, or a new out_dir to start a new run."
        )


def model_from_checkpoint(ckpt: Union[dict[str, Any], PathLike], device: str = "cpu"):
    """Build the GPT a checkpoint describes and load its weights (strictly: every key must match).

    `ckpt` is a dict from `load_checkpoint`, or a path (then it is loaded first). The model is
    returned in eval mode on `device`."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    try:
        config = GPTConfig.from_dict(dict(ckpt["config"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's config is not valid for this nanomoe: {e}") from None
    model = GPT(config)
    missing, unexpected = model.load_state_dict(strip_prefixes(ckpt["model"]), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"the checkpoint's weights do not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.to(device).eval()


def tokenizer_from_checkpoint(ckpt: dict[str, Any], base_dir: Optional[PathLike] = None):
    """Rebuild the tokenizer recorded in a checkpoint (None when it recorded none). Relative file
    paths (a trained BPE's tokenizer.json) are looked up beside the checkpoint file."""
    info = ckpt.get("tokenizer")
    if not info:
        return None
    if base_dir is None and ckpt.get("_path"):
        base_dir = Path(ckpt["_path"]).parent
    return load_tokenizer(info, base_dir)
