"""From a config to objects: validation with clear messages, and builders for the data source,
model, schedule, prediction target and loss. Everything here runs before any compilation."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

from diffusion_jax import data as data_lib
from diffusion_jax import losses, parameterization, samplers, schedules
from diffusion_jax import models

__all__ = ["ConfigError", "validate", "build_source", "build_model", "build_schedule",
           "build_parameterization", "data_shape"]


class ConfigError(ValueError):
    """A config key is unknown or has an invalid value; the message names the key."""


_CHOICES = {
    "data.name": ("fashion_mnist", "tfds", "shapes", "captions", "toy2d"),
    "data.toy_kind": data_lib.Toy2D.KINDS,
    "model.name": ("unet", "dit", "mlp"),
    "model.dit_size": tuple(models.DIT_SIZES),
    "model.dtype": ("float32", "bfloat16"),
    "diffusion.schedule": tuple(schedules.SCHEDULES),
    "diffusion.target": parameterization.TARGETS,
    "diffusion.weighting": losses.WEIGHTINGS,
    "diffusion.time_sampling": losses.TIME_SAMPLING,
    "sampling.method": samplers.METHODS,
    "sampling.grid": samplers.GRIDS,
    "evaluation.feature_extractor": ("classifier", "inception"),
    "mesh.train_step": ("jit", "shard_map"),
    "mesh.state_layouts": ("auto", "default"),
    "model.dropout_rng": ("threefry", "rbg"),
    "model.attention": models.ATTENTION_IMPLEMENTATIONS,
}
_POSITIVE = ("data.batch_size", "data.size", "data.resolution", "training.num_steps",
             "training.learning_rate", "training.log_every", "training.checkpoint_every",
             "training.keep_checkpoints", "sampling.num_steps", "sampling.num_samples",
             "model.channels", "model.num_res_blocks", "model.hidden", "model.depth",
             "model.patch_size", "evaluation.num_samples", "evaluation.batch_size",
             "evaluation.precision_recall_k", "evaluation.likelihood_steps",
             "classifier.num_steps", "classifier.batch_size", "classifier.learning_rate",
             "classifier.width", "classifier.feature_dim", "training.grad_accumulation",
             "training.steps_per_call", "training.prefetch", "text.max_length",
             "text.width", "text.depth", "text.num_heads")
_FREE_FORM = ("diffusion.schedule_params", "diffusion.weighting_params",
              "diffusion.time_sampling_params")


def _flatten(config, prefix=""):
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items") and name not in _FREE_FORM:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def validate_distributed(config) -> None:
    """Check ``config.distributed`` alone: ``main.py`` does so before joining the other
    processes, which must happen before anything else touches the devices."""
    d = config.distributed
    if not isinstance(d.num_processes, int) or not (d.num_processes == -1
                                                    or d.num_processes >= 1):
        raise ConfigError("config.distributed.num_processes must be -1 (found by JAX) or an "
                          f"integer >= 1, got {d.num_processes!r}")
    top = d.num_processes if d.num_processes != -1 else math.inf
    if not isinstance(d.process_id, int) or not (d.process_id == -1 or 0 <= d.process_id < top):
        raise ConfigError("config.distributed.process_id must be -1 (found by JAX) or an "
                          "integer from 0 to num_processes - 1, got "
                          f"{d.process_id!r}")
    if not isinstance(d.timeout_s, int) or d.timeout_s < 1:
        raise ConfigError("config.distributed.timeout_s must be a whole number of seconds >= 1, "
                          f"got {d.timeout_s!r}")


def validate(config, reference=None) -> None:
    """Check every key against the defaults in configs/default.py and every value against its
    allowed range; raise :class:`ConfigError` naming the first offending key."""
    if reference is None:
        from configs import default  # the repository's defaults define the valid keys

        reference = default.get_config()
    given, known = _flatten(config), _flatten(reference)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; valid keys are listed in "
                          "configs/default.py")
    missing = sorted(set(known) - set(given))
    if missing:
        raise ConfigError(f"config is missing key(s) {missing}; start presets from "
                          "configs/default.get_config()")
    for key, choices in _CHOICES.items():
        if given[key] not in choices:
            raise ConfigError(f"config.{key}={given[key]!r} is not one of {tuple(choices)}")
    for key in _POSITIVE:
        if not given[key] > 0:
            raise ConfigError(f"config.{key} must be > 0, got {given[key]!r}")
    for key in ("training.ema_decay", "diffusion.label_dropout", "diffusion.caption_dropout",
                "model.dropout"):
        if not 0.0 <= given[key] < 1.0:
            raise ConfigError(f"config.{key} must be in [0, 1), got {given[key]!r}")
    validate_distributed(config)
    for key in ("mesh.data", "mesh.fsdp"):
        if not isinstance(given[key], int) or not (given[key] == -1 or given[key] >= 1):
            raise ConfigError(f"config.{key} must be -1 (the rest of the devices) or an integer "
                              f">= 1, got {given[key]!r}")
    for key in ("training.grad_accumulation", "training.steps_per_call", "training.prefetch"):
        if not isinstance(given[key], int):
            raise ConfigError(f"config.{key} must be an integer, got {given[key]!r}")
    k = given["training.steps_per_call"]
    for key in ("training.num_steps", "training.log_every", "training.checkpoint_every",
                "training.sample_every"):
        if given[key] % k:
            raise ConfigError(f"config.{key}={given[key]} must be a multiple of "
                              f"config.training.steps_per_call={k} (steps run {k} per call)")
    if given["data.batch_size"] % given["training.grad_accumulation"]:
        raise ConfigError(f"config.data.batch_size={given['data.batch_size']} does not split "
                          f"into config.training.grad_accumulation="
                          f"{given['training.grad_accumulation']} microbatches")
    if given["evaluation.feature_extractor"] == "inception" and not given[
            "evaluation.inception_weights"]:
        raise ConfigError(
            "config.evaluation.feature_extractor='inception' needs "
            "config.evaluation.inception_weights: the path of pytorch-fid's FID Inception "
            "weights (pt_inception-2015-12-05-6726825d.pth, from pytorch-fid's releases) or an "
            ".npz converted from it")
    if not isinstance(given["data.worker_count"], int) or given["data.worker_count"] < 0:
        raise ConfigError("config.data.worker_count must be an integer >= 0 (0 reads data in "
                          f"the training process), got {given['data.worker_count']!r}")
    if given["evaluation.likelihood_examples"] < 0:
        raise ConfigError("config.evaluation.likelihood_examples must be >= 0 (0 skips it)")
    if not 0.0 <= given["sampling.guidance_rescale"] <= 1.0:
        raise ConfigError("config.sampling.guidance_rescale must be in [0, 1]")
    if given["text.width"] % given["text.num_heads"]:
        raise ConfigError(f"config.text.width={given['text.width']} must be divisible by "
                          f"config.text.num_heads={given['text.num_heads']}")
    if (given["sampling.prompt"] or given["sampling.negative_prompt"]) and given[
            "data.name"] != "captions":
        raise ConfigError("config.sampling.prompt needs a text-conditioned model "
                          "(data.name='captions'); this config trains on "
                          f"{given['data.name']!r}")
    if given["sampling.guidance_scale"] < 0:
        raise ConfigError("config.sampling.guidance_scale must be >= 0")
    if given["data.name"] == "tfds" and not given["data.tfds_name"]:
        raise ConfigError("config.data.tfds_name must name the dataset when data.name='tfds'")
    # Component parameters are checked by building the components (still before compiling).
    try:
        schedule = build_schedule(config)
        par = build_parameterization(config)
        losses.make_loss_fn(lambda *a: None, schedule=schedule, parameterization=par,
                            time_sampling=config.diffusion.time_sampling,
                            time_sampling_params=dict(config.diffusion.time_sampling_params),
                            weighting=config.diffusion.weighting,
                            weighting_params=dict(config.diffusion.weighting_params))
        if par.name == "eps":
            parameterization.make_denoise_fn(lambda *a: None, schedule, par)
    except ValueError as err:
        raise ConfigError(f"config.diffusion: {err}") from err


def build_schedule(config):
    return schedules.get(config.diffusion.schedule, **dict(config.diffusion.schedule_params))


def build_parameterization(config):
    target = config.diffusion.target
    if target == "edm":
        return parameterization.get("edm", sigma_data=config.diffusion.sigma_data)
    return parameterization.get(target)


def build_source(data_config, split=None):
    """The random-access data source named by config.data."""
    split = split or data_config.split
    if data_config.name == "fashion_mnist":
        return data_lib.FashionMNIST(split, path=data_config.path or None)
    if data_config.name == "tfds":
        return data_lib.TFDSSource(data_config.tfds_name, split,
                                   data_dir=data_config.data_dir or None)
    if data_config.name == "shapes":
        return data_lib.Shapes(data_config.size, data_config.resolution,
                               seed=0 if split == "train" else 1)
    if data_config.name == "captions":
        # "train": seen attribute combinations; "heldout": only the held-out ones; any other
        # split name: fresh images of the seen combinations (another seed).
        return data_lib.CaptionedShapes(
            data_config.size, data_config.resolution, seed=0 if split == "train" else 1,
            split=split if split in ("train", "heldout", "all") else "train")
    return data_lib.Toy2D(data_config.toy_kind, data_config.size,
                          seed=0 if split == "train" else 1)


def data_shape(source):
    """(shape of one model input, number of classes or None)."""
    record = data_lib.ToModelInputs().map(source[0])  # (the text length does not matter here)
    return record["x"].shape, getattr(source, "num_classes", None)


def build_model(model_config, example_shape, num_classes=None) -> Any:
    dtype = jnp.bfloat16 if model_config.dtype == "bfloat16" else jnp.float32
    common = dict(num_classes=num_classes, noise_scale=model_config.noise_scale, dtype=dtype)
    for key in ("context_dim", "pooled_dim", "head_dim"):
        if model_config[key] < 0:
            raise ConfigError(f"config.model.{key} must be >= 0 (0 = off), got "
                              f"{model_config[key]!r}")
    if model_config.transformer_depth < 1:
        raise ConfigError(f"config.model.transformer_depth must be >= 1, got "
                          f"{model_config.transformer_depth!r}")
    if model_config.name == "mlp":
        if len(example_shape) != 1:
            raise ConfigError(f"config.model.name='mlp' needs vector data, got {example_shape}")
        if model_config.context_dim or model_config.pooled_dim:
            raise ConfigError("config.model.name='mlp' has no text conditioning; set "
                              "config.model.context_dim and pooled_dim to 0 or use unet / dit")
        return models.MLP(hidden=model_config.hidden, depth=model_config.depth,
                          dropout=model_config.dropout, **common)
    # 0 means off; the models take None, which creates no text-conditioning parameters at all.
    common.update(context_dim=model_config.context_dim or None,
                  pooled_dim=model_config.pooled_dim or None, remat=model_config.remat,
                  attention=model_config.attention)
    if len(example_shape) != 3:
        raise ConfigError(f"config.model.name={model_config.name!r} needs images, got data of "
                          f"shape {example_shape}; use model.name='mlp'")
    if model_config.name == "unet":
        levels = len(model_config.channel_mult)
        if example_shape[0] % 2 ** (levels - 1):
            raise ConfigError(f"config.model.channel_mult has {levels} levels; the image size "
                              f"{example_shape[0]} must be divisible by {2 ** (levels - 1)}")
        groups = min(32, model_config.channels)
        return models.UNet(channels=model_config.channels,
                           channel_mult=tuple(model_config.channel_mult),
                           num_res_blocks=model_config.num_res_blocks,
                           attention_resolutions=tuple(model_config.attention_resolutions),
                           num_heads=model_config.num_heads, dropout=model_config.dropout,
                           scale_shift=model_config.scale_shift, num_groups=groups,
                           head_dim=model_config.head_dim or None,
                           mid_attention=model_config.mid_attention,
                           transformer_depth=model_config.transformer_depth, **common)
    return models.dit(model_config.dit_size, model_config.patch_size, **common)



def build_denoiser(config, example_shape, num_classes=None) -> Any:
    """The network of a whole config: :func:`build_model`, wrapped with a text encoder
    (:class:`~diffusion_jax.models.TextConditioned`) when the data is captioned."""
    if config.data.name != "captions":
        return build_model(config.model, example_shape, num_classes)
    from diffusion_jax import text as text_lib

    t = config.text
    for key in ("context_dim", "pooled_dim"):
        if config.model[key] not in (0, t.width):
            raise ConfigError(f"config.model.{key}={config.model[key]} differs from "
                              f"config.text.width={t.width}; leave it 0 for captioned data "
                              "(it follows the text encoder)")
    model_config = config.model.copy_and_resolve_references()
    with model_config.unlocked():
        model_config.context_dim = model_config.pooled_dim = t.width
    if model_config.name == "mlp":
        raise ConfigError("captioned data needs model.name='unet' or 'dit'")
    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
    encoder = models.TextEncoder(max_length=t.max_length, width=t.width, depth=t.depth,
                                   num_heads=t.num_heads, dtype=dtype,
                                   attention=config.model.attention)
    return models.TextConditioned(build_model(model_config, example_shape, num_classes),
                                  encoder, freeze_text=t.freeze)
