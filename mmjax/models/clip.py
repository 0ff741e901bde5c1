"""Two towers in one embedding space: CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023).

    f_I(x) = W_I · ViT(x)        f_T(y) = W_T · TextTransformer(y)          (projected, [B, E])
    s_ij   = t · ⟨f_I(x_i)/‖f_I(x_i)‖, f_T(y_j)/‖f_T(y_j)‖⟩ (+ b for SigLIP)

with the temperature stored as a log, t = exp(logit_scale) clamped at `logit_scale_max` (CLIP
inits log(1/0.07), SigLIP log 10 with b = −10). `encode_image` / `encode_text` return projected,
*unnormalised* features (as HF's get_image_features); the call returns the logit matrices.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.config import config
from mmjax.layers import DenseGeneral
from mmjax.layers.transformer import to_dtype
from mmjax.models.text import TextConfig, TextTransformer
from mmjax.models.vit import ViT, ViTConfig


@config
class CLIPConfig:
    vision: ViTConfig = ViTConfig(pre_norm=True, patch_bias=False, pool="cls")
    text: TextConfig = TextConfig()
    embed_dim: int = 512
    vision_projection: bool = True  # SigLIP uses the pooled MAP output as it is
    vision_projection_bias: bool = False
    text_projection: bool = True
    text_projection_bias: bool = False  # SigLIP's text head has a bias
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = 100.0  # clamp on t = exp(logit_scale)
    logit_bias_init: float | None = None  # SigLIP: -10


def l2_normalize(x, eps: float = 1e-12):
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.maximum(jnp.sum(x32 * x32, -1, keepdims=True), eps))


class CLIP(nn.Module):
    cfg: CLIPConfig

    def setup(self):
        c = self.cfg
        if c.vision.num_classes is not None:
            raise ValueError("the CLIP vision tower must have no classification head (num_classes=None)")
        self.vision = ViT(c.vision)
        self.text = TextTransformer(c.text)
        dt = to_dtype(c.vision.encoder.dtype)
        if c.vision_projection:
            self.vision_proj = DenseGeneral(c.embed_dim, ("embed", "mlp"), use_bias=c.vision_projection_bias,
                                            dtype=dt, ops=c.vision.encoder.ops, name="vision_proj")
        if c.text_projection:
            self.text_proj = DenseGeneral(c.embed_dim, ("embed", "mlp"), use_bias=c.text_projection_bias,
                                          dtype=to_dtype(c.text.encoder.dtype), ops=c.text.encoder.ops,
                                          name="text_proj")
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init), (), jnp.float32)
        if c.logit_bias_init is not None:
            self.logit_bias = self.param("logit_bias", nn.initializers.constant(c.logit_bias_init), (), jnp.float32)

    def encode_image(self, images, *, train: bool = False):
        """images [B, H, W, C] → projected features [B, E] (not normalised)."""
        x, _ = self.vision(images, train=train)
        return self.vision_proj(x) if self.cfg.vision_projection else x

    def encode_text(self, ids, *, valid=None, train: bool = False):
        """ids [B, L] (valid [B, L] marks real tokens) → projected features [B, E] (not normalised)."""
        x, _ = self.text(ids, valid=valid, train=train)
        return self.text_proj(x) if self.cfg.text_projection else x

    def temperature_and_bias(self):
        t = jnp.minimum(jnp.exp(self.logit_scale), self.cfg.logit_scale_max)
        b = self.logit_bias if self.cfg.logit_bias_init is not None else jnp.zeros((), jnp.float32)
        return t, b

    def __call__(self, images, ids, *, valid=None, train: bool = False):
        """→ (logits_per_image [B_img, B_txt], logits_per_text [B_txt, B_img], aux) with aux holding
        the normalised embeddings "image" / "text" and the scalars "temperature" / "bias"."""
        zi = l2_normalize(self.encode_image(images, train=train))
        zt = l2_normalize(self.encode_text(ids, valid=valid, train=train))
        t, b = self.temperature_and_bias()
        logits = t * zi @ zt.T + b
        return logits, logits.T, {"image": zi, "text": zt, "temperature": t, "bias": b}
