"""Text tower and two-tower CLIP: pooling, masks, temperature clamp, bad input."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.layers import TransformerConfig
from mmjax.models.clip import CLIP, CLIPConfig
from mmjax.models.text import TextConfig, TextTransformer
from mmjax.models.vit import ViTConfig

ENC = TransformerConfig(width=32, depth=2, num_heads=4, mlp_dim=64)
TEXT = TextConfig(vocab_size=50, max_len=8, encoder=ENC)


@pytest.fixture(scope="module")
def text_params():
    return TextTransformer(TEXT).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]


def test_pooling_picks_the_right_token(text_params):
    ids = jnp.array([[5, 7, 49, 0, 0, 0], [3, 4, 5, 6, 49, 1]])  # EOT (highest id) at 2 and 4
    for pool, index in (("eot_argmax", [2, 4]), ("first", [0, 0]), ("last", [5, 5])):
        m = TextTransformer(dataclasses.replace(TEXT, pool=pool))
        pooled, aux = m.apply({"params": text_params}, ids)
        np.testing.assert_allclose(pooled, aux["tokens"][jnp.arange(2), jnp.array(index)], atol=1e-6)
    m = TextTransformer(dataclasses.replace(TEXT, pool="eos", eos_id=5))
    pooled, aux = m.apply({"params": text_params}, ids)
    np.testing.assert_allclose(pooled, aux["tokens"][jnp.arange(2), jnp.array([0, 2])], atol=1e-6)  # first 5


def test_causal_tokens_ignore_the_future_and_padding(text_params):
    m = TextTransformer(TEXT)
    a = jnp.array([[5, 7, 49, 1, 2, 3]])
    b = jnp.array([[5, 7, 49, 9, 9, 9]])
    _, aa = m.apply({"params": text_params}, a)
    _, ab = m.apply({"params": text_params}, b)
    np.testing.assert_allclose(aa["tokens"][:, :3], ab["tokens"][:, :3], atol=1e-6)
    full = TextTransformer(dataclasses.replace(TEXT, causal=False, pool="mean"))
    valid = jnp.array([[True, True, True, False, False, False]])
    pa, _ = full.apply({"params": text_params}, a, valid=valid)
    pb, _ = full.apply({"params": text_params}, b, valid=valid)
    np.testing.assert_allclose(pa, pb, atol=1e-5)  # padding keys are masked out


def test_bag_of_tokens_tower_is_a_mean_of_normed_embeddings():
    """depth 0, posemb 'none', mean pooling: pooled = mean over valid tokens of LayerNorm(e_tok)
    (numpy), so word order and padding do not matter."""
    cfg = dataclasses.replace(TEXT, encoder=dataclasses.replace(ENC, depth=0, norm_eps=1e-5), causal=False,
                              pool="mean", posemb="none")
    m = TextTransformer(cfg)
    params = nn.meta.unbox(m.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    assert "posemb" not in params
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    ids = np.array([[5, 7, 49, 3, 0, 0], [3, 49, 7, 5, 11, 2]])
    valid = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]], bool)  # row 1: row 0's tokens reordered
    pooled, _ = m.apply({"params": params}, jnp.asarray(ids), valid=jnp.asarray(valid))

    e = np.asarray(params["token_embedding"], np.float64)[ids]
    norm = params["encoder"]["final_norm"]
    ln = (e - e.mean(-1, keepdims=True)) / np.sqrt(e.var(-1, keepdims=True) + 1e-5)
    ln = ln * np.asarray(norm["scale"]) + np.asarray(norm["bias"])
    want = (ln * valid[..., None]).sum(1) / valid.sum(1, keepdims=True)
    np.testing.assert_allclose(pooled, want, atol=1e-5)
    np.testing.assert_allclose(pooled[0], pooled[1], atol=1e-5)
    with pytest.raises(ValueError, match="unknown text posemb 'rope'"):
        TextTransformer(dataclasses.replace(cfg, posemb="rope")).init(jax.random.PRNGKey(0),
                                                                      jnp.zeros((1, 8), jnp.int32))


def test_bad_text_input(text_params):
    m = TextTransformer(TEXT)
    with pytest.raises(ValueError, match=r"token ids out of range \[0, 50\): min 0, max 50"):
        m.apply({"params": text_params}, jnp.array([[0, 50]]))
    with pytest.raises(ValueError, match="length 9 is longer than the position table \\(8\\)"):
        m.apply({"params": text_params}, jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(TypeError, match="must be integers"):
        m.apply({"params": text_params}, jnp.zeros((1, 4), jnp.float32))


def test_clip_logits_and_temperature_clamp():
    cfg = CLIPConfig(vision=ViTConfig(image_size=8, patch_size=4, pre_norm=True, patch_bias=False, encoder=ENC),
                     text=TEXT, embed_dim=16, logit_scale_init=float(np.log(1000.0)))
    m = CLIP(cfg)
    images, ids = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 3)), jnp.array([[1, 49], [2, 49], [3, 49]])
    params = m.init(jax.random.PRNGKey(0), images, ids)["params"]
    li, lt, aux = m.apply({"params": params}, images, ids)
    assert float(aux["temperature"]) == 100.0  # exp(log 1000) clamped at 100
    zi = np.array(m.apply({"params": params}, images, method=CLIP.encode_image))
    zt = np.array(m.apply({"params": params}, ids, method=CLIP.encode_text))
    zi /= np.linalg.norm(zi, axis=-1, keepdims=True)
    zt /= np.linalg.norm(zt, axis=-1, keepdims=True)
    np.testing.assert_allclose(li, 100.0 * zi @ zt.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lt, np.asarray(li).T)
    with pytest.raises(ValueError, match="no classification head"):
        CLIP(dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, num_classes=3))).init(
            jax.random.PRNGKey(0), images, ids)
