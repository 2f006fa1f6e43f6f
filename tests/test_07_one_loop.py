"""Chapter 07 with the one loop: `train(..., TrainConfig(parallel="ep"))` on 2 gloo processes
(experts split over the ranks, tokens exchanged with all_to_all) follows the same loss trajectory as
1 process with 2 gradient-accumulation micro-batches, the checkpoint it writes holds the full
experts, and a 1-process run resumes from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

DRIVER = r'''
import json
import sys

import numpy as np
import torch


def run(out_dir, parallel, max_steps=6, resume=False):
    torch.set_num_threads(1)
    from nanomoe import GPT, preset
    from nanomoe.training.train import TrainConfig, train

    rng = np.random.default_rng(1)
    base = np.tile(rng.integers(0, 40, 89), 120)[:10_000]
    ids = np.where(rng.random(base.size) < 0.1, rng.integers(0, 40, base.size), base).astype(np.uint16)
    torch.manual_seed(0)
    model = GPT(preset("moe", vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                       n_experts=4, moe_top_k=2, moe_bias_balance=True))
    cfg = TrainConfig(max_steps=max_steps, decay_steps=8, warmup_steps=2, batch_size=4, grad_accum=2, lr=3e-3,
                      eval_interval=3, eval_iters=2, log_interval=1, out_dir=out_dir, plot=False, device="cpu",
                      parallel=parallel, resume=resume)
    res = train(model, ids[:9_000], ids[9_000:], cfg, progress=False)
    return {"losses": res.losses, "val": [h["val_loss"] for h in res.history],
            "grad_norms": [r["grad_norm"] for r in res.log]}


if __name__ == "__main__":
    out, mode = sys.argv[1], sys.argv[2]
    if mode == "ep":
        from nanomoe.parallel.distributed import cleanup_distributed, setup_distributed

        info = setup_distributed("cpu")
        result = run(f"{out}/ep", "ep")
        with open(f"{out}/rank{info.rank}.json", "w") as f:
            json.dump(result, f)
        cleanup_distributed(info)
    else:
        result = {"one": run(f"{out}/one", "ddp"), "resumed": run(f"{out}/ep", "ep", max_steps=8, resume=True),
                  "straight": run(f"{out}/straight", "ddp", max_steps=8)}
        with open(f"{out}/single.json", "w") as f:
            json.dump(result, f)
'''


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def test_ep_in_the_one_loop_matches_one_process(tmp_path):
    driver = tmp_path / "ep_driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(driver), str(tmp_path), "ep"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, str(driver), str(tmp_path), "single"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    single = json.loads((tmp_path / "single.json").read_text())
    assert r0 == r1  # every rank reports the same (all-reduced) numbers
    one = single["one"]
    assert r0["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
    assert r0["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-4, abs=1e-6)
    assert r0["val"] == pytest.approx(one["val"], rel=1e-5, abs=1e-6)
    # the EP checkpoint holds the full experts: one process continues it, close to a straight run
    state = torch.load(tmp_path / "ep" / "latest.pt", weights_only=True)
    assert state["model"]["transformer.h.0.mlp.experts.c_fc"].shape[0] == 4
    assert single["resumed"]["losses"][6:] == pytest.approx(single["straight"]["losses"][6:], rel=1e-4, abs=1e-5)
