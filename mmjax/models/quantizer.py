"""Vector quantization (VQ-VAE, van den Oord et al. 2017; taming VQGAN; LlamaGen's l2-normalised codes).

For an encoder output z [..., D] and a codebook e [K, D]:

    k*(z)  = argmin_k ‖z − e_k‖² = argmin_k (‖z‖² − 2 z·e_k + ‖e_k‖²)     nearest code
    z_q    = e_{k*(z)}
    out    = z + sg(z_q − z)                      straight-through: forward z_q, gradient of the identity
    codebook term   = mean((z_q − sg(z))²)        moves the codes towards the encoder outputs
    commitment term = mean((z − sg(z_q))²)        keeps the encoder close to its codes
    loss = codebook + β·commitment                (VQ-VAE paper, LlamaGen)
    loss = commitment + β·codebook                (legacy=True: taming / diffusers, whose β sits on the other term)

With l2_normalize (LlamaGen), z and every code are scaled to unit length before all of the above, so
the distance is a cosine distance and z_q lies on the sphere.

With ema_decay > 0 the codebook is not learned by gradient: the module stops the gradient into the
codebook, the loss keeps only the commitment term, and the trainer moves the codes with the pure
functions `ema_init` / `ema_update` below (VQ-VAE-2; Sonnet's VectorQuantizerEMA). Dead-code
restarts and usage statistics are pure functions too: every piece of state is passed in and out.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.config import config


@config
class QuantizerConfig:
    codebook_size: int = 1024  # K
    code_dim: int = 8  # D
    l2_normalize: bool = True  # LlamaGen: z and codes l2-normalised before the distance (cosine)
    beta: float = 0.25
    legacy: bool = False  # taming/diffusers: β weighs the codebook term instead of the commitment term
    ema_decay: float = 0.0  # > 0: codebook moved by EMA (ema_update), not by gradient
    ema_eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes
    dead_code_threshold: float = 0.0  # > 0: codes whose usage count falls below this are restarted
    usage_decay: float = 0.99  # decay of the usage counts (usage_update)

    def __post_init__(self):
        problems = []
        if self.codebook_size < 1:
            problems.append(f"codebook_size={self.codebook_size} must be >= 1")
        if self.code_dim < 1:
            problems.append(f"code_dim={self.code_dim} must be >= 1")
        if self.beta < 0:
            problems.append(f"beta={self.beta} must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay={self.ema_decay} must be in [0, 1) (0 = codebook learned by gradient)")
        if self.ema_decay > 0 and self.legacy:
            problems.append("legacy=True only describes a gradient-trained codebook; with ema_decay > 0 the loss "
                            "is β·commitment")
        if self.ema_eps <= 0:
            problems.append(f"ema_eps={self.ema_eps} must be > 0")
        if self.dead_code_threshold < 0:
            problems.append(f"dead_code_threshold={self.dead_code_threshold} must be >= 0")
        if not 0.0 <= self.usage_decay < 1.0:
            problems.append(f"usage_decay={self.usage_decay} must be in [0, 1)")
        if problems:
            raise ValueError("QuantizerConfig: " + "; ".join(problems))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(‖x‖, eps) over the last axis (torch's F.normalize)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def to_code_space(z: jax.Array, cfg: QuantizerConfig) -> jax.Array:
    """The vectors the quantizer compares with its codes: z itself, or z/‖z‖ with l2_normalize. Pass
    these (flattened to [N, D]) to `ema_update` and `restart_dead_codes`."""
    return l2_normalize(z) if cfg.l2_normalize else z


def nearest_code(z_flat: jax.Array, codebook: jax.Array) -> jax.Array:
    """argmin_k ‖z − e_k‖² for z_flat [N, D], codebook [K, D] → [N] int32.

    ‖z − e‖² = ‖z‖² − 2 z·e + ‖e‖², one [N, K] matrix product instead of an [N, K, D] difference
    (‖z‖² does not change the argmin but is kept so the value is the real distance)."""
    z32, e32 = z_flat.astype(jnp.float32), codebook.astype(jnp.float32)
    dist = (jnp.sum(z32 ** 2, axis=1, keepdims=True) - 2.0 * z32 @ e32.T + jnp.sum(e32 ** 2, axis=1)[None, :])
    return jnp.argmin(dist, axis=1).astype(jnp.int32)


def histogram(indices: jax.Array, codebook_size: int) -> jax.Array:
    """How often each code was chosen: indices [...] → counts [K] float32."""
    return jnp.bincount(indices.reshape(-1), length=codebook_size).astype(jnp.float32)


def perplexity(hist: jax.Array) -> jax.Array:
    """exp(entropy) of a code histogram [K] (counts or probabilities): K when all codes are used
    equally, 1 when one code takes everything."""
    p = hist / jnp.maximum(jnp.sum(hist), 1e-12)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.exp(entropy)


def codebook_usage(counts: jax.Array, threshold: float = 0.0) -> jax.Array:
    """Fraction of codes whose count (a batch histogram or the EMA usage counts) is above `threshold`."""
    return jnp.mean((counts > threshold).astype(jnp.float32))


class VectorQuantizer(nn.Module):
    """z [..., D] → (z_q [..., D] straight-through, aux). Param "embedding" [K, D], axes ("vocab", None).

    Init: uniform ±1/K (taming / diffusers) for plain codes; with l2_normalize, N(0, 1) rows (only
    their direction matters, and a Gaussian draws directions uniformly on the sphere).
    """

    config: QuantizerConfig
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        bound = 1.0 / c.codebook_size

        def embedding_init(key, shape, dtype):
            if c.l2_normalize:
                return jax.random.normal(key, shape, dtype)
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        self.embedding = self.param("embedding", nn.with_logical_partitioning(embedding_init, ("vocab", None)),
                                    (c.codebook_size, c.code_dim), self.param_dtype)

    def codebook(self) -> jax.Array:
        """The codes as the quantizer uses them [K, D] (l2-normalised when configured), float32."""
        e = self.embedding.astype(jnp.float32)
        return l2_normalize(e) if self.config.l2_normalize else e

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Code vectors for indices [...] → [..., D] float32 (what the decoder receives)."""
        return jnp.take(self.codebook(), indices, axis=0)

    def __call__(self, z: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """z [..., D] → z_q [..., D] (in z's dtype) and aux:

        indices [...] int32; codebook_loss, commitment_loss (unweighted means); loss (the β-weighted
        sum to add to the objective); perplexity and usage (fraction of codes used) of this batch.
        """
        c = self.config
        if z.shape[-1] != c.code_dim:
            raise ValueError(f"VectorQuantizer: z has {z.shape[-1]} channels, the codebook {c.code_dim}")
        z32 = to_code_space(z.astype(jnp.float32), c)
        codebook = self.codebook()
        if c.ema_decay > 0:
            codebook = jax.lax.stop_gradient(codebook)  # moved by ema_update, not by gradient
        flat = z32.reshape(-1, c.code_dim)
        indices = nearest_code(flat, codebook)
        z_q = jnp.take(codebook, indices, axis=0).reshape(z32.shape)
        sg = jax.lax.stop_gradient
        codebook_loss = jnp.mean(jnp.square(z_q - sg(z32)))
        commitment_loss = jnp.mean(jnp.square(z32 - sg(z_q)))
        if c.ema_decay > 0:
            loss = c.beta * commitment_loss
        elif c.legacy:
            loss = commitment_loss + c.beta * codebook_loss
        else:
            loss = codebook_loss + c.beta * commitment_loss
        z_st = z32 + sg(z_q - z32)  # straight-through estimator
        hist = histogram(indices, c.codebook_size)
        aux = dict(indices=indices.reshape(z.shape[:-1]), codebook_loss=codebook_loss,
                   commitment_loss=commitment_loss, loss=loss, perplexity=perplexity(hist),
                   usage=codebook_usage(hist))
        return z_st.astype(z.dtype), aux


# ------------------------------------------------------------------ pure functions for the trainer
def ema_init(codebook: jax.Array) -> dict[str, jax.Array]:
    """EMA state for `ema_update`: {"cluster_size": [K], "embed_sum": [K, D]}, both float32.

    Every code starts as if it had been chosen once by a vector equal to itself (cluster_size 1,
    embed_sum e_k): an unused code then keeps its value instead of being divided by ~eps."""
    codebook = codebook.astype(jnp.float32)
    return {"cluster_size": jnp.ones(codebook.shape[:1], jnp.float32), "embed_sum": codebook}


def ema_update(ema_state: dict, z_flat: jax.Array, indices: jax.Array, decay: float,
               eps: float = 1e-5) -> tuple[dict, jax.Array]:
    """One EMA step of the codebook (VQ-VAE-2 appendix; Sonnet VectorQuantizerEMA without debiasing).

    z_flat [N, D]: the vectors that were quantized (`to_code_space` of the encoder output); indices [N].
        n_k   ← decay·n_k + (1 − decay)·|{i : k*(z_i) = k}|            cluster sizes
        m_k   ← decay·m_k + (1 − decay)·Σ_{i : k*(z_i) = k} z_i         sums of assigned vectors
        ñ_k   = (n_k + eps) / (Σ_j n_j + K·eps) · Σ_j n_j               Laplace smoothing (no division by 0)
        e_k   = m_k / ñ_k
    Returns (new_state, new_codebook [K, D] float32).
    """
    size = ema_state["cluster_size"]
    k = size.shape[0]
    indices = indices.reshape(-1)
    counts = jnp.bincount(indices, length=k).astype(jnp.float32)
    sums = jax.ops.segment_sum(z_flat.astype(jnp.float32), indices, num_segments=k)
    size = decay * size + (1.0 - decay) * counts
    embed_sum = decay * ema_state["embed_sum"] + (1.0 - decay) * sums
    n = jnp.sum(size)
    smoothed = (size + eps) / (n + k * eps) * n
    codebook = embed_sum / smoothed[:, None]
    return {"cluster_size": size, "embed_sum": embed_sum}, codebook


def usage_update(counts: jax.Array, indices: jax.Array, decay: float) -> jax.Array:
    """EMA of how often each code is chosen per step: counts ← decay·counts + (1 − decay)·hist(indices).
    counts [K] float32 (start from zeros, or ones to give every code a grace period)."""
    return decay * counts + (1.0 - decay) * histogram(indices, counts.shape[0])


def restart_dead_codes(codebook: jax.Array, counts: jax.Array, recent_z_flat: jax.Array, rng: jax.Array,
                       threshold: float, *, l2_normalize_codes: bool = False
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Replaces every code whose usage count is below `threshold` by a randomly chosen recent encoder
    output (Dhariwal et al. 2020 / Zeghidour et al. 2021 "codebook restarts").

    codebook [K, D]; counts [K] (usage_update); recent_z_flat [N, D] (`to_code_space` outputs);
    l2_normalize_codes: normalise the replacements (for an l2-normalised quantizer).
    Returns (codebook, counts, n_restarted): restarted codes get the mean count of all codes, so
    they are not restarted again before they had a chance to be chosen. The dead mask is
    `counts < threshold` of the counts passed in (use it for `ema_restart`).
    """
    dead = counts < threshold
    picks = jax.random.randint(rng, (codebook.shape[0],), 0, recent_z_flat.shape[0])
    fresh = recent_z_flat[picks].astype(codebook.dtype)
    if l2_normalize_codes:
        fresh = l2_normalize(fresh)
    new_codebook = jnp.where(dead[:, None], fresh, codebook)
    new_counts = jnp.where(dead, jnp.mean(counts), counts)
    return new_codebook, new_counts, jnp.sum(dead).astype(jnp.int32)


def ema_restart(ema_state: dict, codebook: jax.Array, restarted: jax.Array) -> dict:
    """After `restart_dead_codes` with an EMA codebook: the restarted codes' EMA state starts again
    from their new value (cluster_size 1, embed_sum e_k), as in `ema_init`."""
    return {"cluster_size": jnp.where(restarted, 1.0, ema_state["cluster_size"]),
            "embed_sum": jnp.where(restarted[:, None], codebook.astype(jnp.float32), ema_state["embed_sum"])}
