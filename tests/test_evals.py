"""Zero-shot and retrieval metrics on hand-built embeddings with known answers."""

import numpy as np
import pytest

from mmjax.evals import class_embeddings, collect, retrieval_recall, zero_shot_accuracy


def test_class_embeddings_average_normalised_templates():
    table = {"a red x": [1.0, 0.0], "the red x": [3.0, 0.0], "a blue x": [0.0, 2.0], "the blue x": [1.0, 1.0]}
    emb = class_embeddings(lambda texts: np.array([table[t] for t in texts]), ["red", "blue"],
                           ["a {} x", "the {} x"])
    np.testing.assert_allclose(emb[0], [1.0, 0.0])
    blue = np.array([0.0, 1.0]) + np.array([1.0, 1.0]) / np.sqrt(2)  # normalise each, then average
    np.testing.assert_allclose(emb[1], blue / np.linalg.norm(blue))
    with pytest.raises(ValueError, match="has no"):
        class_embeddings(lambda t: np.ones((len(t), 2)), ["red"], ["a red thing"])


def test_zero_shot_topk():
    classes = np.eye(3)
    images = np.array([[1.0, 0.1, 0.0], [0.2, 1.0, 0.5], [0.9, 0.0, 0.8], [0.0, 0.0, 1.0]])
    labels = np.array([0, 2, 2, 2])
    acc = zero_shot_accuracy(images, labels, classes, ks=(1, 2))
    # ranks of the truth: 0, 1 (0.5 < 1.0), 1 (0.8 < 0.9), 0
    assert acc == {"top1": 0.5, "top2": 1.0, "count": 4}


def test_retrieval_with_several_captions_per_image():
    images = np.eye(3)
    # texts 0,1 → image 0; text 2 → image 1; text 3 → image 2 (but it points at image 1)
    texts = np.array([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0], [0, 1.0, 0.5]])
    r = retrieval_recall(images, texts, np.array([0, 0, 1, 2]), ks=(1, 2))
    assert r["text_to_image_r1"] == 0.75 and r["text_to_image_r2"] == 1.0
    # image 2's only text ranks behind texts 2... for image 2 the sims are [0,0,0,0.447]: rank 0.
    assert r["image_to_text_r1"] == 1.0
    with pytest.raises(ValueError, match="text_image"):
        retrieval_recall(images, texts, np.array([0, 0, 1, 5]))


def test_collect_drops_padding_exactly():
    batches = [{"x": np.arange(4), "mask": np.array([1, 1, 1, 1], bool)},
               {"x": np.arange(4, 8), "mask": np.array([1, 0, 0, 0], bool)}]
    out = collect(lambda b: {"y": b["x"] * 2}, batches)
    np.testing.assert_array_equal(out["y"], [0, 2, 4, 6, 8])
