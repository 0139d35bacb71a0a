"""Denoising networks (Flax linen, NHWC, float32 parameters, configurable computation dtype).

Every model is called as ``model.apply(params, x, noise_level, labels, train=..., rngs=...)`` and
returns an array shaped like ``x`` (or with ``out_channels`` channels). ``UNet`` and ``DiT``
built with ``context_dim`` / ``pooled_dim`` also take text conditioning: ``context=`` [batch,
length, context_dim] with ``context_mask=`` [batch, length] and ``pooled=`` [batch, pooled_dim].
``TextConditioned`` wraps such a denoiser with a text encoder and takes ``tokens=`` and
``token_mask=`` instead. ``Classifier`` is the feature extractor for sample metrics.
``AutoencoderKL`` (Stable Diffusion's autoencoder) and ``PatchDiscriminator`` are the first stage
of latent diffusion; ``lpips`` holds the perceptual distance its training may use.
"""

from diffusion_jax.models.autoencoder import AutoencoderKL, kl_divergence, sample_latent
from diffusion_jax.models.classifier import AttributeClassifier, AudioClassifier, Classifier
from diffusion_jax.models.dit import DIT_SIZES, DiT, dit
from diffusion_jax.models.layers import ATTENTION_IMPLEMENTATIONS, dot_product_attention
from diffusion_jax.models.mlp import MLP
from diffusion_jax.models.patchgan import PatchDiscriminator
from diffusion_jax.models.text_conditioned import TextConditioned
from diffusion_jax.models.text_encoder import TextEncoder
from diffusion_jax.models.unet import SD15_UNET_PARAMETERS, UNet, sd15_unet

__all__ = ["AutoencoderKL", "kl_divergence", "sample_latent", "PatchDiscriminator", "UNet", "sd15_unet", "SD15_UNET_PARAMETERS", "DiT", "DIT_SIZES", "dit", "MLP",
           "Classifier", "AudioClassifier", "AttributeClassifier", "TextConditioned", "TextEncoder",
           "dot_product_attention", "ATTENTION_IMPLEMENTATIONS"]
