"""Token cross-entropy for language models, with a loss mask, an optional z-loss and accuracy.

For logits z [B, T, V] and targets y [B, T] (the next token: y_t = ids_{t+1}) with weights w [B, T]
(0 where a position leaves the loss: padding, prompts, image positions in a VLM):

    lse_t   = log Σ_v exp z_tv                          (computed once, in float32)
    nll_t   = lse_t − z_{t, y_t}                         (= −log softmax(z_t)[y_t])
    zloss_t = c · lse_t²                                 (PaLM's z-loss: keeps the normaliser near 0)
    sums    = Σ_t w_t · (nll_t, zloss_t, [argmax z_t = y_t]),  weight_sum = Σ_t w_t

Sums and counts are returned, not means, so a caller averages over the global batch (or over
several micro-batches) by dividing sums by `weight_sum` once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lm_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None, *,
                     z_loss: float = 0.0) -> dict[str, jax.Array]:
    """Weighted token cross-entropy sums.

    Args:
      logits: [B, T, V], any float dtype (cast to float32 once here).
      targets: int [B, T] in [0, V).
      weights: [B, T] (bool or float); None = every token counts.
      z_loss: coefficient c of c · logsumexp² (0 = off).
    Returns:
      {"loss_sum": Σ w·(nll + zloss), "nll_sum": Σ w·nll, "z_loss_sum": Σ w·zloss,
       "correct_sum": Σ w·[argmax = target], "weight_sum": Σ w}: float32 scalars.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {logits.shape}")
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets must be [B, T] = {logits.shape[:2]} for logits {logits.shape}, got {targets.shape}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must be integer token ids, got {targets.dtype}")
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    if weights.shape != targets.shape:
        raise ValueError(f"weights must be [B, T] = {targets.shape}, got {weights.shape}")
    if z_loss < 0:
        raise ValueError(f"z_loss coefficient must be >= 0, got {z_loss}")
    w = weights.astype(jnp.float32)
    z = logits.astype(jnp.float32)  # the one float32 copy of the logits
    lse = jax.nn.logsumexp(z, axis=-1)  # [B, T]
    target_logit = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = lse - target_logit
    zl = z_loss * jnp.square(lse)
    correct = (jnp.argmax(z, axis=-1) == targets).astype(jnp.float32)
    nll_sum, z_sum = jnp.sum(w * nll), jnp.sum(w * zl)
    return {"loss_sum": nll_sum + z_sum, "nll_sum": nll_sum, "z_loss_sum": z_sum,
            "correct_sum": jnp.sum(w * correct), "weight_sum": jnp.sum(w)}


def next_token_targets(ids: jax.Array, weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Shift for next-token prediction: inputs ids[:, :-1], targets ids[:, 1:], and the weights of
    the targets (weights[:, 1:], i.e. a target counts when the token predicted counts). ids [B, T]."""
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise ValueError(f"ids must be [B, T] with T >= 2 to predict next tokens, got shape {ids.shape}")
    w = jnp.ones(ids.shape, jnp.float32) if weights is None else weights
    if w.shape != ids.shape:
        raise ValueError(f"weights must be [B, T] = {ids.shape}, got {w.shape}")
    return ids[:, :-1], ids[:, 1:], w[:, 1:]
