"""Checks of config keys that combine groups: editing inputs, LoRA, ControlNet and set runs.

:func:`diffusion_jax.configuration.validate` calls them on the flattened config (``given``:
dotted key -> value) after every value is in its range. :class:`ConfigError` lives here, so that
both modules raise the same error.
"""

from __future__ import annotations

import os

from diffusion_jax.data import controls, molecule_files

__all__ = ["ConfigError", "check_editing", "check_lora", "check_controlnet", "check_sets",
           "comma_list"]


class ConfigError(ValueError):
    """A config key is unknown or has an invalid value; the message names the key."""


def check_editing(given: dict, kind: str = "image") -> None:
    """The editing keys: files that exist, a mask only with an image, jumps only to inpaint.

    ``kind`` is what the data's examples are ("image", "audio" or "video"): a video run's
    init_image is its clips' first frame (image-to-video, inpainting in time), so it takes
    jumps and no mask; an audio run takes no image at all."""
    for key in ("sampling.init_image", "sampling.mask_image"):
        path = given[key]
        if path and not os.path.isfile(path):
            raise ConfigError(f"config.{key}={path!r} is not a file: give the path of a PNG or "
                              "JPEG image")
    _each_path(given, "pretrained.lora", os.path.exists, "does not exist",
               "give LoRA .safetensors files (or folders holding "
               "pytorch_lora_weights.safetensors), comma-separated")
    if given["pretrained.lora"] and not given["pretrained.path"]:
        raise ConfigError("config.pretrained.lora adapts a Stable Diffusion folder: set "
                          "config.pretrained.path")
    if given["sampling.init_image"] and kind not in ("image", "video"):
        raise ConfigError(f"config.sampling.init_image edits images and starts videos; "
                          f"data.name={given['data.name']!r} is {kind}: leave it empty")
    if given["sampling.mask_image"] and kind == "video":
        raise ConfigError("config.sampling.mask_image repaints part of an image; a video run's "
                          "init_image is its clips' first frame and the other frames are "
                          "painted: leave mask_image empty")
    if given["sampling.mask_image"] and not given["sampling.init_image"]:
        raise ConfigError("config.sampling.mask_image needs config.sampling.init_image: the "
                          "image whose masked region is repainted")
    inpainting = given["sampling.mask_image"] or (kind == "video" and given["sampling.init_image"])
    if given["sampling.jump_n_sample"] > 1 and not inpainting:
        raise ConfigError("config.sampling.jump_n_sample > 1 (RePaint's resampling) is for "
                          "inpainting: set config.sampling.mask_image (or, for a video run, "
                          "init_image: the first frame), or jump_n_sample=1")
    if given["sampling.strength"] != -1 and not given["sampling.init_image"]:
        raise ConfigError("config.sampling.strength applies to an input image: set "
                          "config.sampling.init_image (or leave strength at -1)")


def check_lora(given: dict) -> None:
    """An adapter run's needs: one base, the jit train step, a denoiser, gradients to adapters."""
    if not given["lora.rank"]:
        return
    if given["task"] != "diffusion":
        raise ConfigError("config.lora.rank > 0 trains adapters of a denoiser; an autoencoder "
                          "run (task='autoencoder') trains its whole network: set lora.rank=0")
    _check_base(given, "lora", "config.lora.rank > 0 trains adapters", "adapt")
    if given["mesh.train_step"] == "shard_map":
        raise ConfigError("config.lora.rank > 0 computes gradients with "
                          "mesh.train_step='jit' (the adapters are small; the frozen base is "
                          "still split over fsdp)")
    if given["lora.text_encoder"] and given["text.freeze"]:
        raise ConfigError("config.lora.text_encoder=True puts adapters on the text encoder, but "
                          "config.text.freeze=True stops gradients at its output: set "
                          "text.freeze=False (the encoder's own weights stay frozen)")


def check_controlnet(given: dict) -> None:
    """A ControlNet run's needs, and the control images of sampling."""
    _each_path(given, "sampling.control_image", os.path.isfile, "is not a file",
               "give PNG or JPEG control images, comma-separated, one per ControlNet")
    _each_path(given, "pretrained.controlnet", os.path.isdir, "is not a directory",
               "give diffusers ControlNetModel folders (config.json and "
               "diffusion_pytorch_model.safetensors), comma-separated")
    if given["pretrained.controlnet"] and not given["pretrained.path"]:
        raise ConfigError("config.pretrained.controlnet guides a Stable Diffusion folder: set "
                          "config.pretrained.path")
    if not given["sampling.control_start"] < given["sampling.control_end"]:
        raise ConfigError(f"config.sampling.control_start={given['sampling.control_start']} "
                          f"must be below control_end={given['sampling.control_end']} (the "
                          "fraction of the steps over which the control acts)")
    if given["sampling.control_type"] and not given["sampling.control_image"]:
        raise ConfigError("config.sampling.control_type computes control maps from "
                          "config.sampling.control_image: set it, or leave control_type ''")
    control = given["controlnet.control"]
    for key, off in (("controlnet.base", ""), ("controlnet.base_step", -1),
                     ("controlnet.embedding_channels", ())):
        if given[key] != off and not control:
            raise ConfigError(f"config.{key} is a setting of a ControlNet run: set "
                              f"config.controlnet.control to one of {controls.CONTROL_TYPES}, "
                              f"or leave {key} at {off!r}")
    count = 1 if control else len(comma_list(given["pretrained.controlnet"]))
    for key, off in (("sampling.control_image", ""), ("sampling.control_type", ""),
                     ("sampling.control_scales", ()), ("sampling.control_start", 0.0),
                     ("sampling.control_end", 1.0)):
        if given[key] != off and not count:
            raise ConfigError(f"config.{key} applies to ControlNets: this config has none (a "
                              "ControlNet run sets config.controlnet.control; a Stable Diffusion "
                              f"folder takes config.pretrained.controlnet); leave it at {off!r}")
    scales = len(given["sampling.control_scales"])
    if scales not in (0, count):
        raise ConfigError(f"config.sampling.control_scales has {scales} values for {count} "
                          "ControlNet(s): give one per ControlNet, or () for 1 each")
    images = len(comma_list(given["sampling.control_image"]))
    if images not in (0, count):
        raise ConfigError(f"config.sampling.control_image names {images} images for {count} "
                          "ControlNet(s): give one per ControlNet, comma-separated")
    if given["pretrained.controlnet"] and not images:
        raise ConfigError("config.pretrained.controlnet needs its control images: set "
                          "config.sampling.control_image, one per ControlNet")
    if not control:
        return
    if given["task"] != "diffusion":
        raise ConfigError("config.controlnet.control trains a ControlNet of a denoiser; an "
                          "autoencoder run (task='autoencoder') cannot have one: set it to ''")
    if given["lora.rank"]:
        raise ConfigError("config.controlnet.control and config.lora.rank > 0 both train on a "
                          "frozen model: train the ControlNet and the LoRA in separate runs")
    _check_base(given, "controlnet", "config.controlnet.control trains a ControlNet", "guide")
    if given["mesh.train_step"] == "shard_map":
        raise ConfigError("a ControlNet run computes gradients with mesh.train_step='jit' (the "
                          "frozen base is still split over fsdp)")
    if given["latent.precomputed"]:
        raise ConfigError("a ControlNet run computes each control image from the training "
                          "image, which precomputed latents no longer hold: set "
                          "config.latent.precomputed=False")


def check_sets(given: dict, kind: str, sets: bool, set_family: bool) -> None:
    """Sets of points (point clouds, molecules) and the set networks go together, and only so.

    ``kind`` is what the data's examples are and ``sets`` whether they are sets of 3-D points
    (:data:`diffusion_jax.modalities.SET_KINDS`); ``set_family`` whether ``model.name`` is a
    family of set networks (``egnn``, ``point_transformer``)."""
    if sets and not set_family:
        raise ConfigError(f"data.name={given['data.name']!r} gives sets of 3-D points; its "
                          "denoiser must be a set network: config.model.name='egnn' (E(3)-"
                          "equivariant) or 'point_transformer'")
    if set_family and not sets:
        raise ConfigError(f"config.model.name={given['model.name']!r} denoises sets of 3-D "
                          f"points; data.name={given['data.name']!r} is {kind} data: use "
                          "data.name='shape_points', 'molecules' or 'molecule_folder'")
    elements = comma_list(given["data.elements"])
    unknown = [e for e in elements if e not in molecule_files.ATOMIC_NUMBERS]
    if not elements or unknown or len(set(elements)) != len(elements):
        raise ConfigError(f"config.data.elements={given['data.elements']!r} must name each "
                          "element once by its symbol, comma separated (e.g. 'H,C,N,O,F')"
                          + (f"; {', '.join(map(repr, unknown))} is not one" if unknown else ""))
    heavy, atoms = given["data.max_heavy_atoms"], given["data.max_atoms"]
    if given["data.name"] == "molecules" and heavy > atoms:
        raise ConfigError(f"config.data.max_heavy_atoms={given['data.max_heavy_atoms']} is more "
                          f"than config.data.max_atoms={given['data.max_atoms']} (all atoms, "
                          "hydrogens included)")


def _each_path(given: dict, key: str, test, wrong: str, fix: str) -> None:
    """Raise unless every path of the comma-separated ``config.key`` passes ``test``."""
    for path in comma_list(given[key]):
        if not test(path):
            raise ConfigError(f"config.{key} names {path!r}, which {wrong}: {fix}")


def _check_base(given: dict, group: str, what: str, verb: str) -> None:
    """A run on a frozen model: exactly one base, and a base run's workdir that exists.

    The base is ``config.<group>.base`` or ``config.pretrained.path``."""
    base = given[f"{group}.base"]
    if bool(base) == bool(given["pretrained.path"]):
        raise ConfigError(f"{what} of a frozen model: give its weights with config.{group}.base "
                          "(a trained run's workdir) or config.pretrained.path (a Stable "
                          "Diffusion folder), one of them")
    if base and not os.path.isdir(base):
        raise ConfigError(f"config.{group}.base={base!r} is not a directory: give the workdir "
                          f"of the trained run to {verb}")


def comma_list(value: str) -> list:
    """The non-empty, stripped parts of a comma-separated config string."""
    return [part.strip() for part in value.split(",") if part.strip()]
