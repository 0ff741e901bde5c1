"""The reference implementations: plain JAX, every platform. The other implementations in mmjax.ops
compute the same functions (to rounding) and are tested against these."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, in_rank: int) -> jax.Array:
    """x [..., in...] · kernel [in..., out...] (+ bias [out...]) → [..., out...], contracting the last
    `in_rank` axes of x with the first `in_rank` of the kernel."""
    contract = (tuple(range(x.ndim - in_rank, x.ndim)), tuple(range(in_rank)))
    y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
    return y if bias is None else y + bias


def dense_output_major(x: jax.Array, kernel_t: jax.Array) -> jax.Array:
    """x [..., K] · kernel_tᵀ for a kernel stored output-major, kernel_t [N, K] → [..., N] (a tied
    embedding [V, D] used as the output head)."""
    return jax.lax.dot_general(x, kernel_t, (((x.ndim - 1,), (1,)), ((), ())))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax attention, q [B, T, H, Dh], k, v [B, S, Hkv, Dh] (Hkv divides H), mask bool broadcastable
    to [B, H, T, S] → [B, T, H, Dh]; logits and softmax in fp32 (`jax.nn.dot_product_attention`)."""
    if mask is not None:
        mask = jnp.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *,
                      dropout_rate: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
    """Softmax attention with head-major keys: q [B, Q, H, Dh], k, v [B, Hkv, K, Dh] → [B, Q, H, Dh].

        logits[b, j, g, q, s] = q[b, q, j·G + g] · k[b, j, s] / √Dh        (fp32; G = H / Hkv)
        out = softmax_s(logits masked by `mask` [B or 1, 1 or H, Q, K]) · v

    K and V are read as stored (a KV cache's layout: no repeat over G, no transpose); only q and the
    output are reshuffled, which is cheap for a decoding chunk. A fully masked row gets uniform
    weights (finite, like `jax.nn.dot_product_attention`). With dropout_rate > 0 the weights are
    dropped (and rescaled) with `rng`: the one attention here with dropout.
    """
    b, nq, h, dh = q.shape
    hkv = k.shape[1]
    if h % hkv:
        raise ValueError(f"{h} query heads cannot be grouped over {hkv} key/value heads")
    qg = q.reshape(b, nq, hkv, h // hkv, dh)
    # K first: with q first, XLA:CPU at batch 1 kept a second copy of the cache for the dot.
    logits = jnp.einsum("bjsd,bqjgd->bjgqs", k, qg, preferred_element_type=jnp.float32) / math.sqrt(dh)
    if mask is not None:
        mask = jnp.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)  # → [B or 1, H or 1, Q, K]
        if mask.shape[1] not in (1, h):
            raise ValueError(f"an attention mask's head axis must be 1 or H={h}, got mask shape {mask.shape}")
        mask = mask.reshape(mask.shape[0], hkv if mask.shape[1] == h else 1, -1, *mask.shape[2:])  # as logits
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    w = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0:
        keep = jax.random.bernoulli(rng, 1.0 - dropout_rate, w.shape)
        w = jnp.where(keep, w / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bjgqs,bjsd->bqjgd", w.astype(v.dtype), v)
    return out.reshape(b, nq, h, dh)


def norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None, *, eps: float, rms: bool) -> jax.Array:
    """LayerNorm (x − mean)/sqrt(var + eps)·scale + bias, or RMSNorm x/sqrt(mean(x²) + eps)·scale, over the
    last axis, in the dtype of x (mmjax.layers.Norm passes fp32)."""
    if rms:
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    else:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + eps)
    y = y * scale
    return y if bias is None else y + bias
