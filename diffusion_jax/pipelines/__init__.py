"""Ready-to-call generation objects over loaded pretrained models.

:class:`StableDiffusion` runs Stable Diffusion 1.x, 2.x and XL base folders in the diffusers
format: ``StableDiffusion.from_pretrained(path)(prompt)``.
"""

from diffusion_jax.pipelines.stable_diffusion import StableDiffusion

__all__ = ["StableDiffusion"]
