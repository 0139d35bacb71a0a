"""A seconds-long run for tests: a very small UNet on 16x16 procedural shapes."""

from diffusion_jax import defaults


def get_config():
    config = defaults.get_config()
    config.data.name = "shapes"
    config.data.size = 256
    config.data.resolution = 16
    config.data.batch_size = 8
    config.model.unet.channels = 16
    config.model.unet.channel_mult = (1, 2)
    config.model.unet.num_res_blocks = 1
    config.model.unet.attention_resolutions = (8,)
    config.model.dropout = 0.0
    config.training.num_steps = 6
    config.training.warmup_steps = 2
    config.training.learning_rate = 1e-3
    config.training.log_every = 2
    config.training.checkpoint_every = 3
    config.training.sample_every = 0
    config.training.ema_decay = 0.9
    config.sampling.num_steps = 3
    config.sampling.num_samples = 4
    return config
