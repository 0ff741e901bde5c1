"""Decoder-only language model (Llama-style), with an explicit KV cache for generation.

    ids [B, T] → embed [B, T, D] (× embed_scale: Gemma's √D) (or precomputed embeddings [B, T, D], e.g.
      image features spliced among text tokens by a VLM) → causal pre-norm Transformer (RMSNorm, SwiGLU, RoPE, GQA)
      → final norm = aux["hidden"] [B, T, D] → head (or embeddingᵀ when tied) → logits [B, T, V]

API (stable; mmjax/decode.py and the LM task build on it):

    cfg = LMConfig(vocab_size=V, max_len=S_max, encoder=TransformerConfig(...), tie_embeddings=...)
    model = LM(cfg)
    params = model.init(rng, ids)["params"]                 # ids: int [B, T] (boxed with logical names)
    logits, aux = model.apply({"params": params}, inputs, *, positions=None, kv_valid=None,
                              prefix_len=None, segment_ids=None, cache=None, cache_index=None,
                              train=False, return_blocks=False)

  inputs      int token ids [B, T] (checked against vocab_size when concrete) or float embeddings
              [B, T, D] (D = encoder.width), e.g. from `model.apply(v, ids, method=LM.embed)`.
  positions   int [B, T] RoPE positions; default arange(T) (+ cache_index with a cache). For a
              left-padded batch pass cumsum(valid) − 1 per row. With cfg.rope_2d also [B, T, 2].
  kv_valid    bool, False for padding keys: [B, T] without a cache, [B, S] (every cache slot) with one.
  prefix_len  int scalar or [B]: prefix-LM (keys < prefix_len visible to every query), counted in
              the same index space as the keys (cache slots with a cache).
  segment_ids int [B, T], no cache: packed sequences; a token sees its own segment and segment 0,
              the prefix all segments share (`make_attention_mask`). Give each segment its own
              positions (e.g. restarting after the shared prefix).
  cache       from `init_cache(cfg, batch_size, max_len, dtype)` (zeros) or a previous call's
              aux["cache"]; cache_index: int32 scalar t, the slot of this chunk's first token.
              The chunk's k/v are written at slots [t, t+T) and its queries attend to slots ≤ own.
  returns     logits [B, T, V] (compute dtype) and aux: "hidden" [B, T, D] (final-normed),
              "cache" (the updated cache, when one was passed), "blocks" [depth, B, T, D] (asked).

  Also: `model.apply(v, ids, method=LM.embed)` → [B, T, D]; `model.apply(v, hidden, method=LM.logits)`
  → [B, T, V]. A concrete cache_index is checked (t + T ≤ S); a traced one cannot be (the
  cache write would clamp), so a jitted decode loop must keep its bounds. The loss for training
  is `mmjax.objectives.lm.lm_cross_entropy(logits, targets, weights, z_loss=...)`.

Masks are built with the one helper `make_attention_mask`: causal (q_offset = cache_index with a
cache), optionally prefix-LM, padding keys from kv_valid, and segments.

Generation with a cache, for a batch of prompts of different lengths: LEFT-pad them to T0 so
every row writes at the same slot (as HF does), then

    cache = init_cache(cfg, B, S)                                   # S ≥ T0 + new tokens
    valid = arange(S) >= pad[:, None]                               # [B, S], pad = T0 − len
    pos = clip(cumsum(valid[:, :T0]) − 1, 0)                        # [B, T0]
    logits, aux = apply(params, prompt, positions=pos, kv_valid=valid, cache=cache, cache_index=0)
    next: apply(params, tok [B, 1], positions=pos_last + 1, kv_valid=valid,
                cache=aux["cache"], cache_index=T0), then T0 + 1, ...

The cache is a plain pytree (layout in mmjax/layers/transformer.py): {"block_i": {"k", "v"}} of
[B, Hkv, S, Dh] (head-major), or {"k", "v"} of [depth, B, Hkv, S, Dh] with scan_layers. `cache_logical_axes(cfg)`
names its axes and `cache_shardings(cfg, mesh)` turns them into NamedShardings (batch over
data × fsdp, kv heads over tensor), so it shards like the activations.

Params (logical names → mmjax.sharding): token_embedding [V, D] ("vocab", "embed"); encoder/...
(the shared Transformer: block_i or scanned blocks/block, final_norm); head/kernel [D, V]
("embed", "vocab"), absent when tie_embeddings (logits = hidden · embeddingᵀ); with
learned_positions, position_embedding (or row_embedding and col_embedding) [max_len, D] (None, "embed").
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from mmjax import ops
from mmjax.config import ConfigError, config
from mmjax.layers import DenseGeneral, Transformer, TransformerConfig
from mmjax.layers.transformer import init_kv_cache, kv_cache_logical_axes, to_dtype
from mmjax.models.text import check_token_ids
from mmjax.ops import AttentionMask
from mmjax.sharding import constrain, logical_to_spec


@config
class LMConfig:
    """A decoder LM. The defaults are Llama's choices at a toy size.

    vocab_size: V.
    max_len: the longest sequence (and KV cache) the model is meant for (HF max_position_embeddings);
      longer inputs are refused. RoPE itself has no table, so this is a stated limit, not a size.
    encoder: the shared transformer stack (causal here; the field name is the one every tower uses).
    tie_embeddings: the output head is the token embedding transposed (no head params).
    rope_2d: positions may be [B, T, 2] (row, col) for tokens on an image grid, rotated as
      encoder.rope_2d_channels says: "halves" (the first half of every head's channels by the row,
      the second by the column, `apply_rope_2d`) or "interleaved" (M-RoPE, `apply_mrope`: (p, p)
      rotates as 1D RoPE at p); a [B, T] position p is used as (p, p). Needs encoder.rope_base and
      a head dim divisible by 4.
    embed_scale: token embeddings are multiplied by it in `embed` (Gemma: √D, rounded to the compute
      dtype as HF does); float embeddings passed as inputs are used as given. 1.0: no scaling.
    zero_init_head: the untied output head starts at zero (LlamaGen): every token starts equally
      likely, so the first steps do not fight a random head's preferences.
    learned_positions: also add learned absolute position embeddings to the inputs (beside RoPE):
      table[p] [max_len, D], or with rope_2d row[p_0] + col[p_1] (DALL-E's row and column
      embeddings): a token on an image grid then knows its cell, which relative RoPE alone does not
      tell it (the words that describe a cell sit at no fixed distance from it).
    """

    vocab_size: int = 256
    max_len: int = 2048
    encoder: TransformerConfig = TransformerConfig(
        width=64, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=172, activation="swiglu", norm="rmsnorm",
        norm_eps=1e-6, use_bias=False, rope_base=10_000.0)
    tie_embeddings: bool = False
    rope_2d: bool = False
    embed_scale: float = 1.0
    zero_init_head: bool = False
    learned_positions: bool = False

    def __post_init__(self):
        if self.zero_init_head and self.tie_embeddings:
            raise ConfigError("LMConfig.zero_init_head needs an untied head (tie_embeddings=False): a zero "
                             "embedding would make every token the same")


def init_cache(cfg: LMConfig, batch_size: int, max_len: int | None = None, dtype="float32") -> dict:
    """A zero KV cache for `LM(cfg)`: per layer k, v [B, Hkv, S, Dh] with S = max_len (default
    cfg.max_len), stacked on a leading [depth] axis when cfg.encoder.scan_layers. dtype: a name
    ("float32", "bfloat16") or a jnp dtype."""
    max_len = cfg.max_len if max_len is None else max_len
    if max_len > cfg.max_len:
        raise ValueError(f"a cache of {max_len} slots is longer than the model's max_len {cfg.max_len}")
    return init_kv_cache(cfg.encoder, batch_size, max_len, dtype)


def cache_logical_axes(cfg: LMConfig) -> dict:
    """The cache's tree with a tuple of logical axis names at every leaf."""
    return kv_cache_logical_axes(cfg.encoder)


def cache_shardings(cfg: LMConfig, mesh: Mesh, batch_size: int, max_len: int, rules=None) -> dict:
    """NamedShardings for `init_cache(cfg, batch_size, max_len)` on `mesh` (the logical rules, with
    their divisibility fallback): pass them as jit in/out shardings or to `jax.device_put`."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, batch_size, max_len))
    mesh_shape = dict(mesh.shape)
    return jax.tree.map(lambda names, s: NamedSharding(mesh, logical_to_spec(names, s.shape, mesh_shape, rules)),
                        cache_logical_axes(cfg), shapes, is_leaf=lambda x: isinstance(x, tuple))


class LM(nn.Module):
    """Decoder LM; see the module docstring for the call signature and the cache protocol."""

    cfg: LMConfig

    def setup(self):
        c, e = self.cfg, self.cfg.encoder
        if c.rope_2d and e.rope_base is None:
            raise ValueError("LMConfig.rope_2d needs encoder.rope_base (2D RoPE is a rotary embedding)")
        pdt = to_dtype(e.param_dtype)
        self.token_embedding = self.param(
            "token_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (c.vocab_size, e.width), pdt)
        self.encoder = Transformer(e)
        if c.learned_positions:
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed"))
            names = ("row_embedding", "col_embedding") if c.rope_2d else ("position_embedding",)
            self.position_tables = [self.param(n, init, (c.max_len, e.width), pdt) for n in names]
        if not c.tie_embeddings:
            init = nn.initializers.zeros if c.zero_init_head else nn.initializers.normal(0.02)
            self.head = DenseGeneral(c.vocab_size, ("embed", "vocab"), use_bias=False, dtype=to_dtype(e.dtype),
                                     param_dtype=pdt, kernel_init=init, ops=e.ops)

    def embed(self, ids: jax.Array) -> jax.Array:
        """Token ids [B, T] → embeddings [B, T, D] (compute dtype), × cfg.embed_scale when it is not 1."""
        check_token_ids(ids, self.cfg.vocab_size, self.cfg.max_len)
        dt = to_dtype(self.cfg.encoder.dtype)
        x = jnp.take(self.token_embedding, ids, axis=0).astype(dt)
        if self.cfg.embed_scale != 1.0:
            x = x * jnp.asarray(self.cfg.embed_scale, dt)
        return constrain(x, ("act_batch", "act_len", "act_embed"))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden states [B, T, D] → logits [B, T, V] (the head, or embeddingᵀ if tied)."""
        e = self.cfg.encoder
        dt = to_dtype(e.dtype)
        if self.cfg.tie_embeddings:  # the embedding [V, D] is the head, stored output-major
            out = ops.dense_output_major(hidden.astype(dt), self.token_embedding.astype(dt), policy=e.ops)
        else:
            out = self.head(hidden)
        return constrain(out, ("act_batch", "act_len", "act_vocab"))

    def __call__(self, inputs, *, positions=None, kv_valid=None, prefix_len=None, segment_ids=None, cache=None,
                 cache_index=None, train: bool = False, return_blocks: bool = False):
        e = self.cfg.encoder
        x = self._input_embeddings(inputs)
        b, t, _ = x.shape
        if (cache is None) != (cache_index is None):
            raise ValueError("pass cache and cache_index together (cache_index: the slot of this chunk's first "
                             "token), or neither")
        if segment_ids is not None and (cache is not None or jnp.shape(segment_ids) != (b, t)):
            raise ValueError(f"segment_ids must be [B, T] = {(b, t)} and come without a KV cache (packed "
                             f"training sequences), got shape {jnp.shape(segment_ids)}"
                             f"{' with a cache' if cache is not None else ''}")
        offset = 0 if cache is None else cache_index
        if cache is not None:
            kv_len = _cache_len(cache, e.scan_layers)
            if not isinstance(cache_index, jax.core.Tracer):
                if np.ndim(cache_index) != 0:
                    raise ValueError(f"cache_index must be a scalar (rows share it; left-pad prompts), got shape "
                                     f"{np.shape(cache_index)}")
                if int(cache_index) < 0 or int(cache_index) + t > kv_len:
                    raise ValueError(f"a chunk of {t} tokens at cache_index {int(cache_index)} overflows the KV "
                                     f"cache of {kv_len} slots; make a longer cache (init_cache max_len)")
        else:
            kv_len = t
        positions = self._positions(positions, b, t, offset)
        if self.cfg.learned_positions:
            idx = jnp.clip(positions, 0, self.cfg.max_len - 1)
            idx = [idx[..., i] for i in range(2)] if self.cfg.rope_2d else [idx]
            for table, p in zip(self.position_tables, idx):
                x = x + jnp.take(table, p, axis=0).astype(x.dtype)
        if kv_valid is not None:
            kv_valid = jnp.asarray(kv_valid)
            if kv_valid.shape != (b, kv_len):
                where = "every cache slot" if cache is not None else "every token"
                raise ValueError(f"kv_valid must be [B, {'S' if cache is not None else 'T'}] = {(b, kv_len)} "
                                 f"({where}), got {kv_valid.shape}")
            kv_valid = kv_valid.astype(bool)
        mask = AttentionMask(causal=True, prefix_len=prefix_len, kv_valid=kv_valid, q_offset=offset,
                             segment_ids=None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32))
        hidden, aux = self.encoder(x, mask=mask, positions=positions, deterministic=not train,
                                   return_blocks=return_blocks, cache=cache, cache_index=cache_index)
        aux["hidden"] = hidden
        return self.logits(hidden), aux

    def _input_embeddings(self, inputs) -> jax.Array:
        w = self.cfg.encoder.width
        if jnp.issubdtype(inputs.dtype, jnp.integer):
            return self.embed(inputs)
        if not jnp.issubdtype(inputs.dtype, jnp.floating):
            raise TypeError(f"LM inputs must be int token ids [B, T] or float embeddings [B, T, D], got {inputs.dtype}")
        if inputs.ndim != 3 or inputs.shape[-1] != w:
            raise ValueError(f"LM embeddings must be [B, T, D={w}], got shape {inputs.shape}")
        if inputs.shape[1] > self.cfg.max_len:
            raise ValueError(f"{inputs.shape[1]} embeddings exceed the model's max_len {self.cfg.max_len}")
        x = inputs.astype(to_dtype(self.cfg.encoder.dtype))
        return constrain(x, ("act_batch", "act_len", "act_embed"))

    def _positions(self, positions, b, t, offset):
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + offset, (b, t))
        positions = jnp.asarray(positions)
        if not jnp.issubdtype(positions.dtype, jnp.integer):
            raise TypeError(f"positions must be integers, got {positions.dtype}")
        if self.cfg.rope_2d:
            if positions.shape == (b, t):
                positions = jnp.stack([positions, positions], axis=-1)
            if positions.shape != (b, t, 2):
                raise ValueError(f"positions must be [B, T] or [B, T, 2] = {(b, t, 2)} with rope_2d, "
                                 f"got {positions.shape}")
        elif positions.shape != (b, t):
            raise ValueError(f"positions must be [B, T] = {(b, t)}, got {positions.shape}"
                             + (" (grid positions [B, T, 2] need LMConfig.rope_2d)" if positions.ndim == 3 else ""))
        return positions


def _cache_len(cache, scanned: bool) -> int:
    """S, the number of slots of a cache made by init_cache (errors on other trees come later)."""
    try:
        leaf = cache["k"] if scanned else next(iter(cache.values()))["k"]
    except (KeyError, TypeError, StopIteration, AttributeError):
        raise ValueError("the KV cache does not have the layout of init_cache(cfg, ...) for this model "
                         f"(scan_layers={scanned})") from None
    return int(leaf.shape[3 if scanned else 2])  # [depth,] B, Hkv, S, Dh


def lm_forward_flops(cfg: LMConfig, seq_len: int) -> float:
    """Forward FLOPs for one sequence of `seq_len` tokens, a multiply-add counting 2 (matmuls only):

        per block   2 · T · (D·H·Dh [q] + 2·D·Hkv·Dh [k, v] + H·Dh·D [out] + 3·D·M [SwiGLU: gate, up, down]
                             or 2·D·M [plain MLP])  +  2 · 2 · T² · H · Dh [QKᵀ and AV, the full T×T
                             square: the XLA kernel computes it all and masks; halve it to count only
                             the causal half]
        head        2 · T · D · V   (tied or not; the embedding lookup is not a matmul)

    Norms, RoPE, softmax and activations are left out; training is 3× forward.
    """
    e = cfg.encoder
    t, d, m = seq_len, e.width, e.mlp_dim or 4 * e.width
    h = e.num_heads
    hkv = e.num_kv_heads or h
    dh = e.head_dim or d // h
    proj = 2 * d * h * dh + 2 * d * hkv * dh
    mlp = (3 if e.activation in ("swiglu", "geglu") else 2) * d * m
    flops = e.depth * (2 * t * (proj + mlp) + 4 * t * t * h * dh)
    flops += 2 * t * d * cfg.vocab_size
    return float(flops)
