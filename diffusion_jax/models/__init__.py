"""Denoising networks (Flax linen, NHWC, float32 parameters, configurable computation dtype).

Every model is called as ``model.apply(params, x, noise_level, labels, train=..., rngs=...)`` and
returns an array shaped like ``x`` (or with ``out_channels`` channels). ``Classifier`` is the
feature extractor for sample metrics.
"""

from diffusion_jax.models.classifier import Classifier
from diffusion_jax.models.dit import DIT_SIZES, DiT, dit
from diffusion_jax.models.mlp import MLP
from diffusion_jax.models.unet import UNet

__all__ = ["UNet", "DiT", "DIT_SIZES", "dit", "MLP", "Classifier"]
