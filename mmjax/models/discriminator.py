"""PatchGAN discriminator (pix2pix; taming-transformers' NLayerDiscriminator), NHWC.

    image [B, H, W, C]
      → conv 4×4 /2 (bias)            → LeakyReLU 0.2          C_0 = channels
      → n = 1 .. L−1:  conv 4×4 /2    → norm → LeakyReLU 0.2   C_n = channels · min(2ⁿ, 8)
      → conv 4×4 /1                   → norm → LeakyReLU 0.2   C_L = channels · min(2ᴸ, 8)
      → conv 4×4 /1 (bias) to 1 channel → patch logits [B, h, w, 1]

L = num_layers. Every conv pads 1 pixel on each side, so a stride-2 conv takes a side s to
⌊(s − 2)/2⌋ + 1 (s/2 for even s) and a stride-1 conv takes it to s − 1: for H divisible by 2ᴸ,
h = H/2ᴸ − 2 (32 px, L = 3 → 2×2 patches; 256 px → 30×30). Each logit classifies one receptive
field (70×70 px for L = 3) as real (> 0) or fake. The convs that feed a norm have no bias (the
norm's own bias replaces it); with norm="none" every conv has one.

Init as taming's `weights_init`: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0.
Param names: conv_0 (the first conv), conv_n / norm_n for n = 1..L, conv_out.
"""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.config import ConfigError, config
from mmjax.layers.norms import normalize_channels_last
from mmjax.layers.transformer import DTYPES, to_dtype
from mmjax.sharding import constrain

NormKind = Literal["batch", "group", "none"]

KERNEL = 4  # every conv is 4×4 with padding 1 on each side
BATCH_NORM_EPS = 1e-5  # torch.nn.BatchNorm2d's default
GROUP_NORM_EPS = 1e-6  # taming's Normalize (GroupNorm(32, eps=1e-6))
LEAKY_SLOPE = 0.2


@config
class DiscriminatorConfig:
    in_channels: int = 3
    channels: int = 64  # C_0, the width of the first conv; later convs have channels · min(2ⁿ, 8)
    num_layers: int = 3  # L: the stride-2 convs (L of them, the first unnormed) set h = H/2ᴸ − 2
    norm: NormKind = "batch"  # "batch": statistics of the batch it is called on (no running averages)
    norm_groups: int = 32  # groups for norm="group"
    dtype: str = "float32"  # conv compute dtype; norm statistics and the logits are float32
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("in_channels", "channels", "num_layers", "norm_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"DiscriminatorConfig.{name} must be a positive int, got {value!r}")
        if self.norm not in ("batch", "group", "none"):
            raise ConfigError(f"DiscriminatorConfig.norm must be one of ('batch', 'group', 'none'), "
                              f"got {self.norm!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"DiscriminatorConfig.{name} must be one of {sorted(DTYPES)}, "
                                  f"got {getattr(self, name)!r}")
        if self.norm == "group":
            bad = [c for c in normed_channels(self) if c % self.norm_groups]
            if bad:
                raise ConfigError(f"DiscriminatorConfig: norm='group' with norm_groups={self.norm_groups} needs "
                                  f"every normed width {normed_channels(self)} divisible by it; {bad} are not")


def layer_channels(cfg: DiscriminatorConfig) -> list[int]:
    """Output channels of every conv, in order: C_0, C_1 .. C_L, then 1 (the logits)."""
    return [cfg.channels] + normed_channels(cfg) + [1]


def normed_channels(cfg: DiscriminatorConfig) -> list[int]:
    """C_n = channels · min(2ⁿ, 8) for n = 1..L: the convs that are followed by a norm."""
    return [cfg.channels * min(2 ** n, 8) for n in range(1, cfg.num_layers + 1)]


def layer_strides(cfg: DiscriminatorConfig) -> list[int]:
    """Stride of every conv, in order: 2 for conv_0 .. conv_{L−1}, then 1 for conv_L and conv_out."""
    return [2] * cfg.num_layers + [1, 1]


def _conv_side(side: int, stride: int) -> int:
    """Output side of a 4×4 conv with padding 1: ⌊(side + 2 − 4) / stride⌋ + 1."""
    return (side + 2 - KERNEL) // stride + 1


def output_size(cfg: DiscriminatorConfig, image_size: int) -> int:
    """The side h of the patch-logit grid for an image_size × image_size input (H/2ᴸ − 2)."""
    side = image_size
    for stride in layer_strides(cfg):
        side = _conv_side(side, stride)
    return side


def forward_flops(cfg: DiscriminatorConfig, image_size: int) -> float:
    """Forward FLOPs for one image_size × image_size image, 2 FLOPs per multiply-add (convs only):

        per conv   2 · h_out · w_out · 4 · 4 · C_in · C_out

    summed over the L + 2 convs (widths `layer_channels`, strides `layer_strides`, sides as in
    `output_size`). Biases, norms and activations are left out; a training step runs the
    discriminator forward on real and fake images and backward (about 3× forward each).
    """
    side, c_in, flops = image_size, cfg.in_channels, 0
    for c_out, stride in zip(layer_channels(cfg), layer_strides(cfg)):
        side = _conv_side(side, stride)
        flops += 2 * side * side * KERNEL * KERNEL * c_in * c_out
        c_in = c_out
    return float(flops)


def _normal(mean: float, stddev: float):
    def init(key, shape, dtype=jnp.float32):
        return (mean + stddev * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return init


class PatchNorm(nn.Module):
    """BatchNorm (training mode) or GroupNorm over [B, H, W, C], statistics in float32.

        batch:  μ_c, σ²_c over (B, H, W)                 y = (x − μ) / √(σ² + 1e-5) · γ + β
        group:  μ, σ² over (H, W, C/G) per sample, group  y = (x − μ) / √(σ² + 1e-6) · γ + β

    σ² is the biased variance (÷N), as BatchNorm2d uses for normalising in training mode. The
    batch statistics are those of the *global* batch: under `jax.jit` with the batch sharded the
    means are cross-device reductions, so a sharded step equals one device (unlike per-device BN).
    """

    kind: Literal["batch", "group"]
    groups: int = 32
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        scale = self.param("scale", nn.with_logical_partitioning(_normal(1.0, 0.02), ("norm",)), (c,),
                           self.param_dtype).astype(jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (c,),
                          self.param_dtype).astype(jnp.float32)
        x = x.astype(jnp.float32)
        if self.kind == "batch":
            y = normalize_channels_last(x, c, BATCH_NORM_EPS, over_batch=True)
        elif self.kind == "group":
            if c % self.groups:
                raise ValueError(f"{self.name}: {c} channels are not divisible into {self.groups} groups")
            y = normalize_channels_last(x, self.groups, GROUP_NORM_EPS)
        else:
            raise ValueError(f"unknown norm kind {self.kind!r}; expected 'batch' or 'group'")
        return (y * scale + bias).astype(self.dtype)


class PatchDiscriminator(nn.Module):
    """images [B, H, W, in_channels] → patch logits [B, h, w, 1] (float32), h = H/2ᴸ − 2.

    Training mode only. With norm="batch" every call normalises with the statistics of the batch
    it is given and keeps no running averages: the discriminator is only ever applied inside the
    training step, so there is no eval mode, no `train` flag and no mutable "batch_stats"
    collection: `init` returns {"params"} alone and `apply` needs no `mutable=`. Because the
    statistics are per call, calling it once on real and once on fake images (as taming does)
    differs from calling it once on their concatenation.
    """

    config: DiscriminatorConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        c = self.config
        if images.ndim != 4 or images.shape[-1] != c.in_channels:
            raise ValueError(f"PatchDiscriminator wants images [B, H, W, {c.in_channels}], got {images.shape}")
        for side in images.shape[1:3]:
            if output_size(c, side) < 1:
                raise ValueError(f"PatchDiscriminator: images {images.shape[1]}x{images.shape[2]} are too small "
                                 f"for num_layers={c.num_layers} (need at least {2 ** c.num_layers * 3} px a side)")
        dt, pdt = to_dtype(c.dtype), to_dtype(c.param_dtype)
        normed = c.norm != "none"
        kernel_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, None, "embed"))
        bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))

        def conv(features: int, stride: int, use_bias: bool, name: str) -> nn.Conv:
            return nn.Conv(features, (KERNEL, KERNEL), strides=stride, padding=((1, 1), (1, 1)),
                           use_bias=use_bias, kernel_init=kernel_init, bias_init=bias_init,
                           dtype=dt, param_dtype=pdt, name=name)

        widths, strides = layer_channels(c), layer_strides(c)
        x = constrain(images.astype(dt), ("act_batch", None, None, None))
        x = nn.leaky_relu(conv(widths[0], strides[0], True, "conv_0")(x), LEAKY_SLOPE)
        for n in range(1, c.num_layers + 1):
            x = conv(widths[n], strides[n], not normed, f"conv_{n}")(x)
            if normed:
                x = PatchNorm(c.norm, c.norm_groups, dtype=dt, param_dtype=pdt, name=f"norm_{n}")(x)
            x = nn.leaky_relu(x, LEAKY_SLOPE)
            x = constrain(x, ("act_batch", None, None, None))
        logits = conv(1, 1, True, "conv_out")(x)
        return logits.astype(jnp.float32)
