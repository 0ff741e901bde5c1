"""Convolutional image autoencoders: VQ-VAE / VQ-GAN (taming, LlamaGen) and the Gaussian VAE (AutoencoderKL).

The network of taming-transformers and diffusers, NHWC:

    encoder: conv_in 3×3 → levels 0..L-1 (level i: blocks_per_level ResnetBlocks at channels·mult_i,
             each followed by self-attention if i ∈ attn_levels; then Downsample ×½ except at the last
             level) → mid (ResnetBlock, AttnBlock, ResnetBlock) → GroupNorm → swish → conv_out 3×3
    quant_conv 1×1 → [VQ: quantizer (nearest code, straight-through)] → post_quant_conv 1×1
    decoder: conv_in 3×3 → mid → levels L-1..0 (blocks_per_level + 1 ResnetBlocks [+ attention],
             Upsample ×2 except at level 0) → GroupNorm → swish → conv_out 3×3

`encoder="patch"` (not taming's): conv_in f×f with stride f (each patch to one vector) →
blocks_per_level residual MLPs per position (LayerNorm → Dense 4C → swish → Dense C) → LayerNorm →
swish → conv_out 1×1. A latent is then a function of its own f×f patch of pixels and nothing else, so
one patch always gets one code; taming's encoder (3×3 convs reaching across a small image, GroupNorm
statistics and attention over the image) writes the same patch with many codes depending on the rest
of the image, and an AR model over the codes has to predict that choice too (docs/generation.md).
The decoder is the same either way.

An image [B, H, W, C] becomes a latent grid [B, H/f, W/f, ·] with f = 2^(L−1). The VQ model turns
it into token ids [B, h, w]; the KL model into a Gaussian with mean and (clamped) log-variance.

Param tree (level i = resolution H/2^i; the decoder's up_i works at the same resolution as down_i):

    encoder/{conv_in, down_{i}/{block_{j}, attn_{j}, downsample}, mid/{block_0, attn, block_1},
             norm_out, conv_out}            (encoder="patch": {conv_in, block_{j}_{norm, fc1, fc2}, norm_out, conv_out})
    quant_conv, quantizer/embedding [K, D] (VQ only), post_quant_conv
    decoder/{conv_in, mid/..., up_{i}/{block_{j}, attn_{j}, upsample}, norm_out, conv_out}

Conv weights ("kernel") are HWIO [kh, kw, in, out]; attention projections [C, C]; norms "scale"/"bias".
"""

from __future__ import annotations

import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.config import config
from mmjax.layers.norms import Norm, normalize_channels_last
from mmjax.layers.transformer import to_dtype
from mmjax.models.quantizer import QuantizerConfig, VectorQuantizer
from mmjax.sharding import constrain

CONV_AXES = (None, None, None, "embed")
IMAGE_AXES = ("act_batch", None, None, None)


@config
class AutoencoderConfig:
    kind: Literal["vq", "kl"] = "vq"  # VQ-VAE/VQ-GAN or Gaussian VAE (AutoencoderKL)
    in_channels: int = 3
    out_channels: int = 3
    channels: int = 64  # conv_in width; level i has channels * channel_mults[i]
    channel_mults: tuple[int, ...] = (1, 2, 2)  # one per level; ×½ resolution between levels
    blocks_per_level: int = 2  # encoder ResnetBlocks per level; the decoder has one more
    attn_levels: tuple[int, ...] = ()  # levels (0 = highest resolution) whose blocks are followed by attention
    mid_attention: bool = True
    encoder: Literal["conv", "patch"] = "conv"  # "patch": each latent sees its own f×f patch only (module docstring)
    latent_channels: int = 8  # encoder output channels (z); KL: the encoder outputs 2× (mean, logvar)
    norm_groups: int = 32
    norm_eps: float = 1e-6
    logvar_clamp: tuple[float, float] = (-30.0, 20.0)
    quantizer: QuantizerConfig = QuantizerConfig()  # used when kind == "vq"
    scaling_factor: float = 1.0  # diffusers' latent scaling for diffusion models (metadata, not applied here)
    shift_factor: float | None = None  # diffusers' latent shift (metadata, not applied here)
    image_size: int = 256  # nominal input size (diffusers' sample_size); the convs take any multiple of 2^(L−1)
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        problems = []
        if self.kind not in ("vq", "kl"):
            problems.append(f"kind={self.kind!r} must be 'vq' or 'kl'")
        if self.encoder not in ("conv", "patch"):
            problems.append(f"encoder={self.encoder!r} must be 'conv' or 'patch'")
        for name in ("in_channels", "out_channels", "channels", "latent_channels", "norm_groups", "blocks_per_level",
                     "image_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            problems.append(f"channel_mults={self.channel_mults} must be a non-empty tuple of positive ints")
        bad_levels = [lv for lv in self.attn_levels if not 0 <= lv < len(self.channel_mults)]
        if bad_levels or len(set(self.attn_levels)) != len(self.attn_levels):
            problems.append(f"attn_levels={self.attn_levels} must be distinct levels in "
                            f"0..{len(self.channel_mults) - 1}")
        if self.norm_groups >= 1:
            if self.channels % self.norm_groups:
                problems.append(f"channels={self.channels} (conv_in output) is not divisible by "
                                f"norm_groups={self.norm_groups}")
            for i, m in enumerate(self.channel_mults):
                if (self.channels * m) % self.norm_groups:
                    problems.append(f"level {i}: channels*mult = {self.channels}*{m} = {self.channels * m} is not "
                                    f"divisible by norm_groups={self.norm_groups}")
        if self.norm_eps <= 0:
            problems.append(f"norm_eps={self.norm_eps} must be > 0")
        if len(self.logvar_clamp) != 2 or self.logvar_clamp[0] >= self.logvar_clamp[1]:
            problems.append(f"logvar_clamp={self.logvar_clamp} must be (low, high) with low < high")
        for name in ("dtype", "param_dtype"):
            try:
                to_dtype(getattr(self, name))
            except ValueError as e:
                problems.append(f"{name}: {e}")
        if problems:
            raise ValueError("AutoencoderConfig: " + "; ".join(problems))

    @property
    def num_levels(self) -> int:
        return len(self.channel_mults)

    @property
    def downsample_factor(self) -> int:
        """f: an H×W image becomes an (H/f)×(W/f) latent grid."""
        return 2 ** (len(self.channel_mults) - 1)

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.channels * m for m in self.channel_mults)

    @property
    def code_dim(self) -> int:
        """Channels of the quantized latents (VQ: the codebook's D; KL: latent_channels)."""
        return self.quantizer.code_dim if self.kind == "vq" else self.latent_channels

    def latent_shape(self, image_size: int | None = None) -> tuple[int, int]:
        s = (image_size or self.image_size) // self.downsample_factor
        return (s, s)


# ------------------------------------------------------------------------------------------ layers
def swish(x: jax.Array) -> jax.Array:
    """x·σ(x) (SiLU), taming's and diffusers' nonlinearity."""
    return x * jax.nn.sigmoid(x)


def _flat_draw(sample):
    """Wraps a sampler(key, shape, dtype) to draw a flat vector and reshape it. The same distribution;
    XLA:CPU compiles a threefry draw of a 4-D shape ~10× slower than of a 1-D one (7 s vs 0.7 s)."""
    def draw(key, shape, dtype=jnp.float32):
        return sample(key, (math.prod(shape),), dtype).reshape(shape)
    return draw


def _conv_init():
    # torch's Conv2d default (kaiming_uniform with a=√5): U(±1/√fan_in).
    def init(key, shape, dtype=jnp.float32):
        bound = 1.0 / math.sqrt(math.prod(shape[:-1]))  # fan_in = kh·kw·in (or in for a dense kernel)
        return _flat_draw(lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound))(key, shape, dtype)
    return init


class Conv(nn.Module):
    """k×k convolution with explicit padding ((top, bottom), (left, right)); kernel [k, k, in, out]."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: tuple[tuple[int, int], tuple[int, int]] | None = None  # None: k//2 on every side (torch padding=k//2)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        pad = self.padding if self.padding is not None else ((k // 2, k // 2), (k // 2, k // 2))
        kernel = self.param("kernel", nn.with_logical_partitioning(_conv_init(), CONV_AXES),
                            (k, k, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                          (self.features,), self.param_dtype)
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride),
                                         pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias.astype(self.dtype)


class Dense(nn.Module):
    """y = x·W + b over the last axis; kernel [in, out] (diffusers' Linear, taming's 1×1 conv)."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(_conv_init(), (None, "embed")),
                            (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                          (self.features,), self.param_dtype)
        return x.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)


class GroupNorm(nn.Module):
    """GroupNorm over channels-last x [B, H, W, C]: C split into `groups` groups, each normalised over
    (H, W, C/groups) with float32 statistics, then a per-channel scale and bias."""

    groups: int
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        if c % self.groups:
            raise ValueError(f"{self.name}: {c} channels are not divisible by {self.groups} groups")
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (c,),
                           self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (c,),
                          self.param_dtype)
        y = normalize_channels_last(x, self.groups, self.eps)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class ResnetBlock(nn.Module):
    """x + F(x): GroupNorm → swish → conv 3×3 → GroupNorm → swish → conv 3×3; the skip is a 1×1 conv
    ("conv_shortcut") when the channel count changes. (Dropout is 0 in every released tokenizer.)"""

    features: int
    groups: int
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = swish(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
        h = Conv(self.features, 3, name="conv1", **kw)(h)
        h = swish(GroupNorm(self.groups, self.eps, name="norm2", **kw)(h))
        h = Conv(self.features, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.features:
            x = Conv(self.features, 1, name="conv_shortcut", **kw)(x)
        return x.astype(self.dtype) + h


class AttnBlock(nn.Module):
    """x + out(softmax(q kᵀ/√C) v) over the h·w positions, one head of width C, after a GroupNorm."""

    groups: int
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t = GroupNorm(self.groups, self.eps, name="norm", **kw)(x).reshape(b, h * w, c)
        q = Dense(c, name="query", **kw)(t)
        k = Dense(c, name="key", **kw)(t)
        v = Dense(c, name="value", **kw)(t)
        scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        o = jnp.einsum("bqk,bkc->bqc", probs, v)
        return x.astype(self.dtype) + Dense(c, name="out", **kw)(o).reshape(b, h, w, c)


class Downsample(nn.Module):
    """×½: pad one row at the bottom and one column at the right, then a 3×3 stride-2 conv (taming)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Conv(x.shape[-1], 3, stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype,
                    param_dtype=self.param_dtype, name="conv")(x)


class Upsample(nn.Module):
    """×2: nearest-neighbour (each pixel repeated 2×2), then a 3×3 conv."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return Conv(x.shape[-1], 3, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


class MidBlock(nn.Module):
    """ResnetBlock → (AttnBlock) → ResnetBlock at the lowest resolution."""

    features: int
    groups: int
    eps: float
    attention: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock(self.features, self.groups, self.eps, name="block_0", **kw)(x)
        if self.attention:
            x = AttnBlock(self.groups, self.eps, name="attn", **kw)(x)
        return ResnetBlock(self.features, self.groups, self.eps, name="block_1", **kw)(x)


class Level(nn.Module):
    """One resolution: `num_blocks` ResnetBlocks (each followed by attention if asked), then an optional
    resample ("downsample" or "upsample")."""

    features: int
    num_blocks: int
    groups: int
    eps: float
    attention: bool
    resample: Literal["down", "up"] | None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_blocks):
            x = ResnetBlock(self.features, self.groups, self.eps, name=f"block_{j}", **kw)(x)
            if self.attention:
                x = AttnBlock(self.groups, self.eps, name=f"attn_{j}", **kw)(x)
        if self.resample == "down":
            x = Downsample(name="downsample", **kw)(x)
        elif self.resample == "up":
            x = Upsample(name="upsample", **kw)(x)
        return x


class Encoder(nn.Module):
    """images [B, H, W, C_in] → [B, H/f, W/f, out_channels]."""

    config: AutoencoderConfig
    out_channels: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=to_dtype(c.dtype), param_dtype=to_dtype(c.param_dtype))
        x = Conv(c.channels, 3, name="conv_in", **kw)(x)
        for i, width in enumerate(c.level_channels):
            last = i == c.num_levels - 1
            x = Level(width, c.blocks_per_level, c.norm_groups, c.norm_eps, i in c.attn_levels,
                      None if last else "down", name=f"down_{i}", **kw)(x)
            x = constrain(x, IMAGE_AXES)
        x = MidBlock(c.level_channels[-1], c.norm_groups, c.norm_eps, c.mid_attention, name="mid", **kw)(x)
        x = swish(GroupNorm(c.norm_groups, c.norm_eps, name="norm_out", **kw)(x))
        return Conv(self.out_channels, 3, name="conv_out", **kw)(x)


class PatchEncoder(nn.Module):
    """images [B, H, W, C_in] → [B, H/f, W/f, out_channels], latent (i, j) a function of pixel patch (i, j) only."""

    config: AutoencoderConfig
    out_channels: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        f, width = c.downsample_factor, c.level_channels[-1]
        kw = dict(dtype=to_dtype(c.dtype), param_dtype=to_dtype(c.param_dtype))
        x = Conv(width, f, stride=f, padding=((0, 0), (0, 0)), name="conv_in", **kw)(x)
        for j in range(c.blocks_per_level):
            h = Norm("layernorm", c.norm_eps, name=f"block_{j}_norm", **kw)(x)
            h = swish(Dense(4 * width, name=f"block_{j}_fc1", **kw)(h))
            x = constrain(x + Dense(width, name=f"block_{j}_fc2", **kw)(h), IMAGE_AXES)
        x = swish(Norm("layernorm", c.norm_eps, name="norm_out", **kw)(x))
        return Conv(self.out_channels, 1, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """latents [B, h, w, C] → images [B, h·f, w·f, out_channels]; `features` stops before conv_out."""

    config: AutoencoderConfig

    def setup(self):
        c = self.config
        kw = dict(dtype=to_dtype(c.dtype), param_dtype=to_dtype(c.param_dtype))
        self.conv_in = Conv(c.level_channels[-1], 3, **kw)
        self.mid = MidBlock(c.level_channels[-1], c.norm_groups, c.norm_eps, c.mid_attention, **kw)
        # up_i works at the resolution of the encoder's down_i; they run from the lowest resolution up.
        for i in range(c.num_levels):
            setattr(self, f"up_{i}", Level(c.level_channels[i], c.blocks_per_level + 1, c.norm_groups, c.norm_eps,
                                           i in c.attn_levels, "up" if i > 0 else None, **kw))
        self.norm_out = GroupNorm(c.norm_groups, c.norm_eps, **kw)
        self.conv_out = Conv(c.out_channels, 3, **kw)

    def features(self, z: jax.Array) -> jax.Array:
        """[B, h, w, C] → the input of conv_out [B, H, W, channels·mult_0] (after the final norm and swish)."""
        x = self.mid(self.conv_in(z))
        for i in reversed(range(self.config.num_levels)):
            x = constrain(getattr(self, f"up_{i}")(x), IMAGE_AXES)
        return swish(self.norm_out(x))

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.conv_out(self.features(z))


# ------------------------------------------------------------------------------------------- model
class Autoencoder(nn.Module):
    """The VQ (kind="vq") or Gaussian (kind="kl") autoencoder. Images are [B, H, W, C] in [−1, 1].

    Methods (all usable as `model.apply(variables, x, method=...)`):
      __call__(images, sample_rng=None) → (recon, aux)
      encode(images)        VQ: z [B, h, w, D] after quant_conv; KL: (mean, logvar) [B, h, w, L]
      quantize(z)           VQ: (z_q straight-through, aux with indices and losses)
      decode(z)             post_quant_conv → decoder (VQ: z already quantized)
      decode_indices(ids)   VQ: ids [B, h, w] → images
      pixels_from_features(h)  decoder.conv_out only (the trainer's ∇ w.r.t. the last layer)
      sample_prior(rng, batch) KL: z ~ N(0, I) → images
    """

    config: AutoencoderConfig

    def setup(self):
        c = self.config
        kw = dict(dtype=to_dtype(c.dtype), param_dtype=to_dtype(c.param_dtype))
        vq = c.kind == "vq"
        self.encoder = (PatchEncoder if c.encoder == "patch" else Encoder)(
            c, c.latent_channels if vq else 2 * c.latent_channels)
        self.quant_conv = Conv(c.code_dim if vq else 2 * c.latent_channels, 1, **kw)
        if vq:
            self.quantizer = VectorQuantizer(c.quantizer, param_dtype=kw["param_dtype"])
        self.post_quant_conv = Conv(c.latent_channels, 1, **kw)
        self.decoder = Decoder(c)

    def _check_images(self, images: jax.Array) -> None:
        c = self.config
        if images.ndim != 4 or images.shape[-1] != c.in_channels:
            raise ValueError(f"Autoencoder expects images [B, H, W, {c.in_channels}], got {images.shape}")
        if images.shape[1] % c.downsample_factor or images.shape[2] % c.downsample_factor:
            raise ValueError(f"image size {images.shape[1]}x{images.shape[2]} is not divisible by the "
                             f"downsampling factor {c.downsample_factor} = 2^(levels-1)")

    def encode(self, images: jax.Array):
        """VQ: z [B, h, w, D] (before quantization). KL: (mean, logvar) [B, h, w, L], logvar clamped."""
        self._check_images(images)
        images = constrain(images, IMAGE_AXES)
        moments = self.quant_conv(self.encoder(images))
        if self.config.kind == "vq":
            return moments
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *self.config.logvar_clamp)

    def quantize(self, z: jax.Array):
        """VQ only: z [B, h, w, D] → (z_q [B, h, w, D], aux) (see VectorQuantizer)."""
        self._require("vq", "quantize")
        return self.quantizer(z)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents [B, h, w, D] → images [B, H, W, C] (VQ: pass quantized latents)."""
        return self.decoder(self.post_quant_conv(z))

    def pixels_from_features(self, h: jax.Array) -> jax.Array:
        """decoder.conv_out only: aux["decoder_features"] → images."""
        return self.decoder.conv_out(h)

    def decode_indices(self, ids: jax.Array) -> jax.Array:
        """VQ: token ids [B, h, w] → images [B, H, W, C]."""
        self._require("vq", "decode_indices")
        return self.decode(self.quantizer.lookup(ids).astype(to_dtype(self.config.dtype)))

    def sample_prior(self, rng: jax.Array, batch: int, image_size: int | None = None) -> jax.Array:
        """KL: decode z ~ N(0, I) [batch, h, w, L] (h = image_size / f; default the config's image_size)."""
        self._require("kl", "sample_prior")
        h, w = self.config.latent_shape(image_size)
        z = _flat_draw(jax.random.normal)(rng, (batch, h, w, self.config.latent_channels), jnp.float32)
        return self.decode(z)

    def _require(self, kind: str, method: str) -> None:
        if self.config.kind != kind:
            raise ValueError(f"Autoencoder.{method} needs kind={kind!r}; this model is kind={self.config.kind!r}")

    def __call__(self, images: jax.Array, *, sample_rng: jax.Array | None = None):
        """images [B, H, W, C] → (recon [B, H, W, C_out], aux).

        VQ aux: z, z_q, indices [B, h, w], codebook_loss, commitment_loss, quant_loss (β-weighted),
          perplexity, usage, decoder_features.
        KL aux: mean, logvar, kl [B] = ½ Σ_{h,w,c} (μ² + σ² − 1 − log σ²), z (a sample with
          sample_rng, else the mean), decoder_features.
        """
        c = self.config
        if c.kind == "vq":
            z = self.encode(images)
            z_q, q = self.quantizer(z)
            aux = dict(z=z, z_q=z_q, indices=q["indices"], codebook_loss=q["codebook_loss"],
                       commitment_loss=q["commitment_loss"], quant_loss=q["loss"], perplexity=q["perplexity"],
                       usage=q["usage"])
            latents = z_q
        else:
            mean, logvar = self.encode(images)
            if sample_rng is None:
                latents = mean
            else:
                noise = _flat_draw(jax.random.normal)(sample_rng, mean.shape, mean.dtype)
                latents = mean + jnp.exp(0.5 * logvar) * noise
            kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
            aux = dict(mean=mean, logvar=logvar, kl=kl, z=latents)
        features = self.decoder.features(self.post_quant_conv(latents.astype(to_dtype(c.dtype))))
        aux["decoder_features"] = features
        return self.decoder.conv_out(features), aux


# ------------------------------------------------------------------------------- pure functions
def _variables(params) -> dict:
    return params if isinstance(params, dict) and set(params) == {"params"} else {"params": params}


def tokenize(model: Autoencoder, params, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] in [−1, 1] → token ids [B, H/f, W/f] int32 (VQ models).

    Pure and jit-able (`jax.jit(functools.partial(tokenize, model))`); with a batch sharded over the
    mesh's data axes and replicated (or fsdp-sharded) params it runs sharded over the batch like any
    jitted function with sharded inputs."""
    def run(m: Autoencoder, x):
        return m.quantize(m.encode(x))[1]["indices"]
    return model.apply(_variables(params), images, method=run)


def detokenize(model: Autoencoder, params, ids: jax.Array) -> jax.Array:
    """token ids [B, h, w] → images [B, h·f, w·f, C] (VQ models). Pure and jit-able like `tokenize`."""
    return model.apply(_variables(params), ids, method=Autoencoder.decode_indices)


def forward_flops(config: AutoencoderConfig, image_size: int) -> float:
    """FLOPs of one forward pass (encode → quantize → decode) of ONE image of image_size².

    Counted: every convolution 2·H_out·W_out·k²·C_in·C_out (multiply-adds × 2); every attention
    block 4 projections 2·N·C² each plus q·kᵀ and p·v, 2·N²·C each (N = h·w positions); the VQ
    nearest-code search 2·N·K·D. Norms, activations, softmax, resampling copies are not counted.
    A training step costs about 3× this (forward + backward); a batch B costs B×.
    """
    c = config
    total = 0.0

    def conv(size, k, cin, cout):
        return 2.0 * size * size * k * k * cin * cout

    def resnet(size, cin, cout):
        return conv(size, 3, cin, cout) + conv(size, 3, cout, cout) + (conv(size, 1, cin, cout) if cin != cout else 0)

    def attn(size, ch):
        n = size * size
        return 4 * 2.0 * n * ch * ch + 2 * 2.0 * n * n * ch

    top = c.level_channels[-1]
    z_ch = c.latent_channels * (1 if c.kind == "vq" else 2)
    # encoder
    s = image_size
    if c.encoder == "patch":
        s //= c.downsample_factor
        f = c.downsample_factor
        total += conv(s, f, c.in_channels, top) + c.blocks_per_level * 2 * conv(s, 1, top, 4 * top)
        total += conv(s, 1, top, z_ch)
    else:
        total += conv(s, 3, c.in_channels, c.channels)
        cin = c.channels
        for i, width in enumerate(c.level_channels):
            for _ in range(c.blocks_per_level):
                total += resnet(s, cin, width) + (attn(s, width) if i in c.attn_levels else 0)
                cin = width
            if i < c.num_levels - 1:
                s_out = s // 2
                total += conv(s_out, 3, width, width)
                s = s_out
        total += 2 * resnet(s, top, top) + (attn(s, top) if c.mid_attention else 0) + conv(s, 3, top, z_ch)
    mid = 2 * resnet(s, top, top) + (attn(s, top) if c.mid_attention else 0)
    total += conv(s, 1, z_ch, c.code_dim if c.kind == "vq" else z_ch)
    if c.kind == "vq":
        total += 2.0 * s * s * c.quantizer.codebook_size * c.quantizer.code_dim
    # decoder
    total += conv(s, 1, c.code_dim, c.latent_channels)
    total += conv(s, 3, c.latent_channels, top) + mid
    cin = top
    for i in reversed(range(c.num_levels)):
        width = c.level_channels[i]
        for _ in range(c.blocks_per_level + 1):
            total += resnet(s, cin, width) + (attn(s, width) if i in c.attn_levels else 0)
            cin = width
        if i > 0:
            s *= 2
            total += conv(s, 3, width, width)
    total += conv(s, 3, c.level_channels[0], c.out_channels)
    return total
