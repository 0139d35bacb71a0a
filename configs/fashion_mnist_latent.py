"""Stage two of latent diffusion on Fashion-MNIST, sized for one GPU: a UNet on 7x7x4 latents.

Class-conditional with classifier-free guidance, like fashion_mnist.py but on the latents of
the autoencoder trained with fashion_mnist_autoencoder.py (give its workdir with
--config.latent.autoencoder=DIR). The CPU-sized run is fashion_mnist_latent_cpu.py.

    python main.py --config=configs/fashion_mnist_latent.py --workdir=runs/fm_latent \\
        --config.latent.autoencoder=runs/fm_autoencoder
"""

from configs import fashion_mnist


def get_config():
    config = fashion_mnist.get_config()
    config.cpu_preset = "configs/fashion_mnist_latent_cpu.py"
    config.latent.autoencoder = "runs/fm_autoencoder"
    config.model.unet.channels = 128
    config.model.unet.channel_mult = (1,)  # 7x7 latents: one level, no downsampling
    config.model.unet.num_res_blocks = 3
    config.model.unet.attention_resolutions = (7,)
    return config
