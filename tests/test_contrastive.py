"""CLIP / SigLIP losses: numpy references, hand checks, global batch across meshes, the ring version."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax import sharding as shd
from mmjax.objectives.contrastive import clip_loss, siglip_loss, siglip_loss_chunked

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def _embeddings(batch=16, dim=8, seed=0, noise=1.0):
    """Normalised pairs: texts are the images plus noise, so the diagonal is (mostly) preferred."""
    rs = np.random.RandomState(seed)
    zi = rs.randn(batch, dim)
    zt = zi + noise * rs.randn(batch, dim)
    zi /= np.linalg.norm(zi, axis=1, keepdims=True)
    zt /= np.linalg.norm(zt, axis=1, keepdims=True)
    return zi.astype(np.float32), zt.astype(np.float32)


# ----------------------------------------------------------------------------- numpy references

def _np_logsumexp(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def np_clip_loss(zi, zt, t):
    """Symmetric CE with targets on the diagonal, written from the definition in float64."""
    zi, zt = zi.astype(np.float64), zt.astype(np.float64)
    s = t * zi @ zt.T
    batch = s.shape[0]
    i2t = -np.mean([s[i, i] - _np_logsumexp(s[i], 0) for i in range(batch)])
    t2i = -np.mean([s[j, j] - _np_logsumexp(s[:, j], 0) for j in range(batch)])
    acc_i2t = np.mean(np.argmax(s, axis=1) == np.arange(batch))
    acc_t2i = np.mean(np.argmax(s, axis=0) == np.arange(batch))
    return (i2t + t2i) / 2, acc_i2t, acc_t2i


def np_siglip_loss(zi, zt, t, b):
    """−1/B Σ_ij log σ(z_ij (t s_ij + b)), log σ(x) = −log(1 + e^{−x}), in float64."""
    zi, zt = zi.astype(np.float64), zt.astype(np.float64)
    batch = zi.shape[0]
    total = 0.0
    for i in range(batch):
        for j in range(batch):
            z = 1.0 if i == j else -1.0
            x = t * float(zi[i] @ zt[j]) + b
            total += np.logaddexp(0.0, -z * x)
    return total / batch


@pytest.mark.parametrize("t", [1.0, 14.3, 100.0])
def test_clip_loss_matches_numpy(t):
    zi, zt = _embeddings(batch=12, dim=8, seed=1)
    loss, m = clip_loss(jnp.asarray(zi), jnp.asarray(zt), t)
    want, acc_i2t, acc_t2i = np_clip_loss(zi, zt, t)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(m["i2t_accuracy"]), acc_i2t)
    np.testing.assert_allclose(float(m["t2i_accuracy"]), acc_t2i)
    np.testing.assert_allclose(float(m["loss_i2t"] + m["loss_t2i"]) / 2, want, rtol=1e-5, atol=1e-5)
    assert loss.dtype == jnp.float32


@pytest.mark.parametrize("t,b", [(10.0, -10.0), (1.0, 0.0), (30.0, -3.0)])
def test_siglip_loss_matches_numpy(t, b):
    zi, zt = _embeddings(batch=10, dim=8, seed=2)
    loss, m = siglip_loss(jnp.asarray(zi), jnp.asarray(zt), t, b)
    np.testing.assert_allclose(float(loss), np_siglip_loss(zi, zt, t, b), rtol=1e-5, atol=1e-5)
    _, acc_i2t, acc_t2i = np_clip_loss(zi, zt, t)  # argmax of t·s + b is the argmax of s
    np.testing.assert_allclose(float(m["i2t_accuracy"]), acc_i2t)
    np.testing.assert_allclose(float(m["t2i_accuracy"]), acc_t2i)


def test_hand_checks():
    # Perfect alignment: orthonormal pairs, zi = zt. With large t the diagonal wins every softmax:
    # loss = log(1 + (B−1) e^{−t}) ≈ 0 and both accuracies are 1.
    eye = np.eye(4, 8, dtype=np.float32)
    loss, m = clip_loss(eye, eye, 100.0)
    assert float(loss) < 1e-6
    assert float(m["i2t_accuracy"]) == float(m["t2i_accuracy"]) == 1.0
    # With t = 1 and orthogonal pairs: s = I, each row CE = log(e + B − 1) − 1.
    np.testing.assert_allclose(float(clip_loss(eye, eye, 1.0)[0]), np.log(np.e + 3) - 1, rtol=1e-6)
    # B = 1 SigLIP: one positive pair with s = 1 → −log σ(t + b).
    z = np.array([[0.6, 0.8]], np.float32)
    for t, b in [(10.0, -10.0), (2.0, 0.5), (1.0, -3.0)]:
        want = -np.log(1.0 / (1.0 + np.exp(-(t + b))))
        np.testing.assert_allclose(float(siglip_loss(z, z, t, b)[0]), want, rtol=1e-6)
    # Orthogonal pairs, B = 4: 4 positives with x = t + b, 12 negatives with x = b.
    t, b = 5.0, -2.0
    want = (4 * np.logaddexp(0, -(t + b)) + 12 * np.logaddexp(0, b)) / 4
    np.testing.assert_allclose(float(siglip_loss(eye, eye, t, b)[0]), want, rtol=1e-6)


def np_clip_loss_negatives(zi, zt, zn, valid, t):
    """NegCLIP: each image's softmax runs over the B texts and the valid negatives; texts → images
    as in CLIP. From the definition, float64."""
    zi, zt, zn = (x.astype(np.float64) for x in (zi, zt, zn))
    s, n = t * zi @ zt.T, t * zi @ zn[valid > 0].T
    batch = s.shape[0]
    i2t = -np.mean([s[i, i] - _np_logsumexp(np.concatenate([s[i], n[i]]), 0) for i in range(batch)])
    t2i = -np.mean([s[j, j] - _np_logsumexp(s[:, j], 0) for j in range(batch)])
    if len(zn) != batch:  # K negatives per text: the caller checks neg_accuracy
        return (i2t + t2i) / 2, None
    own = np.array([zi[i] @ zt[i] > zi[i] @ zn[i] for i in range(batch)])
    return (i2t + t2i) / 2, own[valid > 0].mean()


def np_siglip_loss_negatives(zi, zt, zn, valid, t, b):
    """SigLIP plus one −1 pair per (image, valid negative)."""
    extra = sum(np.logaddexp(0.0, t * float(zi[i].astype(np.float64) @ zn[k]) + b)
                for i in range(len(zi)) for k in range(len(zn)) if valid[k])
    return np_siglip_loss(zi, zt, t, b) + extra / len(zi)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_several_negatives_per_text_match_numpy(kind):
    """K negatives per text ([B, K, E], valid [B, K]): every valid negative is one more column of every
    image's row (CLIP) or one more −1 pair (SigLIP); neg_accuracy asks an image to beat all its own."""
    b_, k_, e_ = 6, 3, 8
    zi, zt = _embeddings(batch=b_, dim=e_, seed=7)
    _, zn = _embeddings(batch=b_ * k_, dim=e_, seed=8, noise=0.3)
    valid = np.ones((b_, k_), np.int32)
    valid[1, 2] = valid[4, :] = 0                                # one slot, and a whole row, without a negative
    t, b = 7.0, -1.5
    flat, flat_valid = zn, valid.reshape(-1)                      # text j's k-th negative: row j·K + k
    zn3 = zn.reshape(b_, k_, e_)
    if kind == "clip":
        loss, m = clip_loss(zi, zt, t, zn3, valid)
        want, _ = np_clip_loss_negatives(zi, zt, flat, flat_valid, t)
    else:
        loss, m = siglip_loss(zi, zt, t, b, zn3, valid)
        want = np_siglip_loss_negatives(zi, zt, flat, flat_valid, t, b)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-5)
    own = [all(zi[i] @ zt[i] > zi[i] @ zn3[i, k] for k in range(k_) if valid[i, k])
           for i in range(b_) if valid[i].any()]
    np.testing.assert_allclose(float(m["neg_accuracy"]), np.mean(own), atol=1e-6)
    # K = 1 as [B, 1, E] is the [B, E] form.
    one = clip_loss(zi, zt, t, zn3[:, :1], valid[:, :1])[0] if kind == "clip" else \
        siglip_loss(zi, zt, t, b, zn3[:, :1], valid[:, :1])[0]
    two = clip_loss(zi, zt, t, zn3[:, 0], valid[:, 0])[0] if kind == "clip" else \
        siglip_loss(zi, zt, t, b, zn3[:, 0], valid[:, 0])[0]
    np.testing.assert_allclose(float(one), float(two), rtol=1e-6)
    with pytest.raises(ValueError, match=r"neg_valid must be \[6, 3\]"):
        clip_loss(zi, zt, t, zn3, valid[:, 0])


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hard_negatives_match_numpy(kind):
    zi, zt = _embeddings(batch=10, dim=8, seed=4)
    _, zn = _embeddings(batch=10, dim=8, seed=5, noise=0.3)  # negatives close to other images
    valid = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], np.int32)
    t, b = 9.0, -3.0
    if kind == "clip":
        loss, m = clip_loss(zi, zt, t, zn, valid)
        want, neg_acc = np_clip_loss_negatives(zi, zt, zn, valid, t)
        # The invalid negatives drop out: the same as passing only the valid ones... and all
        # invalid is plain CLIP.
        np.testing.assert_allclose(float(clip_loss(zi, zt, t, zn, np.zeros(10, np.int32))[0]),
                                   np_clip_loss(zi, zt, t)[0], rtol=1e-5)
    else:
        loss, m = siglip_loss(zi, zt, t, b, zn, valid)
        want = np_siglip_loss_negatives(zi, zt, zn, valid, t, b)
        neg_acc = np.mean([zi[i] @ zt[i] > zi[i] @ zn[i] for i in range(10) if valid[i]])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(m["neg_accuracy"]), neg_acc, atol=1e-6)
    # A negative never lowers the loss (one more term in the softmax / one more positive term).
    assert float(loss) > float((clip_loss(zi, zt, t) if kind == "clip" else siglip_loss(zi, zt, t, b))[0])
    with pytest.raises(ValueError, match="zt_neg must be"):
        clip_loss(zi, zt, t, zn[:5], valid)
    with pytest.raises(ValueError, match="neg_valid must be"):
        siglip_loss(zi, zt, t, b, zn, valid[:5])


def test_losses_compute_in_float32():
    zi, zt = _embeddings(batch=8, dim=8)
    for loss in (clip_loss(zi.astype(jnp.bfloat16), zt.astype(jnp.bfloat16), 10.0)[0],
                 siglip_loss(zi.astype(jnp.bfloat16), zt.astype(jnp.bfloat16), 10.0, -10.0)[0]):
        assert loss.dtype == jnp.float32


def test_shape_errors():
    with pytest.raises(ValueError, match="equal shapes"):
        clip_loss(np.ones((4, 8), np.float32), np.ones((5, 8), np.float32), 1.0)


# ----------------------------------------------------------------------------- sharded = one device

def _clip_scalar(zi, zt, t, b):
    del b
    return clip_loss(zi, zt, t)[0]


def _siglip_scalar(zi, zt, t, b):
    return siglip_loss(zi, zt, t, b)[0]


def _negatives(zi, zt):
    """Hard negatives from the inputs (so gradients reach them): texts mixed with the batch
    reversed; every third one invalid."""
    zn = zt + 0.7 * jnp.flip(zi, 0)
    zn = zn / jnp.linalg.norm(zn, axis=1, keepdims=True)
    return zn, (jnp.arange(zi.shape[0]) % 3 != 0).astype(jnp.int32)


def _clip_neg_scalar(zi, zt, t, b):
    del b
    return clip_loss(zi, zt, t, *_negatives(zi, zt))[0]


def _siglip_neg_scalar(zi, zt, t, b):
    return siglip_loss(zi, zt, t, b, *_negatives(zi, zt))[0]


def _value_and_grads(fn, *args):
    return jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(*args)


def _assert_close(got, want, tol=1e-5):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def _sharded_inputs(mesh, zi, zt, t, b):
    batch = shd.batch_sharding(mesh, 2)
    rep = NamedSharding(mesh, P())
    return (jax.device_put(zi, batch), jax.device_put(zt, batch),
            jax.device_put(jnp.float32(t), rep), jax.device_put(jnp.float32(b), rep))


@needs8
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
@pytest.mark.parametrize("fn", [_clip_scalar, _siglip_scalar, _clip_neg_scalar, _siglip_neg_scalar],
                         ids=["clip", "siglip", "clip_negatives", "siglip_negatives"])
def test_global_batch_loss_under_sharding(mesh_shape, fn):
    zi, zt = _embeddings(batch=16, dim=8, seed=3)
    t, b = 12.0, -4.0
    single = jax.device_put((zi, zt, jnp.float32(t), jnp.float32(b)), jax.devices()[0])
    want = jax.jit(_value_and_grads, static_argnums=0)(fn, *single)

    mesh = shd.make_mesh(shd.MeshConfig(shape=mesh_shape))
    args = _sharded_inputs(mesh, zi, zt, t, b)
    assert args[0].sharding.spec == P(("data", "fsdp"), None)
    assert len(args[0].sharding.device_set) == 8
    got = jax.jit(_value_and_grads, static_argnums=0)(fn, *args)
    _assert_close(got, want)
    # The gradients come back batch-sharded like the inputs (nothing forced onto one device).
    assert got[1][0].shape == zi.shape


# ----------------------------------------------------------------------------- ring version

@needs8
@pytest.mark.parametrize("mesh_shape,axes", [((8, 1, 1), ("data", "fsdp")),
                                             ((2, 2, 2), ("data", "fsdp")),
                                             ((2, 2, 2), ("data", "fsdp", "tensor")),
                                             ((2, 2, 2), ("fsdp",))])
def test_chunked_siglip_equals_full(mesh_shape, axes):
    zi, zt = _embeddings(batch=16, dim=8, seed=4, noise=0.5)
    t, b = 10.0, -3.0
    want = jax.jit(_value_and_grads, static_argnums=0)(_siglip_scalar, zi, zt, jnp.float32(t),
                                                       jnp.float32(b))
    np.testing.assert_allclose(float(want[0]), np_siglip_loss(zi, zt, t, b), rtol=1e-5)

    mesh = shd.make_mesh(shd.MeshConfig(shape=mesh_shape))
    args = _sharded_inputs(mesh, zi, zt, t, b)

    def chunked(zi, zt, t, b):
        return siglip_loss_chunked(zi, zt, t, b, mesh=mesh, axes=axes)

    # Eager and inside a jitted function (mesh given explicitly).
    np.testing.assert_allclose(float(chunked(*args)), float(want[0]), rtol=1e-5)
    got = jax.jit(_value_and_grads, static_argnums=0)(chunked, *args)
    _assert_close(got, want)

    # Inside a train-step-like jit under jax.set_mesh, the mesh is taken from the context.
    with jax.set_mesh(mesh):
        got_ctx = jax.jit(_value_and_grads, static_argnums=0)(
            lambda *a: siglip_loss_chunked(*a, axes=axes), *args)
    _assert_close(got_ctx, want)


@needs8
def test_chunked_siglip_indivisible_batch():
    zi, zt = _embeddings(batch=12, dim=8)
    mesh = shd.make_mesh(shd.MeshConfig(shape=(8, 1, 1)))
    with pytest.raises(ValueError, match="not divisible by the ring size 8"):
        siglip_loss_chunked(zi, zt, 10.0, -10.0, mesh=mesh)
    mesh = shd.make_mesh(shd.MeshConfig(shape=(2, 2, 2)))
    assert np.isfinite(float(siglip_loss_chunked(zi, zt, 10.0, -10.0, mesh=mesh)))  # ring of 4
    with pytest.raises(ValueError, match="not divisible by the ring size 4"):
        siglip_loss_chunked(zi[:6], zt[:6], 10.0, -10.0, mesh=mesh)
    with pytest.raises(ValueError, match="not axes of the mesh"):
        siglip_loss_chunked(zi, zt, 10.0, -10.0, mesh=mesh, axes=("batch",))


@needs8
def test_chunked_siglip_never_forms_global_matrix():
    """The compiled HLO (forward + backward) has b×b blocks but no B×B array; the GSPMD one has."""
    batch, dim = 64, 16  # b = 8 per device on 8 devices
    zi, zt = _embeddings(batch=batch, dim=dim, seed=5)
    mesh = shd.make_mesh(shd.MeshConfig(shape=(8, 1, 1)))
    args = _sharded_inputs(mesh, zi, zt, 10.0, -10.0)

    def chunked(zi, zt, t, b):
        return siglip_loss_chunked(zi, zt, t, b, mesh=mesh)

    hlo = jax.jit(_value_and_grads, static_argnums=0).lower(chunked, *args).compile().as_text()
    assert f"f32[{batch},{batch}]" not in hlo
    assert "f32[8,8]" in hlo
    # Control: the same search finds the B×B logits of the plain loss on one device.
    hlo_full = jax.jit(_value_and_grads, static_argnums=0).lower(
        _siglip_scalar, zi, zt, jnp.float32(10.0), jnp.float32(-10.0)).compile().as_text()
    assert f"f32[{batch},{batch}]" in hlo_full
