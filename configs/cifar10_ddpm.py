"""DDPM on CIFAR-10 (Ho et al. 2020): the paper's 35.7M-parameter UNet, linear betas, eps
prediction, plain MSE, batch 128, lr 2e-4 with 5000 warmup steps, EMA 0.9999, 800k steps.

Data: TFDS cifar10 prepared beforehand (tfds build cifar10 --file_format=array_record) in
config.data.data_dir.
"""

from diffusion_jax import defaults


def get_config():
    config = defaults.get_config()
    config.sized_for = "accelerator"
    config.data.name = "tfds"
    config.data.tfds_name = "cifar10"
    config.data.batch_size = 128
    config.data.class_conditional = False
    config.model.name = "unet"
    config.model.unet.channels = 128
    config.model.unet.channel_mult = (1, 2, 2, 2)
    config.model.unet.num_res_blocks = 2
    config.model.unet.attention_resolutions = (16,)
    config.model.unet.num_heads = 1
    config.model.dropout = 0.1
    config.diffusion.schedule = "ddpm_linear"
    config.diffusion.target = "eps"
    config.diffusion.weighting = "mse"
    config.diffusion.label_dropout = 0.0
    config.training.num_steps = 800_000
    config.training.learning_rate = 2e-4
    config.training.warmup_steps = 5_000
    config.training.grad_clip = 1.0
    config.training.ema_decay = 0.9999
    config.training.log_every = 1_000
    config.training.checkpoint_every = 10_000
    config.training.sample_every = 50_000
    config.sampling.method = "ddpm"
    config.sampling.num_steps = 1_000
    config.sampling.grid = "uniform"
    return config
