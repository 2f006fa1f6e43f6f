"""The forward never reads a tensor back to the host: the token ids are checked where they enter
(the batch loader, `GPT.generate`), not in `forward`. A host read stops the CPU from queuing work
ahead of the GPU (nanoGPT keeps its loop free of them). There is no GPU here, so a dispatch mode
fails on the aten ops that read a value back (`.item()`, `int()`, `nonzero`, ...) on any device."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanomoe import GPT
from nanomoe.config import gpt2_config, modern_config, moe_config
from nanomoe.data import BatchLoader, DataError

SYNCING = {
    torch.ops.aten._local_scalar_dense.default,  # .item(), int(), float(), bool() of a tensor
    torch.ops.aten.nonzero.default,  # output size depends on the values
    torch.ops.aten.masked_select.default,
    torch.ops.aten.equal.default,
}


class NoHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING:
            raise AssertionError(f"host sync in the forward: {func}")
        return func(*args, **(kwargs or {}))


def _configs():
    small = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    return {
        "gpt2": gpt2_config(**small),
        "modern": modern_config(**small),
        "moe dropless": moe_config(**small, n_experts=4, moe_top_k=2),
        "moe capacity": moe_config(**small, n_experts=4, moe_top_k=2, moe_capacity_factor=1.0, moe_min_capacity=1),
    }


@pytest.mark.parametrize("name", list(_configs()))
def test_forward_and_backward_make_no_host_sync(name):
    torch.manual_seed(0)
    model = GPT(_configs()[name])
    idx = torch.randint(0, 64, (2, 16))
    with NoHostSync():
        logits, loss = model(idx, idx)
        loss.backward()
    assert torch.isfinite(loss)


def test_the_detector_catches_a_host_read():
    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        int(torch.tensor(3) + 1)


def test_ids_are_checked_where_they_enter():
    model = GPT(_configs()["modern"])
    with pytest.raises(ValueError, match=r"token id 64 is out of range \[0, 64\)"):
        model.generate(torch.tensor([[1, 64]]), 2)
    data = torch.arange(40) + 40  # ids 40..79 for a 64-token model
    loader = BatchLoader(data.numpy(), 2, 16, vocab_size=64, sequential=True)
    with pytest.raises(DataError, match=r"token id \d+ in the data is out of range \[0, 64\)"):
        loader.next_batch()
