"""Image tokenizers on the one training loop: VAE, VQ-VAE and VQ-GAN.

Batches: {"image": [B, H, W, C] float32 in [-1, 1]} (data.value_range = "symmetric").

The generator (the autoencoder) minimises

    L_G = L_rec + w_p · LPIPS(x, x̂) + R + λ · L_adv
          L_rec = mean |x − x̂| (or squared)
          R     = VQ:  ‖sg(z) − z_q‖² + β‖z − sg(z_q)‖²      (the quantizer's terms)
                  KL:  β_KL · KL(q(z|x) ‖ N(0, I)) / (H·W·C)  (the ELBO's KL, per pixel dimension)
          L_adv = −mean D(x̂)                                 (hinge generator loss)
          λ     = gan_weight · start(step) · ‖∇_w L_rec‖ / (‖∇_w L_adv‖ + 1e-4)   (w: decoder.conv_out)

and, from `gan_start_step` on, the discriminator minimises the hinge loss
½(mean relu(1 − D(x)) + mean relu(1 + D(sg(x̂)))). Both players live in one param tree
{"generator", "discriminator"} with one optimizer each (one `optax.multi_transform`), and one
pure step updates both on the same batch.

The step takes one forward of the generator with `jax.vjp` and asks the losses for their
gradients with respect to the reconstruction x̂; λ needs ‖∇_w L‖ for the decoder's last kernel w
only, which is the vjp of the last conv (x̂ = conv_out(h)) at the same cotangents. So the adaptive
weight costs two small vjps instead of two more backward passes through the whole generator.

An EMA codebook (quantizer.ema_decay > 0) is not trained by gradient: its grad is zeroed and, after
the optimizer, it is replaced by the EMA of the encoder outputs assigned to each code; its state,
and the usage counts that drive dead-code restarts, are `TrainState.extra` (passed in and out).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.config import ConfigError, config
from mmjax.evals import images as image_metrics
from mmjax.models import quantizer as vq
from mmjax.models.autoencoder import Autoencoder, AutoencoderConfig, forward_flops
from mmjax.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from mmjax.models.discriminator import forward_flops as disc_forward_flops
from mmjax.objectives import gan
from mmjax.tasks.base import Task
from mmjax.train.optim import OptimConfig, make_optimizer


@config
class AutoencoderLossConfig:
    reconstruction: Literal["l1", "l2"] = "l1"
    perceptual_weight: float = 0.0  # LPIPS weight; 0 builds no perceptual net
    perceptual_net: Literal["alexnet", "vgg16"] = "alexnet"
    kl_weight: float = 1.0  # β of the VAE's KL per pixel dimension (1: the ELBO up to the likelihood's scale)
    gan_weight: float = 0.0  # 0: no discriminator (VAE, VQ-VAE)
    gan_loss: Literal["hinge", "vanilla"] = "hinge"
    gan_start_step: int = 0
    adaptive_weight: bool = True  # taming's λ; False: λ = gan_weight
    adaptive_weight_max: float = 1e4
    discriminator: DiscriminatorConfig = DiscriminatorConfig()
    # The discriminator's optimizer (taming: Adam, betas (0.5, 0.9), the generator's lr).
    disc_optim: OptimConfig = OptimConfig(b1=0.5, b2=0.9, schedule="constant", grad_clip_norm=None,
                                         peak_lr=1e-4)
    # Evaluation: the probe classifier's attribute accuracy and FD-probe / KID (datasets with a probe:
    # shapes), LPIPS-AlexNet of the reconstructions, grids of this many inputs beside reconstructions.
    probe: bool = True
    eval_lpips: bool = True
    grid_images: int = 16


def _split_params(params):
    return params["generator"], params.get("discriminator")


class AutoencoderTask(Task):
    model_config_cls = AutoencoderConfig
    loss_config_cls = AutoencoderLossConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        m, loss = cfg.model, cfg.loss
        if cfg.data.value_range != "symmetric":
            raise ConfigError(f"the autoencoder task works on images in [-1, 1]: set data.value_range='symmetric' "
                              f"(got {cfg.data.value_range!r})")
        if cfg.data.image_size is None:
            raise ConfigError("the autoencoder task needs data.image_size (the model's input size)")
        if loss.gan_weight < 0 or loss.perceptual_weight < 0 or loss.kl_weight < 0:
            raise ConfigError("loss weights must be >= 0")
        self.model = Autoencoder(m)
        self.use_gan = loss.gan_weight > 0
        self.discriminator = PatchDiscriminator(loss.discriminator) if self.use_gan else None
        self.lpips = None
        if loss.perceptual_weight > 0:
            from mmjax.models.lpips import load_lpips
            self.lpips = load_lpips(loss.perceptual_net)
        self.image_size = cfg.data.image_size
        self._probe = None

    # --- shapes -------------------------------------------------------------------------------------
    def example_batch(self, batch_size):
        s, c = self.image_size, self.cfg.model.in_channels
        return {"image": jax.ShapeDtypeStruct((batch_size, s, s, c), jnp.float32)}

    def init_params(self, rng):
        g_rng, d_rng = jax.random.split(rng)
        x = jnp.zeros(self.example_batch(1)["image"].shape, jnp.float32)
        params = {"generator": self.model.init(g_rng, x)["params"]}
        if self.use_gan:
            params["discriminator"] = self.discriminator.init(d_rng, x)["params"]
        return params

    def init_extra(self, params):
        q = self.cfg.model.quantizer
        if self.cfg.model.kind != "vq":
            return {}
        codebook = params["generator"]["quantizer"]["embedding"]
        extra = {"usage": jnp.zeros(codebook.shape[0], jnp.float32)}
        if q.ema_decay > 0:
            extra["ema"] = vq.ema_init(codebook)
        return extra

    def make_optimizer(self, total_steps, params_example):
        tx_g, schedule = make_optimizer(self.cfg.optim, total_steps, params_example["generator"])
        if not self.use_gan:
            return optax.multi_transform({"generator": tx_g}, lambda p: {k: k for k in p}), schedule
        tx_d, _ = make_optimizer(self.cfg.loss.disc_optim, total_steps, params_example["discriminator"])
        labels = lambda p: {k: jax.tree.map(lambda _, k=k: k, v) for k, v in p.items()}
        return optax.multi_transform({"generator": tx_g, "discriminator": tx_d}, labels), schedule

    # --- losses --------------------------------------------------------------------------------------
    def _reconstruction_loss(self, x, recon):
        """Per-pixel reconstruction + w_p · LPIPS, a mean over the batch."""
        err = recon - x
        rec = jnp.mean(jnp.abs(err)) if self.cfg.loss.reconstruction == "l1" else jnp.mean(jnp.square(err))
        parts = {"rec_loss": rec}
        if self.lpips is not None:
            from mmjax.models.lpips import lpips_distance
            p = jnp.mean(lpips_distance(self.lpips, recon, x))
            parts["perceptual_loss"] = p
            rec = rec + self.cfg.loss.perceptual_weight * p
        return rec, parts

    def _regulariser(self, aux):
        """The quantizer's terms (VQ) or β_KL · KL per pixel dimension (KL), and their metrics."""
        if self.cfg.model.kind == "vq":
            return aux["quant_loss"], {"codebook_loss": aux["codebook_loss"],
                                       "commitment_loss": aux["commitment_loss"], "perplexity": aux["perplexity"]}
        dims = self.image_size * self.image_size * self.cfg.model.in_channels
        kl = jnp.mean(aux["kl"])
        return self.cfg.loss.kl_weight * kl / dims, {"kl": kl}

    def loss_fn(self, params, extra, batch, rng):
        """The generator's loss without the adversarial term (VAE / VQ-VAE); the train step below is
        what the loop runs, this is for callers that want the plain objective."""
        x = batch["image"]
        recon, aux = self.model.apply({"params": params["generator"]}, x, sample_rng=rng)
        rec, parts = self._reconstruction_loss(x, recon)
        reg, reg_parts = self._regulariser(aux)
        return rec + reg, ({**parts, **reg_parts}, extra)

    def make_train_step(self, tx, schedule):
        model, disc, loss_cfg = self.model, self.discriminator, self.cfg.loss
        qcfg = self.cfg.model.quantizer
        is_vq = self.cfg.model.kind == "vq"
        use_ema = is_vq and qcfg.ema_decay > 0
        d_loss_fn = gan.hinge_d_loss if loss_cfg.gan_loss == "hinge" else gan.vanilla_d_loss

        def step(state, batch):
            rng = jax.random.fold_in(state.rng, state.step)
            sample_rng, restart_rng = jax.random.split(rng)
            x = batch["image"]
            gp, dp = _split_params(state.params)

            # One generator forward; the losses' gradients w.r.t. x̂ come back as cotangents.
            def generator(gp):
                recon, aux = model.apply({"params": gp}, x, sample_rng=sample_rng)
                reg, reg_parts = self._regulariser(aux)
                return (recon, reg), (aux, reg_parts)

            (recon, reg), gen_vjp, (aux, reg_parts) = jax.vjp(generator, gp, has_aux=True)
            (rec, rec_parts), g_rec = jax.value_and_grad(self._reconstruction_loss, argnums=1, has_aux=True)(x, recon)
            metrics = dict(rec_parts, **reg_parts)
            cotangent = g_rec
            loss = rec + reg
            if self.use_gan:
                start = gan.gan_start_factor(state.step, loss_cfg.gan_start_step)
                dp_frozen = jax.lax.stop_gradient(dp)
                g_adv, g_gan = jax.value_and_grad(
                    lambda r: gan.generator_loss(disc.apply({"params": dp_frozen}, r),
                                                 kind="hinge" if loss_cfg.gan_loss == "hinge" else "non_saturating")
                )(recon)
                if loss_cfg.adaptive_weight:
                    # ∇_w L for the last kernel w: the vjp of x̂ = conv_out(h) with respect to w.
                    h = jax.lax.stop_gradient(aux["decoder_features"])
                    w = gp["decoder"]["conv_out"]["kernel"]

                    def last_layer(w):
                        dec = dict(gp["decoder"], conv_out=dict(gp["decoder"]["conv_out"], kernel=w))
                        return model.apply({"params": dict(gp, decoder=dec)}, h, method="pixels_from_features")

                    _, w_vjp = jax.vjp(last_layer, w)
                    lam = gan.adaptive_weight(w_vjp(g_rec)[0], w_vjp(g_gan)[0],
                                              max_weight=loss_cfg.adaptive_weight_max)
                else:
                    lam = jnp.ones((), jnp.float32)
                d_weight = loss_cfg.gan_weight * lam * start
                cotangent = g_rec + d_weight * g_gan
                loss = loss + d_weight * g_adv

                def disc_loss(dp):
                    logits_real = disc.apply({"params": dp}, x)
                    logits_fake = disc.apply({"params": dp}, jax.lax.stop_gradient(recon))
                    return start * d_loss_fn(logits_real, logits_fake), (logits_real, logits_fake)

                (d_loss, (lr_, lf_)), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(dp)
                metrics.update(g_loss=g_adv, d_loss=d_loss, d_weight=d_weight, adaptive_weight=lam,
                               logits_real=jnp.mean(lr_), logits_fake=jnp.mean(lf_))
            (g_grads,) = gen_vjp((cotangent, jnp.ones_like(reg)))
            if use_ema:
                q = dict(g_grads["quantizer"], embedding=jnp.zeros_like(g_grads["quantizer"]["embedding"]))
                g_grads = dict(g_grads, quantizer=q)
            grads = {"generator": g_grads}
            if self.use_gan:
                grads["discriminator"] = d_grads
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)

            extra = dict(state.extra)
            if is_vq:
                z_flat = aux["z"].reshape(-1, aux["z"].shape[-1])
                idx = aux["indices"].reshape(-1)
                gen = params["generator"]
                codebook = gen["quantizer"]["embedding"]
                if use_ema:
                    extra["ema"], codebook = vq.ema_update(state.extra["ema"], z_flat, idx, qcfg.ema_decay,
                                                           qcfg.ema_eps)
                usage = vq.usage_update(state.extra["usage"], idx, qcfg.usage_decay)
                if qcfg.dead_code_threshold > 0:
                    codebook, usage, restarted = vq.restart_dead_codes(
                        codebook, usage, jax.lax.stop_gradient(z_flat), restart_rng, qcfg.dead_code_threshold,
                        l2_normalize_codes=qcfg.l2_normalize)
                    metrics["restarted_codes"] = restarted
                extra["usage"] = usage
                metrics["usage_recent"] = jnp.mean((usage > 1e-3).astype(jnp.float32))
                params = dict(params, generator=dict(gen, quantizer=dict(gen["quantizer"], embedding=codebook)))

            metrics.update(loss=loss, grad_norm=optax.tree.norm(g_grads))
            if schedule is not None:
                metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
            return state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra), metrics

        return step

    # --- evaluation ----------------------------------------------------------------------------------
    def eval_fn(self, params, extra, batch):
        x = batch["image"]
        mask = batch["mask"].astype(jnp.float32)
        recon, aux = self.model.apply({"params": params["generator"]}, x)
        per_pixel = jnp.abs(recon - x) if self.cfg.loss.reconstruction == "l1" else jnp.square(recon - x)
        rec = jnp.mean(per_pixel, axis=(1, 2, 3))
        psnr = image_metrics.psnr(jnp.clip(recon, -1.0, 1.0), x, data_range=2.0)  # [-1, 1]
        out = {"rec_loss": jnp.sum(rec * mask), "psnr": jnp.sum(jnp.where(mask > 0, psnr, 0.0)), "count": jnp.sum(mask)}
        if self.cfg.model.kind == "kl":
            out["kl"] = jnp.sum(aux["kl"] * mask)
        else:
            k = self.cfg.model.quantizer.codebook_size
            onehot = jax.nn.one_hot(aux["indices"].reshape(x.shape[0], -1), k, dtype=jnp.float32)
            out["code_histogram"] = jnp.einsum("bnk,b->k", onehot, mask)
        return out, jnp.clip(recon, -1.0, 1.0)

    def probe(self):
        if self._probe is None and self.cfg.loss.probe and self.cfg.data.name == "shapes":
            from mmjax.evals.probe import load_or_train_probe
            self._probe = load_or_train_probe(self.cfg.data)
        return self._probe

    def evaluate(self, params, extra, mesh):
        """One pass over the eval split: reconstruction error, PSNR, LPIPS-AlexNet, codebook usage and
        perplexity over all codes chosen (VQ) or the KL (VAE); with a probe (shapes), its attribute
        accuracy on the reconstructions beside its accuracy on the inputs, and the Fréchet distance and
        KID between the probe's features of reconstructions and inputs ("fd_probe", "kid_probe")."""
        from mmjax import sharding as shd
        from mmjax.data import pipeline
        from mmjax.evals.images import frechet_distance, kid

        if not hasattr(self, "_eval_step"):
            self._eval_step = jax.jit(self.eval_fn)
        lpips_model = None
        if self.cfg.loss.eval_lpips:
            from mmjax.models.lpips import load_lpips, lpips_distance
            lpips_model = load_lpips("alexnet")
            if not hasattr(self, "_lpips_step"):
                self._lpips_step = jax.jit(lambda a, b: lpips_distance(lpips_model, a, b))
        probe = self.probe()
        sums: dict[str, np.ndarray | float] = {}
        real_imgs, recon_imgs, labels = [], [], []
        lp_sum = 0.0
        for local in pipeline.eval_batches(self.cfg.data, split=self.cfg.data.eval_split,
                                           global_batch_size=self.cfg.train.eval_batch_size):
            batch = shd.make_global_batch({k: local[k] for k in ("image", "mask")}, mesh)
            out, recon = self._eval_step(params, extra, batch)
            out = jax.device_get(out)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64)
            keep = np.asarray(local["mask"], bool)
            recon = np.asarray(jax.device_get(recon))[keep]
            real = np.asarray(local["image"])[keep]
            if lpips_model is not None and len(real):
                lp_sum += float(np.sum(jax.device_get(self._lpips_step(jnp.asarray(recon), jnp.asarray(real)))))
            if probe is not None:
                real_imgs.append(real)
                recon_imgs.append(recon)
                labels.append({k: np.asarray(local[k])[keep] for k in probe.label_fields})
        n = max(float(sums["count"]), 1.0)
        results = {"rec_loss": float(sums["rec_loss"]) / n, "psnr": float(sums["psnr"]) / n, "count": int(n)}
        if lpips_model is not None:
            results["lpips_alexnet"] = lp_sum / n
        if "kl" in sums:
            results["kl"] = float(sums["kl"]) / n
        if "code_histogram" in sums:
            hist = np.asarray(sums["code_histogram"])
            results["codebook_usage"] = float(vq.codebook_usage(hist))
            results["codebook_perplexity"] = float(vq.perplexity(hist))
        if probe is not None:
            real_all, recon_all = np.concatenate(real_imgs), np.concatenate(recon_imgs)
            lab = {k: np.concatenate([b[k] for b in labels]) for k in labels[0]}
            acc_real = probe.attribute_accuracy(real_all, lab)
            acc_recon = probe.attribute_accuracy(recon_all, lab)
            for k, v in acc_recon.items():
                results[f"probe_{k}"] = float(v)
                results[f"probe_{k}_real"] = float(acc_real[k])
            results["probe_ratio"] = float(np.mean([acc_recon[k] / max(acc_real[k], 1e-9) for k in acc_real]))
            f_real, f_recon = probe.features(real_all), probe.features(recon_all)
            results["fd_probe"] = float(frechet_distance(f_recon, f_real))
            results["kid_probe"] = float(kid(f_recon, f_real)[0])
        return results

    def save_eval_artifacts(self, params, extra, mesh, directory, step):
        """Writes images/recon_<step>.png (inputs beside reconstructions, pairs in columns) and, for a
        VAE, images/prior_<step>.png (samples decoded from z ~ N(0, I))."""
        from mmjax.data import pipeline
        from mmjax.data.grid import save_image_grid
        n = self.cfg.loss.grid_images
        if n <= 0:
            return
        batch = next(iter(pipeline.eval_batches(self.cfg.data, split=self.cfg.data.eval_split,
                                                global_batch_size=n)))
        x = jnp.asarray(batch["image"])
        recon, _ = jax.jit(self.model.apply)({"params": params["generator"]}, x)
        pairs = np.stack([np.asarray(x), np.clip(np.asarray(recon), -1, 1)], axis=1).reshape(-1, *x.shape[1:])
        out = Path(directory) / "images"
        save_image_grid(pairs, out / f"recon_{step:06d}.png", ncols=8, value_range=(-1, 1))
        if self.cfg.model.kind == "kl":
            samples = jax.jit(functools.partial(self.model.apply, method="sample_prior"), static_argnums=2)(
                {"params": params["generator"]}, jax.random.PRNGKey(step), n)
            save_image_grid(np.clip(np.asarray(samples), -1, 1), out / f"prior_{step:06d}.png", ncols=8,
                            value_range=(-1, 1))

    def train_flops_per_example(self):
        """3 × forward of the autoencoder (+ the discriminator on real and fake, when trained);
        LPIPS's AlexNet is not counted."""
        f = forward_flops(self.cfg.model, self.image_size)
        if self.use_gan:
            f += 2 * disc_forward_flops(self.cfg.loss.discriminator, self.image_size)
        return 3.0 * f


__all__ = ["AutoencoderLossConfig", "AutoencoderTask"]
