"""Multi-head and grouped-query self/cross attention over `jax.nn.dot_product_attention`.

The module is split in two steps so that a KV cache (the decoder issue) slots in between them:
`project` makes q [B, Q, H, Dh], k and v [B, K, Hkv, Dh]; `attend` mixes them under a boolean mask
from `make_attention_mask` and projects back to D. With Hkv < H (GQA) each group of H/Hkv query
heads shares one key/value head; `jax.nn.dot_product_attention` handles the grouping.
"""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.linear import DenseGeneral
from mmjax.layers.norms import Norm
from mmjax.layers.posemb import apply_rope
from mmjax.sharding import constrain

Implementation = Literal["xla", "cudnn"] | None


class Attention(nn.Module):
    """Attention with H query heads and Hkv key/value heads (Hkv = H: MHA; Hkv < H: GQA).

    Attributes:
      num_heads: H.
      num_kv_heads: Hkv (None → H). Must divide H.
      head_dim: Dh (None → D / H).
      implementation: passed to `jax.nn.dot_product_attention` ("xla", "cudnn", or None = auto).
      rope_base: if set, rotary embeddings on q and k at `positions`.
      qk_norm: RMS/LayerNorm over Dh on q and k (Chameleon-style stability; None = off).
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    use_bias: bool = True
    implementation: Implementation = None
    rope_base: float | None = None
    qk_norm: Literal["layernorm", "rmsnorm"] | None = None
    norm_eps: float = 1e-6
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _dense(self, features, axes, name, in_rank=1):
        return DenseGeneral(features, axes, in_rank=in_rank, use_bias=self.use_bias, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
                 positions: jax.Array | None = None, context: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        """x: [B, Q, D]; context: [B, K, D] for cross-attention (None: self-attention);
        mask: bool broadcastable to [B, H, Q, K]; positions: [B, Q] (needed with RoPE)."""
        q, k, v = self.project(x, context=context, positions=positions)
        return self.attend(q, k, v, mask=mask, out_dim=x.shape[-1], deterministic=deterministic)

    def project(self, x, *, context=None, positions=None):
        d = x.shape[-1]
        h = self.num_heads
        hkv = self.num_kv_heads or h
        if h % hkv:
            raise ValueError(f"num_heads={h} is not a multiple of num_kv_heads={hkv}")
        dh = self.head_dim or d // h
        if self.head_dim is None and d % h:
            raise ValueError(f"width {d} is not divisible by num_heads={h}; set head_dim")
        context = x if context is None else context
        q = self._dense((h, dh), ("embed", "heads", "head_dim"), "query")(x)
        k = self._dense((hkv, dh), ("embed", "kv_heads", "head_dim"), "key")(context)
        v = self._dense((hkv, dh), ("embed", "kv_heads", "head_dim"), "value")(context)
        if self.qk_norm:
            q = Norm(self.qk_norm, self.norm_eps, dtype=self.dtype, axis_name="head_dim", name="query_norm")(q)
            k = Norm(self.qk_norm, self.norm_eps, dtype=self.dtype, axis_name="head_dim", name="key_norm")(k)
        if self.rope_base is not None:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
            q = apply_rope(q, positions, self.rope_base)
            k = apply_rope(k, positions, self.rope_base)
        q = constrain(q, ("act_batch", "act_len", "act_heads", None))
        k = constrain(k, ("act_batch", "act_len", "act_kv_heads", None))
        v = constrain(v, ("act_batch", "act_len", "act_kv_heads", None))
        return q, k, v

    def attend(self, q, k, v, *, mask, out_dim, deterministic=True):
        if mask is not None and mask.dtype != jnp.bool_:
            raise TypeError(f"attention mask must be boolean (True = attend), got {mask.dtype}")
        if self.dropout > 0 and not deterministic:
            out = _attention_with_dropout(q, k, v, mask, self.dropout, self.make_rng("dropout"))
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.implementation)
        out = constrain(out, ("act_batch", "act_len", "act_heads", None))
        return self._dense(out_dim, ("heads", "head_dim", "embed"), "out", in_rank=2)(out)


def _attention_with_dropout(q, k, v, mask, rate, rng):
    """Reference softmax attention with dropout on the weights (the fused kernel has no dropout)."""
    h, hkv = q.shape[2], k.shape[2]
    if h != hkv:
        k = jnp.repeat(k, h // hkv, axis=2)
        v = jnp.repeat(v, h // hkv, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1])
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    w = jax.nn.softmax(logits, axis=-1)
    keep = jax.random.bernoulli(rng, 1.0 - rate, w.shape)
    w = jnp.where(keep, w / (1.0 - rate), 0.0).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v)
