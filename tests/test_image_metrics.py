"""PSNR, the Fréchet distance and KID against hand computations and direct implementations; the shapes
probe's targets and scores on hand-built examples, a short training run and its cache."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data import registry
from mmjax.data import shapes as S
from mmjax.data.config import DataConfig
from mmjax.evals import probe as P
from mmjax.evals.images import frechet_distance, frechet_distance_from_stats, kid, mean_psnr, psnr


def test_psnr_by_hand():
    x = np.zeros((2, 2, 2, 1), np.float32)
    y = x.copy()
    y[0, 0, 0, 0] = 1.0  # image 0: MSE = 1/4 → 10·log10(4 / 0.25) = 10·log10(16)
    y[1] = 0.5  # image 1: MSE = 0.25 as well, in [0, 1] units
    np.testing.assert_allclose(psnr(x, y), [10 * np.log10(16)] * 2, rtol=1e-6)
    np.testing.assert_allclose(psnr(x, y, data_range=1.0), [10 * np.log10(4)] * 2, rtol=1e-6)
    assert mean_psnr(x, y) == pytest.approx(10 * np.log10(16), rel=1e-6)
    assert np.isinf(psnr(x, x)).all()
    jitted = jax.jit(psnr)(jnp.asarray(x), jnp.asarray(y))  # the same under jit
    np.testing.assert_allclose(np.asarray(jitted), [10 * np.log10(16)] * 2, rtol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        psnr(x, y[:1])


def test_frechet_distance_one_dimensional_by_hand():
    # 1-D Gaussians: (μa − μb)² + σa² + σb² − 2σaσb = (μa − μb)² + (σa − σb)².
    a = np.array([[0.0], [2.0]])  # μ 1, var (unbiased) 2
    b = np.array([[3.0], [5.0], [7.0]])  # μ 5, var 4
    want = (1 - 5) ** 2 + (np.sqrt(2) - 2) ** 2
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_diagonal_gaussians_closed_form():
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    want = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    got = frechet_distance_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    assert got == pytest.approx(want, rel=1e-9)


def test_frechet_distance_samples():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert abs(frechet_distance(a, a)) < 1e-8
    b = rng.normal(size=(4000, 3)) * 2.0 + np.array([1.0, 0.0, 0.0])
    want = 1.0 + 3 * (1 - 2) ** 2  # from the true parameters
    assert frechet_distance(a, b) == pytest.approx(want, rel=0.1)
    # Singular covariances (fewer samples than features): finite, through the εI fallback.
    few = rng.normal(size=(5, 16))
    assert np.isfinite(frechet_distance(few, rng.normal(size=(6, 16))))


def _kid_double_loop(a, b):
    """Unbiased MMD² with k(x, y) = (x·y/F + 1)³, written out pair by pair."""
    f = a.shape[1]
    k = lambda u, v: (float(np.dot(u, v)) / f + 1.0) ** 3
    m, n = len(a), len(b)
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_the_double_loop_on_a_tiny_case():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) + 0.3
    # subset_size = N: every subset is a permutation of all rows, so each equals the full estimate.
    mean, std = kid(a, b, subsets=3, subset_size=5)
    assert mean == pytest.approx(_kid_double_loop(a, b), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-10)


def test_kid_same_distribution_near_zero_shifted_clearly_positive():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
    same, same_std = kid(a, b, subsets=20, subset_size=200)
    shifted, _ = kid(a, b + 0.5, subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 0.05 and shifted > 20 * abs(same)
    assert kid(a, b, subsets=5, subset_size=100, seed=3) == kid(a, b, subsets=5, subset_size=100, seed=3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="features"):
        frechet_distance(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="widths differ"):
        kid(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 2)), np.zeros((3, 2)))


# --- the shapes probe ----------------------------------------------------------------------------

def _labels(*scenes):
    """Dataset-style labels from [(background, [(shape, color, size, position), ...]), ...]."""
    pad = lambda vals: vals + [-1] * (3 - len(vals))
    return {"num_objects": np.array([len(objs) for _, objs in scenes], np.int32),
            "shape": np.array([pad([o[0] for o in objs]) for _, objs in scenes], np.int32),
            "color": np.array([pad([o[1] for o in objs]) for _, objs in scenes], np.int32),
            "size": np.array([pad([o[2] for o in objs]) for _, objs in scenes], np.int32),
            "position": np.array([pad([o[3] for o in objs]) for _, objs in scenes], np.int32),
            "background": np.array([bg for bg, _ in scenes], np.int32)}


SCENES = _labels((0, [(2, 5, 1, 0), (0, 7, 0, 8)]),  # a large blue triangle top left, a small white circle bottom right
                 (2, [(5, 1, 1, 4)]))  # navy background, a large orange star in the center


def test_cell_targets_by_hand():
    t = P.cell_targets(SCENES)
    want_shape = np.zeros((2, 9), np.int32)
    want_shape[0, 0], want_shape[0, 8], want_shape[1, 4] = 3, 1, 6  # 1 + shape index
    np.testing.assert_array_equal(t["cell_shape"], want_shape)
    want_color = np.full((2, 9), -1)
    want_color[0, 0], want_color[0, 8], want_color[1, 4] = 5, 7, 1
    np.testing.assert_array_equal(t["cell_color"], want_color)
    want_size = np.full((2, 9), -1)
    want_size[0, 0], want_size[0, 8], want_size[1, 4] = 1, 0, 1
    np.testing.assert_array_equal(t["cell_size"], want_size)
    np.testing.assert_array_equal(t["occupied"], want_shape > 0)
    np.testing.assert_array_equal(t["background"], [0, 2])
    with pytest.raises(ValueError, match="share a cell"):
        P.cell_targets(_labels((0, [(0, 0, 0, 3), (1, 1, 1, 3)])))
    bad = _labels((0, [(0, 0, 0, 3)]))
    bad["shape"][0, 2] = 4  # a label beyond num_objects
    with pytest.raises(ValueError, match="padding"):
        P.cell_targets(bad)


def test_attribute_accuracy_on_hand_built_predictions():
    t = P.cell_targets(SCENES)
    pred = {k: t[k].copy() for k in ("cell_shape", "cell_color", "cell_size", "background")}
    perfect = P.accuracy_from_predictions(pred, SCENES)
    assert perfect == {k: 1.0 for k in P.ATTRIBUTES}
    pred["cell_color"][0, 8] = 3  # image 0: the circle's color wrong (1 of 3 objects)
    pred["cell_shape"][1, 2] = 4  # image 1: a phantom object in an empty cell
    pred["background"][1] = 0
    acc = P.accuracy_from_predictions(pred, SCENES)
    assert acc == pytest.approx({"shape": 1.0, "color": 2 / 3, "size": 1.0, "position": 0.5, "count": 0.5,
                                 "background": 0.5, "all": 0.0})
    pred = {k: t[k].copy() for k in ("cell_shape", "cell_color", "cell_size", "background")}
    pred["cell_shape"][0, 0] = 0  # the triangle read as empty: shape wrong, position and count too
    acc = P.accuracy_from_predictions(pred, SCENES)
    assert acc == pytest.approx({"shape": 2 / 3, "color": 1.0, "size": 1.0, "position": 0.5, "count": 0.5,
                                 "background": 1.0, "all": 0.5})


@pytest.mark.parametrize("resolution", S.RESOLUTIONS)
def test_cell_windows_hold_their_whole_object(resolution):
    images = np.zeros((1, resolution, resolution, 3), np.float32)
    windows = np.asarray(P.cell_windows(jnp.asarray(images)))
    half = (windows.shape[2] - 1) // 2
    for position in range(9):
        cy, cx = S.center_pixel(position, resolution)
        for shape in range(len(S.SHAPES)):
            mask = S.object_mask(shape, 1, position, resolution)
            rows, cols = np.nonzero(mask)
            assert rows.min() >= cy - half and rows.max() <= cy + half
            assert cols.min() >= cx - half and cols.max() <= cx + half
    # The window of a cell is the image's pixels around its centre.
    image = np.random.default_rng(0).uniform(-1, 1, (1, resolution, resolution, 3)).astype(np.float32)
    win = np.asarray(P.cell_windows(jnp.asarray(image)))
    cy, cx = S.center_pixel(4, resolution)
    np.testing.assert_array_equal(win[0, 4], image[0, cy - half:cy + half + 1, cx - half:cx + half + 1])


def test_probe_data_config_checks():
    with pytest.raises(ValueError, match="symmetric"):
        P.probe_data_config(DataConfig(name="shapes"))
    with pytest.raises(ValueError, match="'shapes' dataset only"):
        P.probe_data_config(DataConfig(name="digits", value_range="symmetric"))
    cfg = P.probe_data_config(DataConfig(name="shapes", value_range="symmetric", image_size=64, random_shift=2), "/d")
    assert (cfg.image_size, cfg.random_shift, cfg.data_dir, cfg.extra_fields) == (64, 0, "/d", P.LABEL_FIELDS)


class _SmallShapes(S.ShapesBuilder, skip_registration=True):
    """The real builder with test-sized splits (same name, version and examples)."""

    name = "shapes"
    split_sizes = {"train": 600, "test": 100, "test_novel": 10}


def test_short_training_beats_chance_and_is_cached(tmp_path):
    _SmallShapes(data_dir=str(tmp_path), config="32").download_and_prepare(file_format="array_record")
    cfg = P.ProbeConfig(steps=160, batch_size=32, learning_rate=3e-3, warmup_steps=10)
    lines = []
    probe = P.load_or_train_probe(DataConfig(name="shapes", value_range="symmetric"), str(tmp_path),
                                  config=cfg, log=lines.append)
    assert any("test accuracy" in line for line in lines)
    assert probe.path.startswith(str(tmp_path / "probes" / "shapes-32-v1.0.0-"))
    acc = probe.test_accuracy
    # Chance: 1/8 color, 1/7 shape, 1/2 size; an empty-everywhere guess gets position 0, count 0.
    assert acc["color"] > 0.6 and acc["shape"] > 0.3 and acc["size"] > 0.7 and acc["position"] > 0.5, acc

    # A second call loads the same probe from the file, without training.
    again = P.load_or_train_probe(32, str(tmp_path), config=cfg, log=lambda s: pytest.fail(f"retrained: {s}"))
    assert again.test_accuracy == acc
    src = registry.open_split("shapes", "test", str(tmp_path))
    examples = [src[i] for i in range(10)]
    images = np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1.0
    labels = {k: np.stack([np.asarray(e[k]) for e in examples]) for k in P.LABEL_FIELDS}
    np.testing.assert_array_equal(probe.features(images), again.features(images))
    assert probe.features(images).shape == (10, 9 * cfg.cell_features)
    pred = probe.predict(images)
    assert {k: v.shape for k, v in pred.items()} == {"cell_shape": (10, 9), "cell_color": (10, 9),
                                                      "cell_size": (10, 9), "background": (10,)}
    assert set(probe.attribute_accuracy(images, labels)) == set(P.ATTRIBUTES)
    with pytest.raises(ValueError, match=r"\[B, 32, 32, 3\]"):
        probe.predict(images[:, :16, :16])
