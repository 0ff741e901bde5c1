"""Multi-head and grouped-query self/cross attention over `jax.nn.dot_product_attention`.

The module is split in two steps so that a KV cache slots in between them: `project` makes
q [B, Q, H, Dh], k and v [B, K, Hkv, Dh]; `attend` mixes them under a boolean mask from
`make_attention_mask` and projects back to D. With Hkv < H (GQA) each group of H/Hkv query heads
shares one key/value head; `jax.nn.dot_product_attention` handles the grouping.

KV cache (decoding). Nothing is hidden in a Flax "cache" collection: a layer's cache is the pytree

    {"k": [B, S, Hkv, Dh], "v": [B, S, Hkv, Dh]}        (S = the longest sequence it can hold)

passed in and returned. `attn(x, cache=c, cache_index=t, mask=m)` with x [B, T, D] writes this
chunk's (rotated) keys and values at cache slots [t, t+T) (`lax.dynamic_update_slice`, so t may be
traced) and lets the T queries attend over all S slots under `m` [B, 1, T, S] (causal with
q_offset=t hides the slots not written yet); it returns `(out, new_cache)`. Prefill is one chunk
of T tokens at t=0, decoding is T=1 chunks at t = T0, T0+1, ... Rows of a batch share t, so
prompts of different lengths are left-padded and the pads masked through `kv_valid`.
"""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.linear import DenseGeneral
from mmjax.layers.masks import make_attention_mask
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
                 deterministic: bool = True, cache: dict | None = None,
                 cache_index: jax.Array | int | None = None):
        """x: [B, Q, D]; context: [B, K, D] for cross-attention (None: self-attention);
        mask: bool broadcastable to [B, H, Q, K]; positions: [B, Q], or [B, Q, 2] (row, col) for 2D
        RoPE (see `apply_rope_2d`).

        With `cache` ({"k", "v"}: [B, S, Hkv, Dh]) and `cache_index` (int32 scalar t): writes this
        chunk's k/v at slots [t, t+Q), attends over the S slots (mask: [B, 1, Q, S]) and returns
        `(out [B, Q, D], new_cache)`; without a cache returns `out` alone. With a cache, mask=None
        means causal over the slots (q_offset=t) and positions=None means t, t+1, ... for RoPE.
        """
        if cache is not None and positions is None and self.rope_base is not None and cache_index is not None:
            # The chunk's tokens sit at cache_index, cache_index+1, ...: rotate them there.
            positions = jnp.broadcast_to(jnp.arange(x.shape[1]) + cache_index, x.shape[:2])
        q, k, v = self.project(x, context=context, positions=positions)
        if cache is None:
            if cache_index is not None:
                raise ValueError("cache_index was given without a cache")
            return self.attend(q, k, v, mask=mask, out_dim=x.shape[-1], deterministic=deterministic)
        if context is not None:
            raise ValueError("a KV cache is for self-attention; cross-attention keys do not grow")
        if cache_index is None:
            raise ValueError("a KV cache needs cache_index (the slot where this chunk is written)")
        cache = update_kv_cache(cache, k, v, cache_index)
        if mask is None:  # causal over the slots written so far
            mask = make_attention_mask(x.shape[1], cache["k"].shape[1], causal=True, q_offset=cache_index)
        out = self.attend(q, cache["k"].astype(self.dtype), cache["v"].astype(self.dtype), mask=mask,
                          out_dim=x.shape[-1], deterministic=deterministic)
        return out, cache

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
            rope = apply_rope_2d if positions.ndim == 3 else apply_rope
            q = rope(q, positions, self.rope_base)
            k = rope(k, positions, self.rope_base)
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


CACHE_AXES = ("act_batch", "act_len", "act_kv_heads", None)  # logical names of a cache's k and v


def update_kv_cache(cache: dict, k: jax.Array, v: jax.Array, index: jax.Array | int) -> dict:
    """Writes k, v [B, T, Hkv, Dh] into cache["k"], cache["v"] [B, S, Hkv, Dh] at slots [index, index+T).

    `lax.dynamic_update_slice` clamps an out-of-range start instead of failing, which would
    silently overwrite the last slots; so a concrete index is checked here (a traced one cannot be:
    the caller's loop bounds must keep index + T <= S).
    """
    if set(cache) != {"k", "v"}:
        raise ValueError(f"a layer's KV cache is {{'k', 'v'}}, got keys {sorted(cache)}")
    ck, cv = cache["k"], cache["v"]
    if ck.shape != cv.shape or ck.ndim != 4 or ck.shape[0] != k.shape[0] or ck.shape[2:] != k.shape[2:]:
        raise ValueError(f"KV cache k {ck.shape} / v {cv.shape} do not fit this chunk's keys {k.shape} "
                         "([B, S, Hkv, Dh] with the chunk's B, Hkv and Dh)")
    t, s = k.shape[1], ck.shape[1]
    if not isinstance(index, jax.core.Tracer):
        if jnp.ndim(index) != 0:
            raise ValueError(f"cache_index must be a scalar (one slot for every row), got shape {jnp.shape(index)}")
        if int(index) < 0 or int(index) + t > s:
            raise ValueError(f"a chunk of {t} tokens at cache_index {int(index)} does not fit a KV cache of "
                             f"{s} slots; make a longer cache (init_cache max_len)")
    start = (jnp.int32(0), jnp.asarray(index, jnp.int32), jnp.int32(0), jnp.int32(0))
    new_k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)
    new_v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
    return {"k": constrain(new_k, CACHE_AXES), "v": constrain(new_v, CACHE_AXES)}


def apply_rope_2d(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
    """2D rotary embedding for tokens on a grid: x [B, S, H, Dh], positions [B, S, 2] = (row, col).

    The first Dh/2 channels are rotated (rotate-half, as `apply_rope` over Dh/2) by the row and the
    last Dh/2 by the column, so q·k depends on the row offset and the column offset of the two
    tokens. A 1D sequence fits in by giving text tokens (p, p). Needs Dh divisible by 4.
    """
    dh = x.shape[-1]
    if dh % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {dh}")
    if positions.shape[-1] != 2:
        raise ValueError(f"2D RoPE positions must be [B, S, 2] (row, col), got {positions.shape}")
    rows = apply_rope(x[..., : dh // 2], positions[..., 0], base)
    cols = apply_rope(x[..., dh // 2:], positions[..., 1], base)
    return jnp.concatenate([rows, cols], axis=-1)


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
