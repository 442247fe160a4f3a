"""The training engine: config, data, optimizers, schedules, the loop, checkpoints, evaluation."""

# ``config`` re-exports ``config_load``, which imports ``config``: importing ``config`` first, whichever module is
# asked for, lets ``from peftkit.train.config_load import load_config`` work too.
from peftkit.train import config as config
