"""The main job: class-conditional Fashion-MNIST (28x28 grayscale, 10 classes) on one GPU.

A UNet with attention at 14x14, cosine schedule with v prediction, classifier-free guidance
through label dropout. Data: Debian's dataset-fashion-mnist package (apt-get install
dataset-fashion-mnist) or config.data.path.
"""

from diffusion_jax import defaults


def get_config():
    config = defaults.get_config()
    config.sized_for = "accelerator"
    config.cpu_preset = "configs/fashion_mnist_cpu.py"
    config.data.name = "fashion_mnist"
    config.data.batch_size = 256
    config.model.name = "unet"
    config.model.unet.channels = 96
    config.model.unet.channel_mult = (1, 2, 2)
    config.model.unet.num_res_blocks = 2
    config.model.unet.attention_resolutions = (14, 7)
    config.model.unet.num_heads = 4
    config.model.dropout = 0.1
    config.model.unet.scale_shift = True
    config.model.dtype = "bfloat16"
    config.diffusion.schedule = "cosine"
    config.diffusion.target = "v"
    config.diffusion.weighting = "min_snr"
    config.diffusion.label_dropout = 0.1
    config.training.num_steps = 30_000
    config.training.learning_rate = 3e-4
    config.training.warmup_steps = 1_000
    config.training.ema_decay = 0.9995
    config.training.log_every = 200
    config.training.checkpoint_every = 5_000
    config.training.sample_every = 5_000
    config.sampling.method = "dpmpp_2m"
    config.sampling.num_steps = 30
    config.sampling.num_samples = 100
    config.sampling.guidance_scale = 2.0
    return config
