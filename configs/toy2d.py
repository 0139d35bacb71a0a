"""2-D mixture of eight Gaussians with an MLP denoiser: a CPU-sized run that needs no data."""

from diffusion_jax import defaults


def get_config():
    config = defaults.get_config()
    config.data.name = "toy2d"
    config.data.toy_kind = "mixture"
    config.data.size = 20_000
    config.data.batch_size = 512
    config.model.name = "mlp"
    config.model.mlp.hidden = 128
    config.model.mlp.depth = 3
    config.model.dropout = 0.0
    config.diffusion.label_dropout = 0.15
    config.training.num_steps = 3_000
    config.training.learning_rate = 2e-3
    config.training.warmup_steps = 100
    config.training.ema_decay = 0.999
    config.training.log_every = 500
    config.training.checkpoint_every = 1_000
    config.training.sample_every = 0
    config.sampling.num_steps = 40
    config.sampling.num_samples = 4_000
    return config
