"""Softmax attention with mmjax's native CPU kernels (attention.cc), forward and backward.

    out = attention(q, k, v, mask)          q [B, T, H, Dh], k, v [B, S, Hkv, Dh] → [B, T, H, Dh]

computes what `jax.nn.dot_product_attention(q, k, v, mask=mask)` computes (scale 1/√Dh, masked logits
set to -0.7·FLT_MAX, so a fully masked row gets uniform weights and no gradient), in fp32, as two
FFI calls under a `jax.custom_vjp`: the forward keeps the probabilities P [B, H, T, S] for the
backward, which then needs no second Q·Kᵀ (4·B·H·T·S bytes per layer, as XLA's backward keeps; so up
to MAX_KEYS keys).

    out = cache_attention(q, k, v, mask)    q [B, T, H, Dh], k, v [B, Hkv, S, Dh] (a head-major KV cache)

is the same softmax for generation: each (batch row, kv head) reads only the slots between the first
and the last one its queries may see, so a decoding step reads the filled part of the cache.
Gradients, if taken, are the reference's (`mmjax.ops.xla.grouped_attention`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.ops import xla
from mmjax.ops.cpu import library
from mmjax.ops.cpu.ffi import call, usable

MAX_KEYS = 2048  # P is kept for the backward: 4·T·S bytes per (batch row, head)


def _mask_operand(mask: jax.Array | None, b: int, h: int, t: int, s: int) -> tuple[jax.Array, bool]:
    """The mask as [1 or B, 1 or H, T, S] bool (broadcast over what it lacks), or a dummy and False."""
    if mask is None:
        return jnp.zeros((1, 1, 1, 1), jnp.bool_), False
    if mask.dtype != jnp.bool_:
        raise TypeError(f"attention mask must be boolean (True = attend), got {mask.dtype}")
    mask = jnp.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)
    mb, mh, mt, ms = mask.shape
    if mb not in (1, b) or mh not in (1, h) or mt not in (1, t) or ms not in (1, s):
        raise ValueError(f"attention mask of shape {mask.shape} does not broadcast to [B, H, T, S] = {[b, h, t, s]}")
    return jnp.broadcast_to(mask, (mb, mh, t, s)), True


def _check(q, k, v, what="attention", head_major=False):
    """Operand checks: k, v [B, S, Hkv, Dh], or [B, Hkv, S, Dh] with head_major (a KV cache)."""
    layout, heads = ("[B, Hkv, S, Dh]", 1) if head_major else ("[B, S, Hkv, Dh]", 2)
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{what}: q [B, T, H, Dh] and k, v {layout}, got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] % k.shape[heads]:
        raise ValueError(f"{what}: {q.shape[2]} query heads cannot be grouped over {k.shape[heads]} kv heads")
    if {q.dtype, k.dtype, v.dtype} != {jnp.dtype(jnp.float32)}:
        raise TypeError(f"{what}: fp32 only, got {q.dtype}, {k.dtype}, {v.dtype}")


def _scale(dh):
    return np.float32(1.0 / np.sqrt(dh))


def _forward(q, k, v, mask, keep_probs: bool):
    b, t, h, dh = q.shape
    s = k.shape[1]
    m, has_mask = _mask_operand(mask, b, h, t, s)
    shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32),
              jax.ShapeDtypeStruct((b, h, t, s) if keep_probs else (0,), jnp.float32))
    out, probs = call(library.ATTENTION_FWD, shapes, q, k, v, m, scale=_scale(dh), has_mask=has_mask,
                      keep_probs=keep_probs)
    return out, probs


@jax.custom_vjp
def _attention(q, k, v, mask):
    return _forward(q, k, v, mask, keep_probs=False)[0]


def _attention_fwd(q, k, v, mask):
    out, probs = _forward(q, k, v, mask, keep_probs=True)
    return out, (q, k, v, mask, probs, out)


def _attention_bwd(res, dout):
    q, k, v, mask, probs, out = res
    b, t, h, dh = q.shape
    m, has_mask = _mask_operand(mask, b, h, t, k.shape[1])
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = call(library.ATTENTION_BWD, shapes, q, k, v, m, probs, out, dout.astype(jnp.float32),
                      scale=_scale(dh), has_mask=has_mask)
    dmask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)  # a boolean input: no gradient
    return dq, dk, dv, dmask


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention with the native kernel: q [B, T, H, Dh], k, v [B, S, Hkv, Dh] (Hkv divides H;
    query head h reads kv head h // (H / Hkv)), mask bool broadcastable to [B, H, T, S] (True = attend)
    → [B, T, H, Dh] fp32. Runs on the CPU only."""
    _check(q, k, v)
    if mask is not None:
        _mask_operand(mask, q.shape[0], q.shape[2], q.shape[1], k.shape[1])  # the error names a bad shape
    return _attention(q, k, v, mask)


@jax.custom_vjp
def _cache_attention(q, k, v, mask):
    b, t, h, dh = q.shape
    m, has_mask = _mask_operand(mask, b, h, t, k.shape[2])
    (out,) = call(library.CACHE_ATTENTION, (jax.ShapeDtypeStruct(q.shape, jnp.float32),), q, k, v, m,
                  scale=_scale(dh), has_mask=has_mask)
    return out


def _cache_attention_fwd(q, k, v, mask):
    return _cache_attention(q, k, v, mask), (q, k, v, mask)


def _cache_attention_bwd(res, dout):
    q, k, v, mask = res
    _, vjp = jax.vjp(lambda q, k, v: xla.grouped_attention(q, k, v, mask), q, k, v)
    dmask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)
    return (*vjp(dout), dmask)


_cache_attention.defvjp(_cache_attention_fwd, _cache_attention_bwd)


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention over a head-major KV cache with the native kernel: q [B, T, H, Dh], k, v
    [B, Hkv, S, Dh], mask bool broadcastable to [B, H, T, S] → [B, T, H, Dh] fp32, the values of
    `mmjax.ops.xla.grouped_attention`. Runs on the CPU only."""
    _check(q, k, v, "cache_attention", head_major=True)
    if mask is not None:
        _mask_operand(mask, q.shape[0], q.shape[2], q.shape[1], k.shape[2])
    return _cache_attention(q, k, v, mask)


def attention_usable(q: jax.Array, k: jax.Array) -> bool:
    """Whether `attention` may take q [B, T, H, Dh], k [B, S, Hkv, Dh] (at trace time)."""
    if q.ndim != 4 or k.ndim != 4 or k.shape[1] > MAX_KEYS or q.shape[2] % k.shape[2]:
        return False
    return usable(q, k, what="attention")


def cache_attention_usable(q: jax.Array, k: jax.Array) -> bool:
    """Whether `cache_attention` may take q [B, T, H, Dh] and a cache k [B, Hkv, S, Dh] (any S)."""
    if q.ndim != 4 or k.ndim != 4 or q.shape[2] % k.shape[1]:
        return False
    return usable(q, k, what="attention")
