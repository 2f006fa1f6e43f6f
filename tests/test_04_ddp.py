"""Chapter 04: DDP with 2 processes on CPU (gloo, launched by torchrun) follows the same loss
trajectory as 1 process with 2 gradient-accumulation micro-batches, for a dense and an MoE model
(with DeepSeek-V3 bias balancing, whose expert loads are summed over ranks), and every rank ends
with the same weights; an MoE with the global-batch balance loss too (each rank's one micro-batch:
the step sums the counts over the ranks after the forward; 1 process: the pre-pass).
This checks `no_sync` + loss / grad_accum + the rank-aware loader together:
a rank reading the wrong batches, a gradient not averaged, or a loss not divided by the number of
micro-batches all change the trajectory or the gradient norm."""

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


CASES = {"dense": {}, "moe": dict(n_experts=4, moe_top_k=2, moe_bias_balance=True),
         "moe_global": dict(n_experts=4, moe_top_k=2, moe_balance_scope="global", moe_aux_loss_coef=0.1)}


def run(out_dir, case, info=None):
    torch.set_num_threads(1)
    from nanomoe import GPT, preset
    from nanomoe.training.train import TrainConfig, train

    rng = np.random.default_rng(1)
    base = np.tile(rng.integers(0, 40, 89), 120)[:10_000]
    ids = np.where(rng.random(base.size) < 0.1, rng.integers(0, 40, base.size), base).astype(np.uint16)
    extra = CASES[case]
    torch.manual_seed(0)
    model = GPT(preset("modern", vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, **extra))
    cfg = TrainConfig(max_steps=6, warmup_steps=2, batch_size=4, grad_accum=2, lr=3e-3, eval_interval=3,
                      eval_iters=3, log_interval=1, out_dir=out_dir, plot=False, device="cpu")
    res = train(model, ids[:9_000], ids[9_000:], cfg, progress=False)
    checksum = sum(float(p.double().abs().sum()) for p in model.state_dict().values())
    return {"losses": res.losses, "val": [h["val_loss"] for h in res.history], "checksum": checksum,
            "grad_norms": [r["grad_norm"] for r in res.log]}


if __name__ == "__main__":
    from nanomoe.parallel.distributed import cleanup_distributed, setup_distributed

    out = sys.argv[1]
    info = setup_distributed("cpu")  # one process group for both runs
    result = {name: run(f"{out}/{name}", name) for name in CASES}
    with open(f"{out}/rank{info.rank}.json", "w") as f:
        json.dump(result, f)
    cleanup_distributed(info)
'''


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_ddp_two_processes_match_one_process_with_accumulation(tmp_path):
    driver = tmp_path / "ddp_driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(driver), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())

    ns: dict = {"__name__": "driver"}
    exec(DRIVER, ns)
    for name in ns["CASES"]:
        single = ns["run"](str(tmp_path / f"single_{name}"), name)
        ddp, other = r0[name], r1[name]
        assert len(ddp["losses"]) == len(single["losses"]) == 6
        assert ddp["losses"] == other["losses"]  # every rank logs (and decides on) the same all-reduced value
        assert ddp["checksum"] == other["checksum"]  # ranks never diverge
        assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6), name
        assert ddp["val"] == pytest.approx(single["val"], rel=1e-5, abs=1e-6), name
        assert ddp["checksum"] == pytest.approx(single["checksum"], rel=1e-5), name
        # AdamW and clipping hide a gradient scaled by a constant; the logged gradient norm does not
        # (e.g. a loss divided by the global instead of the per-rank number of micro-batches)
        assert ddp["grad_norms"] == pytest.approx(single["grad_norms"], rel=1e-4), name
        # the trajectory is not trivially flat: training moved the loss
        assert single["losses"][-1] < single["losses"][0] - 0.05
    # only rank 0 wrote a checkpoint and metrics, in the run's out_dir
    assert (tmp_path / "dense" / "latest.pt").is_file()
    lines = (tmp_path / "dense" / "metrics.jsonl").read_text().splitlines()
    assert len([line for line in lines if json.loads(line)["kind"] == "train"]) == 6  # one writer, no duplicates
