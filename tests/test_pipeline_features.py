"""Pipeline features end to end: weighted mixtures, multi-crop tiling, random resized crops."""

import dataclasses

import numpy as np
import pytest

from mmjax.data import pipeline, registry
from mmjax.data.config import DataConfig


@pytest.fixture(scope="module")
def digits_ids(digits_dir):
    return {split: {int(registry.open_split("digits", split, digits_dir)[i]["id"])
                    for i in range(n)} for split, n in (("train", 1437), ("test", 360))}


def test_weighted_mixture_keeps_proportions(digits_dir, digits_ids):
    cfg = DataConfig(name="digits", data_dir=digits_dir, mixture=(("digits:train", 3.0), ("digits:test", 1.0)))
    it = pipeline.train_iterator(cfg, global_batch_size=64, seed=0)
    ids = np.concatenate([next(it)["id"] for _ in range(10)])
    from_test = np.isin(ids, list(digits_ids["test"]))
    assert from_test.mean() == pytest.approx(0.25, abs=0.02)
    assert np.isin(ids[~from_test], list(digits_ids["train"])).all()
    again = pipeline.train_iterator(cfg, global_batch_size=64, seed=0)
    np.testing.assert_array_equal(next(again)["id"], ids[:64])  # deterministic
    with pytest.raises(ValueError, match="mixture weight for 'digits:test' must be positive"):
        pipeline.train_iterator(dataclasses.replace(cfg, mixture=(("digits:test", 0.0),)),
                                global_batch_size=64, seed=0)


def test_multi_crop_and_random_resized_crop(digits_dir):
    cfg = DataConfig(name="digits", data_dir=digits_dir, image_size=16, multi_crop_grid=2,
                     random_resized_crop=(0.5, 1.0))
    batch = next(pipeline.train_iterator(cfg, global_batch_size=8, seed=0))
    assert batch["image"].shape == (8, 16, 16, 1)
    assert batch["crops"].shape == (8, 5, 16, 16, 1)  # whole image + 2×2 tiles
    again = next(pipeline.train_iterator(cfg, global_batch_size=8, seed=0))
    np.testing.assert_array_equal(batch["image"], again["image"])
    other = next(pipeline.train_iterator(cfg, global_batch_size=8, seed=1))
    assert not np.array_equal(batch["image"], other["image"])
    with pytest.raises(ValueError, match="need DataConfig.image_size"):
        pipeline.train_iterator(dataclasses.replace(cfg, image_size=None), global_batch_size=8, seed=0)
