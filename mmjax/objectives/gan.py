"""GAN losses for a VQ-GAN (taming-transformers' VQLPIPSWithDiscriminator), as pure functions.

D's logits are the PatchGAN's [B, h, w, 1] patch logits (any shape works: every loss is a mean
over all its entries); all computation is in float32 whatever their dtype.

    discriminator   L_D = hinge_d_loss(D(x), D(x̂))  or  vanilla_d_loss(D(x), D(x̂))
    generator       L_G = generator_loss(D(x̂))      (−mean D(x̂) in taming)
    total (G side)  L = L_rec + λ · f(step) · L_G,   λ = disc_weight · adaptive_weight(∇_w L_rec, ∇_w L_G)

with w the decoder's last-layer kernel and f(step) = gan_start_factor(step, start): the GAN terms
are off until the start step. Which loss, the disc weight and the start step belong to the task's
loss config; these functions only compute.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

GeneratorLossKind = Literal["hinge", "non_saturating"]


def _f32(x: Any) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """L_D = ½ (mean(relu(1 − D(x))) + mean(relu(1 + D(x̂)))): real pushed above +1, fake below −1."""
    loss_real = jnp.mean(jax.nn.relu(1.0 - _f32(logits_real)))
    loss_fake = jnp.mean(jax.nn.relu(1.0 + _f32(logits_fake)))
    return 0.5 * (loss_real + loss_fake)


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """L_D = ½ (mean(softplus(−D(x))) + mean(softplus(D(x̂)))): the binary cross-entropy with
    labels real = 1, fake = 0 on σ(D), since −log σ(l) = softplus(−l) and −log(1 − σ(l)) = softplus(l)."""
    loss_real = jnp.mean(jax.nn.softplus(-_f32(logits_real)))
    loss_fake = jnp.mean(jax.nn.softplus(_f32(logits_fake)))
    return 0.5 * (loss_real + loss_fake)


def generator_loss(logits_fake: jax.Array, kind: GeneratorLossKind = "hinge") -> jax.Array:
    """The generator's adversarial loss on D(x̂):

        hinge            L_G = −mean(D(x̂))                      (taming, whatever its L_D)
        non_saturating   L_G = mean(softplus(−D(x̂))) = −mean(log σ(D(x̂)))
    """
    logits_fake = _f32(logits_fake)
    if kind == "hinge":
        return -jnp.mean(logits_fake)
    if kind == "non_saturating":
        return jnp.mean(jax.nn.softplus(-logits_fake))
    raise ValueError(f"unknown generator loss kind {kind!r}; expected 'hinge' or 'non_saturating'")


def _global_norm(tree: Any) -> jax.Array:
    """‖g‖₂ over every entry of an array (or of all the arrays of a pytree)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(_f32(g))) for g in jax.tree.leaves(tree)))


def adaptive_weight(grad_rec: Any, grad_gan: Any, *, max_weight: float = 1e4, eps: float = 1e-4) -> jax.Array:
    """taming's calculate_adaptive_weight, which balances the GAN term against reconstruction:

        w_adapt = clip( ‖∇_w L_rec‖ / (‖∇_w L_G‖ + eps), 0, max_weight ),   stop-gradient

    grad_rec, grad_gan: the gradients of L_rec and L_G w.r.t. the decoder's last-layer kernel w
    (arrays of w's shape; pytrees are taken as one vector). The norms are Frobenius norms, as
    torch.norm of a tensor. The result is a constant for the outer gradient (taming's `.detach()`):
    L_G is scaled by it, never optimised through it. The caller multiplies by the disc weight.
    """
    ratio = _global_norm(grad_rec) / (_global_norm(grad_gan) + eps)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight))


def gan_start_factor(step: jax.Array | int, start_step: jax.Array | int) -> jax.Array:
    """taming's adopt_weight: f(step) = 0 while step < start_step, 1 from start_step on (float32).

    Works with a traced step under `jax.jit` (a select, no Python branch)."""
    return jnp.where(jnp.asarray(step) >= jnp.asarray(start_step), 1.0, 0.0).astype(jnp.float32)
