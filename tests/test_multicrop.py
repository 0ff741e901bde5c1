"""Molmo-style 2×2 attention pooling and the multi-crop token layout, against NumPy written out by
hand and layouts counted by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.layers import AttentionPool2x2, MultiCropLayout, multicrop_layout
from mmjax.layers.multicrop import arrange_multicrop_features
from mmjax.models.vlm import splice_image_features


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _pool_by_hand(x, p, num_heads):
    """For each window (i, j), with the four patches x[2i:2i+2, 2j:2j+2] (loops, no reshapes):
    q = mean·Wq + bq, k = x·Wk + bk, v = x·Wv + bv per head, softmax(q·kᵀ/√Dh)·v, then the out
    projection over (heads, head_dim)."""
    b, c, h, w, d = x.shape
    wq, bq = p["query"]["kernel"], p["query"]["bias"]   # [D, H, Dh], [H, Dh]
    wk, bk = p["key"]["kernel"], p["key"]["bias"]
    wv, bv = p["value"]["kernel"], p["value"]["bias"]
    wo, bo = p["out"]["kernel"], p["out"]["bias"]       # [H, Dh, D'], [D']
    dh = wq.shape[-1]
    out = np.zeros((b, c, h // 2, w // 2, wo.shape[-1]))
    for n in range(b):
        for m in range(c):
            for i in range(h // 2):
                for j in range(w // 2):
                    patches = x[n, m, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(4, d)
                    mean = patches.mean(axis=0)
                    heads = []
                    for hd in range(num_heads):
                        q = mean @ wq[:, hd] + bq[hd]                  # [Dh]
                        k = patches @ wk[:, hd] + bk[hd]               # [4, Dh]
                        v = patches @ wv[:, hd] + bv[hd]
                        heads.append(_softmax(k @ q / np.sqrt(dh)) @ v)
                    out[n, m, i, j] = np.einsum("hd,hde->e", np.stack(heads), wo) + bo
    return out


@pytest.mark.parametrize("out_features", [None, 6])
def test_pooling_matches_the_hand_computation(out_features):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 6, 8)).astype(np.float32)  # B, crops, h, w, D
    pool = AttentionPool2x2(num_heads=2, out_features=out_features)
    params = nn.unbox(pool.init(jax.random.key(0), jnp.asarray(x))["params"])
    # Random values everywhere (biases too: they are initialised to 0).
    params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), params)
    y = np.asarray(pool.apply({"params": params}, jnp.asarray(x)))
    assert y.shape == (2, 3, 2, 3, out_features or 8)
    np.testing.assert_allclose(y, _pool_by_hand(x, params["attention"], 2), rtol=2e-5, atol=2e-5)


def test_pooling_params_carry_logical_names():
    abstract = jax.eval_shape(AttentionPool2x2(num_heads=2, out_features=6).init, jax.random.key(0),
                              jnp.zeros((1, 1, 2, 2, 8)))
    specs = nn.get_partition_spec(abstract)["params"]["attention"]
    assert tuple(specs["query"]["kernel"]) == ("embed", "heads", "head_dim")
    assert tuple(specs["key"]["kernel"]) == ("embed", "kv_heads", "head_dim")
    assert tuple(specs["out"]["kernel"]) == ("heads", "head_dim", "embed")


def test_odd_patch_grid_is_an_error():
    pool = AttentionPool2x2(num_heads=1)
    with pytest.raises(ValueError, match="even patch grid, got h=3, w=4"):
        pool.init(jax.random.key(0), jnp.zeros((1, 1, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"\[B, crops, h, w, D\]"):
        pool.init(jax.random.key(0), jnp.zeros((1, 4, 4, 4)))


S, E, C, P = 50, 51, 52, 9  # start, end, row end (col), placeholder


def test_layout_ids_and_feature_order_by_hand():
    # 2×2 tiles, each crop pooled to 2×2: 5 crops × 4 = 20 features.
    layout = multicrop_layout(2, 2, 2, image_id=P, start_id=S, end_id=E, col_id=C)
    glob = [S, P, P, C, P, P, C, E]
    tiles = [S] + [P, P, P, P, C] * 4 + [E]
    np.testing.assert_array_equal(layout.ids, glob + tiles)
    assert layout.num_features == 20 == (layout.ids == P).sum()
    # Feature f = crop·4 + 2i + j. Global view in order; the tile grid row by row across tiles:
    # row 0 reads tile (0,0) = crop 1 then tile (0,1) = crop 2, both at i = 0, and so on.
    np.testing.assert_array_equal(layout.feature_index, [0, 1, 2, 3,
                                                          4, 5, 8, 9,
                                                          6, 7, 10, 11,
                                                          12, 13, 16, 17,
                                                          14, 15, 18, 19])


def test_layout_counts():
    # g = 3 tiles of 3×4 pooled features: L = 2 + 3·(4+1) + 2 + 9·(12+1) = 136; N = 10·12 = 120.
    layout = multicrop_layout(3, 3, 4, image_id=P, start_id=S, end_id=E, col_id=C)
    assert isinstance(layout, MultiCropLayout)
    assert len(layout.ids) == 136 and layout.num_features == 120 == (layout.ids == P).sum()
    assert (layout.ids == C).sum() == 3 + 9 and (layout.ids == S).sum() == (layout.ids == E).sum() == 2
    assert sorted(layout.feature_index.tolist()) == list(range(120))  # each feature placed once
    only_global = multicrop_layout(0, 2, 3, image_id=P, start_id=S, end_id=E, col_id=C)
    np.testing.assert_array_equal(only_global.ids, [S, P, P, P, C, P, P, P, C, E])


def test_features_go_to_their_slots():
    layout = multicrop_layout(2, 1, 1, image_id=P, start_id=S, end_id=E, col_id=C)
    # Pooled features [B=1, 5 crops, 1, 1, D=2] whose value names the crop.
    pooled = jnp.asarray(np.arange(5, dtype=np.float32)[None, :, None, None, None] * np.ones(2, np.float32))
    ordered = arrange_multicrop_features(pooled, layout)
    ids = jnp.asarray(np.concatenate([[1], layout.ids, [30, 31]])[None])  # bos, image block, text
    embeds = jnp.full(ids.shape + (2,), -1.0)
    out = np.asarray(splice_image_features(embeds, ids, ordered, P))[0, :, 0]
    # ids:  1  S  P  C  E  S  P  P  C  P  P  C  E  30 31
    np.testing.assert_array_equal(out, [-1, -1, 0, -1, -1, -1, 1, 2, -1, 3, 4, -1, -1, -1, -1])
    with pytest.raises(ValueError, match=r"5 <image> tokens \(id 9\) in row 0 but the vision tower gives 4 features"):
        splice_image_features(embeds, ids, ordered[:, :4], P)
