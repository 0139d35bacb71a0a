"""Molecules on one GPU: an E(3)-equivariant graph network over atoms with 3-D positions.

Small organic molecules (H, C, N, O, F; up to 9 heavy atoms, 29 atoms with hydrogens) from the
built-in SMILES list, each example a conformer RDKit embeds (ETKDG) and relaxes
(diffusion_jax.data.molecules.SmilesMolecules). Positions and scaled one-hot atom types are
denoised jointly by an EGNN (Satorras et al. 2021) as in Hoogeboom et al. 2022: noise on
positions has zero centre of mass, the loss counts present atoms only, and each sample's atom
count is drawn from the training data's. docs/molecules.md has the metrics.
"""

from diffusion_jax import defaults


def get_config():
    config = defaults.get_config()
    config.sized_for = "accelerator"
    config.cpu_preset = "configs/molecules_cpu.py"
    config.data.name = "molecules"
    config.data.size = 200_000
    config.data.max_atoms = 29
    config.data.max_heavy_atoms = 9
    config.data.batch_size = 64
    config.data.class_conditional = False
    config.model.name = "egnn"
    config.model.egnn.hidden = 256
    config.model.egnn.depth = 9
    config.model.dtype = "float32"  # positions stay float32 in any dtype; the messages too
    config.diffusion.schedule = "ddpm_linear"
    config.diffusion.target = "eps"
    config.training.num_steps = 200_000
    config.training.learning_rate = 1e-4
    config.training.warmup_steps = 1_000
    config.training.grad_clip = 1.0
    config.training.ema_decay = 0.999
    config.training.log_every = 500
    config.training.checkpoint_every = 10_000
    config.training.sample_every = 10_000
    config.sampling.method = "ddpm"
    config.sampling.num_steps = 500
    config.sampling.num_samples = 36
    config.evaluation.num_samples = 1_000
    config.evaluation.batch_size = 250
    return config
