"""Text-to-video on one GPU: 16-frame 32x32 clips of procedural moving shapes, a space-time UNet.

Each clip shows one shape that moves right, left, up or down, bounces, or changes colour, with
a caption saying so ("a red circle moving to the right on a blue background";
diffusion_jax.data.video.MovingShapes). The factorised space-time UNet (per-frame convolutions
and attention, convolutions and attention across frames) cross-attends to the byte-level text
encoder; caption dropout gives classifier-free guidance. docs/video.md has the metrics.
"""

from diffusion_jax import defaults


def get_config():
    config = defaults.get_config()
    config.sized_for = "accelerator"
    config.cpu_preset = "configs/moving_shapes_cpu.py"
    config.data.name = "moving_shapes"
    config.data.captions = "auto"
    config.data.size = 200_000
    config.data.frames = 16
    config.data.resolution = 32
    config.data.batch_size = 64
    config.model.name = "unet"
    config.model.unet.channels = 64
    config.model.unet.channel_mult = (1, 2, 2)
    config.model.unet.num_res_blocks = 2
    config.model.unet.attention_resolutions = (16, 8)
    config.model.unet.num_heads = 4
    config.model.dropout = 0.0
    config.model.dtype = "bfloat16"
    config.text.width = 128
    config.text.depth = 2
    config.diffusion.schedule = "cosine"
    config.diffusion.target = "v"
    config.diffusion.caption_dropout = 0.1
    config.training.num_steps = 40_000
    config.training.learning_rate = 2e-4
    config.training.warmup_steps = 1_000
    config.training.ema_decay = 0.9995
    config.training.log_every = 200
    config.training.checkpoint_every = 5_000
    config.training.sample_every = 5_000
    config.sampling.method = "dpmpp_2m"
    config.sampling.num_steps = 30
    config.sampling.num_samples = 12
    config.sampling.guidance_scale = 3.0
    # The frame judge of --mode=train_classifier (video_eval.train_judge): 600 steps of 32 frames
    # read shapes, colours and positions almost perfectly (docs/video.md).
    config.classifier.num_steps = 600
    config.classifier.batch_size = 32
    config.classifier.learning_rate = 3e-3
    config.classifier.width = 24
    config.evaluation.num_samples = 600
    config.evaluation.batch_size = 60
    # --mode=eval's sweep: each scale from noise and from each clip's own first frame
    config.evaluation.guidance_scales = (0.0, 1.0, 3.0)
    config.evaluation.first_frame = True
    return config
