"""Training: the train state, the optimizer, and one pure, jit-compiled training step.

``train_step(state, batch) -> (state, metrics)`` takes host-agnostic arrays and returns a new
state; it draws its randomness from ``fold_in(state.rng, state.step)``, so a run restored from a
checkpoint at step k continues exactly as the uninterrupted run would. The config-driven loop
(data, checkpoints, metrics, sample grids) builds on these pieces.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
import warnings
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics
from clu import parameter_overview as clu_parameter_overview
from jax.experimental.layout import Format, Layout

from diffusion_jax import checkpoints as ckpt_lib
from diffusion_jax import configuration, data, losses, parallel, sample, writers

__all__ = [
    "TrainState",
    "TrainMetrics",
    "learning_rate_schedule",
    "make_optimizer",
    "clip_by_global_norm",
    "network_apply_fn",
    "drop_labels",
    "drop_captions",
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
    "compile_train_step",
    "place_state",
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


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """``optax.clip_by_global_norm`` (same rule, same empty state, so checkpoints are the same)
    that takes the norm as ``update(..., grad_norm=...)`` when the caller has computed it: the
    train step computes it once, for the metric too, with :func:`parallel.global_norm` in the
    way that suits the mesh. Without it, the norm is computed here, leaf by leaf. A given norm
    must be that of the updates this transformation receives, so it goes first in a chain (as
    in :func:`make_optimizer`)."""

    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = parallel.global_norm(updates) if grad_norm is None else grad_norm
        keep = norm < max_norm
        return jax.tree_util.tree_map(
            lambda g: jax.lax.select(keep, g, (g / norm.astype(g.dtype)) * max_norm),
            updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


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
        parts.append(clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)


def drop_labels(num_classes: int, label_dropout: float, label_key: str = "label"):
    """A loss ``prepare(batch, key) -> batch`` that replaces each label by the null label
    ``num_classes`` with probability ``label_dropout``, which teaches the same network the
    unconditional denoiser that classifier-free guidance needs (Ho & Salimans 2021). The draw
    uses the global batch's shape, so every way of splitting the batch drops the same labels."""

    def prepare(batch, key):
        if label_key not in batch:
            return batch
        labels = batch[label_key]
        drop = jax.random.bernoulli(key, label_dropout, labels.shape)
        return {**batch, label_key: jnp.where(drop, num_classes, labels)}

    return prepare


def drop_captions(caption_dropout: float, max_length: int):
    """A loss ``prepare(batch, key) -> batch`` that replaces each caption by the empty caption
    with probability ``caption_dropout`` (classifier-free guidance's unconditional branch),
    drawn for the whole global batch."""
    from diffusion_jax import text as text_lib

    null_tokens, null_mask = (jnp.asarray(a[0]) for a in text_lib.null_text(max_length))

    def prepare(batch, key):
        if "tokens" not in batch:
            return batch
        tokens, mask = batch["tokens"], batch["token_mask"]
        drop = jax.random.bernoulli(key, caption_dropout, tokens.shape[:1])[:, None]
        return {**batch, "tokens": jnp.where(drop, null_tokens[:tokens.shape[1]], tokens),
                "token_mask": jnp.where(drop, null_mask[:tokens.shape[1]], mask)}

    return prepare


def network_apply_fn(model, *, num_classes: Optional[int] = None, label_dropout: float = 0.0,
                     label_key: str = "label", dropout_rng: str = "threefry"):
    """Adapt a Flax denoiser to the loss's ``apply_fn(params, x_in, noise_input, cond, key)``.

    With ``label_dropout``, labels are also dropped here (see :func:`drop_labels`; the config
    path drops them in the loss's ``prepare`` stage instead, before the batch is split).
    ``dropout_rng="rbg"`` draws the dropout masks with XLA's RngBitGenerator, seeded from the
    step's key (cheaper on accelerators; the masks then depend on how the batch is laid out).
    """
    if label_dropout and num_classes is None:
        raise ValueError("label_dropout needs num_classes (the null label's index)")
    if dropout_rng not in ("threefry", "rbg"):
        raise ValueError(f"dropout_rng must be 'threefry' or 'rbg', got {dropout_rng!r}")

    def apply_fn(params, x_in, noise_input, cond, key):
        key_drop, key_labels = jax.random.split(key)
        if dropout_rng == "rbg":
            key_drop = jax.random.wrap_key_data(
                jax.random.bits(key_drop, (4,), jnp.uint32), impl="rbg")
        if num_classes is not None and label_dropout:
            cond = drop_labels(num_classes, label_dropout, label_key)(cond, key_labels)
        labels = cond.get(label_key) if num_classes is not None else None
        text = {k: cond[k] for k in sample.TEXT_KEYS if k in cond}
        return model.apply({"params": params}, x_in, noise_input, labels, train=True,
                           rngs={"dropout": key_drop}, **text)

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


def _microbatches(tree, num: int, sharding=None):
    """Split the leading axis of every leaf into ``num`` interleaved microbatches, stacked on a
    new leading axis: microbatch j holds examples j, j + num, ... so that each device's
    contiguous shard of the batch contributes equally to every microbatch (no data moves)."""

    def split(x):
        x = x.reshape((x.shape[0] // num, num) + x.shape[1:]).swapaxes(0, 1)
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree_util.tree_map(split, tree)


def _mean_grads(compute, params, batch, draws, grad_accumulation, sharding=None):
    """Loss and gradients of ``compute`` over the batch, in ``grad_accumulation`` sequential
    microbatches (their mean equals the whole batch's: equal sizes, mean losses)."""
    grad_fn = jax.value_and_grad(compute, has_aux=True)
    if grad_accumulation == 1:
        (loss, _), grads = grad_fn(params, batch, draws)
        return loss, grads
    key = draws["key"]
    data = _microbatches((batch, {k: v for k, v in draws.items() if k != "key"}),
                         grad_accumulation, sharding)

    def body(carry, inputs):
        index, (micro_batch, micro_draws) = inputs
        micro_draws = {**micro_draws, "key": jax.random.fold_in(key, index)}
        (loss, _), grads = grad_fn(params, micro_batch, micro_draws)
        total_loss, total_grads = carry
        return (total_loss + loss, jax.tree_util.tree_map(jnp.add, total_grads, grads)), None

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                    (jnp.arange(grad_accumulation), data))
    scale = 1.0 / grad_accumulation
    return loss * scale, jax.tree_util.tree_map(lambda g, p: (g * scale).astype(p.dtype), grads,
                                                params)


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                    ema_decay: float = 0.9999, grad_accumulation: int = 1, mesh=None,
                    use_shard_map: bool = False):
    """Build the pure ``train_step(state, batch) -> (state, metrics)``.

    ``loss_fn(params, batch, key) -> (loss, aux)`` comes from
    :func:`diffusion_jax.losses.make_loss_fn`. Metrics: ``loss``, ``grad_norm``, and
    ``finite`` (False when the loss or a gradient is NaN or Inf; the caller stops the run then,
    before the state is saved).

    ``grad_accumulation`` splits the batch into that many microbatches whose gradients are
    summed in a ``lax.scan`` (the same update as the whole batch, with a fraction of the
    activation memory). All randomness is drawn for the whole (global) batch first, so the
    result does not depend on how the batch is split.

    ``use_shard_map`` (needs ``mesh``) computes loss and gradients with ``jax.shard_map``: each
    device runs the network on its shard of the batch with the whole parameters and the
    gradients are averaged over the mesh. Parameters that the state splits over ``fsdp`` come
    in split, are all-gathered for the network, and their gradients are reduce-scattered back
    (``lax.psum_scatter``) and averaged over ``data``; the others are averaged with
    ``lax.pmean``. The optimizer update then runs on the state in its sharding as in the
    default path. Gradients are taken inside the mapped function on each device's local copy,
    so they are per-device gradients that these collectives average (differentiating
    *through* a ``shard_map`` instead would return the gradient of replicated parameters
    already summed over devices). Dropout masks are drawn per device (the network key is folded
    with the device's index), so the two paths agree exactly for networks without dropout and
    in distribution otherwise.
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
    micro_sharding = None
    if mesh is not None and not use_shard_map:
        micro_sharding = jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(None, parallel.BATCH_AXES))

    def loss_and_grads(params, batch, draws):
        if not use_shard_map:
            return _mean_grads(compute, params, batch, draws, grad_accumulation, micro_sharding)
        P = jax.sharding.PartitionSpec
        axes = parallel.BATCH_AXES
        # Each leaf enters in the state's sharding (split over fsdp or whole): split ones are
        # gathered inside, and their gradients leave split, with a reduce-scatter.
        specs = jax.tree_util.tree_map(lambda s: s.spec, parallel.state_shardings(mesh, params))
        fsdp = mesh.shape["fsdp"]

        def gather(leaf, spec):
            split = parallel.split_axis(spec)
            if split is None:
                return leaf
            return jax.lax.all_gather(leaf, "fsdp", axis=split, tiled=True)

        def reduce(grad, spec):  # the mean over every device, kept in the leaf's sharding
            split = parallel.split_axis(spec)
            if split is None:
                return jax.lax.pmean(grad, axes)
            grad = jax.lax.psum_scatter(grad, "fsdp", scatter_dimension=split, tiled=True)
            return jax.lax.pmean(grad / fsdp, "data") if mesh.shape["data"] > 1 else grad / fsdp

        def local(params, batch, draws):
            index = jax.lax.axis_index(axes[0]) * jax.lax.psum(1, axes[1]) + jax.lax.axis_index(
                axes[1])
            draws = {**draws, "key": jax.random.fold_in(draws["key"], index)}
            whole = jax.tree_util.tree_map(gather, params, specs)
            loss, grads = _mean_grads(compute, whole, batch, draws, grad_accumulation)
            return jax.lax.pmean(loss, axes), jax.tree_util.tree_map(reduce, grads, specs)

        key = draws["key"]
        sharded_draws = {k: v for k, v in draws.items() if k != "key"}
        mapped = parallel.shard_map(
            lambda p, b, d, k: local(p, b, {**d, "key": k}), mesh=mesh,
            in_specs=(specs, P(axes), P(axes), P()), out_specs=(P(), specs))
        return mapped(params, batch, sharded_draws, key)

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(state.rng, state.step)
        batch, draws = draw(batch, key)
        loss, grads = loss_and_grads(state.params, batch, draws)
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
    fingerprint = {"model": _model_fingerprint(config.model), "data_shape": list(example_shape),
                   "num_classes": num_classes, "target": config.diffusion.target}
    from configs import default

    defaults = {"model": _model_fingerprint(default.get_config().model)}
    return ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), fingerprint=fingerprint,
                                max_to_keep=config.training.keep_checkpoints,
                                fingerprint_defaults=defaults)


# Model settings that change how the network computes, not its parameters: a checkpoint
# restores under any value of these.
_NOT_IN_FINGERPRINT = ("dtype", "remat", "dropout_rng", "attention")


def _model_fingerprint(model_config):
    return {k: v for k, v in model_config.to_dict().items() if k not in _NOT_IN_FINGERPRINT}


def build(config):
    """Validate ``config`` and build (source, model, example_shape, num_classes, optimizer)."""
    configuration.validate(config)
    source = configuration.build_source(config.data)
    example_shape, num_classes = configuration.data_shape(source)
    if not config.data.class_conditional:
        num_classes = None
    model = configuration.build_denoiser(config, example_shape, num_classes)
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


def _accumulating_step(train_step, steps_per_call: int = 1):
    """``train_step`` that also folds its metrics into a running :class:`TrainMetrics` and a
    running "every step was finite" flag, inside the same compiled call. With
    ``steps_per_call`` > 1 the batch is a ``[steps_per_call, batch, ...]`` stack and the steps
    run in a ``lax.scan`` inside one device call (fewer host round trips for small models)."""

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


def make_loss_from_config(config, model, num_classes):
    """The training loss of ``config.diffusion`` for ``model`` (with label dropout, drawn for the
    whole global batch, when the model is class-conditional)."""
    apply_fn = network_apply_fn(model, num_classes=num_classes,
                                dropout_rng=config.model.dropout_rng)
    label_dropout = config.diffusion.label_dropout if num_classes else 0.0
    prepares = []
    if label_dropout:
        prepares.append(drop_labels(num_classes, label_dropout))
    if config.data.name == "captions" and config.diffusion.caption_dropout:
        prepares.append(drop_captions(config.diffusion.caption_dropout, config.text.max_length))

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
        prepare=prepare if prepares else None)


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
    from :func:`empty_running_metrics`).

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
    """``state`` with every array in its format (layout and sharding) of ``formats``, e.g. a
    compiled step's ``input_formats``. Arrays already there are passed through; the others are
    copied one at a time and donated, so the state never exists twice in device memory."""
    def move(x, target):
        return x if x.format == target else jax.device_put(x, target, donate=True)

    return jax.tree_util.tree_map(move, state, formats)


def empty_running_metrics(mesh):
    return jax.device_put({"metrics": TrainMetrics.empty(), "finite": jnp.asarray(True)},
                          parallel.replicated(mesh))


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

    process_count = jax.process_count()
    if config.data.batch_size % process_count:
        raise configuration.ConfigError(
            f"config.data.batch_size={config.data.batch_size} does not split over "
            f"{process_count} processes")
    # This process's slice of every global batch: the rows the mesh puts on its devices.
    slot, _ = parallel.process_batch_slot(mesh, config.data.batch_size)
    iterator = data.make_iterator(source, batch_size=config.data.batch_size // process_count,
                                  max_length=config.text.max_length,
                                  seed=config.seed, shard_index=slot,
                                  shard_count=process_count,
                                  worker_count=config.data.worker_count)
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
        per_call = t.steps_per_call
        if int(state.step) % per_call:
            raise configuration.ConfigError(
                f"the checkpoint is at step {int(state.step)}, which is not a multiple of "
                f"config.training.steps_per_call={per_call}; resume with a steps_per_call that "
                "divides it (e.g. the one the run was started with)")
        # Batches are assembled on the devices ahead of the step; checkpoints record the data
        # position of the last batch used, not of those waiting.
        iterator = parallel.DevicePrefetcher(iterator, mesh, size=t.prefetch, stack=per_call)

        is_writer = parallel.is_writer()
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
        compiled = None
        while step < t.num_steps and not stopping:
            batch = next(iterator)
            if compiled is None:  # for the first batch's shapes, then fixed
                compiled, state = compile_train_step(train_step, state, batch, running)
            state, running = compiled(state, batch, running)
            step += per_call
            if step == first_step + per_call:  # leave compilation out of steps/s
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
                images = parallel.to_host(generate(state.ema_params,
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

