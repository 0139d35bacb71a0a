"""Generate with a pretrained Stable Diffusion model (1.x, 2.x or XL base, diffusers folder format).

    python main.py --config=configs/stable_diffusion.py --workdir=runs/sd --mode=sample \\
        --config.pretrained.path=/path/to/stable-diffusion-v1-5 \\
        --config.sampling.prompt="a watercolour painting of a lighthouse at dawn"

The folder is one the user has (diffusion_jax downloads nothing): model_index.json, unet/, vae/,
text_encoder/ (+ text_encoder_2/), tokenizer/ (+ tokenizer_2/), scheduler/, with .safetensors
weights. By default the folder's own scheduler samples, with 30 steps and guidance 7.5; on a GPU
or TPU add --config.model.dtype=bfloat16 --config.pretrained.param_dtype=bfloat16.
docs/stable_diffusion.md has the rest.
"""

from diffusion_jax.defaults import get_config as default_config


def get_config():
    config = default_config()
    config.pretrained.path = ""  # required: --config.pretrained.path=DIR
    config.sampling.method = "scheduler"
    config.sampling.grid = "scheduler"
    config.sampling.num_steps = 30
    config.sampling.guidance_scale = 7.5
    config.sampling.num_samples = 4
    config.sampling.seed = 0
    return config
