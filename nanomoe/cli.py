"""Command-line parameters shared by every chapter script and notebook.

A chapter declares its hyper-parameters once, as a dict of defaults, and reads them with
`parse_args`:

    DEFAULTS = dict(epochs=200, lr=3e-3, betas=(0.9, 0.95), tokenizer="char", quick=False)
    args = parse_args(DEFAULTS, quick=dict(epochs=20))   # args.epochs, args.lr, ...

- As a script (`uv run -m scripts.01_train_nanogpt --epochs=300 --lr 1e-3 --no-quick`) the
  values come from `sys.argv`.
- Inside a notebook (a Jupyter/Colab kernel, whose argv is the kernel's own `-f kernel.json`)
  they come from the environment variable `NANOMOE_ARGS`, e.g. `NANOMOE_ARGS="--quick --epochs=5"`;
  that is how the tests run every notebook in a quick mode. In the notebook you can also simply
  edit the `DEFAULTS` cell.

Each value is cast to the type of its default: `bool` (`--flag`, `--no-flag`, `--flag=false`),
`int`, `float`, `str`, `tuple`/`list` (`--betas=0.9,0.95`), and `None` defaults (the value is
read as int, then float, then kept as a string; `none` gives None). `--help` prints every
parameter with its default and type, then exits. Unknown keys are an error that lists the known ones.
"""

from __future__ import annotations

import os
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
        from IPython import get_ipython

        shell = get_ipython()
    except Exception:  # pragma: no cover - IPython is always there when ipykernel is
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


def _type_name(default: Any) -> str:
    if default is None:
        return "optional"
    if isinstance(default, (tuple, list)):
        inner = type(default[0]).__name__ if len(default) else "str"
        return f"{type(default).__name__}[{inner}]"
    return type(default).__name__


def _cast_scalar(key: str, value: str, default: Any) -> Any:
    """Cast a string to the type of `default` (a scalar)."""
    low = value.strip().lower()
    if isinstance(default, bool):  # before int: bool is a subclass of int
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise CLIError(f"--{key} expects a boolean (true/false, 1/0, yes/no), got {value!r}")
    if default is None:
        if low in _NONE:
            return None
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
        if low in ("true", "false"):
            return low == "true"
        return value
    if low in _NONE and not isinstance(default, str):
        return None  # e.g. --top_k=none turns an optional limit off
    if isinstance(default, int):
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
    if isinstance(default, float):
        try:
            return float(value)
        except ValueError:
            raise CLIError(f"--{key} expects a number, got {value!r}") from None
    if isinstance(default, str):
        return value
    raise CLIError(f"--{key}: cannot parse a value for a default of type {type(default).__name__}")


def _cast(key: str, value: str, default: Any) -> Any:
    if isinstance(default, (tuple, list)):
        if value.strip().lower() in _NONE:
            return None
        text = value.strip().strip("()[]")
        parts = [p.strip() for p in text.split(",") if p.strip()] if text else []
        proto = default[0] if len(default) else ""
        items = [_cast_scalar(key, p, proto) for p in parts]
        return type(default)(items)
    return _cast_scalar(key, value, default)


def _normalize(key: str) -> str:
    return key.replace("-", "_")


def format_help(defaults: Mapping[str, Any], quick: Optional[Mapping[str, Any]] = None, prog: str = "") -> str:
    """The `--help` text: every parameter with its default and type."""
    width = max((len(k) for k in defaults), default=0) + 2
    lines = [f"usage: {prog or 'python -m scripts.NN_name'} [--key=value | --key value | --flag | --no-flag] ...", ""]
    lines.append(f"In a notebook, put the same options in the environment variable {ENV_VAR}.")
    lines.append("")
    lines.append("parameters (default, type):")
    for k, v in defaults.items():
        extra = f"   [--quick: {quick[k]!r}]" if quick and k in quick else ""
        lines.append(f"  --{k:<{width}} {v!r}  ({_type_name(v)}){extra}")
    return "\n".join(lines)


def parse_args(
    defaults: Mapping[str, Any],
    argv: Optional[Union[Sequence[str], str]] = None,
    quick: Optional[Mapping[str, Any]] = None,
) -> SimpleNamespace:
    """Read `--key=value` overrides of `defaults` and return them all as a SimpleNamespace.

    argv: a list of arguments or one string (split like a shell). None reads `sys.argv[1:]` when
    run as a script and the environment variable NANOMOE_ARGS inside a notebook kernel.
    quick: values used when `--quick` is on (defaults must then have a bool "quick" key);
    values given explicitly on the command line still win over them.

    Raises CLIError (a ValueError) for an unknown key or a bad value; when reading sys.argv of
    a script, prints the message and exits with status 2 instead of a traceback."""
    from_script = False
    if argv is None:
        if in_notebook():
            argv = os.environ.get(ENV_VAR, "")
        else:
            argv = sys.argv[1:]
            from_script = True
    if isinstance(argv, str):
        argv = shlex.split(argv)
    prog = ""
    if from_script and sys.argv and sys.argv[0]:
        p = os.path.abspath(sys.argv[0])
        parent = os.path.basename(os.path.dirname(p))
        stem = os.path.splitext(os.path.basename(p))[0]
        prog = f"uv run -m {parent}.{stem}" if parent == "scripts" else f"python {sys.argv[0]}"
    if quick:
        unknown_q = sorted(set(quick) - set(defaults))
        if unknown_q or "quick" not in defaults:
            raise CLIError(f"quick overrides {unknown_q or list(quick)} need matching keys (and a 'quick' flag) in defaults")
    try:
        values = _parse(defaults, list(argv), quick, prog)
    except CLIError as e:
        if from_script:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    return SimpleNamespace(**values)


def _parse(defaults, argv, quick, prog):
    values = dict(defaults)
    given: set[str] = set()
    known = ", ".join(f"--{k}" for k in defaults)
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            print(format_help(defaults, quick, prog))
            raise SystemExit(0)
        if not arg.startswith("--") or arg == "--":
            raise CLIError(f"unexpected argument {arg!r}: parameters look like --key=value. Known: {known}")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            key = _normalize(key)
        else:
            key = _normalize(body)
            value = None
            negated = key.startswith("no_") and key[3:] in defaults and isinstance(defaults[key[3:]], bool)
            if negated:
                values[key[3:]] = False
                given.add(key[3:])
                continue
            if key in defaults and isinstance(defaults[key], bool):
                # a bare --flag is True; "--flag false" is also accepted
                if i < len(argv) and argv[i].strip().lower() in _TRUE | _FALSE:
                    value = argv[i]
                    i += 1
                else:
                    values[key] = True
                    given.add(key)
                    continue
            elif key in defaults:
                if i >= len(argv):
                    raise CLIError(f"--{key} needs a value (e.g. --{key}={defaults[key]!r})")
                value = argv[i]
                i += 1
        if key not in defaults:
            import difflib

            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f" Did you mean --{close[0]}?" if close else ""
            raise CLIError(f"unknown parameter --{key}.{hint} Known parameters: {known}")
        values[key] = _cast(key, value, defaults[key])
        given.add(key)
    if quick and values.get("quick"):
        for k, v in quick.items():
            if k not in given:
                values[k] = v
    return values


def describe(args: SimpleNamespace, defaults: Mapping[str, Any]) -> str:
    """One line with the parameters that differ from the defaults (for logs)."""
    changed = {k: v for k, v in vars(args).items() if k in defaults and defaults[k] != v}
    if not changed:
        return "parameters: defaults"
    return "parameters: " + " ".join(f"{k}={v!r}" for k, v in changed.items())

