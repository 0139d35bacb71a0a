"""Class-conditional audio on one GPU: 1 s clips of procedural tones at 16 kHz, a 1-D UNet.

36 classes (three timbres x the eight notes of C major, three major chords per timbre, and three
percussive hits), each clip one to three beats loud or soft (diffusion_jax.data.audio.Tones).
The waveform UNet halves the clip's length six times, with attention on the two coarsest
levels; cosine schedule, v prediction, label dropout for classifier-free guidance. docs/audio.md
has the metrics (pitch and label accuracy per guidance scale).
"""

from diffusion_jax import defaults


def get_config():
    config = defaults.get_config()
    config.sized_for = "accelerator"
    config.cpu_preset = "configs/tones_cpu.py"
    config.data.name = "tones"
    config.data.size = 200_000
    config.data.sample_rate = 16_000
    config.data.clip_length = 16_384
    config.data.batch_size = 64
    config.model.name = "unet"
    config.model.unet.channels = 32
    config.model.unet.channel_mult = (1, 2, 2, 4, 4, 8, 8)
    config.model.unet.num_res_blocks = 2
    config.model.unet.attention_resolutions = (512, 256)
    config.model.unet.num_heads = 4
    config.model.dropout = 0.0
    config.model.dtype = "bfloat16"
    config.diffusion.schedule = "cosine"
    config.diffusion.target = "v"
    config.diffusion.label_dropout = 0.1
    config.training.num_steps = 50_000
    config.training.learning_rate = 2e-4
    config.training.warmup_steps = 1_000
    config.training.ema_decay = 0.9995
    config.training.log_every = 200
    config.training.checkpoint_every = 5_000
    config.training.sample_every = 5_000
    config.sampling.method = "dpmpp_2m"
    config.sampling.num_steps = 30
    config.sampling.num_samples = 36
    config.sampling.guidance_scale = 2.0
    config.evaluation.num_samples = 1_800
    config.evaluation.batch_size = 360
    config.classifier.num_steps = 3_000
    config.classifier.batch_size = 64
    return config
