"""Per-example image transforms for the grain pipelines.

Each transform is a small picklable class (grain may run it in worker processes) acting on one
example dict; batching happens later in the pipeline. Images are float32 [H, W, C] in [0, 1]
between `DecodeImage` and `ToValueRange`, so augmentations pad with 0 = black in every range.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import warnings
from collections import Counter
from typing import Any

import grain
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# Normalisation presets applied to images in [0, 1]: (x - mean) / std per channel.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "unit": ((0.0,), (1.0,)),
    "symmetric": ((0.5,), (0.5,)),  # [-1, 1] (SigLIP, VQGAN)
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
VALUE_RANGES = tuple(NORMALIZATIONS)
RESIZE_MODES = ("squash", "center_crop", "pad")
TEXT_POLICIES = ("truncate", "error", "skip")
BAD_EXAMPLE_POLICIES = ("error", "skip")

# Examples dropped with on_bad_example / on_long_text = "skip", by reason (this process only).
SKIPPED: Counter = Counter()


class BadExample(ValueError):
    """An example that cannot be used (its message names the example and the problem)."""


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


def resize_to_square(image: np.ndarray, size: int, mode: str = "squash") -> np.ndarray:
    """float32 [H, W, C] -> [size, size, C] by `mode`: "squash" ignores the aspect ratio,
    "center_crop" resizes the short side to `size` and crops the middle, "pad" resizes the long
    side to `size` and pads the rest with zeros (centred)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {mode!r}")
    h, w = image.shape[:2]
    if mode == "squash" or h == w:
        return image if (h, w) == (size, size) else resize_bilinear(image, size)
    if mode == "center_crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return resize_to_square(image[top:top + side, left:left + side], size)
    side = max(h, w)
    padded = np.zeros((side, side, image.shape[2]), image.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    padded[top:top + h, left:left + w] = image
    return resize_to_square(padded, size)


def _example_name(example: dict[str, Any]) -> str:
    for key in ("id", "file"):
        if key in example:
            v = example[key]
            return f"{key}={v.decode() if isinstance(v, bytes) else v}"
    return "an example without id"


@dataclasses.dataclass(frozen=True)
class DecodeImage(grain.transforms.Map):
    """TFDS example -> {"image": float32 [H, W, C] in [0, 1], "label": int32 [], ("id": int32 []),
    (text_field: str)}.

    Integer images are divided by their dtype's maximum (255 for uint8). With `image_size` set the
    image becomes [image_size, image_size, C] by `resize_mode`. Only `image`, `label`, `id` and the
    text field are kept: other fields would make batches that cannot go to a device. Text arrives
    from TFDS as UTF-8 bytes; bytes that are not UTF-8, or an empty text, raise `BadExample`.
    """

    image_size: int | None = None
    resize_mode: str = "squash"
    text_field: str | None = None
    extra_fields: tuple[str, ...] = ()

    def map(self, example: dict[str, Any]) -> dict[str, Any]:
        image = np.asarray(example["image"])
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.size == 0:
            raise BadExample(f"{_example_name(example)}: image of shape {image.shape} is not [H, W, C]")
        if np.issubdtype(image.dtype, np.integer):
            image = image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)
        image = image.astype(np.float32, copy=False)
        if self.image_size is not None and image.shape[:2] != (self.image_size, self.image_size):
            image = resize_to_square(image, self.image_size, self.resize_mode)
        out: dict[str, Any] = {"image": image}
        if "label" in example:
            out["label"] = np.int32(example["label"])
        if "id" in example:
            out["id"] = np.int32(example["id"])
        for key in self.extra_fields:
            if key not in example:
                raise KeyError(f"extra field {key!r} is not a feature of this dataset (features: {sorted(example)})")
            out[key] = np.asarray(example[key])
        if self.text_field is not None:
            if self.text_field not in example:
                raise KeyError(f"text_field {self.text_field!r} is not a feature of this dataset "
                               f"(features: {sorted(example)})")
            text = example[self.text_field]
            if isinstance(text, bytes):
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise BadExample(f"{_example_name(example)}: {self.text_field} is not UTF-8 ({e})") from None
            if not str(text).strip():
                raise BadExample(f"{_example_name(example)}: {self.text_field} is empty")
            out["text"] = str(text)
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
class SwapWordNegative(grain.transforms.RandomMap):
    """Hard negative captions (NegCLIP's word replacement): `text` -> `neg_text` (str, or a list of
    `count` str when count > 1) and `neg_valid` int32 [] (or [count]): 1 where a negative was made.

    A negative is `text` with one whole-word occurrence of a word of one of `groups` replaced by a
    different word of its group; the rest of the text (spacing and punctuation included) is kept.
    With count = 1 the occurrence and the replacement are each chosen uniformly. With count = K the
    K negatives are K distinct (occurrence, replacement) pairs drawn uniformly without replacement,
    e.g. all five other shapes for a one-object caption and K = 5; when the text has fewer pairs
    than K, the rest are the text itself with neg_valid 0. A text without any group word gets
    neg_text = text and neg_valid = 0, and the loss must leave those negatives out. Seeded by
    grain's `random_map` like `Augment`.
    """

    groups: tuple[tuple[str, ...], ...] = ()
    count: int = 1

    def __post_init__(self):
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"text_negatives_per_text must be an int >= 1, got {self.count!r}")
        seen: dict[str, int] = {}
        for i, group in enumerate(self.groups):
            if len(set(group)) < 2:
                raise ValueError(f"text_negatives group {i} needs at least two distinct words, got {group!r}")
            for w in group:
                if not re.fullmatch(r"\w+", w):
                    raise ValueError(f"text_negatives word {w!r} is not a single word")
                if seen.setdefault(w, i) != i:
                    raise ValueError(f"text_negatives word {w!r} is in groups {seen[w]} and {i}")
        object.__setattr__(self, "_group_of", seen)
        words = sorted(seen, key=len, reverse=True)
        object.__setattr__(self, "_pattern", re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b")
                           if words else None)

    def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        text = example["text"]
        hits = list(self._pattern.finditer(text)) if self._pattern is not None else []
        swaps = []  # (match, replacement word)
        if hits and self.count == 1:
            m = hits[int(rng.integers(len(hits)))]
            others = [w for w in dict.fromkeys(self.groups[self._group_of[m.group(1)]]) if w != m.group(1)]
            swaps = [(m, others[int(rng.integers(len(others)))])]
        elif hits:
            pairs = [(m, w) for m in hits for w in dict.fromkeys(self.groups[self._group_of[m.group(1)]])
                     if w != m.group(1)]
            swaps = [pairs[i] for i in rng.permutation(len(pairs))[: self.count]]
        negs = [text[:m.start()] + w + text[m.end():] for m, w in swaps]
        valid = [1] * len(negs) + [0] * (self.count - len(negs))
        negs += [text] * (self.count - len(negs))
        if self.count == 1:
            return {**example, "neg_text": negs[0], "neg_valid": np.int32(valid[0])}
        return {**example, "neg_text": negs, "neg_valid": np.asarray(valid, np.int32)}


@dataclasses.dataclass(frozen=True)
class ToValueRange(grain.transforms.Map):
    """Normalises `image` (and `crops`) from [0, 1] by a preset in NORMALIZATIONS:
    (x - mean) / std per channel ("unit" keeps [0, 1], "symmetric" gives 2x - 1)."""

    value_range: str = "unit"

    def __post_init__(self):
        if self.value_range not in NORMALIZATIONS:
            raise ValueError(f"value_range must be one of {VALUE_RANGES}, got {self.value_range!r}")

    def map(self, example: dict[str, Any]) -> dict[str, Any]:
        if self.value_range == "unit":
            return example
        mean, std = (np.asarray(v, np.float32) for v in NORMALIZATIONS[self.value_range])
        out = dict(example)
        for key in ("image", "crops"):
            if key in out:
                x = out[key]
                if x.shape[-1] != mean.size and mean.size != 1:
                    raise ValueError(f"value_range {self.value_range!r} is for {mean.size} channels, "
                                     f"the image has {x.shape[-1]}")
                out[key] = (x - mean) / std
        return out


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop(grain.transforms.RandomMap):
    """Inception-style crop: a window of area fraction in `scale` and aspect ratio in `ratio`
    (log-uniform), resized to size²; falls back to the whole image after 10 misses."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = example["image"]
        h, w = image.shape[:2]
        for _ in range(10):
            area = h * w * rng.uniform(*self.scale)
            aspect = np.exp(rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1])))
            cw, ch = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                crop = image[top:top + ch, left:left + cw]
                break
        else:
            crop = image
        return {**example, "image": resize_to_square(np.ascontiguousarray(crop), self.size)}


@dataclasses.dataclass(frozen=True)
class MultiCrop(grain.transforms.Map):
    """Adds `crops` float32 [1 + g², S, S, C]: the whole image at S², then the g×g tiles (row-major)
    of the image resized to (g·S)², so each tile keeps g× the detail (Molmo / LLaVA-NeXT style)."""

    size: int
    grid: int

    def map(self, example: dict[str, Any]) -> dict[str, Any]:
        image = example["image"]
        s, g = self.size, self.grid
        full = resize_to_square(image, s)
        big = resize_to_square(image, g * s)
        tiles = big.reshape(g, s, g, s, -1).transpose(0, 2, 1, 3, 4).reshape(g * g, s, s, -1)
        return {**example, "crops": np.concatenate([full[None], tiles], axis=0)}


@functools.lru_cache(maxsize=8)
def _tokenizer(spec: str):
    from mmjax.data.tokenizers import load_tokenizer
    return load_tokenizer(spec)


@dataclasses.dataclass(frozen=True)
class TokenizeText(grain.transforms.Map):
    """`text` (str) -> `text_ids` int32 [max_len] padded with the tokenizer's pad id and
    `text_len` int32 []. Longer texts are truncated (EOS kept last when add_eos), or raise
    `BadExample` per `on_long`. The tokenizer is loaded once per process from its spec."""

    tokenizer: str = "bytes"
    max_len: int = 64
    add_bos: bool = False
    add_eos: bool = True
    on_long: str = "truncate"

    def __post_init__(self):
        if self.on_long not in TEXT_POLICIES:
            raise ValueError(f"on_long_text must be one of {TEXT_POLICIES}, got {self.on_long!r}")
        if self.max_len < 1:
            raise ValueError(f"max_text_len must be positive, got {self.max_len}")

    def _encode(self, tok, text: str, example, what: str) -> tuple[np.ndarray, np.int32]:
        ids = tok.encode(text, add_bos=self.add_bos, add_eos=self.add_eos)
        if len(ids) > self.max_len:
            if self.on_long != "truncate":
                raise BadExample(f"{_example_name(example)}: {what} of {len(ids)} tokens is longer than "
                                 f"max_text_len={self.max_len}")
            ids = ids[: self.max_len - 1] + [ids[-1]] if self.add_eos else ids[: self.max_len]
        out = np.full(self.max_len, tok.pad_id, np.int32)
        out[: len(ids)] = ids
        return out, np.int32(len(ids))

    def map(self, example: dict[str, Any]) -> dict[str, Any]:
        """Also `target_text` (str) -> `target_ids` [L] / `target_len` [], and `neg_text` (from
        `SwapWordNegative`) -> `neg_text_ids` [L] / `neg_text_len` [] (or
        [K, L] / [K] for a list of K negatives)."""
        tok = _tokenizer(self.tokenizer)
        out = {k: v for k, v in example.items() if k not in ("text", "neg_text", "target_text")}
        out["text_ids"], out["text_len"] = self._encode(tok, example["text"], example, "text")
        if "target_text" in example:  # a second text of the example (e.g. a caption target in another form)
            out["target_ids"], out["target_len"] = self._encode(tok, example["target_text"], example, "target text")
        if isinstance(example.get("neg_text"), str):
            out["neg_text_ids"], out["neg_text_len"] = self._encode(tok, example["neg_text"], example,
                                                                    "negative text")
        elif "neg_text" in example:  # K negatives: [K, L] and [K]
            encoded = [self._encode(tok, t, example, "negative text") for t in example["neg_text"]]
            out["neg_text_ids"] = np.stack([ids for ids, _ in encoded])
            out["neg_text_len"] = np.asarray([n for _, n in encoded], np.int32)
        return out


@dataclasses.dataclass(frozen=True)
class GuardBad(grain.transforms.Map):
    """Runs `inner` on an example; a `BadExample` either propagates (policy "error") or turns the
    example into None, to be dropped by a later filter, counted in SKIPPED and warned about."""

    inner: Any
    policy: str = "error"

    def map(self, example):
        if example is None:
            return None
        try:
            return self.inner.map(example)
        except BadExample as e:
            if self.policy == "error":
                raise
            SKIPPED[type(self.inner).__name__] += 1
            warnings.warn(f"skipping {e}", stacklevel=2)
            log.warning("skipped %s (%d skipped by %s so far)", e, SKIPPED[type(self.inner).__name__],
                        type(self.inner).__name__)
            return None


@dataclasses.dataclass(frozen=True)
class AddMask(grain.transforms.Map):
    """Adds `mask` bool [] = `value` (True marks a real eval example, False a padding one)."""

    value: bool = True

    def map(self, example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**example, "mask": np.bool_(self.value)}


@dataclasses.dataclass(frozen=True)
class MaskOrPad(grain.transforms.Map):
    """Index i -> examples[i] with mask True, or (for a skipped bad example) zeros with mask False."""

    examples: Any
    template: dict[str, np.ndarray]

    def map(self, index: int) -> dict[str, np.ndarray]:
        example = self.examples[int(index)]
        if example is None:
            return {k: np.zeros_like(v) for k, v in self.template.items()} | {"mask": np.bool_(False)}
        return {**example, "mask": np.bool_(True)}


@dataclasses.dataclass(frozen=True)
class ZerosLike(grain.transforms.Map):
    """Ignores its input and returns an all-zero copy of `template` with mask False (padding)."""

    template: dict[str, np.ndarray]

    def map(self, _) -> dict[str, np.ndarray]:
        return {k: np.zeros_like(v) for k, v in self.template.items()} | {"mask": np.bool_(False)}
