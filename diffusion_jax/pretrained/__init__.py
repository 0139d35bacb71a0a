"""Pretrained models in diffusers' folder format, converted to this package's Flax modules.

Every loader reads ``config.json`` and safetensors weights (no torch, no pickle), tensor by
tensor, and returns ``(module, params, config)``:

- ``load_vae(folder)``: a ``vae/`` folder -> :class:`diffusion_jax.models.AutoencoderKL`;
- ``load_unet(folder)``: a ``unet/`` folder (SD 1.x, 2.x, XL) -> :class:`diffusion_jax.models.UNet`;
- ``load_text_encoder(folder)``: a ``text_encoder/`` folder -> the CLIP text encoder;

and ``CLIPTokenizer.from_folder``, ``plan_from_config`` (a scheduler config as a schedule,
target and sampler) and ``load_stable_diffusion`` (a whole folder) complete them.
"""

from diffusion_jax.pretrained.autoencoder_kl import (autoencoder_from_config, convert_state_dict,
                                                     load_vae)
from diffusion_jax.pretrained.clip_text import load_text_encoder
from diffusion_jax.pretrained.clip_tokenizer import CLIPTokenizer
from diffusion_jax.pretrained.scheduler import plan_from_config, read_scheduler_config
from diffusion_jax.pretrained.sd_unet import load_unet
from diffusion_jax.pretrained.stable_diffusion import load_stable_diffusion

__all__ = ["autoencoder_from_config", "convert_state_dict", "load_vae", "load_unet",
           "load_text_encoder", "CLIPTokenizer", "plan_from_config", "read_scheduler_config",
           "load_stable_diffusion"]
