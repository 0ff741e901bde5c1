"""Dense layers whose params carry logical axis names.

Every kernel is created through `nn.with_logical_partitioning`, so `nn.get_partition_spec` on the
abstract params yields logical names ("embed", "mlp", "heads", ...) that `mmjax.sharding` maps to
mesh axes. Model code never mentions a mesh. The product itself is `mmjax.ops.dense`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import ops
from mmjax.ops import OpsPolicy

Initializer = Callable[..., jax.Array]
Axes = tuple[str | None, ...]


def _as_tuple(x) -> tuple[int, ...]:
    return tuple(x) if isinstance(x, Sequence) else (x,)


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
      ops: the backend policy (`mmjax.ops.OpsPolicy`).

    Params: "kernel" [in..., out...] and "bias" [out...], in param_dtype; the product in dtype.
    """

    features: int | tuple[int, ...]
    kernel_axes: Axes
    in_rank: int = 1
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer | None = None
    bias_init: Initializer = nn.initializers.zeros
    ops: OpsPolicy = OpsPolicy()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in...] → [..., out...]."""
        features = _as_tuple(self.features)
        shape = x.shape[x.ndim - self.in_rank:] + features
        if len(self.kernel_axes) != len(shape):
            raise ValueError(f"{self.name}: kernel_axes {self.kernel_axes} do not match kernel shape {shape}")
        init = self.kernel_init or default_kernel_init(self.in_rank, len(features))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes), shape, self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, self.kernel_axes[self.in_rank:]),
                              features, self.param_dtype).astype(self.dtype)
        return ops.dense(x.astype(self.dtype), kernel.astype(self.dtype), bias, in_rank=self.in_rank, policy=self.ops)
