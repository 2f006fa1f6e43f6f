"""Chapter 03 script and benchmark in --quick mode: run end to end offline, write table and figures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}


def test_03_script_quick(tmp_path, shared_data):
    out = tmp_path / "runs03"
    r = subprocess.run(
        [sys.executable, "-m", "scripts.03_train_moe", "--quick", f"--out_dir={out}",
         f"--source={shared_data / 'machado'}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = (out / "results.md").read_text(encoding="utf-8").splitlines()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in table[2:]}
    assert list(rows) == ["denso", "MoE top-2", "MoE top-1", "MoE top-2 α=0", "MoE top-2 cf=1", "MoE top-2 viés (α=0)"]
    dense_active = int(rows["denso"][1].replace(",", ""))
    for name, cells in rows.items():
        active, total, val = int(cells[1].replace(",", "")), int(cells[2].replace(",", "")), float(cells[3])
        assert 0 < val < 10
        if name != "denso":  # equal active parameters (up to the small router), more in total
            assert abs(active - dense_active) / dense_active < 0.02 and total > active
            assert 0 <= float(cells[4]) and 1 <= float(cells[5])
    assert float(rows["MoE top-2 cf=1"][7].rstrip("%")) > 0  # the capacity run drops something
    assert float(rows["MoE top-2"][7].rstrip("%")) == 0  # dropless
    for fig in ("val_dense_vs_moe.png", "expert_load_top2.png", "expert_load_top2_alpha0.png", "balance_sweep.png",
                "token_routing.png"):
        assert (out / fig).stat().st_size > 1000, fig
    assert "sem portas: grad W_r = None" in r.stdout


def test_03_benchmark_quick():
    r = subprocess.run([sys.executable, "-m", "scripts.bench_03_moe", "--quick", "--threads=1"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    variants = [line.split("|")[2].strip() for line in r.stdout.splitlines() if line.startswith("| 64 |")]
    assert variants[:3] == ["dense", "reference", "fast-loop"]
