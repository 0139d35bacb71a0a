"""Stage two of latent diffusion on Fashion-MNIST, sized for a CPU: a class-conditional UNet.

It denoises the 7x7x4 latents of the autoencoder trained with
configs/fashion_mnist_autoencoder_cpu.py, whose workdir config.latent.autoencoder names (give
yours with --config.latent.autoencoder=DIR). Samples are decoded to 28x28 images.

    python main.py --config=configs/fashion_mnist_latent_cpu.py --workdir=runs/fm_latent_cpu \\
        --config.latent.autoencoder=runs/fm_autoencoder_cpu
"""

from configs import fashion_mnist_cpu


def get_config():
    config = fashion_mnist_cpu.get_config()
    config.latent.autoencoder = "runs/fm_autoencoder_cpu"
    config.model.unet.channels = 64
    config.model.unet.channel_mult = (1,)  # 7x7 latents: one level, no downsampling
    config.model.unet.num_res_blocks = 2
    config.model.unet.attention_resolutions = (7,)
    config.model.unet.num_heads = 2
    return config
