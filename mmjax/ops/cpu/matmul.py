"""Matrix products for XLA:CPU: the training layout of dense layers, and the decode path's kernels.

Training (`dense_rows`). An input [B, T, in] is multiplied as [B·T, in] (a free reshape) and the bias
added to the 2-D product. The forward is the same dot; the difference is the backward: with one row
axis, dW = xᵀ·dy reads both operands as they are (with two leading axes XLA:CPU's dot
canonicalisation copied dy transposed before every such dot), and db is a column sum of a 2-D dy (on
[B, T, H, Dh] it became slow 4-D reduce-windows). The 2-D product is `rows_dot`, whose backward
multiplies dy by a materialised copy of Wᵀ: XLA:CPU ran dy·Wᵀ read through W at about half the speed
of x·W. Figures: docs/cpu.md.

Decoding (`rowdot`, `transpose`). A decode step multiplies a few rows (the batch) by every weight once,
so its speed is how fast the weights stream. `rowdot` multiplies up to ROWDOT_MAX_ROWS fp32 rows by a
kernel stored output-major, W^T [N, K], reading every weight once (rowdot.cc); `transpose` makes such
copies (mmjax.decode makes them once per generation call on the CPU).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mmjax.ops.cpu import library
from mmjax.ops.cpu.ffi import call, usable

# Products with more rows use XLA's dot: the kernel re-reads each tile of weights from L1 once per 4
# rows, so its edge shrinks with the rows (docs/cpu.md).
ROWDOT_MAX_ROWS = 64


def materialize(x: jax.Array) -> jax.Array:
    """x, computed into a buffer of its own: the operand of a conditional that is never false.

    XLA materialises a conditional's operands; `jax.lax.optimization_barrier` cannot do this on the CPU
    backend (XLA:CPU expands barriers away before fusion). The predicate sits behind an
    optimization_barrier so that it is not constant-folded; the other branch differs from the
    identity so that XLA does not merge the two away."""
    return jax.lax.cond(jax.lax.optimization_barrier(jnp.bool_(True)), lambda a: a, lambda a: -a, x)


@jax.custom_vjp
def rows_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [rows, in] · w [in, out], whose backward multiplies dy by a materialised copy of wᵀ."""
    return jnp.dot(x, w)


def _rows_dot_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _rows_dot_bwd(res, dy):
    x, w = res
    dx = jnp.dot(dy, materialize(jnp.transpose(w)))
    dw = jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())))
    return dx, dw


rows_dot.defvjp(_rows_dot_fwd, _rows_dot_bwd)


def dense_rows(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, in_rank: int) -> jax.Array:
    """`mmjax.ops.xla.dense` computed as a 2-D product [rows, in] · [in, out] plus a 2-D bias."""
    in_shape, out_shape = kernel.shape[:in_rank], kernel.shape[in_rank:]
    lead = x.shape[:x.ndim - in_rank]
    y = rows_dot(x.reshape(math.prod(lead), -1), kernel.reshape(math.prod(in_shape), -1))
    if bias is not None:
        y = y + bias.reshape(-1)
    return y.reshape(lead + out_shape)


def rowdot(w_t: jax.Array, x: jax.Array) -> jax.Array:
    """y [M, N] = x [M, K] · w_t [N, K]ᵀ in fp32 with the native kernel (CPU only)."""
    if w_t.ndim != 2 or x.ndim != 2 or w_t.shape[1] != x.shape[1]:
        raise ValueError(f"rowdot: expects w_t [N, K] and x [M, K], got {w_t.shape} and {x.shape}")
    if w_t.dtype != jnp.float32 or x.dtype != jnp.float32:
        raise TypeError(f"rowdot: fp32 only, got {w_t.dtype} and {x.dtype}")
    return call(library.ROWDOT, (jax.ShapeDtypeStruct((x.shape[0], w_t.shape[0]), jnp.float32),), w_t, x)[0]


def rowdot_usable(w_t: jax.Array, x: jax.Array) -> bool:
    """Whether `rowdot` should multiply x [..., K] by w_t [N, K] (at trace time)."""
    rows = math.prod(x.shape[:-1])
    return 1 <= rows <= ROWDOT_MAX_ROWS and usable(w_t, x, what="decode matmul")


def transpose(x: jax.Array) -> jax.Array:
    """xᵀ [N, K] of x [K, N] in fp32 with the native kernel (CPU only)."""
    if x.ndim != 2:
        raise ValueError(f"transpose: expects a matrix [K, N], got shape {x.shape}")
    if x.dtype != jnp.float32:
        raise TypeError(f"transpose: fp32 only, got {x.dtype}")
    return call(library.TRANSPOSE, (jax.ShapeDtypeStruct((x.shape[1], x.shape[0]), jnp.float32),), x)[0]
