"""The pre-LN transformer stack every tower is built from, with optional nn.scan and remat.

    x = x + Attn(Norm(x));  x = x + Mlp(Norm(x))      (repeated `depth` times, then a final Norm)

With `scan_layers` the `depth` blocks are one `nn.scan` over stacked params (leading "layers" axis):
compile time stops growing with depth. `remat` trades recomputation for activation memory.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import config
from mmjax.layers.attention import Attention
from mmjax.layers.mlp import Mlp
from mmjax.layers.norms import Norm
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
    dropout: float = 0.0
    attention_impl: Literal["xla", "cudnn"] | None = None
    final_norm: bool = True
    scan_layers: bool = False
    remat: RematPolicy = "none"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"


class Block(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, mask=None, positions=None, deterministic=True):
        c = self.cfg
        dt, pdt = to_dtype(c.dtype), to_dtype(c.param_dtype)
        norm = lambda name: Norm(c.norm, c.norm_eps, dtype=dt, param_dtype=pdt, name=name)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        y = Attention(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                      use_bias=c.use_bias, implementation=c.attention_impl, rope_base=c.rope_base,
                      qk_norm=c.qk_norm, norm_eps=c.norm_eps, dtype=dt, param_dtype=pdt,
                      name="attn")(norm("norm1")(x), mask=mask, positions=positions,
                                   deterministic=deterministic)
        x = x + nn.Dropout(c.dropout)(y, deterministic=deterministic)
        y = Mlp(c.mlp_dim or 4 * c.width, c.activation, use_bias=c.use_bias, dropout=c.dropout,
                dtype=dt, param_dtype=pdt, name="mlp")(norm("norm2")(x), deterministic=deterministic)
        x = x + nn.Dropout(c.dropout)(y, deterministic=deterministic)
        return constrain(x, ("act_batch", "act_len", "act_embed"))


class _ScanBlock(nn.Module):
    """Block with the (carry, x) → (carry, out) signature nn.scan wants; out is the block output."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, mask, positions, deterministic):
        x = Block(self.cfg, name="block")(x, mask, positions, deterministic)
        return x, x


class Transformer(nn.Module):
    """x: [B, N, D] → ([B, N, D], aux). aux["blocks"]: [depth, B, N, D] when return_blocks."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, *, mask=None, positions=None, deterministic=True, return_blocks=False):
        c = self.cfg
        if x.shape[-1] != c.width:
            raise ValueError(f"transformer width is {c.width} but the input has {x.shape[-1]} channels")
        aux = {}
        block_cls = _ScanBlock if c.scan_layers else Block
        if c.remat != "none":
            # static_argnums counts `self` as 0: argument 4 is `deterministic`.
            block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers,
                                 static_argnums=(4,))
        if c.scan_layers:
            stack = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=c.depth,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, outs = stack(c, name="blocks")(x, mask, positions, deterministic)
            if return_blocks:
                aux["blocks"] = outs
        else:
            outs = []
            for i in range(c.depth):
                x = block_cls(c, name=f"block_{i}")(x, mask, positions, deterministic)
                outs.append(x)
            if return_blocks:
                aux["blocks"] = jnp.stack(outs)
        if c.final_norm:
            x = Norm(c.norm, c.norm_eps, dtype=to_dtype(c.dtype), param_dtype=to_dtype(c.param_dtype),
                     name="final_norm")(x)
        return x, aux


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
