"""Generate from trained parameters: the sampling function of a config, image grids, files."""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import configuration, guidance, parallel, parameterization, samplers

__all__ = ["make_generate_fn", "sampling_labels", "to_uint8", "make_grid", "save_grid",
           "save_arrays", "save_json"]


@functools.lru_cache(maxsize=None)
def _network(model):
    def apply(params, x, noise_level, labels):
        return model.apply({"params": params}, x, noise_level, labels)

    return apply


def _unconditional(denoise_fn, x, t):
    return denoise_fn(x, t, None)


def sampling_labels(config, num_classes, num):
    """Labels to generate: ``config.sampling.label``, or every class in turn when it is -1."""
    if num_classes is None:
        return None
    label = config.sampling.label
    if label == -1:
        return jnp.arange(num, dtype=jnp.int32) % num_classes
    if not 0 <= label < num_classes:
        raise configuration.ConfigError(
            f"config.sampling.label={label} is not a class of this data (0..{num_classes - 1}, "
            "or -1 for all)")
    return jnp.full((num,), label, jnp.int32)


_OVERRIDABLE = ("method", "num_steps", "grid", "label", "guidance_scale")


def make_generate_fn(config, model, example_shape, num_classes, *, mesh=None, **sampling):
    """``generate(params, key, num) -> samples`` following ``config.sampling``, with any of its
    keys overridden by keyword (``method``, ``num_steps``, ``grid``, ``label``,
    ``guidance_scale``); parameters, labels and the guidance scale are data to the compiled
    sampler. With a ``mesh`` the batch is split over all its devices (when ``num`` divides
    evenly; otherwise it runs replicated)."""
    if sampling:
        config = config.copy_and_resolve_references()
        with config.unlocked():
            for key, value in sampling.items():
                if key not in _OVERRIDABLE:
                    raise configuration.ConfigError(
                        f"make_generate_fn cannot override {key!r}; it takes {_OVERRIDABLE} "
                        "(the key and the number of samples are arguments of generate)")
                config.sampling[key] = value
        configuration.validate(config)
    schedule = configuration.build_schedule(config)
    par = configuration.build_parameterization(config)
    sampling = config.sampling

    def generate(params, key, num):
        denoise = parameterization.make_denoise_fn(
            jax.tree_util.Partial(_network(model), params), schedule, par)
        labels = sampling_labels(config, num_classes, num)
        if labels is None:
            fn = jax.tree_util.Partial(_unconditional, denoise)
        else:
            fn = guidance.classifier_free_guidance(
                denoise, cond=labels, uncond=jnp.full_like(labels, num_classes),
                scale=sampling.guidance_scale)
        key_noise, key_sampler = jax.random.split(key)
        noise = jax.random.normal(key_noise, (num,) + tuple(example_shape), jnp.float32)
        if mesh is not None and num % mesh.devices.size == 0:
            noise = jax.lax.with_sharding_constraint(noise, parallel.batch_sharding(mesh))
        return samplers.sample(fn, noise, schedule=schedule, method=sampling.method,
                               num_steps=sampling.num_steps, grid=sampling.grid,
                               key=key_sampler).samples

    return generate


def to_uint8(images):
    """[-1, 1] floats -> uint8 pixels."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(
        np.uint8)


def _atomic_write(path, write):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def make_grid(images, columns=None) -> np.ndarray:
    """Tile a batch of NHWC images in [-1, 1] into one uint8 image, row by row (``columns``
    defaults to a square layout); a single channel is returned as a 2-D grayscale image."""
    pixels = to_uint8(images)
    num, height, width, channels = pixels.shape
    columns = columns or int(math.ceil(math.sqrt(num)))
    rows = int(math.ceil(num / columns))
    grid = np.zeros((rows * height, columns * width, channels), np.uint8)
    for i in range(num):
        r, c = divmod(i, columns)
        grid[r * height:(r + 1) * height, c * width:(c + 1) * width] = pixels[i]
    return grid[..., 0] if channels == 1 else grid


def save_grid(images, path, columns=None):
    """Write a batch of NHWC images in [-1, 1] as one PNG grid (written atomically)."""
    from PIL import Image

    grid = make_grid(images, columns)
    image = Image.fromarray(grid)
    _atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return grid


def save_json(path, value):
    """Write a JSON-able value to ``path`` atomically (indented, for people to read)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(value, f, indent=1)
    _atomic_write(path, write)


def save_arrays(path, **arrays):
    """Write arrays to an .npz file atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    _atomic_write(path, write)
