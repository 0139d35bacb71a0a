"""Fine-tune a pretrained Stable Diffusion 1.x / 2.x model on a folder of captioned images.

    python main.py --config=configs/stable_diffusion_finetune.py --workdir=runs/sd_finetune \\
        --config.pretrained.path=/path/to/stable-diffusion-v1-5 \\
        --config.latent.autoencoder=/path/to/stable-diffusion-v1-5/vae \\
        --config.data.path=/path/to/captioned/images

The run's denoiser starts as the folder's UNet and CLIP text encoder (frozen here), its latents
are those of the folder's vae/, and captions are tokenized by the folder's tokenizer; from then
on it trains, checkpoints, resumes and samples like any run. The forward process and target are
SD 1.x's (scaled-linear betas, eps); for an SD 2.x v-prediction folder add
--config.diffusion.target=v (the run refuses a mismatch with the folder's scheduler). Sized for
one 80 GB GPU at 512x512; docs/stable_diffusion.md has the rest.
"""

from diffusion_jax.defaults import get_config as default_config


def get_config():
    config = default_config()
    config.sized_for = "accelerator"
    config.pretrained.path = ""  # required: --config.pretrained.path=DIR
    config.latent.autoencoder = ""  # required: DIR/vae
    config.data.name = "folder"
    config.data.path = ""  # required: images with captions (metadata.jsonl or .txt files)
    config.data.captions = "required"
    config.data.resolution = 512
    config.data.class_conditional = False
    config.data.batch_size = 8
    config.model.dtype = "bfloat16"
    config.model.remat = True
    config.model.attention = "auto"
    config.text.freeze = True
    config.diffusion.schedule = "scaled_linear"
    config.diffusion.target = "eps"
    config.diffusion.weighting = "mse"
    config.diffusion.time_sampling = "uniform"
    config.diffusion.caption_dropout = 0.1
    config.training.num_steps = 2_000
    config.training.learning_rate = 1e-5
    config.training.warmup_steps = 100
    config.training.ema_decay = 0.999
    config.training.checkpoint_every = 500
    config.training.sample_every = 500
    config.sampling.method = "dpmpp_2m"
    config.sampling.grid = "trailing"
    config.sampling.num_steps = 25
    config.sampling.guidance_scale = 7.5
    config.sampling.num_samples = 8
    return config
