"""Stage two of latent text-to-image at 128x128, sized for one GPU: a text UNet on 16x16x4 latents.

The denoiser and text encoder of text_shapes.py, on the latents of the autoencoder trained with
shapes128_autoencoder.py (give its workdir with --config.latent.autoencoder=DIR); samples are
decoded to 128x128 images. The CPU-sized run is shapes128_latent_cpu.py.

    python main.py --config=configs/shapes128_latent.py --workdir=runs/shapes128_latent \\
        --config.latent.autoencoder=runs/shapes128_autoencoder
"""

from configs import text_shapes


def get_config():
    config = text_shapes.get_config()
    config.cpu_preset = "configs/shapes128_latent_cpu.py"
    config.data.resolution = 128
    config.latent.autoencoder = "runs/shapes128_autoencoder"
    config.model.unet.attention_resolutions = (8, 4)
    return config
