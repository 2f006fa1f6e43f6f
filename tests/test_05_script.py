"""Chapter 05 script in --quick mode: runs end to end offline (stand-in GPT-2, no hub), says which
weights ran, and its exactness checks hold."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _value(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"pattern {pattern!r} not in the output:\n{text[-3000:]}"
    return float(m.group(1))


def test_05_script_quick(tmp_path, shared_data):
    out = tmp_path / "runs05"
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "NANOMOE_DATA": str(shared_data)}
    r = subprocess.run(
        [sys.executable, "-m", "scripts.05_gpt2_weights", "--quick", f"--out_dir={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = r.stdout
    assert "weights: STAND-IN, not OpenAI's GPT-2" in s  # offline: says which weights ran
    assert _value(r"max \|logits\(nanomoe\) - logits\(transformers\)\| = ([-+.\deE]+)", s) < 1e-5
    assert _value(r"step 0: max \|logits\(upcycled MoE\) - logits\(dense\)\| = ([-+.\deE]+)", s) < 1e-5
    assert _value(r"MixtralForCausalLM: max \|logits diff\| = ([-+.\deE]+)", s) < 1e-5
    assert _value(r"load_hf round trip: max \|logits diff\| = ([-+.\deE]+)", s) == 0.0
    # the partial-transfer report is printed with its reasons
    assert re.search(r"adapted\s+h\.0\.attn\.c_attn\.weight .*mean-pooled 4->1", s)
    assert re.search(r"skipped\s+wpe\.weight .*RoPE", s)
    # six runs in the summary, each with a finite validation loss
    rows = re.findall(r"^(GPT-2 pretrained|GPT-2 scratch|modern transfer|modern scratch|MoE upcycled|dense continued)"
                      r"\s+([\d.]+)\s+([\d.]+)", s, flags=re.M)
    assert len(rows) == 6 and all(0 < float(a) < 20 and 0 < float(b) < 20 for _, a, b in rows)
    # the upcycled MoE starts exactly where the dense model is
    start = {name: float(a) for name, a, _ in rows}
    end = {name: float(b) for name, _, b in rows}
    # (printed with 3 decimals: equal up to the last printed digit)
    assert abs(start["MoE upcycled"] - start["dense continued"]) <= 1e-3
    assert abs(start["dense continued"] - end["modern transfer"]) <= 1e-3
    assert (out / "val_curves.png").stat().st_size > 1000
    assert (out / "moe-hf" / "model.safetensors").is_file() and (out / "moe-hf" / "nanomoe_tokenizer.json").is_file()
