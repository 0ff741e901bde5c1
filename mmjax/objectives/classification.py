"""Softmax cross-entropy for classification, with optional label smoothing and a validity mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def softmax_xent(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0,
                 mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-example loss [B] and correct-top-1 [B] (both zeroed where mask is False).

    loss_i = −Σ_c q_ic log softmax(z_i)_c with q = (1−ε)·onehot(y) + ε/C.
    """
    num_classes = logits.shape[-1]
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be [B] for logits {logits.shape}, got {labels.shape}")
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    if mask is not None:
        loss, correct = loss * mask, correct * mask
    return loss, correct
