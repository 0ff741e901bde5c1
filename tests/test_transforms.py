"""Image and text transforms against hand computations."""

import numpy as np
import pytest

from mmjax.data import transforms as T


def _img(h, w, c=3):
    return (np.arange(h * w * c, dtype=np.float32).reshape(h, w, c) / (h * w * c))


def test_resize_modes():
    wide = np.zeros((4, 8, 1), np.float32)
    wide[:, 2:6] = 1.0  # a bright square in the middle of a wide image
    sq = T.resize_to_square(wide, 4, "squash")
    assert sq.shape == (4, 4, 1)
    crop = T.resize_to_square(wide, 4, "center_crop")
    np.testing.assert_allclose(crop, 1.0)  # the centre 4×4 is all bright
    pad = T.resize_to_square(wide, 8, "pad")
    assert pad.shape == (8, 8, 1)
    np.testing.assert_array_equal(pad[:2], 0.0)  # 2 rows of padding above, 2 below
    np.testing.assert_array_equal(pad[6:], 0.0)
    np.testing.assert_allclose(pad[2:6, 2:6], 1.0)
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        T.resize_to_square(wide, 4, "stretch")


def test_normalization_presets():
    x = {"image": np.full((2, 2, 3), 0.5, np.float32)}
    np.testing.assert_allclose(T.ToValueRange("symmetric").map(x)["image"], 0.0)
    clip = T.ToValueRange("clip").map(x)["image"][0, 0]
    np.testing.assert_allclose(clip, (0.5 - np.array([0.48145466, 0.4578275, 0.40821073]))
                               / np.array([0.26862954, 0.26130258, 0.27577711]), rtol=1e-6)
    with pytest.raises(ValueError, match="value_range must be one of"):
        T.ToValueRange("zscore")


def test_random_resized_crop_is_a_resized_window():
    rng = np.random.default_rng(0)
    image = _img(16, 16)
    for _ in range(20):
        out = T.RandomResizedCrop(8, (0.25, 0.5)).random_map({"image": image}, rng)["image"]
        assert out.shape == (8, 8, 3)
        assert image.min() <= out.min() and out.max() <= image.max()


def test_multi_crop_tiles():
    image = _img(8, 8, 1)
    crops = T.MultiCrop(size=4, grid=2).map({"image": image})["crops"]
    assert crops.shape == (5, 4, 4, 1)  # whole image + 2×2 tiles
    # At g·S = 8 the tiles are exact quarters of the (unresized) image, row-major.
    np.testing.assert_allclose(crops[1], image[:4, :4])
    np.testing.assert_allclose(crops[2], image[:4, 4:])
    np.testing.assert_allclose(crops[3], image[4:, :4])


def test_decode_text_errors_name_the_example():
    dec = T.DecodeImage(text_field="caption")
    good = dec.map({"image": np.zeros((2, 2, 3), np.uint8), "caption": "a red circle".encode(), "id": 7})
    assert good["text"] == "a red circle"
    with pytest.raises(T.BadExample, match="id=7: caption is not UTF-8"):
        dec.map({"image": np.zeros((2, 2, 3), np.uint8), "caption": b"\xff\xfe", "id": 7})
    with pytest.raises(T.BadExample, match="id=8: caption is empty"):
        dec.map({"image": np.zeros((2, 2, 3), np.uint8), "caption": b"  ", "id": 8})
    with pytest.raises(KeyError, match="text_field 'text' is not a feature"):
        T.DecodeImage(text_field="text").map({"image": np.zeros((2, 2, 3), np.uint8)})


def test_guard_skips_and_counts():
    dec = T.GuardBad(T.DecodeImage(text_field="caption"), "skip")
    before = T.SKIPPED["DecodeImage"]
    with pytest.warns(UserWarning, match="caption is empty"):
        assert dec.map({"image": np.zeros((2, 2, 3), np.uint8), "caption": b"", "id": 1}) is None
    assert T.SKIPPED["DecodeImage"] == before + 1
    with pytest.raises(T.BadExample):
        T.GuardBad(T.DecodeImage(text_field="caption"), "error").map(
            {"image": np.zeros((2, 2, 3), np.uint8), "caption": b"", "id": 1})
