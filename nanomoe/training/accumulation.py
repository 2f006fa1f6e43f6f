"""How many micro-batches make one optimizer step, on any number of processes.

The batch a recipe is tuned for is a number of *tokens per optimizer step* (GPT-2 124M: ~0.5M,
GPT-3 paper table 2.1), not a number of micro-batches: a GPU holds only `batch_size` sequences of
`block_size` tokens at once, so a step accumulates gradients over several micro-batches, spread
over the ranks of a DDP run (build-nanogpt's `grad_accum_steps = total_batch_size // (B * T *
ddp_world_size)`). Deriving the count from tokens_per_step makes one config run the same math on
1, 2 or 8 GPUs:

    tokens_per_step = 524,288 = 64 x 1024 x 8 micro-batches      1 GPU:  8 micro-batches each
                                                                  8 GPUs: 1 micro-batch each

`grad_accum` (what `nanomoe.training.train.TrainConfig` uses) counts micro-batches over all ranks, so W
ranks with grad_accum / W micro-batches each read exactly what one process reads.
"""

from __future__ import annotations


def grad_accum_for(batch_size: int, block_size: int, world_size: int, tokens_per_step: int = 0,
                   grad_accum: int = 1) -> tuple[int, str]:
    """(micro-batches per step over all ranks, one line saying the tokens per step chosen).

    tokens_per_step > 0: exactly that many tokens per step; it must be a multiple of
    batch_size x block_size x world_size (else a ValueError names the nearest valid values).
    tokens_per_step == 0: `grad_accum` micro-batches, rounded up to a multiple of world_size
    (every rank runs at least one), which the returned line says."""
    micro = batch_size * block_size  # tokens of one micro-batch on one rank
    per_round = micro * world_size  # tokens when every rank runs one micro-batch
    if tokens_per_step > 0:
        if tokens_per_step % per_round:
            fits = [b for b in range(batch_size, 0, -1) if tokens_per_step % (b * block_size * world_size) == 0]
            up = -(-tokens_per_step // per_round) * per_round  # the next multiple
            hint = f"--batch_size={fits[0]}" if fits else f"--tokens_per_step={up}"
            raise ValueError(
                f"tokens_per_step={tokens_per_step:,} is not a multiple of batch_size x block_size x processes = "
                f"{batch_size} x {block_size} x {world_size} = {per_round:,}: try {hint}"
            )
        accum, why = tokens_per_step // micro, "from tokens_per_step"
    else:
        accum = -(-grad_accum // world_size) * world_size
        why = "grad_accum" if accum == grad_accum else f"grad_accum={grad_accum} rounded up for {world_size} processes"
    line = (f"{accum * micro:,} tokens/step ({why}) = {world_size} process(es) x {accum // world_size} "
            f"micro-batch(es) x {batch_size} x {block_size} tokens")
    return accum, line
