"""Vision Transformer (Dosovitskiy et al. 2021), big_vision-style.

    image [B, H, W, C] → patches [B, N, P²C], N = HW/P²  → linear → [B, N, D]
      → (+ CLS token) + positions → Transformer → pool (cls / gap / map / none) → (head)

`ViT(cfg)(images)` returns `(out, aux)`: `out` is the logits when the config has a head, else the
pooled (or, with pool="none", the per-token) representation; `aux` names the intermediates:
"patch_tokens" (after the patch projection), "encoded" (all tokens after the stack),
"pre_logits", and "blocks" ([depth, B, T, D]) when asked with return_blocks=True.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import flax.linen as nn
import jax.numpy as jnp

from mmjax.config import config
from mmjax.layers import (
    Attention,
    ConvStem,
    DenseGeneral,
    LearnedPosEmb,
    Mlp,
    Norm,
    PatchEmbed,
    Transformer,
    TransformerConfig,
    stem_stride,
)
from mmjax.layers.posemb import sincos_2d
from mmjax.layers.transformer import to_dtype
from mmjax.sharding import constrain

# name → (width, depth, mlp_dim, heads), as in big_vision's decode_variant.
VARIANTS = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}


@config
class ViTConfig:
    image_size: int = 224
    channels: int = 3
    patch_size: int = 16
    encoder: TransformerConfig = TransformerConfig(width=768, depth=12, num_heads=12, mlp_dim=3072)
    pool: Literal["cls", "gap", "map", "none"] = "cls"
    posemb: Literal["learned", "sincos2d"] = "learned"
    pre_norm: bool = False  # LayerNorm before the stack (CLIP's ln_pre)
    patch_bias: bool = True
    # Early convolutions (ConvStem): (channels, stride) per 3×3 conv before the patch embedding;
    # the product of the strides must divide patch_size, and the token grid stays HW/P². Empty:
    # the plain linear patch embedding.
    stem: tuple[tuple[int, int], ...] = ()
    num_classes: int | None = None  # None: no head
    head_zero_init: bool = True
    representation_size: int | None = None  # a tanh pre-logits layer, as the original ViT


def vit_config(variant: str, **kw) -> ViTConfig:
    """"B/16" → ViTConfig(patch_size=16, encoder=B sizes). Extra keywords go to ViTConfig, except
    encoder fields, which may be given as `encoder=dict(...)` overrides."""
    m = re.fullmatch(r"(\w+?)/(\d+)", variant)
    if not m or m.group(1) not in VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; expected NAME/PATCH with NAME in "
                         f"{sorted(VARIANTS)}, e.g. 'B/16'")
    width, depth, mlp, heads = VARIANTS[m.group(1)]
    enc_over = kw.pop("encoder", {}) or {}
    encoder = TransformerConfig(width=width, depth=depth, mlp_dim=mlp, num_heads=heads)
    encoder = dataclasses.replace(encoder, **enc_over)
    return ViTConfig(patch_size=int(m.group(2)), encoder=encoder, **kw)


class MapHead(nn.Module):
    """Multihead attention pooling: one learned probe attends over the tokens, then an MLP."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dt, pdt = to_dtype(c.dtype), to_dtype(c.param_dtype)
        probe = self.param("probe", nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                                 (None, None, "embed")),
                           (1, 1, x.shape[-1]), pdt)
        probe = jnp.broadcast_to(probe.astype(dt), (x.shape[0], 1, x.shape[-1]))
        y = Attention(num_heads=c.num_heads, use_bias=True, dtype=dt, param_dtype=pdt, ops=c.ops,
                      name="attn")(probe, context=x)
        z = Norm(c.norm, c.norm_eps, dtype=dt, param_dtype=pdt, ops=c.ops, name="norm")(y)
        y = y + Mlp(c.mlp_dim or 4 * c.width, c.activation, dtype=dt, param_dtype=pdt, ops=c.ops, name="mlp")(z)
        return y[:, 0]


class ViT(nn.Module):
    cfg: ViTConfig

    def check_images(self, images) -> None:
        """Clear errors for images that cannot go through this ViT."""
        c = self.cfg
        if images.ndim != 4:
            raise ValueError(f"ViT expects images [B, H, W, C], got rank {images.ndim} shape {images.shape}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise TypeError(f"ViT expects floating-point images (normalised), got {images.dtype}; "
                            "convert uint8 pixels with the data pipeline's value_range")
        b, h, w, ch = images.shape
        if c.patch_size % stem_stride(c.stem):
            raise ValueError(f"the conv stem's total stride {stem_stride(c.stem)} (stem={c.stem}) does not "
                             f"divide the patch size {c.patch_size}")
        if ch != c.channels:
            raise ValueError(f"ViT is configured for {c.channels} channels, got {ch} (shape {images.shape})")
        if h % c.patch_size or w % c.patch_size:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {c.patch_size}")
        if (h, w) != (c.image_size, c.image_size):
            raise ValueError(f"ViT is configured for {c.image_size}x{c.image_size} images, got {h}x{w}; "
                             "resize the position embedding (mmjax.layers.resize_posemb) and set "
                             "image_size for a new resolution")

    @nn.compact
    def __call__(self, images, *, train: bool = False, return_blocks: bool = False):
        c = self.cfg
        e = c.encoder
        self.check_images(images)
        dt, pdt = to_dtype(e.dtype), to_dtype(e.param_dtype)
        aux = {}
        x = images
        if c.stem:
            x = ConvStem(tuple(map(tuple, c.stem)), e.norm_eps, dtype=dt, param_dtype=pdt, name="stem")(x)
        x = PatchEmbed(e.width, c.patch_size // stem_stride(c.stem), use_bias=c.patch_bias, dtype=dt,
                       param_dtype=pdt, name="embedding")(x)
        aux["patch_tokens"] = x
        b, n, d = x.shape
        grid = c.image_size // c.patch_size
        if c.posemb == "sincos2d":
            x = x + jnp.asarray(sincos_2d(grid, grid, d), dt)[None]
        if c.pool == "cls":
            cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "embed")),
                             (1, 1, d), pdt)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (b, 1, d)), x], axis=1)
        if c.posemb == "learned":
            x = LearnedPosEmb(x.shape[1], param_dtype=pdt, name="posemb")(x)
        if c.pre_norm:
            x = Norm(e.norm, e.norm_eps, dtype=dt, param_dtype=pdt, ops=e.ops, name="pre_norm")(x)
        x = nn.Dropout(e.dropout)(x, deterministic=not train)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        x, enc_aux = Transformer(e, name="encoder")(x, deterministic=not train, return_blocks=return_blocks)
        aux.update(enc_aux)
        aux["encoded"] = x
        if c.pool == "cls":
            x = x[:, 0]
        elif c.pool == "gap":
            x = jnp.mean(x, axis=1)
        elif c.pool == "map":
            x = MapHead(e, name="map_head")(x)
        if c.representation_size is not None:
            x = jnp.tanh(DenseGeneral(c.representation_size, ("embed", "mlp"), dtype=dt, param_dtype=pdt,
                                      ops=e.ops, name="pre_logits")(x))
        aux["pre_logits"] = x
        if c.num_classes is not None:
            if c.pool == "none":
                raise ValueError("a classification head needs pooling (pool='none' was given)")
            init = nn.initializers.zeros if c.head_zero_init else None
            x = DenseGeneral(c.num_classes, ("embed", "classes"), dtype=dt, param_dtype=pdt,
                             kernel_init=init, ops=e.ops, name="head")(x)
            aux["logits"] = x
        return x, aux


def vit_forward_flops(cfg: ViTConfig) -> float:
    """Forward FLOPs for one image, counting each multiply-add as 2 FLOPs (matmuls only):

        conv stem         2 · H'W' · 9 · C_in · C_out per conv (when configured)
        patch embedding   2 · N · P²C · D (P and C after the stem)
        per block         2 · T · (4D² [q,k,v,out] + 2·D·M [mlp])  +  2 · 2 · T² · D [QKᵀ and AV]
        head              2 · D · classes

    with N = HW/P² patches and T = N (+1 with a CLS token). Norms, softmax and activations are
    left out (they are not matmuls); training is 3× forward.
    """
    e = cfg.encoder
    n = (cfg.image_size // cfg.patch_size) ** 2
    t = n + (1 if cfg.pool == "cls" else 0)
    d, m = e.width, e.mlp_dim or 4 * e.width
    h = e.num_heads
    hkv = e.num_kv_heads or h
    dh = e.head_dim or d // h
    proj = 2 * d * h * dh + 2 * d * hkv * dh  # q and out; k and v
    mlp = (3 if e.activation in ("swiglu", "geglu") else 2) * d * m
    side, cin = cfg.image_size, cfg.channels
    flops = 0
    for cout, stride in cfg.stem:  # ConvStem: 2 · H'W' · 9 · C_in · C_out per conv
        side //= stride
        flops += 2 * side * side * 9 * cin * cout
        cin = cout
    flops += 2 * n * (cfg.patch_size // stem_stride(cfg.stem)) ** 2 * cin * d
    flops += e.depth * (2 * t * (proj + mlp) + 4 * t * t * h * dh)
    if cfg.num_classes:
        flops += 2 * d * cfg.num_classes
    return float(flops)
