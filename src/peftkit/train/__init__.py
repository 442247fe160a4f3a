"""The training engine: config, data, optimizers, schedules, the loop, checkpoints, evaluation."""
