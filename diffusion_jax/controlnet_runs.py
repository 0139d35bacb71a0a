"""Runs that train a ControlNet of a frozen model (``config.controlnet.control`` set).

The base model comes from a run's workdir (``config.controlnet.base``: its checkpoint, EMA
parameters) or from a Stable Diffusion folder (``config.pretrained.path``). Its UNet (or DiT)
is wrapped in a :class:`~diffusion_jax.models.controlnet.ControlledUNet` with one
:class:`~diffusion_jax.models.controlnet.ControlNet` (:class:`~diffusion_jax.models.controlnet.\
DiTControlNet`), which starts as a copy of the UNet's encoder and middle block (the DiT's first
half) with zero-initialised outputs, so the run starts exactly at the base model.
As for LoRA runs (:mod:`diffusion_jax.lora_runs`), the train state's ``params`` are the
ControlNet's, its ``frozen`` the base's (held once, not checkpointed, read again on resuming from
the base step ``WORKDIR/controlnet.json`` records), and ``compose(frozen, params)`` the wrapped
model's parameters. Each training image's control map (``config.controlnet.control``) comes with
the batch as ``control`` (:class:`diffusion_jax.data.controls.WithControl`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from diffusion_jax import configuration, train_state
from diffusion_jax.data import controls
from diffusion_jax.models.clip_conditioned import CLIPConditioned
from diffusion_jax.models.controlnet import ControlledUNet, controlnet_for, init_from_base
from diffusion_jax.models.text_conditioned import TextConditioned
from diffusion_jax.models.dit import DiT
from diffusion_jax.models.unet import UNet

__all__ = ["enabled", "wrap_model", "base_model", "control_shape", "with_control", "make_state",
           "abstract_state", "fingerprint", "Compose", "CONTROLNET_FILE", "OFF_FINGERPRINT"]

CONTROLNET_FILE = "controlnet.json"  # in the run's workdir: which base (folder or run, step)

_WRAPPERS = (TextConditioned, CLIPConditioned)


def enabled(config) -> bool:
    """Whether ``config`` trains a ControlNet of a frozen model."""
    return bool(config.controlnet.control)


def wrap_model(config, model, control_factor: int):
    """``model`` with its UNet guided by a fresh ControlNet.

    The ControlNet reads control images ``control_factor`` times the denoiser's input size (a
    latent run's autoencoder factor; 1 in pixel space)."""
    denoiser = model.denoiser if isinstance(model, _WRAPPERS) else model
    if not isinstance(denoiser, (UNet, DiT)):
        raise configuration.ConfigError(
            f"config.controlnet.control trains a ControlNet, a copy of a UNet's or DiT's "
            f"encoder; this run's denoiser is a {type(denoiser).__name__}: use "
            "config.model.name='unet' or 'dit'")
    widths = tuple(config.controlnet.embedding_channels) or None
    if control_factor < 1 or control_factor & (control_factor - 1):
        raise configuration.ConfigError(
            f"a ControlNet's control images are a power of 2 times the denoiser's input size; "
            f"this run's images are {control_factor}x its latents (config.latent.autoencoder)")
    if widths is not None and 2 ** (len(widths) - 1) != control_factor:
        raise configuration.ConfigError(
            f"config.controlnet.embedding_channels={widths} has {len(widths) - 1} stride-2 "
            f"stages, but the control images are {control_factor}x the denoiser's input size: "
            f"give {control_factor.bit_length()} widths (or () to choose them)")
    controlled = ControlledUNet(denoiser, (controlnet_for(denoiser, factor=control_factor,
                                                          embedding_channels=widths),))
    return model.clone(denoiser=controlled) if isinstance(model, _WRAPPERS) else controlled


def base_model(model):
    """The frozen base of a model :func:`wrap_model` made (any other model is returned)."""
    if isinstance(model, _WRAPPERS) and isinstance(model.denoiser, ControlledUNet):
        return model.clone(denoiser=model.denoiser.unet)
    return model.unet if isinstance(model, ControlledUNet) else model


def _controlled(model) -> ControlledUNet:
    return model.denoiser if isinstance(model, _WRAPPERS) else model


def control_shape(model, example_shape) -> tuple:
    """The shape [H, W, C] of one control image of a :func:`wrap_model` model.

    Its denoiser takes inputs of ``example_shape``."""
    controlnet = _controlled(model).controlnets[0]
    f = controlnet.control_factor
    return (example_shape[0] * f, example_shape[1] * f, controlnet.control_channels)


@dataclasses.dataclass(frozen=True)
class Compose:
    """``compose(frozen, params)``: the wrapped model's parameters from the base's and others.

    The others are the ControlNet's; a train state's static ``compose``."""

    wrapped: bool  # the base's parameters are {"denoiser": ..., "encoder": ...}

    def __call__(self, frozen, params):
        if not self.wrapped:
            return {"unet": frozen, "controlnets_0": params}
        return {**frozen, "denoiser": {"unet": frozen["denoiser"], "controlnets_0": params}}


def _init_controlnet(model, example_shape, base_params, key):
    """The ControlNet's parameters: its own layers initialised, the shared ones the base's."""
    x = jnp.zeros((1,) + tuple(example_shape), jnp.float32)
    control = jnp.zeros((1,) + control_shape(model, example_shape), jnp.float32)
    params = model.init(key, x, jnp.zeros((1,), jnp.float32), control=control)["params"]
    wrapped = isinstance(model, _WRAPPERS)
    return init_from_base(params["denoiser"]["controlnets_0"] if wrapped
                          else params["controlnets_0"],
                          base_params["denoiser"] if wrapped else base_params)


def make_state(config, model, example_shape, optimizer, base):
    """The first ControlNet state around ``base`` (jit-able: arrays in, arrays out)."""
    key_init, _, key_rng = jax.random.split(
        jax.random.fold_in(jax.random.key(config.seed), 0xC0A7), 3)
    params = _init_controlnet(model, example_shape, base, key_init)
    return train_state.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        ema_params=jax.tree_util.tree_map(jnp.copy, params), opt_state=optimizer.init(params),
        rng=jax.random.key_data(key_rng), frozen=base,
        compose=Compose(isinstance(model, _WRAPPERS)))


def abstract_state(config, model, optimizer, example_shape, num_classes):
    """The shapes of a ControlNet run's train state (base included), nothing allocated."""
    base = train_state.abstract_train_state(base_model(model), optimizer, example_shape,
                                            num_classes, config.seed).params
    return jax.eval_shape(functools.partial(make_state, config, model, example_shape,
                                            optimizer), base)


# What checkpoints of runs without a ControlNet record (and those written before ControlNets).
OFF_FINGERPRINT = {"control": "", "embedding_channels": []}


def fingerprint(config) -> dict:
    """What a ControlNet run's checkpoints record of its ControlNet.

    Its encoder's widths follow from these and the data's shape, which checkpoints record too."""
    return {"control": config.controlnet.control,
            "embedding_channels": list(config.controlnet.embedding_channels)}


def with_control(config, source):
    """``source`` whose records also hold ``control``, their image's control map.

    The map is ``config.controlnet.control``'s (uint8 [H, W, 3])."""
    try:
        return controls.WithControl(source, config.controlnet.control)
    except ValueError as err:
        raise configuration.ConfigError(f"config.controlnet.control: {err}") from err
