"""Patch embedding: cut an image into P×P patches and project each to D.

For an image [B, H, W, C] and patch size P there are N = (H/P)·(W/P) = HW/P² patches, each a vector
of P·P·C pixels; a linear map (equivalently a stride-P convolution) takes it to D.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """[B, H, W, C] → [B, N, P, P, C] with N = HW/P², patches in row-major grid order."""
    b, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch}")
    gh, gw = h // patch, w // patch
    x = images.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * gw, patch, patch, c)


class PatchEmbed(nn.Module):
    """[B, H, W, C] → [B, N, D]. The kernel is stored as a conv kernel [P, P, C, D] (HWIO)."""

    width: int
    patch: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        patches = patchify(images, self.patch).astype(self.dtype)  # [B, N, P, P, C]
        c = images.shape[-1]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                                         (None, None, None, "embed")),
            (self.patch, self.patch, c, self.width), self.param_dtype)
        x = jnp.einsum("bnpqc,pqcd->bnd", patches, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                              (self.width,), self.param_dtype)
            x = x + bias.astype(self.dtype)
        return x
