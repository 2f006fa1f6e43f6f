"""One command-line convention for every script of the course, and for notebooks.

A script declares its options once, as a dict of defaults, and reads them with `parse_args`:

    DEFAULTS = dict(epochs=200, lr=3e-3, betas=(0.9, 0.95), tokenizer="char", quick=False)
    args = parse_args(DEFAULTS, quick=dict(epochs=20))   # args.epochs, args.lr, ...

An `argparse` parser is generated from the dict: one option per key, typed by its default.

- `--key=value` or `--key value`; underscores are the canonical spelling, dashes work too
  (`--top-k=5` sets `top_k`);
- booleans: `--flag`, `--no-flag`, `--flag=false`, `--flag false`;
- `int`, `float`, `str`, tuples/lists (`--betas=0.9,0.95`); a `None` default reads an int, then a
  float, else keeps the string, and `none` gives None (for any non-string option);
- `--quick` (when the defaults have a `quick` flag) applies the `quick` values, except the ones
  given explicitly;
- `--help` lists every option with its default and type; an unknown option is answered with the
  closest known one ("Did you mean --n_layer?").

As a script the options come from `sys.argv`, and a bad one ends the script with one line on
stderr and exit status 2; `parse_args` then also installs `short_errors()`, so the package's clear
errors about bad input (a missing file, an unknown tokenizer, an invalid config) end the script the
same way, as one line, instead of a traceback.
Inside a notebook (a Jupyter/Colab kernel, whose argv is the kernel's own)
they come from the environment variable `NANOMOE_ARGS`, e.g. `NANOMOE_ARGS="--quick --epochs=5"`;
that is how the tests run every notebook in quick mode.

`short_errors()` makes a script print the package's clear `ValueError`s (bad data folder, bad
checkpoint, bad config) as one line with a non-zero exit instead of a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import sys
from types import SimpleNamespace
from typing import Any, Mapping, Optional, Sequence, Union

ENV_VAR = "NANOMOE_ARGS"

_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}
_NONE = {"none", "null"}


class CLIError(ValueError):
    """A command-line parameter is unknown or its value has the wrong type."""


def in_notebook() -> bool:
    """True inside a Jupyter/Colab kernel (where sys.argv belongs to the kernel, not to us)."""
    if "ipykernel" not in sys.modules:
        return False
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    # ipykernel_launcher.py (Jupyter, VS Code, nbclient), colab_kernel_launcher.py (Colab)
    if "kernel" in argv0 and "launcher" in argv0:
        return True
    # `python -m ipykernel -f kernel.json` and other launchers pass the connection file
    if "-f" in sys.argv[1:] or any(a.startswith("--f=") for a in sys.argv[1:]):
        return True
    try:
        from IPython import get_ipython  # present whenever ipykernel is
    except ImportError:  # pragma: no cover
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


# ---- values ---------------------------------------------------------------------------------------


def to_bool(key: str, value: str) -> bool:
    """'true'/'false', '1'/'0', 'yes'/'no', 'on'/'off' -> bool; anything else is a CLIError."""
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise CLIError(f"--{key} expects a boolean (true/false, 1/0, yes/no), got {value!r}")


def _guess(value: str) -> Any:
    """A value for a None default: int, then float, then bool words, else the string itself."""
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    low = value.strip().lower()
    return low == "true" if low in ("true", "false") else value


def _to_int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        pass
    try:  # accept 1e3 or 300.0, but not 2.5
        f = float(value)
    except ValueError:
        f = None
    if f is not None and f.is_integer():
        return int(f)
    raise CLIError(f"--{key} expects an integer, got {value!r}")


def _cast_scalar(key: str, value: str, default: Any) -> Any:
    """Cast a string to the type of `default` (a scalar)."""
    low = value.strip().lower()
    if isinstance(default, bool):  # before int: bool is a subclass of int
        return to_bool(key, value)
    if default is None:
        return None if low in _NONE else _guess(value)
    if low in _NONE and not isinstance(default, str):
        return None  # e.g. --top_k=none turns an optional limit off
    if isinstance(default, int):
        return _to_int(key, value)
    if isinstance(default, float):
        try:
            return float(value)
        except ValueError:
            raise CLIError(f"--{key} expects a number, got {value!r}") from None
    if isinstance(default, str):
        return value
    raise CLIError(f"--{key}: cannot parse a value for a default of type {type(default).__name__}")


def cast(key: str, value: str, default: Any) -> Any:
    """The value of option `key` from its text, typed like `default` (tuples/lists: comma-separated)."""
    if isinstance(default, (tuple, list)):
        if value.strip().lower() in _NONE:
            return None
        text = value.strip().strip("()[]")
        parts = [p.strip() for p in text.split(",") if p.strip()] if text else []
        proto = default[0] if len(default) else ""
        return type(default)(_cast_scalar(key, p, proto) for p in parts)
    return _cast_scalar(key, value, default)


def _type_name(default: Any) -> str:
    if default is None:
        return "optional"
    if isinstance(default, (tuple, list)):
        inner = type(default[0]).__name__ if len(default) else "str"
        return f"{type(default).__name__}[{inner}]"
    return type(default).__name__


# ---- the parser -----------------------------------------------------------------------------------


def format_help(defaults: Mapping[str, Any], quick: Optional[Mapping[str, Any]] = None, prog: str = "",
                positionals: Optional[Mapping[str, str]] = None, description: str = "") -> str:
    """The `--help` text: every parameter with its default and type."""
    pos = " ".join(positionals or {})
    width = max((len(k) for k in defaults), default=0) + 2
    lines = [f"usage: {prog or 'python -m scripts.NN_name'} {pos + ' ' if pos else ''}"
             "[--key=value | --key value | --flag | --no-flag] ...", ""]
    if description:
        lines += [description, ""]
    for name, text in (positionals or {}).items():
        lines.append(f"  {name:<{width + 2}} {text}")
    if positionals:
        lines.append("")
    lines.append(f"In a notebook, put the same options in the environment variable {ENV_VAR}.")
    lines.append("Underscores or dashes: --top_k and --top-k are the same option.")
    lines.append("")
    lines.append("parameters (default, type):")
    for k, v in defaults.items():
        extra = f"   [--quick: {quick[k]!r}]" if quick and k in quick else ""
        lines.append(f"  --{k:<{width}} {v!r}  ({_type_name(v)}){extra}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse that raises CLIError with a one-line message (the caller decides how to show it)."""

    def error(self, message: str):
        m = re.match(r"argument (--[\w-]+)(?:/--[\w-]+)*: expected one argument", message)
        if m:
            message = f"{m.group(1)} needs a value (e.g. {m.group(1)}=VALUE)"
        raise CLIError(re.sub(r"^argument [^:]+: ", "", message))


def _typed(key: str, default: Any):
    def parse(text: str) -> Any:
        try:
            return cast(key, text, default)
        except CLIError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def build_parser(defaults: Mapping[str, Any], positionals: Optional[Mapping[str, str]] = None,
                 prog: str = "") -> argparse.ArgumentParser:
    """The argparse parser of `defaults`: one `--key` (and `--key-with-dashes`) per key. Options not
    given are left out of the result, so a caller can tell explicit values from defaults."""
    p = _Parser(prog=prog or None, add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    for name, text in (positionals or {}).items():
        p.add_argument(name, help=text)
    for key, default in defaults.items():
        names = [f"--{key}"] + ([f"--{key.replace('_', '-')}"] if "_" in key else [])
        p.add_argument(*names, dest=key, type=_typed(key, default), metavar="VALUE")
    return p


def _spell_flags(argv: Sequence[str], defaults: Mapping[str, Any]) -> list[str]:
    """Rewrite boolean flags to the one form the parser reads: `--flag` -> `--flag=true`,
    `--no-flag` -> `--flag=false`, `--flag false` -> `--flag=false`."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        key = arg[2:].replace("-", "_") if arg.startswith("--") and "=" not in arg else None
        if key and key.startswith("no_") and isinstance(defaults.get(key[3:]), bool):
            out.append(f"--{key[3:]}=false")
        elif key and isinstance(defaults.get(key), bool):
            value = "true"
            if i < len(argv) and argv[i].strip().lower() in _TRUE | _FALSE:
                value, i = argv[i], i + 1
            out.append(f"--{key}={value}")
        else:
            out.append(arg)
    return out


def _unknown(extra: Sequence[str], defaults: Mapping[str, Any]) -> CLIError:
    known = ", ".join(f"--{k}" for k in defaults)
    arg = extra[0]
    if not arg.startswith("--") or arg == "--":
        return CLIError(f"unexpected argument {arg!r}: parameters look like --key=value. Known: {known}")
    key = arg[2:].split("=", 1)[0].replace("-", "_")
    close = difflib.get_close_matches(key, list(defaults), n=1)
    hint = f" Did you mean --{close[0]}?" if close else ""
    return CLIError(f"unknown parameter --{key}.{hint} Known parameters: {known}")


def _script_name() -> str:
    """How the running script was started, for the usage line (`uv run -m scripts.04_train`)."""
    if not sys.argv or not sys.argv[0]:
        return ""
    path = os.path.abspath(sys.argv[0])
    parent = os.path.basename(os.path.dirname(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"uv run -m {parent}.{stem}" if parent in ("scripts", "data") else f"python {sys.argv[0]}"


def parse_args(
    defaults: Mapping[str, Any],
    argv: Optional[Union[Sequence[str], str]] = None,
    quick: Optional[Mapping[str, Any]] = None,
    *,
    positionals: Optional[Mapping[str, str]] = None,
    description: str = "",
) -> SimpleNamespace:
    """Read the overrides of `defaults` and return every option as a SimpleNamespace.

    argv: a list of arguments or one string (split like a shell). None reads `sys.argv[1:]` in a
    script and the environment variable NANOMOE_ARGS inside a notebook kernel.
    quick: values used when `--quick` is on (defaults must then have a bool "quick" key); values
    given explicitly still win over them. positionals: {name: help} of required positional
    arguments (they come first in the result).

    Raises CLIError (a ValueError) for an unknown option or a bad value; when reading sys.argv of
    a script, prints the message and exits with status 2 instead of a traceback."""
    from_script = argv is None and not in_notebook()
    if argv is None:
        argv = sys.argv[1:] if from_script else os.environ.get(ENV_VAR, "")
    if isinstance(argv, str):
        argv = shlex.split(argv)
    prog = _script_name() if from_script else ""
    if from_script:
        short_errors()  # a script that reads its options this way also reports bad input in one line
    if quick and (set(quick) - set(defaults) or "quick" not in defaults):
        bad = sorted(set(quick) - set(defaults)) or list(quick)
        raise CLIError(f"quick overrides {bad} need matching keys (and a 'quick' flag) in defaults")
    if "-h" in argv or "--help" in argv:
        print(format_help(defaults, quick, prog, positionals, description))
        raise SystemExit(0)
    try:
        given, extra = build_parser(defaults, positionals, prog).parse_known_args(_spell_flags(argv, defaults))
        if extra:
            raise _unknown(extra, defaults)
    except CLIError as e:
        if from_script:
            print(f"error: {e} (see --help)", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    given = vars(given)
    values = {k: given[k] for k in positionals or {}}
    values.update(defaults)
    if quick and given.get("quick", defaults.get("quick")):
        values.update(quick)
    values.update({k: v for k, v in given.items() if k in defaults})
    return SimpleNamespace(**values)


def describe(args: SimpleNamespace, defaults: Mapping[str, Any]) -> str:
    """One line with the parameters that differ from the defaults (for logs)."""
    changed = {k: v for k, v in vars(args).items() if k in defaults and defaults[k] != v}
    if not changed:
        return "parameters: defaults"
    return "parameters: " + " ".join(f"{k}={v!r}" for k, v in changed.items())


# ---- errors as one line ---------------------------------------------------------------------------

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # nanomoe/: errors raised by nanomoe itself


def short_errors() -> None:
    """In a script, print the clear ValueErrors that nanomoe raises (DataError, CheckpointError,
    CLIError, bad configs) as one line and exit with status 1 instead of a traceback. Every other
    exception, and a ValueError raised outside the nanomoe package, keeps its full traceback."""
    previous = sys.excepthook
    if getattr(previous, "nanomoe_short_errors", False):
        return  # already installed

    def hook(kind, value, tb):
        last = tb
        while last is not None and last.tb_next is not None:
            last = last.tb_next
        where = os.path.abspath(last.tb_frame.f_code.co_filename) if last is not None else ""
        if issubclass(kind, ValueError) and where.startswith(PACKAGE_DIR):
            print(f"error: {value}", file=sys.stderr)
            return
        previous(kind, value, tb)

    hook.nanomoe_short_errors = True
    sys.excepthook = hook
