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

from diffusion_jax import autoencoders, configuration, data, files, parallel, run, train_state
from diffusion_jax import optimizer as optimizer_lib
from diffusion_jax.models.autoencoder import AutoencoderKL, sample_latent
from diffusion_jax.pretrained import autoencoder_kl as diffusers_vae

__all__ = ["LatentSpace", "load_autoencoder_params", "LatentBatches", "load_space", "decoder_for", "check_precomputed", "estimate_scale", "encode_dataset",
           "precomputed_source", "LATENT_FILE"]

LATENT_FILE = "latent.json"
_ENCODE_STREAM = 0x1A7E47  # folded into the seed: the posterior samples' own key stream


class LatentSpace:
    """A frozen autoencoder and the scale of its latents; encode and decode are jit-compiled.

    The parameters are arguments of the compiled functions, not constants baked into them.
    """

    def __init__(self, autoencoder: AutoencoderKL, params, scale: float = 1.0,
                 shift: float = 0.0, autoencoder_step: Optional[int] = None):
        self.autoencoder, self.params = autoencoder, params
        self.scale, self.shift = float(scale), float(shift)
        self.autoencoder_step = autoencoder_step  # the autoencoder run's checkpoint, if any
        apply = autoencoder.apply
        self._moments = jax.jit(
            lambda p, x: apply({"params": p}, x, method=AutoencoderKL.encode))
        self._decode = jax.jit(lambda p, z: jnp.clip(apply(
            {"params": p}, z / self.scale + self.shift, method=AutoencoderKL.decode), -1, 1))
        self._encode_batch = jax.jit(self._encode_batch_impl, static_argnums=(3, 4))

    def with_scale(self, scale: float, shift: float = 0.0) -> "LatentSpace":
        """The same autoencoder and weights with another scale and shift."""
        return LatentSpace(self.autoencoder, self.params, scale, shift, self.autoencoder_step)

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
        return (sample_latent(mean, logvar, key) - self.shift) * self.scale

    def _encode_batch_impl(self, params, batch, keys, stacked, sharding):
        rest = {k: v for k, v in batch.items() if k not in ("x", "moments")}
        if not stacked:
            out = {**rest, "x": self._latents(params, batch, keys)}
        else:
            inputs = {k: batch[k] for k in ("x", "moments") if k in batch}
            latents = jax.vmap(lambda b, k: self._latents(params, b, k))(inputs, keys)
            out = {**rest, "x": latents}
        if sharding is not None:  # laid out as the train step takes its batches
            out = jax.lax.with_sharding_constraint(out, sharding)
        return out

    def encode_batch(self, batch, keys, sharding=None):
        """A batch of images (``x``) or precomputed ``moments`` as scaled latents under ``x``.

        ``keys`` is one key, or one per step (a key array of shape [steps]) for a
        ``[steps, batch, ...]`` stack; ``sharding`` (e.g. the train step's batch sharding) lays
        out every array of the result.
        """
        return self._encode_batch(self.params, batch, keys, keys.ndim > 0, sharding)


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
                 stack: int = 1, sharding=None):
        self._iterator, self._space, self._seed = iterator, space, seed
        self._step, self._stack, self._sharding = first_step, stack, sharding

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._iterator)
        steps = jnp.arange(self._step, self._step + self._stack)
        keys = (step_key(self._seed, self._step) if self._stack == 1 else
                jax.vmap(lambda s: step_key(self._seed, s))(steps))
        self._step += self._stack
        return self._space.encode_batch(batch, keys, self._sharding)

    def get_state(self):
        return self._iterator.get_state()

    def set_state(self, state):
        self._iterator.set_state(state)


def load_autoencoder_params(source: autoencoders.AutoencoderSource, step: Optional[int]):
    """``(params, step)``: a run's checkpoint ``step`` (None: latest), or a diffusers folder's."""
    if source.kind == "diffusers":
        try:
            _, params, _ = diffusers_vae.load_vae(source.path)
        except (OSError, ValueError) as err:
            raise configuration.ConfigError(
                f"config.latent.autoencoder={source.path!r}: {err}") from err
        return params, None
    # The run's network and checkpoints, without its data (autoencoder.json gives the shape).
    config, shape = source.config, source.image_shape
    model = autoencoders.build_task(config, shape)
    abstract = train_state.abstract_train_state(
        model, optimizer_lib.optimizer_from_config(config), shape, None, config.seed)
    checkpoints = run.open_checkpoints(config, source.path, shape, None)
    try:
        if checkpoints.latest_step() is None:
            raise configuration.ConfigError(
                f"config.latent.autoencoder={source.path!r} has no checkpoint yet; train it first")
        state = checkpoints.restore(train_state.with_shardings(abstract, run.sampling_mesh(config)),
                                    step=step)
    finally:
        checkpoints.close()
    params = state.ema_params if config.sampling.use_ema else state.params
    return params["autoencoder"], int(state.step)


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
               resumed: bool = True, log: Callable[[str], None] = print) -> LatentSpace:
    """The latent space of a latent run in ``workdir``: weights, and the scale it uses.

    What ``WORKDIR/latent.json`` records wins: the autoencoder (its settings, folder and
    checkpoint step) and the scale; a config naming another is refused. Without it the scale is
    ``config.latent.scale``, a diffusers folder's ``scaling_factor``, or ``estimate(space)``
    (training: ``space`` unscaled, returns ``(scale, count)``), and training writes the file. A
    run starting afresh (``resumed=False``) replaces what an earlier failed start wrote.
    """
    source = autoencoders.describe(config.latent.autoencoder, config.model.dtype)
    path = os.path.join(workdir, LATENT_FILE)
    kept = None
    if os.path.isfile(path) and (estimate is None or resumed):
        with open(path) as f:
            kept = json.load(f)
        _check_kept(kept, source, config, path)
    elif estimate is not None and resumed:
        raise configuration.ConfigError(
            f"{workdir} has checkpoints but no {LATENT_FILE}, which records the latent scale and "
            "autoencoder the run was trained with; restore that file (or start a new run)")
    wanted = None if config.latent.checkpoint_step == -1 else config.latent.checkpoint_step
    step = kept.get("autoencoder_step", wanted) if kept else wanted
    params, step = load_autoencoder_params(source, step)
    space = LatentSpace(source.autoencoder, params, autoencoder_step=step)
    if kept is not None:
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
                               "autoencoder_path": os.path.realpath(config.latent.autoencoder),
                               "autoencoder_step": step})
    log(f"latent scale {scale:.6g} ({how}); autoencoder {config.latent.autoencoder}"
        f"{'' if step is None else f' at step {step}'}")
    return space.with_scale(scale, shift)


def _check_kept(kept: dict, source, config, path: str) -> None:
    """Refuse a config whose autoencoder or scale differs from what the run recorded."""
    named = os.path.realpath(config.latent.autoencoder)
    if kept.get("autoencoder") != source.fingerprint() or kept.get(
            "autoencoder_path", named) != named:
        raise configuration.ConfigError(
            f"{path} records the autoencoder {kept.get('autoencoder_path')} "
            f"({kept.get('autoencoder')}), and config.latent.autoencoder names "
            f"{config.latent.autoencoder!r} ({source.fingerprint()}): a run keeps the autoencoder "
            "it started with; name that one")
    step = config.latent.checkpoint_step
    if step != -1 and kept.get("autoencoder_step") not in (None, step):
        raise configuration.ConfigError(
            f"config.latent.checkpoint_step={step}, but this run was trained on the "
            f"autoencoder's step {kept['autoencoder_step']} ({path}); leave it -1")
    if config.latent.scale and not math.isclose(config.latent.scale, kept["scale"]):
        raise configuration.ConfigError(
            f"config.latent.scale={config.latent.scale} differs from the scale "
            f"{kept['scale']} this run was trained with ({path}); leave it 0")


def check_precomputed(source, space: LatentSpace, config) -> None:
    """Refuse precomputed latents encoded by another checkpoint of the run's autoencoder."""
    encoded = source.info.get("autoencoder_step")
    if encoded != space.autoencoder_step or source.info.get(
            "autoencoder_path") != os.path.realpath(config.latent.autoencoder):
        raise configuration.ConfigError(
            f"the latents in {config.latent.precomputed} were encoded by "
            f"{source.info.get('autoencoder_path')} at step {encoded}, and this run uses "
            f"{config.latent.autoencoder} at step {space.autoencoder_step}; encode them again "
            "with --mode=encode_dataset")


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


# Data keys added after latents were first recorded: named in the identity only when they differ
# from these defaults, so that latents encoded before them still match.
_LATER_DATA_KEYS = {"heldout": "pairs", "max_objects": 3, "image_key": "image", "label_key": "",
                    "data_dir": ""}


def _data_identity(config) -> dict:
    d = config.data
    identity = {"name": d.name, "path": d.path, "tfds_name": d.tfds_name, "split": d.split,
                "resolution": d.resolution, "size": d.size, "resize": d.resize}
    identity.update({k: d[k] for k, default in _LATER_DATA_KEYS.items() if d[k] != default})
    return identity


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
    params, step = load_autoencoder_params(source, step)
    space = LatentSpace(source.autoencoder, params)
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
        "autoencoder": source.fingerprint(), "autoencoder_path": os.path.realpath(source.path),
        "autoencoder_step": step,
        "data": _data_identity(config), "seconds": seconds})
    os.replace(partial, out)
    log(f"encoded {count:,} images to {out} in {seconds:.1f} s "
        f"({count / max(seconds, 1e-9):.1f} images/s)")
    return out
