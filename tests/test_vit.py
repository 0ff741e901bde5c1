"""ViT: variants, pooling, intermediates, position-embedding resize, FLOPs and bad input."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.experiment import ExperimentConfig, validate
from mmjax.layers import TransformerConfig, resize_posemb
from mmjax.models.vit import VARIANTS, ViT, ViTConfig, vit_config
from mmjax.tasks import ClassificationTask

SMALL = ViTConfig(image_size=16, channels=3, patch_size=4, num_classes=5,
                  encoder=TransformerConfig(width=32, depth=2, num_heads=4, mlp_dim=64))


def test_variant_strings():
    c = vit_config("B/16")
    assert (c.patch_size, c.encoder.width, c.encoder.depth, c.encoder.num_heads, c.encoder.mlp_dim) == \
        (16, 768, 12, 12, 3072)
    c = vit_config("L/14", image_size=224, encoder={"scan_layers": True})
    assert (c.patch_size, c.encoder.width, c.encoder.depth, c.encoder.scan_layers) == (14, 1024, 24, True)
    assert set(VARIANTS) >= {"Ti", "S", "B", "L", "So400m", "H"}
    with pytest.raises(ValueError, match="unknown ViT variant 'X/16'"):
        vit_config("X/16")
    with pytest.raises(ValueError, match="unknown ViT variant 'B16'"):
        vit_config("B16")


@pytest.mark.parametrize("pool, out_shape", [("cls", (2, 5)), ("gap", (2, 5)), ("map", (2, 5)),
                                             ("none", (2, 16, 32))])
def test_pooling_and_intermediates(pool, out_shape):
    cfg = dataclasses.replace(SMALL, pool=pool, num_classes=None if pool == "none" else 5)
    model = ViT(cfg)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    params = model.init(jax.random.PRNGKey(1), x)["params"]
    out, aux = model.apply({"params": params}, x, return_blocks=True)
    assert out.shape == out_shape
    tokens = 16 + (pool == "cls")
    assert aux["patch_tokens"].shape == (2, 16, 32)  # N = HW/P² = 16·16/4² patches
    assert aux["blocks"].shape == (2, 2, tokens, 32)  # [depth, B, T, D]
    assert aux["encoded"].shape == (2, tokens, 32)
    if pool == "gap":
        np.testing.assert_allclose(aux["pre_logits"], aux["encoded"].mean(1), atol=1e-6)
    if pool == "cls":
        np.testing.assert_allclose(aux["pre_logits"], aux["encoded"][:, 0], atol=1e-6)


def test_sincos_posemb_has_no_params_and_is_added():
    cfg = dataclasses.replace(SMALL, posemb="sincos2d", pool="gap")
    params = nn.meta.unbox(ViT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))["params"]
    assert "posemb" not in params


def test_posemb_resize_to_new_resolution():
    """Resized learned positions at the same grid reproduce the original outputs; a new grid runs."""
    model = ViT(SMALL)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 3))
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), x))["params"]
    table = params["posemb"]["pos_embedding"]
    big = dataclasses.replace(SMALL, image_size=32)
    new = dict(params, posemb={"pos_embedding": resize_posemb(table, (8, 8), num_prefix_tokens=1)})
    out, _ = ViT(big).apply({"params": new}, jnp.zeros((1, 32, 32, 3)))
    assert out.shape == (1, 5) and np.isfinite(out).all()
    with pytest.raises(ValueError, match="configured for 16x16 images, got 32x32.*resize"):
        model.apply({"params": params}, jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize("images, err, msg", [
    (np.zeros((16, 16, 3), np.float32), ValueError, "rank 3"),
    (np.zeros((1, 16, 16, 3), np.float32), ValueError,
     r"conv stem's total stride 8 \(stem=\(\(4, 2\), \(4, 4\)\)\) does not divide the patch size 4"),
    (np.zeros((1, 16, 16, 1), np.float32), ValueError, "3 channels, got 1"),
    (np.zeros((1, 18, 18, 3), np.float32), ValueError, "18x18 is not divisible by the patch size 4"),
    (np.zeros((1, 16, 16, 3), np.uint8), TypeError, "floating-point images"),
])
def test_bad_images_are_named(images, err, msg):
    if "stem" in msg:
        with pytest.raises(err, match=msg):
            ViT(dataclasses.replace(SMALL, stem=((4, 2), (4, 4)))).init(jax.random.PRNGKey(1), images)
        return
    model = ViT(SMALL)
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)))["params"]
    with pytest.raises(err, match=msg):
        model.apply({"params": params}, images)


def test_conv_stem_keeps_the_token_grid():
    """With a stride-2 stem before 4×4 patches the patch embedding cuts 2×2 patches of the stem's
    features: still (16/4)² = 16 tokens, and the stem's convs are in the params."""
    cfg = dataclasses.replace(SMALL, pool="none", num_classes=None, stem=((8, 1), (16, 2)))
    params = nn.meta.unbox(ViT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))["params"]
    assert params["stem"]["conv_1"]["kernel"].shape == (3, 3, 8, 16)
    assert params["embedding"]["kernel"].shape == (2, 2, 16, 32)
    out, aux = ViT(cfg).apply({"params": params}, jnp.ones((2, 16, 16, 3)))
    assert out.shape == (2, 16, 32) and aux["patch_tokens"].shape == (2, 16, 32)


def test_trainer_batch_checks():
    task = ClassificationTask(validate(ExperimentConfig(model=SMALL)))
    good = {"image": np.zeros((4, 16, 16, 3), np.float32), "label": np.zeros(4, np.int32)}
    task.check_batch(good, 7)
    bad_nan = dict(good, image=good["image"].copy())
    bad_nan["image"][2, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"step 7: 'image' contains NaN/Inf \(examples \[2\]\)"):
        task.check_batch(bad_nan, 7)
    with pytest.raises(ValueError, match=r"'image' has shape \(4, 8, 8, 3\), expected \[B, 16, 16, 3\]"):
        task.check_batch(dict(good, image=np.zeros((4, 8, 8, 3), np.float32)), 7)
    with pytest.raises(TypeError, match="'image' has dtype float64"):
        task.check_batch(dict(good, image=np.zeros((4, 16, 16, 3))), 7)
    with pytest.raises(ValueError, match=r"labels outside \[0, 5\)"):
        task.check_batch(dict(good, label=np.array([0, 1, 9, 2], np.int32)), 7)


def test_flops_formula_counts_matmuls():
    """Hand count for a 1-block ViT (T = 5 tokens, D = 8, M = 16, 2 classes, P = 2, C = 1)."""
    cfg = ViTConfig(image_size=4, channels=1, patch_size=2, num_classes=2,
                    encoder=TransformerConfig(width=8, depth=1, num_heads=2, mlp_dim=16))
    from mmjax.models.vit import vit_forward_flops
    patch = 2 * 4 * (2 * 2 * 1) * 8
    block = 2 * 5 * (4 * 8 * 8 + 2 * 8 * 16) + 2 * 2 * 5 * 5 * 8
    head = 2 * 8 * 2
    assert vit_forward_flops(cfg) == patch + block + head
    # A stem of one stride-2 conv to 3 channels: 2·(2·2 outputs)·9·1·3, then 1×1 "patches" of 3.
    stem_cfg = dataclasses.replace(cfg, stem=((3, 2),))
    assert vit_forward_flops(stem_cfg) == 2 * 4 * 9 * 1 * 3 + 2 * 4 * (1 * 1 * 3) * 8 + block + head
