"""Training: the pure, jit-compiled train step and the config-driven loop around it.

``train_step(state, batch) -> (state, metrics)`` takes host-agnostic arrays and returns a new
state; it draws its randomness from ``fold_in(state.rng, state.step)``, so a run restored from a
checkpoint at step k continues exactly as the uninterrupted run would. ``train_and_evaluate``
runs it from a config: data, checkpoints, console and TensorBoard lines, sample grids, and a
clean stop on SIGTERM/SIGINT, each one of the small periodic actions at the end of this module.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics
from clu import parameter_overview as clu_parameter_overview
from jax.experimental.layout import Format, Layout

from diffusion_jax import autoencoder_training, autoencoders
from diffusion_jax import checkpoints as ckpt_lib
from diffusion_jax import conditioning, configuration, data, files, gradients, latent
from diffusion_jax import console as console_lib
from diffusion_jax import grids as grids_lib
from diffusion_jax import controlnet_runs, lora_runs, loop_control, losses, parallel
from diffusion_jax import pretrained_runs, run, set_runs
from diffusion_jax import train_state
from diffusion_jax import writers
from diffusion_jax import workdir as workdir_lib

__all__ = ["TrainMetrics", "make_train_step", "all_finite", "TrainingDiverged", "Interrupted",
           "make_loss_from_config",
           "compiled_train_step", "compile_train_step", "place_state", "empty_running_metrics",
           "train_and_evaluate"]


# Averages over the steps since the last log line. (Built with ``create`` rather than a class
# body: clu reads the field types from annotations, which this module keeps as strings.)
TrainMetrics = clu_metrics.Collection.create(loss=clu_metrics.Average.from_output("loss"),
                                             grad_norm=clu_metrics.Average.from_output("grad_norm"))


def _accumulating_step(train_step, steps_per_call: int = 1):
    """``train_step`` that also folds its metrics into running averages, in the same call.

    The running value holds a :class:`TrainMetrics` and an "every step was finite" flag. With
    ``steps_per_call`` > 1 the batch is a ``[steps_per_call, batch, ...]`` stack and the steps
    run in a ``lax.scan`` inside one device call (fewer host round trips for small models).
    """

    def one(state, batch, running):
        state, metrics = train_step(state, batch)
        update = TrainMetrics.single_from_model_output(loss=metrics["loss"],
                                                      grad_norm=metrics["grad_norm"])
        return state, {"metrics": running["metrics"].merge(update),
                       "finite": running["finite"] & metrics["finite"]}

    if steps_per_call == 1:
        return one

    def several(state, batches, running):
        def body(carry, batch):
            return one(carry[0], batch, carry[1]), None

        (state, running), _ = jax.lax.scan(body, (state, running), batches)
        return state, running

    return several


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                    ema_decay: float = 0.9999, grad_accumulation: int = 1, mesh=None,
                    use_shard_map: bool = False):
    """Build the pure ``train_step(state, batch) -> (state, metrics)``.

    ``loss_fn(params, batch, key) -> (loss, aux)`` comes from
    :func:`diffusion_jax.losses.make_loss_fn` (or is an autoencoder's loss, whose ``draw`` also
    takes the step: ``draw_takes_step``). Metrics: ``loss``, ``grad_norm``, and
    ``finite`` (False when the loss, a gradient, or anything in the new state (parameters, EMA,
    optimizer state) is NaN or Inf; the caller stops the run then, before that state is saved).

    ``grad_accumulation`` splits the batch into that many microbatches whose gradients are
    summed in a ``lax.scan`` (the same update as the whole batch, with a fraction of the
    activation memory). All randomness is drawn for the whole (global) batch first, so the
    result does not depend on how the batch is split.

    ``use_shard_map`` (needs ``mesh``) computes loss and gradients with ``jax.shard_map``
    (:func:`diffusion_jax.gradients.sharded_loss_and_grads`: per-device gradients, FSDP
    reduce-scatter); the optimizer update then runs on the state in its sharding as in the
    default path.
    """
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    if grad_accumulation < 1:
        raise ValueError(f"grad_accumulation must be >= 1, got {grad_accumulation}")
    if use_shard_map and mesh is None:
        raise ValueError("use_shard_map needs the device mesh")
    draw = getattr(loss_fn, "draw", None)
    if draw is None:  # a plain loss function: all its randomness comes from the key
        draw = lambda batch, key: (batch, {"key": key})  # noqa: E731
        compute = lambda params, batch, draws: loss_fn(params, batch, draws["key"])  # noqa: E731
        if grad_accumulation > 1 or use_shard_map:
            raise ValueError("grad_accumulation and shard_map need a loss with draw/compute "
                             "stages (losses.make_loss_fn)")
    else:
        compute = loss_fn.compute
    # The gradient norm (metric and clipping) in one concatenated reduction, except for leaves
    # sharded over fsdp, which that would gather (see parallel.global_norm).
    concat_below = (math.inf if mesh is None or mesh.shape["fsdp"] == 1
                    else parallel.FSDP_MIN_SIZE)
    micro_sharding = None if mesh is None else jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, parallel.BATCH_AXES))
    if use_shard_map:
        loss_and_grads = gradients.sharded_loss_and_grads(compute, mesh, grad_accumulation)
    else:
        def loss_and_grads(params, batch, draws):
            return gradients.mean_loss_and_grads(compute, params, batch, draws,
                                                 grad_accumulation, micro_sharding)

    takes_step = getattr(loss_fn, "draw_takes_step", False)

    def adapted_loss_and_grads(state, batch, draws):
        """Gradients for the adapters alone: the network runs with compose(frozen, adapters)."""
        if use_shard_map:
            raise ValueError("a run on a frozen model (LoRA, ControlNet) computes its "
                             "gradients with mesh.train_step='jit'")
        def adapted(params, batch, draws):
            return compute(state.compose(state.frozen, params), batch, draws)
        return gradients.mean_loss_and_grads(adapted, state.params, batch, draws,
                                             grad_accumulation, micro_sharding)

    def train_step(state: train_state.TrainState, batch):
        key = jax.random.fold_in(state.rng, state.step)
        batch, draws = draw(batch, key, state.step) if takes_step else draw(batch, key)
        if state.compose is None:
            loss, grads = loss_and_grads(state.params, batch, draws)
        else:
            loss, grads = adapted_loss_and_grads(state, batch, draws)
        grad_norm = parallel.global_norm(grads, concat_below=concat_below)
        extra = ({"grad_norm": grad_norm}
                 if isinstance(optimizer, optax.GradientTransformationExtraArgs) else {})
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree_util.tree_map(
            lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
        }
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                                  opt_state=opt_state)
        metrics["finite"] = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                             & all_finite((params, ema, opt_state)))
        return new_state, metrics

    return train_step


def all_finite(tree) -> jax.Array:
    """Whether every floating-point number in ``tree`` is finite (one boolean, on device)."""
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)
             if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


class TrainingDiverged(RuntimeError):
    """The loss, a gradient or the state became NaN or Inf; nothing from then on was saved."""


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped the run after it saved a checkpoint of ``step``.

    ``exit_code`` is what a process killed by that signal reports (128 + the signal number: 143
    for SIGTERM, 130 for SIGINT), so that a scheduler sees an unfinished run and requeues it.
    """

    def __init__(self, signum: int, step: int, state):
        super().__init__(f"stopped by signal {signum} after saving step {step}")
        self.signum, self.step, self.state = signum, step, state
        self.exit_code = 128 + signum


def make_loss_from_config(config, model, num_classes):
    """The training loss of ``config.diffusion`` for ``model``.

    With label dropout (drawn for the whole global batch) when the model is class-conditional,
    and caption dropout for captioned data. An autoencoder run's loss is that of
    ``config.autoencoder`` (:mod:`diffusion_jax.autoencoder_training`).
    """
    if config.task == "autoencoder":
        return autoencoder_training.loss_from_config(config, model)
    apply_fn = conditioning.network_apply_fn(model, num_classes=num_classes,
                                dropout_rng=config.model.dropout_rng)
    label_dropout = config.diffusion.label_dropout if num_classes else 0.0
    prepares = []
    if label_dropout:
        prepares.append(conditioning.drop_labels(num_classes, label_dropout))
    if configuration.is_text_model(config) and config.diffusion.caption_dropout:
        prepares.append(conditioning.drop_captions(config.diffusion.caption_dropout,
                                                   config.text.max_length,
                                                   configuration.null_caption(config)))

    def prepare(batch, key):
        for i, fn in enumerate(prepares):
            batch = fn(batch, jax.random.fold_in(key, i))
        return batch

    return losses.make_loss_fn(
        apply_fn, schedule=configuration.build_schedule(config),
        parameterization=configuration.build_parameterization(config),
        time_sampling=config.diffusion.time_sampling,
        time_sampling_params=dict(config.diffusion.time_sampling_params),
        weighting=config.diffusion.weighting,
        weighting_params=dict(config.diffusion.weighting_params),
        prepare=prepare if prepares else None, **set_runs.loss_options(config))


def compiled_train_step(config, model, optimizer, num_classes, mesh, abstract_state):
    """The jit-compiled train step that ``train_and_evaluate`` runs.

    It is ``step(state, global_batch, running) -> (state, running)``, jit-compiled with the
    state's and batch's shardings over ``mesh``, donating the old state; ``running`` accumulates
    :class:`TrainMetrics` and the all-finite flag (start it from :func:`empty_running_metrics`).

    With ``config.mesh.state_layouts="auto"`` the compiler picks the state's device layouts:
    compile it with :func:`compile_train_step`, which also moves the state into them.
    ``config.training.steps_per_call`` > 1 makes it take ``[steps, batch, ...]`` stacks and run
    that many steps per call; ``config.training.grad_accumulation`` and
    ``config.mesh.train_step`` (``"jit"`` or ``"shard_map"``) select how each step computes its
    gradients (see :func:`make_train_step`)."""
    t = config.training
    loss_fn = make_loss_from_config(config, model, num_classes)
    shardings = parallel.state_shardings(mesh, abstract_state)
    replicated = parallel.replicated(mesh)
    step = make_train_step(loss_fn, optimizer, ema_decay=t.ema_decay,
                           grad_accumulation=t.grad_accumulation, mesh=mesh,
                           use_shard_map=config.mesh.train_step == "shard_map")
    batch_sharding = (parallel.stacked_batch_sharding(mesh) if t.steps_per_call > 1
                      else parallel.batch_sharding(mesh))
    if config.mesh.state_layouts == "auto":
        shardings = jax.tree_util.tree_map(lambda s: Format(Layout.AUTO, s), shardings)
    return jax.jit(
        _accumulating_step(step, t.steps_per_call),
        in_shardings=(shardings, batch_sharding, replicated),
        out_shardings=(shardings, replicated),
        donate_argnums=(0, 2))


def compile_train_step(step, state, batch, running):
    """Compile ``step`` (from :func:`compiled_train_step`) for these arguments ahead of time.

    Returns ``(compiled, state)``: the executable, and the state moved into the device layouts
    it takes (:func:`place_state`), which with ``config.mesh.state_layouts="auto"`` the compiler
    has chosen (on a GPU, e.g., convolution kernels stored in the order their cuDNN gradients
    come out in). The values are the same; checkpoints and other functions read such arrays as
    usual. Call the executable with the state it returns, and keep the batch shapes fixed."""
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    compiled = step.lower(abstract, batch, running).compile()
    formats_in, formats_out = compiled.input_formats[0][0], compiled.output_formats[0]
    moved = [f"{jax.tree_util.keystr(path)}: {a.layout} in, {b.layout} out"
             for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(formats_in),
                                     jax.tree_util.tree_leaves(formats_out)) if a != b]
    if moved:  # the next step could not take this step's state as it comes out: move it back
        warnings.warn(
            f"the compiled train step takes {len(moved)} state arrays in other device layouts "
            f"than it returns them in (e.g. {moved[0]}), so every step copies them back; set "
            "config.mesh.state_layouts='default' to avoid that", RuntimeWarning, stacklevel=2)

        def relaid(state, batch, running):
            state, running = compiled(state, batch, running)
            return place_state(state, formats_in), running

        return relaid, place_state(state, formats_in)
    return compiled, place_state(state, formats_in)


def place_state(state, formats):
    """``state`` with every array in its format (layout and sharding) of ``formats``.

    ``formats`` is e.g. a compiled step's ``input_formats``. Arrays already there are passed
    through; the others are copied one at a time and donated, so the state never exists twice in
    device memory."""
    def move(x, target):
        return x if x.format == target else jax.device_put(x, target, donate=True)

    return jax.tree_util.tree_map(move, state, formats)


def empty_running_metrics(mesh):
    return jax.device_put({"metrics": TrainMetrics.empty(), "finite": jnp.asarray(True)},
                          parallel.replicated(mesh))


def _print_now(line):
    print(line, flush=True)  # visible at once even when stdout is a file


def _check_finite(running, checkpoints, step: int) -> None:
    """Raise :class:`TrainingDiverged` if any step since the last check was not finite."""
    if bool(running["finite"]):
        return
    checkpoints.wait()
    latest = checkpoints.latest_step()
    kept = ("no checkpoint was written" if latest is None else
            f"the newest checkpoint, step {latest} in {checkpoints.directory}, is the last good "
            "state and a rerun resumes from it")
    raise TrainingDiverged(
        f"training diverged: the loss, the gradients or the parameters became NaN/Inf before "
        f"step {step}, and nothing from then on was saved; {kept}. Lower "
        "training.learning_rate (or raise training.warmup_steps, or set training.grad_clip) or "
        "check the data")


def _data_iterator(config, source, mesh, num_classes):
    """This process's iterator over its slice of every global batch (the first one checked)."""
    process_count = jax.process_count()
    if config.data.batch_size % process_count:
        raise configuration.ConfigError(
            f"config.data.batch_size={config.data.batch_size} does not split over "
            f"{process_count} processes")
    # The rows of the global batch that the mesh puts on this process's devices.
    slot, _ = parallel.process_batch_slot(mesh, config.data.batch_size)
    iterator = data.make_iterator(source, batch_size=config.data.batch_size // process_count,
                                  max_length=config.text.max_length, seed=config.seed,
                                  tokenizer=configuration.caption_tokenizer(config),
                                  shard_index=slot, shard_count=process_count,
                                  worker_count=config.data.worker_count)
    return data.check_first_batch(iterator, num_classes=num_classes,
                                  dataset=f"config.data.name={config.data.name!r} ({source!r})",
                                  sets=set_runs.is_set_data(config))


def _restore_or_init(config, workdir, checkpoints, abstract, mesh, iterator, parts):
    """``(state, resumed)``: the latest checkpoint (and data position), or a fresh state."""
    _, model, example_shape, num_classes, optimizer = parts
    latest = checkpoints.latest_step()
    if latest is not None and latest > config.training.num_steps:
        raise configuration.ConfigError(
            f"the run in {os.path.dirname(checkpoints.directory)} is at step {latest}, past "
            f"config.training.num_steps={config.training.num_steps}: nothing to train; raise "
            "num_steps to train further, or give another --workdir for a new run")
    if latest is not None:
        state = checkpoints.restore(train_state.with_shardings(abstract, mesh), iterator)
        if int(state.step) % config.training.steps_per_call:
            raise configuration.ConfigError(
                f"the checkpoint is at step {int(state.step)}, which is not a multiple of "
                f"config.training.steps_per_call={config.training.steps_per_call}; resume with a "
                "steps_per_call that divides it (e.g. the one the run was started with)")
        if run.frozen_base(config):  # checkpoints hold no base: it is read again
            state = run.attach_base(config, workdir, state, model, example_shape, num_classes,
                                    abstract, mesh)
        return state, True
    if run.frozen_base(config):
        return run.initial_adapter_state(config, workdir, model, optimizer, example_shape,
                                         num_classes, abstract, mesh), False
    if config.pretrained.path:  # the folder's weights, read into their shardings
        params = pretrained_runs.initial_params(
            config, model, parallel.state_shardings(mesh, abstract).params)
        return train_state.state_from_params(config, optimizer, params, abstract, mesh), False
    return train_state.init_train_state(config, model, optimizer, example_shape, num_classes,
                                        mesh), False


def _write_config_once(config, workdir, model, example_shape) -> None:
    """Keep the config the run started with as ``workdir/config.json`` (process 0).

    An autoencoder run also writes ``autoencoder.json``: its image and latent shapes, which a
    latent run reads without loading the autoencoder's data.
    """
    path = os.path.join(workdir, "config.json")
    if parallel.is_writer() and not os.path.exists(path):
        files.save_json(path, json.loads(config.to_json_best_effort()))
    shapes = os.path.join(workdir, "autoencoder.json")
    if config.task == "autoencoder" and parallel.is_writer() and not os.path.exists(shapes):
        files.save_json(shapes, {
            "image_shape": list(example_shape),
            "latent_shape": list(autoencoders.latent_shape(model.autoencoder, example_shape,
                                                           where="config.autoencoder")),
            "downsampling_factor": model.autoencoder.downsampling_factor})


def _describe_model(config, abstract, mesh, example_shape) -> str:
    """The run's first log line: what it trains, how big, on which devices."""
    num_params = clu_parameter_overview.count_parameters(abstract.params)
    devices = (f"mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} over "
               f"{mesh.devices.size} {jax.devices()[0].platform} device(s)")
    if config.task == "autoencoder":
        return (f"model: autoencoder (f={2 ** (len(config.autoencoder.block_out_channels) - 1)}, "
                f"{config.autoencoder.latent_channels} latent channels"
                f"{', with a discriminator' if config.autoencoder.disc_weight else ''}), "
                f"{num_params:,} parameters; {autoencoder_training.perceptual_status(config.autoencoder)}"
                f"; {devices}")
    where = (f" on latents of shape {tuple(example_shape)} of {config.latent.autoencoder}"
             f"{' (precomputed)' if config.latent.precomputed else ''}"
             if config.latent.autoencoder else "")
    name = config.model.name
    if config.pretrained.path:
        name = (f"the UNet and {'frozen ' if config.text.freeze else ''}CLIP text encoder of "
                f"{config.pretrained.path}")
    if controlnet_runs.enabled(config):
        base = clu_parameter_overview.count_parameters(abstract.frozen)
        return (f"model: a ControlNet ({config.controlnet.control} control, {num_params:,} "
                f"parameters, {num_params / base:.2%} of the base) of the frozen {name}{where} "
                f"({base:,} parameters, from {config.pretrained.path or config.controlnet.base})"
                f"; {devices}")
    if lora_runs.enabled(config):
        base = clu_parameter_overview.count_parameters(abstract.frozen)
        layers = len(lora_runs.adapted_paths(abstract.params))
        return (f"model: LoRA adapters (rank {config.lora.rank}, {layers} layers, "
                f"{num_params:,} parameters, {num_params / base:.2%} of the base) of the frozen "
                f"{name}{where} ({base:,} parameters, from "
                f"{config.pretrained.path or config.lora.base}); {devices}")
    return f"model: {name}{where}, {num_params:,} parameters; {devices}"


def _latent_space(config, workdir, source, mesh, num_classes, log, resumed):
    """The latent run's autoencoder and scale (estimated from the data on a fresh start)."""
    def estimate(space):
        batches = parallel.DevicePrefetcher(_data_iterator(config, source, mesh, num_classes),
                                            mesh, size=1)
        key = jax.random.fold_in(jax.random.key(config.seed), 0x5CA1E)
        return latent.estimate_scale(space, batches, config.latent.scale_batches, key)

    space = latent.load_space(config, workdir, estimate=estimate, resumed=resumed, log=log)
    if config.latent.precomputed:
        latent.check_precomputed(source, space, config)
    return space


def train_and_evaluate(config, workdir: str, *, log: Callable[[str], None] = _print_now):
    """Train from ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

    Writes checkpoints to ``workdir/checkpoints`` every ``training.checkpoint_every`` steps, at
    the end and when the process receives SIGTERM or SIGINT (then it stops cleanly); TensorBoard
    events (loss, gradient norm, learning rate, steps/s, sample grids) to ``workdir/tensorboard``;
    console lines through ``log``; and sample grids from the EMA parameters to
    ``workdir/samples`` every ``training.sample_every`` steps. A NaN or Inf loss, gradient or
    state raises :class:`TrainingDiverged` before anything from the diverged steps is saved; a
    signal raises :class:`Interrupted` once its checkpoint is saved. Returns the final
    :class:`~diffusion_jax.train_state.TrainState`. The run holds ``workdir`` for itself while it
    runs (:class:`diffusion_jax.workdir.Lock`): a second run there stops with an error.
    """
    parts = run.build(config)
    workdir = workdir_lib.check(workdir, "train")
    with workdir_lib.Lock(workdir, enabled=parallel.is_writer()):
        return _train(config, workdir, parts, log)


def _train(config, workdir, parts, log):
    """:func:`train_and_evaluate` once the config is built and the workdir is held."""
    source, model, example_shape, num_classes, optimizer = parts
    mesh = run.build_mesh(config)
    t = config.training
    if console_lib.size_advice(config):
        log(f"note: {console_lib.size_advice(config)}; the first step will show how long it would take")
    if config.latent.precomputed:
        source = latent.precomputed_source(config)
    iterator = _data_iterator(config, source, mesh, num_classes)
    checkpoints = run.open_checkpoints(config, workdir, example_shape, num_classes, log=log)
    writer = None  # opened once the state is restored: a refused resume writes nothing
    try:
        # The state is created (or restored) directly in its sharding over the mesh.
        abstract = run.abstract_state(config, model, optimizer, example_shape, num_classes)
        # A full disk or an unwritable folder is found now, not at the first save.
        checkpoints.check_writable(ckpt_lib.state_bytes(abstract.replace(frozen=None)))
        state, resumed = _restore_or_init(config, workdir, checkpoints, abstract, mesh, iterator,
                                          parts)
        step_fn = compiled_train_step(config, model, optimizer, num_classes, mesh, abstract)
        # Batches are assembled on the devices ahead of the step; checkpoints record the data
        # position of the last batch used, not of those waiting.
        iterator = parallel.DevicePrefetcher(iterator, mesh, size=t.prefetch,
                                             stack=t.steps_per_call)
        space = None
        if config.latent.autoencoder:
            space = _latent_space(config, workdir, source, mesh, num_classes, log, resumed)
            iterator = latent.LatentBatches(
                iterator, space, seed=config.seed, first_step=int(state.step),
                stack=t.steps_per_call,
                sharding=(parallel.stacked_batch_sharding(mesh) if t.steps_per_call > 1
                          else parallel.batch_sharding(mesh)))
        writer = writers.MetricWriter(os.path.join(workdir, "tensorboard"), console=log,
                                      enabled=parallel.is_writer())
        _write_config_once(config, workdir, model, example_shape)
        writer.text(_describe_model(config, abstract, mesh, example_shape))
        if resumed:
            writer.text(f"resumed from step {int(state.step)} in {checkpoints.directory}")
        if int(state.step) == t.num_steps:
            writer.text(f"the run is already at config.training.num_steps={t.num_steps}; "
                        "nothing to train (raise num_steps to train further)")
        grids = grids_lib.for_run(config, model, example_shape, num_classes, mesh, workdir,
                                  writer, space)
        with loop_control.StopSignals() as signals:
            state, stopped_at = _loop(config, state, step_fn, iterator, mesh, checkpoints,
                                      writer, grids, signals)
        if stopped_at is not None:
            checkpoints.wait()  # the saved step is complete before the run reports it
            writer.text(f"{signals.reason()}: saved step {stopped_at} and stopped")
            raise Interrupted(signals.signal or signal.SIGTERM, stopped_at, state)
    finally:
        checkpoints.close()
        if writer is not None:
            writer.close()
    return state


def _loop(config, state, step_fn, iterator, mesh, checkpoints, writer, grids, signals):
    """Run the steps with their periodic actions; ``(state, step stopped at by a signal)``."""
    t = config.training
    step = int(state.step)
    console = console_lib.Console(writer, config, step)
    running = empty_running_metrics(mesh)
    compiled = None
    window = loop_control.DispatchWindow()  # so that a signal or a log line is not steps late
    while step < t.num_steps:
        batch = next(iterator)
        if compiled is None:  # for the first batch's shapes, then fixed
            start = time.time()
            compiled, state = compile_train_step(step_fn, state, batch, running)
            compile_seconds, start = time.time() - start, time.time()
            state, running = compiled(state, batch, running)
            jax.block_until_ready(running)
            step += t.steps_per_call
            console.first_step(step, compile_seconds,
                               (time.time() - start) / t.steps_per_call)
        else:
            state, running = compiled(state, batch, running)
            step += t.steps_per_call
            window.dispatched(running["finite"])
        at_log = step % t.log_every == 0
        if at_log or step == t.num_steps:
            _check_finite(running, checkpoints, step)
            console.log(step, {k: float(v) for k, v in running["metrics"].compute().items()})
            running = {"metrics": jax.device_put(TrainMetrics.empty(), parallel.replicated(mesh)),
                       "finite": running["finite"]}
        stopping = signals.requested(at_log)
        if step % t.checkpoint_every == 0 or step == t.num_steps or stopping:
            _check_finite(running, checkpoints, step)
            checkpoints.save(step, state, iterator)
        if stopping:
            return state, step
        if t.sample_every and step % t.sample_every == 0:
            _check_finite(running, checkpoints, step)
            grids.write(step, state)
        if at_log:
            writer.flush()
    return state, None
