"""A colour palette for pixel-level autoregressive models (iGPT, Chen et al. 2020).

iGPT clusters the RGB values of training pixels with k-means (k = 512 there) and models each image
as a raster sequence of cluster ids: a sequence of H·W tokens over a k-word vocabulary instead of
3·H·W 8-bit values. Here:

    palette  P [k, 3] in [0, 1]: k-means centres of training pixels (scikit-learn's KMeans),
             rounded to 8-bit values and sorted by luminance 0.299 R + 0.587 G + 0.114 B, then R, G, B (a fixed order);
    quantise id(x) = argmin_j ‖x − P_j‖²  per pixel: [.., H, W, 3] → [.., H, W] int32;
    dequantise x̂ = P[id].

The built-in `shapes` scenes are drawn in flat colours (12 object colours on 3 backgrounds), so a
palette of ≥ 15 colours fitted on them is lossless: `quantisation_error` says how far from it a
palette is on given images.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def fit_palette(pixels, k: int, *, seed: int = 0, max_pixels: int = 200_000) -> np.ndarray:
    """k-means centres of `pixels` (float [..., 3] in [0, 1]), sorted (module docstring): float32 [k, 3].

    At most `max_pixels` pixels are clustered (a seeded random subset). Fewer distinct colours
    than k is an error: k-means would return duplicate centres, ids that no pixel maps to.
    """
    from sklearn.cluster import KMeans
    x = np.asarray(pixels, np.float32).reshape(-1, 3) if np.ndim(pixels) else np.zeros((0, 3), np.float32)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"a palette needs k >= 2 colours, got {k!r}")
    if x.size == 0 or not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ValueError("palette pixels must be finite RGB values in [0, 1], "
                         f"got {x.shape[0]} pixels" + (f" in [{x.min():.3g}, {x.max():.3g}]" if x.size else ""))
    rng = np.random.default_rng(seed)
    if x.shape[0] > max_pixels:
        x = x[rng.choice(x.shape[0], max_pixels, replace=False)]
    distinct = np.unique(np.round(x * 255).astype(np.int32), axis=0).shape[0]
    if distinct < k:
        raise ValueError(f"the pixels hold {distinct} distinct colours, fewer than k={k}: use k <= {distinct}")
    centres = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x).cluster_centers_.astype(np.float32)
    # Rounded to 8-bit values, the images' own precision: a flat colour is then reproduced exactly.
    centres = np.round(np.clip(centres, 0.0, 1.0) * 255).astype(np.float32) / np.float32(255)
    luma = centres @ np.array([0.299, 0.587, 0.114], np.float32)
    return centres[np.lexsort((centres[:, 2], centres[:, 1], centres[:, 0], luma))]


def quantise(images, palette):
    """Nearest palette colour per pixel: images [..., 3] in [0, 1] (numpy or jax) → ids [...] int32."""
    xp = jnp if not isinstance(images, np.ndarray) else np
    p = xp.asarray(palette, xp.float32)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"a palette is [k, 3] RGB colours, got shape {p.shape}")
    if images.shape[-1] != 3:
        raise ValueError(f"images must be RGB [..., 3], got shape {images.shape}")
    # ‖x − p‖² = ‖x‖² − 2 x·p + ‖p‖²; ‖x‖² is the same for every j, so it does not change the argmin.
    score = (p * p).sum(-1) - 2.0 * (images.astype(xp.float32) @ p.T)
    return xp.argmin(score, axis=-1).astype(xp.int32)


def dequantise(ids, palette):
    """ids [...] → colours [..., 3] = palette[ids]."""
    xp = jnp if not isinstance(ids, np.ndarray) else np
    return xp.asarray(palette, xp.float32)[ids]


def quantisation_error(images, palette) -> float:
    """Mean squared error per sub-pixel of dequantise(quantise(images)) against images (0: lossless)."""
    x = np.asarray(images, np.float32)
    return float(np.mean((dequantise(quantise(x, palette), palette) - x) ** 2))


__all__ = ["dequantise", "fit_palette", "quantisation_error", "quantise"]
