"""Image metrics under their honest names: PSNR, the Fréchet distance and KID of feature sets.

    PSNR(x, y)  = 10·log10(R² / MSE(x, y))                   per image; R = data_range (2 for [−1, 1])
    FD(a, b)    = ‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½)     Gaussians fitted to features [N, F], [M, F]
    KID(a, b)   = MMD²_u with k(x, y) = (x·y / F + 1)³        unbiased, averaged over random subsets

FD and KID are only as meaningful as the features they are computed in. mmjax has no Inception
network offline, so callers report them in the features they used, e.g. "FD-probe" / "KID-probe"
(the shapes probe classifier, mmjax.evals.probe) or "FD-AlexNet"; never as "FID", whose numbers
are only comparable when computed in Inception-v3 pool3 features.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg


def psnr(x, y, data_range: float = 2.0):
    """Peak signal-to-noise ratio (dB) per image [B] of images [B, ...] in a range of width
    `data_range` (2.0 for [−1, 1], 1.0 for [0, 1], 255 for uint8). Identical images give +inf.

    Works on numpy and JAX arrays (and inside jit): the result has the inputs' array type."""
    if x.shape != y.shape:
        raise ValueError(f"psnr needs images of one shape, got {x.shape} and {y.shape}")
    if x.ndim < 2:
        raise ValueError(f"psnr wants a batch of images [B, ...], got shape {x.shape}")
    xp = _array_namespace(x, y)
    err = xp.asarray(x, xp.float32) - xp.asarray(y, xp.float32)
    mse = xp.mean(err * err, axis=tuple(range(1, err.ndim)))
    with np.errstate(divide="ignore"):  # MSE 0: +inf, by definition
        return 10.0 * xp.log10(data_range**2 / mse)


def mean_psnr(x, y, data_range: float = 2.0) -> float:
    """The mean over the batch of `psnr` (mean of per-image dB, not PSNR of the pooled MSE)."""
    return float(np.mean(np.asarray(psnr(x, y, data_range), np.float64)))


def _array_namespace(*arrays):
    if any(type(a).__module__.startswith(("jax", "jaxlib")) for a in arrays):
        import jax.numpy as jnp
        return jnp
    return np


def _as_features(feats, name: str) -> np.ndarray:
    f = np.asarray(feats, np.float64)
    if f.ndim != 2:
        raise ValueError(f"{name} must be features [N, F], got shape {f.shape}")
    if not np.all(np.isfinite(f)):
        raise ValueError(f"{name} has non-finite values")
    return f


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """(μ [F], Σ [F, F]) of features [N, F], N ≥ 2: the mean and the unbiased (N − 1) covariance."""
    f = _as_features(feats, "feats")
    if f.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {f.shape[0]}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b, eps: float = 1e-6) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½), the Fréchet (2-Wasserstein²) distance of two Gaussians.

    As pytorch-fid: if the matrix square root is not finite or Σa Σb is singular (features with
    no variance, e.g. dead ReLU units, or fewer samples than features), it is taken of
    (Σa + εI)(Σb + εI); a complex root (numerical error) keeps its real part when the imaginary
    part of its diagonal is negligible (|·| ≤ 1e-3), else raises.
    """
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    sigma_a, sigma_b = np.atleast_2d(sigma_a).astype(np.float64), np.atleast_2d(sigma_b).astype(np.float64)
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != mu_a.shape * 2:
        raise ValueError(f"mismatched statistics: μ {mu_a.shape} / {mu_b.shape}, Σ {sigma_a.shape} / {sigma_b.shape}")
    diff = mu_a - mu_b
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)  # scipy's "Matrix is singular"
        try:
            covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b)
        except scipy.linalg.LinAlgWarning:
            covmean = np.full(sigma_a.shape, np.nan)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(sigma_a.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        max_imag = np.max(np.abs(np.diagonal(covmean).imag))
        if max_imag > 1e-3:
            raise ValueError(f"the matrix square root has a large imaginary component ({max_imag:.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))


def frechet_distance(feats_a, feats_b, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to features [N, F] and [M, F] (N, M ≥ 2).

    Report it under the features' name ("FD-probe", "FD-AlexNet"), not as FID. Small N gives a
    biased (too large) value: compare numbers computed with the same N."""
    fa, fb = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feature widths differ: {fa.shape[1]} vs {fb.shape[1]}")
    return frechet_distance_from_stats(*gaussian_stats(fa), *gaussian_stats(fb), eps=eps)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x·y / F + 1)³ for rows of x [n, F] and y [m, F] → [n, m] (KID's kernel)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kid(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance's estimator (Bińkowski et al. 2018, as clean-fid), in any features.

    For each of `subsets` draws, m = min(subset_size, N, M) rows of each set without replacement,
    the unbiased MMD² with the cubic polynomial kernel:

        MMD²_u = 1/(m(m−1)) Σ_{i≠j} [k(a_i, a_j) + k(b_i, b_j)] − 2/m² Σ_{i,j} k(a_i, b_j)

    Returns (mean, std) over the subsets. It may be slightly negative when the sets match.
    Report it under the features' name ("KID-probe"), not as Inception's KID.
    """
    fa, fb = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feature widths differ: {fa.shape[1]} vs {fb.shape[1]}")
    m = min(subset_size, fa.shape[0], fb.shape[0])
    if m < 2 or subsets < 1:
        raise ValueError(f"KID needs subsets >= 1 and at least 2 rows per set, got subsets={subsets}, m={m}")
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        a = fa[rng.choice(fa.shape[0], m, replace=False)]
        b = fb[rng.choice(fb.shape[0], m, replace=False)]
        k_aa, k_bb, k_ab = polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)
        within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
        values[s] = within - 2.0 * k_ab.sum() / (m * m)
    return float(values.mean()), float(values.std())
