"""Chapter 06: the global-batch balance loss under DDP (2 CPU processes, gloo) equals one process.

f_i . P_i is not linear, so averaging per-rank losses is not the global loss: the counts must be
summed over the ranks (and the micro-batches) before the loss. Two cases, each against a single
process that sees the same 8 sequences with gradient accumulation:
  A. one micro-batch per rank per step (the step sums the counts over the ranks after the forward
     and adds the balance term itself: balance_after_forward);
  B. two micro-batches per rank (global_balance_prepass sums them, then over the ranks)."""

import contextlib
import socket
import time

import torch
import torch.multiprocessing as mp

from nanomoe import GPT, moe_config
from nanomoe.moe import BALANCE_AFTER_FORWARD, balance_after_forward, global_balance_prepass


def _config(scope="global"):
    return moe_config(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, n_experts=4, moe_top_k=2,
                      moe_balance_scope=scope, moe_aux_loss_coef=1.0, moe_z_loss_coef=0.0)


def _data() -> torch.Tensor:
    return torch.randint(0, 32, (8, 16), generator=torch.Generator().manual_seed(5))


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _accumulate(model, ddp, micro_batches) -> tuple[dict, float]:
    """One optimizer step's backward over `micro_batches` (loss / their number); the step's aux loss."""
    model.zero_grad(set_to_none=True)
    step_loads = global_balance_prepass(ddp, micro_batches)
    aux = 0.0
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last or ddp is model else ddp.no_sync():
            out = ddp(mb, mb, moe_loads=step_loads)
            (out.loss / len(micro_batches)).backward()
        aux += float(out.aux_loss) / len(micro_batches)
    return _grads(model), aux


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = GPT(_config())
        ddp = DDP(model)
        x = _data()
        part = x[4 * rank : 4 * rank + 4]  # this rank's share of the step
        calls = []
        real_all_reduce = dist.all_reduce
        dist.all_reduce = lambda t, *a, **kw: calls.append(t.shape) or real_all_reduce(t, *a, **kw)
        try:
            res = ddp(part, part, moe_loads=BALANCE_AFTER_FORWARD)  # A: one micro-batch; the layers leave the
            in_forward = len(calls)
            term = balance_after_forward(res.moe_stats)  # balance term to the step, which sums counts over ranks
        finally:
            dist.all_reduce = real_all_reduce
        assert in_forward == 0 and len(calls) == 2, (in_forward, calls)  # no collective in a layer; one per layer
        assert torch.equal(res.aux_loss, torch.zeros(()))  # z-loss off: nothing else in the layers' aux
        (res.loss + term).backward()
        out = {"A": _grads(model), "A_aux": float(term)}
        out["B"], out["B_aux"] = _accumulate(model, ddp, [part[:2], part[2:]])  # B: pre-pass + 2 micro-batches
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_global_balance_two_ranks_equal_one_process_with_accumulation(tmp_path):
    import torch._dynamo  # noqa: F401  (DDP's constructor imports it: once, here, before the fork)

    ctx = mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="fork")
    deadline = time.time() + 240
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("DDP run hung")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    torch.manual_seed(0)
    model = GPT(_config())
    x = _data()
    ref_a, aux_a = _accumulate(model, model, [x[:4], x[4:]])  # 1 process: the two ranks' batches, accumulated
    ref_b, aux_b = _accumulate(model, model, [x[:2], x[2:4], x[4:6], x[6:]])
    for r in ranks:
        for name, g in ref_a.items():
            torch.testing.assert_close(r["A"][name], g, rtol=1e-5, atol=1e-7, msg=name)
            torch.testing.assert_close(r["B"][name], ref_b[name], rtol=1e-5, atol=1e-7, msg=name)
    # the aux loss each rank reports is the global one for its own tokens' P; their mean is the 1-process value
    assert abs((ranks[0]["A_aux"] + ranks[1]["A_aux"]) / 2 - aux_a) < 1e-6
    assert abs((ranks[0]["B_aux"] + ranks[1]["B_aux"]) / 2 - aux_b) < 1e-6

    # what the pitfall computes instead: each rank's own micro-batch loss, averaged afterwards
    local = GPT(_config("micro_batch"))
    local.load_state_dict(model.state_dict())
    per_rank = 0.0
    for part in (x[:4], x[4:]):
        per_rank += float(local(part, part).aux_loss) / 2
    assert abs(per_rank - aux_a) > 1e-4
