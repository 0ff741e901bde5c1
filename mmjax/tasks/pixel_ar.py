"""Pixel-level autoregressive image modelling (iGPT, Chen et al. 2020): the generative baseline.

Each image is quantised to a k-colour palette (`mmjax.data.palette`, fitted once on training
pixels) and read in raster order; the decoder LM models the sequence of palette ids:

    ids      s = [BOS, id(x_0), id(x_1), ..., id(x_{HW−1})]   BOS = k (its own token)   [B, HW + 1]
    inputs   s[:, :-1], targets s[:, 1:]                   every pixel is a target
    loss     −(1 / HW) Σ_i log p(id(x_i) | id(x_<i))       nats per pixel (+ z-loss)
    bits/dim = loss / (3 ln 2)                              per sub-pixel, iGPT's and PixelCNN's unit

Bits/dim here is that of the palette image: with a lossless palette (the flat-coloured `shapes`
scenes) it is that of the data; otherwise `palette_mse` in the results says how far the palette is
from the pixels. Quantisation runs on device inside the loss, so batches are plain images in [0, 1]
(`data.value_range="unit"`).

Evaluation: test NLL → bits/dim and pixel accuracy (exact: padded eval batches are masked), and
`loss.samples` images drawn from BOS with the on-device decode loop (`mmjax.decode.generate`,
constrained to palette ids), written to <workdir>/images/samples_<step>.png.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import ConfigError, config
from mmjax.data import palette as pal
from mmjax.models.lm import LM, LMConfig, lm_forward_flops
from mmjax.objectives.lm import lm_cross_entropy, next_token_targets
from mmjax.tasks.lm import NextTokenTask


@config
class PixelARLossConfig:
    """palette_size: k colours (iGPT: 512; `shapes` needs 15 for a lossless palette).
    palette_images: training images whose pixels the palette is fitted on (the first ones of the
      train split); palette_seed: k-means' seed and pixel subset.
    z_loss: coefficient of logsumexp(logits)² per token.
    samples: images drawn at each evaluation (0: none); sample_temperature / sample_top_k: the sampler
      (defaults: plain ancestral sampling, the model's own distribution)."""

    palette_size: int = 16
    palette_images: int = 2000
    palette_seed: int = 0
    z_loss: float = 0.0
    samples: int = 16
    sample_temperature: float = 1.0
    sample_top_k: int | None = None
    sample_seed: int = 0


class PixelARTask(NextTokenTask):
    model_config_cls = LMConfig
    loss_config_cls = PixelARLossConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        d, m, loss = cfg.data, cfg.model, cfg.loss
        if d.value_range != "unit":
            raise ConfigError(f"the pixel_ar task reads pixels in [0, 1]: set data.value_range='unit' "
                              f"(got {d.value_range!r})")
        if d.image_size is None:
            raise ConfigError("the pixel_ar task needs data.image_size (the raster is image_size² tokens)")
        if isinstance(loss.palette_size, bool) or loss.palette_size < 2:
            raise ConfigError(f"loss.palette_size must be an int >= 2, got {loss.palette_size!r}")
        self.k = loss.palette_size
        self.pixels = d.image_size * d.image_size
        if m.vocab_size < self.k + 1:
            raise ConfigError(f"model.vocab_size={m.vocab_size} is below palette_size + 1 = {self.k + 1} "
                              "(the k colours and BOS)")
        if m.max_len < self.pixels + 1:
            raise ConfigError(f"model.max_len={m.max_len} is below BOS + the {d.image_size}×{d.image_size} "
                              f"raster = {self.pixels + 1} positions (sampling writes them all to the KV cache)")
        if loss.palette_images < 1 or loss.samples < 0 or loss.z_loss < 0 or loss.sample_temperature <= 0:
            raise ConfigError("loss.palette_images must be >= 1, loss.samples and loss.z_loss >= 0, "
                              "loss.sample_temperature > 0")
        self.model = LM(m)
        self._palette = None
        self.palette_mse = None

    # ------------------------------------------------------------------ palette
    @property
    def palette(self) -> np.ndarray:
        """The k colours [k, 3], fitted on the first `palette_images` train images (deterministic:
        the same config gives the same palette, so a saved run needs no extra file)."""
        if self._palette is None:
            from mmjax.data import pipeline
            d, loss = self.cfg.data, self.cfg.loss
            images, n = [], 0
            for batch in pipeline.eval_batches(d, split=d.train_split, global_batch_size=min(500, loss.palette_images)):
                real = np.asarray(batch["image"])[np.asarray(batch["mask"], bool)]
                images.append(real[: loss.palette_images - n])
                n += len(images[-1])
                if n >= loss.palette_images:
                    break
            pixels = np.concatenate(images)
            self._palette = pal.fit_palette(pixels, self.k, seed=loss.palette_seed)
            self.palette_mse = pal.quantisation_error(pixels, self._palette)
        return self._palette

    def sequences(self, images) -> jax.Array:
        """images [B, H, W, 3] in [0, 1] → [BOS, palette ids in raster order] int32 [B, HW + 1]."""
        ids = pal.quantise(jnp.asarray(images), self.palette).reshape(images.shape[0], -1)
        return jnp.concatenate([jnp.full((ids.shape[0], 1), self.k, jnp.int32), ids], axis=1)

    def to_images(self, ids) -> np.ndarray:
        """Palette ids [B, HW] → images [B, H, W, 3] in [0, 1]."""
        s = self.cfg.data.image_size
        return pal.dequantise(np.asarray(ids), self.palette).reshape(-1, s, s, 3)

    # ------------------------------------------------------------------ training
    def example_batch(self, batch_size):
        s = self.cfg.data.image_size
        return {"image": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.float32)}

    def init_params(self, rng):
        return self.model.init(rng, jnp.zeros((1, self.pixels), jnp.int32))["params"]

    def _token_sums(self, params, batch, *, train, rng=None, example_mask=None):
        seq = self.sequences(batch["image"])
        mask = None if example_mask is None else jnp.broadcast_to(
            example_mask.astype(jnp.float32)[:, None], seq.shape)
        inputs, targets, weights = next_token_targets(seq, mask)
        rngs = {"dropout": rng} if rng is not None else {}
        logits, _ = self.model.apply({"params": params}, inputs, train=train, rngs=rngs)
        return lm_cross_entropy(logits, targets, weights, z_loss=self.cfg.loss.z_loss)

    def train_flops_per_example(self):
        return 3.0 * lm_forward_flops(self.cfg.model, self.pixels)

    # ------------------------------------------------------------------ evaluation
    def summarize_eval(self, sums):
        tokens = max(sums["tokens"], 1.0)
        nll = sums["nll"] / tokens
        return {"nll_per_pixel": nll, "bits_per_dim": nll / (3 * math.log(2)),
                "pixel_accuracy": sums["correct"] / tokens, "palette_mse": self.palette_mse,
                "count": int(sums["count"])}

    def sample(self, params, n: int, *, rng, temperature: float = 1.0, top_k: int | None = None, mesh=None):
        """n images drawn from BOS on device: palette ids only, HW tokens each. [n, H, W, 3] in [0, 1]."""
        from mmjax.decode import generate
        out = generate(self.model, params, np.full((n, 1), self.k, np.int32), max_new_tokens=self.pixels,
                       temperature=temperature, top_k=top_k, rng=rng, token_range=(0, self.k), mesh=mesh)
        return self.to_images(out.tokens)

    def save_eval_artifacts(self, params, extra, mesh, directory, step):
        """Writes images/samples_<step>.png: `loss.samples` images drawn with the configured sampler."""
        from mmjax.data.grid import save_image_grid
        c = self.cfg.loss
        if c.samples <= 0:
            return
        images = self.sample(params, c.samples, rng=jax.random.PRNGKey(c.sample_seed + step),
                             temperature=c.sample_temperature, top_k=c.sample_top_k, mesh=mesh)
        save_image_grid(images, Path(directory) / "images" / f"samples_{step:06d}.png", ncols=8)


__all__ = ["PixelARLossConfig", "PixelARTask"]
