"""Param-tree plumbing for the converters: flat "/" paths and the scanned ↔ unscanned layouts.

Rules are written once, against the unscanned layout (`encoder/block_{i}/...`). A model built with
`scan_layers=True` keeps its blocks stacked as `encoder/blocks/block/...` with a leading [depth]
axis; `scan_tree` / `unscan_tree` convert between the two anywhere in a tree, so every family gets
the scanned layout for free.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from mmjax.layers.transformer import stack_block_params

_BLOCK = re.compile(r"^block_(\d+)$")


def flatten(tree: dict) -> dict[str, object]:
    """{"a": {"b": x}} → {"a/b": x}."""
    return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict[str, object]) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def plain_params(params) -> dict:
    """Accepts {"params": tree} or a bare tree, boxed (nn.Partitioned) or not → a bare, unboxed tree."""
    params = nn.unbox(params)
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    return params


def is_scanned(tree) -> bool:
    """True if some Transformer in `tree` keeps its blocks stacked (nn.scan layout)."""
    if not isinstance(tree, dict):
        return False
    if isinstance(tree.get("blocks"), dict) and "block" in tree["blocks"]:
        return True
    return any(is_scanned(v) for v in tree.values())


def scan_tree(tree: dict) -> dict:
    """Stacks every {"block_0": .., "block_1": ..} group into {"blocks": {"block": [depth, ...]}}."""
    if not isinstance(tree, dict):
        return tree
    tree = {k: scan_tree(v) for k, v in tree.items()}
    indices = sorted(int(m[1]) for m in map(_BLOCK.match, tree) if m)
    if indices:
        if indices != list(range(len(indices))):
            raise ValueError(f"block indices are not 0..{len(indices) - 1}: {indices}")
        tree = stack_block_params(tree, len(indices))
    return tree


def _index_leaf(a, i):
    # Works on arrays and on the ShapeDtypeStructs of an eval_shape'd tree alike.
    if isinstance(a, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
    return np.asarray(a)[i]


def unscan_tree(tree: dict) -> dict:
    """Inverse of `scan_tree`: {"blocks": {"block": [depth, ...]}} → {"block_0": .., ...}.
    Leaves may be arrays or ShapeDtypeStructs (the expected tree of a scanned model)."""
    if not isinstance(tree, dict):
        return tree
    if isinstance(tree.get("blocks"), dict) and "block" in tree["blocks"]:
        stacked = tree["blocks"]["block"]
        depth = jax.tree.leaves(stacked)[0].shape[0]
        tree = {k: v for k, v in tree.items() if k != "blocks"}
        tree.update({f"block_{i}": jax.tree.map(lambda a, i=i: _index_leaf(a, i), stacked)
                     for i in range(depth)})
    return {k: unscan_tree(v) for k, v in tree.items()}
