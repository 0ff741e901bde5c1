"""Materialisation for XLA:CPU: `materialize(x)` is x, computed into a buffer of its own.

A conditional's branches are separate computations, so XLA materialises a conditional's operands and
its result, and runs it once all its operands are computed. `jax.lax.optimization_barrier` cannot do
this on the CPU backend: XLA:CPU expands barriers away before fusion. Users: the transformer stack's
`fusion_barrier` and `after` (mmjax/layers/transformer.py), and DenseGeneral's backward on the CPU
(a transposed kernel copy that XLA would otherwise fold back into the dot; mmjax/layers/linear.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def materialize(x: jax.Array, after: tuple = ()) -> jax.Array:
    """x, in a buffer of its own, available only once every array in `after` is computed."""
    # The predicate is True behind an optimization_barrier (not constant-folded, so the conditional
    # stays; it is not data, so no collective under sharding); the other branch is never taken. It
    # differs from the identity so that XLA does not merge the two branches away, and it reads `after`
    # so that XLA keeps those operands (and with them the ordering).
    def other(a, deps):
        return -a + sum((jnp.sum(d).astype(a.dtype) for d in deps), jnp.zeros((), a.dtype))
    return jax.lax.cond(jax.lax.optimization_barrier(jnp.bool_(True)), lambda a, deps: a, other, x, after)
