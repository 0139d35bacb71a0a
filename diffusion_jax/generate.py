"""Generation from a trained run: a config's sampling function, prompts, labels and files.

``make_generate_fn`` binds a config's sampler, guidance and conditioning into
``generate(params, key, num) -> samples``; ``generate_to_files`` is what ``--mode=sample`` runs
(for a pretrained Stable Diffusion folder, ``config.pretrained.path``,
``generate_pretrained_to_files``). (The samplers themselves are :mod:`diffusion_jax.samplers`.)
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

from diffusion_jax import configuration, controlnet_runs, edit_runs, editing, files, guidance
from diffusion_jax import latent
from diffusion_jax import modalities
from diffusion_jax import parallel, parameterization, run, samplers, set_runs, time_grids
from diffusion_jax import train_state
from diffusion_jax.conditioning import sampling_network
from diffusion_jax.data import controls as controls_lib
from diffusion_jax.edit_runs import EditInputs, edit_inputs
from diffusion_jax.pipelines import StableDiffusion

__all__ = ["make_generate_fn", "generate_from_prompts", "generate_to_files", "sampling_labels",
           "sampling_prompts", "encode_prompts", "is_text_model", "cast_params_once",
           "load_pipeline", "generate_pretrained", "generate_pretrained_to_files",
           "EditInputs", "edit_inputs", "sampling_controls", "read_control_images"]


def cast_params_once(network, params, x_shape, cond=None):
    """``params`` with the leaves that the network only ever casts already cast, once.

    Every leaf that ``network(params, x, noise_level, cond)`` only ever casts, all to one dtype,
    is cast to it here: the convolution and dense kernels of a bfloat16 network, not its float32
    norm scales. Inside a sampler's loop those casts would otherwise run at every step (XLA does
    not hoist them); the results are bit for bit the same. Found by tracing the network once at
    batch 1 (``x_shape``, and ``cond`` for its structure)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if not leaves:
        return params
    abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
    one = lambda a: jax.ShapeDtypeStruct((1,) + tuple(a.shape[1:]), a.dtype)  # noqa: E731
    jaxpr = jax.make_jaxpr(
        lambda leaves, x, t, c: network(jax.tree_util.tree_unflatten(treedef, leaves), x, t, c))(
            [abstract(a) for a in leaves], jax.ShapeDtypeStruct(x_shape, jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.float32), jax.tree_util.tree_map(one, cond)).jaxpr
    uses = {v: set() for v in jaxpr.invars[:len(leaves)]}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, Literal) and v in uses:
                cast = eqn.primitive.name == "convert_element_type"
                uses[v].add(eqn.params["new_dtype"] if cast else None)
    for v in jaxpr.outvars:
        if not isinstance(v, Literal) and v in uses:
            uses[v].add(None)
    cast = [a.astype(next(iter(u))) if len(u) == 1 and None not in u else a
            for a, u in zip(leaves, uses.values())]
    return jax.tree_util.tree_unflatten(treedef, cast)


def is_text_model(config) -> bool:
    """Whether the run's model reads text (captioned shapes, or a folder with captions)."""
    return configuration.is_text_model(config)


def sampling_prompts(config, num):
    """The ``num`` prompts to generate.

    They come from ``config.sampling.prompt`` (several separated by "|", used in turn), or, when
    it is empty, are the captions of ``num`` examples of the data."""
    if config.sampling.prompt.strip():
        prompts = [p.strip() for p in config.sampling.prompt.split("|") if p.strip()]
        return [prompts[i % len(prompts)] for i in range(num)]
    source = configuration.build_source(config.data, split="test")
    return [str(source[i % len(source)]["caption"]) for i in range(num)]


def encode_prompts(config, prompts):
    """Tokens and masks (int32 / bool [len(prompts), config.text.max_length]) of prompts."""
    tokens, mask = configuration.encode_captions(config, prompts)
    return {"tokens": jnp.asarray(tokens), "token_mask": jnp.asarray(mask)}


def _unconditional(denoise_fn, x, t):
    return denoise_fn(x, t, None)


def _fixed_condition(denoise_fn, cond, x, t):
    return denoise_fn(x, t, jax.tree_util.tree_map(
        lambda a: jnp.broadcast_to(a, x.shape[:1] + a.shape[1:]), cond))


def read_control_images(config, height: int, width: int) -> list:
    """``config.sampling.control_image``'s files as float32 [height, width, 3] in [0, 1].

    With ``config.sampling.control_type="canny"`` each file is an ordinary image whose Canny
    edges (:func:`diffusion_jax.data.controls.canny`) are the control map, computed at the
    generated image's size."""
    s = config.sampling
    out = []
    for path in configuration.comma_list(s.control_image):
        try:
            image = editing.read_image(path, height, width, 3)
        except (OSError, ValueError) as err:
            raise configuration.ConfigError(f"config.sampling.control_image: {err}") from err
        if s.control_type:
            image = controls_lib.control_map(
                s.control_type, np.round(image * 255).astype(np.uint8)).astype(np.float32) / 255
        out.append(image)
    return out


def sampling_controls(config, num, control_shape, offset: int = 0):
    """The control images [num, H, W, C] in [0, 1] of a ControlNet run's samples.

    ``config.sampling.control_image`` (one image for every sample), or, when it is empty, the
    control maps of the data's test records whose captions :func:`sampling_prompts` uses
    (records ``offset`` to ``offset + num - 1``)."""
    height, width, channels = control_shape
    if config.sampling.control_image:
        images = read_control_images(config, height, width)
        if len(images) != 1:
            raise configuration.ConfigError(
                f"config.sampling.control_image names {len(images)} images; a ControlNet run "
                "has one ControlNet: give one")
        return jnp.broadcast_to(jnp.asarray(images[0]), (num, height, width, channels))
    source = controlnet_runs.with_control(config, configuration.build_source(config.data,
                                                                             split="test"))
    maps = np.stack([source[i % len(source)]["control"] for i in range(offset, offset + num)])
    if maps.shape[1:] != tuple(control_shape):
        raise configuration.ConfigError(
            f"the data's control maps have shape {maps.shape[1:]}, the ControlNet takes "
            f"{tuple(control_shape)}")
    return jnp.asarray(maps.astype(np.float32) / 255.0)


def _control_scales(config, count: int) -> np.ndarray:
    """``config.sampling.control_scales`` as float32 [count] (empty: 1 for each)."""
    scales = list(config.sampling.control_scales) or [1.0] * count
    if len(scales) != count:
        raise configuration.ConfigError(
            f"config.sampling.control_scales has {len(scales)} values for {count} "
            "ControlNet(s): give one per ControlNet (or none for 1 each)")
    return np.asarray(scales, np.float32)


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


_OVERRIDABLE = ("method", "num_steps", "grid", "label", "guidance_scale", "guidance_rescale",
                "prompt", "negative_prompt", "control_scales", "control_start", "control_end")


def make_generate_fn(config, model, example_shape, num_classes, *, mesh=None, decode=None,
                     edit: Optional[EditInputs] = None, **sampling):
    """``generate(params, key, num, prompts=None, edit=None) -> samples`` for ``config.sampling``.

    ``edit`` (:func:`~diffusion_jax.edit_runs.edit_inputs`) turns generation into
    image-to-image, or with a mask inpainting (RePaint, :class:`diffusion_jax.samplers.KnownRegion`),
    from one input image for every sample (or from per-sample inputs); for a video run,
    image-to-video (:func:`~diffusion_jax.edit_runs.first_frame_inputs`). Given here it is
    every call's default; given to ``generate`` it applies to that call (per-batch masks or
    first frames reuse one generate function).

    ``decode``, if given, maps the generated samples to what is returned: a latent run's
    decoder (:func:`diffusion_jax.latent.decoder_for`), which runs as its own compiled program.

    Any of the config's sampling keys can be overridden by keyword (``method``, ``num_steps``,
    ``grid``, ``label``, ``guidance_scale``, ``guidance_rescale``, ``prompt``,
    ``negative_prompt``, ``control_scales``, ``control_start``, ``control_end``); parameters,
    labels, prompt tokens and the guidance scale are data to
    the compiled sampler. A text model draws ``prompts`` (a list of ``num`` strings) when given,
    else the config's prompts (see :func:`sampling_prompts`). With a ``mesh`` the batch is split
    over all its devices (when ``num`` divides evenly; otherwise it runs replicated).

    A ControlNet run's ``generate`` also takes ``controls`` [num, H, W, C] in [0, 1] (default:
    :func:`sampling_controls`); they are data to the compiled sampler, scaled by
    ``config.sampling.control_scales`` over the steps ``control_start`` to ``control_end``."""
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
    if "scheduler" in (config.sampling.method, config.sampling.grid):
        raise configuration.ConfigError(
            "sampling.method / sampling.grid 'scheduler' (a pretrained folder's own scheduler) "
            "samples the folder itself; a trained run samples with the library's samplers: "
            f"choose sampling.method in {samplers.METHODS} and sampling.grid in {samplers.GRIDS}")
    schedule = configuration.build_schedule(config)
    par = configuration.build_parameterization(config)
    sampling = config.sampling
    text_model = is_text_model(config)
    if text_model:
        if sampling.negative_prompt:
            other = encode_prompts(config, [sampling.negative_prompt])
        else:
            null_tokens, null_mask = configuration.null_caption(config)
            other = {"tokens": jnp.asarray(null_tokens), "token_mask": jnp.asarray(null_mask)}

    control = (_Controls(config, model, example_shape, schedule, edit)
               if controlnet_runs.enabled(config) else None)
    sets = set_runs.SetSampling(config, example_shape, lambda: configuration.build_source(
        config.data, "train")) if set_runs.is_set_data(config) else None

    default_edit = edit

    def generate(params, key, num, prompts=None, controls=None, edit=None):
        edit = default_edit if edit is None else edit
        if control is not None:
            control.check_edit(edit)
        explicit_prompts = prompts is not None
        if text_model:
            if prompts is None:
                prompts = sampling_prompts(config, num)
            if len(prompts) != num:
                raise ValueError(f"{len(prompts)} prompts for {num} samples")
            cond = encode_prompts(config, prompts)
            uncond = jax.tree_util.tree_map(
                lambda a: jnp.broadcast_to(a, (num,) + a.shape[1:]), other)
        else:
            labels = sampling_labels(config, num_classes, num)
            cond = labels if labels is None else {"label": labels}
            uncond = None if labels is None else {"label": jnp.full_like(labels, num_classes)}
        if control is not None:
            cond, uncond = control.conditions(cond, uncond, num, controls, explicit_prompts)
        masks = None
        if sets is not None:  # each sample's members, in both branches of guidance
            key, masks, cond, uncond = sets.prepare(key, num, cond, uncond)
        params = cast_params_once(sampling_network(model), params, (1,) + tuple(example_shape),
                                  cond)
        denoise = parameterization.make_denoise_fn(
            jax.tree_util.Partial(sampling_network(model), params), schedule, par)
        if control is not None:
            denoise = control.windowed(denoise)
        if sets is not None:
            denoise = sets.denoiser(denoise)
        if cond is None:
            fn = jax.tree_util.Partial(_unconditional, denoise)
        elif uncond is None:  # a ControlNet of an unconditional (or unguided) model
            fn = jax.tree_util.Partial(_fixed_condition, denoise, cond)
        else:
            fn = guidance.classifier_free_guidance(
                denoise, cond=cond, uncond=uncond, scale=sampling.guidance_scale,
                rescale=sampling.guidance_rescale)
        key_noise, key_sampler = jax.random.split(key)
        noise = _starting_noise(key_noise, (num,) + tuple(example_shape), mesh, masks, sets)
        samples = edit_runs.sample_edited(fn, noise, edit, dict(
            schedule=schedule, method=sampling.method, num_steps=sampling.num_steps,
            grid=sampling.grid, key=key_sampler))
        samples = samples if sets is None else set_runs.project(samples, masks)
        return samples if decode is None else decode(samples)

    return generate


def _starting_noise(key, shape, mesh, masks, sets):
    """Standard normal noise of ``shape``, split over ``mesh``; projected for set data."""
    noise = jax.random.normal(key, shape, jnp.float32)
    if sets is not None:
        noise = set_runs.project(noise, masks)
    num = shape[0]
    if mesh is not None and num % mesh.devices.size == 0:
        noise = jax.lax.with_sharding_constraint(noise, parallel.batch_sharding(mesh))
    elif mesh is not None and mesh.devices.size > 1:  # said once, when this num compiles
        warnings.warn(
            f"generating {num} samples on each of {mesh.devices.size} devices: {num} is not "
            f"a multiple of {mesh.devices.size}, so the batch cannot be split over them; ask "
            "for a multiple to spread it (same results, less time and memory per device)")
    return noise


class _Controls:
    """A ControlNet run's control images, conditioning scale and window, in generation."""

    def __init__(self, config, model, example_shape, schedule, edit):
        sampling = config.sampling
        self.config = config
        self.shape = controlnet_runs.control_shape(model, example_shape)
        self.scales = _control_scales(config, 1)
        # The window is over the steps that run: image-to-image runs the tail of the grid.
        times = time_grids.time_grid(schedule, sampling.num_steps, sampling.grid)[:-1]
        self.strength = None if edit is None else edit.strength
        if edit is not None:
            times = times[len(times) - editing.steps_to_run(sampling.num_steps, edit.strength):]
        self.times = times
        self.window = guidance.control_window(len(times), sampling.control_start,
                                              sampling.control_end)

    def check_edit(self, edit):
        """Refuse a call's edit whose strength differs from the one the window was built for."""
        strength = None if edit is None else edit.strength
        if strength != self.strength:
            raise ValueError(
                f"this ControlNet generate function was made for editing strength "
                f"{self.strength} (None: no editing), so its control window covers those steps; "
                f"a call with strength {strength} needs its own: pass that edit to "
                "make_generate_fn")

    def conditions(self, cond, uncond, num, controls, explicit_prompts):
        """``(cond, uncond)`` with the control images and scales.

        Both branches of guidance see the same control, as diffusers gives it."""
        if controls is None:
            if explicit_prompts and not self.config.sampling.control_image:
                raise ValueError("a ControlNet run's prompts need their control images: pass "
                                 "controls= (or set config.sampling.control_image)")
            controls = sampling_controls(self.config, num, self.shape)
        controls = jnp.asarray(controls, jnp.float32)
        if controls.shape != (num,) + tuple(self.shape):
            raise ValueError(f"controls of shape {controls.shape} for {num} samples: give "
                             f"[{num}, {', '.join(map(str, self.shape))}] in [0, 1]")
        extra = {"control": controls,
                 "control_scale": jnp.broadcast_to(jnp.asarray(self.scales), (num, 1))}
        return {**(cond or {}), **extra}, None if uncond is None else {**uncond, **extra}

    def windowed(self, denoise):
        """``denoise`` with the control acting only over the window's steps."""
        return guidance.windowed_control(denoise, self.times, self.window)


def checkpoint_generators(config, workdir, step=None):
    """``(step, num_classes, for_scale)`` of a run's checkpoint, for the evaluations' sweeps.

    ``for_scale(scale)`` returns ``generate(key, num, prompts=None, edit=None) -> samples`` at
    guidance ``scale`` from the checkpoint's parameters (one compiled program for every scale);
    ``edit`` (:class:`~diffusion_jax.edit_runs.EditInputs`, e.g. first frames) edits from it."""
    state, model, example_shape, num_classes = run.restore_run(config, workdir, step=step)
    params = train_state.model_params(state, config.sampling.use_ema)
    mesh, decode = run.sampling_mesh(config), latent.decoder_for(config, workdir)

    def for_scale(scale):
        plain = make_generate_fn(config, model, example_shape, num_classes, mesh=mesh,
                                 decode=decode, guidance_scale=scale)

        def generate(key, num, prompts=None, edit=None):
            return plain(params, key, num, None if prompts is None else list(prompts),
                         edit=edit)

        return generate

    return int(state.step), num_classes, for_scale


def generate_from_prompts(config, workdir, prompts, *, seed=0, step=None, **sampling):
    """Load the trained text-to-image run in ``workdir`` and generate one image per prompt.

    Returns ``(images uint8 [n, H, W, C], state)``. ``sampling`` overrides config.sampling keys,
    e.g. ``method="dpmpp_2m", num_steps=30, guidance_scale=4.0, negative_prompt="..."``."""
    if not is_text_model(config):
        raise configuration.ConfigError("generate_from_prompts needs a text-conditioned run "
                                        "(data.name='captions', or a folder with captions)")
    state, model, example_shape, num_classes = run.restore_run(config, workdir, step=step)
    generate = make_generate_fn(config, model, example_shape, num_classes,
                                mesh=run.sampling_mesh(config),
                                decode=latent.decoder_for(config, workdir), **sampling)
    images = generate(train_state.model_params(state), jax.random.key(seed), len(prompts),
                      list(prompts))
    return files.to_uint8(images), state


def generate_to_files(config, workdir):
    """Generate ``config.sampling.num_samples`` samples of a run and save them (``--mode=sample``).

    Reads the checkpoint ``config.sampling.checkpoint_step`` (-1: the latest) and writes
    ``workdir/samples/step<N>_<method>_<steps>steps_cfg<scale>_<digest>.npz`` (samples, and the
    labels or prompts asked for), a PNG grid beside it (audio: WAV files and spectrograms; video:
    GIF and MP4 clips; :func:`~diffusion_jax.modalities.write_samples`), and a JSON of the settings
    (step, sampling group, whole config). The digest is that of the settings, so runs that
    differ in any sampling key never share a name, and a repeat gets a ``_2`` suffix: no output
    is overwritten. Samples that are not finite (a diverged checkpoint) are an error. Every process of a multi-process
    run takes part in generating; process 0 writes. Returns the paths written.
    """
    if config.pretrained.path and not run.has_checkpoints(workdir):
        return generate_pretrained_to_files(config, workdir)
    step = None if config.sampling.checkpoint_step == -1 else config.sampling.checkpoint_step
    state, model, example_shape, num_classes = run.restore_run(config, workdir, step=step)
    params = train_state.model_params(state, config.sampling.use_ema)
    space = (latent.load_space(config, workdir, log=lambda line: None)
             if config.latent.autoencoder else None)
    generate = make_generate_fn(config, model, example_shape, num_classes,
                                mesh=run.sampling_mesh(config),
                                decode=None if space is None else space.decode,
                                edit=edit_inputs(config, example_shape, space))
    controls = None
    if controlnet_runs.enabled(config):  # kept beside the samples
        controls = sampling_controls(config, config.sampling.num_samples,
                                     controlnet_runs.control_shape(model, example_shape))
    images = parallel.to_host(generate(params, jax.random.key(config.sampling.seed),
                                       config.sampling.num_samples, controls=controls))
    if not parallel.is_writer():
        return []
    if not np.all(np.isfinite(images)):
        raise configuration.ConfigError(
            f"the samples of checkpoint step {int(state.step)} in {workdir} are NaN/Inf: its "
            f"{'EMA ' if config.sampling.use_ema else ''}parameters are not finite (a run that "
            "diverged); sample an earlier step with --config.sampling.checkpoint_step")
    s = config.sampling
    settings = {"step": int(state.step), "workdir": os.path.abspath(workdir),
                "sampling": s.to_dict()}
    stem = files.reserve_stem(os.path.join(workdir, "samples"),
                              f"step{int(state.step)}_{edit_runs.mode_name(config)}{s.method}_"
                              f"{s.num_steps}steps_cfg{s.guidance_scale:g}_"
                              f"{files.settings_digest(settings)}")
    if is_text_model(config):
        extra = {"prompts": np.array(sampling_prompts(config, s.num_samples))}
    else:
        labels = sampling_labels(config, num_classes, s.num_samples)
        extra = {} if labels is None else {"labels": labels}
    if controls is not None:
        extra["controls"] = np.asarray(controls)
    files.save_arrays(stem + ".npz", samples=images, **extra)
    written = [stem + ".npz"] + modalities.write_samples(stem, images, config)
    if controls is not None:  # the control maps in the samples' order, in [-1, 1] as images
        files.save_grid(np.asarray(controls) * 2.0 - 1.0, stem + "_controls.png")
        written.append(stem + "_controls.png")
    files.save_json(stem + ".json", {**settings, "files": [os.path.basename(p) for p in written],
                                     "config": json.loads(config.to_json_best_effort())})
    written.append(stem + ".json")
    return written


def load_pipeline(config) -> StableDiffusion:
    """The Stable Diffusion folder ``config.pretrained.path``, on the sampling mesh.

    Computation in ``config.model.dtype``, parameters in ``config.pretrained.param_dtype``,
    split over the mesh's fsdp axis when ``config.mesh.fsdp`` > 1, with the LoRA files of
    ``config.pretrained.lora`` at ``lora_scales``; a folder or file that cannot be loaded is a
    :class:`~diffusion_jax.configuration.ConfigError` naming what is wrong."""
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    mesh = run.sampling_mesh(config)
    try:
        pipeline = StableDiffusion.from_pretrained(
            config.pretrained.path, dtype=dtypes[config.model.dtype],
            param_dtype=dtypes[config.pretrained.param_dtype], mesh=mesh,
            fsdp=mesh.shape["fsdp"] > 1, attention=config.model.attention)
    except (OSError, ValueError) as err:
        raise configuration.ConfigError(f"config.pretrained.path: {err}") from err
    lora_paths = [f.strip() for f in config.pretrained.lora.split(",") if f.strip()]
    scales = list(config.pretrained.lora_scales) or [1.0] * len(lora_paths)
    if len(scales) != len(lora_paths):
        raise configuration.ConfigError(
            f"config.pretrained.lora_scales has {len(scales)} values for {len(lora_paths)} LoRA "
            "files in config.pretrained.lora: give one per file (or none for 1 each)")
    for path, scale in zip(lora_paths, scales):
        try:
            pipeline.load_lora(path, scale)
        except (OSError, ValueError) as err:
            raise configuration.ConfigError(f"config.pretrained.lora: {err}") from err
    for path in configuration.comma_list(config.pretrained.controlnet):
        try:
            pipeline.load_controlnet(path)
        except (OSError, ValueError) as err:
            raise configuration.ConfigError(f"config.pretrained.controlnet: {err}") from err
    return pipeline


def _pretrained_controls(config) -> dict:
    """The pipeline's ControlNet arguments from ``config.sampling`` (``{}`` without any).

    With ``sampling.control_type="canny"`` each file's edges, at its own size, are the control
    image (the pipeline resizes it to the output's)."""
    s = config.sampling
    if not s.control_image:
        return {}
    images = configuration.comma_list(s.control_image)
    if s.control_type:
        try:
            images = [controls_lib.control_map(s.control_type, np.asarray(
                editing.open_image(path, "the control image").convert("RGB")))
                for path in images]
        except (OSError, ValueError) as err:
            raise configuration.ConfigError(f"config.sampling.control_image: {err}") from err
    return dict(control_image=images[0] if len(images) == 1 else images,
                controlnet_conditioning_scale=list(s.control_scales) or 1.0,
                control_guidance_start=s.control_start, control_guidance_end=s.control_end)


def generate_pretrained(config, pipeline, prompts, first_index: int = 0):
    """Images [len(prompts), H, W, 3] in [-1, 1] from a pretrained pipeline, in batches.

    ``config.sampling`` gives the sampler ("scheduler": the folder's), steps, guidance scale and
    rescale, negative prompt, seed and control images (for ``config.pretrained.controlnet``);
    ``config.pretrained`` the size and the batch. Image i's
    noise comes from the seed and ``first_index + i``'s batch, so a long list generated in
    parts gets fresh noise in every part."""
    s, p = config.sampling, config.pretrained
    method = None if s.method == "scheduler" else s.method
    grid = None if s.grid == "scheduler" else s.grid
    if method is None and grid is not None:
        raise configuration.ConfigError(
            f"config.sampling.grid={s.grid!r} with sampling.method='scheduler': the folder's "
            "scheduler brings its own timesteps; set sampling.grid='scheduler', or choose a "
            "sampling.method of the library to run on that grid")
    key = jax.random.key(s.seed)
    images = []
    for start in range(0, len(prompts), p.batch_size):
        batch = prompts[start:start + p.batch_size]
        kwargs = dict(negative_prompt=s.negative_prompt or None, num_steps=s.num_steps,
                      guidance_scale=s.guidance_scale, method=method, grid=grid,
                      height=p.height or None, width=p.width or None,
                      key=jax.random.fold_in(key, first_index + start),
                      guidance_rescale=s.guidance_rescale, **_pretrained_controls(config))
        try:
            if s.mask_image:
                out = pipeline.inpaint(batch, s.init_image, s.mask_image,
                                       strength=configuration.editing_strength(config),
                                       jump_length=s.jump_length,
                                       jump_n_sample=s.jump_n_sample, **kwargs)
            elif s.init_image:
                out = pipeline.img2img(batch, s.init_image,
                                       strength=configuration.editing_strength(config), **kwargs)
            else:
                out = pipeline(batch, **kwargs)
        except (OSError, ValueError) as err:
            raise configuration.ConfigError(str(err)) from err
        images.append(out * 2.0 - 1.0)
    return np.concatenate(images)


def generate_pretrained_to_files(config, workdir):
    """``--mode=sample`` for ``config.pretrained.path``: a grid, arrays and settings in WORKDIR.

    Writes ``workdir/samples/pretrained_<method>_<steps>steps_cfg<scale>_<digest>`` ``.npz``
    (samples in [-1, 1] and their prompts), ``.png`` (the grid) and ``.json`` (the settings and
    the folder), as :func:`generate_to_files` does for a run. Returns the paths written."""
    if not config.sampling.prompt.strip():
        raise configuration.ConfigError(
            "config.sampling.prompt is empty: say what to draw (several prompts separated by "
            "'|' are used in turn)")
    pipeline = load_pipeline(config)
    prompts = sampling_prompts(config, config.sampling.num_samples)
    images = generate_pretrained(config, pipeline, prompts)
    if not parallel.is_writer():
        return []
    s = config.sampling
    settings = {"pretrained": os.path.abspath(config.pretrained.path),
                "pipeline": pipeline.models.index["_class_name"], "sampling": s.to_dict(),
                "size": list(images.shape[1:3])}
    stem = files.reserve_stem(os.path.join(workdir, "samples"),
                              f"pretrained_{edit_runs.mode_name(config)}{s.method}_"
                              f"{s.num_steps}steps_"
                              f"cfg{s.guidance_scale:g}_{files.settings_digest(settings)}")
    files.save_arrays(stem + ".npz", samples=images, prompts=np.array(prompts))
    files.save_grid(images, stem + ".png")
    written = [stem + ".npz", stem + ".png"]
    files.save_json(stem + ".json", {**settings, "files": [os.path.basename(p) for p in written],
                                     "config": json.loads(config.to_json_best_effort())})
    return written + [stem + ".json"]
