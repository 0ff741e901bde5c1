"""Per-example image transforms for the grain pipelines.

Each transform is a small picklable class (grain may run it in worker processes) acting on one
example dict; batching happens later in the pipeline. Images are float32 [H, W, C] in [0, 1]
between `DecodeImage` and `ToValueRange`, so augmentations pad with 0 = black in every range.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
from PIL import Image

VALUE_RANGES = ("unit", "symmetric")


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """float32 [H, W, C] -> float32 [size, size, C], bilinear with half-pixel centres.

    PIL's float ("F") mode resizes one channel at a time. When shrinking it widens the kernel
    (antialiasing), which makes it agree with `jax.image.resize(..., "bilinear")` to float
    rounding; doing it here keeps JAX out of the input workers.
    """
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image[:, :, c]))
                   .resize((size, size), Image.Resampling.BILINEAR))
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, axis=-1)


@dataclasses.dataclass(frozen=True)
class DecodeImage(grain.transforms.Map):
    """TFDS example -> {"image": float32 [H, W, C] in [0, 1], "label": int32 [], ("id": int32 [])}.

    Integer images are divided by their dtype's maximum (255 for uint8). With `image_size` set the
    image is resized to [image_size, image_size, C]. Only `image`, `label` and, when the dataset has
    one, `id` are kept: text and other fields would make batches that cannot go to a device.
    """

    image_size: int | None = None

    def map(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        image = np.asarray(example["image"])
        if np.issubdtype(image.dtype, np.integer):
            image = image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)
        image = image.astype(np.float32, copy=False)
        if self.image_size is not None and image.shape[:2] != (self.image_size, self.image_size):
            image = resize_bilinear(image, self.image_size)
        out = {"image": image, "label": np.int32(example["label"])}
        if "id" in example:
            out["id"] = np.int32(example["id"])
        return out


@dataclasses.dataclass(frozen=True)
class Augment(grain.transforms.RandomMap):
    """Random translation and horizontal flip of `image` float32 [H, W, C]; shape is unchanged.

    `shift` > 0: pad k = shift zero pixels on every side and crop an H×W window at a uniform
    offset in [0, 2k]², i.e. translate by up to ±k pixels. `flip`: mirror left-right with p = 1/2.
    The generator comes from grain's `random_map`, seeded by (pipeline seed, stream position), so
    the same example at the same step is augmented the same way in every run.
    """

    shift: int = 0
    flip: bool = False

    def random_map(self, example: dict[str, np.ndarray], rng: np.random.Generator):
        image = example["image"]
        if self.shift > 0:
            k = self.shift
            h, w = image.shape[:2]
            padded = np.pad(image, ((k, k), (k, k), (0, 0)))
            dy, dx = rng.integers(0, 2 * k + 1, size=2)
            image = padded[dy:dy + h, dx:dx + w]
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return {**example, "image": np.ascontiguousarray(image)}


@dataclasses.dataclass(frozen=True)
class ToValueRange(grain.transforms.Map):
    """Maps `image` from [0, 1] to the model's range: "unit" keeps it, "symmetric" gives 2x - 1."""

    value_range: str = "unit"

    def __post_init__(self):
        if self.value_range not in VALUE_RANGES:
            raise ValueError(f"value_range must be one of {VALUE_RANGES}, got {self.value_range!r}")

    def map(self, example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.value_range == "symmetric":
            return {**example, "image": example["image"] * np.float32(2.0) - np.float32(1.0)}
        return example


@dataclasses.dataclass(frozen=True)
class AddMask(grain.transforms.Map):
    """Adds `mask` bool [] = `value` (True marks a real eval example, False a padding one)."""

    value: bool = True

    def map(self, example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**example, "mask": np.bool_(self.value)}


@dataclasses.dataclass(frozen=True)
class ZerosLike(grain.transforms.Map):
    """Ignores its input and returns an all-zero copy of `template` with mask False (padding)."""

    template: dict[str, np.ndarray]

    def map(self, _) -> dict[str, np.ndarray]:
        return {k: np.zeros_like(v) for k, v in self.template.items()} | {"mask": np.bool_(False)}
