"""LayerNorm and RMSNorm, computed in float32 whatever the activation dtype."""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import ops
from mmjax.ops import OpsPolicy

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
    ops: OpsPolicy = OpsPolicy()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"unknown norm kind {self.kind!r}; expected 'layernorm' or 'rmsnorm'")
        d = x.shape[-1]
        rms = self.kind == "rmsnorm"
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                           (d,), self.param_dtype).astype(jnp.float32)
        bias = None
        if self.use_bias and not rms:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)),
                              (d,), self.param_dtype).astype(jnp.float32)
        y = ops.norm(x.astype(jnp.float32), scale, bias, eps=self.eps, rms=rms, policy=self.ops)
        return y.astype(self.dtype)
