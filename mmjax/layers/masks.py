"""One helper for every attention mask: full, causal, prefix-LM and padding, in any combination.

Masks are boolean, True = may attend, shaped [B, 1, Q, K] to broadcast over heads in
`jax.nn.dot_product_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def make_attention_mask(
    q_len: int,
    kv_len: int | None = None,
    *,
    causal: bool = False,
    prefix_len: jax.Array | int | None = None,
    kv_valid: jax.Array | None = None,
    q_offset: jax.Array | int = 0,
) -> jax.Array:
    """Boolean attention mask [B or 1, 1, q_len, kv_len].

    Args:
      q_len, kv_len: query and key lengths (kv_len defaults to q_len).
      causal: query i sees keys j ≤ i (positions counted from `q_offset` for the queries, so a
        KV-cache step at position t passes q_offset=t).
      prefix_len: prefix-LM: keys j < prefix_len[b] are visible to every query (bidirectional
        prefix, causal after it). Scalar or [B]. Only meaningful with causal=True.
      kv_valid: [B, K] bool, False for padding keys (padding queries still attend somewhere valid,
        so their rows stay finite; their outputs are ignored by the loss).
      q_offset: scalar or [B]: absolute position of query 0.
    """
    kv_len = q_len if kv_len is None else kv_len
    q_pos = jnp.arange(q_len)[None, :, None] + jnp.reshape(jnp.asarray(q_offset), (-1, 1, 1))
    k_pos = jnp.arange(kv_len)[None, None, :]
    mask = jnp.ones((1, q_len, kv_len), dtype=bool)
    if causal:
        mask = k_pos <= q_pos
        if prefix_len is not None:
            prefix = jnp.reshape(jnp.asarray(prefix_len), (-1, 1, 1))
            mask = mask | (k_pos < prefix)
    elif prefix_len is not None:
        raise ValueError("prefix_len only makes sense with causal=True (prefix-LM)")
    if kv_valid is not None:
        if kv_valid.shape[-1] != kv_len:
            raise ValueError(f"kv_valid has length {kv_valid.shape[-1]}, expected {kv_len}")
        mask = mask & kv_valid[:, None, :].astype(bool)
    return mask[:, None, :, :]
