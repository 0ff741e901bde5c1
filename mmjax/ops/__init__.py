"""The backend seam: the only code in mmjax that knows platforms and kernels.

Layers call these plain functions with arrays and the layer's `OpsPolicy`:

    dense(x, kernel, bias, in_rank=1, policy)         x [..., in...] · W [in..., out...] + b
    dense_output_major(x, kernel_t, policy)            x [..., K] · W_tᵀ, W_t [N, K] (a tied embedding)
    attention(q, k, v, mask, policy)                   training / prefill: q [B, T, H, Dh], k, v [B, S, Hkv, Dh]
    cached_attention(q, k, v, mask, policy)            over a head-major KV cache k, v [B, Hkv, S, Dh]
    norm(x, scale, bias, eps=, rms=, policy)           LayerNorm / RMSNorm over the last axis

Each computes the function of its reference in `mmjax.ops.xla`. With the policy's "auto" the
implementation is chosen per platform where the program is compiled (`policy.on_platforms`): the
native CPU kernels (`mmjax.ops.cpu`), cuDNN (`mmjax.ops.gpu`), Pallas splash (`mmjax.ops.tpu`), XLA
elsewhere. Choices that depend on shapes and dtypes are made while tracing, from the operands.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mmjax.ops import cpu, gpu, tpu, xla
from mmjax.ops.cpu.ffi import usable
from mmjax.ops.mask import AttentionMask, make_attention_mask, mask_array
from mmjax.ops.policy import XLA_ONLY, OpsPolicy, mesh_platform, note, on_platforms

DEFAULT = OpsPolicy()


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, in_rank: int = 1,
          policy: OpsPolicy = DEFAULT) -> jax.Array:
    """x [..., in...] · kernel [in..., out...] (+ bias [out...]) → [..., out...] (last `in_rank` axes of x
    contracted). Traced under a CPU mesh with cpu_kernels: as a 2-D product (`mmjax.ops.cpu.dense_rows`).
    Without a mesh, XLA's product as it is: a per-platform branch for every dense layer would cost
    more trace time than the layout gains."""
    if x.shape[x.ndim - in_rank:] != kernel.shape[:in_rank]:
        raise ValueError(f"dense: x's last {in_rank} axes {x.shape[x.ndim - in_rank:]} do not match the "
                         f"kernel's input axes {kernel.shape[:in_rank]}")
    if policy.cpu_kernels and mesh_platform() == "cpu":
        return cpu.dense_rows(x, kernel, bias, in_rank)
    return xla.dense(x, kernel, bias, in_rank)


def dense_output_major(x: jax.Array, kernel_t: jax.Array, *, policy: OpsPolicy = DEFAULT) -> jax.Array:
    """x [..., K] · kernel_tᵀ for a kernel stored output-major, kernel_t [N, K] → [..., N]. On the CPU, a
    few fp32 rows (a decoding step) go through the native small-rows kernel, which reads W_t once."""
    if x.shape[-1] != kernel_t.shape[-1] or kernel_t.ndim != 2:
        raise ValueError(f"dense_output_major: x [..., K] and kernel_t [N, K], got {x.shape} and {kernel_t.shape}")
    if not (policy.cpu_kernels and cpu.rowdot_usable(kernel_t, x)):
        return xla.dense_output_major(x, kernel_t)

    def native(x, w_t):
        return cpu.rowdot(w_t, x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1] + (w_t.shape[0],))
    return on_platforms(x, kernel_t, default=xla.dense_output_major, cpu=native)


def output_major(kernel: jax.Array, in_rank: int = 1, *, policy: OpsPolicy = DEFAULT) -> jax.Array:
    """A kernel [in..., out...] as the output-major matrix [prod(out), prod(in)] (for dense_output_major)."""
    k2 = kernel.reshape(math.prod(kernel.shape[:in_rank]), -1)
    if policy.cpu_kernels and usable(k2, what="decode matmul"):
        return on_platforms(k2, default=jnp.transpose, cpu=cpu.transpose)
    return jnp.transpose(k2)


def _check_attention(q, k, v, head_major: bool):
    heads = 1 if head_major else 2
    layout = "[B, Hkv, S, Dh]" if head_major else "[B, S, Hkv, Dh]"
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q [B, T, H, Dh] and k, v {layout}, got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] % k.shape[heads]:
        raise ValueError(f"attention: {q.shape[2]} query heads cannot be grouped over {k.shape[heads]} kv heads")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | AttentionMask | None = None, *,
              policy: OpsPolicy = DEFAULT, dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None
              ) -> jax.Array:
    """Softmax attention: q [B, T, H, Dh], k, v [B, S, Hkv, Dh] (Hkv divides H: GQA), mask a bool array
    broadcastable to [B, H, T, S] or an `AttentionMask` → [B, T, H, Dh]. Scale 1/√Dh, fp32 softmax; a
    fully masked row gets uniform weights. With dropout_rate > 0 (training), XLA's with dropout."""
    _check_attention(q, k, v, head_major=False)
    t, s = q.shape[1], k.shape[1]
    if dropout_rate > 0:
        if dropout_rng is None:
            raise ValueError("attention dropout needs dropout_rng")
        return xla.grouped_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask_array(mask, t, s),
                                     dropout_rate=dropout_rate, rng=dropout_rng)
    impl = policy.attention
    reference = lambda q, k, v, m: xla.attention(q, k, v, mask_array(m, t, s))
    if impl == "xla":
        return reference(q, k, v, mask)
    if impl == "native":
        return cpu.attention(q, k, v, mask_array(mask, t, s))
    if impl in ("cudnn", "splash"):
        lib = gpu if impl == "cudnn" else tpu
        reason = lib.unsupported(q, k, mask)
        if reason is not None:
            raise ValueError(f"OpsPolicy(attention={impl!r}) cannot run here: {reason}")
        return gpu.cudnn_attention(q, k, v, mask) if impl == "cudnn" else tpu.splash_attention(q, k, v, mask)
    branches = {}
    platform = mesh_platform()  # None: every platform's branch (chosen at lowering)
    if policy.cpu_kernels and platform in (None, "cpu") and cpu.attention_usable(q, k):
        branches["cpu"] = lambda q, k, v, m: cpu.attention(q, k, v, mask_array(m, t, s))
    if platform in (None, "cuda") and gpu.cuda_backend():
        reason = gpu.unsupported(q, k, mask)
        if reason is None:
            if t % gpu.PAD_TO or s % gpu.PAD_TO:
                note(f"mmjax.ops: cuDNN attention pads {t}×{s} tokens to multiples of {gpu.PAD_TO}")
            branches["cuda"] = gpu.cudnn_attention
        else:
            note(f"mmjax.ops: XLA attention on GPU for q {q.shape} {q.dtype}: {reason}")
    if platform in (None, "tpu") and tpu.unsupported(q, k, mask) is None:
        branches["tpu"] = tpu.splash_attention
    return on_platforms(q, k, v, mask, default=reference, **branches)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | AttentionMask | None = None, *,
                     policy: OpsPolicy = DEFAULT) -> jax.Array:
    """Softmax attention over a head-major KV cache: q [B, T, H, Dh], k, v [B, Hkv, S, Dh], mask as for
    `attention` over the S slots → [B, T, H, Dh]. On the CPU (auto with cpu_kernels, or "native"):
    the native kernel, which reads only the slots its queries may see."""
    _check_attention(q, k, v, head_major=True)
    m = mask_array(mask, q.shape[1], k.shape[2])
    if policy.attention == "native":
        return cpu.cache_attention(q, k, v, m)
    if policy.attention != "auto" or not (policy.cpu_kernels and cpu.cache_attention_usable(q, k)):
        return xla.grouped_attention(q, k, v, m)
    return on_platforms(q, k, v, m, default=xla.grouped_attention, cpu=cpu.cache_attention)


def norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None = None, *, eps: float, rms: bool = False,
         policy: OpsPolicy = DEFAULT) -> jax.Array:
    """LayerNorm (rms=False) or RMSNorm (rms=True, no bias) of x [..., D] over the last axis, computed in
    the dtype of x (layers pass fp32)."""
    if policy.norm == "xla":
        return xla.norm(x, scale, bias, eps=eps, rms=rms)
    if policy.norm == "native":
        return cpu.norm(x, scale, bias, eps=eps, rms=rms)
    ref = lambda x, s, b: xla.norm(x, s, b, eps=eps, rms=rms)
    if not (policy.cpu_kernels and cpu.norm_usable(x)):
        return ref(x, scale, bias)
    return on_platforms(x, scale, bias, default=ref, cpu=lambda x, s, b: cpu.norm(x, s, b, eps=eps, rms=rms))


__all__ = ["XLA_ONLY", "AttentionMask", "OpsPolicy", "attention", "cached_attention", "dense", "dense_output_major",
           "make_attention_mask", "norm", "on_platforms", "output_major"]
