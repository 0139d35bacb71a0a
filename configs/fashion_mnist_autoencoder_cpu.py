"""Stage one of latent diffusion on Fashion-MNIST, sized for a CPU: a KL autoencoder with f=4.

28x28x1 images become 7x7x4 latents (4x fewer values). L1 reconstruction and the KL term of
Stable Diffusion's autoencoder (kl_weight 1e-6); no discriminator, and LPIPS only when
config.autoencoder.lpips_weights names a weights file. Its reconstruction quality is in
docs/latent_diffusion.md. The second stage is configs/fashion_mnist_latent_cpu.py.
"""

from diffusion_jax import defaults


def get_config():
    config = defaults.get_config()
    config.task = "autoencoder"
    config.data.name = "fashion_mnist"
    config.data.batch_size = 64
    a = config.autoencoder
    a.block_out_channels = (16, 32, 32)  # f = 4
    a.layers_per_block = 1
    a.latent_channels = 4
    a.norm_num_groups = 16
    a.mid_attention = True
    a.reconstruction = "l1"
    a.kl_weight = 1e-6
    config.model.dtype = "float32"
    config.training.num_steps = 3_000
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 200
    config.training.grad_clip = 0.0
    config.training.ema_decay = 0.995
    config.training.log_every = 100
    config.training.checkpoint_every = 1_000
    config.training.sample_every = 1_000
    config.sampling.num_samples = 32
    config.evaluation.num_samples = 2_000
    return config
