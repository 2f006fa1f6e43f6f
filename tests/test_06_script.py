"""Chapter 06 script and benchmark in --quick mode: run end to end offline, write results and figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanomoe.course.one_switch import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
FIGURES = ("crossover.png", "coactivation.png", "specialization_classes.png", "specialization_position.png",
           "saturation.png", "token_routing.png", "one_switch.png")


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_06_script_quick(tmp_path, shared_data, tokenizer):
    r = subprocess.run(
        [sys.executable, "-m", "scripts.06_modern_routers", "--quick", f"--out_dir={tmp_path}",
         f"--source={shared_data / 'machado'}", f"--tokenizer={tokenizer}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path if tokenizer == "char" else tmp_path / "bpe"  # the BPE regime writes beside the char one
    res = json.loads((out / "one_switch.json").read_text(encoding="utf-8"))
    assert res["args"]["tokenizer"] == tokenizer
    runs = {(x["name"], x["seed"]): x for x in res["runs"]}
    assert set(runs) == {(n, 0) for n in VARIANTS}  # --quick trains every variant once
    dense_active = runs["denso", 0]["active"]
    for (name, _), x in runs.items():
        assert 0 < x["val"]["mean"] < 10 and x["val"]["tokens"] == 2048 and x["history"][-1]["tokens"] > 0
        if name != "denso":  # equal active parameters but the routers' (at most 2 layers x 32 dims x E), more in total
            assert 0 < x["active"] - dense_active <= 2 * 32 * 32 and x["total"] > x["active"]
        if name != "base (MoE top-2)":  # paired with the baseline on the same tokens (the dense model too)
            assert x["paired"]["base (MoE top-2)"]["se_blocks"] > 0
    assert runs["lote global (micro-lotes de 4)", 0]["grad_accum"] == 4
    for fig in FIGURES:
        assert (out / fig).stat().st_size > 1000, fig
    assert "igual ao pacote" in r.stdout and "gradientes iguais" in r.stdout
    assert f"tokenizador {tokenizer}" in r.stdout
    # the recorded grid of the repository is read and tabulated for both regimes
    assert r.stdout.count("| variante | Δ por semente (0 a ") == 2 and r.stdout.count("IC 95% da média") >= 2
    # the BPE regime also lists the tokens each expert receives most
    assert ("os tokens que cada especialista mais recebe" in r.stdout) == (tokenizer == "bpe")


def test_06_grid_script_quick(tmp_path, shared_data):
    r = subprocess.run(
        [sys.executable, "-m", "scripts.grid_06_one_switch", "--quick", f"--out_dir={tmp_path}",
         f"--source={shared_data / 'machado'}", "--variants=base (MoE top-2);lote global (micro-lotes de 4)"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "one_switch" / "one_switch.json").read_text(encoding="utf-8"))
    assert [x["name"] for x in res["runs"]] == ["base (MoE top-2)", "lote global (micro-lotes de 4)"]
    assert res["summary"][1]["delta"] == [res["runs"][1]["val"]["mean"] - res["runs"][0]["val"]["mean"]]


def test_06_benchmark_quick():
    r = subprocess.run([sys.executable, "-m", "scripts.bench_06_routers", "--quick"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line.split("|")[1].strip() for line in r.stdout.splitlines() if line.startswith("| ") and "x |" in line]
    assert rows == ["dense", "top-2", "top-2 sequence", "top-2 global", "sigmoid", "fine 32x7+1", "dense-first"]
