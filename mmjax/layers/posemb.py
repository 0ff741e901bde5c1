"""Position embeddings: learned, fixed 2D sin-cos, rotary (RoPE), and resizing a learned grid."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
    """MoCo-v3 / big_vision 2D sin-cos table [h*w, dim]: a quarter of the channels each for
    sin(y·ω), cos(y·ω), sin(x·ω), cos(x·ω), with ω_k = 1 / temperature^(k / (dim/4))."""
    if dim % 4:
        raise ValueError(f"sincos2d needs a width divisible by 4, got {dim}")
    y, x = np.mgrid[:h, :w]
    omega = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4 - 1 if dim > 4 else 1))
    y = y.reshape(-1)[:, None] * omega[None, :]
    x = x.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class LearnedPosEmb(nn.Module):
    """A learned table [1, N, D] added to the tokens (std 0.02, as ViT and CLIP)."""

    length: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[1] != self.length:
            raise ValueError(f"{x.shape[1]} tokens do not match the position table of length "
                             f"{self.length}; resize the table (resize_posemb) for a new resolution")
        table = self.param(
            "pos_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
            (1, self.length, x.shape[-1]), self.param_dtype)
        return x + table.astype(x.dtype)


def resize_posemb(table: jax.Array | np.ndarray, new_grid: tuple[int, int],
                  num_prefix_tokens: int = 0) -> np.ndarray:
    """Resizes a learned grid table [1, T + h*w, D] to [1, T + H*W, D] (bilinear on the grid part;
    the T prefix tokens, e.g. CLS, are kept as they are)."""
    table = np.asarray(table)
    prefix, grid = table[:, :num_prefix_tokens], table[:, num_prefix_tokens:]
    n = grid.shape[1]
    side = round(np.sqrt(n))
    if side * side != n:
        raise ValueError(f"cannot resize a position table of {n} grid tokens: not a square grid")
    grid = grid.reshape(side, side, -1)
    new = jax.image.resize(grid, (*new_grid, grid.shape[-1]), method="bilinear", antialias=False)
    return np.concatenate([prefix, np.asarray(new).reshape(1, -1, grid.shape[-1])], axis=1)


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
    """Rotary embedding, "rotate-half" layout (as HF Llama): x [B, S, H, Dh], positions [B, S].

    The pair (x_i, x_{i + Dh/2}) is rotated by angle pos · base^(-2i/Dh)."""
    dh = x.shape[-1]
    if dh % 2:
        raise ValueError(f"RoPE needs an even head dim, got {dh}")
    return rotate_half(x, positions.astype(jnp.float32)[..., None] * rope_frequencies(dh, base))


def rope_frequencies(dh: int, base: float) -> jax.Array:
    """θ_i = base^(−2i/Dh), i < Dh/2: the rate of RoPE's pair (x_i, x_{i + Dh/2})."""
    return 1.0 / (base ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))


def rotate_half(x: jax.Array, angles: jax.Array) -> jax.Array:
    """x [B, S, H, Dh] with each pair (x_i, x_{i + Dh/2}) turned by angles [B, S, Dh/2] (fp32 inside)."""
    dh = x.shape[-1]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : dh // 2], xf[..., dh // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
