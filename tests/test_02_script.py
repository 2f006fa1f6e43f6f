"""Chapter 02 script in --quick mode: runs end to end offline and writes the table and figures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_02_script_quick(tmp_path, shared_data):
    out = tmp_path / "runs02"
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "scripts.02_modern_gpt", "--quick", f"--out_dir={out}",
         f"--source={shared_data / 'machado'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = (out / "ablation.md").read_text(encoding="utf-8").splitlines()
    names = [line.split("|")[1].strip() for line in table[2:]]
    assert names == [
        "gpt2 (baseline)", "+rope", "+rmsnorm", "+swiglu", "+gqa (n_kv_head=2)", "+no-bias", "+softcap (30)"
    ]
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        params = int(cells[1].replace(",", ""))
        tps, train_loss, val_loss = (float(c.replace(",", "")) for c in cells[2:])
        assert params > 0 and tps > 0 and 0 < train_loss < 10 and 0 < val_loss < 10
    figs = ("ablation_val_loss.png", "kv_time_per_token.png", "kv_cache_bytes.png", "rope_decay.png", "softcap.png")
    for fig in figs:
        assert (out / fig).stat().st_size > 1000, fig
    assert "mesmos tokens com e sem cache: True" in r.stdout
