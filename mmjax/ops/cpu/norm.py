"""LayerNorm and RMSNorm over the last axis with mmjax's native CPU kernel (norm.cc), forward and backward.

    y = norm(x, scale, bias, eps=..., rms=False)      x [..., D] fp32, scale and bias [D] → [..., D]

computes `mmjax.ops.xla.norm` in fp32 as two FFI calls under a `jax.custom_vjp`: the forward keeps each
row's mean and 1/σ, and the backward makes dx, dscale and dbias in one pass over dy and x.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.ops.cpu import library
from mmjax.ops.cpu.ffi import call, usable

# Fewer rows stay with XLA, which fuses a norm into its neighbours: a decode step normalises one row
# per sequence, and there the custom calls cost time (docs/cpu.md).
MIN_ROWS = 64


def _rows(x):
    return x.reshape(-1, x.shape[-1])


def _fwd_call(x2, scale, bias, eps, rms):
    n, d = x2.shape
    shapes = (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.float32),
              jax.ShapeDtypeStruct((n,), jnp.float32))
    return call(library.NORM_FWD, shapes, x2, scale, bias, eps=np.float32(eps), rms=rms)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _norm(x, scale, bias, eps, rms):
    return _fwd_call(_rows(x), scale, bias, eps, rms)[0].reshape(x.shape)


def _norm_fwd(x, scale, bias, eps, rms):
    y, mean, rstd = _fwd_call(_rows(x), scale, bias, eps, rms)
    return y.reshape(x.shape), (x, scale, bias, mean, rstd)


def _norm_bwd(eps, rms, res, dy):
    x, scale, bias, mean, rstd = res
    d = x.shape[-1]
    shapes = (jax.ShapeDtypeStruct((x.size // d, d), jnp.float32), jax.ShapeDtypeStruct((d,), jnp.float32),
              jax.ShapeDtypeStruct((d,), jnp.float32))
    dx, dscale, dbias = call(library.NORM_BWD, shapes, _rows(x), scale, mean, rstd, _rows(dy.astype(jnp.float32)),
                             rms=rms)
    return dx.reshape(x.shape), dscale, (dbias if bias.size else jnp.zeros_like(bias))


_norm.defvjp(_norm_fwd, _norm_bwd)


def norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None = None, *, eps: float, rms: bool = False
         ) -> jax.Array:
    """LayerNorm (rms=False; bias None = no bias) or RMSNorm (rms=True, no bias) of x [..., D] over its last
    axis with the native kernel, fp32. Runs on the CPU only."""
    d = x.shape[-1] if x.ndim else 0
    if x.ndim < 1 or scale.shape != (d,) or (bias is not None and bias.shape != (d,)):
        raise ValueError(f"norm: x [..., D] with scale and bias [D], got {x.shape}, {scale.shape}, "
                         f"{None if bias is None else bias.shape}")
    if rms and bias is not None:
        raise ValueError("norm: RMSNorm has no bias")
    if {x.dtype, scale.dtype} != {jnp.dtype(jnp.float32)} or (bias is not None and bias.dtype != jnp.float32):
        raise TypeError(f"norm: fp32 only, got {x.dtype}, {scale.dtype}")
    return _norm(x, scale, jnp.zeros((0,), jnp.float32) if bias is None else bias, float(eps), bool(rms))


def norm_usable(x: jax.Array) -> bool:
    """Whether `norm` should take x (at trace time): at least MIN_ROWS rows, fp32, the kernels usable."""
    if x.ndim < 1 or x.shape[-1] == 0 or x.size // x.shape[-1] < MIN_ROWS:
        return False
    return usable(x, what="norm")
