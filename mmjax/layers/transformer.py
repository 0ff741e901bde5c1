"""The pre-LN transformer stack every tower is built from, with optional nn.scan and remat.

    x = x + Attn(Norm(x));  x = x + Mlp(Norm(x))      (repeated `depth` times, then a final Norm)

With `scan_layers` the `depth` blocks are one `nn.scan` over stacked params (leading "layers" axis):
compile time stops growing with depth. `remat` trades recomputation for activation memory.

KV cache (decoders): `Transformer(cfg)(x, cache=c, cache_index=t, mask=m)` threads one cache per
block through the stack (see mmjax/layers/attention.py for one layer's {"k", "v"}) and returns it
as aux["cache"]. The stack's cache has the layout of its params:

    unscanned  {"block_0": {"k": [B, Hkv, S, Dh], "v": ...}, "block_1": ..., ...}
    scanned    {"k": [depth, B, Hkv, S, Dh], "v": [depth, B, Hkv, S, Dh]}  (an nn.scan input/output)

(head-major: the layout the cached attention matmuls read without a per-step transpose).

`init_kv_cache(cfg, batch, max_len)` makes a zero one and `kv_cache_logical_axes(cfg)` names its axes.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import config
from mmjax.layers.attention import CACHE_AXES, Attention
from mmjax.layers.mlp import Mlp
from mmjax.layers.norms import Norm
from mmjax.ops import OpsPolicy
from mmjax.sharding import constrain

RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(DTYPES)}")
    return DTYPES[name]


@config
class TransformerConfig:
    width: int = 192
    depth: int = 12
    num_heads: int = 3
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_dim: int | None = None  # None → 4·width
    activation: str = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-6
    use_bias: bool = True
    qk_norm: Literal["layernorm", "rmsnorm"] | None = None
    rope_base: float | None = None
    rope_2d_channels: Literal["halves", "interleaved"] = "halves"  # [B, T, 2] positions: see Attention
    dropout: float = 0.0
    final_norm: bool = True
    scan_layers: bool = False
    remat: RematPolicy = "none"
    dtype: str = "float32"  # compute dtype (bf16: mixed precision; norms, softmax and losses stay fp32)
    param_dtype: str = "float32"
    ops: OpsPolicy = OpsPolicy()  # which implementations run (mmjax.ops): in the config, so in every trace


class Block(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, mask=None, positions=None, deterministic=True, cache=None, cache_index=None):
        """x [B, T, D] → [B, T, D]; with a layer cache ({"k", "v"}) → ([B, T, D], new cache)."""
        c = self.cfg
        dt, pdt = to_dtype(c.dtype), to_dtype(c.param_dtype)
        norm = lambda name: Norm(c.norm, c.norm_eps, dtype=dt, param_dtype=pdt, ops=c.ops, name=name)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        y = Attention(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                      use_bias=c.use_bias, rope_base=c.rope_base, rope_2d_channels=c.rope_2d_channels,
                      qk_norm=c.qk_norm, norm_eps=c.norm_eps,
                      dtype=dt, param_dtype=pdt, ops=c.ops, name="attn")(
            norm("norm1")(x), mask=mask, positions=positions, deterministic=deterministic, cache=cache,
            cache_index=cache_index)
        if cache is not None:
            y, cache = y
        x = x + nn.Dropout(c.dropout)(y, deterministic=deterministic)
        y = Mlp(c.mlp_dim or 4 * c.width, c.activation, use_bias=c.use_bias, dropout=c.dropout,
                dtype=dt, param_dtype=pdt, ops=c.ops, name="mlp")(norm("norm2")(x), deterministic=deterministic)
        x = x + nn.Dropout(c.dropout)(y, deterministic=deterministic)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        return x if cache is None else (x, cache)


class _ScanBlock(nn.Module):
    """Block with the (carry, xs) → (carry, ys) signature nn.scan wants: the carry is the hidden
    state; the layer's cache slice is scanned in, and ys = (block output, updated cache slice)."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, mask, positions, deterministic, cache, cache_index):
        x = Block(self.cfg, name="block")(x, mask, positions, deterministic, cache, cache_index)
        if cache is not None:
            x, cache = x
        return x, (x, cache)


class Transformer(nn.Module):
    """x: [B, N, D] → ([B, N, D], aux). aux["blocks"]: [depth, B, N, D] when return_blocks;
    aux["cache"]: the updated KV cache when `cache` (and `cache_index`) are given (module docstring)."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, *, mask=None, positions=None, deterministic=True, return_blocks=False,
                 cache=None, cache_index=None):
        c = self.cfg
        if x.shape[-1] != c.width:
            raise ValueError(f"transformer width is {c.width} but the input has {x.shape[-1]} channels")
        if cache is not None:
            _check_cache_layout(cache, c)
            if cache_index is None:
                raise ValueError("a KV cache needs cache_index (the slot where this chunk is written)")
        aux = {}
        block_cls = _ScanBlock if c.scan_layers else Block
        if c.remat != "none":
            # static_argnums counts `self` as 0: argument 4 is `deterministic`.
            block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers,
                                 static_argnums=(4,))
        if c.scan_layers:
            stack = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast), length=c.depth,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, (outs, new_cache) = stack(c, name="blocks")(x, mask, positions, deterministic, cache, cache_index)
            if return_blocks:
                aux["blocks"] = outs
        else:
            outs, new_cache = [], {}
            for i in range(c.depth):
                name = f"block_{i}"
                x = block_cls(c, name=name)(x, mask, positions, deterministic,
                                            None if cache is None else cache[name], cache_index)
                if cache is not None:
                    x, new_cache[name] = x
                outs.append(x)
            if return_blocks:
                aux["blocks"] = jnp.stack(outs)
        if cache is not None:
            aux["cache"] = new_cache
        if c.final_norm:
            x = Norm(c.norm, c.norm_eps, dtype=to_dtype(c.dtype), param_dtype=to_dtype(c.param_dtype),
                     ops=c.ops, name="final_norm")(x)
        return x, aux


def kv_cache_head_shape(cfg: TransformerConfig) -> tuple[int, int]:
    """(Hkv, Dh) of every layer's cache."""
    return cfg.num_kv_heads or cfg.num_heads, cfg.head_dim or cfg.width // cfg.num_heads


def init_kv_cache(cfg: TransformerConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """A zero KV cache for the stack, in the layout of its params (module docstring):
    [B, Hkv, S=max_len, Dh] per layer, stacked on a leading [depth] axis when cfg.scan_layers."""
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"a KV cache needs batch_size >= 1 and max_len >= 1, got {batch_size}, {max_len}")
    hkv, dh = kv_cache_head_shape(cfg)
    dtype = to_dtype(dtype) if isinstance(dtype, str) else dtype
    if cfg.scan_layers:
        shape = (cfg.depth, batch_size, hkv, max_len, dh)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    shape = (batch_size, hkv, max_len, dh)
    return {f"block_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for i in range(cfg.depth)}


def kv_cache_logical_axes(cfg: TransformerConfig) -> dict:
    """Logical axis names of every leaf of `init_kv_cache(cfg, ...)` (same tree, tuples as leaves),
    for `mmjax.sharding.logical_to_spec`: batch over (data, fsdp), kv heads over tensor."""
    if cfg.scan_layers:
        return {"k": ("layers", *CACHE_AXES), "v": ("layers", *CACHE_AXES)}
    return {f"block_{i}": {"k": CACHE_AXES, "v": CACHE_AXES} for i in range(cfg.depth)}


def _check_cache_layout(cache, cfg: TransformerConfig) -> None:
    """A clear error for a cache made for another stack (depth, scanned or not)."""
    if not isinstance(cache, dict):
        raise TypeError(f"the KV cache must be a dict (see init_kv_cache), got {type(cache).__name__}")
    if cfg.scan_layers:
        ok = set(cache) == {"k", "v"} and all(getattr(cache[n], "ndim", 0) == 5 and cache[n].shape[0] == cfg.depth
                                               for n in ("k", "v"))
        want = f"{{'k', 'v'}} stacked as [depth={cfg.depth}, B, Hkv, S, Dh] (scan_layers=True)"
    else:
        ok = set(cache) == {f"block_{i}" for i in range(cfg.depth)}
        want = f"{{'block_0' .. 'block_{cfg.depth - 1}'}} of {{'k', 'v'}} (scan_layers=False)"
    if not ok:
        got = {k: getattr(v, "shape", type(v).__name__) for k, v in cache.items()}
        raise ValueError(f"the KV cache does not fit this stack: expected {want}, got {got}; make it with "
                         "init_kv_cache(cfg, ...) for the same config")


def stack_block_params(params: dict, depth: int) -> dict:
    """Unscanned layout {"block_0": p0, ...} → scanned {"blocks": {"block": stacked}} (numpy)."""
    out = {k: v for k, v in params.items() if not k.startswith("block_")}
    blocks = [params[f"block_{i}"] for i in range(depth)]
    out["blocks"] = {"block": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}
    return out


def unstack_block_params(params: dict) -> dict:
    """Scanned layout → unscanned {"block_0": ..., ...}."""
    out = {k: v for k, v in params.items() if k != "blocks"}
    stacked = params["blocks"]["block"]
    depth = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(depth):
        out[f"block_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return out
