"""Molmo-style multi-crop images: 2×2 attention pooling of patch features and the token layout.

An image is seen as crops (`mmjax.data.transforms.MultiCrop`): crop 0 is the whole image at S²
(the global view), crops 1..g² the g×g tiles of the image at (g·S)², row-major. Each crop goes
through the vision tower to patch features [h, w, D]; every 2×2 window of patches is pooled to one
feature by attention whose query is the window's mean (Molmo):

    x₁..x₄ ∈ R^D the window's patches,  x̄ = (x₁ + x₂ + x₃ + x₄) / 4
    per head: q = x̄ W_q + b_q,  k_i = x_i W_k + b_k,  v_i = x_i W_v + b_v        (Dh each)
              o = Σ_i softmax_i(q·k_i / √Dh) v_i
    y = concat_heads(o) W_o + b_o ∈ R^D'

so 4× fewer image tokens than patches, with learned weights rather than a plain average.

Token layout of one image (Molmo: `<im_start>`/`<im_end>` around each view, `<im_col>` after each
row), with P the placeholder id whose slots receive features and start/col/end ordinary text ids:

    start  [P × w/2, col] × h/2  end                          global view, h/2 rows
    start  [P × g·w/2, col] × g·h/2  end                      the tiles stitched into one grid

The tile grid is read as one picture: row R of it runs through the tiles (R // (h/2), 0..g-1),
so features are reordered from crop order into layout order (`MultiCropLayout.feature_index`).
Our tiles do not overlap (Molmo's overlap and trim their margins).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.layers.attention import Attention
from mmjax.ops import OpsPolicy


class _QueryContextAttention(Attention):
    """`Attention` with queries from one input and keys/values from another, projected to
    `out_features` (the parent projects back to the query's width)."""

    out_features: int | None = None

    @nn.compact
    def __call__(self, query: jax.Array, context: jax.Array) -> jax.Array:
        """query [M, Q, D], context [M, K, D] → [M, Q, out_features or D]."""
        q, k, v = self.project(query, context=context)
        return self.attend(q, k, v, mask=None, out_dim=self.out_features or query.shape[-1])


class AttentionPool2x2(nn.Module):
    """Pools every 2×2 window of patch features to one, by attention with the window mean as query.

    Attributes:
      num_heads: H of the pooling attention.
      head_dim: Dh (None → D / H).
      out_features: D' (None → D).
      ops: the backend policy, passed to the attention.
    Params (under "attention", as in `Attention`): query / key / value weights [D, H, Dh] (logical
    axes embed, heads | kv_heads, head_dim), out [H, Dh, D'] (heads, head_dim, embed), with biases.
    """

    num_heads: int
    head_dim: int | None = None
    out_features: int | None = None
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    ops: OpsPolicy = OpsPolicy()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, crops, h, w, D] → [B, crops, h/2, w/2, D']; window (i, j) pools patches
        (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)."""
        if x.ndim != 5:
            raise ValueError(f"AttentionPool2x2 takes patch features [B, crops, h, w, D], got shape {x.shape}")
        b, c, h, w, d = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"2×2 pooling needs an even patch grid, got h={h}, w={w} (pick the crop size so "
                             "that crop_size / patch_size is even)")
        windows = x.reshape(b, c, h // 2, 2, w // 2, 2, d).transpose(0, 1, 2, 4, 3, 5, 6)
        windows = windows.reshape(-1, 4, d)                   # [M, 4, D], M = B·crops·h/2·w/2
        query = jnp.mean(windows, axis=1, keepdims=True)     # [M, 1, D]: x̄
        pooled = _QueryContextAttention(num_heads=self.num_heads, head_dim=self.head_dim, use_bias=self.use_bias,
                                        out_features=self.out_features, dtype=self.dtype,
                                        param_dtype=self.param_dtype, ops=self.ops, name="attention")(query, windows)
        return pooled.reshape(b, c, h // 2, w // 2, pooled.shape[-1])


class MultiCropLayout(NamedTuple):
    """The image block of one multi-crop image.

    ids: int32 [L], the block's ids: placeholders and the start / col / end text ids.
    feature_index: int32 [N]: the k-th placeholder of `ids` takes pooled feature feature_index[k]
      of the flattened [crops · h/2 · w/2] features (crop-major, row-major inside a crop).
    num_features: N = (1 + g²) · h/2 · w/2, the placeholders in `ids`.
    """

    ids: np.ndarray
    feature_index: np.ndarray
    num_features: int


def multicrop_layout(grid: int, pooled_h: int, pooled_w: int, *, image_id: int, start_id: int, end_id: int,
                     col_id: int) -> MultiCropLayout:
    """The layout of the module docstring for a g×g tile grid (grid=0: the global view alone) whose
    crops pool to pooled_h × pooled_w features each; L = 2 + h'(w' + 1) + [g > 0](2 + g·h'(g·w' + 1))
    with h', w' = pooled_h, pooled_w."""
    if grid < 0 or pooled_h < 1 or pooled_w < 1:
        raise ValueError(f"need grid >= 0 and a non-empty pooled grid, got grid={grid}, {pooled_h}×{pooled_w}")
    ids: list[int] = []
    index: list[int] = []

    def view(rows: int, cols: int, feature_of) -> None:
        ids.append(start_id)
        for r in range(rows):
            for col in range(cols):
                ids.append(image_id)
                index.append(feature_of(r, col))
            ids.append(col_id)
        ids.append(end_id)

    hw = pooled_h * pooled_w
    view(pooled_h, pooled_w, lambda r, col: r * pooled_w + col)  # crop 0: the global view
    if grid:
        def tile_feature(r: int, col: int) -> int:
            (tr, i), (tc, j) = divmod(r, pooled_h), divmod(col, pooled_w)
            return (1 + tr * grid + tc) * hw + i * pooled_w + j
        view(grid * pooled_h, grid * pooled_w, tile_feature)
    return MultiCropLayout(np.asarray(ids, np.int32), np.asarray(index, np.int32), len(index))


def arrange_multicrop_features(pooled: jax.Array, layout: MultiCropLayout) -> jax.Array:
    """pooled [B, crops, h', w', D] → [B, N, D] in the order of the layout's placeholders."""
    b, c, h, w, d = pooled.shape
    if c * h * w <= int(layout.feature_index.max()):
        raise ValueError(f"pooled features {pooled.shape} do not cover the layout (it reads feature "
                         f"{int(layout.feature_index.max())} of {c * h * w})")
    return pooled.reshape(b, c * h * w, d)[:, layout.feature_index]


__all__ = ["AttentionPool2x2", "MultiCropLayout", "arrange_multicrop_features", "multicrop_layout"]
