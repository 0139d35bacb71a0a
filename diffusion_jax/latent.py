"""Latent diffusion's frozen autoencoder in a run: its weights, the latent scale, encode and decode.

A latent-diffusion run (``config.latent.autoencoder`` set) trains its denoiser on
``scale * (z - shift)``, where ``z`` is a posterior sample of the autoencoder's encoder (Rombach
et al. 2022, section 4.3.2: latents rescaled to unit variance), and decodes generated latents
back to images. The scale is fixed when the run starts (``config.latent.scale``, a diffusers
folder's ``scaling_factor``, or ``1 / std`` of the data's latents) and kept in
``WORKDIR/latent.json``, which resuming, sampling and evaluation read.

Latents are encoded on the fly in the input pipeline, each step's posterior samples drawn from
a key of the seed and the step so that a resumed run sees the same ones; or read from a folder
that ``--mode=encode_dataset`` wrote once (:func:`encode_dataset`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import autoencoders, configuration, data, files, parallel, run
from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.pretrained import autoencoder_kl as diffusers_vae

__all__ = ["LatentSpace", "LatentBatches", "load_space", "decoder_for", "estimate_scale", "encode_dataset",
           "precomputed_source", "LATENT_FILE"]

LATENT_FILE = "latent.json"
_ENCODE_STREAM = 0x1A7E47  # folded into the seed: the posterior samples' own key stream


class LatentSpace:
    """A frozen autoencoder and the scale of its latents; encode and decode are jit-compiled.

    The parameters are arguments of the compiled functions, not constants baked into them.
    """

    def __init__(self, autoencoder: AutoencoderKL, params, scale: float = 1.0,
                 shift: float = 0.0):
        self.autoencoder, self.params = autoencoder, params
        self.scale, self.shift = float(scale), float(shift)
        apply = autoencoder.apply
        self._moments = jax.jit(
            lambda p, x: apply({"params": p}, x, method=AutoencoderKL.encode))
        self._decode = jax.jit(lambda p, z: jnp.clip(apply(
            {"params": p}, z / self.scale + self.shift, method=AutoencoderKL.decode), -1, 1))
        self._encode_batch = jax.jit(self._encode_batch_impl, static_argnums=3)

    def with_scale(self, scale: float, shift: float = 0.0) -> "LatentSpace":
        """The same autoencoder and weights with another scale and shift."""
        return LatentSpace(self.autoencoder, self.params, scale, shift)

    def moments(self, images):
        """The posterior's ``(mean, logvar)`` for NHWC images in [-1, 1]."""
        return self._moments(self.params, images)

    def decode(self, latents):
        """Images in [-1, 1] from scaled latents (what the denoiser generates)."""
        return self._decode(self.params, latents)

    def _latents(self, params, batch, key):
        if "moments" in batch:
            mean, logvar = jnp.split(batch["moments"], 2, axis=-1)
        else:
            mean, logvar = self.autoencoder.apply({"params": params}, batch["x"],
                                                  method=AutoencoderKL.encode)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return (z - self.shift) * self.scale

    def _encode_batch_impl(self, params, batch, keys, stacked):
        rest = {k: v for k, v in batch.items() if k not in ("x", "moments")}
        if not stacked:
            return {**rest, "x": self._latents(params, batch, keys)}
        inputs = {k: batch[k] for k in ("x", "moments") if k in batch}
        latents = jax.vmap(lambda b, k: self._latents(params, b, k))(inputs, keys)
        return {**rest, "x": latents}

    def encode_batch(self, batch, keys):
        """A batch of images (``x``) or precomputed ``moments`` as scaled latents under ``x``.

        ``keys`` is one key, or one per step (a key array of shape [steps]) for a
        ``[steps, batch, ...]`` stack.
        """
        return self._encode_batch(self.params, batch, keys, keys.ndim > 0)


def step_key(seed: int, step):
    """The key of the posterior samples of train step ``step``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _ENCODE_STREAM), step)


class LatentBatches:
    """Device batches of images (or moments) turned into scaled latents as they are handed out.

    It passes ``get_state``/``set_state`` through, so checkpoints record the data position;
    ``first_step`` is the step of the first batch, and ``stack`` steps share one batch when the
    train step runs several per call.
    """

    def __init__(self, iterator, space: LatentSpace, *, seed: int, first_step: int,
                 stack: int = 1):
        self._iterator, self._space, self._seed = iterator, space, seed
        self._step, self._stack = first_step, stack

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._iterator)
        steps = jnp.arange(self._step, self._step + self._stack)
        keys = (step_key(self._seed, self._step) if self._stack == 1 else
                jax.vmap(lambda s: step_key(self._seed, s))(steps))
        self._step += self._stack
        return self._space.encode_batch(batch, keys)

    def get_state(self):
        return self._iterator.get_state()

    def set_state(self, state):
        self._iterator.set_state(state)


def _load_params(source: autoencoders.AutoencoderSource, step: Optional[int]):
    """The autoencoder's weights: from its run's checkpoint, or the diffusers safetensors."""
    if source.kind == "diffusers":
        try:
            _, params, _ = diffusers_vae.load_vae(source.path)
        except (OSError, ValueError) as err:
            raise configuration.ConfigError(
                f"config.latent.autoencoder={source.path!r}: {err}") from err
        return params
    state, _, _, _ = run.restore_run(source.config, source.path, step=step)
    params = state.ema_params if source.config.sampling.use_ema else state.params
    return params["autoencoder"]


def decoder_for(config, workdir: str) -> Optional[Callable]:
    """A latent run's decoder from generated latents to images; None for a pixel run."""
    if not config.latent.autoencoder:
        return None
    return load_space(config, workdir, log=lambda line: None).decode


def estimate_scale(space: LatentSpace, batches, num_batches: int, key) -> tuple[float, int]:
    """``(1 / std, count)`` of the unscaled latents of ``num_batches`` batches of images.

    The standard deviation is over every value of the posterior samples (Rombach et al. 2022
    rescale by the first batch's); sums are accumulated in float64 on the host.
    """
    unscaled = space.with_scale(1.0)
    total = squares = count = 0.0
    for i in range(num_batches):
        latents = unscaled.encode_batch(next(batches), jax.random.fold_in(key, i))
        latents = np.asarray(parallel.to_host(latents["x"]), np.float64)
        total, squares = total + latents.sum(), squares + np.square(latents).sum()
        count += latents.size
    variance = squares / count - (total / count) ** 2
    if not variance > 0 or not math.isfinite(variance):
        raise configuration.ConfigError(
            f"the autoencoder's latents of the data have variance {variance}: the autoencoder "
            "is broken (NaN) or collapsed; set config.latent.scale by hand or retrain it")
    return 1.0 / math.sqrt(variance), int(count)


def load_space(config, workdir: str, *, estimate: Optional[Callable] = None,
               log: Callable[[str], None] = print) -> LatentSpace:
    """The latent space of a latent run in ``workdir``: weights, and the scale it uses.

    The scale is that of ``WORKDIR/latent.json`` when there is one; otherwise
    ``config.latent.scale``, a diffusers folder's ``scaling_factor``, or ``estimate(space)``
    (training only: ``space`` unscaled, returns ``(scale, count)``), and then it is written there.
    """
    source = autoencoders.describe(config.latent.autoencoder, config.model.dtype)
    step = None if config.latent.checkpoint_step == -1 else config.latent.checkpoint_step
    space = LatentSpace(source.autoencoder, _load_params(source, step))
    path = os.path.join(workdir, LATENT_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            kept = json.load(f)
        if kept.get("autoencoder") != source.fingerprint():
            raise configuration.ConfigError(
                f"{path} records another autoencoder ({kept.get('autoencoder')}) than "
                f"config.latent.autoencoder={config.latent.autoencoder!r} "
                f"({source.fingerprint()}): a run keeps the autoencoder it started with")
        if config.latent.scale and not math.isclose(config.latent.scale, kept["scale"]):
            raise configuration.ConfigError(
                f"config.latent.scale={config.latent.scale} differs from the scale "
                f"{kept['scale']} this run was trained with ({path}); leave it 0")
        return space.with_scale(kept["scale"], kept["shift"])
    shift = float(source.shift_factor or 0.0)
    if config.latent.scale:
        scale, how = config.latent.scale, "config.latent.scale"
    elif source.scaling_factor:
        scale, how = float(source.scaling_factor), "the diffusers config's scaling_factor"
    elif estimate is not None:
        scale, count = estimate(space)
        how = (f"1 / std of {count:,} latent values of {config.latent.scale_batches} "
               "batches of the data")
    else:
        raise configuration.ConfigError(
            f"{workdir} has no {LATENT_FILE}, which records the latent scale a latent run was "
            "trained with: train the run first (or set config.latent.scale)")
    if estimate is not None and parallel.is_writer():
        files.save_json(path, {"scale": scale, "shift": shift, "how": how,
                               "autoencoder": source.fingerprint(),
                               "autoencoder_path": os.path.abspath(config.latent.autoencoder)})
    log(f"latent scale {scale:.6g} ({how})")
    return space.with_scale(scale, shift)


def precomputed_source(config):
    """The source of ``config.latent.precomputed``, checked against the autoencoder and data."""
    source = data.PrecomputedLatents(config.latent.precomputed)
    info = source.info
    expected = autoencoders.describe(config.latent.autoencoder).fingerprint()
    if info.get("autoencoder") != expected:
        raise configuration.ConfigError(
            f"the latents in {config.latent.precomputed} were encoded by another autoencoder "
            f"({info.get('autoencoder')}) than config.latent.autoencoder ({expected}); encode "
            "them again with --mode=encode_dataset")
    if info.get("data") != _data_identity(config):
        raise configuration.ConfigError(
            f"the latents in {config.latent.precomputed} are of other data ({info.get('data')}) "
            f"than config.data ({_data_identity(config)}); encode them again")
    return source


def _data_identity(config) -> dict:
    d = config.data
    return {"name": d.name, "path": d.path, "tfds_name": d.tfds_name, "split": d.split,
            "resolution": d.resolution, "size": d.size, "resize": d.resize}


def encode_dataset(config, workdir: str, *, log: Callable[[str], None] = print) -> str:
    """``--mode=encode_dataset``: write the posterior moments of the whole training split.

    Into ``config.latent.precomputed`` (or ``WORKDIR/latents``), in order, a batch of
    ``config.data.batch_size`` at a time; the folder appears complete or not at all (it is
    written beside and renamed). Returns its path.
    """
    if not config.latent.autoencoder:
        raise configuration.ConfigError("--mode=encode_dataset needs config.latent.autoencoder")
    if jax.process_count() > 1:
        raise configuration.ConfigError("--mode=encode_dataset runs as one process")
    out = config.latent.precomputed or os.path.join(workdir, "latents")
    if os.path.exists(out):
        raise configuration.ConfigError(f"{out} exists already; remove it, or give another "
                                        "folder in config.latent.precomputed")
    pixels = configuration.build_source(config.data)
    source = autoencoders.describe(config.latent.autoencoder, config.model.dtype)
    step = None if config.latent.checkpoint_step == -1 else config.latent.checkpoint_step
    space = LatentSpace(source.autoencoder, _load_params(source, step))
    image_shape, num_classes = configuration.data_shape(pixels)
    shape = autoencoders.latent_shape(source.autoencoder, image_shape,
                                      where=f"config.latent.autoencoder={source.path!r}")
    partial = out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    start, count = time.time(), len(pixels)
    moments = np.lib.format.open_memmap(os.path.join(partial, "moments.npy"), "w+", np.float32,
                                        (count,) + shape[:2] + (2 * shape[2],))
    labels, captions = [], []
    to_inputs = data.ToModelInputs(config.text.max_length)
    for begin in range(0, count, config.data.batch_size):
        records = [pixels[i] for i in range(begin, min(begin + config.data.batch_size, count))]
        images = np.stack([to_inputs.map({"image": r["image"]})["x"] for r in records])
        mean, logvar = space.moments(images)
        moments[begin:begin + len(records)] = np.concatenate([mean, logvar], -1)
        labels += [int(r["label"]) for r in records if "label" in r]
        captions += [str(r["caption"]) for r in records if "caption" in r]
    moments.flush()
    del moments
    if labels:
        np.save(os.path.join(partial, "labels.npy"), np.asarray(labels, np.int32))
    if captions:
        files.save_json(os.path.join(partial, "captions.json"), captions)
    seconds = time.time() - start
    files.save_json(os.path.join(partial, "info.json"), {
        "count": count, "latent_shape": list(shape), "num_classes": num_classes,
        "autoencoder": source.fingerprint(), "autoencoder_path": os.path.abspath(source.path),
        "data": _data_identity(config), "seconds": seconds})
    os.replace(partial, out)
    log(f"encoded {count:,} images to {out} in {seconds:.1f} s "
        f"({count / max(seconds, 1e-9):.1f} images/s)")
    return out
