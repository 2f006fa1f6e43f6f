"""Training: the one loop, checkpoints, evaluation, run configs and the command line."""
