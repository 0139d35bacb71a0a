"""Fashion-MNIST sized for a CPU: a 0.76M-parameter UNet, batch 64, 2,000 steps.

Measured on a 2-core machine: about 0.7 steps/s when nothing else runs (so about 50 minutes),
final loss about 0.037; the samples are recognisable garments of the asked-for classes
(docs/fashion_mnist_cpu_samples.png). More cores make it proportionally faster.
"""

from configs import fashion_mnist


def get_config():
    config = fashion_mnist.get_config()
    config.data.batch_size = 64
    config.model.channels = 32
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attention_resolutions = (14,)
    config.model.num_heads = 1
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
