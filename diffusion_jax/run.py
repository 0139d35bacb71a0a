"""A run from its config: the model, the device mesh, the checkpoints, and a restored state.

Training, generation, evaluation, ``main.py`` and the notebooks all load a run through here, so
they agree on what a config builds and on which checkpoints fit it.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional

import jax

from diffusion_jax import autoencoders
from diffusion_jax import checkpoints as ckpt_lib
from diffusion_jax import configuration, controlnet_runs, defaults, files, lora_runs, parallel
from diffusion_jax import pretrained_runs
from diffusion_jax import train_state, writers
from diffusion_jax import optimizer as optimizer_lib
from diffusion_jax.models import registry

__all__ = ["build", "build_mesh", "sampling_mesh", "has_checkpoints", "open_checkpoints", "model_fingerprint",
           "diffusion_fingerprint", "restore_run", "abstract_state", "initial_adapter_state",
           "attach_base", "read_run_config", "frozen_base"]


def build(config):
    """Validate ``config`` and build ``(source, model, example_shape, num_classes, optimizer)``.

    For an autoencoder run the model is the :class:`~diffusion_jax.autoencoder_training.\
AutoencoderTask` and there are no classes; for a latent-diffusion run ``example_shape`` is the
    shape of the autoencoder's latents of the data's images, which the denoiser works on.
    """
    configuration.validate(config)
    source = configuration.build_source(config.data)
    if controlnet_runs.enabled(config):  # each record's control map, from its image
        source = controlnet_runs.with_control(config, source)
    example_shape, num_classes = configuration.data_shape(source)
    image_shape = tuple(example_shape)
    if not config.data.class_conditional:
        num_classes = None
    optimizer = optimizer_lib.optimizer_from_config(config)
    if config.task == "autoencoder":
        if config.latent.autoencoder:
            raise configuration.ConfigError(
                "config.latent.autoencoder is for diffusion runs; an autoencoder run "
                "(task='autoencoder') trains its own: leave it ''")
        model = autoencoders.build_task(config, tuple(example_shape))
        return source, model, tuple(example_shape), None, optimizer
    if config.latent.autoencoder:
        described = autoencoders.describe(config.latent.autoencoder, config.model.dtype)
        where = f"config.latent.autoencoder={config.latent.autoencoder!r}"
        example_shape = autoencoders.latent_shape(described.autoencoder, example_shape,
                                                  where=where)
        try:
            model = configuration.build_denoiser(config, example_shape, num_classes)
        except configuration.ConfigError as err:
            raise configuration.ConfigError(
                f"{err} (the denoiser works on the latents of {where}, of shape "
                f"{tuple(example_shape)})") from err
    else:
        model = configuration.build_denoiser(config, example_shape, num_classes)
    if controlnet_runs.enabled(config):
        model = controlnet_runs.wrap_model(config, model, image_shape[0] // example_shape[0])
    return source, model, tuple(example_shape), num_classes, optimizer


def build_mesh(config):
    """The device mesh of ``config.mesh``; checks that the global batch splits over it."""
    try:
        mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    except parallel.MeshError as err:
        raise configuration.ConfigError(str(err)) from err
    devices = mesh.devices.size
    if config.data.batch_size % devices:
        raise configuration.ConfigError(
            f"config.data.batch_size={config.data.batch_size} does not split over the "
            f"{devices} devices of the mesh; use a multiple of {devices}")
    micro = config.training.grad_accumulation
    if config.data.batch_size % (devices * micro):
        raise configuration.ConfigError(
            f"config.data.batch_size={config.data.batch_size} does not split into "
            f"config.training.grad_accumulation={micro} microbatches on each of the {devices} "
            f"devices; use a multiple of {devices * micro}")
    return mesh


def has_checkpoints(workdir: str) -> bool:
    """Whether ``workdir`` holds a run's checkpoint directory with anything in it."""
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and bool(os.listdir(directory))


def sampling_mesh(config):
    """The config's mesh when it fits these devices, else all devices data-parallel.

    A run trained on 8 devices generates on 1 (the training batch size plays no part here).
    """
    try:
        return parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    except parallel.MeshError:
        return parallel.make_mesh(-1, 1)


# Shared model settings that change how the network computes, not its parameters: a checkpoint
# restores under any value of these.
_NOT_IN_FINGERPRINT = ("dtype", "remat", "dropout_rng", "attention")


def model_fingerprint(model_config) -> dict:
    """What a checkpoint records of ``config.model``: the family, its keys, the shared ones.

    The keys are flat, under the names of the layout before families had their own groups
    (``dit_size``, ``channels``, ...), so checkpoints written then still compare equal.
    """
    family = registry.get(model_config.name)
    shared = {k: model_config[k] for k in registry.SHARED_KEYS if k not in _NOT_IN_FINGERPRINT}
    return {"name": family.name, **shared, **family.fingerprint(model_config[family.name])}


# The text encoder's settings a checkpoint of a captioned run records.
TEXT_FINGERPRINT = ("max_length", "width", "depth", "num_heads")


def diffusion_fingerprint(config) -> dict:
    """What a checkpoint records of the forward process its network was trained for.

    The schedule and its parameters (and EDM's sigma_data) decide what the network's input means
    at each noise level, so sampling or resuming under another one is refused.
    """
    d = config.diffusion
    out = {"schedule": d.schedule, "schedule_params": d.schedule_params.to_dict()}
    if d.target == "edm":
        out["sigma_data"] = d.sigma_data
    return out


def open_checkpoints(config, workdir, example_shape, num_classes, *,
                     log=None) -> ckpt_lib.Checkpoints:
    """The run's checkpoint manager in ``workdir/checkpoints``.

    Its fingerprint (model config, data shape, classes, target) must match for a checkpoint to
    be restored; keys a checkpoint lacks (settings added after it was written) take their
    default values.
    """
    if config.task == "autoencoder":
        return _open_autoencoder_checkpoints(config, workdir, example_shape, log)
    fingerprint = {"model": model_fingerprint(config.model), "data_shape": list(example_shape),
                   "num_classes": num_classes, "target": config.diffusion.target,
                   "diffusion": diffusion_fingerprint(config),
                   # What shapes the optimizer state: a warmup schedule counts steps, and
                   # clipping adds a stage (their values may change on resuming, not these).
                   "optimizer": {"warmup": config.training.warmup_steps > 0,
                                 "clipping": config.training.grad_clip > 0}}
    if configuration.is_text_model(config) and not config.pretrained.path:
        fingerprint["text"] = {k: config.text[k] for k in TEXT_FINGERPRINT}
    if config.pretrained.path:  # the folder's networks (their configs, not its location)
        fingerprint["pretrained"] = pretrained_runs.fingerprint(config.pretrained.path)
    # Always recorded, so that an adapter or ControlNet run's checkpoints are never read as
    # its base's (checkpoints written before either record nothing: read as "off").
    fingerprint["lora"] = lora_runs.fingerprint(config)
    fingerprint["controlnet"] = controlnet_runs.fingerprint(config)
    if config.latent.autoencoder:  # (pixel runs record nothing here, as before latents)
        fingerprint["latent"] = autoencoders.describe(config.latent.autoencoder).fingerprint()
    reference = defaults.get_config().model
    reference.name = config.model.name
    # Keys a checkpoint lacks: model keys added since take their defaults; the diffusion,
    # optimizer and text groups, which older checkpoints did not record, cannot be checked and
    # are taken as given.
    known = {"model": model_fingerprint(reference), "diffusion": fingerprint["diffusion"],
             "optimizer": fingerprint["optimizer"], "text": fingerprint.get("text"),
             "lora": lora_runs.OFF_FINGERPRINT, "controlnet": controlnet_runs.OFF_FINGERPRINT}
    return ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), fingerprint=fingerprint,
                                max_to_keep=config.training.keep_checkpoints,
                                fingerprint_defaults=known,
                                on_corrupt=config.training.on_corrupt_checkpoint,
                                log=log if parallel.is_writer() else writers.quiet)


# The autoencoder settings a checkpoint of an autoencoder run records.
AUTOENCODER_FINGERPRINT = ("block_out_channels", "layers_per_block", "latent_channels",
                           "norm_num_groups", "mid_attention", "disc_layers", "disc_channels")


def _open_autoencoder_checkpoints(config, workdir, example_shape, log):
    a = config.autoencoder
    fingerprint = {"task": "autoencoder", "data_shape": list(example_shape),
                   "autoencoder": {k: (list(a[k]) if isinstance(a[k], (tuple, list)) else a[k])
                                   for k in AUTOENCODER_FINGERPRINT},
                   "discriminator": a.disc_weight > 0,
                   "optimizer": {"warmup": config.training.warmup_steps > 0,
                                 "clipping": config.training.grad_clip > 0}}
    return ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), fingerprint=fingerprint,
                                max_to_keep=config.training.keep_checkpoints,
                                on_corrupt=config.training.on_corrupt_checkpoint,
                                log=log if parallel.is_writer() else writers.quiet)


def restore_run(config, workdir: str, *, step: Optional[int] = None):
    """Load a trained run: ``(state, model, example_shape, num_classes)``.

    The state comes from the checkpoint of ``step`` (default: the latest) in ``workdir``, laid
    out over :func:`sampling_mesh`. ``config`` must describe the same model and data as the run
    (``workdir/config.json`` holds the one it was trained with).
    """
    _, model, example_shape, num_classes, optimizer = build(config)
    checkpoints = open_checkpoints(config, workdir, example_shape, num_classes)
    mesh = sampling_mesh(config)
    try:
        if checkpoints.latest_step() is None:
            raise ckpt_lib.CheckpointError(
                f"no checkpoint in {checkpoints.directory}; train first with "
                f"`python main.py --config=... --workdir={workdir}`")
        abstract = abstract_state(config, model, optimizer, example_shape, num_classes)
        state = checkpoints.restore(train_state.with_shardings(abstract, mesh), step=step)
    finally:
        checkpoints.close()
    if frozen_base(config):  # the adapters' or ControlNet's frozen base, read again
        state = attach_base(config, workdir, state, model, example_shape, num_classes,
                                      abstract, mesh)
    return state, model, example_shape, num_classes


def abstract_state(config, model, optimizer, example_shape, num_classes):
    """The shapes of the run's train state (an adapter or ControlNet run's: with its base)."""
    if controlnet_runs.enabled(config):
        return controlnet_runs.abstract_state(config, model, optimizer, example_shape,
                                              num_classes)
    if lora_runs.enabled(config):
        return lora_runs.abstract_state(config, model, optimizer, example_shape, num_classes)
    return train_state.abstract_train_state(model, optimizer, example_shape, num_classes,
                                            config.seed)


# -- runs on a frozen base (LoRA adapters, ControlNets) ----------------------------------------


def frozen_base(config) -> bool:
    """Whether the run trains something on a frozen model (LoRA adapters or a ControlNet)."""
    return lora_runs.enabled(config) or controlnet_runs.enabled(config)


def _base_settings(config) -> tuple:
    """``(group name, base run, base step, record file)`` of a run on a frozen base."""
    if controlnet_runs.enabled(config):
        return ("controlnet", config.controlnet.base, config.controlnet.base_step,
                controlnet_runs.CONTROLNET_FILE)
    return "lora", config.lora.base, config.lora.base_step, lora_runs.LORA_FILE


def initial_adapter_state(config, workdir, model, optimizer, example_shape, num_classes,
                          abstract, mesh):
    """A fresh adapter (or ControlNet) state in its shardings over ``mesh``, its base read in."""
    shardings = parallel.state_shardings(mesh, abstract)
    base = _load_base(config, workdir, model, example_shape, num_classes, shardings.frozen,
                      fresh=True)
    if controlnet_runs.enabled(config):
        make = functools.partial(controlnet_runs.make_state, config, model, example_shape,
                                 optimizer)
    else:
        paths = lora_runs.adapted_paths(abstract.params)  # the layers the abstract state adapts
        make = functools.partial(lora_runs.make_state, config, optimizer, paths)
    return jax.jit(make, out_shardings=shardings, donate_argnums=0)(base)


def attach_base(config, workdir, state, model, example_shape, num_classes, abstract, mesh):
    """A restored adapter (or ControlNet) state with its base read again (not checkpointed)."""
    shardings = parallel.state_shardings(mesh, abstract)
    base = _load_base(config, workdir, model, example_shape, num_classes, shardings.frozen,
                      fresh=False)
    return state.replace(frozen=base, compose=abstract.compose)


def _load_base(config, workdir, model, example_shape, num_classes, shardings, *, fresh: bool):
    """The frozen base's parameters, each placed in its sharding.

    From ``config.pretrained.path`` (the folder's UNet and text encoder), or from the run in
    ``config.lora.base`` (``config.controlnet.base``): the checkpoint ``lora.base_step`` (-1:
    the latest) on a fresh start, the one ``WORKDIR/lora.json`` (``controlnet.json``) recorded
    on resuming."""
    model = controlnet_runs.base_model(model)
    if config.pretrained.path:
        return pretrained_runs.initial_params(config, model, shardings)
    group, base, base_step, record_file = _base_settings(config)
    recorded = _recorded_base(workdir, record_file)
    if not fresh and recorded:
        if os.path.realpath(recorded["base"]) != os.path.realpath(base):
            what = "ControlNet was" if group == "controlnet" else "adapters were"
            raise configuration.ConfigError(
                f"config.{group}.base={base!r}, but this run's {what} trained on "
                f"{recorded['base']!r} ({os.path.join(workdir, record_file)}); resume "
                "with that base")
        step = recorded["base_step"]
    else:
        step = None if base_step == -1 else base_step
    params, step = _base_run_params(config, base, model, example_shape, num_classes, shardings,
                                    step, f"config.{group}.base={base!r}")
    if fresh:
        _record_base(workdir, base, step, record_file)
    return params


def _recorded_base(workdir, filename: str) -> dict:
    """What ``WORKDIR/lora.json`` (``controlnet.json``) says of the run's base.

    ``{}`` before the run started."""
    path = os.path.join(workdir, filename)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _record_base(workdir, base: str, step: int, filename: str) -> None:
    """Write ``WORKDIR/lora.json`` (``controlnet.json``): the base run and its step (process 0)."""
    if parallel.is_writer():
        files.save_json(os.path.join(workdir, filename),
                        {"base": os.path.realpath(base), "base_step": step})


def read_run_config(workdir: str, where: str):
    """The config a run in ``workdir`` was trained with (its config.json over the defaults)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise configuration.ConfigError(f"{where} is not a run's workdir (it has no "
                                        "config.json)")
    with open(path) as f:
        return autoencoders.run_config(json.load(f), where)


def _base_run_params(config, base, model, example_shape, num_classes, shardings, step, where):
    """``(EMA parameters, step)`` of the run in ``base``, checked to be this run's model."""
    base_config = read_run_config(base, where)
    if model_fingerprint(base_config.model) != model_fingerprint(config.model):
        raise configuration.ConfigError(
            f"{where} trained another model ({base_config.model.name} with other settings); an "
            "adapter or ControlNet run's config.model must be the base run's")
    abstract = train_state.abstract_train_state(
        model, optimizer_lib.optimizer_from_config(base_config), example_shape, num_classes,
        base_config.seed)
    mesh = jax.tree_util.tree_leaves(shardings)[0].mesh
    checkpoints = open_checkpoints(base_config, base, example_shape, num_classes)
    try:
        if checkpoints.latest_step() is None:
            raise configuration.ConfigError(f"{where} has no checkpoint yet; train it first")
        state = checkpoints.restore(train_state.with_shardings(abstract, mesh), step=step)
    finally:
        checkpoints.close()
    return jax.tree_util.tree_map(jax.device_put, state.ema_params, shardings), int(state.step)
