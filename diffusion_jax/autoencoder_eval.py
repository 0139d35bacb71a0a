"""How well a trained autoencoder reconstructs held-out images (``--mode=eval`` / ``sample``).

Reconstructions go through the posterior means, with the EMA parameters unless
``config.sampling.use_ema`` is False, and are quantised to 8 bits like saved images. Reported:
PSNR (dB, on 0..255 pixels, averaged over images), the mean absolute pixel error, and the
Fréchet distance between the features of the originals and of their reconstructions, in the
feature space of the run's classifier (``--mode=train_classifier``: the class classifier, or
the attribute classifier for captioned shapes) or of FID's Inception-v3.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

import numpy as np

from diffusion_jax import autoencoder_training, autoencoders, configuration, data, evaluate, files
from diffusion_jax import metrics
from diffusion_jax import parallel, prompt_eval, run, writers

__all__ = ["evaluate_autoencoder", "reconstruct_to_files", "psnr"]


def psnr(originals: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """Peak signal-to-noise ratio in dB of each uint8 image pair (inf for identical images)."""
    difference = originals.astype(np.float64) - reconstructions.astype(np.float64)
    mse = np.mean(difference ** 2, axis=tuple(range(1, originals.ndim)))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(255.0 ** 2 / mse)


def _held_out(config, num: int):
    """``(images in [-1, 1], split)``: ``num`` images evenly spread over the held-out split."""
    source, split = autoencoders.held_out_source(config)
    indices = np.linspace(0, len(source) - 1, min(num, len(source))).astype(int)
    to_inputs = data.ToModelInputs(config.text.max_length)
    return np.stack([to_inputs.map(source[int(i)])["x"] for i in indices]), split


def _restored(config, workdir, step):
    if config.task != "autoencoder":
        raise configuration.ConfigError("this is for autoencoder runs (task='autoencoder')")
    state, model, _, _ = run.restore_run(config, workdir, step=step)
    params = state.ema_params if config.sampling.use_ema else state.params
    return int(state.step), autoencoder_training.make_reconstruct_fn(model.autoencoder), params


def _reconstruct(reconstruct, params, images, batch_size):
    out = [parallel.to_host(reconstruct(params, images[i:i + batch_size]))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def _features(config, workdir) -> tuple[Callable, str]:
    """``(extract(images) -> features, description)`` of the run's feature space."""
    if config.evaluation.feature_extractor == "inception":
        return evaluate.feature_extractor(config, None)
    if config.data.name == "captions":
        return prompt_eval.attribute_features(config, workdir), (
            "features of the attribute classifier (--mode=train_classifier)")
    extract, _ = evaluate.feature_extractor(config, evaluate.load_classifier(config, workdir))
    return extract, "features of the data's classifier (--mode=train_classifier)"


def evaluate_autoencoder(config, workdir: str, *, log: Callable[[str], None] = print,
                         step: Optional[int] = None) -> dict:
    """PSNR, pixel error and Fréchet distance of reconstructions of ``evaluation.num_samples``."""
    if step is None and config.sampling.checkpoint_step != -1:
        step = config.sampling.checkpoint_step
    e = config.evaluation
    extract, feature_space = _features(config, workdir)
    step, reconstruct, params = _restored(config, workdir, step)
    images, split = _held_out(config, e.num_samples)
    start = time.time()
    reconstructions = _reconstruct(reconstruct, params, images, e.batch_size)
    seconds = time.time() - start
    originals_u8, reconstructions_u8 = files.to_uint8(images), files.to_uint8(reconstructions)
    per_image = psnr(originals_u8, reconstructions_u8)
    features = extract(files.quantize(images))
    original_stats = metrics.FeatureStatistics(features.shape[1]).update(features)
    recon_features = extract(files.quantize(reconstructions))
    recon_stats = metrics.FeatureStatistics(recon_features.shape[1]).update(recon_features)
    results = {
        "step": step, "num_images": int(len(images)), "split": split,
        "psnr_db": float(np.mean(np.minimum(per_image, 100.0))),
        "mean_abs_error": float(np.mean(np.abs(originals_u8.astype(np.float64)
                                               - reconstructions_u8))),
        "frechet_distance": metrics.frechet_distance(recon_stats, original_stats),
        "feature_space": feature_space,
        "reconstruction_seconds": round(seconds, 2),
    }
    settings = {"workdir": os.path.abspath(workdir), "use_ema": config.sampling.use_ema,
                "evaluation": e.to_dict(), "data": config.data.to_dict()}
    out_path = (files.save_result(os.path.join(workdir, "eval"), f"step{step}_autoencoder",
                                  results, settings) if parallel.is_writer() else None)
    writer = writers.MetricWriter(os.path.join(workdir, "tensorboard"), console=log,
                                  enabled=parallel.is_writer())
    writer.scalars(step, {f"eval/{k}": v for k, v in results.items() if isinstance(v, float)})
    writer.close()
    log(f"autoencoder at step {step}, {results['num_images']} images of the {split!r} split: PSNR "
        f"{results['psnr_db']:.2f} dB, mean |error| {results['mean_abs_error']:.2f}/255, "
        f"Fréchet distance {results['frechet_distance']:.4f} ({feature_space})")
    log(f"wrote {out_path}")
    return results


def reconstruct_to_files(config, workdir: str) -> list:
    """``--mode=sample`` of an autoencoder run: held-out images and their reconstructions.

    Writes ``workdir/samples/step<N>_reconstructions_<digest>.{npz,png,json}`` (the grid shows
    each original beside its reconstruction); returns the paths.
    """
    step = None if config.sampling.checkpoint_step == -1 else config.sampling.checkpoint_step
    step, reconstruct, params = _restored(config, workdir, step)
    images, _ = _held_out(config, config.sampling.num_samples)
    reconstructions = _reconstruct(reconstruct, params, images, config.evaluation.batch_size)
    if not parallel.is_writer():
        return []
    settings = {"step": step, "workdir": os.path.abspath(workdir),
                "num_samples": config.sampling.num_samples, "use_ema": config.sampling.use_ema}
    stem = files.reserve_stem(os.path.join(workdir, "samples"),
                              f"step{step}_reconstructions_{files.settings_digest(settings)}")
    files.save_arrays(stem + ".npz", originals=images, reconstructions=reconstructions)
    pairs = np.asarray(autoencoder_training.pair_grid(images, reconstructions))
    files.save_grid(pairs, stem + ".png", columns=2 * max(1, int(len(images) ** 0.5)))
    files.save_json(stem + ".json", {**settings, "config": json.loads(
        config.to_json_best_effort())})
    return [stem + ".npz", stem + ".png", stem + ".json"]
