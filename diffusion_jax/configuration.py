"""From a config to objects: loading, validation with clear messages, and builders.

Builders cover the data source, model, schedule and prediction target. Everything here runs
before any compilation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax import data as data_lib
from diffusion_jax.config_checks import (ConfigError, check_controlnet, check_editing,
                                         check_lora, check_sets, comma_list)
from diffusion_jax.data import controls
from diffusion_jax import checkpoints as ckpt_lib
from diffusion_jax import defaults, losses, modalities, parameterization, pretrained_runs
from diffusion_jax import samplers, schedules
from diffusion_jax import models
from diffusion_jax import text as text_lib
from diffusion_jax.models import registry

__all__ = ["ConfigError", "SOURCES", "NUMERIC", "check_number", "load_config", "validate",
           "build_source", "build_model", "build_denoiser", "build_schedule",
           "build_parameterization", "data_shape", "caption_tokenizer", "null_caption",
           "encode_captions", "data_kind", "editing_strength", "comma_list"]


def _procedural_seed(split):
    return 0 if split == "train" else 1  # any other split: fresh examples


def _captioned_shapes(d, split):
    # "train": seen attribute combinations; "heldout": only the held-out ones; any other split
    # name: fresh images of the seen combinations (another seed).
    return data_lib.CaptionedShapes(d.size, d.resolution, seed=_procedural_seed(split),
                                    split=split if split in ("train", "heldout", "all")
                                    else "train", max_objects=d.max_objects, heldout=d.heldout)


def _image_folder(d, split):
    del split  # a folder has no splits: every split reads all of it
    source = data_lib.ImageFolder(d.path, d.resolution, captions=d.captions,
                                  log=print if jax.process_index() == 0 else None)
    if d.captions != "none" and not source.has_captions:
        raise data_lib.DataError(
            f"config.data.captions={d.captions!r} trains a text-conditioned model, but {d.path} "
            "has no captions (a metadata.jsonl, or a .txt beside each image); add them or set "
            "config.data.captions='none'")
    return source


def _tfds(d, split):
    source = data_lib.TFDSSource(d.tfds_name, split, data_dir=d.data_dir or None,
                                 image_key=d.image_key,
                                 label_key=d.label_key if d.class_conditional else None)
    if d.resize:
        return data_lib.Resized(source, d.resolution)
    if None in source.image_shape[:2]:
        raise data_lib.DataError(
            f"TFDS dataset {d.tfds_name!r} has images of different sizes (feature "
            f"{d.image_key!r}: shape {source.image_shape}); set config.data.resize=True to resize "
            f"and centre-crop them to config.data.resolution={d.resolution}")
    return source


def text_data(name: str, captions: str) -> bool:
    """Whether data ``config.data.name=name`` with ``config.data.captions=captions`` has captions."""
    return name == "captions" or (name in modalities.TEXT_SOURCES and captions != "none")


def is_text_model(config) -> bool:
    """Whether the run's data is captioned, so that the model reads text."""
    return text_data(config.data.name, config.data.captions)


# Data sources by ``config.data.name``: ``(config.data, split) -> source``. A new dataset is one
# entry here, beside its source class in diffusion_jax/data/.
SOURCES = {
    "fashion_mnist": lambda d, split: data_lib.FashionMNIST(split, path=d.path or None),
    "tfds": _tfds,
    "shapes": lambda d, split: data_lib.Shapes(d.size, d.resolution,
                                               seed=_procedural_seed(split)),
    "captions": _captioned_shapes,
    "toy2d": lambda d, split: data_lib.Toy2D(d.toy_kind, d.size, seed=_procedural_seed(split)),
    "folder": _image_folder,
    **modalities.SOURCES,  # tones, audio_folder, moving_shapes, video_folder
}

_CHOICES = {
    "sized_for": ("any", "accelerator"),
    "task": ("diffusion", "autoencoder"),
    "data.captions": data_lib.ImageFolder.CAPTION_MODES,
    "data.heldout": data_lib.CaptionedShapes.HELDOUT_CHOICES,
    "data.resize": (False, True),
    "autoencoder.reconstruction": ("l1", "l2"),
    "data.toy_kind": data_lib.Toy2D.KINDS,
    "model.dtype": ("float32", "bfloat16"),
    "diffusion.schedule": tuple(schedules.SCHEDULES),
    "diffusion.target": parameterization.TARGETS,
    "diffusion.weighting": losses.WEIGHTINGS,
    "diffusion.time_sampling": losses.TIME_SAMPLING,
    "sampling.method": samplers.METHODS + ("scheduler",),
    "sampling.grid": samplers.GRIDS + ("scheduler",),
    "pretrained.param_dtype": ("float32", "bfloat16"),
    "evaluation.feature_extractor": ("classifier", "inception"),
    "mesh.train_step": ("jit", "shard_map"),
    "mesh.state_layouts": ("auto", "default"),
    "model.dropout_rng": ("threefry", "rbg"),
    "model.attention": models.ATTENTION_IMPLEMENTATIONS,
    "training.on_corrupt_checkpoint": ckpt_lib.ON_CORRUPT_CHOICES,
    "controlnet.control": ("",) + controls.CONTROL_TYPES,
    "sampling.control_type": ("", "canny"),
}
# Every numeric key: its type and its range (a rule of :data:`RULES`). Tuples are checked element
# by element. The model families' own keys are ranged by their records (models/registry.py).
NUMERIC = {
    "seed": (int, ">= 0"),
    "data.size": (int, "> 0"), "data.resolution": (int, "> 0"), "data.batch_size": (int, "> 0"),
    "data.sample_rate": (int, "> 0"), "data.clip_length": (int, "> 0"),
    "data.audio_channels": (int, "in [1, 2]"), "data.frames": (int, "> 0"),
    "data.frame_stride": (int, "> 0"), "data.fps": (int, "> 0"),
    "data.worker_count": (int, ">= 0"), "data.max_objects": (int, "in [1, 4]"),
    "data.num_points": (int, "> 0"), "data.max_atoms": (int, "> 0"),
    "data.max_heavy_atoms": (int, "> 0"), "data.feature_scale": (float, "> 0"),
    "model.dropout": (float, "in [0, 1)"), "model.noise_scale": (float, "> 0"),
    "model.context_dim": (int, ">= 0"), "model.pooled_dim": (int, ">= 0"),
    "diffusion.sigma_data": (float, "> 0"), "diffusion.label_dropout": (float, "in [0, 1)"),
    "diffusion.caption_dropout": (float, "in [0, 1)"),
    "training.num_steps": (int, "> 0"), "training.learning_rate": (float, "> 0"),
    "training.warmup_steps": (int, ">= 0"), "training.grad_clip": (float, ">= 0 (0 = off)"),
    "training.weight_decay": (float, ">= 0"), "training.ema_decay": (float, "in [0, 1)"),
    "training.log_every": (int, "> 0"), "training.checkpoint_every": (int, "> 0"),
    "training.keep_checkpoints": (int, "> 0"), "training.sample_every": (int, ">= 0 (0 = off)"),
    "training.grad_accumulation": (int, "> 0"), "training.steps_per_call": (int, "> 0"),
    "training.prefetch": (int, "> 0"),
    "sampling.num_steps": (int, "> 0"), "sampling.num_samples": (int, "> 0"),
    "sampling.seed": (int, ">= 0"), "sampling.label": (int, ">= -1 (-1 = every class)"),
    "sampling.guidance_scale": (float, ">= 0"), "sampling.guidance_rescale": (float, "in [0, 1]"),
    "sampling.checkpoint_step": (int, ">= -1 (-1 = latest)"),
    "sampling.strength": (float, "-1 or in [0, 1] (-1 = 0.8 for image-to-image, 1 for "
                                 "inpainting)"),
    "sampling.jump_length": (int, "> 0"), "sampling.jump_n_sample": (int, "> 0 (1 = off)"),
    "autoencoder.block_out_channels": (int, "> 0"), "autoencoder.layers_per_block": (int, "> 0"),
    "autoencoder.latent_channels": (int, "> 0"), "autoencoder.norm_num_groups": (int, "> 0"),
    "autoencoder.kl_weight": (float, ">= 0"), "autoencoder.perceptual_weight": (float, ">= 0"),
    "autoencoder.disc_weight": (float, ">= 0 (0 = no discriminator)"),
    "autoencoder.disc_start": (int, ">= 0"), "autoencoder.disc_layers": (int, "> 0"),
    "autoencoder.disc_channels": (int, "> 0"),
    "latent.checkpoint_step": (int, ">= -1 (-1 = latest)"),
    "latent.scale": (float, ">= 0 (0 = from the autoencoder or the data)"),
    "latent.scale_batches": (int, "> 0"),
    "text.max_length": (int, ">= 2"), "text.width": (int, "> 0"), "text.depth": (int, "> 0"),
    "text.num_heads": (int, "> 0"),
    "evaluation.num_samples": (int, "> 0"), "evaluation.batch_size": (int, "> 0"),
    "evaluation.precision_recall_k": (int, "> 0"),
    "evaluation.likelihood_examples": (int, ">= 0 (0 = off)"),
    "evaluation.likelihood_steps": (int, "> 0"), "evaluation.guidance_scales": (float, ">= 0"),
    "classifier.num_steps": (int, "> 0"), "classifier.batch_size": (int, "> 0"),
    "classifier.learning_rate": (float, "> 0"), "classifier.width": (int, "> 0"),
    "classifier.feature_dim": (int, "> 0"),
    "mesh.data": (int, "-1 or >= 1 (-1 = the rest of the devices)"),
    "mesh.fsdp": (int, "-1 or >= 1 (-1 = the rest of the devices)"),
    "distributed.num_processes": (int, "-1 or >= 1 (-1 = found by JAX)"),
    "distributed.process_id": (int, ">= -1 (-1 = found by JAX)"),
    "distributed.timeout_s": (int, "> 0"),
    "pretrained.height": (int, ">= 0 (0 = the model's size)"),
    "pretrained.width": (int, ">= 0 (0 = the model's size)"),
    "pretrained.batch_size": (int, "> 0"),
    "pretrained.lora_scales": (float, "any number (a LoRA's strength; negative inverts it)"),
    "lora.rank": (int, ">= 0 (0 = off)"), "lora.alpha": (float, ">= 0 (0 = rank)"),
    "lora.base_step": (int, ">= -1 (-1 = latest)"),
    "controlnet.base_step": (int, ">= -1 (-1 = latest)"),
    "controlnet.embedding_channels": (int, "> 0"),
    "sampling.control_scales": (float, "any number (a ControlNet's conditioning scale)"),
    "sampling.control_start": (float, "in [0, 1]"), "sampling.control_end": (float, "in [0, 1]"),
}
# The ranges, by the words that open their description.
RULES = {
    "> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, ">= 2": lambda v: v >= 2,
    ">= -1": lambda v: v >= -1, "-1 or >= 1": lambda v: v == -1 or v >= 1,
    "in [0, 1)": lambda v: 0 <= v < 1, "in [0, 1]": lambda v: 0 <= v <= 1,
    "in [1, 4]": lambda v: 1 <= v <= 4, "in [1, 2]": lambda v: 1 <= v <= 2,
    "-1 or in [0, 1]": lambda v: v == -1 or 0 <= v <= 1,
    "any number": lambda v: True,
}


def check_number(name: str, value, kind: type, rule: str) -> None:
    """Raise :class:`ConfigError` unless ``value`` (or each element of a tuple) fits ``rule``.

    The value must also be a ``kind``: integers are accepted for float keys; booleans are not
    numbers here.
    """
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
        typed = (isinstance(v, (int, float)) if kind is float else isinstance(v, int)) and \
            not isinstance(v, bool)
        test = next(t for words, t in RULES.items() if rule.startswith(words))
        if not typed:
            what = "an integer" if kind is int else "a number"
            raise ConfigError(f"config.{name} must be {what} ({rule}), got {value!r}")
        if not test(v) or v != v:  # (NaN fails every comparison but this one)
            raise ConfigError(f"config.{name} must be {rule}, got {value!r}")


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
    """Check ``config.distributed`` alone.

    ``main.py`` does so before joining the other processes, which must happen before anything
    else touches the devices."""
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


# Keys of config.model that moved into their family's sub-group.
_MOVED_MODEL_KEYS = {
    **{f"model.{key}": f"model.unet.{key}" for key in registry.get("unet").defaults()},
    "model.dit_size": "model.dit.size", "model.patch_size": "model.dit.patch_size",
    "model.hidden": "model.mlp.hidden", "model.depth": "model.mlp.depth",
}


def moved_key_hint(key: str) -> str:
    """Where a key of an earlier config layout lives now ("" when it did not move)."""
    if key not in _MOVED_MODEL_KEYS:
        return ""
    return (f"config.{key} is now config.{_MOVED_MODEL_KEYS[key]} (each model family has its "
            "own group of keys)")


def data_kind(config) -> str:
    """"audio", "video" or "image": what ``config.data.name``'s examples are.

    2-D toys count as "image": no editing key applies to them."""
    return _kind_of(config.data.name)


def _kind_of(data_name: str) -> str:
    return modalities.KINDS.get(data_name, "image")


def editing_strength(config) -> float:
    """``config.sampling.strength``, with -1 read as 0.8 or 1.0 (see below).

    0.8 for image-to-image, 1.0 for inpainting and image-to-video."""
    strength = config.sampling.strength
    if strength == -1:
        return 1.0 if config.sampling.mask_image or data_kind(config) == "video" else 0.8
    return float(strength)


def load_config(path: str):
    """The config that the file at ``path`` builds with ``get_config()``.

    A config file inside a package folder (one with ``__init__.py``, as ``configs/`` is) may
    import its siblings through that package (``from configs import fashion_mnist``), from any
    working directory. Raises :class:`ConfigError` for a missing or broken file.
    """
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    folder = os.path.dirname(path)
    root = os.path.dirname(folder) if os.path.exists(os.path.join(folder, "__init__.py")) \
        else folder
    name = "_diffusion_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    with _on_sys_path(root):
        spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    return module.get_config()


@contextlib.contextmanager
def _on_sys_path(folder):
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def validate(config, reference=None) -> None:
    """Check every key and value of ``config``; raise :class:`ConfigError` naming the first bad one.

    Keys are checked against ``reference`` (default: :func:`diffusion_jax.defaults.get_config`),
    values against their allowed choices and ranges, the model family's keys against its record
    in :mod:`diffusion_jax.models.registry`, and the diffusion components by building them.
    """
    reference = defaults.get_config() if reference is None else reference
    given = _flatten(config)
    _check_keys(given, _flatten(reference))
    _check_model_family(config)
    validate_distributed(config)  # (its own messages, before the generic ranges)
    _check_ranges(given)
    _check_combinations(given)
    _check_components(config)


def _check_keys(given, known):
    """Every key known and none missing; a key that moved names its new place."""
    unknown = sorted(set(given) - set(known))
    moved = [moved_key_hint(k) for k in unknown if moved_key_hint(k)]
    if moved:
        raise ConfigError("; ".join(moved))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; valid keys are listed in "
                          "diffusion_jax/defaults.py")
    missing = sorted(set(known) - set(given))
    if missing:
        raise ConfigError(f"config is missing key(s) {missing}; start presets from "
                          "diffusion_jax.defaults.get_config()")


def _check_model_family(config):
    """A registered family, and its own keys in their ranges."""
    if config.model.name not in registry.FAMILIES:
        raise ConfigError(f"config.model.name={config.model.name!r} is not one of "
                          f"{tuple(registry.FAMILIES)}")
    family = registry.get(config.model.name)
    for key, (kind, rule) in family.ranges.items():
        check_number(f"model.{family.name}.{key}", config.model[family.name][key], kind, rule)


def _check_ranges(given):
    """Each value among its choices or in its range."""
    if given["data.name"] not in SOURCES:  # looked up now: sources may be added at run time
        raise ConfigError(f"config.data.name={given['data.name']!r} is not one of "
                          f"{tuple(SOURCES)}")
    for key, choices in _CHOICES.items():
        if given[key] not in choices:
            raise ConfigError(f"config.{key}={given[key]!r} is not one of {tuple(choices)}")
    for key, (kind, rule) in NUMERIC.items():
        check_number(key, given[key], kind, rule)


def _check_combinations(given):
    """Values that must fit each other."""
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
    if given["evaluation.first_frame"] and given["data.name"] != "moving_shapes":
        raise ConfigError("config.evaluation.first_frame=True measures image-to-video on "
                          "moving shapes (data.name='moving_shapes'); this config's data is "
                          f"{given['data.name']!r}: set it to False")
    if given["text.width"] % given["text.num_heads"]:
        raise ConfigError(f"config.text.width={given['text.width']} must be divisible by "
                          f"config.text.num_heads={given['text.num_heads']}")
    text = text_data(given["data.name"], given["data.captions"])
    for key in ("sampling.method", "sampling.grid"):
        if given[key] == "scheduler" and not given["pretrained.path"]:
            raise ConfigError(f"config.{key}='scheduler' means the scheduler of a pretrained "
                              "model folder: set config.pretrained.path, or choose one of "
                              f"{tuple(_CHOICES[key][:-1])}")
    text = text or bool(given["pretrained.path"])
    check_editing(given, _kind_of(given["data.name"]))
    kind = _kind_of(given["data.name"])
    check_sets(given, kind, kind in modalities.SET_KINDS, registry.get(given["model.name"]).sets)
    check_lora(given)
    check_controlnet(given)
    if (given["sampling.prompt"] or given["sampling.negative_prompt"]) and not text:
        raise ConfigError("config.sampling.prompt needs a text-conditioned model "
                          "(data.name='captions', or 'folder', 'tones' or 'moving_shapes' with "
                          "data.captions); this config "
                          f"trains on {given['data.name']!r}")
    if given["task"] == "autoencoder" and given["autoencoder.disc_weight"] and (
            given["training.grad_accumulation"] > 1 or given["mesh.train_step"] == "shard_map"):
        raise ConfigError("an autoencoder with a discriminator (config.autoencoder.disc_weight > "
                          "0) weighs its GAN loss by gradient norms over the whole batch: use "
                          "training.grad_accumulation=1 and mesh.train_step='jit'")
    if given["latent.autoencoder"] and given["evaluation.likelihood_examples"]:
        raise ConfigError("config.evaluation.likelihood_examples (bits/dim) measures a pixel-space "
                          "model; a latent run's likelihood is of latents, not images: set it to 0")
    if given["latent.precomputed"] and not given["latent.autoencoder"]:
        raise ConfigError("config.latent.precomputed needs config.latent.autoencoder, the "
                          "autoencoder that encoded the latents")
    for name, what in (("folder", "image"), ("audio_folder", "audio"), ("video_folder", "video")):
        if given["data.name"] == name and not given["data.path"]:
            raise ConfigError(f"config.data.path must name the {what} folder when "
                              f"data.name={name!r}")
    if given["data.name"] in ("audio_folder", "video_folder") and given["data.captions"] != "none":
        raise ConfigError(f"config.data.captions={given['data.captions']!r}: a "
                          f"{given['data.name']} has no captions (its model is unconditional); "
                          "set config.data.captions='none'")
    if given["data.name"] == "tfds" and not given["data.tfds_name"]:
        raise ConfigError("config.data.tfds_name must name the dataset when data.name='tfds'")


def _check_components(config):
    """Schedule, target, loss and their parameters, checked by building them (no compiling)."""
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
    """The random-access data source named by ``config.data.name`` (see :data:`SOURCES`)."""
    return SOURCES[data_config.name](data_config, split or data_config.split)


def data_shape(source):
    """(shape of one model input, number of classes or None), once its first record is checked."""
    data_lib.check_source(source)
    record = data_lib.ToModelInputs().map(source[0])  # (the text length does not matter here)
    return record["x"].shape, getattr(source, "num_classes", None)


def build_model(model_config, example_shape, num_classes=None) -> Any:
    """The denoiser of ``config.model``: its family's network, built by the family's record."""
    try:
        family = registry.get(model_config.name)
    except ValueError as err:
        raise ConfigError(f"config.model.name: {err}") from err
    for key in ("context_dim", "pooled_dim"):
        if model_config[key] < 0:
            raise ConfigError(f"config.model.{key} must be >= 0 (0 = off), got "
                              f"{model_config[key]!r}")
    if not family.takes(len(example_shape)):
        fitting = tuple(f.name for f in registry.FAMILIES.values()  # (sets: check_sets)
                        if f.takes(len(example_shape)) and not f.sets)
        kinds = {1: "vectors", 2: "signals [length, channels]", 3: "images",
                 4: "videos [frames, height, width, channels]"}
        wanted = " or ".join(kinds[r] for r in sorted(kinds) if family.takes(r))
        raise ConfigError(f"config.model.name={family.name!r} takes {wanted}, not data of "
                          f"shape {tuple(example_shape)}; use model.name in {fitting}")
    if not family.text and (model_config.context_dim or model_config.pooled_dim):
        texts = tuple(f.name for f in registry.FAMILIES.values() if f.text)
        raise ConfigError(f"config.model.name={family.name!r} has no text conditioning; set "
                          f"config.model.context_dim and pooled_dim to 0 or use one of {texts}")
    group = model_config[family.name]
    try:
        family.check(group, tuple(example_shape))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    dtype = jnp.bfloat16 if model_config.dtype == "bfloat16" else jnp.float32
    # 0 means off; the models take None, which creates no text-conditioning parameters at all.
    common = dict(num_classes=num_classes, noise_scale=model_config.noise_scale, dtype=dtype,
                  dropout=model_config.dropout, context_dim=model_config.context_dim or None,
                  pooled_dim=model_config.pooled_dim or None, remat=model_config.remat,
                  attention=model_config.attention)
    return family.build(group, tuple(example_shape), common)


def caption_tokenizer(config):
    """``tokenize(texts) -> (tokens, mask)`` of the run's captions, or None for byte tokens.

    A run from a pretrained folder (``config.pretrained.path``) tokenizes with the folder's
    CLIP tokenizer; every other text model with :func:`diffusion_jax.text.encode` (None here)."""
    if not config.pretrained.path:
        return None
    try:
        return pretrained_runs.tokenizer(config.pretrained.path).token_inputs
    except (OSError, ValueError) as err:
        raise ConfigError(f"config.pretrained.path: {err}") from err


def null_caption(config):
    """The empty caption's ``(tokens, mask)`` ([1, length] each) for the run's tokenizer."""
    tokenize = caption_tokenizer(config)
    return text_lib.null_text(config.text.max_length) if tokenize is None else tokenize([""])


def encode_captions(config, texts):
    """``(tokens int32 [n, length], mask bool)`` of ``texts`` for the run's model."""
    tokenize = caption_tokenizer(config)
    return (text_lib.encode(list(texts), config.text.max_length) if tokenize is None
            else tokenize(list(texts)))


def build_denoiser(config, example_shape, num_classes=None) -> Any:
    """The network of a whole config, with a text encoder when the data is captioned.

    That is :func:`build_model`, wrapped in :class:`~diffusion_jax.models.TextConditioned` for
    captioned data; for a run from a pretrained folder (``config.pretrained.path``), the
    folder's UNet and CLIP text encoder (:mod:`diffusion_jax.pretrained_runs`).
    """
    if config.pretrained.path:
        if not is_text_model(config):
            raise ConfigError("a run from config.pretrained.path trains a text-to-image model: "
                              "give it captioned data (data.name='captions', or 'folder' with "
                              "data.captions)")
        if num_classes is not None:
            raise ConfigError("a Stable Diffusion UNet takes no class labels: set "
                              "config.data.class_conditional=False")
        try:
            pretrained_runs.check(config, build_schedule(config))
            model = pretrained_runs.build_denoiser(config)
        except (OSError, ValueError) as err:
            raise ConfigError(f"config.pretrained.path: {err}") from err
        if tuple(example_shape[-1:]) != (model.denoiser.out_channels,):
            raise ConfigError(f"the pretrained UNet takes {model.denoiser.out_channels} latent "
                              f"channels; the data's latents have shape {tuple(example_shape)}")
        return model
    if not is_text_model(config):
        return build_model(config.model, example_shape, num_classes)
    t = config.text
    for key in ("context_dim", "pooled_dim"):
        if config.model[key] not in (0, t.width):
            raise ConfigError(f"config.model.{key}={config.model[key]} differs from "
                              f"config.text.width={t.width}; leave it 0 for captioned data "
                              "(it follows the text encoder)")
    model_config = config.model.copy_and_resolve_references()
    with model_config.unlocked():
        model_config.context_dim = model_config.pooled_dim = t.width
    if not registry.get(model_config.name).text:
        texts = tuple(f.name for f in registry.FAMILIES.values() if f.text)
        raise ConfigError(f"captioned data needs a model that reads text: model.name in {texts}")
    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
    encoder = models.TextEncoder(max_length=t.max_length, width=t.width, depth=t.depth,
                                 num_heads=t.num_heads, dtype=dtype,
                                 attention=config.model.attention)
    return models.TextConditioned(build_model(model_config, example_shape, num_classes),
                                  encoder, freeze_text=t.freeze)
