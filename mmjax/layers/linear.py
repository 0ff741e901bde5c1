"""Dense layers whose params carry logical axis names.

Every kernel is created through `nn.with_logical_partitioning`, so `nn.get_partition_spec` on the
abstract params yields logical names ("embed", "mlp", "heads", ...) that `mmjax.sharding` maps to
mesh axes. Model code never mentions a mesh.

Row-major matmuls for training on XLA:CPU. An input [B, T, in] is multiplied as [B·T, in] (a
reshape of a contiguous array, free) and the result reshaped back. The forward is the same dot
either way; the difference is the kernel gradient dW = xᵀ · dy. With two leading axes it contracts
two axes, and XLA:CPU's dot canonicalisation materialises a transposed copy of dy ([B, T, out] →
[out, B·T]) before every such dot; with one row axis the same dot reads both operands as they are.
Tiny CLIP train step (2-core AMD EPYC): the copies' thread time 255 → 135 ms per step. The output
axes are flattened too ([rows, out] for features (H, Dh)) and the bias is added to that 2D product, so
db is a column sum: added to [B, T, H, Dh], db reduced two axes of a 4D array, which XLA:CPU turned
into 4D reduce-windows at under 1 GB/s (2-core Intel Xeon with AVX-512, tiny CLIP step: 101 ms of
1.27 s thread time; step 0.93–1.0 → 0.81–0.85 s, with the transposes that went away with it). The 2D
product is `rows_dot`, whose backward multiplies dy by a materialised copy of Wᵀ: XLA:CPU's dot ran
dy · Wᵀ read through W at about half the speed of x · W (fc1's dx [8320, 512] · [512, 128]: 61
against 130 GFLOP/s). Self-attention's q, k, v are one such product by the three kernels side by side
(`fused_projection`). Only on the
CPU backend (FLATTEN_ROWS): elsewhere, merging a batch axis with a sequence axis that is sharded
too would force a resharding.

Weight-major matmuls for decoding. A decode step multiplies a few rows (the batch) by every weight of
the model once, so its speed is how fast the weights stream. XLA:CPU's dot (YNNPACK) streams a weight
stored output-major, W^T [N, K], about twice as fast for a handful of rows when it computes
y^T = W^T · x^T [N, rows] than x · W with W [K, N] (measured on a 2-core AMD EPYC with AVX2, 8 rows:
the 512 × 32000 head 12.5 → 6.4 ms, a 512 × 2752 MLP kernel 0.35 → 0.26 ms). The params keep their
[in, out] layout (converters, sharding and training rely on it); `mmjax.decode` instead builds an
output-major copy of every kernel once per generation call, outside its decode loop, in the
variable collection DECODE ("decode": {…, "kernel_t": [out..., in...]}), and DenseGeneral uses that
copy when it is present. Transposing inside a step would not do: XLA folds a transpose of the kernel
back into the dot's dimension numbers. On x86-64 CPUs with AVX2, `weight_major_dot` multiplies up
to 64 fp32 rows with mmjax's own kernel (`mmjax.kernels.rowdot`), which reads W^T once: twice as
fast as XLA's dot on a chain of a decoder's matmuls, about 15% on a whole batch-8 decode step;
elsewhere, and when the kernel cannot be built, XLA's dot.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import kernels
from mmjax.layers.barriers import materialize

Initializer = Callable[..., jax.Array]
DECODE = "decode"
Axes = tuple[str | None, ...]

# Whether DenseGeneral flattens an input's leading axes into one row axis before its matmul (module
# docstring); None: on the CPU backend.
FLATTEN_ROWS: bool | None = None


def flatten_rows_on() -> bool:
    """Whether DenseGeneral multiplies [B, T, in] as [B·T, in] (FLATTEN_ROWS; None: on the CPU backend)."""
    return jax.default_backend() == "cpu" if FLATTEN_ROWS is None else bool(FLATTEN_ROWS)


def _as_tuple(x) -> tuple[int, ...]:
    return tuple(x) if isinstance(x, Sequence) else (x,)


def weight_major_dot(w_t: jax.Array, x: jax.Array, out_rank: int) -> jax.Array:
    """x · W for a kernel given output-major: w_t [out..., in...] (out_rank output axes), x [rows..., in...]
    → [rows..., out...]. Computed as W^T · x^T, then transposed (see the module docstring)."""
    in_rank = w_t.ndim - out_rank
    rows = x.ndim - in_rank
    if w_t.shape[out_rank:] != x.shape[rows:]:
        raise ValueError(f"weight_major_dot: kernel input axes {w_t.shape[out_rank:]} do not match x's trailing "
                         f"axes {x.shape[rows:]}")
    n_rows, n_out = math.prod(x.shape[:rows]), math.prod(w_t.shape[:out_rank])
    if x.dtype == w_t.dtype and kernels.use_rowdot(w_t, n_rows):
        # The native small-rows kernel (mmjax.kernels): reads every weight once (module docstring).
        y = kernels.rowdot(w_t.reshape(n_out, -1), x.reshape(n_rows, -1))
        return y.reshape(x.shape[:rows] + w_t.shape[:out_rank])
    y_t = jax.lax.dot_general(w_t, x, ((tuple(range(out_rank, w_t.ndim)), tuple(range(rows, x.ndim))), ((), ())))
    return jnp.transpose(y_t, tuple(range(out_rank, out_rank + rows)) + tuple(range(out_rank)))


def output_major(kernel: jax.Array, in_rank: int) -> jax.Array:
    """A kernel [in..., out...] as [out..., in...] (the decode path's copy): on the CPU, fp32, with
    mmjax's transpose kernel (about 1.4× XLA's under huge pages, 1.7× without), else jnp.transpose."""
    in_shape, out_shape = kernel.shape[:in_rank], kernel.shape[in_rank:]
    if kernels.use_transpose(kernel):
        return kernels.transpose(kernel.reshape(math.prod(in_shape), -1)).reshape(out_shape + in_shape)
    return jnp.transpose(kernel, tuple(range(in_rank, kernel.ndim)) + tuple(range(in_rank)))


@jax.custom_vjp
def rows_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [rows, in] · w [in, out], whose backward multiplies dy by a materialised copy of wᵀ (module
    docstring: XLA:CPU's dot ran dy · wᵀ read through w at about half the speed)."""
    return jnp.dot(x, w)


def _rows_dot_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _rows_dot_bwd(res, dy):
    x, w = res
    dx = jnp.dot(dy, materialize(jnp.transpose(w)))
    dw = jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())))
    return dx, dw


rows_dot.defvjp(_rows_dot_fwd, _rows_dot_bwd)


def fused_projection(denses: Sequence[DenseGeneral], x: jax.Array) -> tuple[jax.Array, ...]:
    """(d(x) for d in denses) as one matmul of x [..., D] by the kernels side by side, [D, Σ out]: for
    q/k/v on the CPU, where XLA's dot runs a narrow [rows, D] × [D, D] product at about half the
    speed of a wide one. Each output keeps its layer's shape; each layer keeps its own params."""
    params = [d(x, params_only=True) for d in denses]
    kernels_ = [k.reshape(x.shape[-1], -1) for k, _ in params]
    widths = [k.shape[1] for k in kernels_]
    lead = x.shape[:-1]
    y = rows_dot(x.reshape(math.prod(lead), -1).astype(kernels_[0].dtype), jnp.concatenate(kernels_, axis=1))
    if any(b is not None for _, b in params):
        y = y + jnp.concatenate([jnp.zeros((w,), y.dtype) if b is None else b.reshape(-1)
                                 for (_, b), w in zip(params, widths)])
    outs = jnp.split(y, np.cumsum(widths)[:-1].tolist(), axis=1)
    return tuple(o.reshape(lead + k.shape[1:]) for o, (k, _) in zip(outs, params))


def default_kernel_init(in_rank: int, out_rank: int) -> Initializer:
    """Xavier-uniform over the flattened fan-in and fan-out axes (big_vision's ViT default)."""
    return nn.initializers.variance_scaling(
        1.0, "fan_avg", "uniform",
        in_axis=tuple(range(in_rank)), out_axis=tuple(range(in_rank, in_rank + out_rank)))


class DenseGeneral(nn.Module):
    """y = x · W + b, contracting the last `in_rank` axes of x with the first of W.

    Attributes:
      features: output shape, e.g. D or (heads, head_dim).
      kernel_axes: logical names for every kernel axis (input axes, then output axes).
      in_rank: how many trailing axes of x are contracted (2 for an [.., heads, head_dim] input).

    Variables: params "kernel" [in..., out...] and "bias" [out...]. When applied with the DECODE
    collection mutable, it also stores "kernel_t" (the kernel output-major) there; when that
    collection holds "kernel_t", the kernel param is not read and y = weight_major_dot(kernel_t, x).
    """

    features: int | tuple[int, ...]
    kernel_axes: Axes
    in_rank: int = 1
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer | None = None
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array, *, params_only: bool = False):
        """x [..., in...] → [..., out...]; with params_only, declares the params for an input like x and
        returns (kernel, bias or None) in the compute dtype without multiplying (`fused_projection`)."""
        features = _as_tuple(self.features)
        in_shape = x.shape[x.ndim - self.in_rank:]
        shape = in_shape + features
        if len(self.kernel_axes) != len(shape):
            raise ValueError(
                f"{self.name}: kernel_axes {self.kernel_axes} do not match kernel shape {shape}")
        if params_only:
            return self._kernel(shape, features).astype(self.dtype), self._bias(features) if self.use_bias else None
        out_first = tuple(range(self.in_rank, len(shape))) + tuple(range(self.in_rank))
        x = x.astype(self.dtype)
        if self.has_variable(DECODE, "kernel_t"):
            kernel_t = self.get_variable(DECODE, "kernel_t")
            want = tuple(shape[i] for i in out_first)
            if kernel_t.shape != want:
                raise ValueError(f"{self.name}: decode kernel_t has shape {kernel_t.shape}, expected {want}")
            y = weight_major_dot(kernel_t.astype(self.dtype), x, len(features))
        else:
            kernel = self._kernel(shape, features)
            if self.is_mutable_collection(DECODE) and not self.is_initializing():
                self.variable(DECODE, "kernel_t", lambda: output_major(kernel, self.in_rank))
            kernel = kernel.astype(self.dtype)
            lead = x.shape[:x.ndim - self.in_rank]
            if flatten_rows_on():
                # [rows, in] · [in, out] as 2D arrays (module docstring): dW contracts one axis, and db
                # sums the columns of a 2D dy.
                y = rows_dot(x.reshape(math.prod(lead), -1), kernel.reshape(math.prod(in_shape), -1))
                if self.use_bias:
                    y = y + self._bias(features).reshape(-1)
                return y.reshape(lead + features)
            contract = (tuple(range(x.ndim - self.in_rank, x.ndim)), tuple(range(self.in_rank)))
            y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
        if self.use_bias:
            y = y + self._bias(features)
        return y

    def _kernel(self, shape: tuple[int, ...], features: tuple[int, ...]) -> jax.Array:
        init = self.kernel_init or default_kernel_init(self.in_rank, len(features))
        return self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes), shape, self.param_dtype)

    def _bias(self, features: tuple[int, ...]) -> jax.Array:
        bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, self.kernel_axes[self.in_rank:]),
                          features, self.param_dtype)
        return bias.astype(self.dtype)
