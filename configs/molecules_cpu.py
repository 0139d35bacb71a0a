"""Molecules sized for a CPU: up to 4 heavy atoms (15 atoms with hydrogens), a small EGNN.

The data and model family of configs/molecules.py restricted to the smallest molecules of the
list, with a narrower, shallower network; its speed and metrics on a 2-core machine are in
docs/molecules.md.
"""

from configs import molecules


def get_config():
    config = molecules.get_config()
    config.sized_for = "any"
    config.cpu_preset = ""
    config.data.size = 20_000
    config.data.max_atoms = 15
    config.data.max_heavy_atoms = 4
    config.data.batch_size = 32
    config.model.egnn.hidden = 64
    config.model.egnn.depth = 4
    config.training.num_steps = 4_000
    config.training.learning_rate = 5e-4
    config.training.warmup_steps = 200
    config.training.ema_decay = 0.995
    config.training.log_every = 100
    config.training.checkpoint_every = 500
    config.training.sample_every = 1_000
    config.sampling.num_steps = 200
    config.evaluation.num_samples = 200
    config.evaluation.batch_size = 100
    return config
