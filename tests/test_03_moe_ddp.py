"""Chapter 03: 2-process DDP (CPU, gloo) with an expert that never receives a token.

A ModuleList of experts would leave that expert's parameters without a gradient, and DDP would
wait for it forever (or raise, asking for find_unused_parameters=True). Stacked expert weights give
it a zero gradient instead, so the all-reduce completes and every rank sees the same gradients."""

import socket
import time

import torch
import torch.multiprocessing as mp

from nanomoe import GPT, moe_config
from nanomoe.moe import moe_layers

DEAD = 3  # the expert nobody picks


def _config():
    return moe_config(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, n_experts=4, moe_top_k=2,
                      moe_bias_balance=True)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts them)
        model = GPT(_config())
        for moe in moe_layers(model):
            moe.expert_bias[DEAD] = -10.0  # probabilities are <= 1: expert DEAD is never selected
        ddp = DDP(model)  # find_unused_parameters=False: every parameter must get a gradient
        opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-2)
        g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        losses = []
        for _ in range(3):
            idx = torch.randint(0, 32, (2, 16), generator=g)
            out = ddp(idx, idx)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            loads = [st["load"] for st in out.moe_stats]
            opt.step()
            losses.append(out.loss.item())
        torch.save({"grads": grads, "loads": loads, "losses": losses}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_with_an_expert_that_gets_no_tokens(tmp_path):
    # fork (not spawn): the children inherit the imported modules instead of importing them again,
    # which is most of the cost of this test on a busy 2-core machine. CPU-only, so fork is safe.
    import torch._dynamo  # noqa: F401  (DDP's constructor imports it: ~10 s, so once, here)

    ctx = mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="fork")
    deadline = time.time() + 240
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("DDP training hung (an expert without tokens must not block the all-reduce)")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["losses"] != r1["losses"]  # the ranks really saw different data
    for load in r0["loads"] + r1["loads"]:
        assert load[DEAD] == 0
    assert r0["grads"].keys() == r1["grads"].keys()
    for name, g0 in r0["grads"].items():
        assert torch.isfinite(g0).all(), name
        torch.testing.assert_close(g0, r1["grads"][name], msg=name)  # averaged by DDP: identical
        if name.endswith("experts.c_fc") or name.endswith("experts.c_proj"):
            assert torch.equal(g0[DEAD], torch.zeros_like(g0[DEAD])), name
            assert g0.abs().sum() > 0, name
