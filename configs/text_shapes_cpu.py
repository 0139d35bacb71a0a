"""Text-to-image on captioned shapes, sized for a CPU: a small cross-attention UNet (32x32) and
a 2-block text encoder (2.2M parameters in all). See text_shapes.py for the full-size run and what
the data is.

What it reaches on a 2-core machine is in docs/text_to_image.md; it needs the longer training
of text_shapes.py for the samples to follow colour and shape.
"""

from configs import text_shapes


def get_config():
    config = text_shapes.get_config()
    config.sized_for = "any"
    config.cpu_preset = ""
    config.data.batch_size = 32
    config.data.worker_count = 0  # two cores: the model, not the data, is the bottleneck
    config.model.unet.channels = 32
    config.model.unet.channel_mult = (1, 2, 2)
    config.model.unet.num_res_blocks = 1
    config.model.unet.attention_resolutions = (16, 8)
    config.model.unet.head_dim = 32
    config.model.dtype = "float32"
    config.text.width = 128
    config.text.depth = 2
    config.text.num_heads = 4
    config.training.num_steps = 3_000
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 200
    config.training.ema_decay = 0.995
    config.training.log_every = 100
    config.training.checkpoint_every = 500
    config.training.sample_every = 2_000
    config.sampling.num_steps = 20
    config.sampling.num_samples = 16
    return config
