"""Text-to-video sized for a CPU: 8-frame 16x16 clips of moving shapes, a small space-time UNet.

The data and model family of configs/moving_shapes.py with half the frames, a quarter of the
pixels and a narrower network; its speed and metrics on a 2-core machine are in docs/video.md.
"""

from configs import moving_shapes


def get_config():
    config = moving_shapes.get_config()
    config.sized_for = "any"
    config.cpu_preset = ""
    config.data.size = 20_000
    config.data.frames = 8
    config.data.resolution = 16
    config.data.batch_size = 16
    config.model.unet.channels = 32
    config.model.unet.channel_mult = (1, 2)
    config.model.unet.num_res_blocks = 1
    config.model.unet.attention_resolutions = (8,)
    config.model.unet.num_heads = 2
    config.model.dtype = "float32"
    config.text.width = 64
    config.text.depth = 2
    config.text.num_heads = 2
    config.training.num_steps = 3_000
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 200
    config.training.ema_decay = 0.995
    config.training.log_every = 100
    config.training.checkpoint_every = 500
    config.training.sample_every = 1_000
    config.sampling.num_steps = 20
    config.sampling.num_samples = 8
    config.evaluation.num_samples = 120  # per row: 3 scales x (from noise, from a first frame)
    return config
