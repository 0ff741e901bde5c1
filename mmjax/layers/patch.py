"""Patch embedding: cut an image into P×P patches and project each to D.

For an image [B, H, W, C] and patch size P there are N = (H/P)·(W/P) = HW/P² patches, each a vector
of P·P·C pixels; a linear map (equivalently a stride-P convolution) takes it to D.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.mlp import gelu_erf
from mmjax.layers.norms import Norm


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


class ConvStem(nn.Module):
    """Early convolutions before the patch embedding (Xiao et al. 2021, "Early Convolutions Help
    Transformers See Better"): 3×3 convs, each followed by LayerNorm over channels and GELU.

    `layers` holds (channels, stride) per conv, "SAME" padding, no conv bias (the norm has one).
    [B, H, W, C] → [B, H/S, W/S, C_last] with S the product of the strides; the patch embedding
    then cuts P/S patches, so the token grid (HW/P² tokens) does not change.
    """

    layers: tuple[tuple[int, int], ...]
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images.astype(self.dtype)
        for i, (channels, stride) in enumerate(self.layers):
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, None))
            x = nn.Conv(channels, (3, 3), strides=stride, padding="SAME", use_bias=False, kernel_init=init,
                        dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv_{i}")(x)
            x = gelu_erf(Norm("layernorm", self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                              name=f"norm_{i}")(x))
        return x


def stem_stride(layers: tuple[tuple[int, int], ...]) -> int:
    """The total downsampling of a ConvStem: the product of its strides."""
    stride = 1
    for _, s in layers:
        stride *= s
    return stride
