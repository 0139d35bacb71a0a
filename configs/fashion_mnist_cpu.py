"""Fashion-MNIST sized for a CPU: a 0.76M-parameter UNet, batch 64, 2,000 steps.

Its speed on a 2-core machine and its samples are in docs/benchmarks.md.
"""

from configs import fashion_mnist


def get_config():
    config = fashion_mnist.get_config()
    config.sized_for = "any"
    config.cpu_preset = ""
    config.data.batch_size = 64
    config.model.unet.channels = 32
    config.model.unet.channel_mult = (1, 2)
    config.model.unet.num_res_blocks = 1
    config.model.unet.attention_resolutions = (14,)
    config.model.unet.num_heads = 1
    config.model.dropout = 0.0
    config.model.dtype = "float32"
    config.training.num_steps = 2_000
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 200
    config.training.ema_decay = 0.995
    config.training.log_every = 100
    config.training.checkpoint_every = 500
    config.training.sample_every = 1_000
    config.sampling.num_steps = 20
    config.sampling.num_samples = 40
    return config
