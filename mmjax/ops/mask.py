"""One helper for every attention mask: full, causal, prefix-LM, padding and segments (packed
sequences with a shared prefix), in any combination.

Masks are boolean, True = may attend. `make_attention_mask` builds the array [B or 1, 1, Q, K];
`AttentionMask` is the same mask described by its parts, so that an attention implementation can
use a kernel's own masking (cuDNN's causal and padding masks, splash attention's causal mask and
segment ids) instead of reading a [B, 1, Q, K] array; `.array(q_len, kv_len)` materialises it.
"""

from __future__ import annotations

import flax.struct
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
    segment_ids: jax.Array | None = None,
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
      segment_ids: [B, T] int (queries and keys are the same T tokens): a query sees keys of its own
        segment and of segment 0, the prefix every segment shares (e.g. an image and the questions
        packed after it, each seeing the image and itself; plain packing numbers segments from 1).
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
    if segment_ids is not None:
        if segment_ids.ndim != 2 or segment_ids.shape[-1] != q_len or q_len != kv_len:
            raise ValueError(f"segment_ids must be [B, T] for T queries and T keys, got {segment_ids.shape} "
                             f"with {q_len} queries and {kv_len} keys (no KV cache with segments)")
        seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
        mask = mask & ((seg_k == seg_q) | (seg_k == 0))
    return mask[:, None, :, :]


@flax.struct.dataclass
class AttentionMask:
    """A mask by its parts (the arguments of `make_attention_mask`); a pytree, so it passes through
    jit, nn.scan and remat like an array. causal is static; the rest may be traced."""

    causal: bool = flax.struct.field(pytree_node=False, default=False)
    prefix_len: jax.Array | int | None = None
    kv_valid: jax.Array | None = None
    q_offset: jax.Array | int = 0
    segment_ids: jax.Array | None = None

    def array(self, q_len: int, kv_len: int | None = None) -> jax.Array:
        """The boolean mask [B or 1, 1, q_len, kv_len]."""
        return make_attention_mask(q_len, kv_len, causal=self.causal, prefix_len=self.prefix_len,
                                   kv_valid=self.kv_valid, q_offset=self.q_offset, segment_ids=self.segment_ids)

    @property
    def is_plain_causal(self) -> bool:
        """Causal from position 0 with nothing else: every kernel's built-in causal mask."""
        return (self.causal and self.prefix_len is None and self.kv_valid is None and self.segment_ids is None
                and isinstance(self.q_offset, int) and self.q_offset == 0)

    @property
    def is_full(self) -> bool:
        return not self.causal and self.prefix_len is None and self.kv_valid is None and self.segment_ids is None


def mask_array(mask: jax.Array | AttentionMask | None, q_len: int, kv_len: int) -> jax.Array | None:
    """A mask argument as the boolean array [B or 1, H or 1, Q, K] (None stays None); checks arrays."""
    if mask is None:
        return None
    if isinstance(mask, AttentionMask):
        return None if mask.is_full else mask.array(q_len, kv_len)
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"attention mask must be boolean (True = attend), got {mask.dtype}")
    return mask
