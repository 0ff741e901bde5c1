"""The code-locality entropies (mmjax.evals.codes) against hand-computed values."""

import math

import numpy as np
import pytest

from mmjax.evals.codes import code_patch_entropies, entropy, patch_keys


def test_entropies_by_hand():
    # two 2×2 one-channel images, one code per pixel: patch 0 is seen 5 times, encoded by code 5
    # four times and code 6 once; patch 1 three times, always code 7
    images = np.array([[[0, 0], [0, 1]], [[0, 0], [1, 1]]], np.uint8)[..., None]
    codes = np.array([[[5, 6], [5, 7]], [[5, 5], [7, 7]]])
    r = code_patch_entropies(codes, images)
    h = lambda *p: -sum(x * math.log(x) for x in p)
    assert r["h_patch"] == pytest.approx(h(5 / 8, 3 / 8))
    assert r["h_code"] == pytest.approx(h(4 / 8, 1 / 8, 3 / 8))
    assert r["h_code_given_patch"] == pytest.approx(5 / 8 * h(4 / 5, 1 / 5))  # Σ_p P(p) H(code | p)
    assert r["h_patch_given_code"] == pytest.approx(0.0, abs=1e-12)          # every code fixes its patch
    assert (r["codes"], r["patches"]) == (3, 2)
    assert r["top_patches"] == [(5, 2, pytest.approx(0.8)), (3, 1, pytest.approx(1.0))]


def test_patches_follow_the_codes_raster_order():
    # a 4×4 image cut into 2×2 patches of 2×2 pixels: patch (r, c) is filled with 10·r + c
    img = np.kron(np.array([[0, 1], [10, 11]]), np.ones((2, 2), int)).astype(np.uint8)[None, ..., None]
    # keys number the distinct contents in sorted order, so raster order reads 0, 1, 2, 3
    # (a column-major cut would give 0, 2, 1, 3)
    assert patch_keys(img, (2, 2)).tolist() == [0, 1, 2, 3]
    r = code_patch_entropies(np.array([[[0, 1], [10, 11]]]), img)
    assert r["h_code_given_patch"] == pytest.approx(0.0, abs=1e-12)
    assert r["h_code"] == pytest.approx(math.log(4))
    with pytest.raises(ValueError, match="do not split into a 3×3 grid"):
        patch_keys(img, (3, 3))
    with pytest.raises(ValueError, match="codes must be"):
        code_patch_entropies(np.zeros((2, 2, 2), int), img)


def test_entropy_ignores_zero_counts():
    assert entropy([2, 0, 2]) == pytest.approx(math.log(2))
