"""A LLaVA-style vision-language model: a vision tower, a projector and a decoder LM (Liu et al. 2023;
PaliGemma, Beyer et al. 2024, is the same shape with one linear projector and a prefix-LM mask).

    images [B, K, H, W, C] ─ ViT ─→ features of layer ℓ [B·K, N(+1), Dv]   (ℓ: vision_feature_layers)
        ─ drop CLS ("default") ─→ [B·K, N, Dv] ─ projector ─→ image features [B, K·N, D]
    ids [B, T] ─ LM.embed ─→ text embeddings [B, T, D]
    splice:  x[b, t] = image_features[b, j]   where ids[b, t] = image_token_id and t is row b's j-th such
             position (image k fills placeholders k·N … k·N + N − 1), else the text embedding
    x ─ LM (causal, or prefix-LM: keys < prefix_len[b] visible to every query) ─→ logits [B, T, V]

    projector  "mlp":    linear_2(act(linear_1(f)))      (LLaVA: Linear → GELU → Linear, with bias)
               "linear": linear(f)                       (PaliGemma: one Linear with bias)

`VLM(cfg)(images, ids, prefix_len=..., ...)` returns `(logits, aux)`; aux holds "image_features"
[B, K·N, D] (projected), "vision_features" [B, K·N, Dv·L] (selected layer(s), before the projector),
"image_mask" [B, T] (True at placeholders), and the LM's aux ("hidden", "cache", "blocks").
The model masks nothing in the loss: image (and prompt) positions leave it through the loss weights
the data pipeline builds (weight 0 where the target is a placeholder or a prompt token).

Vision features (HF indexing of `hidden_states`: index 0 is the stack's input, index i ≥ 1 the
output of block i − 1, so −1 is the last block's output before the final norm):
  vision_feature_layers = (−2,)   LLaVA: the penultimate block's output, no final norm
  vision_feature_layers = (a, b)  layers concatenated on channels (Dv·2 into the projector)
  vision_feature_layers = None    the tower's final-normed output (SigLIP's last_hidden_state: PaliGemma)
  select strategy "default" drops token 0, which must be a CLS token (ViT pool="cls"): with a tower
  without CLS (SigLIP) it would drop a real patch, so that combination is refused; "full" keeps all.

Placeholder count: row b must hold exactly K·N image tokens. With concrete ids (an eager call, or
`check_image_tokens` on host data) a mismatch raises a ValueError naming both numbers; ids traced
under jit cannot be checked (surplus placeholders would repeat the row's last image feature, missing
ones would leave features out), so check the data on the host (`check_image_tokens`) before it
reaches a jitted step; `generate` does.

Multi-crop (Molmo; `multicrop_grid` = g > 0): each row is one image given as its crops
[B, 1 + g², S, S, C] (`mmjax.data.transforms.MultiCrop`: the global view, then the g×g tiles).
Every crop goes through the tower; its patch features [h, w, Dv·L] (CLS dropped) are pooled 2×2 by
`AttentionPool2x2` (query = the window's mean) to [h/2, w/2, Dv·L], put in the placeholder order of
`multicrop_layout` (global view rows, then the tile grid read as one picture) and projected:

    N = (1 + g²) · (h/2) · (w/2) placeholders per row, inside the layout's start / col / end text ids

(the pooling's weights sit under multicrop_pool/; with g = 0 the model has none: the HF-parity path).

Params: vision/... (the ViT), projector/{linear_1, linear_2 | linear}/{kernel, bias} (logical axes
("embed", "mlp") and ("mlp", "embed"), as an MLP's), lm/... (the LM). `generate` decodes with images
through `mmjax.decode.generate` on the LM, with the spliced prompt embeddings and the KV cache.
"""

from __future__ import annotations

import functools
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import config
from mmjax.layers import DenseGeneral, TransformerConfig, get_activation
from mmjax.layers.multicrop import AttentionPool2x2, arrange_multicrop_features
from mmjax.layers.transformer import to_dtype
from mmjax.models.lm import LM, LMConfig
from mmjax.models.vit import ViT, ViTConfig
from mmjax.sharding import constrain


@config
class VLMConfig:
    """A vision tower + projector + decoder LM. Defaults: a toy LLaVA (CLIP-style tower, Llama LM).

    vision: the ViT tower (no classification head). CLIP: pool="cls", pre_norm; SigLIP: pool="none".
    lm: the decoder (mmjax.models.lm.LMConfig); its width D is the projector's output.
    image_token_id: the placeholder id in `ids`; may be ≥ vocab_size (it is never embedded).
    vision_feature_layers: HF hidden_states indices, concatenated on channels; None: the final-normed
      output (module docstring).
    vision_feature_select_strategy: "default" drops the CLS token (needs pool="cls"); "full" keeps all.
    projector: "mlp" (LLaVA) or "linear" (PaliGemma); projector_activation / projector_bias as HF's
      projector_hidden_act / multimodal_projector_bias ("gelu" is the exact erf GELU).
    attention: "causal" (LLaVA) or "prefix" (PaliGemma: image + prompt bidirectional, answer causal;
      every call then passes prefix_len).
    multicrop_grid: 0 = off (one feature per patch, K images per row); g > 0 = each row is one image's
      1 + g² crops, pooled 2×2 and laid out as `multicrop_layout` (module docstring).
    multicrop_pool_heads: heads of the 2×2 attention pooling (they divide Dv·L).
    image_positions: the LM's RoPE positions of the image tokens: "sequence" (LLaVA: one position
      per token, in raster order, so a cell's right neighbour is 1 position on and the one below it
      a row of patches on) or "grid" (Qwen2-VL's M-RoPE: the h×w patch tokens at (p₀ + r, p₀ + c),
      p₀ the first image token's position, text at (p, p); rows and columns are offsets on their own
      axes). "grid" needs lm.rope_2d with lm.encoder.rope_2d_channels="interleaved" (text then turns
      exactly as under 1D RoPE, so a 1D-trained LM reads its text as before), one image per row and
      no multi-crop; positions given to the model are 1D ([B, T]) and made 2D inside.
    """

    vision: ViTConfig = ViTConfig(
        image_size=32, patch_size=8, pool="cls", pre_norm=True, patch_bias=False,
        encoder=TransformerConfig(width=64, depth=2, num_heads=4, mlp_dim=128, activation="quick_gelu",
                                  norm_eps=1e-5))
    lm: LMConfig = LMConfig()
    image_token_id: int = 255
    vision_feature_layers: tuple[int, ...] | None = (-2,)
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    projector: Literal["mlp", "linear"] = "mlp"
    projector_activation: str = "gelu"
    projector_bias: bool = True
    attention: Literal["causal", "prefix"] = "causal"
    multicrop_grid: int = 0
    multicrop_pool_heads: int = 1
    image_positions: Literal["sequence", "grid"] = "sequence"


def check_vlm_config(cfg: VLMConfig) -> None:
    """ValueErrors for configs that cannot work (called by VLM.setup and by the converters)."""
    v = cfg.vision
    if v.num_classes is not None:
        raise ValueError("the VLM's vision tower must have no classification head (vision.num_classes=None)")
    if cfg.vision_feature_select_strategy == "default" and v.pool != "cls":
        raise ValueError(
            f"vision_feature_select_strategy='default' drops token 0 as the CLS token, but this vision tower "
            f"(pool={v.pool!r}) has no CLS token: it would drop a real image patch. Use 'full' (SigLIP towers)")
    if cfg.vision_feature_layers is not None:
        if not cfg.vision_feature_layers:
            raise ValueError("vision_feature_layers is empty; give at least one layer, or None for the "
                             "final-normed output")
        depth = v.encoder.depth
        for layer in cfg.vision_feature_layers:
            if not -(depth + 1) <= layer <= depth:
                raise ValueError(f"vision_feature_layers entry {layer} is out of range for a {depth}-block tower "
                                 f"(HF hidden_states indices: -{depth + 1} … {depth})")
            if layer % (depth + 1) == 0:
                raise ValueError(f"vision_feature_layers entry {layer} is hidden_states[0], the stack's input "
                                 "(embeddings), which mmjax's ViT does not expose; use a block output (≥ 1)")
    if cfg.image_token_id < 0:
        raise ValueError(f"image_token_id must be ≥ 0, got {cfg.image_token_id}")
    if cfg.projector not in ("mlp", "linear"):
        raise ValueError(f"projector must be 'mlp' or 'linear', got {cfg.projector!r}")
    if cfg.attention not in ("causal", "prefix"):
        raise ValueError(f"attention must be 'causal' or 'prefix', got {cfg.attention!r}")
    get_activation(cfg.projector_activation)
    if cfg.image_positions not in ("sequence", "grid"):
        raise ValueError(f"image_positions must be 'sequence' or 'grid', got {cfg.image_positions!r}")
    if cfg.image_positions == "grid":
        lm = cfg.lm
        if not lm.rope_2d or lm.encoder.rope_2d_channels != "interleaved" or lm.learned_positions:
            raise ValueError("image_positions='grid' places image tokens on 2D RoPE positions: set lm.rope_2d=True "
                             "and lm.encoder.rope_2d_channels='interleaved' (M-RoPE: text keeps its 1D rotation), "
                             f"without lm.learned_positions (got rope_2d={lm.rope_2d}, rope_2d_channels="
                             f"{lm.encoder.rope_2d_channels!r}, learned_positions={lm.learned_positions})")
        if cfg.multicrop_grid or (v.pool == "cls" and cfg.vision_feature_select_strategy == "full"):
            raise ValueError("image_positions='grid' lays each image's patch tokens on their h×w grid: not with "
                             "multi-crop, nor with a kept CLS token (vision_feature_select_strategy='full')")
    if cfg.multicrop_grid < 0:
        raise ValueError(f"multicrop_grid must be >= 0 (0 = off), got {cfg.multicrop_grid}")
    if cfg.multicrop_grid:
        grid = v.image_size // v.patch_size
        if grid % 2:
            raise ValueError(f"multi-crop pools 2×2 patches: the tower's {grid}×{grid} patch grid must be even "
                             f"(image_size {v.image_size}, patch_size {v.patch_size})")
        if v.pool == "cls" and cfg.vision_feature_select_strategy == "full":
            raise ValueError("multi-crop pools the patch grid: a kept CLS token has no place in it; use "
                             "vision_feature_select_strategy='default'")
        width = v.encoder.width * (len(cfg.vision_feature_layers) if cfg.vision_feature_layers else 1)
        if cfg.multicrop_pool_heads < 1 or width % cfg.multicrop_pool_heads:
            raise ValueError(f"multicrop_pool_heads={cfg.multicrop_pool_heads} must divide the pooled feature "
                             f"width {width}")


def grid_positions(positions, is_image, width: int):
    """M-RoPE positions [B, T, 2] from 1D positions [B, T] (int) and the placeholder mask [B, T]: text
    at (p, p); the j-th image token of a row at (p₀ + j // width, p₀ + j % width), p₀ the position of
    the row's first image token (one image per row, raster order)."""
    positions = jnp.asarray(positions, jnp.int32)
    j = jnp.cumsum(is_image, axis=1) - 1
    p0 = jnp.min(jnp.where(is_image, positions, jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
    row = jnp.where(is_image, p0 + j // width, positions)
    col = jnp.where(is_image, p0 + j % width, positions)
    return jnp.stack([row, col], axis=-1)


def multicrop_pooled_grid(cfg: VLMConfig) -> int:
    """h/2: the side of one crop's pooled feature grid (multi-crop)."""
    return cfg.vision.image_size // cfg.vision.patch_size // 2


def vlm_multicrop_layout(cfg: VLMConfig, *, start_id: int = 0, end_id: int = 0, col_id: int = 0):
    """The `multicrop_layout` of this model's crops (the ids only matter to build sequences; the
    model reads `feature_index`)."""
    from mmjax.layers.multicrop import multicrop_layout
    h = multicrop_pooled_grid(cfg)
    return multicrop_layout(cfg.multicrop_grid, h, h, image_id=cfg.image_token_id, start_id=start_id,
                            end_id=end_id, col_id=col_id)


def image_tokens_per_image(cfg: VLMConfig) -> int:
    """N: the features (= placeholder tokens) one image gives: (H/P)² patches, + 1 with a CLS kept."""
    v = cfg.vision
    if cfg.multicrop_grid:  # (1 + g²) crops of (h/2)² pooled features
        return (1 + cfg.multicrop_grid ** 2) * multicrop_pooled_grid(cfg) ** 2
    n = (v.image_size // v.patch_size) ** 2
    return n + (1 if v.pool == "cls" and cfg.vision_feature_select_strategy == "full" else 0)


def check_image_tokens(ids, image_token_id: int, tokens_per_image: int, images_per_row: int = 1) -> None:
    """Host-side check on concrete ids [B, T]: every row holds images_per_row · tokens_per_image
    placeholders; raises a ValueError naming row, count and what the images give."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"ids must be [B, T], got shape {ids.shape}")
    counts = (ids == image_token_id).sum(axis=1)
    want = images_per_row * tokens_per_image
    bad = np.flatnonzero(counts != want)
    if bad.size:
        r = int(bad[0])
        images = (f"its {images_per_row} images give {want} features ({tokens_per_image} per image)"
                  if images_per_row != 1 else f"the vision tower gives {tokens_per_image} features per image")
        raise ValueError(f"{int(counts[r])} <image> tokens (id {image_token_id}) in row {r} but {images}; "
                         f"{bad.size} of {ids.shape[0]} rows disagree. Build each row with exactly "
                         f"{want} placeholders (a truncated prompt loses some)")


def splice_image_features(embeds: jax.Array, ids: jax.Array, features: jax.Array, image_id: int) -> jax.Array:
    """Puts features [B, N, D] into embeds [B, T, D] at the placeholder positions of ids [B, T]:
    the k-th placeholder of row b gets features[b, k]; every other position keeps its embedding.

        slot_t = (Σ_{s≤t} [ids_s = P]) − 1,   out_t = features[slot_t] if ids_t = P else embeds_t

    The one splice of every VLM here (single images, K images per row, multi-crop layouts whose
    features `mmjax.layers.multicrop.arrange_multicrop_features` put in placeholder order). Concrete
    ids are checked to hold exactly N placeholders per row (`check_image_tokens`); traced ids cannot be.
    """
    n = features.shape[1]
    if not isinstance(ids, jax.core.Tracer):
        check_image_tokens(ids, image_id, n)
    is_image = ids == image_id
    slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, n - 1)
    gathered = jnp.take_along_axis(features, slot[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)


def _as_image_batch(images) -> jax.Array:
    """[B, H, W, C] (one image per row) or [B, K, H, W, C] → [B, K, H, W, C]."""
    if images.ndim == 4:
        return images[:, None]
    if images.ndim != 5:
        raise ValueError(f"VLM images must be [B, H, W, C] or [B, K, H, W, C] (K images per row), got shape "
                         f"{images.shape}")
    return images


class Projector(nn.Module):
    """Vision features [.., Dv·L] → LM embeddings [.., D]: "mlp" linear_2(act(linear_1(f))), or
    "linear" linear(f) (names as HF's multi_modal_projector, so the converters map them one to one)."""

    cfg: VLMConfig

    @nn.compact
    def __call__(self, f: jax.Array) -> jax.Array:
        c, e = self.cfg, self.cfg.lm.encoder
        dense = lambda axes, name: DenseGeneral(
            e.width, axes, use_bias=c.projector_bias, dtype=to_dtype(e.dtype), param_dtype=to_dtype(e.param_dtype),
            ops=e.ops, name=name)
        if c.projector == "linear":
            return dense(("embed", "mlp"), "linear")(f)
        h = get_activation(c.projector_activation)(dense(("embed", "mlp"), "linear_1")(f))
        h = constrain(h, ("act_batch", "act_len", "act_mlp"))
        return dense(("mlp", "embed"), "linear_2")(h)


class VLM(nn.Module):
    """Vision tower → projector → spliced into the LM's input embeddings (module docstring)."""

    cfg: VLMConfig

    def setup(self):
        check_vlm_config(self.cfg)
        self.vision = ViT(self.cfg.vision)
        self.projector = Projector(self.cfg)
        self.lm = LM(self.cfg.lm)
        if self.cfg.multicrop_grid:
            e = self.cfg.vision.encoder
            self.multicrop_pool = AttentionPool2x2(num_heads=self.cfg.multicrop_pool_heads, dtype=to_dtype(e.dtype),
                                                   param_dtype=to_dtype(e.param_dtype), ops=e.ops)

    def images_per_row(self, images) -> int:
        """K images per row, or 1 with multi-crop (the crops are one image)."""
        return 1 if self.cfg.multicrop_grid else images.shape[1]

    def encode_images(self, images, *, train: bool = False):
        """images [B, H, W, C] or [B, K, H, W, C] → (image features [B, K·N, D], selected vision
        features [B, K·N, Dv·L] before the projector)."""
        c = self.cfg
        images = _as_image_batch(images)
        b, k = images.shape[:2]
        if c.multicrop_grid and k != 1 + c.multicrop_grid ** 2:
            raise ValueError(f"multicrop_grid={c.multicrop_grid} takes 1 + g² = {1 + c.multicrop_grid ** 2} crops "
                             f"per row, got images {images.shape}")
        flat = images.reshape((b * k,) + images.shape[2:])
        _, vaux = self.vision(flat, train=train, return_blocks=c.vision_feature_layers is not None)
        if c.vision_feature_layers is None:
            layers = [vaux["encoded"]]                                  # final-normed, all tokens
        else:
            depth = c.vision.encoder.depth
            layers = [vaux["blocks"][layer % (depth + 1) - 1] for layer in c.vision_feature_layers]
        if c.vision_feature_select_strategy == "default":
            layers = [h[:, 1:] for h in layers]                         # drop CLS (checked: pool="cls")
        f = jnp.concatenate(layers, axis=-1) if len(layers) > 1 else layers[0]   # [B·K, N, Dv·L]
        n = f.shape[1]
        if c.multicrop_grid:  # [B, crops, h, w, Dv·L] → pooled [B, crops, h/2, w/2, ·] → layout order
            side = c.vision.image_size // c.vision.patch_size
            pooled = self.multicrop_pool(f.reshape(b, k, side, side, f.shape[-1]))
            f = arrange_multicrop_features(pooled, vlm_multicrop_layout(c))
        else:
            f = f.reshape(b, k * n, f.shape[-1])
        f = constrain(f, ("act_batch", "act_len", None))
        out = self.projector(f).astype(to_dtype(c.lm.encoder.dtype))
        return constrain(out, ("act_batch", "act_len", "act_embed")), f

    def embed(self, images, ids, *, train: bool = False):
        """(images, ids [B, T]) → (spliced input embeddings [B, T, D], aux with "image_features",
        "vision_features", "image_mask")."""
        c = self.cfg
        images = _as_image_batch(images)
        if ids.ndim != 2 or ids.shape[0] != images.shape[0]:
            raise ValueError(f"ids must be [B, T] with B = {images.shape[0]} (the images' batch), got {ids.shape}")
        if not isinstance(ids, jax.core.Tracer):
            check_image_tokens(ids, c.image_token_id, image_tokens_per_image(c), self.images_per_row(images))
        is_image = ids == c.image_token_id                                          # [B, T]
        # Placeholders never reach the embedding table (the id may lie outside the vocabulary).
        text = self.lm.embed(jnp.where(is_image, 0, ids))                           # [B, T, D]
        feats, vision_feats = self.encode_images(images, train=train)              # [B, K·N, D]
        x = splice_image_features(text, ids, feats, c.image_token_id)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        return x, {"image_features": feats, "vision_features": vision_feats, "image_mask": is_image}

    def __call__(self, images, ids, *, prefix_len=None, positions=None, kv_valid=None, segment_ids=None,
                 cache=None, cache_index=None, train: bool = False, return_blocks: bool = False):
        """images [B, H, W, C] or [B, K, H, W, C]; ids int [B, T] with K·N image placeholders per row;
        prefix_len int or [B] (attention="prefix" only, and then required except in `init`: image +
        prompt tokens); positions, kv_valid, segment_ids (packed turns after a shared image prefix),
        cache, cache_index as `LM` → (logits [B, T, V], aux)."""
        c = self.cfg
        if c.attention == "prefix" and prefix_len is None:
            if not self.is_initializing():  # init only makes params; a forward without a prefix would leak
                raise ValueError("this VLM is a prefix-LM (attention='prefix'): pass prefix_len, the number of "
                                 "image + prompt tokens per row (attended bidirectionally)")
            prefix_len = ids.shape[1]
        if c.attention == "causal" and prefix_len is not None:
            raise ValueError("this VLM is causal (attention='causal', LLaVA); prefix_len is for attention='prefix'")
        x, aux = self.embed(images, ids, train=train)
        if c.image_positions == "grid":
            if self.images_per_row(_as_image_batch(images)) != 1:
                raise ValueError("image_positions='grid' takes one image per row")
            if positions is None:
                positions = jnp.arange(ids.shape[1], dtype=jnp.int32)[None] + (cache_index or 0)
            positions = grid_positions(jnp.broadcast_to(positions, ids.shape), aux["image_mask"],
                                       c.vision.image_size // c.vision.patch_size)
        logits, lm_aux = self.lm(x, positions=positions, kv_valid=kv_valid, prefix_len=prefix_len,
                                 segment_ids=segment_ids, cache=cache, cache_index=cache_index, train=train,
                                 return_blocks=return_blocks)
        aux.update(lm_aux)
        return logits, aux


def generate(model: VLM, params, images, ids, *, max_new_tokens: int, lengths=None, prefix_len=None,
             mesh=None, rules=None, **sampling):
    """Generates with images: the spliced prompt embeddings go to `mmjax.decode.generate` on the LM
    (prefill + KV-cache steps on device; generated tokens are embedded by the LM as text).

    Args:
      model, params: a VLM and its params (plain or boxed, {"params": ...} or the tree).
      images: [B, H, W, C] or [B, K, H, W, C].
      ids: int [B, T] prompts, right-padded; row b's prompt is ids[b, :lengths[b]] (default T) and
        holds its K·N image placeholders (checked on the host).
      prefix_len: attention="prefix" only: image + prompt tokens per row (int or [B]), bidirectional
        during the prefill; default: the whole prompt (PaliGemma's prefix is image + BOS + prompt + "\\n").
      max_new_tokens, **sampling: as `mmjax.decode.generate` (temperature, top_k, top_p, rng, eos_id,
        pad_id, token_range, disallowed_ids, cache_len, cache_dtype, tokenizer).
    Returns:
      `mmjax.decode.Generation`: tokens [B, max_new_tokens], lengths [B], sequences (generated ids).
    """
    from mmjax.decode import generate as lm_generate  # decode imports the models package

    c = model.cfg
    ids = np.asarray(ids)
    images = _as_image_batch(jnp.asarray(images))
    if ids.ndim != 2:
        raise ValueError(f"ids must be [B, T], got shape {ids.shape}")
    lens = np.full((ids.shape[0],), ids.shape[1], np.int32) if lengths is None else np.asarray(lengths, np.int32)
    in_prompt = np.arange(ids.shape[1])[None, :] < lens[:, None]
    check_image_tokens(np.where(in_prompt, ids, -1), c.image_token_id, image_tokens_per_image(c),
                       1 if c.multicrop_grid else images.shape[1])
    if c.attention == "prefix":
        prefix_len = lens if prefix_len is None else prefix_len
    elif prefix_len is not None:
        raise ValueError("this VLM is causal (attention='causal', LLaVA); prefix_len is for attention='prefix'")
    variables = nn.meta.unbox(params)
    variables = variables if set(variables) == {"params"} else {"params": variables}
    # Pad slots past a row's length may hold anything; make them text so the splice ignores them.
    ids = np.where(in_prompt, ids, 0 if c.image_token_id != 0 else 1).astype(np.int32)
    embeds, _ = _embed_fn(model)(variables, images, ids)
    if c.image_positions == "grid":  # the prompt's image slots on their grid; generated tokens are text
        if images.shape[1] != 1:
            raise ValueError("image_positions='grid' takes one image per row")
        pos = sampling.pop("positions", None)
        pos = np.arange(ids.shape[1] + max_new_tokens, dtype=np.int32) if pos is None else np.asarray(pos)
        pos = np.broadcast_to(pos, (ids.shape[0], pos.shape[-1]))
        mask = np.zeros(pos.shape, bool)
        mask[:, :ids.shape[1]] = ids == c.image_token_id
        sampling["positions"] = np.asarray(grid_positions(pos, mask, c.vision.image_size // c.vision.patch_size))
    return lm_generate(LM(c.lm), variables["params"]["lm"], embeds, lengths=lens, max_new_tokens=max_new_tokens,
                       prefix_len=prefix_len, mesh=mesh, rules=rules, **sampling)


@functools.lru_cache(maxsize=16)
def _embed_fn(model: VLM):
    """One jitted `VLM.embed` per model (the ids were checked on the host)."""
    return jax.jit(lambda v, images, ids: model.apply(v, images, ids, method=VLM.embed))


__all__ = ["VLM", "Projector", "VLMConfig", "check_image_tokens", "check_vlm_config", "generate", "grid_positions",
           "image_tokens_per_image", "multicrop_pooled_grid", "vlm_multicrop_layout"]
