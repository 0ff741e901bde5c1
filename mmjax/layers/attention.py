"""Multi-head and grouped-query self/cross attention.

The module is split in two steps so that a KV cache slots in between them: `project` makes
q [B, Q, H, Dh], k and v [B, K, Hkv, Dh]; `attend` mixes them (`mmjax.ops.attention`, or
`mmjax.ops.cached_attention` over a cache) under a mask and projects back to D. With Hkv < H (GQA)
each group of G = H/Hkv query heads shares one key/value head (query head h uses kv head h // G, as
HF's repeat_kv). A mask is a boolean array broadcastable to [B, H, Q, K] (True = attend) or an
`AttentionMask` (its parts: causal, prefix, padding), which fused attention implementations read
without an array.

KV cache (decoding). Nothing is hidden in a Flax "cache" collection: a layer's cache is the pytree

    {"k": [B, Hkv, S, Dh], "v": [B, Hkv, S, Dh]}        (S = the longest sequence it can hold)

passed in and returned. `attn(x, cache=c, cache_index=t, mask=m)` with x [B, T, D] writes this
chunk's (rotated) keys and values at cache slots [t, t+T) (`lax.dynamic_update_slice` along S, so
t may be traced) and lets the T queries attend over all S slots under `m` (causal with q_offset=t
hides the slots not written yet); it returns `(out, new_cache)`. Prefill is one chunk of T tokens at
t=0, decoding is T=1 chunks at t = T0, T0+1, ... Rows of a batch share t, so prompts of different
lengths are left-padded and the pads masked through `kv_valid`. The cache is head-major because the
cached attention's products contract Dh and S with (B, Hkv) as batch dims: stored so, no step
transposes the whole cache, only the new chunk's keys when they are written.
"""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import ops
from mmjax.layers.linear import DenseGeneral
from mmjax.layers.norms import Norm
from mmjax.layers.posemb import apply_rope, rope_frequencies, rotate_half
from mmjax.ops import AttentionMask, OpsPolicy
from mmjax.ops.xla import grouped_attention
from mmjax.sharding import constrain


class Attention(nn.Module):
    """Attention with H query heads and Hkv key/value heads (Hkv = H: MHA; Hkv < H: GQA).

    Attributes:
      num_heads: H.
      num_kv_heads: Hkv (None → H). Must divide H.
      head_dim: Dh (None → D / H).
      rope_base: if set, rotary embeddings on q and k at `positions`.
      rope_2d_channels: how [B, S, 2] positions rotate the head dim: "halves" (`apply_rope_2d`: the
        first half by the row, the second by the column) or "interleaved" (`apply_mrope`: RoPE's
        frequencies alternate between row and column, so (p, p) rotates exactly as 1D RoPE at p).
      qk_norm: RMS/LayerNorm over Dh on q and k (Chameleon-style stability; None = off).
      ops: the backend policy (`mmjax.ops.OpsPolicy`): which attention implementation runs.
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    use_bias: bool = True
    rope_base: float | None = None
    rope_2d_channels: Literal["halves", "interleaved"] = "halves"
    qk_norm: Literal["layernorm", "rmsnorm"] | None = None
    norm_eps: float = 1e-6
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    ops: OpsPolicy = OpsPolicy()

    def _dense(self, features, axes, name, in_rank=1):
        return DenseGeneral(features, axes, in_rank=in_rank, use_bias=self.use_bias, dtype=self.dtype,
                            param_dtype=self.param_dtype, ops=self.ops, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | AttentionMask | None = None,
                 positions: jax.Array | None = None, context: jax.Array | None = None,
                 deterministic: bool = True, cache: dict | None = None,
                 cache_index: jax.Array | int | None = None):
        """x: [B, Q, D]; context: [B, K, D] for cross-attention (None: self-attention);
        mask: bool broadcastable to [B, H, Q, K] or an AttentionMask; positions: [B, Q], or [B, Q, 2]
        (row, col) for 2D RoPE (see `apply_rope_2d`).

        With `cache` ({"k", "v"}: [B, Hkv, S, Dh]) and `cache_index` (int32 scalar t): writes this
        chunk's k/v at slots [t, t+Q), attends over the S slots and returns `(out [B, Q, D],
        new_cache)`; without a cache returns `out` alone. With a cache, mask=None means causal over
        the slots (q_offset=t) and positions=None means t, t+1, ... for RoPE.
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
            mask = AttentionMask(causal=True, q_offset=cache_index)
        out = self.attend(q, cache["k"].astype(self.dtype), cache["v"].astype(self.dtype), mask=mask,
                          out_dim=x.shape[-1], deterministic=deterministic, kv_head_major=True)
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
            norm = lambda name: Norm(self.qk_norm, self.norm_eps, dtype=self.dtype, axis_name="head_dim",
                                     ops=self.ops, name=name)
            q, k = norm("query_norm")(q), norm("key_norm")(k)
        if self.rope_base is not None:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
            rope = apply_rope if positions.ndim == 2 else (
                apply_mrope if self.rope_2d_channels == "interleaved" else apply_rope_2d)
            q = rope(q, positions, self.rope_base)
            k = rope(k, positions, self.rope_base)
        q = constrain(q, ("act_batch", "act_len", "act_heads", None))
        k = constrain(k, ("act_batch", "act_len", "act_kv_heads", None))
        v = constrain(v, ("act_batch", "act_len", "act_kv_heads", None))
        return q, k, v

    def attend(self, q, k, v, *, mask, out_dim, deterministic=True, kv_head_major=False):
        """q [B, Q, H, Dh]; k, v [B, K, Hkv, Dh], or [B, Hkv, K, Dh] with kv_head_major (a KV cache)
        → [B, Q, out_dim]."""
        dropout = self.dropout > 0 and not deterministic
        if kv_head_major and not dropout:
            out = ops.cached_attention(q, k, v, mask, policy=self.ops)
        else:
            if kv_head_major:  # dropout through a cache: back to [B, K, Hkv, Dh] for ops.attention
                k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
            out = ops.attention(q, k, v, mask, policy=self.ops, dropout_rate=self.dropout if dropout else 0.0,
                                dropout_rng=self.make_rng("dropout") if dropout else None)
        out = constrain(out, ("act_batch", "act_len", "act_heads", None))
        return self._dense(out_dim, ("heads", "head_dim", "embed"), "out", in_rank=2)(out)


CACHE_AXES = ("act_batch", "act_kv_heads", "act_len", None)  # logical names of a cache's k and v [B, Hkv, S, Dh]


def update_kv_cache(cache: dict, k: jax.Array, v: jax.Array, index: jax.Array | int) -> dict:
    """Writes a chunk's k, v [B, T, Hkv, Dh] into cache["k"], cache["v"] [B, Hkv, S, Dh] at slots
    [index, index+T) of S (only the chunk is transposed to head-major, never the cache).

    `lax.dynamic_update_slice` clamps an out-of-range start instead of failing, which would
    silently overwrite the last slots; so a concrete index is checked here (a traced one cannot be:
    the caller's loop bounds must keep index + T <= S).
    """
    if set(cache) != {"k", "v"}:
        raise ValueError(f"a layer's KV cache is {{'k', 'v'}}, got keys {sorted(cache)}")
    ck, cv = cache["k"], cache["v"]
    b, t, hkv, dh = k.shape
    if ck.shape != cv.shape or ck.ndim != 4 or (ck.shape[0], ck.shape[1], ck.shape[3]) != (b, hkv, dh):
        raise ValueError(f"KV cache k {ck.shape} / v {cv.shape} do not fit this chunk's keys {k.shape} "
                         f"([B, Hkv, S, Dh] = [{b}, {hkv}, S, {dh}], head-major)")
    s = ck.shape[2]
    if not isinstance(index, jax.core.Tracer):
        if jnp.ndim(index) != 0:
            raise ValueError(f"cache_index must be a scalar (one slot for every row), got shape {jnp.shape(index)}")
        if int(index) < 0 or int(index) + t > s:
            raise ValueError(f"a chunk of {t} tokens at cache_index {int(index)} does not fit a KV cache of "
                             f"{s} slots; make a longer cache (init_cache max_len)")
    start = (jnp.int32(0), jnp.int32(0), jnp.asarray(index, jnp.int32), jnp.int32(0))
    new_k = jax.lax.dynamic_update_slice(ck, jnp.swapaxes(k, 1, 2).astype(ck.dtype), start)
    new_v = jax.lax.dynamic_update_slice(cv, jnp.swapaxes(v, 1, 2).astype(cv.dtype), start)
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


def apply_mrope(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
    """2D rotary embedding that keeps 1D RoPE for text (M-RoPE, Qwen2-VL; interleaved as Qwen3-VL):
    x [B, S, H, Dh], positions [B, S, 2] = (row, col).

    RoPE's Dh/2 frequencies θ_i = base^(−2i/Dh) are dealt out alternately: the pair (x_i, x_{i+Dh/2})
    turns by row · θ_i for even i and by col · θ_i for odd i, so each axis gets high and low
    frequencies, q·k depends on the row and column offsets, and a token at (p, p) turns exactly as
    `apply_rope` turns it at p: a 1D-trained LM reads text unchanged with image tokens on a grid.
    """
    dh = x.shape[-1]
    if dh % 4:
        raise ValueError(f"M-RoPE needs a head dim divisible by 4, got {dh}")
    if positions.shape[-1] != 2:
        raise ValueError(f"M-RoPE positions must be [B, S, 2] (row, col), got {positions.shape}")
    axis = jnp.arange(dh // 2) % 2                                                         # 0: row, 1: col
    p = jnp.take(positions.astype(jnp.float32), axis, axis=-1)                            # [B, S, Dh/2]
    return rotate_half(x, p * rope_frequencies(dh, base))


__all__ = ["CACHE_AXES", "Attention", "apply_mrope", "apply_rope_2d", "grouped_attention", "update_kv_cache"]
