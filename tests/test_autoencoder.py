"""The conv autoencoder (VQ and KL) and the vector quantizer: equations against numpy, gradients,
the trainer's pure functions, and diffusers' VectorQuantizer loss. Weight parity with diffusers and
taming is in tests/test_convert_diffusers.py."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.autoencoder import (
    Autoencoder,
    AutoencoderConfig,
    detokenize,
    forward_flops,
    tokenize,
)
from mmjax.models.quantizer import (
    QuantizerConfig,
    VectorQuantizer,
    codebook_usage,
    ema_init,
    ema_restart,
    ema_update,
    nearest_code,
    perplexity,
    restart_dead_codes,
    usage_update,
)

TINY = dict(channels=32, channel_mults=(1, 2), blocks_per_level=1, attn_levels=(1,), latent_channels=4,
            image_size=16)
TINY_VQ = QuantizerConfig(codebook_size=16, code_dim=3, l2_normalize=False, legacy=True)
TINY_KL = dict(blocks_per_level=2, attn_levels=(), norm_groups=16)


def _images(seed=0, b=2, s=16, c=3):
    return np.random.default_rng(seed).uniform(-1, 1, (b, s, s, c)).astype(np.float32)


# ------------------------------------------------------------------------------------------ config
def test_config_validation_names_level_and_numbers():
    with pytest.raises(ValueError, match=r"level 1: channels\*mult = 48\*3 = 144 is not divisible by norm_groups=32"):
        AutoencoderConfig(channels=48, channel_mults=(2, 3), norm_groups=32, image_size=32)
    with pytest.raises(ValueError, match=r"attn_levels=\(2,\) must be distinct levels in 0..1"):
        AutoencoderConfig(**{**TINY, "attn_levels": (2,)})
    with pytest.raises(ValueError, match="kind='gan'"):
        AutoencoderConfig(kind="gan")
    with pytest.raises(ValueError, match="legacy=True only describes"):
        QuantizerConfig(legacy=True, ema_decay=0.99)


# --------------------------------------------------------------------------------------- quantizer
@functools.partial(jax.jit, static_argnums=(0,))
def _quantize(cfg: QuantizerConfig, z, codebook):
    return VectorQuantizer(cfg).apply({"params": {"embedding": codebook}}, z)


def _np_quantize(z, codebook, l2):
    if l2:
        z = z / np.linalg.norm(z, axis=-1, keepdims=True)
        codebook = codebook / np.linalg.norm(codebook, axis=-1, keepdims=True)
    flat = z.reshape(-1, z.shape[-1])
    d = ((flat[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)  # brute force [N, K]
    idx = d.argmin(1)
    z_q = codebook[idx].reshape(z.shape)
    return z, z_q, idx.reshape(z.shape[:-1])


@pytest.mark.parametrize("l2", [False, True])
def test_nearest_code_and_losses_against_numpy(l2):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 5, 5, 4)).astype(np.float32)
    codebook = rng.standard_normal((12, 4)).astype(np.float32)
    for legacy in (False, True):
        cfg = QuantizerConfig(codebook_size=12, code_dim=4, l2_normalize=l2, beta=0.3, legacy=legacy)
        z_q, aux = _quantize(cfg, z, codebook)
        zn, ref_q, ref_idx = _np_quantize(z, codebook, l2)
        np.testing.assert_array_equal(np.asarray(aux["indices"]), ref_idx)
        np.testing.assert_allclose(np.asarray(z_q), ref_q, atol=1e-6)
        mse = np.mean((ref_q - zn) ** 2)
        np.testing.assert_allclose(float(aux["codebook_loss"]), mse, rtol=1e-5)
        np.testing.assert_allclose(float(aux["commitment_loss"]), mse, rtol=1e-5)
        np.testing.assert_allclose(float(aux["loss"]), 1.3 * mse, rtol=1e-5)
        hist = np.bincount(ref_idx.reshape(-1), minlength=12) / ref_idx.size
        p = hist[hist > 0]
        np.testing.assert_allclose(float(aux["perplexity"]), np.exp(-(p * np.log(p)).sum()), rtol=1e-5)
        np.testing.assert_allclose(float(aux["usage"]), (hist > 0).mean(), rtol=1e-6)
    # The distance as written (‖z‖² − 2z·e + ‖e‖²) against brute force on a bigger draw.
    flat = rng.standard_normal((300, 8)).astype(np.float32)
    book = rng.standard_normal((64, 8)).astype(np.float32)
    brute = ((flat[:, None] - book[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(np.asarray(nearest_code(jnp.asarray(flat), jnp.asarray(book))), brute)


def test_straight_through_and_loss_gradients():
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.standard_normal((2, 3, 3, 4)), jnp.float32)
    codebook = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal(z.shape), jnp.float32)
    cfg = QuantizerConfig(codebook_size=6, code_dim=4, l2_normalize=False, beta=0.25)
    vq = VectorQuantizer(cfg)

    def recon_term(z, e):  # a stand-in for "the decoder's loss": linear in z_q
        return jnp.sum(w * vq.apply({"params": {"embedding": e}}, z)[0])

    # d/dz through the quantizer is the identity (straight-through), and no decoder gradient reaches the codes.
    gz, ge = jax.jit(jax.grad(recon_term, argnums=(0, 1)))(z, codebook)
    np.testing.assert_allclose(np.asarray(gz), np.asarray(w), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ge), 0.0)

    def loss(z, e):
        return vq.apply({"params": {"embedding": e}}, z)[1]["loss"]

    gz, ge = jax.jit(jax.grad(loss, argnums=(0, 1)))(z, codebook)
    _, z_q, idx = _np_quantize(np.asarray(z), np.asarray(codebook), False)
    n = z.size
    # loss = mean((z_q − sg z)²) + β·mean((z − sg z_q)²): z only feels β·commitment, the codes only the codebook term.
    np.testing.assert_allclose(np.asarray(gz), 0.25 * 2 * (np.asarray(z) - z_q) / n, rtol=1e-5, atol=1e-7)
    ref_ge = np.zeros_like(np.asarray(codebook))
    np.add.at(ref_ge, idx.reshape(-1), (2 * (z_q - np.asarray(z)) / n).reshape(-1, 4))
    np.testing.assert_allclose(np.asarray(ge), ref_ge, rtol=1e-5, atol=1e-7)
    # With an EMA codebook no gradient reaches the codes at all.
    ema = VectorQuantizer(QuantizerConfig(codebook_size=6, code_dim=4, l2_normalize=False, ema_decay=0.9))
    ge = jax.jit(jax.grad(lambda e: ema.apply({"params": {"embedding": e}}, z)[1]["loss"]))(codebook)
    np.testing.assert_array_equal(np.asarray(ge), 0.0)


def test_loss_equals_diffusers_vector_quantizer():
    torch = pytest.importorskip("torch")
    from diffusers.models.autoencoders.vae import VectorQuantizer as DiffusersVQ

    rng = np.random.default_rng(2)
    z = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)  # NCHW
    ref = DiffusersVQ(10, 4, beta=0.25, legacy=True)
    with torch.no_grad():
        ref.embedding.weight.copy_(torch.from_numpy(rng.standard_normal((10, 4)).astype(np.float32)))
        ref_zq, ref_loss, (_, _, ref_idx) = ref(torch.from_numpy(z))
    cfg = QuantizerConfig(codebook_size=10, code_dim=4, l2_normalize=False, beta=0.25, legacy=True)
    z_q, aux = _quantize(cfg, z.transpose(0, 2, 3, 1), ref.embedding.weight.detach().numpy())
    np.testing.assert_allclose(float(aux["loss"]), float(ref_loss), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["indices"]).reshape(-1), ref_idx.numpy().reshape(-1))
    np.testing.assert_allclose(np.asarray(z_q), ref_zq.numpy().transpose(0, 2, 3, 1), atol=1e-6)


def test_ema_update_by_hand():
    codebook = jnp.asarray([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    state = ema_init(codebook)
    z = jnp.asarray([[0.2, 0.0], [0.0, 0.2], [1.2, 0.4], [0.8, 0.0]])
    idx = jnp.asarray([0, 0, 1, 1])  # code 2 unused
    decay, eps = 0.5, 1e-5
    new_state, new_codebook = jax.jit(ema_update, static_argnums=(3, 4))(state, z, idx, decay, eps)
    size = np.array([0.5 * 1 + 0.5 * 2, 0.5 * 1 + 0.5 * 2, 0.5 * 1 + 0.5 * 0])  # [1.5, 1.5, 0.5]
    sums = np.array([[0.5 * 0 + 0.5 * 0.2, 0.5 * 0 + 0.5 * 0.2],
                     [0.5 * 1 + 0.5 * 2.0, 0.5 * 0 + 0.5 * 0.4],
                     [0.5 * 0, 0.5 * 1]])
    n = size.sum()
    smoothed = (size + eps) / (n + 3 * eps) * n
    np.testing.assert_allclose(np.asarray(new_state["cluster_size"]), size, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new_state["embed_sum"]), sums, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new_codebook), sums / smoothed[:, None], rtol=1e-5)
    # The unused code keeps its value (up to the smoothing): it is not divided by ~eps.
    np.testing.assert_allclose(np.asarray(new_codebook[2]), [0.0, 1.0], atol=1e-4)


def test_usage_restart_and_metrics():
    codebook = jnp.arange(10.0).reshape(5, 2) + 100.0
    recent = jnp.asarray(np.random.default_rng(0).standard_normal((7, 2)), jnp.float32)

    @jax.jit
    def step(ids, codebook, recent, rng):  # as a trainer would call them: inside its jitted step
        counts = usage_update(jnp.zeros(5), ids, decay=0.9)
        new, new_counts, n = restart_dead_codes(codebook, counts, recent, rng, threshold=0.05,
                                                l2_normalize_codes=True)
        return counts, codebook_usage(counts), perplexity(jnp.asarray([2.0, 2.0, 0.0, 0.0])), new, new_counts, n

    counts, usage, ppl, new, new_counts, n = step(jnp.asarray([0, 0, 1, 3]), codebook, recent, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(counts), [0.2, 0.1, 0.0, 0.1, 0.0], atol=1e-7)
    np.testing.assert_allclose(float(usage), 0.6)
    np.testing.assert_allclose(float(ppl), 2.0, rtol=1e-6)
    dead = np.array([False, False, True, False, True])
    assert int(n) == 2
    np.testing.assert_array_equal(np.asarray(new)[~dead], np.asarray(codebook)[~dead])
    recent_n = np.asarray(recent) / np.linalg.norm(np.asarray(recent), axis=1, keepdims=True)
    for row in np.asarray(new)[dead]:  # each restarted code is one of the recent (normalised) outputs
        assert np.min(np.abs(recent_n - row).sum(1)) < 1e-6
    np.testing.assert_allclose(np.asarray(new_counts)[dead], float(np.mean(np.asarray(counts))), rtol=1e-6)
    state = ema_restart(ema_init(codebook), new, jnp.asarray(dead))
    np.testing.assert_allclose(np.asarray(state["embed_sum"]), np.asarray(new))


# ------------------------------------------------------------------------------------- autoencoder
def random_variables(model, x, seed=0):
    """Params of the model's shapes drawn with numpy (norm scales around 1, everything else around 0).

    Compiling the model's `init` costs ~15 s on 2 cores (a random draw per param); the tests only
    need the shapes from `jax.eval_shape`, and non-trivial biases and norms besides."""
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(x)))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        base = 1.0 if "norm" in name and "scale" in name else 0.0
        scale = 0.5 if "embedding" in name else 0.1
        return jnp.asarray(base + scale * rng.standard_normal(leaf.shape), leaf.dtype)
    return jax.tree_util.tree_map_with_path(draw, abstract)


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(model, variables, x, rng):
    return model.apply(variables, x, sample_rng=rng)


@pytest.fixture(scope="module")
def vq():
    # The configs of tests/test_convert_diffusers.py's diffusers cases: the same programs, compiled once
    # when both files run (the test session's compilation cache).
    model = Autoencoder(AutoencoderConfig(kind="vq", **TINY, quantizer=TINY_VQ))
    x = _images()
    variables = random_variables(model, x)
    out, aux = _forward(model, variables, x, None)
    return dict(model=model, variables=variables, x=x, out=out, aux=aux)


@pytest.fixture(scope="module")
def kl():
    model = Autoencoder(AutoencoderConfig(kind="kl", **{**TINY, **TINY_KL}))
    x = _images(1)
    variables = random_variables(model, x)
    out, aux = _forward(model, variables, x, None)
    return dict(model=model, variables=variables, x=x, out=out, aux=aux)


def test_param_tree_and_logical_axes(vq, kl):
    params = nn.unbox(vq["variables"])["params"]
    assert sorted(params) == ["decoder", "encoder", "post_quant_conv", "quant_conv", "quantizer"]
    assert sorted(nn.unbox(kl["variables"])["params"]) == ["decoder", "encoder", "post_quant_conv", "quant_conv"]
    assert params["decoder"]["conv_out"]["kernel"].shape == (3, 3, 32, 3)
    assert params["quantizer"]["embedding"].shape == (16, 3)
    assert params["encoder"]["down_0"]["downsample"]["conv"]["kernel"].shape == (3, 3, 32, 32)
    assert params["encoder"]["down_1"]["block_0"]["conv_shortcut"]["kernel"].shape == (1, 1, 32, 64)
    assert len([k for k in params["decoder"]["up_1"] if k.startswith("block_")]) == 2  # blocks_per_level + 1
    assert "attn_0" in params["decoder"]["up_1"] and "attn_0" not in params["decoder"]["up_0"]
    boxed = jax.eval_shape(vq["model"].init, jax.random.key(0), jnp.asarray(vq["x"]))
    specs = nn.get_partition_spec(boxed)["params"]
    assert tuple(specs["encoder"]["conv_in"]["kernel"]) == (None, None, None, "embed")
    assert tuple(specs["encoder"]["conv_in"]["bias"]) == ("embed",)
    assert tuple(specs["encoder"]["norm_out"]["scale"]) == ("norm",)
    assert tuple(specs["quantizer"]["embedding"]) == ("vocab", None)
    assert tuple(specs["encoder"]["mid"]["attn"]["query"]["kernel"]) == (None, "embed")


def test_vq_methods_agree(vq):
    model, v, x, out, aux = vq["model"], vq["variables"], vq["x"], vq["out"], vq["aux"]
    assert out.shape == x.shape and aux["z"].shape == (2, 8, 8, 3) and aux["indices"].shape == (2, 8, 8)
    assert aux["indices"].dtype == jnp.int32
    assert aux["decoder_features"].shape == (2, 16, 16, 32)
    for k in ("codebook_loss", "commitment_loss", "quant_loss", "perplexity", "usage"):
        assert aux[k].shape == () and np.isfinite(float(aux[k]))

    @jax.jit
    def pieces(v, x, features):
        z = model.apply(v, x, method=Autoencoder.encode)
        z_q, q = model.apply(v, z, method=Autoencoder.quantize)
        recon = model.apply(v, z_q, method=Autoencoder.decode)
        head = model.apply(v, features, method=Autoencoder.pixels_from_features)
        # The pure functions, traced inside a jit like a user's own step would.
        ids = tokenize(model, v["params"], x)
        images = detokenize(model, v, ids)  # {"params": ...} or the bare tree: both accepted
        return z, q["indices"], recon, head, ids, images

    z, q_ids, recon, head, ids, images = pieces(v, x, aux["decoder_features"])
    np.testing.assert_allclose(np.asarray(z), np.asarray(aux["z"]), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(q_ids), np.asarray(aux["indices"]))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(aux["indices"]))
    assert ids.dtype == jnp.int32 and ids.shape == (2, 8, 8)
    for y in (recon, head, images):
        np.testing.assert_allclose(np.asarray(y), np.asarray(out), atol=1e-5)


def test_adaptive_weight_gradient_path(vq):
    """The trainer's VQ-GAN adaptive weight needs ∇ of a loss w.r.t. decoder/conv_out/kernel."""
    model, v, aux = vq["model"], nn.unbox(vq["variables"]), vq["aux"]
    conv_out = v["params"]["decoder"]["conv_out"]

    def pixels(kernel):
        p = {**v["params"], "decoder": {**v["params"]["decoder"], "conv_out": {**conv_out, "kernel": kernel}}}
        return model.apply({"params": p}, aux["decoder_features"], method=Autoencoder.pixels_from_features)

    y, vjp = jax.vjp(pixels, conv_out["kernel"])
    (g,) = vjp(jnp.ones_like(y))
    feats = np.asarray(aux["decoder_features"])
    # d Σ conv(h) / d kernel[dy, dx, i, o] = Σ over positions of the shifted input channel i (zero-padded).
    padded = np.pad(feats, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = np.stack([np.stack([padded[:, dy:dy + 16, dx:dx + 16].sum((0, 1, 2)) for dx in range(3)])
                    for dy in range(3)])
    np.testing.assert_allclose(np.asarray(g), np.repeat(ref[..., None], 3, -1), rtol=1e-4, atol=1e-3)


def test_kl_aux_and_sampling(kl):
    model, v, x, aux = kl["model"], kl["variables"], kl["x"], kl["aux"]
    mean, logvar = np.asarray(aux["mean"]), np.asarray(aux["logvar"])
    assert mean.shape == (2, 8, 8, 4) and aux["kl"].shape == (2,)
    ref_kl = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(aux["kl"]), ref_kl, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["z"]), mean)

    @jax.jit
    def run(v, x, k1, k2):
        _, sampled = model.apply(v, x, sample_rng=k1)
        samples = model.apply(v, k2, 3, method=Autoencoder.sample_prior)
        return sampled["z"], samples

    # Keys are arguments: a constant key would make XLA fold the random draw while compiling.
    z, samples = run(v, x, jax.random.key(3), jax.random.key(1))
    eps = (np.asarray(z) - mean) / np.exp(0.5 * logvar)
    assert 0.5 < eps.std() < 1.5 and np.abs(eps).max() > 0
    assert samples.shape == (3, 16, 16, 3) and np.isfinite(np.asarray(samples)).all()
    with pytest.raises(ValueError, match="needs kind='vq'"):
        model.apply(v, jnp.zeros((1, 8, 8), jnp.int32), method=Autoencoder.decode_indices)


def test_bfloat16_compute_float32_params():
    cfg = AutoencoderConfig(kind="vq", channels=32, channel_mults=(1,), blocks_per_level=1, latent_channels=4,
                            image_size=8, dtype="bfloat16", mid_attention=False,
                            quantizer=QuantizerConfig(codebook_size=8, code_dim=4, l2_normalize=True))
    model = Autoencoder(cfg)
    x = _images(s=8)
    v = random_variables(model, x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(v)))
    out, aux = _forward(model, v, x, None)
    assert out.dtype == jnp.bfloat16 and aux["decoder_features"].dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(out, np.float32)).all()


def test_forward_flops(kl):
    # One level, no attention, VQ: count by hand.
    cfg = AutoencoderConfig(kind="vq", channels=32, channel_mults=(1,), blocks_per_level=1, mid_attention=False,
                            latent_channels=4, image_size=8, quantizer=QuantizerConfig(codebook_size=16, code_dim=2))
    n = 8 * 8
    conv3 = lambda cin, cout: 2 * n * 9 * cin * cout
    conv1 = lambda cin, cout: 2 * n * cin * cout
    resnet = 2 * conv3(32, 32)
    encoder = conv3(3, 32) + resnet + 2 * resnet + conv3(32, 4)
    middle = conv1(4, 2) + 2 * n * 16 * 2 + conv1(2, 4)
    decoder = conv3(4, 32) + 2 * resnet + 2 * resnet + conv3(32, 3)
    assert forward_flops(cfg, 8) == encoder + middle + decoder
    # Against XLA's own count for a model with attention and two levels (the kl fixture's program, so
    # the compilation cache has it): XLA skips the products with the zero padding at the borders, so
    # it counts somewhat less (~8% at 16×16).
    cost = _forward.lower(kl["model"], kl["variables"], kl["x"], None).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert 0.85 < cost["flops"] / (2 * forward_flops(kl["model"].config, 16)) < 1.0


def test_patch_encoder_codes_see_their_own_patch_only():
    """taming's encoder lets a pixel far away move every latent; encoder="patch" keeps latent (i, j) a
    function of pixel patch (i, j): a change anywhere else leaves it bit for bit, a change inside moves it."""
    base = dict(kind="vq", channels=8, channel_mults=(1, 2, 4), blocks_per_level=2, norm_groups=1, latent_channels=4,
                image_size=16, quantizer=QuantizerConfig(codebook_size=16, code_dim=4))
    x = np.random.default_rng(0).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    outside = x.copy()
    outside[0, 4:, :] *= -1.0  # every row below the top row of 4×4 patches
    outside[0, :4, 4:] *= -1.0  # and the top row right of patch (0, 0)
    inside = x.copy()
    inside[0, 3, 3] *= -1.0  # one pixel of patch (0, 0)
    for kind in ("conv", "patch"):
        model = Autoencoder(AutoencoderConfig(**base, encoder=kind))
        variables = model.init(jax.random.key(0), x)
        enc = lambda im, m=model, v=variables: np.asarray(m.apply(v, im, method=m.encode))
        z, z_out, z_in = enc(x), enc(outside), enc(inside)
        assert z.shape == (1, 4, 4, 4)
        if kind == "patch":
            np.testing.assert_array_equal(z[0, 0, 0], z_out[0, 0, 0])
            np.testing.assert_array_equal(z[0, 1:], enc(inside)[0, 1:])  # the other patches ignore the pixel
            assert np.abs(z[0, 0, 0] - z_in[0, 0, 0]).max() > 1e-4
            assert set(variables["params"]["encoder"]) == {"conv_in", "block_0_norm", "block_0_fc1", "block_0_fc2",
                                                           "block_1_norm", "block_1_fc1", "block_1_fc2", "norm_out",
                                                           "conv_out"}
        else:
            assert np.abs(z[0, 0, 0] - z_out[0, 0, 0]).max() > 1e-4
    with pytest.raises(ValueError, match="encoder='mlp' must be 'conv' or 'patch'"):
        AutoencoderConfig(**base, encoder="mlp")
    # FLOPs by hand: the patch encoder (patchify 4×4×3 → 32, two MLPs 32 → 128 → 32, 1×1 conv 32 → 4)
    # replaces taming's encoder (conv_in, levels of 8/16/32 channels at 16/8/4 px, mid with attention,
    # conv_out); the rest of the model is the same
    conv = lambda s, k, cin, cout: 2 * s * s * k * k * cin * cout
    resnet = lambda s, cin, cout: conv(s, 3, cin, cout) + conv(s, 3, cout, cout) + (conv(s, 1, cin, cout)
                                                                                     if cin != cout else 0)
    patch = conv(4, 4, 3, 32) + 2 * 2 * conv(4, 1, 32, 128) + conv(4, 1, 32, 4)
    taming = (conv(16, 3, 3, 8) + 2 * resnet(16, 8, 8) + conv(8, 3, 8, 8)
              + resnet(8, 8, 16) + resnet(8, 16, 16) + conv(4, 3, 16, 16) + resnet(4, 16, 32) + resnet(4, 32, 32)
              + 2 * resnet(4, 32, 32) + 4 * 2 * 16 * 32 * 32 + 2 * 2 * 16 * 16 * 32 + conv(4, 3, 32, 4))
    conv_cfg, patch_cfg = AutoencoderConfig(**base), AutoencoderConfig(**base, encoder="patch")
    assert forward_flops(conv_cfg, 16) - taming == forward_flops(patch_cfg, 16) - patch
