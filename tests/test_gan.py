"""PatchGAN discriminator against a PyTorch NLayerDiscriminator, and the GAN losses against hand
computations."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax.config import ConfigError
from mmjax.models.discriminator import DiscriminatorConfig, PatchDiscriminator, forward_flops, output_size
from mmjax.objectives.gan import (
    adaptive_weight,
    gan_start_factor,
    generator_loss,
    hinge_d_loss,
    vanilla_d_loss,
)
from mmjax.sharding import MeshConfig, make_mesh

# --------------------------------------------------------------------------- PyTorch reference


def he_params(model, x, seed=0):
    """Random params of `model`'s shapes drawn in numpy: He-scaled kernels, norm scales around 1.
    (XLA:CPU takes ~1.5 s to compile each jax.random.normal shape; the init test pays that once.)"""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"])

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape), jnp.float32)
        mean = 1.0 if name == "scale" else 0.0
        return jnp.asarray(rng.normal(mean, 0.1, leaf.shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(draw, shapes)



def torch_patchgan(in_channels, channels, num_layers, norm, norm_groups):
    """pix2pix / taming NLayerDiscriminator written from the spec, with torch layers."""
    def make_norm(c):
        if norm == "batch":
            return torch.nn.BatchNorm2d(c)
        return torch.nn.GroupNorm(norm_groups, c, eps=1e-6)

    normed = norm != "none"
    layers = [torch.nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), torch.nn.LeakyReLU(0.2)]
    mult = 1
    for n in range(1, num_layers + 1):
        prev, mult = mult, min(2 ** n, 8)
        stride = 2 if n < num_layers else 1
        layers.append(torch.nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1,
                                      bias=not normed))
        if normed:
            layers.append(make_norm(channels * mult))
        layers.append(torch.nn.LeakyReLU(0.2))
    layers.append(torch.nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
    return torch.nn.Sequential(*layers)


def torch_to_params(model, num_layers):
    """Copies torch weights into our param tree: conv [out, in, kh, kw] → [kh, kw, in, out]."""
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))]
    names = ["conv_0"] + [f"conv_{n}" for n in range(1, num_layers + 1)] + ["conv_out"]
    assert len(convs) == len(names)
    params = {}
    for name, conv in zip(names, convs):
        p = {"kernel": jnp.asarray(conv.weight.detach().numpy().transpose(2, 3, 1, 0))}
        if conv.bias is not None:
            p["bias"] = jnp.asarray(conv.bias.detach().numpy())
        params[name] = p
    for n, norm in enumerate(norms, start=1):
        params[f"norm_{n}"] = {"scale": jnp.asarray(norm.weight.detach().numpy()),
                               "bias": jnp.asarray(norm.bias.detach().numpy())}
    return params


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("num_layers", [2, 3])
def test_patchgan_matches_torch(norm, num_layers):
    torch.manual_seed(num_layers)
    ref = torch_patchgan(3, 16, num_layers, norm, norm_groups=8).double()
    with torch.no_grad():  # He-scaled convs keep the logits O(1); non-trivial norm affines
        for m in ref:
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0.0, math.sqrt(2.0 / m.weight[0].numel()))
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1)
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    ref.train()  # BatchNorm2d normalises with the batch's own statistics
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)).double()).numpy().transpose(0, 2, 3, 1)

    cfg = DiscriminatorConfig(in_channels=3, channels=16, num_layers=num_layers, norm=norm, norm_groups=8)
    model = PatchDiscriminator(cfg)
    params = torch_to_params(ref.float(), num_layers)
    ours_shapes = jax.tree.map(jnp.shape, nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]))
    assert jax.tree.map(jnp.shape, params) == ours_shapes  # same tree, same shapes
    got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(x)))

    side = 32 // 2 ** num_layers - 2
    assert got.shape == want.shape == (2, side, side, 1)
    assert output_size(cfg, 32) == side
    assert got.dtype == np.float32
    assert np.std(want) > 0.1  # the comparison is not between two near-zero maps
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_init_statistics_names_and_no_batch_stats():
    # num_layers=1 keeps it to 4 random shapes (each costs a ~1.5 s XLA:CPU compile)
    cfg = DiscriminatorConfig(channels=64, num_layers=1, norm="batch")
    x = jnp.zeros((1, 12, 12, 3))
    variables = jax.jit(PatchDiscriminator(cfg).init)(jax.random.PRNGKey(0), x)
    assert set(variables) == {"params"}  # no running averages, no mutable collection
    boxed = variables["params"]
    params = nn.unbox(boxed)
    assert "bias" not in params["conv_1"] and "bias" in params["conv_0"] and "bias" in params["conv_out"]
    kernels = np.concatenate([np.ravel(params[k]["kernel"]) for k in params if k.startswith("conv")])
    assert abs(kernels.mean()) < 2e-3
    assert 0.019 < kernels.std() < 0.021, kernels.std()
    scales = np.ravel(params["norm_1"]["scale"])  # 128 draws
    assert abs(scales.mean() - 1.0) < 0.01, scales.mean()
    assert 0.015 < scales.std() < 0.025, scales.std()
    np.testing.assert_array_equal(params["norm_1"]["bias"], 0.0)
    for k in ("conv_0", "conv_out"):
        np.testing.assert_array_equal(params[k]["bias"], 0.0)

    specs = nn.get_partition_spec(boxed)
    assert specs["conv_1"]["kernel"] == P(None, None, None, "embed")
    assert specs["conv_0"]["bias"] == P("embed")
    assert specs["norm_1"]["scale"] == P("norm") and specs["norm_1"]["bias"] == P("norm")


def test_batch_norm_uses_global_batch_statistics_when_sharded():
    cfg = DiscriminatorConfig(channels=16, num_layers=2, norm="batch")
    model = PatchDiscriminator(cfg)
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3))
    params = he_params(model, x)
    one = np.asarray(jax.jit(model.apply)({"params": params}, x))
    # each sample's logits depend on the others through the batch statistics
    first_half = np.asarray(jax.jit(model.apply)({"params": params}, x[:4]))
    assert np.max(np.abs(first_half - one[:4])) > 1e-3
    mesh = make_mesh(MeshConfig(shape=(8, 1, 1)))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
        sharded = jax.jit(model.apply)({"params": params}, xs)
    np.testing.assert_allclose(np.asarray(sharded), one, atol=1e-5, rtol=1e-5)


def test_bfloat16_close_to_float32():
    cfg = DiscriminatorConfig(channels=16, num_layers=2, norm="group", norm_groups=8)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    params = he_params(PatchDiscriminator(cfg), x)
    ref = np.asarray(jax.jit(PatchDiscriminator(cfg).apply)({"params": params}, x))
    low = jax.jit(PatchDiscriminator(DiscriminatorConfig(channels=16, num_layers=2, norm="group", norm_groups=8,
                                                 dtype="bfloat16")).apply)({"params": params}, x)
    assert low.dtype == jnp.float32
    assert np.max(np.abs(np.asarray(low) - ref)) < 0.05 * np.max(np.abs(ref))


def test_config_validation():
    with pytest.raises(ConfigError, match="norm must be one of"):
        DiscriminatorConfig(norm="layer")
    with pytest.raises(ConfigError, match="num_layers must be a positive int"):
        DiscriminatorConfig(num_layers=0)
    with pytest.raises(ConfigError, match="dtype must be one of"):
        DiscriminatorConfig(dtype="fp8")
    with pytest.raises(ConfigError, match=r"divisible by it; \[48\] are not"):
        DiscriminatorConfig(channels=24, num_layers=1, norm="group", norm_groups=32)
    DiscriminatorConfig(channels=24, num_layers=1, norm="batch", norm_groups=32)  # groups unused: fine
    model = PatchDiscriminator(DiscriminatorConfig(channels=16, num_layers=3))
    with pytest.raises(ValueError, match="too small"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))  # 16/8 = 2 → no patch left
    with pytest.raises(ValueError, match=r"wants images \[B, H, W, 3\]"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))


def test_forward_flops_by_hand():
    # channels 16, L = 2, 32 px, 3 input channels; 2 · h · w · 16 · C_in · C_out per conv:
    #   conv_0  32→16 px, 3→16:   2 · 256 · 16 · 3 · 16   =   393,216
    #   conv_1  16→8 px, 16→32:   2 · 64 · 16 · 16 · 32   = 1,048,576
    #   conv_2  8→7 px, 32→64:    2 · 49 · 16 · 32 · 64   = 3,211,264
    #   conv_out 7→6 px, 64→1:    2 · 36 · 16 · 64 · 1    =    73,728
    cfg = DiscriminatorConfig(in_channels=3, channels=16, num_layers=2)
    assert forward_flops(cfg, 32) == 393_216 + 1_048_576 + 3_211_264 + 73_728
    assert output_size(cfg, 32) == 6
    assert output_size(DiscriminatorConfig(), 256) == 30  # taming's 30×30 patches at 256 px


# --------------------------------------------------------------------------- losses

REAL = np.array([[2.0, 0.5], [-1.0, 3.0]], np.float32)
FAKE = np.array([[-2.0, 0.0], [1.0, -0.5]], np.float32)


def test_hinge_d_loss_by_hand():
    # relu(1 − real) = [0, 0.5, 2, 0] → mean 0.625; relu(1 + fake) = [0, 1, 2, 0.5] → mean 0.875
    assert float(hinge_d_loss(REAL, FAKE)) == pytest.approx(0.5 * (0.625 + 0.875), abs=1e-6)


def test_vanilla_d_loss_by_hand():
    sp = lambda v: math.log1p(math.exp(v))
    real_term = (sp(-2.0) + sp(-0.5) + sp(1.0) + sp(-3.0)) / 4
    fake_term = (sp(-2.0) + sp(0.0) + sp(1.0) + sp(-0.5)) / 4
    assert float(vanilla_d_loss(REAL, FAKE)) == pytest.approx(0.5 * (real_term + fake_term), abs=1e-6)
    # large logits: no overflow (softplus, not log(1 + exp))
    assert float(vanilla_d_loss(np.array([100.0]), np.array([-100.0]))) == pytest.approx(0.0, abs=1e-6)


def test_generator_loss_by_hand():
    assert float(generator_loss(FAKE)) == pytest.approx(-(-2.0 + 0.0 + 1.0 - 0.5) / 4, abs=1e-6)
    sp = lambda v: math.log1p(math.exp(v))
    want = (sp(2.0) + sp(0.0) + sp(-1.0) + sp(0.5)) / 4
    assert float(generator_loss(FAKE, "non_saturating")) == pytest.approx(want, abs=1e-6)
    assert float(generator_loss(jnp.asarray(FAKE, jnp.bfloat16))) == pytest.approx(0.375, abs=1e-6)
    with pytest.raises(ValueError, match="unknown generator loss kind"):
        generator_loss(FAKE, "wasserstein")


def test_adaptive_weight_by_hand():
    # A decoder's last layer as a 1×1 conv = dense kernel w [C_in, C_out] on N pixels x [N, C_in]:
    #   L_rec = ½ Σ (x w − y)²          ∇_w L_rec = xᵀ (x w − y)
    #   L_G   = −(1/N) Σ_n (x w v)_n    ∇_w L_G   = −(1/N) (Σ_n x_n) ⊗ v     (D linear: D(o) = o·v)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3))
    y = rng.normal(size=(6, 2))
    v = rng.normal(size=(2,))
    w = rng.normal(size=(3, 2))
    n = x.shape[0]
    g_rec_hand = x.T @ (x @ w - y)
    g_gan_hand = -np.outer(x.sum(0), v) / n
    want = np.linalg.norm(g_rec_hand) / (np.linalg.norm(g_gan_hand) + 1e-4)

    xj, yj, vj = (jnp.asarray(a, jnp.float32) for a in (x, y, v))
    l_rec = lambda w: 0.5 * jnp.sum(jnp.square(xj @ w - yj))
    l_gan = lambda w: -jnp.mean((xj @ w) @ vj)
    wj = jnp.asarray(w, jnp.float32)
    g_rec, g_gan = jax.jit(lambda w: (jax.grad(l_rec)(w), jax.grad(l_gan)(w)))(wj)
    np.testing.assert_allclose(g_rec, g_rec_hand, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_gan, g_gan_hand, rtol=1e-5, atol=1e-6)
    assert float(adaptive_weight(g_rec, g_gan)) == pytest.approx(want, rel=1e-5)
    assert 0.0 < want < 1e4  # the unclamped case

    # the clamp at max_weight: a vanishing GAN gradient
    assert float(adaptive_weight(g_rec, 1e-9 * g_gan, max_weight=7.5)) == 7.5
    ratio = np.linalg.norm(g_rec_hand) / 1e-4
    assert ratio > 1e4 and float(adaptive_weight(g_rec, 0.0 * g_gan)) == pytest.approx(1e4)

    # stop-gradient: the weight is a constant to the outer gradient
    weight_of_w = lambda w: adaptive_weight(jax.grad(l_rec)(w), jax.grad(l_gan)(w))
    np.testing.assert_array_equal(jax.jit(jax.grad(weight_of_w))(wj), 0.0)
    unstopped = lambda w: jnp.linalg.norm(jax.grad(l_rec)(w)) / (jnp.linalg.norm(jax.grad(l_gan)(w)) + 1e-4)
    assert float(jnp.max(jnp.abs(jax.jit(jax.grad(unstopped))(wj)))) > 1e-3  # so the zero above means something


def test_gan_start_factor_under_jit():
    f = jax.jit(gan_start_factor)
    assert [float(f(jnp.int32(s), 10)) for s in (0, 9, 10, 11, 10_000)] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert float(f(jnp.int32(0), 0)) == 1.0
    assert gan_start_factor(5, 3).dtype == jnp.float32
    # a traced start step too (when it comes from the config as an array)
    assert float(f(jnp.int32(4), jnp.int32(5))) == 0.0
