"""Text-to-image on captioned procedural shapes (``data.name = "captions"``): 32x32 images of one
to three shapes described by captions such as "two large blue squares on a yellow background".
A UNet cross-attends to a byte-level Transformer text encoder trained with it; captions are
dropped 10% of the time so that classifier-free guidance works. Sized for one GPU; see
text_shapes_cpu.py for a CPU run.

Speed and prompt adherence measured on a GPU are in docs/text_to_image.md.

    python main.py --config=configs/text_shapes.py --workdir=runs/text_shapes
    python main.py --config=configs/text_shapes.py --workdir=runs/text_shapes --mode=sample \\
        --config.sampling.prompt="a large red circle in the top left|three green squares" \\
        --config.sampling.guidance_scale=4
"""

from diffusion_jax import defaults


def get_config():
    config = defaults.get_config()
    config.sized_for = "accelerator"
    config.cpu_preset = "configs/text_shapes_cpu.py"
    config.data.name = "captions"
    config.data.resolution = 32
    config.data.size = 200_000
    config.data.batch_size = 128
    config.data.class_conditional = False
    config.data.worker_count = 8  # shapes are drawn on the host (rate per process: docs/configs.md)
    config.model.unet.channels = 128
    config.model.unet.channel_mult = (1, 2, 2)
    config.model.unet.num_res_blocks = 2
    config.model.unet.attention_resolutions = (16, 8)
    config.model.unet.head_dim = 32
    config.model.dropout = 0.0
    config.model.dtype = "bfloat16"
    config.text.max_length = 96
    config.text.width = 256
    config.text.depth = 4
    config.text.num_heads = 4
    config.diffusion.schedule = "cosine"
    config.diffusion.target = "v"
    config.diffusion.caption_dropout = 0.1
    config.training.num_steps = 50_000
    config.training.learning_rate = 3e-4
    config.training.warmup_steps = 500
    config.training.ema_decay = 0.999
    config.training.log_every = 100
    config.training.checkpoint_every = 2_500
    config.training.sample_every = 5_000
    config.sampling.method = "dpmpp_2m"
    config.sampling.num_steps = 30
    config.sampling.num_samples = 36
    config.sampling.guidance_scale = 4.0
    return config
