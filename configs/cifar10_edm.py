"""EDM on CIFAR-10 (Karras et al. 2022, class-conditional setting): EDM preconditioning, the
log-normal noise distribution (P_mean -1.2, P_std 1.2) and lambda(sigma) weighting, Heun's
method with 18 steps (35 evaluations) on the Karras grid. The network is this library's UNet
with scale-shift conditioning at DDPM++'s widths, not the paper's exact DDPM++ architecture.

Data: TFDS cifar10 prepared beforehand in config.data.data_dir.
"""

from diffusion_jax import defaults


def get_config():
    config = defaults.get_config()
    config.sized_for = "accelerator"
    config.data.name = "tfds"
    config.data.tfds_name = "cifar10"
    config.data.batch_size = 512
    config.data.class_conditional = True
    config.model.name = "unet"
    config.model.unet.channels = 128
    config.model.unet.channel_mult = (2, 2, 2)
    config.model.unet.num_res_blocks = 4
    config.model.unet.attention_resolutions = (16,)
    config.model.unet.num_heads = 1
    config.model.dropout = 0.13
    config.model.unet.scale_shift = True
    # c_noise = log(sigma) / 4 spans about [-1.6, 1.1]; spread it over the embedding's periods.
    config.model.noise_scale = 250.0
    config.diffusion.schedule = "edm"
    config.diffusion.target = "edm"
    config.diffusion.sigma_data = 0.5
    config.diffusion.weighting = "edm"
    config.diffusion.time_sampling = "edm_lognormal"
    config.diffusion.label_dropout = 0.0
    config.training.num_steps = 400_000
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 10_000
    config.training.ema_decay = 0.9999
    config.training.log_every = 1_000
    config.training.checkpoint_every = 10_000
    config.training.sample_every = 50_000
    config.sampling.method = "heun"
    config.sampling.num_steps = 18
    config.sampling.grid = "karras"
    return config
