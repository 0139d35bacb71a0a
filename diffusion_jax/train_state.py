"""The train state: what a run checkpoints, and how it is created and laid out on devices."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from diffusion_jax import parallel

__all__ = ["TrainState", "create_train_state", "abstract_train_state", "with_shardings",
           "init_train_state", "state_from_params", "model_params"]


@flax.struct.dataclass
class TrainState:
    """Everything a training run needs to continue.

    That is the step, the parameters, their exponential moving average, the optimizer state and
    the base PRNG key (raw uint32 key data, so that it checkpoints like any array).

    A run that trains adapters of a frozen model (LoRA, :mod:`diffusion_jax.lora_runs`) keeps
    that model's parameters once in ``frozen`` (no EMA, no optimizer state; not checkpointed:
    they are read again from where they came from), ``params`` are the adapters, and
    ``compose(frozen, params)`` (static) gives the parameters the network runs with; see
    :func:`model_params`.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    frozen: Any = None
    compose: Any = flax.struct.field(pytree_node=False, default=None)


def model_params(state: TrainState, use_ema: bool = True):
    """The parameters the network runs with: the EMA (or raw) ones, on the base of an adapter run."""
    params = state.ema_params if use_ema else state.params
    return params if state.compose is None else state.compose(state.frozen, params)


def create_train_state(model, optimizer, example_x, key, *,
                       with_labels: bool = False) -> TrainState:
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


def abstract_train_state(model, optimizer, example_shape, num_classes, seed):
    """The train state's shapes and dtypes, without allocating it."""
    return jax.eval_shape(
        lambda: create_train_state(model, optimizer, jnp.zeros((1,) + tuple(example_shape)),
                                   jax.random.key(seed), with_labels=num_classes is not None))


def with_shardings(abstract, mesh):
    """The abstract state with each leaf's sharding over ``mesh``, to restore into."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
        parallel.state_shardings(mesh, abstract))


def init_train_state(config, model, optimizer, example_shape, num_classes, mesh):
    """A fresh train state from ``config.seed``, created directly in its sharding over ``mesh``.

    A model too large for one device never exists whole on one.
    """
    abstract = abstract_train_state(model, optimizer, example_shape, num_classes, config.seed)
    return jax.jit(
        lambda: create_train_state(model, optimizer,
                                   jnp.zeros((1,) + tuple(example_shape), jnp.float32),
                                   jax.random.key(config.seed),
                                   with_labels=num_classes is not None),
        out_shardings=parallel.state_shardings(mesh, abstract))()


def state_from_params(config, optimizer, params, abstract, mesh):
    """A fresh train state around given parameters (a pretrained model's), in its shardings.

    The EMA starts at ``params``, the optimizer state is the optimizer's initial one and the
    base key is the one :func:`init_train_state` would draw from ``config.seed``; ``params``
    must already lie in the shardings of ``abstract``'s parameters over ``mesh``."""

    def make(params):
        key_rng = jax.random.key_data(jax.random.split(jax.random.key(config.seed), 3)[2])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          ema_params=jax.tree_util.tree_map(jnp.copy, params),
                          opt_state=optimizer.init(params), rng=key_rng)

    return jax.jit(make, out_shardings=parallel.state_shardings(mesh, abstract))(params)
