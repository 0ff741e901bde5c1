"""Multi-head and grouped-query self/cross attention.

The module is split in two steps so that a KV cache slots in between them: `project` makes
q [B, Q, H, Dh], k and v [B, K, Hkv, Dh]; `attend` mixes them under a boolean mask from
`make_attention_mask` and projects back to D. With Hkv < H (GQA) each group of G = H/Hkv query
heads shares one key/value head (query head h uses kv head h // G, as HF's repeat_kv).
Without a cache (training, ViT, CLIP) the mixing is `jax.nn.dot_product_attention`, or on the CPU
backend (fp32, one device, implementation None) mmjax's native kernel (`mmjax.kernels.attention`),
which computes the same values and gradients.

KV cache (decoding). Nothing is hidden in a Flax "cache" collection: a layer's cache is the pytree

    {"k": [B, Hkv, S, Dh], "v": [B, Hkv, S, Dh]}        (S = the longest sequence it can hold)

passed in and returned. `attn(x, cache=c, cache_index=t, mask=m)` with x [B, T, D] writes this
chunk's (rotated) keys and values at cache slots [t, t+T) (`lax.dynamic_update_slice` along S, so
t may be traced) and lets the T queries attend over all S slots under `m` [B, 1, T, S] (causal with
q_offset=t hides the slots not written yet); it returns `(out, new_cache)`. Prefill is one chunk
of T tokens at t=0, decoding is T=1 chunks at t = T0, T0+1, ... Rows of a batch share t, so
prompts of different lengths are left-padded and the pads masked through `kv_valid`.

Why head-major: the attention matmuls over the cache contract Dh (q·k) and S (w·v) with (B, Hkv)
as batch dims, so [B, Hkv, S, Dh] is the operand layout they want. Stored [B, S, Hkv, Dh], XLA
transposed every layer's whole K and V on every decoding step, a cost growing with S; now only
the new chunk's [B, T, Hkv, Dh] keys are transposed when written, and `grouped_attention` computes
the cached attention with einsums in that layout (fp32 logits, queries grouped as [B, Hkv, G, T, Dh]).
Measured on the shared 2-core CPU (width 512, depth 8, MHA, one decoding step of generate, two
interleaved before/after rounds): batch 8: 53–62 → 21–22 ms at 1041 slots, 16.6–17.0 → 13.8–14.3 ms
at 144. At batch 1 XLA:CPU drops the unit batch dim and hands the dots to its plain matmul emitter,
which still copies K and V into [Hkv, Dh, S] every step, as before the change: no gain there
(7.5–7.8 → 7.5–8.4 ms at 144, 10.8–12.1 → 12.2–12.4 ms at 1041: equal within the noise or slightly slower).
On one CPU device in fp32 the cached attention is mmjax's native kernel instead
(`mmjax.kernels.attention.cache_attention`, the same values): each (batch row, kv head) reads only
the slots between the first and the last one its queries may see, so a decoding step reads the
filled part of the cache, in one pass per slot block with no [B, H, T, S] logits between XLA ops
(bench-decode's batch-8 step, 8 layers: XLA's two dots 4.6 ms per token, the kernel about 2.2 ms).
With XLA's einsums, GQA is a loss at batch 8 (Hkv 2, G 4: 12.0–12.2 → 13.1 ms at 144 slots, 21.2–22.2 → 28.9 ms at 1041;
batch 1 equal): XLA:CPU runs the [G·T, Dh] × [S, Dh]ᵀ dot slower than the old transpose + dot, and
neither routing GQA through `jax.nn.dot_product_attention` on the transposed cache nor an explicit
K transpose got the old speed back. An open question: storing K as [B, Hkv, Dh, S] (both dots
canonical) is untried.
"""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.kernels import attention as cpu_attention
from mmjax.layers.linear import DECODE, DenseGeneral, flatten_rows_on, fused_projection
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
      implementation: passed to `jax.nn.dot_product_attention` ("xla", "cudnn", or None = auto: on the
        CPU backend the native kernel where `use_cpu_attention` allows it).
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

        With `cache` ({"k", "v"}: [B, Hkv, S, Dh]) and `cache_index` (int32 scalar t): writes this
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
            mask = make_attention_mask(x.shape[1], cache["k"].shape[2], causal=True, q_offset=cache_index)
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
        denses = (self._dense((h, dh), ("embed", "heads", "head_dim"), "query"),
                  self._dense((hkv, dh), ("embed", "kv_heads", "head_dim"), "key"),
                  self._dense((hkv, dh), ("embed", "kv_heads", "head_dim"), "value"))
        if context is None and flatten_rows_on() and DECODE not in self.variables \
                and not self.is_mutable_collection(DECODE):
            q, k, v = fused_projection(denses, x)  # self-attention on the CPU: one [D, (H + 2·Hkv)·Dh] dot
        else:
            context = x if context is None else context
            q, k, v = denses[0](x), denses[1](context), denses[2](context)
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

    def attend(self, q, k, v, *, mask, out_dim, deterministic=True, kv_head_major=False):
        """q [B, Q, H, Dh]; k, v [B, K, Hkv, Dh], or [B, Hkv, K, Dh] with kv_head_major (a KV cache)
        → [B, Q, out_dim]."""
        if mask is not None and mask.dtype != jnp.bool_:
            raise TypeError(f"attention mask must be boolean (True = attend), got {mask.dtype}")
        dropout = self.dropout > 0 and not deterministic
        if kv_head_major and not dropout and self.implementation is None \
                and cpu_attention.use_cache_attention(q, k):
            out = cpu_attention.cache_attention(q, k, v, mask)  # the native kernel over the filled slots
        elif kv_head_major or dropout:
            if not kv_head_major:  # the fused kernel has no dropout: the reference path wants [B, Hkv, K, Dh]
                k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
            out = grouped_attention(q, k, v, mask, dropout_rate=self.dropout if dropout else 0.0,
                                    rng=self.make_rng("dropout") if dropout else None)
        elif self.implementation is None and cpu_attention.use_cpu_attention(q, k):
            out = cpu_attention.cpu_attention(q, k, v, mask)  # the native CPU kernel (mmjax/kernels/attention.py)
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.implementation)
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


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *,
                      dropout_rate: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
    """Softmax attention with head-major keys: q [B, Q, H, Dh], k, v [B, Hkv, K, Dh] → [B, Q, H, Dh].

        logits[b, j, g, q, s] = q[b, q, j·G + g] · k[b, j, s] / √Dh        (fp32; G = H / Hkv)
        out = softmax_s(logits masked by `mask` [B or 1, 1, Q, K]) · v

    K and V are used as stored (no repeat over G, no transpose): only q and the [B, Q, H, Dh] output
    are reshuffled, which is cheap when Q is a decoding chunk. A fully masked row gets uniform
    weights (finite, like `jax.nn.dot_product_attention`); the mask may also be per head [B, H, Q, K].
    With dropout_rate > 0 the weights are dropped (and rescaled) with `rng`.
    """
    b, nq, h, dh = q.shape
    hkv = k.shape[1]
    if h % hkv:
        raise ValueError(f"{h} query heads cannot be grouped over {hkv} key/value heads")
    qg = q.reshape(b, nq, hkv, h // hkv, dh)
    # K is the first operand on purpose: with q first, XLA:CPU at batch 1 duplicated the cache write
    # (one for the loop state, one for the dot), adding full copies of K and V to every step.
    logits = jnp.einsum("bjsd,bqjgd->bjgqs", k, qg, preferred_element_type=jnp.float32) / jnp.sqrt(dh)
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
