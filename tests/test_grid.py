"""Tests for mmjax.data.grid: layout, upscaling, value ranges, captions and errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmjax.data.grid import MARGIN, make_image_grid, save_image_grid


def _tile(grid: np.ndarray, index: int, ncols: int, tile: int, cell_h: int) -> np.ndarray:
    row, col = divmod(index, ncols)
    top, left = MARGIN + row * (cell_h + MARGIN), MARGIN + col * (tile + MARGIN)
    return grid[top:top + tile, left:left + tile]


def test_layout_size_and_nearest_upscaling(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    path = save_image_grid(images, tmp_path / "sub" / "grid.png", ncols=3)
    grid = np.asarray(Image.open(path))
    # 8x8 -> x12 = 96 px tiles; 3 columns, ceil(7 / 3) = 3 rows.
    assert path.suffix == ".png" and grid.shape == (3 * 96 + 4 * MARGIN, 3 * 96 + 4 * MARGIN, 3)
    for i in range(7):
        tile = _tile(grid, i, 3, 96, 96)
        np.testing.assert_array_equal(tile, images[i].repeat(12, axis=0).repeat(12, axis=1))
    assert (_tile(grid, 7, 3, 96, 96) == 255).all()  # the empty eighth cell stays background
    # Default columns ceil(sqrt(N)); more columns than images gives one row; explicit scale.
    assert make_image_grid(images).shape[1] == 3 * 96 + 4 * MARGIN
    assert make_image_grid(images[:2], ncols=5).shape == (96 + 2 * MARGIN, 2 * 96 + 3 * MARGIN, 3)
    assert make_image_grid(images, ncols=7, scale=1).shape == (8 + 2 * MARGIN, 7 * 8 + 8 * MARGIN, 3)
    # 32x32 -> x3; images already >= 96 px are not scaled.
    assert make_image_grid(np.zeros((1, 32, 32, 3), np.uint8)).shape == (96 + 2 * MARGIN,) * 2 + (3,)
    assert make_image_grid(np.zeros((1, 100, 120, 3), np.uint8)).shape == (100 + 2 * MARGIN, 120 + 2 * MARGIN, 3)


def test_float_value_ranges_and_grayscale():
    ramp = np.linspace(0, 1, 16).reshape(1, 4, 4, 1)  # float64, grey
    expected = np.round(ramp[0, :, :, 0] * 255).astype(np.uint8)

    def tile(grid):
        return _tile(grid, 0, 1, 4, 4)

    grid = make_image_grid(ramp, scale=1)
    assert grid.dtype == np.uint8 and grid.shape == (4 + 2 * MARGIN,) * 2 + (3,)
    for c in range(3):  # grey becomes R = G = B
        np.testing.assert_array_equal(tile(grid)[..., c], expected)
    np.testing.assert_array_equal(tile(make_image_grid(ramp * 2 - 1, scale=1, value_range=(-1, 1))), tile(grid))
    np.testing.assert_array_equal(tile(make_image_grid(ramp * 16 + 3, scale=1, value_range="auto")), tile(grid))
    # Out of range values are clipped; float32 works the same.
    wide = (ramp * 4 - 2).astype(np.float32)  # -2 .. 2
    clipped = tile(make_image_grid(wide, scale=1))[..., 0]
    np.testing.assert_array_equal(clipped, np.round(np.clip(wide[0, :, :, 0], 0, 1) * 255))
    # uint8 is shown as it is, whatever value_range says.
    as_uint8 = (ramp * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(tile(make_image_grid(as_uint8, scale=1, value_range=(-1, 1))), tile(grid))
    # NaN is drawn at the low end, with a warning.
    with pytest.warns(RuntimeWarning, match="non-finite"):
        nan_grid = make_image_grid(np.where(ramp > 0.5, np.nan, ramp), scale=1)
    assert (tile(nan_grid)[(ramp[0, :, :, 0] > 0.5)] == 0).all()


def test_captions_are_drawn_under_the_tiles():
    images = np.zeros((4, 8, 8, 1), np.float32)
    plain = make_image_grid(images, ncols=2)
    captioned = make_image_grid(images, ncols=2, captions=["zero", "one", None, "a longer caption " * 5])
    tile = 96
    assert captioned.shape[1] == plain.shape[1] and captioned.shape[0] > plain.shape[0]
    cell_h = (captioned.shape[0] - 3 * MARGIN) // 2
    strip_h = cell_h - tile
    # The tiles are unchanged; dark text pixels appear in the strips of captioned tiles only.
    for i in range(4):
        np.testing.assert_array_equal(_tile(captioned, i, 2, tile, cell_h), 0)
        row, col = divmod(i, 2)
        top = MARGIN + row * (cell_h + MARGIN) + tile
        left = MARGIN + col * (tile + MARGIN)
        strip = captioned[top:top + strip_h, left:left + tile]
        assert (strip < 128).any() == (i != 2), f"caption {i}"
    # The long caption wraps to several lines within the tile width: nothing is drawn in the margin
    # to its right (the grid's right edge), and the strip is several lines high.
    assert (captioned[:, -MARGIN:] == 255).all()
    assert strip_h > 3 * 10
    # A bigger font needs a taller strip.
    bigger = make_image_grid(images, ncols=2, captions=["zero", "one", None, "a longer caption " * 5],
                             font_size=18)
    assert bigger.shape[0] > captioned.shape[0]


def test_errors():
    with pytest.raises(ValueError, match=r"\[N, H, W, C\].*images\[None\]"):
        make_image_grid(np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        make_image_grid(np.zeros((2, 8, 8, 4)))
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        make_image_grid(np.zeros((2, 1, 8, 8, 3)))
    with pytest.raises(ValueError, match="non-empty"):
        make_image_grid(np.zeros((0, 8, 8, 3)))
    with pytest.raises(ValueError, match="captions must be a sequence of 2"):
        make_image_grid(np.zeros((2, 8, 8, 3)), captions=["only one"])
    with pytest.raises(ValueError, match="captions must be a sequence of 2"):
        make_image_grid(np.zeros((2, 8, 8, 3)), captions="ab")
    with pytest.raises(ValueError, match="low < high"):
        make_image_grid(np.zeros((2, 8, 8, 3)), value_range=(1, 1))
    with pytest.raises(ValueError, match="'auto'"):
        make_image_grid(np.zeros((2, 8, 8, 3)), value_range="minmax")
    with pytest.raises(ValueError, match="ncols"):
        make_image_grid(np.zeros((2, 8, 8, 3)), ncols=0)
    with pytest.raises(ValueError, match="scale"):
        make_image_grid(np.zeros((2, 8, 8, 3)), scale=1.5)
    with pytest.raises(ValueError, match="real numbers"):
        make_image_grid(np.zeros((2, 8, 8, 3), np.complex64))


def test_sklearn_digits_grid(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = [0, 1, 2, 3, 4, 5, 6, 7]
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    captions = [f"a handwritten digit {words[digits.target[r]]}" for r in rows]
    path = save_image_grid(digits.images[rows][..., None], tmp_path / "digits.png", captions=captions,
                           ncols=4, value_range=(0, 16))
    grid = np.asarray(Image.open(path))
    assert grid.shape[1] == 4 * 96 + 5 * MARGIN
    # Tile 0 is sklearn's first digit (a zero), upscaled x12, 0..16 -> 0..255.
    expected = np.round(digits.images[0] / 16 * 255).astype(np.uint8).repeat(12, 0).repeat(12, 1)
    np.testing.assert_array_equal(grid[MARGIN:MARGIN + 96, MARGIN:MARGIN + 96, 0], expected)
