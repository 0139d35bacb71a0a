"""Training: the train state, the optimizer, and one pure, jit-compiled training step.

``train_step(state, batch) -> (state, metrics)`` takes host-agnostic arrays and returns a new
state; it draws its randomness from ``fold_in(state.rng, state.step)``, so a run restored from a
checkpoint at step k continues exactly as the uninterrupted run would. The config-driven loop
(data, checkpoints, metrics, sample grids) builds on these pieces.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics
from clu import parameter_overview as clu_parameter_overview

from diffusion_jax import checkpoints as ckpt_lib
from diffusion_jax import configuration, data, losses, parallel, sample, writers

__all__ = [
    "TrainState",
    "TrainMetrics",
    "learning_rate_schedule",
    "make_optimizer",
    "network_apply_fn",
    "create_train_state",
    "make_train_step",
    "TrainingDiverged",
    "build",
    "optimizer_from_config",
    "open_checkpoints",
    "build_mesh",
    "restore_run",
    "sampling_mesh",
    "make_loss_from_config",
    "init_train_state",
    "compiled_train_step",
    "empty_running_metrics",
    "train_and_evaluate",
]


@flax.struct.dataclass
class TrainState:
    """Everything a training run needs to continue: step, parameters, their exponential moving
    average, optimizer state and the base PRNG key (raw uint32 key data, so that it checkpoints
    like any array)."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array


def learning_rate_schedule(learning_rate: float, warmup_steps: int = 0):
    """A linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then constant."""
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not warmup_steps:
        return optax.constant_schedule(learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps),
         optax.constant_schedule(learning_rate)],
        [warmup_steps],
    )


def make_optimizer(
    learning_rate: float,
    *,
    warmup_steps: int = 0,
    grad_clip: Optional[float] = 1.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """AdamW with a linear warmup to ``learning_rate`` and global-norm gradient clipping."""
    schedule = learning_rate_schedule(learning_rate, warmup_steps)
    lr = schedule if warmup_steps else learning_rate  # a constant needs no step counter
    parts = []
    if grad_clip:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)


def network_apply_fn(model, *, num_classes: Optional[int] = None, label_dropout: float = 0.0,
                     label_key: str = "label"):
    """Adapt a Flax denoiser to the loss's ``apply_fn(params, x_in, noise_input, cond, key)``.

    In training, each label is replaced by the null label ``num_classes`` with probability
    ``label_dropout``, which teaches the same network the unconditional denoiser that
    classifier-free guidance needs (Ho & Salimans 2021).
    """
    if label_dropout and num_classes is None:
        raise ValueError("label_dropout needs num_classes (the null label's index)")

    def apply_fn(params, x_in, noise_input, cond, key):
        key_drop, key_labels = jax.random.split(key)
        labels = cond.get(label_key) if num_classes is not None else None
        if labels is not None and label_dropout:
            drop = jax.random.bernoulli(key_labels, label_dropout, labels.shape)
            labels = jnp.where(drop, num_classes, labels)
        return model.apply({"params": params}, x_in, noise_input, labels, train=True,
                           rngs={"dropout": key_drop})

    return apply_fn


def create_train_state(model, optimizer, example_x, key, *, with_labels: bool = False) -> TrainState:
    """Initialise parameters from an example input (only its shape and dtype matter)."""
    key_params, key_dropout, key_rng = jax.random.split(key, 3)
    batch = example_x.shape[0]
    args = [jnp.zeros(example_x.shape, jnp.float32), jnp.zeros((batch,), jnp.float32)]
    if with_labels:
        args.append(jnp.zeros((batch,), jnp.int32))
    variables = model.init({"params": key_params, "dropout": key_dropout}, *args)
    params = variables["params"]
    if jnp.issubdtype(key_rng.dtype, jax.dtypes.prng_key):
        key_rng = jax.random.key_data(key_rng)  # raw uint32 words: plain data for checkpoints
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree_util.tree_map(jnp.copy, params),
        opt_state=optimizer.init(params),
        rng=key_rng,
    )


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                    ema_decay: float = 0.9999):
    """Build the pure ``train_step(state, batch) -> (state, metrics)``.

    ``loss_fn(params, batch, key) -> (loss, aux)`` comes from
    :func:`diffusion_jax.losses.make_loss_fn`. Metrics: ``loss``, ``grad_norm``, and
    ``finite`` (False when the loss or a gradient is NaN or Inf; the caller stops the run then,
    before the state is saved).
    """
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(state.rng, state.step)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree_util.tree_map(
            lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        }
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                                  opt_state=opt_state)
        return new_state, metrics

    return train_step


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN or Inf; nothing from that point was saved."""


def open_checkpoints(config, workdir, example_shape, num_classes) -> "ckpt_lib.Checkpoints":
    """The run's checkpoint manager in ``workdir/checkpoints``. Its fingerprint (model config,
    data shape, classes, target) must match for a checkpoint to be restored."""
    fingerprint = {"model": config.model.to_dict(), "data_shape": list(example_shape),
                   "num_classes": num_classes, "target": config.diffusion.target}
    return ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), fingerprint=fingerprint,
                                max_to_keep=config.training.keep_checkpoints)


def build(config):
    """Validate ``config`` and build (source, model, example_shape, num_classes, optimizer)."""
    configuration.validate(config)
    source = configuration.build_source(config.data)
    example_shape, num_classes = configuration.data_shape(source)
    if not config.data.class_conditional:
        num_classes = None
    model = configuration.build_model(config.model, example_shape, num_classes)
    return source, model, tuple(example_shape), num_classes, optimizer_from_config(config)


def optimizer_from_config(config) -> optax.GradientTransformation:
    """:func:`make_optimizer` with ``config.training``'s settings."""
    t = config.training
    return make_optimizer(t.learning_rate, warmup_steps=t.warmup_steps,
                          grad_clip=t.grad_clip or None, weight_decay=t.weight_decay)


def abstract_train_state(model, optimizer, example_shape, num_classes, seed):
    """The train state's shapes and dtypes, without allocating it."""
    return jax.eval_shape(
        lambda: create_train_state(model, optimizer, jnp.zeros((1,) + tuple(example_shape)),
                                   jax.random.key(seed), with_labels=num_classes is not None))


def _with_shardings(abstract, mesh):
    """The abstract state with each leaf's sharding over ``mesh``, to restore into."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
        parallel.state_shardings(mesh, abstract))


def sampling_mesh(config):
    """The config's mesh when it fits these devices, else all devices data-parallel: a run
    trained on 8 devices generates on 1 (the training batch size plays no part here)."""
    try:
        return parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    except parallel.MeshError:
        return parallel.make_mesh(-1, 1)


def restore_run(config, workdir: str, *, step: Optional[int] = None):
    """Load a trained run: ``(state, model, example_shape, num_classes)`` from the checkpoint of
    ``step`` (default: the latest) in ``workdir``. ``config`` must describe the same model and
    data as the run (``workdir/config.json`` holds the one it was trained with)."""
    _, model, example_shape, num_classes, optimizer = build(config)
    checkpoints = open_checkpoints(config, workdir, example_shape, num_classes)
    try:
        if checkpoints.latest_step() is None:
            raise ckpt_lib.CheckpointError(
                f"no checkpoint in {checkpoints.directory}; train first with "
                f"`python main.py --config=... --workdir={workdir}`")
        abstract = abstract_train_state(model, optimizer, example_shape, num_classes, config.seed)
        state = checkpoints.restore(_with_shardings(abstract, sampling_mesh(config)), step=step)
    finally:
        checkpoints.close()
    return state, model, example_shape, num_classes


def _print_now(line):
    print(line, flush=True)  # visible at once even when stdout is a file


# Averages over the steps since the last log line. (Built with ``create`` rather than a class
# body: clu reads the field types from annotations, which this module keeps as strings.)
TrainMetrics = clu_metrics.Collection.create(loss=clu_metrics.Average.from_output("loss"),
                                             grad_norm=clu_metrics.Average.from_output("grad_norm"))


def _accumulating_step(train_step):
    """``train_step`` that also folds its metrics into a running :class:`TrainMetrics` and a
    running "every step was finite" flag, inside the same compiled call."""

    def step(state, batch, running):
        state, metrics = train_step(state, batch)
        update = TrainMetrics.single_from_model_output(loss=metrics["loss"],
                                                      grad_norm=metrics["grad_norm"])
        return state, {"metrics": running["metrics"].merge(update),
                       "finite": running["finite"] & metrics["finite"]}

    return step


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
    return mesh


def make_loss_from_config(config, model, num_classes):
    """The training loss of ``config.diffusion`` for ``model`` (with label dropout when the
    model is class-conditional)."""
    apply_fn = network_apply_fn(model, num_classes=num_classes,
                                label_dropout=config.diffusion.label_dropout if num_classes else 0.0)
    return losses.make_loss_fn(
        apply_fn, schedule=configuration.build_schedule(config),
        parameterization=configuration.build_parameterization(config),
        time_sampling=config.diffusion.time_sampling,
        time_sampling_params=dict(config.diffusion.time_sampling_params),
        weighting=config.diffusion.weighting,
        weighting_params=dict(config.diffusion.weighting_params))


def init_train_state(config, model, optimizer, example_shape, num_classes, mesh):
    """A fresh train state from ``config.seed``, created directly in its sharding over ``mesh``
    (a model too large for one device never exists whole on one)."""
    abstract = abstract_train_state(model, optimizer, example_shape, num_classes, config.seed)
    return jax.jit(
        lambda: create_train_state(model, optimizer,
                                   jnp.zeros((1,) + tuple(example_shape), jnp.float32),
                                   jax.random.key(config.seed),
                                   with_labels=num_classes is not None),
        out_shardings=parallel.state_shardings(mesh, abstract))()


def compiled_train_step(config, model, optimizer, num_classes, mesh, abstract_state):
    """The step ``train_and_evaluate`` runs: ``step(state, global_batch, running) -> (state,
    running)``, jit-compiled with the state's and batch's shardings over ``mesh``, donating the
    old state; ``running`` accumulates :class:`TrainMetrics` and the all-finite flag (start it
    from :func:`empty_running_metrics`)."""
    loss_fn = make_loss_from_config(config, model, num_classes)
    shardings = parallel.state_shardings(mesh, abstract_state)
    replicated = parallel.replicated(mesh)
    return jax.jit(
        _accumulating_step(make_train_step(loss_fn, optimizer,
                                           ema_decay=config.training.ema_decay)),
        in_shardings=(shardings, parallel.batch_sharding(mesh), replicated),
        out_shardings=(shardings, replicated),
        donate_argnums=(0, 2))


def empty_running_metrics(mesh):
    return jax.device_put({"metrics": TrainMetrics.empty(), "finite": jnp.asarray(True)},
                          parallel.replicated(mesh))


def _to_host(x):
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def train_and_evaluate(config, workdir: str, *, log=_print_now) -> TrainState:
    """Train from ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

    Writes checkpoints to ``workdir/checkpoints`` every ``training.checkpoint_every`` steps, at the
    end and when the process receives SIGTERM or SIGINT (then it stops cleanly); TensorBoard events
    (loss, gradient norm, learning rate, steps/s, sample grids) to ``workdir/tensorboard``; console
    lines through ``log``; and sample grids from the EMA parameters to ``workdir/samples`` every
    ``training.sample_every`` steps. A NaN or Inf loss raises :class:`TrainingDiverged` before
    anything from the diverged steps is saved.
    """
    source, model, example_shape, num_classes, optimizer = build(config)
    mesh = build_mesh(config)
    t = config.training
    learning_rate = learning_rate_schedule(t.learning_rate, t.warmup_steps)

    process_count, process_index = jax.process_count(), jax.process_index()
    if config.data.batch_size % process_count:
        raise configuration.ConfigError(
            f"config.data.batch_size={config.data.batch_size} does not split over "
            f"{process_count} processes")
    iterator = data.make_iterator(source, batch_size=config.data.batch_size // process_count,
                                  seed=config.seed, shard_index=process_index,
                                  shard_count=process_count)
    checkpoints = open_checkpoints(config, workdir, example_shape, num_classes)
    previous_handlers = {}
    writer = None
    try:
        # The state is created (or restored) directly in its sharding over the mesh.
        abstract = abstract_train_state(model, optimizer, example_shape, num_classes, config.seed)
        if checkpoints.latest_step() is not None:
            state = checkpoints.restore(_with_shardings(abstract, mesh), iterator)
            resumed = True
        else:
            state = init_train_state(config, model, optimizer, example_shape, num_classes, mesh)
            resumed = False
        replicated = parallel.replicated(mesh)
        train_step = compiled_train_step(config, model, optimizer, num_classes, mesh, abstract)

        is_writer = process_index == 0
        writer = writers.MetricWriter(os.path.join(workdir, "tensorboard"), console=log,
                                      enabled=is_writer)
        config_path = os.path.join(workdir, "config.json")
        if is_writer and not os.path.exists(config_path):  # the config the run started with
            os.makedirs(workdir, exist_ok=True)
            sample.save_json(config_path, json.loads(config.to_json_best_effort()))
        num_params = clu_parameter_overview.count_parameters(abstract.params)
        writer.text(f"model: {config.model.name}, {num_params:,} parameters; mesh "
                    f"data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} over "
                    f"{mesh.devices.size} {jax.devices()[0].platform} device(s)")
        if resumed:
            writer.text(f"resumed from step {int(state.step)} in {checkpoints.directory}")

        stop = {"signal": None}

        def request_stop(signum, frame):
            stop["signal"] = signum

        for s in (signal.SIGTERM, signal.SIGINT):
            previous_handlers[s] = signal.signal(s, request_stop)

        def stop_requested(at_log_boundary):
            """Whether to save and stop now. With several processes they must agree (a save is
            collective), so they compare their flags at log boundaries, where all are at the
            same step."""
            if process_count == 1:
                return stop["signal"] is not None
            if not at_log_boundary:
                return False
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.int32(stop["signal"] is not None))
            return bool(np.any(flags))

        generate = None
        step = first_step = int(state.step)
        running = empty_running_metrics(mesh)
        last_time, last_step = time.time(), step

        def check_finite():
            if not bool(running["finite"]):
                latest = checkpoints.latest_step()
                before = ("no checkpoint was written" if latest is None else
                          f"the last checkpoint, step {latest} in {checkpoints.directory}, is "
                          "from before")
                raise TrainingDiverged(
                    f"loss or gradients became NaN/Inf before step {step}; {before}. Lower "
                    "training.learning_rate or check the data.")

        stopping = False
        while step < t.num_steps and not stopping:
            batch = parallel.global_batch(next(iterator), mesh)
            state, running = train_step(state, batch, running)
            step += 1
            if step == first_step + 1:  # leave compilation out of steps/s
                jax.block_until_ready(running)
                compile_seconds = time.time() - last_time
                last_time, last_step = time.time(), step
            if step % t.log_every == 0 or step == t.num_steps:
                check_finite()
                values = {k: float(v) for k, v in running["metrics"].compute().items()}
                running = {"metrics": jax.device_put(TrainMetrics.empty(), replicated),
                           "finite": running["finite"]}
                scalars = {"train/loss": values["loss"], "train/grad_norm": values["grad_norm"],
                           "train/learning_rate": float(learning_rate(step - 1))}
                now = time.time()
                if step > last_step:
                    rate = (step - last_step) / max(now - last_time, 1e-9)
                    eta = (t.num_steps - step) / max(rate, 1e-9)
                    speed = f"{rate:.2f} steps/s  ETA {writers.format_duration(eta)}"
                    scalars["train/steps_per_sec"] = rate
                else:
                    speed = f"first step (with compilation) {compile_seconds:.1f} s"
                last_time, last_step = now, step
                writer.text(f"step {step}/{t.num_steps} {writers.progress_bar(step, t.num_steps)}"
                            f"  loss {values['loss']:.4f}  grad_norm {values['grad_norm']:.3f}  "
                            f"{speed}")
                writer.scalars(step, scalars)
            stopping = stop_requested(step % t.log_every == 0)
            if step % t.checkpoint_every == 0 or step == t.num_steps or stopping:
                check_finite()
                checkpoints.save(step, state, iterator)
            if t.sample_every and step % t.sample_every == 0 and not stopping:
                check_finite()
                if generate is None:
                    generate = jax.jit(sample.make_generate_fn(config, model, example_shape,
                                                               num_classes, mesh=mesh),
                                       static_argnums=2)
                images = _to_host(generate(state.ema_params,
                                           jax.random.key(config.sampling.seed),
                                           config.sampling.num_samples))
                if is_writer and len(example_shape) == 3:
                    grid = sample.save_grid(images, os.path.join(workdir, "samples",
                                                                 f"step_{step:08d}.png"))
                    writer.image(step, "samples/ema", grid)
            if step % t.log_every == 0:
                writer.flush()
        if stopping:
            reason = (f"received signal {stop['signal']}" if stop["signal"] is not None
                      else "another process received a signal")
            writer.text(f"{reason}: saved step {step} and stopped")
    finally:
        checkpoints.close()
        if writer is not None:
            writer.close()
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    return state

