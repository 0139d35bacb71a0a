"""Loss and gradients over a batch: microbatch accumulation, and the explicit sharded path.

:func:`mean_loss_and_grads` is what a train step differentiates on one program that XLA
partitions (``jax.jit`` with shardings); :func:`sharded_loss_and_grads` computes the same with
``jax.shard_map``, each device on its shard of the batch, with the gradients of parameters split
over ``fsdp`` reduce-scattered back to their shards (ZeRO-style) instead of all-reduced whole.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax import parallel

__all__ = ["mean_loss_and_grads", "sharded_loss_and_grads"]


def _microbatches(tree, num: int, sharding=None):
    """Split the leading axis of every leaf into ``num`` interleaved microbatches.

    They are stacked on a new leading axis: microbatch j holds examples j, j + num, ... so that
    each device's contiguous shard of the batch contributes equally to every microbatch (no
    data moves).
    """

    def split(x):
        x = x.reshape((x.shape[0] // num, num) + x.shape[1:]).swapaxes(0, 1)
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree_util.tree_map(split, tree)


def mean_loss_and_grads(compute, params, batch, draws, grad_accumulation, sharding=None):
    """Loss and gradients of ``compute`` over the batch, in ``grad_accumulation`` microbatches.

    The microbatches run one after another in a ``lax.scan``; their mean equals the whole
    batch's (equal sizes, mean losses). ``draws`` holds the randomness drawn for the whole batch
    (its ``key`` is folded with the microbatch index).
    """
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


def sharded_loss_and_grads(compute, mesh, grad_accumulation: int = 1):
    """``loss_and_grads(params, batch, draws) -> (loss, grads)`` computed with ``jax.shard_map``.

    Each device runs the network on its shard of the batch with the whole parameters, and the
    gradients are averaged over the mesh. Parameters that the state splits over ``fsdp`` come
    in split, are all-gathered for the network, and their gradients are reduce-scattered back
    (``lax.psum_scatter``) and averaged over ``data``; the others are averaged with
    ``lax.pmean``. Gradients are taken inside the mapped function on each device's local copy,
    so they are per-device gradients that these collectives average (differentiating *through*
    a ``shard_map`` instead would return the gradient of replicated parameters already summed
    over devices). Dropout masks are drawn per device (the network key is folded with the
    device's index), so this agrees with :func:`mean_loss_and_grads` exactly for networks
    without dropout and in distribution otherwise.
    """
    P = jax.sharding.PartitionSpec
    axes = parallel.BATCH_AXES
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

    def loss_and_grads(params, batch, draws):
        # Each leaf enters in the state's sharding (split over fsdp or whole): split ones are
        # gathered inside, and their gradients leave split, with a reduce-scatter.
        specs = jax.tree_util.tree_map(lambda s: s.spec, parallel.state_shardings(mesh, params))

        def local(params, batch, sharded_draws, key):
            index = (jax.lax.axis_index(axes[0]) * jax.lax.psum(1, axes[1])
                     + jax.lax.axis_index(axes[1]))
            draws = {**sharded_draws, "key": jax.random.fold_in(key, index)}
            whole = jax.tree_util.tree_map(gather, params, specs)
            loss, grads = mean_loss_and_grads(compute, whole, batch, draws, grad_accumulation)
            return jax.lax.pmean(loss, axes), jax.tree_util.tree_map(reduce, grads, specs)

        mapped = parallel.shard_map(local, mesh=mesh, in_specs=(specs, P(axes), P(axes), P()),
                                    out_specs=(P(), specs))
        return mapped(params, batch, {k: v for k, v in draws.items() if k != "key"},
                      draws["key"])

    return loss_and_grads
