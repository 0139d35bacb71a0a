"""Model FLOPs counted from the jaxpr: the denominator-free half of MFU.

XLA's cost analysis is backend-specific (on GPU it does not count convolutions that run in
cuDNN), so MFU figures here come from counting the matrix work in the traced program instead:
every ``dot_general`` and ``conv_general_dilated`` contributes 2 x (multiply-adds), counted
through nested jits, remat, custom derivatives, ``scan`` (times its length) and ``cond`` (the
most expensive branch). Element-wise work (norms, activations, softmax) is not counted, which is
the usual convention for MFU.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax

__all__ = ["count_flops", "jaxpr_flops"]


def _dot_flops(eqn) -> float:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
    contract = math.prod(lhs.shape[d] for d in lhs_contract)
    out = math.prod(eqn.outvars[0].aval.shape)
    return 2.0 * out * contract


def _conv_flops(eqn) -> float:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    dims = eqn.params["dimension_numbers"]
    out = math.prod(eqn.outvars[0].aval.shape)
    # rhs spec: (out feature dim, in feature dim, spatial dims...)
    rhs_spec = dims.rhs_spec
    in_features = rhs.shape[rhs_spec[1]]
    window = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    return 2.0 * out * in_features * window


def _sub_jaxprs(eqn):
    """(jaxpr, multiplier) pairs of the sub-programs an equation runs."""
    params = eqn.params
    name = eqn.primitive.name
    if name == "scan":
        return [(params["jaxpr"], params["length"])]
    if name == "cond":
        return [("max", [b for b in params["branches"]])]
    found = []
    for value in params.values():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if hasattr(v, "eqns") or hasattr(v, "jaxpr"):
                found.append((v, 1))
    return found


def jaxpr_flops(jaxpr) -> float:
    """Matmul and convolution FLOPs of a (closed) jaxpr."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        else:
            for sub, mult in _sub_jaxprs(eqn):
                if sub == "max":
                    total += max(jaxpr_flops(b) for b in mult)
                else:
                    total += mult * jaxpr_flops(sub)
    return total


def count_flops(fn: Callable, *args: Any, **kwargs: Any) -> float:
    """Matmul and convolution FLOPs of one call ``fn(*args, **kwargs)``.

    Arguments may be ``jax.ShapeDtypeStruct``s; nothing is computed."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))
