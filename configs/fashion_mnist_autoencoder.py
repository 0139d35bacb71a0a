"""Stage one of latent diffusion on Fashion-MNIST, sized for one GPU: a KL autoencoder with f=4.

28x28x1 images become 7x7x4 latents. The objective of Stable Diffusion's autoencoder: L1
reconstruction, KL weight 1e-6, a PatchGAN discriminator from step 10,000 and LPIPS when
config.autoencoder.lpips_weights names a weights file (docs/latent_diffusion.md). The CPU-sized
run is fashion_mnist_autoencoder_cpu.py; the second stage is fashion_mnist_latent.py.

    python main.py --config=configs/fashion_mnist_autoencoder.py --workdir=runs/fm_autoencoder
"""

from configs import fashion_mnist_autoencoder_cpu


def get_config():
    config = fashion_mnist_autoencoder_cpu.get_config()
    config.sized_for = "accelerator"
    config.cpu_preset = "configs/fashion_mnist_autoencoder_cpu.py"
    config.data.batch_size = 128
    a = config.autoencoder
    a.block_out_channels = (64, 128, 128)
    a.layers_per_block = 2
    a.norm_num_groups = 32
    a.disc_weight = 0.5
    a.disc_start = 10_000
    config.model.dtype = "bfloat16"
    config.training.num_steps = 30_000
    config.training.learning_rate = 2e-4
    config.training.warmup_steps = 500
    config.training.ema_decay = 0.999
    config.training.checkpoint_every = 2_500
    config.training.sample_every = 2_500
    return config
