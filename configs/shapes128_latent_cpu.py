"""Stage two of latent text-to-image at 128x128, sized for a CPU: a small text UNet on latents.

The CPU-sized denoiser of text_shapes_cpu.py on the 16x16x4 latents of the autoencoder trained
with shapes128_autoencoder_cpu.py (give its workdir with --config.latent.autoencoder=DIR).
"""

from configs import text_shapes_cpu


def get_config():
    config = text_shapes_cpu.get_config()
    config.data.resolution = 128
    config.latent.autoencoder = "runs/shapes128_autoencoder_cpu"
    config.model.unet.attention_resolutions = (8, 4)
    config.evaluation.batch_size = 50
    return config
