"""Class-conditional audio sized for a CPU: 0.26 s clips at 8 kHz, a small 1-D UNet.

The classes and model family of configs/tones.py at an eighth of the samples per clip and a
narrower, shallower network; its speed and metrics on a 2-core machine are in docs/audio.md.
"""

from configs import tones


def get_config():
    config = tones.get_config()
    config.sized_for = "any"
    config.cpu_preset = ""
    config.data.size = 20_000
    config.data.sample_rate = 8_000
    config.data.clip_length = 2_048
    config.data.batch_size = 32
    config.model.unet.channels = 16
    config.model.unet.channel_mult = (1, 2, 4, 4)
    config.model.unet.num_res_blocks = 1
    config.model.unet.attention_resolutions = (256,)
    config.model.unet.num_heads = 2
    config.model.dtype = "float32"
    config.training.num_steps = 3_000
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 200
    config.training.ema_decay = 0.995
    config.training.log_every = 100
    config.training.checkpoint_every = 500
    config.training.sample_every = 1_000
    config.sampling.num_steps = 20
    config.evaluation.num_samples = 360
    config.evaluation.batch_size = 72  # (a multiple of the 36 classes: each asked for equally)
    config.classifier.num_steps = 1_500
    return config
