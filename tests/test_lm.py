"""Decoder LM: KV-cache decoding equals a full forward (unscanned, scanned, on a 2×2×2 mesh),
masks (prefix-LM, padding), embeddings input, the tied head, 2D RoPE, the LM loss against numpy,
the FLOPs formula by hand, and clear errors for bad input."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.layers import TransformerConfig, apply_rope, stack_block_params
from mmjax.layers.attention import apply_mrope, apply_rope_2d
from mmjax.models.lm import LM, LMConfig, cache_shardings, init_cache, lm_forward_flops
from mmjax.objectives.lm import lm_cross_entropy, next_token_targets
from mmjax.sharding import MeshConfig, make_mesh, tree_shardings

V, D = 64, 32
ENC = TransformerConfig(width=D, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=48, activation="swiglu",
                        norm="rmsnorm", use_bias=False, rope_base=10_000.0)
CFG = LMConfig(vocab_size=V, max_len=32, encoder=ENC)
LENGTHS, T0, NEW = [5, 2, 4, 3], 5, 4  # prompts left-padded to T0, then NEW decoded tokens
S = T0 + NEW + 2  # two cache slots never written: they must stay masked


def _scanned(cfg):
    return dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, scan_layers=True))


@pytest.fixture(scope="module")
def lm():
    model = LM(CFG)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    # Random norm scales (init is all ones, which would hide a norm applied to the wrong tensor).
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.3 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
        if "norm" in str(p) else x, params)
    return model, params


def _batch(seed=0, lengths=LENGTHS):
    """Left-padded sequences [B, T0 + NEW] (prompt + continuation), validity and RoPE positions."""
    rng = np.random.default_rng(seed)
    total = T0 + NEW
    pad = T0 - np.asarray(lengths)
    ids = rng.integers(0, V, size=(len(lengths), total)).astype(np.int32)
    valid = np.arange(total)[None] >= pad[:, None]
    ids = np.where(valid, ids, 0).astype(np.int32)
    pos = np.maximum(np.cumsum(valid, -1) - 1, 0).astype(np.int32)
    return ids, valid, pos


def _full_forward(model, params, ids, valid, pos):
    return model.apply({"params": params}, ids, positions=pos, kv_valid=valid)[0]


def _decode(model, params, ids, valid, pos, cache, prefill, step):
    """Prefill T0 prompt tokens at slot 0, then one token per step: logits [B, T0 + NEW, V]."""
    valid_s = np.concatenate([valid, np.ones((len(ids), S - valid.shape[1]), bool)], axis=1)  # [B, S]
    logits, cache = prefill(params, ids[:, :T0], pos[:, :T0], valid_s, cache)
    out = [logits]
    for t in range(T0, T0 + NEW):
        logits, cache = step(params, ids[:, t:t + 1], pos[:, t:t + 1], valid_s, cache, jnp.int32(t))
        out.append(logits)
    return np.concatenate([np.asarray(o) for o in out], axis=1)


def _fns(model):
    def prefill(params, ids, pos, valid, cache):
        logits, aux = model.apply({"params": params}, ids, positions=pos, kv_valid=valid, cache=cache, cache_index=0)
        return logits, aux["cache"]

    def step(params, ids, pos, valid, cache, t):
        logits, aux = model.apply({"params": params}, ids, positions=pos, kv_valid=valid, cache=cache, cache_index=t)
        return logits, aux["cache"]
    return prefill, step


@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_equals_full_forward(lm, scan):
    model, params = lm
    ids, valid, pos = _batch()
    ref = np.asarray(jax.jit(lambda *a: _full_forward(model, *a))(params, ids, valid, pos))
    if scan:
        model = LM(_scanned(CFG))
        params = dict(params, encoder=stack_block_params(params["encoder"], CFG.encoder.depth))
    prefill, step = (jax.jit(f) for f in _fns(model))
    cache = init_cache(model.cfg, len(ids), S)
    assert jax.tree.leaves(cache)[0].shape == ((2,) if scan else ()) + (len(ids), 2, S, D // 4)  # head-major
    got = _decode(model, params, ids, valid, pos, cache, prefill, step)
    np.testing.assert_allclose(got[valid], ref[valid], atol=1e-5, rtol=1e-5)
    # The padded rows really are left-padded: row 1 has 3 pads, and its first real token sits at 0.
    assert pos[1, 3] == 0 and not valid[1, 2]


def test_cached_decoding_on_a_2x2x2_mesh_equals_one_device(lm):
    model, params = lm
    ids, valid, pos = _batch(seed=1)
    prefill, step = (jax.jit(f) for f in _fns(model))
    one = _decode(model, params, ids, valid, pos, init_cache(CFG, len(ids), S), prefill, step)

    mesh = make_mesh(MeshConfig(shape=(2, 2, 2)))
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    p_sh = tree_shardings(boxed, mesh)
    c_sh = cache_shardings(CFG, mesh, len(ids), S)
    # The cache's batch goes over data×fsdp and its kv heads over tensor; params shard by their names.
    assert c_sh["block_0"]["k"].spec == jax.sharding.PartitionSpec(("data", "fsdp"), "tensor", None, None)
    assert p_sh["token_embedding"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    sharded = jax.device_put(params, p_sh)
    cache = jax.device_put(init_cache(CFG, len(ids), S), c_sh)
    f_pre, f_step = _fns(model)
    with jax.set_mesh(mesh):
        prefill = jax.jit(f_pre, out_shardings=(None, c_sh))
        step = jax.jit(f_step, out_shardings=(None, c_sh))
        got = _decode(model, sharded, ids, valid, pos, cache, prefill, step)
    np.testing.assert_allclose(got[valid], one[valid], atol=1e-5, rtol=1e-5)


def test_prefix_lm_and_padding_masks(lm):
    model, params = lm
    fwd = jax.jit(lambda ids, prefix, valid: model.apply({"params": params}, ids, prefix_len=prefix,
                                                         kv_valid=valid)[0])
    ids = np.random.default_rng(3).integers(0, V, size=(1, 6)).astype(np.int32)
    changed = ids.copy()
    changed[0, 2] = (ids[0, 2] + 1) % V
    later = ids.copy()
    later[0, 4] = (ids[0, 4] + 1) % V
    ok = np.ones((1, 6), bool)
    base, prefix = np.asarray(fwd(ids, 0, ok)), np.asarray(fwd(ids, 3, ok))
    # Causal: position 0 does not see token 2; in a prefix of 3 it does (bidirectional prefix).
    np.testing.assert_allclose(fwd(changed, 0, ok)[0, :2], base[0, :2], atol=1e-6)
    assert np.abs(np.asarray(fwd(changed, 3, ok))[0, 0] - prefix[0, 0]).max() > 1e-3
    # After the prefix it is causal again: position 3 does not see token 4.
    np.testing.assert_allclose(fwd(later, 3, ok)[0, :4], prefix[0, :4], atol=1e-6)
    # A padding key is invisible: changing it changes nothing at the other positions.
    pad = ok.copy()
    pad[0, 2] = False
    keep = [0, 1, 3, 4, 5]
    np.testing.assert_allclose(np.asarray(fwd(changed, 0, pad))[0, keep], np.asarray(fwd(ids, 0, pad))[0, keep],
                               atol=1e-6)


def test_embeddings_input_and_tied_head():
    cfg = dataclasses.replace(CFG, tie_embeddings=True)
    model = LM(cfg)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, V, size=(2, 5)), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), ids))["params"]
    assert "head" not in params and params["token_embedding"].shape == (V, D)
    logits, aux = model.apply({"params": params}, ids)
    emb = model.apply({"params": params}, ids, method=LM.embed)
    np.testing.assert_array_equal(emb, np.asarray(params["token_embedding"])[np.asarray(ids)])
    logits2, _ = model.apply({"params": params}, emb)
    np.testing.assert_allclose(logits2, logits, atol=1e-6)
    # Tied head: logits = hidden · Eᵀ.
    ref = np.asarray(aux["hidden"]) @ np.asarray(params["token_embedding"]).T
    np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=1e-5)


def test_rope_2d_rotates_halves_by_row_and_column():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 3, 2, 8)).astype(np.float32)
    rc = np.array([[[0, 0], [1, 2], [3, 1]]], np.int32)
    got = np.asarray(apply_rope_2d(jnp.asarray(x), jnp.asarray(rc), 100.0))

    def rot(v, p):  # rotate-half over a 4-channel half: pairs (i, i+2), angle p · 100^(-2i/4)
        out = np.empty_like(v)
        for i in range(2):
            a = p * 100.0 ** (-2 * i / 4)
            out[..., i] = v[..., i] * np.cos(a) - v[..., i + 2] * np.sin(a)
            out[..., i + 2] = v[..., i + 2] * np.cos(a) + v[..., i] * np.sin(a)
        return out
    for s in range(3):
        ref = np.concatenate([rot(x[0, s, :, :4], rc[0, s, 0]), rot(x[0, s, :, 4:], rc[0, s, 1])], axis=-1)
        np.testing.assert_allclose(got[0, s], ref, atol=1e-5)
    # 1D positions p in a rope_2d LM mean (p, p).
    enc = dataclasses.replace(ENC, depth=1)
    model = LM(LMConfig(vocab_size=V, max_len=16, encoder=enc, rope_2d=True))
    ids = jnp.asarray(rng.integers(0, V, size=(1, 4)), jnp.int32)
    params = model.init(jax.random.key(2), ids)
    p1 = jnp.arange(4)[None]
    a, _ = model.apply(params, ids, positions=p1)
    b, _ = model.apply(params, ids, positions=jnp.stack([p1, p1], -1))
    c, _ = model.apply(params, ids, positions=jnp.stack([p1, 0 * p1], -1))
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-4
    assert not np.allclose(apply_rope(jnp.asarray(x), jnp.asarray(rc[..., 0])), got)


def test_mrope_deals_frequencies_to_row_and_column_and_keeps_1d_rope_for_text():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 3, 2, 8)).astype(np.float32)
    rc = np.array([[[0, 0], [1, 2], [3, 1]]], np.int32)
    got = np.asarray(apply_mrope(jnp.asarray(x), jnp.asarray(rc), 100.0))
    # by hand: rotate-half over Dh = 8, pair (i, i+4) at frequency 100^(-2i/8), turned by the row for
    # i = 0, 2 and by the column for i = 1, 3
    for s_ in range(3):
        ref = np.empty_like(x[0, s_])
        for i in range(4):
            a = rc[0, s_, i % 2] * 100.0 ** (-2 * i / 8)
            ref[:, i] = x[0, s_, :, i] * np.cos(a) - x[0, s_, :, i + 4] * np.sin(a)
            ref[:, i + 4] = x[0, s_, :, i + 4] * np.cos(a) + x[0, s_, :, i] * np.sin(a)
        np.testing.assert_allclose(got[0, s_], ref, atol=1e-5)
    p = np.array([[0, 3, 7]], np.int32)  # (p, p) is 1D RoPE at p, bit for bit
    np.testing.assert_array_equal(np.asarray(apply_mrope(jnp.asarray(x), jnp.asarray(np.stack([p, p], -1)), 100.0)),
                                  np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(p), 100.0)))
    # q·k depends on the row and column offsets only
    q, k = (rng.standard_normal((1, 1, 1, 8)).astype(np.float32) for _ in range(2))
    dot = lambda a, b: float(np.sum(np.asarray(apply_mrope(jnp.asarray(q), jnp.asarray([[a]]), 100.0))
                                    * np.asarray(apply_mrope(jnp.asarray(k), jnp.asarray([[b]]), 100.0))))
    assert dot((5, 2), (3, 7)) == pytest.approx(dot((9, 0), (7, 5)), abs=1e-5)
    assert abs(dot((5, 2), (3, 7)) - dot((5, 2), (7, 3))) > 1e-3
    # an LM with interleaved channels reads [B, T] positions exactly as a 1D LM with the same params
    enc = dataclasses.replace(ENC, depth=1)
    ids = jnp.asarray(rng.integers(0, V, size=(1, 5)), jnp.int32)
    flat = LM(LMConfig(vocab_size=V, max_len=16, encoder=enc))
    params = flat.init(jax.random.key(4), ids)
    grid = LM(LMConfig(vocab_size=V, max_len=16, encoder=dataclasses.replace(enc, rope_2d_channels="interleaved"),
                       rope_2d=True))
    pos = jnp.arange(5)[None] + 2
    np.testing.assert_array_equal(np.asarray(flat.apply(params, ids, positions=pos)[0]),
                                  np.asarray(grid.apply(params, ids, positions=jnp.stack([pos, pos], -1))[0]))


def test_learned_row_and_column_embeddings_add_to_the_inputs_and_decode_with_a_cache():
    enc = dataclasses.replace(ENC, depth=1)
    cfg = LMConfig(vocab_size=V, max_len=16, encoder=enc, rope_2d=True, learned_positions=True)
    model = LM(cfg)
    ids = jnp.arange(10, dtype=jnp.int32)[None] % V
    pos = jnp.stack([jnp.arange(10) // 3, jnp.arange(10) % 3 + 5], -1)[None]    # (row, col) per token
    params = model.init(jax.random.key(3), ids, positions=pos)["params"]
    assert params["row_embedding"].value.shape == params["col_embedding"].value.shape == (16, D)
    params = nn.meta.unbox(params)
    full, aux = model.apply({"params": params}, ids, positions=pos)
    # the same as feeding the embeddings with row[r] + col[c] added by hand to a model without the tables
    plain = LM(dataclasses.replace(cfg, learned_positions=False))
    x = model.apply({"params": params}, ids, method=LM.embed)
    x = x + params["row_embedding"][pos[..., 0]] + params["col_embedding"][pos[..., 1]]
    rest = {k: v for k, v in params.items() if k not in ("row_embedding", "col_embedding")}
    np.testing.assert_allclose(plain.apply({"params": rest}, x, positions=pos)[0], full, atol=1e-5)
    # prefill 6 + extend 4 with a KV cache = one full pass
    l1, a1 = model.apply({"params": params}, ids[:, :6], positions=pos[:, :6], cache=init_cache(cfg, 1, 16),
                         cache_index=0)
    l2, _ = model.apply({"params": params}, ids[:, 6:], positions=pos[:, 6:], cache=a1["cache"], cache_index=6)
    np.testing.assert_allclose(np.concatenate([l1, l2], 1), full, atol=1e-5)


def test_bad_input_is_named(lm):
    model, params = lm
    v = {"params": params}
    ids = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"token ids out of range \[0, 64\)"):
        model.apply(v, ids.at[0, 1].set(V))
    cache = init_cache(CFG, 2, 4)
    with pytest.raises(ValueError, match="chunk of 3 tokens at cache_index 2 overflows the KV cache of 4 slots"):
        model.apply(v, ids, cache=cache, cache_index=2)
    with pytest.raises(ValueError, match=r"embeddings must be \[B, T, D=32\]"):
        model.apply(v, jnp.zeros((2, 3, 16)))
    with pytest.raises(ValueError, match="pass cache and cache_index together"):
        model.apply(v, ids, cache=cache)
    with pytest.raises(ValueError, match=r"kv_valid must be \[B, S\]"):
        model.apply(v, ids, cache=cache, cache_index=0, kv_valid=jnp.ones((2, 3), bool))
    with pytest.raises(ValueError, match=r"positions must be \[B, T\]"):
        model.apply(v, ids, positions=jnp.zeros((2, 3, 2), jnp.int32))
    with pytest.raises(ValueError, match="KV cache does not"):
        model.apply(v, ids, cache=init_cache(_scanned(CFG), 2, 4), cache_index=0)
    with pytest.raises(ValueError, match="longer than the model's max_len"):
        init_cache(CFG, 2, 64)


def test_lm_cross_entropy_against_numpy():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, size=(2, 5))
    targets[0, 0] = logits[0, 0].argmax()  # at least one correct prediction
    weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
    weights[0, 0] = 1.0
    out = lm_cross_entropy(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), jnp.asarray(targets),
                           jnp.asarray(weights), z_loss=1e-2)
    lg = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), np.float64)
    lse = np.log(np.exp(lg).sum(-1))
    nll = lse - np.take_along_axis(lg, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(out["nll_sum"], (weights * nll).sum(), rtol=1e-5)
    np.testing.assert_allclose(out["z_loss_sum"], (weights * 1e-2 * lse**2).sum(), rtol=1e-5)
    np.testing.assert_allclose(out["loss_sum"], (weights * (nll + 1e-2 * lse**2)).sum(), rtol=1e-5)
    np.testing.assert_allclose(out["correct_sum"], (weights * (lg.argmax(-1) == targets)).sum())
    assert float(out["weight_sum"]) == weights.sum() and float(out["correct_sum"]) >= 1
    inputs, tgt, w = next_token_targets(jnp.arange(12).reshape(2, 6), jnp.asarray(np.tril(np.ones((2, 6)))))
    np.testing.assert_array_equal(tgt[0], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(inputs[1], [6, 7, 8, 9, 10])
    np.testing.assert_array_equal(w, [[0, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="targets must be"):
        lm_cross_entropy(jnp.zeros((2, 5, 7)), jnp.zeros((2, 4), jnp.int32))


def test_flops_formula_by_hand():
    # width 32, 4 heads (Dh 8), 2 kv heads, SwiGLU 48, depth 2, vocab 64, T = 10:
    #   projections 32·32 (q) + 2·32·16 (k, v) + 32·32 (out) = 3072; MLP 3·32·48 = 4608
    #   per block 2·10·(3072 + 4608) + 4·10²·4·8 = 153600 + 12800; head 2·10·32·64 = 40960
    assert lm_forward_flops(CFG, 10) == 2 * (153600 + 12800) + 40960


def test_attention_layer_cache_defaults_are_causal_slots():
    """The shared Attention alone: with a cache and neither mask nor positions, T=1 steps at
    t = 0, 1, ... give the causal full-sequence output (RoPE at position t, unwritten slots hidden)."""
    from mmjax.layers import Attention, make_attention_mask
    attn = Attention(num_heads=4, num_kv_heads=2, use_bias=False, rope_base=1e4)
    x = jax.random.normal(jax.random.key(7), (2, 5, D))
    params = attn.init(jax.random.key(8), x)
    full = attn.apply(params, x, mask=make_attention_mask(5, causal=True))
    cache = {"k": jnp.zeros((2, 2, 7, 8)), "v": jnp.zeros((2, 2, 7, 8))}  # [B, Hkv, S, Dh]
    outs = []
    for t in range(5):
        y, cache = attn.apply(params, x[:, t:t + 1], cache=cache, cache_index=t)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)
    assert np.asarray(cache["k"][:, :, :5]).any(axis=-1).all()  # every written slot holds a key
    assert not np.asarray(cache["k"][:, :, 5:]).any()  # slots 5, 6 never written
    with pytest.raises(ValueError, match="does not fit a KV cache of 7 slots"):
        attn.apply(params, x, cache=cache, cache_index=3)
