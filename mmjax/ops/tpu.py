"""Pallas splash attention on TPU (`jax.experimental.pallas.ops.tpu.splash_attention`).

    out = splash_attention(q, k, v, mask)    q [B, T, H, Dh], k, v [B, S, Hkv, Dh] → [B, T, H, Dh]

Splash takes one example at a time, heads first ([H, T, Dh]) and unscaled, so q is scaled by 1/√Dh,
transposed, and the kernel vmapped over the batch. Lengths are padded to a multiple of the kernel's
block (BLOCK); padding keys, and the padding of `kv_valid`, get segment id 0 while every query has
segment id 1, so no query sees them. The static part of the mask (none or causal) is splash's own
mask object. GQA (Hkv < H) runs splash's multi-query kernel per kv head over its G query heads.
On a mesh of several devices the kernel runs per shard under `jax.shard_map`: batch over the mesh
axes of "act_batch", heads over those of "act_heads" (a custom call cannot be partitioned).
`interpret=True` runs the kernel with Pallas' interpreter (any platform; the tests use it on the CPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mmjax.ops.lowering import only_on_vjp
from mmjax.ops.mask import AttentionMask

BLOCK = 128


def unsupported(q: jax.Array, k: jax.Array, mask) -> str | None:
    """Why splash attention cannot take these operands, or None."""
    if mask is not None and not isinstance(mask, AttentionMask):
        return "an arbitrary mask array (splash takes no mask, a causal one, or padding as segment ids)"
    offset_zero = mask is None or (isinstance(mask.q_offset, int) and mask.q_offset == 0)
    if mask is not None and (mask.prefix_len is not None or not offset_zero):
        return "a prefix-LM mask or a query offset"
    if mask is not None and mask.segment_ids is not None:
        return "segments with a shared prefix (segment 0 seen by all)"
    if mask is not None and mask.causal and q.shape[1] != k.shape[1]:
        return "a causal mask between sequences of different lengths"
    return None


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, t: int, s: int, causal: bool, mqa: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    one = sa.CausalMask((t, s)) if causal else sa.FullMask((t, s))
    make = sa.make_splash_mqa if mqa else sa.make_splash_mha
    with jax.ensure_compile_time_eval():  # concrete mask tables, so the cached kernel holds no tracer
        return make(sa.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q, k, v, kv_valid, *, t, s, causal, interpret):
    """One shard: q [b, T, h, Dh], k, v [b, S, hkv, Dh], kv_valid [b, S] int32 or None → [b, T, h, Dh]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
    b, _, h, dh = q.shape
    hkv = k.shape[2]
    tp, sp = _round_up(t, BLOCK), _round_up(s, BLOCK)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
    q = pad(q * jnp.asarray(1.0 / math.sqrt(dh), q.dtype), tp).transpose(0, 2, 1, 3)    # [b, h, Tp, Dh]
    k, v = pad(k, sp).transpose(0, 2, 1, 3), pad(v, sp).transpose(0, 2, 1, 3)           # [b, hkv, Sp, Dh]
    segments = None
    if kv_valid is not None or sp != s:
        kv_seg = jnp.ones((b, s), jnp.int32) if kv_valid is None else kv_valid
        segments = SegmentIds(q=jnp.ones((b, tp), jnp.int32), kv=pad(kv_seg, sp))
    if hkv == h:
        kernel = _kernel(h, tp, sp, causal, False, interpret)
        out = jax.vmap(kernel)(q, k, v, segments) if segments is not None else jax.vmap(kernel)(q, k, v)
    else:  # GQA: the multi-query kernel per kv head over its G = h / hkv query heads
        g = h // hkv
        kernel = _kernel(g, tp, sp, causal, True, interpret)
        qg = q.reshape(b, hkv, g, tp, dh)
        per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None)) if segments is not None else jax.vmap(kernel)
        per_row = jax.vmap(per_head, in_axes=(0, 0, 0, 0)) if segments is not None else jax.vmap(per_head)
        out = per_row(qg, k, v, segments) if segments is not None else per_row(qg, k, v)
        out = out.reshape(b, h, tp, dh)
    return out.transpose(0, 2, 1, 3)[:, :t]


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None, *,
                     interpret: bool = False) -> jax.Array:
    """Softmax attention with splash: q [B, T, H, Dh], k, v [B, S, Hkv, Dh] → [B, T, H, Dh] (call
    `unsupported` first)."""
    t, s = q.shape[1], k.shape[1]
    causal = mask is not None and mask.causal
    kv_valid = None if mask is None or mask.kv_valid is None else mask.kv_valid.astype(jnp.int32)
    local = functools.partial(_local, t=t, s=s, causal=causal, interpret=interpret)
    if not interpret:  # Mosaic lowers for the TPU only: keep it out of a multi-platform export's other branches
        plain = local
        local = lambda q, k, v, kv: (only_on_vjp("tpu", plain, 3)(q, k, v, kv) if kv is not None
                                     else only_on_vjp("tpu", lambda q, k, v: plain(q, k, v, None), 3)(q, k, v))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return local(q, k, v, kv_valid)
    from mmjax.sharding import logical_to_spec
    shape = dict(mesh.shape)
    qs = logical_to_spec(("act_batch", None, "act_heads", None), q.shape, shape)
    ks = logical_to_spec(("act_batch", None, "act_kv_heads", None), k.shape, shape)
    if qs[2] != ks[2] and not (ks[2] is None and k.shape[2] == 1):
        qs, ks = P(qs[0], None, None, None), P(ks[0], None, None, None)  # heads that do not split alike
    if ks[0] != qs[0]:
        ks = P(qs[0], *ks[1:])
    vs = P(qs[0], None)
    args, specs = (q, k, v), (qs, ks, ks)
    if kv_valid is not None:
        args, specs = args + (kv_valid,), specs + (vs,)
        fn = local
    else:
        fn = lambda q, k, v: local(q, k, v, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qs, check_vma=False)(*args)
