"""The step factory: a task's loss → a pure `(state, batch) -> (state, metrics)`.

    loss_fn(params, extra, batch, rng) -> (loss, (metrics, new_extra))

The returned step computes grads, applies the optimizer and reports loss, grad norm and learning
rate with the task's metrics. Metrics are reduced over the global batch inside the step (the
task's loss is a mean over the global batch), so every process sees the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mmjax.train.state import TrainState

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, tuple[dict, Any]]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None):
    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (metrics, extra)), grads = grad_fn(state.params, state.extra, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra)
        return new, metrics
    return step


def jit_train_step(step_fn, state_shardings, batch_shardings):
    """jax.jit with explicit in/out shardings and the state donated (updated in place)."""
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))
