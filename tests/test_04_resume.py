"""Chapter 04: resume is exact, and a killed process never loses work.

- 2N steps straight == N steps, stop, resume N more: identical losses (bitwise) and final weights,
  for a dense and an MoE model (dropout on, grad accumulation on, MoE bias balancing on).
- A process SIGKILLed in the middle of training, and one SIGKILLed while writing a checkpoint
  (a test hook sleeps between writing the temp file and the rename), leave a loadable latest.pt;
  resuming from it reproduces the uninterrupted run bitwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanomoe.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent

# One tiny training run; executed in-process (exec) and in subprocesses (python -c), so both sides
# build exactly the same model, data and config. The LR schedule ends at decay_steps whatever
# max_steps is, so runs of different lengths follow the same per-step schedule.
DRIVER = r'''
import sys
import numpy as np
import torch


def run(out_dir, max_steps, moe=False, **kw):
    torch.set_num_threads(1)
    from nanomoe import GPT, preset
    from nanomoe.training.train import TrainConfig, train

    rng = np.random.default_rng(0)
    # a learnable stream: a repeated random "sentence" with 10% noise
    base = np.tile(rng.integers(0, 48, 97), 200)[:19_000]
    noise = rng.random(base.size) < 0.1
    ids = np.where(noise, rng.integers(0, 48, base.size), base).astype(np.uint16)
    extra = dict(n_experts=4, moe_top_k=2, moe_bias_balance=True) if moe else {}
    torch.manual_seed(0)
    model = GPT(preset("modern", vocab_size=48, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1, **extra))
    cfg = dict(max_steps=max_steps, decay_steps=40, warmup_steps=3, batch_size=4, grad_accum=2, lr=3e-3,
               eval_interval=1000, eval_iters=2, log_interval=1, save_interval=1, out_dir=str(out_dir),
               resume=True, plot=False)
    cfg.update(kw)
    return model, train(model, ids[:17_000], ids[17_000:], TrainConfig(**cfg), progress=False)


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
'''


@pytest.fixture(autouse=True)
def _one_thread():
    """Bitwise comparisons need the same reduction order everywhere: one intra-op thread, as in the
    subprocesses (it is also much faster on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _driver():
    ns: dict = {"__name__": "driver"}
    exec(DRIVER, ns)
    return ns["run"]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_resume_is_bitwise_exact(tmp_path, moe):
    run = _driver()
    straight_model, straight = run(tmp_path / "straight", 8, moe=moe)
    run(tmp_path / "split", 4, moe=moe)  # stops after 4 steps with latest.pt at step 4
    assert load_checkpoint(tmp_path / "split")["step"] == 4
    resumed_model, resumed = run(tmp_path / "split", 8, moe=moe)  # a new process would do the same
    assert len(straight.losses) == len(resumed.losses) == 8
    assert resumed.losses == straight.losses  # bitwise: float == float
    assert _same_weights(straight_model, resumed_model)
    if moe:
        bias = [b for n, b in resumed_model.named_buffers() if n.endswith("expert_bias")]
        assert bias and any(float(b.abs().sum()) > 0 for b in bias)  # bias balancing really ran
    # the resumed run knows it did not start from zero
    assert resumed.steps == 8 and resumed.tokens == straight.tokens


def test_resume_needs_the_optimizer_state(tmp_path):
    """The test above can fail: dropping the AdamW moments from the checkpoint breaks exactness."""
    from nanomoe.training.checkpoint import save_checkpoint

    run = _driver()
    _, straight = run(tmp_path / "straight", 6)
    run(tmp_path / "split", 3)
    ck = load_checkpoint(tmp_path / "split")
    ck["optimizer"]["state"] = {}
    ck.pop("_path")
    save_checkpoint(tmp_path / "split" / "latest.pt", ck)
    _, resumed = run(tmp_path / "split", 6)
    assert resumed.losses[:3] == straight.losses[:3]
    assert resumed.losses[3:] != straight.losses[3:]


def _start(out: Path, env_extra: dict) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env_extra}
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(out), "100000"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(pred, proc: subprocess.Popen, what: str, timeout: float = 240.0) -> None:
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"the training process exited before {what}:\n{proc.stdout.read().decode()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_sigkill_during_training_and_during_save(tmp_path):
    run = _driver()
    a, b = tmp_path / "killed_training", tmp_path / "killed_saving"
    # both processes run at once (the test is mostly waiting for Python and torch to start)
    pa = _start(a, {})
    pb = _start(b, {"NANOMOE_CKPT_SLEEP_BEFORE_REPLACE": "120", "NANOMOE_CKPT_SLEEP_FROM_STEP": "3"})
    try:
        # (a) kill in the middle of training, a little after the first checkpoint
        _wait_for(lambda: (a / "latest.pt").is_file(), pa, "the first checkpoint")
        time.sleep(0.3)
        pa.send_signal(signal.SIGKILL)
        # (b) kill while the step-3 checkpoint is written: its temp file exists, the rename did not happen.
        # The saves of steps 1 and 2 also have a temp file, for milliseconds; the step-3 one stays.
        seen: dict = {}

        def stuck_tmp() -> bool:
            now = time.time()
            names = {p.name for p in b.glob(".latest.pt.tmp.*")}
            for n in list(seen):
                if n not in names:
                    del seen[n]
            for n in names:
                seen.setdefault(n, now)
            if not any(now - t0 > 1.0 for t0 in seen.values()) or not (b / "latest.pt").is_file():
                return False
            return load_checkpoint(b)["step"] == 2  # safe to read at any time: os.replace is atomic

        _wait_for(stuck_tmp, pb, "the step-3 checkpoint's temp file")
        pb.send_signal(signal.SIGKILL)
    finally:
        for p in (pa, pb):
            if p.poll() is None:
                p.kill()
            p.wait()
    ka = load_checkpoint(a)["step"]
    kb = load_checkpoint(b)["step"]
    assert ka >= 1
    assert kb == 2  # the step-3 save never replaced latest.pt
    assert any(b.glob(".latest.pt.tmp.*"))  # ... and left its temp file behind

    n = max(ka, kb) + 3
    straight_model, straight = run(tmp_path / "straight", n)
    for out in (a, b):
        model, res = run(out, n)
        assert res.losses == straight.losses, f"resume after SIGKILL ({out.name}) is not exact"
        assert _same_weights(model, straight_model)
        assert not any(out.glob(".latest.pt.tmp.*"))  # stale temp files are cleaned up
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "train"]
        assert steps == list(range(1, n + 1))  # lines written after the checkpoint were dropped, not duplicated
