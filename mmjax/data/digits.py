"""`digits`: scikit-learn's bundled handwritten digits as a local TFDS dataset.

The data are 1,797 real 8×8 grey-scale scans (UCI "optdigits", pixel counts 0..16, 10 classes)
that ship inside scikit-learn, so building needs no network. Each example is

    image    uint8 [8, 8, 1]   round(v * 255 / 16) for sklearn's value v in 0..16
    label    ClassLabel(10)    the digit
    caption  text              "a handwritten digit seven"
    id       int64             the row in `sklearn.datasets.load_digits()` (golden-value key)

Splits are fixed: 360 test / 1,437 train, stratified by class. The order inside each class comes
from a SHA-256 of the row index, not from a random generator, so the split is the same on every
machine and with every NumPy / scikit-learn version (sklearn's own row order is grouped by writer,
so taking its last rows would put a few writers only in test).

Neither building nor reading imports TensorFlow: raw-tensor, text and scalar features are
serialised by TFDS itself (an image feature stored as PNG would need TensorFlow to build).
"""

from __future__ import annotations

import hashlib

import numpy as np
import tensorflow_datasets as tfds

from mmjax.data.local_info import LocalBuildMessages, LocalDatasetInfo

NUM_TRAIN = 1437
NUM_TEST = 360
NUM_CLASSES = 10
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def scale_pixels(values: np.ndarray) -> np.ndarray:
    """sklearn pixel counts 0..16 (any shape, float) -> uint8 0..255, round(v * 255 / 16)."""
    # The only tie is v = 8 -> 127.5, which np.round (half to even) and Python's round both send
    # to 128, so this matches `round(v * 255 / 16)` exactly.
    return np.round(np.asarray(values, np.float64) * 255.0 / 16.0).astype(np.uint8)


def caption_for(label: int) -> str:
    """The text paired with a digit image, e.g. 7 -> "a handwritten digit seven"."""
    return f"a handwritten digit {DIGIT_WORDS[label]}"


def _order_key(row: int) -> bytes:
    # A hash instead of an RNG permutation: stable across library versions and platforms.
    return hashlib.sha256(f"mmjax/digits/split/{row}".encode()).digest()


def split_rows(labels: np.ndarray, num_test: int = NUM_TEST) -> dict[str, np.ndarray]:
    """Deterministic stratified split of row indices.

    Args:
      labels: int [N] class of each row.
      num_test: total size of the test split.

    Returns:
      {"train": int64 [N - num_test], "test": int64 [num_test]}, each sorted ascending. Class c
      (n_c rows) gives about num_test * n_c / N test rows (largest-remainder rounding, so the
      shares sum to num_test exactly): the first ones in the hash order of its rows.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    # Largest-remainder apportionment so the per-class shares sum to exactly num_test.
    quotas = counts * num_test / len(labels)
    take = np.floor(quotas).astype(int)
    leftover = num_test - take.sum()
    take[np.argsort(-(quotas - take), kind="stable")[:leftover]] += 1
    test = []
    for c, k in zip(classes, take):
        rows = sorted(np.flatnonzero(labels == c).tolist(), key=_order_key)
        test.extend(rows[:k])
    test = np.sort(np.asarray(test, np.int64))
    train = np.setdiff1d(np.arange(len(labels), dtype=np.int64), test)
    return {"train": train, "test": test}


class DigitsBuilder(LocalBuildMessages, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder for sklearn's 8×8 handwritten digits (see the module docstring).

    Not registered in TFDS's global name table (a future TFDS dataset called "digits" would clash
    at import); mmjax.data.registry constructs it directly. Once prepared, plain
    `tfds.data_source("digits", data_dir=...)` still reads it from its files.
    """

    name = "digits"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: 1,437 train / 360 test, stratified, hash-ordered."}

    def __init__(self, **kwargs):
        # ArrayRecord gives random access, which grain's MapDataset needs (TFRecord does not).
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly, not `dataset_info_from_configs`: that one would take the
        # description from any README.md that lands in this package's directory.
        return LocalDatasetInfo(
            builder=self,
            description="scikit-learn's handwritten digits (UCI optdigits test set), 8x8, 0..255.",
            features=tfds.features.FeaturesDict({
                # Raw bytes, not PNG: PNG saves nothing at 8x8, and decoding it with PIL took
                # ~6x longer than the rest of reading an example.
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=[str(d) for d in range(NUM_CLASSES)]),
                "caption": tfds.features.Text(),
                "id": np.int64,
            }),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
            citation="E. Alpaydin, C. Kaynak. Optical Recognition of Handwritten Digits. UCI Machine "
                     "Learning Repository, 1998.",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data ship with scikit-learn.
        from sklearn.datasets import load_digits  # Only needed while building.

        digits = load_digits()
        rows = split_rows(digits.target)
        return {
            split: self._generate_examples(digits.images, digits.target, ids)
            for split, ids in rows.items()
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray):
        """Yields (key, example); `images` float [1797, 8, 8] in 0..16, `labels` int [1797]."""
        for row in ids:
            label = int(labels[row])
            yield int(row), {
                "image": scale_pixels(images[row])[:, :, None],
                "label": label,
                "caption": caption_for(label),
                "id": int(row),
            }
