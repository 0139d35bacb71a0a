"""Stage one of latent text-to-image at 128x128, sized for one GPU: a KL autoencoder with f=8.

Captioned shapes (data.name="captions") at 128x128 become 16x16x4 latents, 48x fewer values.
The architecture is Stable Diffusion's autoencoder at a quarter of its widths; the objective is
its own (L1, KL weight 1e-6, PatchGAN from step 20,000, LPIPS when a weights file is given).
The CPU-sized run is shapes128_autoencoder_cpu.py; the second stage is shapes128_latent.py.

    python main.py --config=configs/shapes128_autoencoder.py --workdir=runs/shapes128_autoencoder
"""

from configs import shapes128_autoencoder_cpu


def get_config():
    config = shapes128_autoencoder_cpu.get_config()
    config.sized_for = "accelerator"
    config.cpu_preset = "configs/shapes128_autoencoder_cpu.py"
    config.data.batch_size = 64
    config.data.worker_count = 8
    a = config.autoencoder
    a.block_out_channels = (32, 64, 128, 128)
    a.layers_per_block = 2
    a.norm_num_groups = 32
    a.disc_weight = 0.5
    a.disc_start = 20_000
    config.model.dtype = "bfloat16"
    config.training.num_steps = 50_000
    config.training.learning_rate = 2e-4
    config.training.ema_decay = 0.999
    config.training.checkpoint_every = 2_500
    config.training.sample_every = 2_500
    return config
