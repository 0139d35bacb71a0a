"""Pretrained models in diffusers' folder format, converted to this package's Flax modules.

``load_vae(folder)`` reads a diffusers ``vae/`` folder (``config.json`` and safetensors weights,
no torch needed) into :class:`diffusion_jax.models.autoencoder.AutoencoderKL` and its parameters;
``autoencoder_from_config`` and ``convert_state_dict`` are its two halves.
"""

from diffusion_jax.pretrained.autoencoder_kl import (autoencoder_from_config, convert_state_dict,
                                                     load_vae)

__all__ = ["autoencoder_from_config", "convert_state_dict", "load_vae"]
