"""LayerNorm and RMSNorm, computed in float32 whatever the activation dtype."""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

NormKind = Literal["layernorm", "rmsnorm"]


class Norm(nn.Module):
    """LayerNorm: (x - mean) / sqrt(var + eps) * scale + bias.  RMSNorm: x / sqrt(mean(x²) + eps) * scale.

    Statistics are taken in float32 (bf16 variance is too coarse), the result is cast back to `dtype`.
    """

    kind: NormKind = "layernorm"
    eps: float = 1e-6
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        xf = x.astype(jnp.float32)
        if self.kind == "layernorm":
            mean = jnp.mean(xf, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
            y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        elif self.kind == "rmsnorm":
            y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        else:
            raise ValueError(f"unknown norm kind {self.kind!r}; expected 'layernorm' or 'rmsnorm'")
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                           (d,), self.param_dtype)
        y = y * scale.astype(jnp.float32)
        if self.use_bias and self.kind == "layernorm":
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)),
                              (d,), self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)
