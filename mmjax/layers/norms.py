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


def normalize_channels_last(x: jax.Array, groups: int, eps: float, *, over_batch: bool = False) -> jax.Array:
    """(x − μ) / √(σ² + eps) for x [B, H, W, C] with the C channels in `groups` contiguous groups;
    μ, σ² (biased) over (H, W, C/groups) per example (GroupNorm), or also over B with `over_batch`
    (training-mode BatchNorm when groups == C). float32 in, float32 out; no learned scale or shift.

    Both moments are reduced over the spatial axes first (per channel, [B, C]) and only then over
    the channels of a group: XLA:CPU reduces a 5-D [B, H, W, G, C/G] view over (1, 2, 4) about 10×
    slower than this. Two passes (the variance of x − μ), so no cancellation as in E[x²] − μ².
    """
    c = x.shape[-1]
    if c % groups:
        raise ValueError(f"{c} channels are not divisible into {groups} groups")
    axes = (0, 1, 2) if over_batch else (1, 2)

    def grouped_mean(per_channel):  # [B or 1, C] → the group's mean broadcast back to [B or 1, 1, 1, C]
        n = per_channel.shape[0]
        g = jnp.mean(per_channel.reshape(n, groups, c // groups), axis=-1, keepdims=True)
        return jnp.broadcast_to(g, (n, groups, c // groups)).reshape(n, 1, 1, c)

    x = x.astype(jnp.float32)
    mean = grouped_mean(jnp.mean(x, axis=axes).reshape(-1, c))
    var = grouped_mean(jnp.mean(jnp.square(x - mean), axis=axes).reshape(-1, c))
    return (x - mean) * jax.lax.rsqrt(var + eps)
