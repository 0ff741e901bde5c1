"""Feed-forward blocks: D → mlp_dim → D with a chosen activation, or gated (SwiGLU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.linear import DenseGeneral
from mmjax.ops import OpsPolicy
from mmjax.sharding import constrain

Activation = Literal["gelu", "gelu_tanh", "quick_gelu", "relu", "silu", "swiglu", "geglu"]


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's approximation: x · σ(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU, x · Φ(x) = ½x(1 + erf(x/√2)), written with erf as HF/PyTorch do.

    `jax.nn.gelu(approximate=False)` computes Φ through erfc, which XLA's CPU backend expands
    into exponentials and selects: the MLP activation then cost ~1.7× as much per train step
    (forward + backward, [8320, 512] fp32: 7.5 vs 4.3 ms). Both agree to ~1e-6 absolute.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_erf,  # exact, erf-based
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
GATED = {"swiglu": "silu", "geglu": "gelu_tanh"}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Mlp(nn.Module):
    """Plain: fc2(act(fc1(x))).  Gated (swiglu/geglu): fc2(act(gate(x)) * fc1(x)).  x: [B, N, D]."""

    hidden_dim: int
    activation: Activation = "gelu"
    use_bias: bool = True
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    ops: OpsPolicy = OpsPolicy()

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        if self.activation not in ACTIVATIONS and self.activation not in GATED:
            raise ValueError(f"unknown activation {self.activation!r}; known: "
                             f"{sorted(ACTIVATIONS) + sorted(GATED)}")
        d = x.shape[-1]
        dense = lambda f, axes, name: DenseGeneral(
            f, axes, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, ops=self.ops,
            name=name)
        h = dense(self.hidden_dim, ("embed", "mlp"), "fc1")(x)
        if self.activation in GATED:
            gate = dense(self.hidden_dim, ("embed", "mlp"), "gate")(x)
            h = get_activation(GATED[self.activation])(gate) * h
        else:
            h = get_activation(self.activation)(h)
        h = constrain(h, ("act_batch", "act_len", "act_mlp"))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return dense(d, ("mlp", "embed"), "fc2")(h)
