"""The defaults of every config key, for presets to start from (they live in the package)."""

from diffusion_jax.defaults import get_config

__all__ = ["get_config"]
