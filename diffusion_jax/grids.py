"""The image grids a training run writes as it goes: samples, or an autoencoder's reconstructions.

Written to ``workdir/samples/step_<N>.png`` and to TensorBoard by process 0, from the EMA
parameters.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from diffusion_jax import autoencoder_training, autoencoders, data, files, generate, modalities
from diffusion_jax import parallel, train_state

__all__ = ["SampleGrids", "ReconstructionGrids", "for_run"]


class SampleGrids:
    """Samples of ``config.sampling`` (decoded to images in a latent run).

    Images as a grid; audio as a grid of spectrograms; video as rows of frames
    (:func:`~diffusion_jax.modalities.preview`)."""

    def __init__(self, config, model, example_shape, num_classes, mesh, workdir, writer,
                 space=None):
        self._config, self._workdir, self._writer = config, workdir, writer
        self._space = space
        self._make = lambda: jax.jit(generate.make_generate_fn(
            config, model, example_shape, num_classes, mesh=mesh), static_argnums=2)
        self._generate = None  # compiled when first needed

    def write(self, step: int, state) -> None:
        """Generate and write the grid of ``step``."""
        if self._generate is None:
            self._generate = self._make()
        s = self._config.sampling
        samples = self._generate(train_state.model_params(state), jax.random.key(s.seed),
                                 s.num_samples)
        if self._space is not None:
            samples = self._space.decode(samples)
        samples = parallel.to_host(samples)
        grid = modalities.preview(samples, self._config) if parallel.is_writer() else None
        if grid is not None:  # (vectors have no picture)
            files.save_png(grid, os.path.join(self._workdir, "samples", f"step_{step:08d}.png"))
            self._writer.image(step, "samples/ema", grid)


class ReconstructionGrids:
    """Held-out images beside their reconstructions (pairs side by side, original first)."""

    def __init__(self, config, model, workdir, writer):
        self._workdir, self._writer = workdir, writer
        source, split = autoencoders.held_out_source(config)
        if split != "test":
            writer.text(f"the reconstruction grids show images of the {split!r} split: the data "
                        "has no test split")
        count = min(config.sampling.num_samples, len(source))
        self._images = _images(config, source, count)
        self._reconstruct = autoencoder_training.make_reconstruct_fn(model.autoencoder)

    def write(self, step: int, state) -> None:
        """Reconstruct the held-out images with the EMA parameters and write the grid."""
        reconstructions = parallel.to_host(self._reconstruct(state.ema_params, self._images))
        if parallel.is_writer():
            pairs = autoencoder_training.pair_grid(self._images, reconstructions)
            columns = 2 * max(1, int(len(self._images) ** 0.5))
            grid = files.save_grid(pairs, os.path.join(self._workdir, "samples",
                                                       f"step_{step:08d}.png"), columns=columns)
            self._writer.image(step, "reconstructions/ema", grid)


def _images(config, source, count):
    to_inputs = data.ToModelInputs(config.text.max_length)
    return np.stack([to_inputs.map(source[i])["x"] for i in range(count)])


def for_run(config, model, example_shape, num_classes, mesh, workdir, writer, space=None):
    """The grids of this run: reconstructions for an autoencoder run, else samples."""
    if config.task == "autoencoder":
        return ReconstructionGrids(config, model, workdir, writer)
    return SampleGrids(config, model, example_shape, num_classes, mesh, workdir, writer, space)
