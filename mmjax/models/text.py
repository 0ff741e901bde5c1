"""Text tower: token + position embeddings → the shared transformer stack → one vector per text.

    ids [B, L] → embed [B, L, D] + positions → Transformer (causal for CLIP, full for SigLIP)
      → pool: "eot_argmax" (CLIP: the position of the highest id, which is EOT in OpenAI's vocab),
              "eos" (the first `eos_id`), "last", "first", "mean" (over valid tokens), "map"

`TextTransformer(cfg)(ids, valid=None)` returns `(pooled [B, D], aux)` with aux["tokens"] the
normed token states [B, L, D] and aux["blocks"] when asked. Padding positions (valid=False) are
masked out of attention as keys; with a causal mask they never influence earlier tokens anyway.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import config
from mmjax.layers import LearnedPosEmb, Transformer, TransformerConfig
from mmjax.layers.transformer import to_dtype
from mmjax.models.vit import MapHead
from mmjax.ops import AttentionMask
from mmjax.sharding import constrain

TextPool = Literal["eot_argmax", "eos", "last", "first", "mean", "map"]
TextPosEmb = Literal["learned", "none"]


@config
class TextConfig:
    vocab_size: int = 49408
    max_len: int = 77
    encoder: TransformerConfig = TransformerConfig(width=512, depth=12, num_heads=8, mlp_dim=2048,
                                                   activation="quick_gelu", norm_eps=1e-5)
    causal: bool = True
    pool: TextPool = "eot_argmax"
    eos_id: int | None = None  # for pool="eos"
    # "none": no position embedding. With encoder depth 0 and pool="mean" the tower is then a bag of
    # tokens, mean(LN(e_tok)) → projection: each word adds the same vector wherever it stands, so a
    # short prompt ("a circle") lands where the full captions' word vectors point.
    posemb: TextPosEmb = "learned"


def check_token_ids(ids, vocab_size: int, max_len: int) -> None:
    """Host-side check of concrete ids (a traced array is only checked for shape)."""
    if ids.ndim != 2:
        raise ValueError(f"text ids must be [B, L], got shape {ids.shape}")
    if ids.shape[1] > max_len:
        raise ValueError(f"text of length {ids.shape[1]} is longer than the position table ({max_len}); "
                         "truncate it in the tokenizer (max_text_len) or use a model with longer positions")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"text ids must be integers, got {ids.dtype}")
    if not isinstance(ids, jax.core.Tracer) and ids.size:
        # numpy, not jnp: under a jit that captured the ids as a constant, jnp.min would be traced.
        values = np.asarray(ids)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token ids out of range [0, {vocab_size}): min {lo}, max {hi}; the "
                             "tokenizer and the model's vocabulary do not match")


class TextTransformer(nn.Module):
    cfg: TextConfig

    @nn.compact
    def __call__(self, ids, *, valid=None, train: bool = False, return_blocks: bool = False):
        c, e = self.cfg, self.cfg.encoder
        check_token_ids(ids, c.vocab_size, c.max_len)
        dt, pdt = to_dtype(e.dtype), to_dtype(e.param_dtype)
        embed = self.param("token_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")), (c.vocab_size, e.width), pdt)
        x = jnp.take(embed, ids, axis=0).astype(dt)
        if c.posemb == "learned":
            x = LearnedPosEmb(c.max_len, param_dtype=pdt, name="posemb")(_pad_to(x, c.max_len))[:, : ids.shape[1]]
        elif c.posemb != "none":
            raise ValueError(f"unknown text posemb {c.posemb!r}; expected 'learned' or 'none'")
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        mask = AttentionMask(causal=c.causal, kv_valid=None if valid is None else jnp.asarray(valid, bool))
        x, aux = Transformer(e, name="encoder")(x, mask=mask, deterministic=not train, return_blocks=return_blocks)
        aux["tokens"] = x
        b = jnp.arange(ids.shape[0])
        if c.pool == "eot_argmax":
            pooled = x[b, jnp.argmax(ids, axis=-1)]
        elif c.pool == "eos":
            if c.eos_id is None:
                raise ValueError("pool='eos' needs TextConfig.eos_id")
            pooled = x[b, jnp.argmax(ids == c.eos_id, axis=-1)]  # the first EOS (0 if none)
        elif c.pool == "last":
            pooled = x[:, -1]
        elif c.pool == "first":
            pooled = x[:, 0]
        elif c.pool == "mean":
            w = jnp.ones(ids.shape, x.dtype) if valid is None else valid.astype(x.dtype)
            pooled = jnp.einsum("bld,bl->bd", x, w) / jnp.maximum(w.sum(-1, keepdims=True), 1)
        elif c.pool == "map":
            pooled = MapHead(e, name="map_head")(x)
        else:
            raise ValueError(f"unknown text pool {c.pool!r}")
        return pooled, aux


def _pad_to(x, length):
    """Pads [B, L, D] to [B, length, D] so a learned table of `length` positions can be added."""
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0)))
