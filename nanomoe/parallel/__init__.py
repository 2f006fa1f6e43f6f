"""Parallelism: data parallel (DDP) and expert parallel (EP) across processes."""
