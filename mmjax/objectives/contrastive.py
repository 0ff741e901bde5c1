"""Contrastive image–text losses: CLIP's symmetric softmax and SigLIP's pairwise sigmoid.

All functions take *normalised* embeddings zi [B, E] (images) and zt [B, E] (texts) whose pairs sit
on the diagonal (image i goes with text i), a temperature t (a scalar, already exp'd and clamped:
see `CLIP.temperature_and_bias`) and, for SigLIP, a bias b. They compute in float32 whatever the
embeddings' dtype and return `(loss, metrics)`.

Global batch. `clip_loss` and `siglip_loss` are written over the whole batch. Called under
`jax.jit` with zi / zt sharded over (data, fsdp) on the batch dim, GSPMD inserts the collectives
(it gathers the texts, or the images, to form the [B, B] logits) and the loss is the loss of the
*global* batch, every negative from every device included; nothing to do by hand. The price is that
the B×B similarity matrix exists (sharded over the rows at best). `siglip_loss_chunked` avoids it
with a ring over the devices: O(b²) per device for the logits, with b = B / n the local batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P


def _check_pair(zi: jax.Array, zt: jax.Array) -> None:
    if zi.ndim != 2 or zi.shape != zt.shape:
        raise ValueError(f"zi and zt must both be [B, E] with equal shapes, got {zi.shape} and {zt.shape}")


def _check_negatives(zt: jax.Array, zt_neg: jax.Array | None, neg_valid: jax.Array | None) -> None:
    if zt_neg is None:
        if neg_valid is not None:
            raise ValueError("neg_valid was given without zt_neg")
        return
    b, e = zt.shape
    if zt_neg.shape != (b, e) and (zt_neg.ndim != 3 or zt_neg.shape[0] != b or zt_neg.shape[2] != e):
        raise ValueError(f"zt_neg must be [B, E] (one negative per text) or [B, K, E] (K per text) with "
                         f"[B, E] = {zt.shape} as zt, got {zt_neg.shape}")
    if neg_valid is not None and neg_valid.shape != zt_neg.shape[:-1]:
        raise ValueError(f"neg_valid must be {list(zt_neg.shape[:-1])} (zt_neg's [B] or [B, K]), got "
                         f"{list(neg_valid.shape)}")


def _negatives(zt_neg, neg_valid):
    """zt_neg [B, E] or [B, K, E] → [B, K, E] float32, and neg_valid → [B, K] float32 (1 when None)."""
    zn = zt_neg.astype(jnp.float32)
    if zn.ndim == 2:
        zn = zn[:, None]
        neg_valid = None if neg_valid is None else neg_valid[:, None]
    valid = jnp.ones(zn.shape[:2], jnp.float32) if neg_valid is None else neg_valid.astype(jnp.float32)
    return zn, valid


def _negative_logits(zi, zn, t, b=0.0):
    """[B, B·K] logits of every image (rows) against every negative text (columns; text j's k-th
    negative at column j·K + k)."""
    return t * zi @ zn.reshape(-1, zn.shape[-1]).T + b


def _neg_metrics(logits, neg_logits, valid):
    """Fraction of images (with a negative) that score their own text above all their own negatives."""
    n, k = valid.shape
    own = neg_logits.reshape(n, n, k)[jnp.arange(n), jnp.arange(n)]                 # [B, K]
    beats = jnp.all((jnp.diagonal(logits)[:, None] > own) | (valid == 0), axis=1).astype(jnp.float32)
    has = jnp.any(valid > 0, axis=1).astype(jnp.float32)
    return {"neg_accuracy": jnp.sum(beats * has) / jnp.maximum(jnp.sum(has), 1.0)}


def clip_loss(zi: jax.Array, zt: jax.Array, t: jax.Array, zt_neg: jax.Array | None = None,
              neg_valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CLIP's symmetric cross-entropy (InfoNCE in both directions) over the batch.

        s_ij = t · ⟨zi_i, zt_j⟩                                  (= f_I(x_i)·f_T(y_j) / τ, t = 1/τ)
        L_i→t = −1/B Σ_i log( exp(s_ii) / Σ_j exp(s_ij) )        rows: each image picks its text
        L_t→i = −1/B Σ_j log( exp(s_jj) / Σ_i exp(s_ij) )        columns: each text picks its image
        L = (L_i→t + L_t→i) / 2

    Hard negatives (NegCLIP, Yuksekgonul et al. 2023): zt_neg [B, E] holds one negative text per
    pair (e.g. its caption with a word replaced), or [B, K, E] K of them. They join every image's
    row as B·K more columns, n_ik = t · ⟨zi_i, zt_neg_k⟩ (over the whole batch, as NegCLIP's extra
    texts do), so L_i→t = −1/B Σ_i log( exp(s_ii) / (Σ_j exp(s_ij) + Σ_k exp(n_ik)) ); they have
    no image, so L_t→i is unchanged. neg_valid [B] or [B, K] (0/1): negatives with 0 are left out
    (no word to replace).

    Args: zi, zt [B, E] normalised; t a scalar; zt_neg [B, E] or [B, K, E] normalised, neg_valid
    [B] or [B, K], both optional. Returns (loss, metrics) with metrics "i2t_accuracy" /
    "t2i_accuracy": the fraction of rows / columns whose argmax is the diagonal (the rows over all
    their columns), and with negatives "neg_accuracy": the fraction of images whose own text beats
    all their own negatives.
    """
    _check_pair(zi, zt)
    _check_negatives(zt, zt_neg, neg_valid)
    zi, zt, t = zi.astype(jnp.float32), zt.astype(jnp.float32), jnp.asarray(t, jnp.float32)
    logits = t * zi @ zt.T  # [B, B], s_ij
    positives = jnp.diagonal(logits)  # [B], s_ii
    rows = logits
    if zt_neg is not None:
        zn, valid = _negatives(zt_neg, neg_valid)
        neg = jnp.where(valid.reshape(1, -1) > 0, _negative_logits(zi, zn, t), -jnp.inf)
        rows = jnp.concatenate([logits, neg], axis=1)  # [B, B + B·K]
    loss_i2t = jnp.mean(jax.nn.logsumexp(rows, axis=1) - positives)
    loss_t2i = jnp.mean(jax.nn.logsumexp(logits, axis=0) - positives)
    loss = 0.5 * (loss_i2t + loss_t2i)
    target = jnp.arange(logits.shape[0])
    metrics = {
        "loss_i2t": loss_i2t,
        "loss_t2i": loss_t2i,
        "i2t_accuracy": jnp.mean((jnp.argmax(rows, axis=1) == target).astype(jnp.float32)),
        "t2i_accuracy": jnp.mean((jnp.argmax(logits, axis=0) == target).astype(jnp.float32)),
    }
    if zt_neg is not None:
        metrics.update(_neg_metrics(logits, neg, valid))
    return loss, metrics


def _sigmoid_block_sum(zi: jax.Array, zt: jax.Array, t: jax.Array, b: jax.Array,
                       positives_on_diagonal: bool) -> jax.Array:
    """−Σ_ij log σ(z_ij (t·⟨zi_i, zt_j⟩ + b)) over one block; z = +1 on the diagonal if it holds
    the pairs, −1 everywhere else."""
    logits = t * zi @ zt.T + b  # [b_rows, b_cols]
    if positives_on_diagonal:
        labels = 2.0 * jnp.eye(logits.shape[0], logits.shape[1], dtype=jnp.float32) - 1.0
    else:
        labels = -jnp.ones_like(logits)
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


def siglip_loss(zi: jax.Array, zt: jax.Array, t: jax.Array, b: jax.Array, zt_neg: jax.Array | None = None,
                neg_valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SigLIP's sigmoid loss (big_vision): every pair is an independent binary classification.

        s_ij = ⟨zi_i, zt_j⟩,  z_ij = +1 if i = j else −1
        L = −1/B Σ_ij log σ( z_ij (t·s_ij + b) )

    Note the normalisation by B (not B²): the sum runs over all B² pairs. Hard negatives
    (zt_neg [B, E] or [B, K, E], neg_valid [B] or [B, K] as in `clip_loss`) add B·K more negative
    pairs per image: −1/B Σ_ik valid_k log σ(−(t·⟨zi_i, zt_neg_k⟩ + b)). Args: zi, zt [B, E] normalised; t, b
    scalars. Returns (loss, metrics) with the top-1 accuracies as for CLIP (over the positives'
    texts) and "neg_accuracy" with negatives.
    """
    _check_pair(zi, zt)
    _check_negatives(zt, zt_neg, neg_valid)
    zi, zt = zi.astype(jnp.float32), zt.astype(jnp.float32)
    t, b = jnp.asarray(t, jnp.float32), jnp.asarray(b, jnp.float32)
    logits = t * zi @ zt.T + b  # [B, B]
    labels = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0  # z_ij
    total = -jnp.sum(jax.nn.log_sigmoid(labels * logits))
    if zt_neg is not None:
        zn, valid = _negatives(zt_neg, neg_valid)
        neg = _negative_logits(zi, zn, t, b)
        total = total + jnp.sum(-jax.nn.log_sigmoid(-neg) * valid.reshape(1, -1))
    loss = total / logits.shape[0]
    target = jnp.arange(logits.shape[0])
    metrics = {
        "i2t_accuracy": jnp.mean((jnp.argmax(logits, axis=1) == target).astype(jnp.float32)),
        "t2i_accuracy": jnp.mean((jnp.argmax(logits, axis=0) == target).astype(jnp.float32)),
    }
    if zt_neg is not None:
        metrics.update(_neg_metrics(logits, neg, valid))
    return loss, metrics


def siglip_loss_chunked(zi: jax.Array, zt: jax.Array, t: jax.Array, b: jax.Array, *,
                        mesh: Mesh | None = None, axes: Sequence[str] = ("data", "fsdp")) -> jax.Array:
    """`siglip_loss` computed with a ring over the devices of `axes`, never forming the B×B matrix.

    The batch is split into n = Π |axes| chunks of b = B / n rows (the (data, fsdp) batch sharding).
    Device k keeps its images zi_k [b, E] and starts with its own texts zt_k:

        step 0:        loss_k  = −Σ log σ(z ⊙ (t·zi_k zt_kᵀ + b))   z = +1 on the diagonal, −1 off it
        step 1..n−1:   zt ← ppermute(zt) (each device passes its text chunk to the next on the ring)
                       loss_k += −Σ log σ(−(t·zi_k ztᵀ + b))        all negatives: other devices' texts
        L = psum_k(loss_k) / B

    After n − 1 shifts every device has seen every text chunk exactly once. Memory per device:
    one b×b block of logits at a time, O(b²) instead of the O(B²) (or O(B²/n) sharded) of the
    GSPMD version. Each step is rematerialised (`jax.checkpoint`), so the backward pass keeps only
    the text chunks the ring carried (O(B·E) per device, what an all-gather of the texts costs) and
    recomputes the blocks one at a time. Autodiff needs no custom rule: the transpose of a ppermute
    is the reverse ppermute, so the texts' gradients flow back around the ring to their owners.

    Args: zi, zt [B, E] normalised (ideally already sharded as `batch_sharding(mesh, 2)`); t, b
    scalars; mesh: the (data, fsdp, tensor) mesh (default: the one set with `jax.set_mesh`); axes:
    the mesh axes the batch is split over (the ring). Works eagerly and under `jax.jit`.
    Returns the scalar loss, equal to `siglip_loss(zi, zt, t, b)[0]`.
    """
    _check_pair(zi, zt)
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty:
            raise ValueError("siglip_loss_chunked needs a mesh: pass mesh= or call it under jax.set_mesh")
    axes = tuple(axes)
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"ring axes {missing} are not axes of the mesh {tuple(mesh.axis_names)}")
    n = int(np.prod([mesh.shape[a] for a in axes]))
    global_batch = zi.shape[0]
    if global_batch % n:
        raise ValueError(f"siglip_loss_chunked: global batch {global_batch} is not divisible by the "
                         f"ring size {n} (mesh axes {axes} of sizes {[mesh.shape[a] for a in axes]})")
    # Device j sends to j + 1 (linear index over `axes`, first axis major, as in P(axes)).
    ring = [(j, (j + 1) % n) for j in range(n)]

    def local(zi_k, zt_k, t, b):  # zi_k, zt_k: [b, E], this device's chunk
        zi_k, zt_k = zi_k.astype(jnp.float32), zt_k.astype(jnp.float32)
        t, b = t.astype(jnp.float32), b.astype(jnp.float32)
        # Positives: the only block with pairs is the one of this device's own texts.
        loss_k = _sigmoid_block_sum(zi_k, zt_k, t, b, positives_on_diagonal=True)

        @jax.checkpoint
        def step(carry, _):
            loss_k, zt_other = carry
            zt_other = jax.lax.ppermute(zt_other, axes, ring)
            loss_k = loss_k + _sigmoid_block_sum(zi_k, zt_other, t, b, positives_on_diagonal=False)
            return (loss_k, zt_other), None

        if n > 1:
            (loss_k, _), _ = jax.lax.scan(step, (loss_k, zt_k), None, length=n - 1)
        return jax.lax.psum(loss_k, axes)

    batch_spec = P(axes, None)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(batch_spec, batch_spec, P(), P()), out_specs=P())
    total = fn(zi, zt, jnp.asarray(t, jnp.float32), jnp.asarray(b, jnp.float32))
    return total / global_batch
