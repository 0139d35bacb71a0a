"""Stage one of latent text-to-image at 128x128, sized for a CPU: a narrow autoencoder, f=8.

Captioned shapes at 128x128 become 16x16x4 latents. Narrow (8 to 32 channels) so that a 2-core
machine trains it in well under an hour; its reconstruction quality is in
docs/latent_diffusion.md. The second stage is shapes128_latent_cpu.py.
"""

from diffusion_jax import defaults


def get_config():
    config = defaults.get_config()
    config.task = "autoencoder"
    config.data.name = "captions"
    config.data.resolution = 128
    config.data.size = 200_000
    config.data.class_conditional = False
    config.data.batch_size = 8
    a = config.autoencoder
    a.block_out_channels = (8, 16, 32, 32)  # f = 8
    a.layers_per_block = 1
    a.latent_channels = 4
    a.norm_num_groups = 8
    a.reconstruction = "l1"
    a.kl_weight = 1e-6
    config.model.dtype = "float32"
    config.training.num_steps = 2_000
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 100
    config.training.grad_clip = 0.0
    config.training.ema_decay = 0.995
    config.training.log_every = 100
    config.training.checkpoint_every = 500
    config.training.sample_every = 1_000
    config.sampling.num_samples = 16
    config.evaluation.num_samples = 500
    config.evaluation.batch_size = 50
    config.classifier.batch_size = 64
    return config
