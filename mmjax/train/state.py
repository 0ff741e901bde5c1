"""The train state: one pytree that the step transforms and the checkpoint saves."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import optax


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar; params: the model's params; opt_state: optax state; rng: a PRNG key
    (folded with the step inside the step function, so every step sees fresh randomness and a
    resumed run sees the same); extra: task-owned state that is not trained by gradient (e.g. an
    EMA of params, a codebook's usage counts); empty for most tasks."""

    step: jax.Array
    params: Any
    opt_state: optax.OptState
    rng: jax.Array
    extra: Any = flax.struct.field(default_factory=dict)

    @classmethod
    def create(cls, *, params, tx: optax.GradientTransformation, rng: jax.Array, extra=None):
        import jax.numpy as jnp
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng,
                   extra={} if extra is None else extra)
