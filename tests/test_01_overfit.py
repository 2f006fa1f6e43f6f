"""Chapter 01: memorizing one paragraph (nanomoe.course.overfit), the chapter script end to end, and the
command-line parameters (nanomoe.training.cli) every chapter uses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanomoe import GPT, gpt2_config
from nanomoe.course.overfit import (
    checkpoint_steps,
    continue_text,
    read_text,
    reconstruct,
    run_overfit,
    set_cpu_threads,
    shift_targets,
)
from nanomoe.training.cli import CLIError, describe, format_help, in_notebook, parse_args

REPO = Path(__file__).resolve().parent.parent
PARAGRAPH = REPO / "nanomoe" / "resources" / "paragrafo.txt"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- the paragraph and the targets ---------------------------------------------------------------


def test_paragraph_is_one_portuguese_paragraph():
    text = read_text(str(PARAGRAPH))
    assert 400 <= len(text) <= 600
    assert "\n" not in text  # one paragraph
    assert any(c in text for c in "ãçéáêó")  # Portuguese, with its accents


def test_shift_targets_is_next_token_with_last_ignored():
    ids = torch.tensor([[5, 1, 4, 2, 3]])
    t = shift_targets(ids)
    assert t.tolist() == [[1, 4, 2, 3, -1]]
    assert ids.tolist() == [[5, 1, 4, 2, 3]]  # input untouched
    with pytest.raises(ValueError, match="at least 2 tokens"):
        shift_targets(torch.tensor([[7]]))


def test_shift_targets_loss_equals_x_y_slices():
    """The blog's `targets[:, -1] = -1` gives the same loss as x = ids[:-1], y = ids[1:]."""
    torch.manual_seed(0)
    model = GPT(gpt2_config(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    ids = torch.randint(0, 20, (1, 12))
    _, loss_trick = model(ids, shift_targets(ids))
    _, loss_slice = model(ids[:, :-1], ids[:, 1:])
    assert torch.allclose(loss_trick, loss_slice, atol=1e-6)


@pytest.mark.parametrize("epochs,expected", [(100, [25, 50, 75, 100]), (8, [2, 4, 6, 8]), (2, [1, 2]), (1, [1])])
def test_checkpoint_steps(epochs, expected):
    assert checkpoint_steps(epochs) == expected


def test_checkpoint_steps_rejects_zero():
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        checkpoint_steps(0)


def test_reconstruct_and_continue_shapes_untrained():
    torch.manual_seed(0)
    model = GPT(gpt2_config(vocab_size=11, block_size=16, n_layer=1, n_head=1, n_embd=8))
    model.train()
    ids = torch.randint(0, 11, (1, 9))
    rec = reconstruct(model, ids)
    assert rec.shape == (9,) and rec[0] == ids[0, 0]
    assert model.training  # mode restored
    cont = continue_text(model, ids, 3)
    assert cont.shape == (9,) and torch.equal(cont[:3], ids[0, :3])
    assert continue_text(model, ids, 3, max_new_tokens=20).shape == (23,)  # beyond block_size: sliding window
    with pytest.raises(ValueError, match="prefix_tokens"):
        continue_text(model, ids, 0)


# ---- training ------------------------------------------------------------------------------------


def test_training_memorizes_the_paragraph():
    """A small but sure configuration (measured: exact after 30-35 steps on 3 seeds) learns the
    whole paragraph: argmax reconstruction and greedy continuation both equal the text."""
    text = read_text(str(PARAGRAPH))
    reports = []
    model, tok, ids, res = run_overfit(
        text, n_layer=2, n_head=2, n_embd=64, dropout=0.0, lr=3e-3, epochs=60, seed=0,
        cont_prefix_tokens=10, eval_every=5, on_report=reports.append,
    )
    assert [r.step for r in reports] == [15, 30, 45, 60]
    losses = [r.loss for r in reports]
    assert losses == sorted(losses, reverse=True)  # keeps improving
    final = res.final
    assert final.exact and final.errors == 0
    assert tok.decode(final.reconstruction.tolist()) == text
    assert tok.decode(final.continuation.tolist()) == text  # 10 chars of prompt -> the whole paragraph
    assert final.ppl < 1.5
    assert res.first_exact_step is not None and res.first_exact_step <= 60
    assert [h["step"] for h in res.history] == list(range(61))  # step 0 = before training
    assert res.history[0]["loss"] > 3 * res.history[-1]["loss"] and "train_loss" not in res.history[0]
    assert torch.equal(reconstruct(model, ids), ids[0])


def test_stop_ppl_stops_early():
    text = read_text(str(PARAGRAPH))[:120]
    _, _, _, res = run_overfit(text, n_layer=1, n_head=2, n_embd=32, dropout=0.0, lr=1e-2, epochs=200,
                               eval_every=2, stop_ppl=2.0, cont_new_tokens=5)
    step = res.first_ppl_below[2.0]
    assert res.history[-1]["step"] == step < 200
    assert res.final.step == step and res.final.ppl < 2.0


def test_read_text_from_other_cwd_and_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = read_text("paragrafo.txt")  # not in this folder: the copy packaged with nanomoe
    assert text == PARAGRAPH.read_text(encoding="utf-8").strip()
    assert read_text("paragrafo.txt", max_chars=20) == text[:20].strip()
    (tmp_path / "paragrafo.txt").write_text("meu texto\n", encoding="utf-8")
    assert read_text("paragrafo.txt") == "meu texto"  # the reader's own file wins
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        read_text(str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError, match="--text_file"):
        read_text(str(tmp_path / "missing.txt"))


def test_set_cpu_threads_requested():
    n = torch.get_num_threads()
    try:
        assert set_cpu_threads(1, verbose=False) == 1 and torch.get_num_threads() == 1
        assert 1 <= set_cpu_threads(0, verbose=False) <= n
    finally:
        torch.set_num_threads(n)


# ---- plots -----------------------------------------------------------------------------------------


def test_plots_save_and_draw_what_they_say(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from nanomoe.course.plots import plot_curves, plot_loss_ppl

    h1 = [{"step": s, "train_loss": 3.0 / (s + 1), "val_loss": 3.2 / (s + 1)} for s in range(10)]
    h2 = [{"step": s, "train_loss": 2.0 / (s + 1)} for s in range(5)]
    fig = plot_curves({"a": h1, "b": h2}, y=("train_loss", "val_loss"), save_path=tmp_path / "sub" / "c.png")
    assert (tmp_path / "sub" / "c.png").stat().st_size > 1000
    ax_train, ax_val = fig.axes
    assert [len(line.get_xdata()) for line in ax_train.lines] == [10, 5]
    assert [len(line.get_xdata()) for line in ax_val.lines] == [10]  # run b has no val_loss
    with pytest.raises(ValueError, match="at least one key"):
        plot_curves(h1, y=())
    hist = [{"step": 0, "loss": 3.5, "ppl": 33.1}] + [
        {"step": s, "train_loss": 3.0 / s, **({"loss": 2.5 / s, "ppl": 2.718 ** (2.5 / s)} if s % 5 == 0 else {})}
        for s in range(1, 21)
    ]
    fig = plot_loss_ppl(hist, vocab_size=36, target_ppl=1.5, save_path=tmp_path / "lp.png")
    ax_loss, ax_ppl = fig.axes
    assert ax_ppl.get_yscale() == "log"
    assert len(ax_loss.lines[0].get_xdata()) == 5  # steps 0, 5, 10, 15, 20
    assert any(abs(line.get_ydata()[0] - 3.5835) < 1e-3 for line in ax_loss.lines)  # ln(36) reference line
    assert any(line.get_label() == "treino (com dropout)" for line in ax_loss.lines)


# ---- the script end to end --------------------------------------------------------------------------


def test_script_runs_end_to_end(tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    env.pop("NANOMOE_ARGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.01_train_nanogpt", "--quick", "--epochs=8", "--eval_every=2",
         "--threads=1", f"--out_dir={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "device: cpu" in out  # pick_precision says what it chose
    assert "loss inicial" in out
    for step in (2, 4, 6, 8):
        assert f"=== Passo {step:>4}/8 |" in out
    assert out.count("[reconstrução]") == 5 and out.count("[continuação") == 5  # initial + 4 checkpoints
    assert "=== Resumo ===" in out and "perplexidade final" in out
    assert (tmp_path / "loss_ppl.png").stat().st_size > 1000


# ---- nanomoe.training.cli ------------------------------------------------------------------------------------

DEFAULTS = dict(epochs=100, lr=1e-3, betas=(0.9, 0.95), name="char", quick=False, top_k=None, dropout=0.2, bias=True)


def test_cli_defaults_and_casting():
    a = parse_args(DEFAULTS, [])
    assert vars(a) == DEFAULTS
    a = parse_args(DEFAULTS, ["--epochs=300", "--lr", "5e-3", "--betas=0.8,0.99", "--name=gpt2", "--top-k=5",
                              "--dropout=0", "--no-bias"])
    assert a.epochs == 300 and type(a.epochs) is int
    assert a.lr == 5e-3 and type(a.lr) is float
    assert a.betas == (0.8, 0.99) and type(a.betas) is tuple
    assert a.name == "gpt2" and a.top_k == 5 and a.dropout == 0.0 and type(a.dropout) is float
    assert a.bias is False
    assert parse_args(DEFAULTS, "--epochs=1e3 --top_k=none --bias=false --quick").epochs == 1000
    assert parse_args(DEFAULTS, "--top_k=0.9").top_k == 0.9  # None default: int, then float, then str
    assert parse_args(DEFAULTS, "--top_k=abc").top_k == "abc"
    assert parse_args(DEFAULTS, "--quick").quick is True
    assert parse_args(DEFAULTS, "--quick false").quick is False
    assert parse_args(DEFAULTS, ["--betas=(0.5, 0.6)"]).betas == (0.5, 0.6)


@pytest.mark.parametrize(
    "argv,match",
    [
        ("--epoch=3", r"unknown parameter --epoch\. Did you mean --epochs\?.*Known parameters: --epochs, --lr"),
        ("--epochs=2.5", "--epochs expects an integer"),
        ("--lr=fast", "--lr expects a number"),
        ("--quick=maybe", "--quick expects a boolean"),
        ("--lr", "--lr needs a value"),
        ("300", "unexpected argument '300'"),
    ],
)
def test_cli_errors(argv, match):
    with pytest.raises(CLIError, match=match):
        parse_args(DEFAULTS, argv)
    assert issubclass(CLIError, ValueError)


def test_cli_quick_overrides_and_explicit_values_win():
    quick = dict(epochs=5)
    assert parse_args(DEFAULTS, "", quick=quick).epochs == 100
    assert parse_args(DEFAULTS, "--quick", quick=quick).epochs == 5
    assert parse_args(DEFAULTS, "--quick --epochs=7", quick=quick).epochs == 7
    assert parse_args(DEFAULTS, "--epochs=7 --quick", quick=quick).epochs == 7
    with pytest.raises(CLIError, match="quick"):
        parse_args(DEFAULTS, "", quick=dict(nope=1))


def test_cli_help_lists_defaults_and_types(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(DEFAULTS, "--help", quick=dict(epochs=5))
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--epochs" in out and "100  (int)" in out and "[--quick: 5]" in out
    assert "(0.9, 0.95)  (tuple[float])" in out and "None  (optional)" in out
    assert format_help(DEFAULTS) in out or "NANOMOE_ARGS" in out


def test_cli_reads_sys_argv_in_scripts_and_exits_cleanly(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["scripts/x.py", "--epochs=3"])
    monkeypatch.setenv("NANOMOE_ARGS", "--epochs=9")  # ignored outside a notebook
    assert not in_notebook()
    assert parse_args(DEFAULTS).epochs == 3
    monkeypatch.setattr(sys, "argv", ["scripts/x.py", "--nope=1"])
    with pytest.raises(SystemExit) as e:
        parse_args(DEFAULTS)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown parameter --nope" in err and "Traceback" not in err


def test_cli_reads_env_inside_a_kernel(monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setattr(sys, "argv", ["/venv/lib/python3.12/site-packages/ipykernel_launcher.py", "-f", "/tmp/k.json"])
    assert in_notebook()
    monkeypatch.setenv("NANOMOE_ARGS", "--quick --epochs=5 --name 'hf:some model'")
    a = parse_args(DEFAULTS)
    assert a.quick is True and a.epochs == 5 and a.name == "hf:some model"
    monkeypatch.delenv("NANOMOE_ARGS")
    assert vars(parse_args(DEFAULTS)) == DEFAULTS
    # Colab's launcher
    colab = "/usr/local/lib/python3.12/dist-packages/colab_kernel_launcher.py"
    monkeypatch.setattr(sys, "argv", [colab, "-f", "k.json"])
    assert in_notebook()
    # a plain script that happens to have ipykernel imported is not a kernel
    monkeypatch.setattr(sys, "argv", ["scripts/x.py", "--epochs=2"])
    assert not in_notebook()


def test_cli_describe():
    a = parse_args(DEFAULTS, "--epochs=3")
    assert describe(a, DEFAULTS) == "parameters: epochs=3"
    assert describe(parse_args(DEFAULTS, []), DEFAULTS) == "parameters: defaults"
