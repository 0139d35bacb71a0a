"""diffusion_jax: diffusion models as pure JAX functions.

The math core: :mod:`~diffusion_jax.schedules` (the forward process),
:mod:`~diffusion_jax.parameterization` (what a network predicts),
:mod:`~diffusion_jax.losses` (the training objective), :mod:`~diffusion_jax.samplers` (the reverse
process) and :mod:`~diffusion_jax.guidance` (classifier-free guidance).
"""

from diffusion_jax import guidance, losses, parameterization, samplers, schedules

__all__ = ["guidance", "losses", "parameterization", "samplers", "schedules"]
__version__ = "0.1.0"
