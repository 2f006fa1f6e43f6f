"""Runs described by one flat dict: the run configs of chapter 04 and the glue from a script's
options to `GPTConfig`, `TrainConfig` and a prepared data folder.

A run is one flat dict: data keys (`dataset`, `tokenizer`, ...), `preset` plus any GPTConfig field
(None = the preset's value), and any TrainConfig field. `scripts/04_train.py` reads it from a
packaged JSON file (`nanomoe.resources.config_names()`) or your own, and lets `--key=value` override
any key. JSON only: a config never runs code.

    args = parse_run_args(quick=QUICK, defaults=DEFAULTS)     # defaults < JSON < --quick < --key=value
    data_dir = resolve_data_dir(args)                          # ./data/<dataset>_<tokenizer>, prepared once
    model = GPT(model_config_from_args(args, vocab_size))
    result = train(model, ..., train_config_from_args(args))
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping, Optional

from .. import resources
from ..config import GPTConfig, preset
from ..data import DataError, load_split, prepare, read_corpus
from ..parallel.distributed import DistInfo, barrier
from ..paths import data_root, in_home
from ..tokenizer import gpt2_tokenizer
from .cli import parse_args, to_bool
from .train import TrainConfig

DATA_KEYS = dict(data_dir="", dataset="machado", tokenizer="char", bpe_vocab=4096, max_chars=0)


def run_defaults() -> dict[str, Any]:
    """Every key a run config may set, with its default (model fields: None = preset default)."""
    # init_from: scratch | resume | a GPT-2 name | a Hugging Face folder | a checkpoint (nanomoe.interop.init_from)
    d: dict[str, Any] = {"config": "", "quick": False, "init_from": "scratch", "preset": "modern", **DATA_KEYS}
    d.update({f.name: None for f in fields(GPTConfig)})
    t = TrainConfig().to_dict()
    t.pop("block_size")  # the model's block_size is the training sequence length
    t["betas"] = tuple(t["betas"])
    d.update(t)
    return d


def load_run_config(name: str, known: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """A run config: the name of a packaged one (`nanomoe.resources.config_names()`) or the path to a
    .json file of your own (a file that exists wins over a packaged name). Its keys must be keys of
    `known` (a script's defaults; by default `run_defaults()`)."""
    if not name:
        return {}
    p = Path(name).expanduser()
    if p.is_file():
        text = p.read_text(encoding="utf-8")
    elif name in resources.config_names():
        text = resources.config_text(name)
    elif p.suffix == ".json":
        raise ValueError(f"config file {name} not found")
    else:
        raise ValueError(f"unknown config {name!r}; packaged configs: {', '.join(resources.config_names())} "
                         f"(or a path to a .json file)")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"config {name} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"config {name}: a JSON object of key: value pairs is expected")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}  # "_comment" keys are documentation
    known = known if known is not None else run_defaults()
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise ValueError(f"config {name}: unknown key(s) {unknown}; known keys: {', '.join(sorted(known))}")
    if "betas" in cfg:
        cfg["betas"] = tuple(cfg["betas"])
    return cfg


def parse_run_args(argv=None, quick: Optional[dict] = None, defaults: Optional[dict] = None):
    """Read a run's parameters: defaults < the JSON config named by --config < --quick values <
    explicit --key=value. Returns a SimpleNamespace with every key (see `run_defaults`)."""
    base = dict(defaults or run_defaults())
    first = parse_args(base, argv, quick=quick)
    merged = {**base, **load_run_config(first.config, known=base)}
    merged["config"] = first.config
    return parse_args(merged, argv, quick=quick)


def model_config_from_args(args, vocab_size: int):
    """GPTConfig from a run's preset + the model fields it sets (vocab_size from the data unless set)."""
    over = {}
    for f in fields(GPTConfig):
        v = getattr(args, f.name, None)
        if v is None:
            continue
        if isinstance(f.default, bool) and isinstance(v, str):  # a None default reads "yes" as a string
            v = to_bool(f.name, v)
        over[f.name] = v
    over.setdefault("vocab_size", vocab_size)
    if over["vocab_size"] < vocab_size:
        raise ValueError(f"vocab_size={over['vocab_size']} is smaller than the tokenizer's {vocab_size}")
    return preset(args.preset, **over)


def model_fields_set(args) -> set[str]:
    """The GPTConfig fields a run sets itself (run config, --quick or the command line), vocab_size aside:
    with none of the architecture ones, `--init_from` a pretrained model takes the source's architecture."""
    return {f.name for f in fields(GPTConfig) if getattr(args, f.name, None) is not None}


def train_config_from_args(args) -> TrainConfig:
    """TrainConfig from a run's options (a relative out_dir goes under $NANOMOE_HOME when set)."""
    keys = {f.name for f in fields(TrainConfig)} - {"block_size"}
    kw = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    if getattr(args, "init_from", None) == "resume":  # nanoGPT's spelling of --resume
        kw["resume"] = True
    if kw.get("out_dir"):
        kw["out_dir"] = str(in_home(kw["out_dir"]))
    return TrainConfig(**kw)


def resolve_data_dir(args, dist_info: Optional[DistInfo] = None) -> Path:
    """The prepared data folder of a run: --data_dir when given (it must exist), else
    data/<dataset>_<tokenizer>[_<max_chars>] prepared on first use (by rank 0 under torchrun, then by
    the first process of any other machine that does not see it)."""
    if args.data_dir:
        folder = Path(args.data_dir)
        if not folder.is_dir():
            raise DataError(
                f"data folder {folder} does not exist: prepare it (e.g. `uv run -m data.prepare_machado "
                f"--out_dir {folder}`), or leave --data_dir empty to prepare --dataset/--tokenizer automatically"
            )
        load_split(folder, "train")  # a clear DataError when the folder holds no token shards
        return folder
    tok = args.tokenizer if args.tokenizer != "bpe" or args.bpe_vocab == 4096 else f"bpe{args.bpe_vocab}"
    name = f"{args.dataset}_{tok}" + (f"_{args.max_chars}" if args.max_chars else "")
    folder = data_root() / name
    if dist_info is None or dist_info.is_main:
        _prepare_once(args, folder)
    if dist_info is not None:
        barrier(dist_info)
        # A machine that does not share rank 0's filesystem prepares its own copy (its first process);
        # on a shared filesystem the folder is already there and this does nothing.
        if dist_info.local_rank == 0 and not dist_info.is_main:
            _prepare_once(args, folder)
        barrier(dist_info)
    return folder


def _prepare_once(args, folder: Path) -> None:
    """Tokenize --dataset with --tokenizer into `folder` unless it is already prepared."""
    if (folder / "meta.json").is_file():
        return
    print(f"preparing {folder} ({args.dataset}, tokenizer {args.tokenizer}) ...")
    text = read_corpus(args.dataset)
    if args.max_chars:
        text = text[: args.max_chars]
    t = gpt2_tokenizer() if args.tokenizer == "gpt2" else args.tokenizer
    prepare(text, t, folder, vocab_size=args.bpe_vocab, corpus=args.dataset, progress=False)
