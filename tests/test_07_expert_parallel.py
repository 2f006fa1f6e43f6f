"""Chapter 07: expert parallelism over torch.distributed (gloo on CPU), proven equal to one process.

W ranks each hold E/W experts; tokens travel with all_to_all to the rank owning their expert and
back. The references are the single-process `MoE` layer and a plain single-process training loop
(written here); the expert-parallel side is the one training loop, `nanomoe.training.train`'s
`compute_gradients` + `apply_update` with `parallel="ep"`, and its checkpoints (`save`, `resume`).
Only the order of floating-point additions may
differ (a weight gradient sums its tokens' contributions per rank, then over ranks), so the
tolerances are float32 round-off: outputs and gradients within atol 1e-6 / rtol 1e-5 (the measured
max differences are printed with -s), training losses within rel 1e-5.

The ranks are forked by the test (no torchrun) and talk over gloo on 127.0.0.1."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanomoe import GPT, moe_config
from nanomoe.moe import MoE, add_loads, expert_counts, global_balance_prepass, moe_layers, update_moe_bias
from nanomoe.parallel.expert_parallel import ExpertParallelError, check_world_size, expert_parallel_moe
from nanomoe.training.checkpoint import CheckpointError, check_config, load_checkpoint

ATOL, RTOL = 1e-6, 1e-5
DEAD = 5  # an expert nobody picks (selection bias -10; probabilities are <= 1)


# ---- spawning ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, args):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _start(fn, world: int, *args):
    """Start fn(rank, world, *args) in `world` forked processes joined in a gloo group."""
    # fork: the children inherit the imported modules (most of the cost on a busy 2-core machine);
    # CPU only, so forking is safe. The first fused AdamW imports torch._dynamo (~20 s here): once,
    # in the parent, instead of once per rank.
    import torch._dynamo  # noqa: F401

    return mp.start_processes(_entry, args=(fn, world, _free_port(), args), nprocs=world, join=False,
                              start_method="fork")


def _join(ctx, world: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not ctx.join(timeout=2):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError(f"{world} expert-parallel ranks hung")


def _spawn(fn, world: int, *args) -> None:
    _join(_start(fn, world, *args), world)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


# ---- one layer: outputs and gradients ------------------------------------------------------------

LAYER_CASES = {
    # dropless, softmax router, shared expert, an expert that gets no token, global balance
    "dropless": dict(moe_capacity_factor=None, moe_router="softmax", n_shared_experts=1, moe_bias_balance=True),
    # capacity (drops decided per sequence before dispatch), sigmoid router with routed scaling
    "capacity": dict(moe_capacity_factor=1.0, moe_min_capacity=1, moe_router="sigmoid", moe_routed_scaling=2.0),
}
B_ALL, T = 8, 16


def _layer_config(case: str):
    return moe_config(vocab_size=32, block_size=T, n_layer=1, n_head=2, n_embd=32, n_experts=8, moe_top_k=2,
                      dropout=0.0, moe_balance_scope="global", moe_aux_loss_coef=0.1, moe_z_loss_coef=0.01,
                      **LAYER_CASES[case])


def _layer_inputs(case: str):
    torch.manual_seed(0)
    layer = MoE(_layer_config(case))
    if layer.expert_bias is not None:
        layer.expert_bias[DEAD] = -10.0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B_ALL, T, 32, generator=g)
    target = torch.randn(B_ALL, T, 32, generator=g)
    return layer, x, target


def _layer_loss(y, aux, target):
    """A mean over the tokens (like cross-entropy) plus the auxiliary loss: the average of the ranks'
    losses is then the loss of the whole batch, as in data-parallel training."""
    return (y * target).sum(-1).mean() + aux


def _layer_worker(rank, world, out_dir):
    from nanomoe.parallel.expert_parallel import sync_gradients

    res = {}
    for case in LAYER_CASES:
        full, x, target = _layer_inputs(case)
        layer = expert_parallel_moe(_layer_config(case))  # builds only this rank's experts
        d = layer.dispatcher
        sl = slice(d.first_expert, d.first_expert + d.local_experts)
        state = full.state_dict()
        state["experts.c_fc"], state["experts.c_proj"] = state["experts.c_fc"][sl], state["experts.c_proj"][sl]
        layer.load_state_dict(state)
        b = B_ALL // world
        xr = x[rank * b:(rank + 1) * b].clone().requires_grad_(True)  # this rank's sequences
        with torch.no_grad():  # the global balance's counts: the training step's pre-pass, summed over ranks
            idx = layer.route(xr)[1].topk(layer.top_k, dim=-1).indices  # top-k of the unbiased scores (eq. 18)
            load = expert_counts(idx.reshape(1, -1, layer.top_k), layer.n_experts)[0]
            dist.all_reduce(load)
        y, aux, stats = layer(xr, load)
        _layer_loss(y, aux, target[rank * b:(rank + 1) * b]).backward()
        sync_gradients(layer)
        res[case] = {"y": y.detach(), "aux": aux.detach(), "x_grad": xr.grad, "dropped": stats["dropped"],
                     "grads": {n: p.grad for n, p in layer.named_parameters()},
                     "sent": d.last_comm["sent"], "received": d.last_comm["received"]}
    torch.save(res, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("world", [2, 4])
def test_layer_outputs_and_gradients_equal_one_process(world, tmp_path):
    _spawn(_layer_worker, world, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for case in LAYER_CASES:
        full, x, target = _layer_inputs(case)
        x = x.clone().requires_grad_(True)
        full.train()
        y, aux, stats = full(x)
        _layer_loss(y, aux, target).backward()
        diffs = {}
        y_ep = torch.cat([r[case]["y"] for r in ranks])
        diffs["y"] = _max_diff(y_ep, y)
        torch.testing.assert_close(y_ep, y.detach(), atol=ATOL, rtol=RTOL)
        # the mean of the ranks' aux losses is the whole batch's: the balance saw the global load
        aux_ep = sum(r[case]["aux"] for r in ranks) / world
        torch.testing.assert_close(aux_ep, aux.detach(), atol=ATOL, rtol=RTOL)
        # an input's gradient is its own token's: the single loss is the ranks' mean, hence the 1/W
        x_grad = torch.cat([r[case]["x_grad"] for r in ranks]) / world
        diffs["x.grad"] = _max_diff(x_grad, x.grad)
        torch.testing.assert_close(x_grad, x.grad, atol=ATOL, rtol=RTOL)
        for name, p in full.named_parameters():
            if name.startswith("experts."):  # each rank holds its slice: stack them back
                g = torch.cat([r[case]["grads"][name] for r in ranks])
            else:  # replicated: after the all-reduce every rank holds the same averaged gradient
                g = ranks[0][case]["grads"][name]
                for r in ranks[1:]:
                    assert torch.equal(r[case]["grads"][name], g), f"{case}: ranks disagree on {name}"
            diffs[name] = _max_diff(g, p.grad)
            torch.testing.assert_close(g, p.grad, atol=ATOL, rtol=RTOL, msg=f"{case}: {name}")
            assert p.grad.abs().sum() > 0, f"{case}: {name} got no gradient (the test would prove nothing)"
        if case == "dropless":
            assert torch.equal(full.experts.c_fc.grad[DEAD], torch.zeros_like(full.experts.c_fc.grad[DEAD]))
            assert stats["load"][DEAD] == 0
        else:  # capacity really dropped assignments, the same ones on both sides
            assert int(stats["dropped"]) > 0
            assert sum(int(r[case]["dropped"]) for r in ranks) == int(stats["dropped"])
        # every row sent was received: rank s's sent[d] == rank d's received[s]
        for s in range(world):
            for d in range(world):
                assert ranks[s][case]["sent"][d] == ranks[d][case]["received"][s]
        print(f"W={world} {case}: max |EP - 1 process| " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


def test_world_size_must_divide_the_experts():
    with pytest.raises(ExpertParallelError, match=r"8 experts.*3 ranks.*\[1, 2, 4, 8\]"):
        check_world_size(8, 3)


# ---- 20 training steps: 2 ranks == 1 process with 2 accumulation micro-steps ----------------------

TRAIN_CASES = {
    # dropless, balance loss over the whole step (every micro-batch of every rank)
    "dropless": dict(moe_capacity_factor=None, moe_balance_scope="global"),
    # capacity with drops, balance loss per micro-batch (chapter 03's)
    "capacity": dict(moe_capacity_factor=1.0, moe_min_capacity=1, moe_balance_scope="micro_batch"),
}
STEPS, MICRO, LR = 20, 2, 3e-3


def _train_config(case: str):
    return moe_config(vocab_size=32, block_size=T, n_layer=2, n_head=2, n_embd=32, n_experts=8, moe_top_k=2,
                      dropout=0.0, moe_bias_balance=True, moe_aux_loss_coef=0.05, **TRAIN_CASES[case])


def _new_model(case: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(_train_config(case))
    for m in moe_layers(model):
        m.expert_bias[DEAD] = -10.0
    return model


def _data(steps: int, b: int = 2):
    """(steps, MICRO, 2, b, T): a learnable sequence (a repeated random phrase with 10% noise)."""
    g = torch.Generator().manual_seed(7)
    phrase = torch.randint(0, 32, (37,), generator=g)
    out = torch.empty(steps, MICRO, 2, b, T, dtype=torch.long)
    for s in range(steps):
        for m in range(MICRO):
            starts = torch.randint(0, 37, (b,), generator=g)
            seq = phrase[(starts[:, None] + torch.arange(T + 1)) % 37]
            noise = torch.rand(seq.shape, generator=g) < 0.1
            seq = torch.where(noise, torch.randint(0, 32, seq.shape, generator=g), seq)
            out[s, m, 0], out[s, m, 1] = seq[:, :-1], seq[:, 1:]
    return out


def _reference_run(model: GPT, data, steps: int, start: int = 0):
    """Plain single-process training: MICRO accumulation micro-steps, torch's clipping, AdamW."""
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=LR)
    return opt, _reference_steps(model, opt, data, range(start, start + steps))


def _reference_steps(model, opt, data, steps):
    losses, norms, dropped = [], [], 0
    for s in steps:
        opt.zero_grad(set_to_none=True)
        step_loads = global_balance_prepass(model, [data[s, m, 0] for m in range(MICRO)])
        ce, loads = 0.0, None
        for m in range(MICRO):
            out = model(data[s, m, 0], data[s, m, 1], moe_loads=step_loads)
            loads = add_loads(loads, out.moe_stats)
            (out.loss / MICRO).backward()
            ce += float(out.ce_loss) / MICRO
            dropped += sum(int(st["dropped"]) for st in out.moe_stats)
            assert all(st["load"][DEAD] == 0 for st in out.moe_stats)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt.step()
        update_moe_bias(model, loads)
        losses.append(ce)
    return {"losses": losses, "norms": norms, "dropped": dropped}


class _Feed:
    """This rank's micro-batches of the test data in order, through the loader's interface."""

    def __init__(self, data, rank: int, world: int):
        self.data, self.rank, self.world, self.global_batches = data, rank, world, 0

    def next_batch(self, device=None):
        s, m = divmod(self.global_batches, MICRO // self.world)  # step s, this rank's m-th micro-batch
        self.global_batches += 1
        i = self.rank * (MICRO // self.world) + m
        return self.data[s, i, 0], self.data[s, i, 1]

    def state_dict(self) -> dict:
        return {"global_batches": self.global_batches}

    def load_state_dict(self, state: dict) -> None:
        self.global_batches = state["global_batches"]


def _one_loop_run(model: GPT, data, out_dir, rank: int = 0, world: int = 1, resume: bool = False):
    """The one loop's run state with parallel="ep" (constant LR, fp32 on CPU), fed the test's batches."""
    from nanomoe.parallel.distributed import DistInfo
    from nanomoe.training.train import TrainConfig, start_run, wrap_model
    from nanomoe.training.train import resume as resume_run

    tcfg = TrainConfig(batch_size=2, grad_accum=MICRO, lr=LR, min_lr=LR, warmup_steps=0, weight_decay=0.1,
                       grad_clip=1.0, device="cpu", parallel="ep", out_dir=str(out_dir), plot=False, eval_iters=0,
                       threads=1)
    run = start_run(model, torch.zeros(1000, dtype=torch.long), None, tcfg, DistInfo(rank, rank, world), None, None)
    run.loader = _Feed(data, rank, world)
    step = resume_run(run) if resume else 0
    wrap_model(run)
    return run, step


def _ep_steps(run, steps):
    """Optimizer steps of the one loop: `compute_gradients` (EP: tokens to their experts and back,
    gradients synced and clipped by the strategy) then `apply_update` (AdamW, routing bias)."""
    from nanomoe.training.train import apply_update, compute_gradients

    losses, norms, comm = [], [], []
    for s in steps:
        run.loader.global_batches = s * run.accum  # step s's micro-batches
        st = compute_gradients(run, s)
        apply_update(run, st)
        losses.append(st.ce)
        norms.append(st.grad_norm)
        comm.append(torch.tensor(st.traffic["sent"]))
    return {"losses": losses, "norms": norms, "comm": torch.stack(comm)}


def _train_worker(rank, world, out_dir):
    from nanomoe.parallel.expert_parallel import full_optimizer_state, full_state_dict

    data = _data(STEPS)
    res = {}
    for case in TRAIN_CASES:
        run, _ = _one_loop_run(_new_model(case), data, f"{out_dir}/{case}", rank, world)
        res[case] = _ep_steps(run, range(STEPS))
        res[case]["model"] = full_state_dict(run.raw)
        res[case]["optimizer"] = full_optimizer_state(run.optimizer, run.raw)["state"]
    torch.save(res, f"{out_dir}/train{rank}.pt")


def test_20_steps_on_2_ranks_equal_1_process_with_2_micro_steps(tmp_path):
    ctx = _start(_train_worker, 2, str(tmp_path))
    data = _data(STEPS)
    refs = {case: (model := _new_model(case), *_reference_run(model, data, STEPS)) for case in TRAIN_CASES}
    _join(ctx, 2)  # the reference ran while the ranks did
    ranks = [torch.load(tmp_path / f"train{r}.pt", weights_only=True) for r in range(2)]
    for case in TRAIN_CASES:
        model, opt, ref = refs[case]
        ep = ranks[0][case]
        assert ep["losses"] == ranks[1][case]["losses"]  # every rank logs the same all-reduced value
        assert ep["losses"] == pytest.approx(ref["losses"], rel=RTOL), case
        assert ep["norms"] == pytest.approx(ref["norms"], rel=1e-4), case
        assert ref["losses"][-1] < ref["losses"][0] - 0.3, "training must move the loss"
        if case == "capacity":
            assert ref["dropped"] > 0, "capacity must drop assignments for the test to cover it"
        diff = 0.0
        for name, p in model.state_dict().items():
            torch.testing.assert_close(ep["model"][name], p, atol=1e-5, rtol=1e-4, msg=f"{case}: {name}")
            diff = max(diff, _max_diff(ep["model"][name], p))
        for i, st in opt.state_dict()["state"].items():  # AdamW moments gathered to the full experts
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(ep["optimizer"][i][key], st[key], atol=1e-6, rtol=1e-4)
        # the dead expert: no rank ever sent it a row, and its weights only felt weight decay
        sent = ranks[0][case]["comm"]  # (steps, W, W): every rank's rows to every rank, the same on each rank
        assert torch.equal(sent, ranks[1][case]["comm"]) and int(sent.sum()) > 0
        loss_diff = max(abs(a - b) for a, b in zip(ep["losses"], ref["losses"]))
        print(f"{case}: 20 steps, max |loss EP - 1 process| {loss_diff:.1e}, max |weight diff| {diff:.1e}")


# ---- checkpoints: 2 ranks -> 1 process -> 2 ranks ------------------------------------------------

CKPT_CASE, K = "dropless", 4  # steps per phase


def _ckpt_worker(rank, world, out_dir, phase):
    from nanomoe.training.train import save

    data = _data(3 * K)
    if phase == "start":  # K steps, save, K more steps (what the 1-process resume must reproduce)
        run, _ = _one_loop_run(_new_model(CKPT_CASE), data, f"{out_dir}/w2", rank, world)
        _ep_steps(run, range(K))
        save(run, K, is_best=False)  # a collective: the full experts gathered, rank 0 writes
        res = _ep_steps(run, range(K, 2 * K))
    else:  # resume the 1-process checkpoint on 2 ranks
        run, step = _one_loop_run(_new_model(CKPT_CASE), data, f"{out_dir}/w1", rank, world, resume=True)
        res = _ep_steps(run, range(step, step + K))
    torch.save(res, f"{out_dir}/{phase}{rank}.pt")


def test_checkpoint_moves_2_ranks_to_1_process_and_back(tmp_path):
    import shutil

    from nanomoe.training.train import save

    data = _data(3 * K)
    _spawn(_ckpt_worker, 2, str(tmp_path), "start")
    ckpt = load_checkpoint(tmp_path / "w2" / "latest.pt")
    assert ckpt["world_size"] == 2 and ckpt["model"]["transformer.h.0.mlp.experts.c_fc"].shape[0] == 8  # full experts
    # 2 ranks -> 1 process: resume and continue exactly as the 2 ranks did
    shutil.copytree(tmp_path / "w2", tmp_path / "w1")
    run, step = _one_loop_run(_new_model(CKPT_CASE), data, tmp_path / "w1", resume=True)
    assert step == K
    one = _reference_steps(run.raw, run.optimizer, data, range(K, 2 * K))
    two = torch.load(tmp_path / "start0.pt", weights_only=True)
    assert two["losses"] == pytest.approx(one["losses"], rel=RTOL)
    # 1 process -> 2 ranks: a single-process checkpoint starts an expert-parallel run
    save(run, 2 * K, is_best=False)
    ctx = _start(_ckpt_worker, 2, str(tmp_path), "resume")
    one = _reference_steps(run.raw, run.optimizer, data, range(2 * K, 3 * K))
    _join(ctx, 2)
    two = torch.load(tmp_path / "resume0.pt", weights_only=True)
    # each side that loaded a file is compared with a side that kept training in memory, so a restore
    # that loaded nothing (or only the weights, not the AdamW moments) would break the equality
    assert two["losses"] == pytest.approx(one["losses"], rel=RTOL)
    print(f"checkpoint 2 -> 1 -> 2 ranks: losses {[round(v, 4) for v in two['losses']]}")


def test_checkpoint_mismatch_says_what_differs(tmp_path):
    from nanomoe.parallel.expert_parallel import load_full_state_dict, shard_model
    from nanomoe.training.train import save

    run, _ = _one_loop_run(_new_model(CKPT_CASE), _data(1), tmp_path)
    save(run, 0, is_best=False)
    ckpt = load_checkpoint(tmp_path / "latest.pt")
    other = moe_config(**{**_train_config(CKPT_CASE).to_dict(), "n_experts": 4})
    with pytest.raises(CheckpointError, match=r"n_experts: checkpoint has 8, this run has 4"):
        check_config(ckpt, other)
    # a shard saved instead of the full experts is refused with both shapes named (one process is
    # enough: W = 1 holds all 8 experts, so a 4-expert tensor is the wrong shape)
    shard = {k: (v[:4] if k.endswith(("experts.c_fc", "experts.c_proj")) else v) for k, v in ckpt["model"].items()}
    with pytest.raises(ExpertParallelError, match=r"experts.c_fc has shape \(4, 32, .*needs the full \(8, 32"):
        load_full_state_dict(shard_model(_new_model(CKPT_CASE)), shard)
