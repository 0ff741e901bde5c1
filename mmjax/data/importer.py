"""Bring your own data: a folder of images + a JSONL file -> a TFDS (ArrayRecord) dataset.

    data_dir = import_folder("photos/", "photos/captions.jsonl", name="my_photos", image_size=64)
    source = registry.open_split("my_photos", "train", data_dir)     # or tfds.data_source(...)
    cfg = DataConfig(name="my_photos", data_dir=data_dir, text_field="caption")

The result is read exactly like the built-in `digits`: a TFDS dataset whose images are raw uint8
tensors (no PNG/JPEG decoding while training, no TensorFlow while building or reading), written
by a `GeneratorBasedBuilder` made for `name` and not registered in TFDS's global name table.

JSONL records (one JSON object a line; paths relative to `images_dir`)
    captions       {"image": "cats/1.jpg", "caption": "a cat"}     or  "captions": ["a cat", ...]
    conversations  {"image": "cats/1.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                             {"from": "gpt", "value": "A cat."}]}
    optional       "split": "train"   (see `splits`)

One import holds one kind; the first usable record decides it (or pass `kind`). Features:
    image     uint8 [S, S, 3]   RGB (EXIF orientation applied), S = image_size; with image_size=None
                                every image must have the same size [H, W] and is stored as it is
    id        int64             the record's line number in the JSONL (1-based): leads back to it
    file      text              the record's "image" path as written in the JSONL
    caption   text              captions kind: the caption (the first one of "captions")
    captions  Sequence(text)    captions kind: all captions of the record
    roles     Sequence(text)    conversations kind: each turn's "from" ("human", "gpt", ...)
    values    Sequence(text)    conversations kind: each turn's "value", aligned with roles

Bad input. Every problem has a reason (REASONS); with on_error="raise" the first one raises
`BadInputError` naming the JSONL line, the image file and the reason, and nothing is left in
data_dir; with on_error="skip" the record is dropped, a `SkippedRecordWarning` is emitted (the
first MAX_WARNINGS of them) and the reason is counted in the report. Text longer than
`max_caption_bytes` (UTF-8 bytes, per caption and per conversation turn) is truncated at a
character boundary by default (on_long_caption="truncate", counted as `truncated_records`,
because the pipeline's tokenizer truncates anyway and a long caption is usually still a good
one); on_long_caption="reject" makes it a problem ("text_too_long") that on_error handles.

Splits. By default 95% train / 5% test: records are grouped by image file (records that share an
image always land in the same split, so no test image is seen in training), the groups ordered by
a SHA-256 of (seed, file) and cut at the largest-remainder counts. So the import is deterministic
and a split's size is exact unless groups of several records straddle a cut. Small imports: every
split gets at least one image whenever there are at least as many images as splits, even where
its fraction rounds to none (5% of 10 records: test gets 1 image, train the other 9). With fewer
images than splits the import is an error that says what to pass instead (e.g.
splits={"train": 1.0}). With splits="field" (or splits=None and records that carry "split") each
record's "split" field decides. Records whose image turns out truncated only while the pixels are
decoded (second pass) are dropped from the split they were given (a split left with none is an
error).

Atomicity. The dataset is built in a hidden staging directory inside data_dir (TFDS itself writes
into an `incomplete.*` folder and renames it), `import_report.json` is written beside the version
folder (`<data_dir>/<name>/import_report.json`), and only then is `<name>/` renamed into place. A
failed import leaves data_dir as it was; an existing dataset is replaced only with overwrite=True,
and only once the new one is complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import types
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from mmjax.data import registry
from mmjax.data.local_info import LocalDatasetInfo
from mmjax.data.transforms import RESIZE_MODES  # the same modes as DataConfig.resize_mode

VERSION = "1.0.0"
REPORT_FILE = "import_report.json"
ON_ERROR = ("raise", "skip")
ON_LONG_CAPTION = ("truncate", "reject")
KINDS = ("auto", "captions", "conversations")
DEFAULT_SPLITS = {"train": 0.95, "test": 0.05}
DEFAULT_MAX_CAPTION_BYTES = 4096
MAX_WARNINGS = 20  # per import; the report counts every skip
MAX_REPORTED_PROBLEMS = 1000

# Why a record was rejected (the keys of the report's "skipped" counts).
REASONS = {
    "not_utf8": "the JSONL line is not valid UTF-8",
    "bad_json": "the JSONL line is not valid JSON",
    "bad_record": "the record is not an object of the expected shape",
    "no_image": "the record has no \"image\" path",
    "no_text": "the record has no \"caption\", \"captions\" or \"conversations\"",
    "wrong_kind": "a captions record in a conversations import, or the other way round",
    "empty_text": "a caption or conversation turn is empty",
    "text_too_long": "a caption or turn is longer than max_caption_bytes (on_long_caption=\"reject\")",
    "bad_split": "the record's \"split\" field is missing or not a valid split name",
    "missing_image": "the image file does not exist",
    "corrupt_image": "the image file cannot be read as an image",
    "truncated_image": "the image file ends early",
}

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_SPLIT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_EXIF_ORIENTATION = 0x0112


class BadInputError(ValueError):
    """A record that cannot be imported. `reason` is a key of REASONS; `line` (1-based) and `file`
    (the record's image path) say where, when known."""

    def __init__(self, reason: str, detail: str, *, source: str, line: int | None = None,
                 file: str | None = None):
        self.reason, self.detail, self.line, self.file = reason, detail, line, file
        where = source + (f" line {line}" if line is not None else "")
        if file is not None:
            where += f" (image {file!r})"
        super().__init__(f"{where}: {reason}: {detail}")


class SkippedRecordWarning(UserWarning):
    """A record was dropped by import_folder(on_error="skip")."""


@dataclasses.dataclass(frozen=True)
class _Record:
    """One usable JSONL record after the first pass."""

    line: int
    file: str  # as written in the JSONL
    path: str  # images_dir / file
    size: tuple[int, int]  # (height, width) after EXIF orientation, from the header only
    texts: dict[str, Any]  # captions: {"caption", "captions"}; conversations: {"roles", "values"}
    split: str | None  # from the record's "split" field


@dataclasses.dataclass
class _Plan:
    """Everything the builder needs, decided before anything is written."""

    name: str
    kind: str
    image_shape: tuple[int, int, int]
    image_size: int | None
    resize_mode: str
    by_split: dict[str, list[_Record]]
    problems: "_Problems"
    description: str


def _caller_stacklevel() -> int:
    """The `stacklevel` that attributes a warning to import_folder's caller, however deep the
    warning is raised (in the second pass, TFDS's and tqdm's frames sit in between)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code is not import_folder.__code__:
        frame, level = frame.f_back, level + 1
    return level + 1 if frame is not None else 2


class _Problems:
    """Raises or counts bad input per on_error, warns for the first MAX_WARNINGS skips."""

    def __init__(self, on_error: str, source: str):
        self.on_error, self.source = on_error, source
        self.skipped: Counter = Counter()
        self.listed: list[dict[str, Any]] = []
        self.truncated_records = 0
        self.raised: BadInputError | None = None

    def __call__(self, reason: str, detail: str, *, line: int | None = None,
                 file: str | None = None) -> None:
        assert reason in REASONS, reason
        error = BadInputError(reason, detail, source=self.source, line=line, file=file)
        if self.on_error == "raise":
            self.raised = error
            raise error
        if sum(self.skipped.values()) < MAX_WARNINGS:
            warnings.warn(f"skipped: {error}", SkippedRecordWarning, stacklevel=_caller_stacklevel())
        elif sum(self.skipped.values()) == MAX_WARNINGS:
            warnings.warn(f"more records skipped in {self.source}; every one is counted in "
                          f"{REPORT_FILE}", SkippedRecordWarning, stacklevel=_caller_stacklevel())
        self.skipped[reason] += 1
        if len(self.listed) < MAX_REPORTED_PROBLEMS:
            self.listed.append({"line": line, "file": file, "reason": reason, "detail": detail})


# --- first pass: the JSONL ----------------------------------------------------------------------


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes without the line ending), blank lines left out."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # A UTF-8 byte-order mark (some editors write one).
            raw = raw.rstrip(b"\r\n")
            if raw.strip():
                yield number, raw


def _utf8_ok(text: str) -> bool:
    # json.loads accepts escaped lone surrogates ("\ud800"), which cannot be written as UTF-8.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _fit_text(text: str, max_bytes: int | None, on_long: str) -> tuple[str, bool] | None:
    """(text, was_truncated), or None when the text is too long and on_long == "reject"."""
    encoded = text.encode("utf-8")
    if max_bytes is None or len(encoded) <= max_bytes:
        return text, False
    if on_long == "reject":
        return None
    # Cutting the bytes may split the last character; "ignore" drops only that partial one.
    return encoded[:max_bytes].decode("utf-8", "ignore"), True


def _record_kind(record: dict[str, Any]) -> str | None:
    if "conversations" in record:
        return "conversations"
    if "caption" in record or "captions" in record:
        return "captions"
    return None


def _texts(record: dict[str, Any], kind: str, report, line: int, file: str,
           max_bytes: int | None, on_long: str) -> tuple[dict[str, Any], bool] | None:
    """The record's text features and whether one was truncated, or None after a problem."""
    where = dict(line=line, file=file)
    if kind == "captions":
        if "caption" in record and "captions" in record:
            return report("bad_record", "has both \"caption\" and \"captions\"", **where)
        captions = record["captions"] if "captions" in record else [record["caption"]]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            return report("bad_record", "\"caption\" must be a string and \"captions\" a list of "
                          "strings", **where)
        labels = ["caption"] if "caption" in record else [f"captions[{i}]" for i in range(len(captions))]
        texts, roles = captions, None
        if not captions:
            return report("empty_text", "\"captions\" is an empty list", **where)
    else:
        turns = record["conversations"]
        if not isinstance(turns, list) or not all(
                isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
                for t in turns):
            return report("bad_record", "\"conversations\" must be a list of {\"from\": str, "
                          "\"value\": str}", **where)
        if not turns:
            return report("empty_text", "\"conversations\" is an empty list", **where)
        roles = [t["from"] for t in turns]
        texts = [t["value"] for t in turns]
        labels = [f"conversations[{i}].value" for i in range(len(turns))]
        for i, role in enumerate(roles):
            if not role.strip():
                return report("empty_text", f"conversations[{i}].from is empty", **where)
    if not all(_utf8_ok(t) for t in texts + (roles or [])):
        return report("not_utf8", "text holds an escaped lone surrogate, not encodable as UTF-8", **where)
    fitted, truncated = [], False
    for label, text in zip(labels, texts):
        if not text.strip():
            return report("empty_text", f"{label} is empty", **where)
        fit = _fit_text(text, max_bytes, on_long)
        if fit is None:
            return report("text_too_long", f"{label} is {len(text.encode('utf-8'))} bytes, more "
                          f"than max_caption_bytes={max_bytes}", **where)
        fitted.append(fit[0])
        truncated |= fit[1]
    if kind == "captions":
        return {"caption": fitted[0], "captions": fitted}, truncated
    return {"roles": roles, "values": fitted}, truncated


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    """(height, width) the image will have after `ImageOps.exif_transpose`."""
    w, h = im.size
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # A damaged EXIF block: exif_transpose will not rotate either.
        orientation = 1
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def _image_problem(error: BaseException) -> str:
    return "truncated_image" if "truncat" in str(error).lower() else "corrupt_image"


def _probe_image(path: str, report, line: int, file: str) -> tuple[int, int] | None:
    """The oriented (height, width) from the file's header, or None after a problem. Cheap: the
    pixels are decoded once, in the second pass."""
    if not os.path.isfile(path):
        return report("missing_image", f"no such file: {path}", line=line, file=file)
    try:
        with Image.open(path) as im:
            return _oriented_size(im)
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        return report(_image_problem(e), f"{path}: {type(e).__name__}: {e}", line=line, file=file)


def _read_records(annotations: str, images_dir: str, kind: str, report, max_bytes: int | None,
                  on_long: str) -> tuple[str, list[_Record]]:
    """First pass over the JSONL: the usable records, and the kind they settle on."""
    records: list[_Record] = []
    decided_by = None  # the line that settled kind="auto"
    for line, raw in _lines(annotations):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            report("not_utf8", f"byte 0x{raw[e.start]:02x} at column {e.start + 1} is not UTF-8", line=line)
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            report("bad_json", f"{e.msg} at column {e.colno}", line=line)
            continue
        if not isinstance(record, dict):
            report("bad_record", f"a JSON {type(record).__name__}, not an object", line=line)
            continue
        file = record.get("image")
        if file is None or (isinstance(file, str) and not file.strip()):
            report("no_image", "no \"image\" path", line=line)
            continue
        if not isinstance(file, str):
            report("bad_record", f"\"image\" must be one path (a string), got {type(file).__name__}",
                   line=line)
            continue
        if not _utf8_ok(file):
            report("not_utf8", "the \"image\" path holds an escaped lone surrogate", line=line)
            continue
        record_kind = _record_kind(record)
        if record_kind is None:
            report("no_text", "no \"caption\", \"captions\" or \"conversations\"", line=line, file=file)
            continue
        if kind == "auto":
            kind, decided_by = record_kind, line
        if record_kind != kind:
            why = f"decided by line {decided_by}" if decided_by else f"kind={kind!r}"
            report("wrong_kind", f"a {record_kind} record in a {kind} import ({why}; import the two "
                   "kinds as two datasets)", line=line, file=file)
            continue
        fitted = _texts(record, kind, report, line, file, max_bytes, on_long)
        if fitted is None:
            continue
        texts, truncated = fitted
        split = record.get("split")
        path = os.path.join(images_dir, file)
        size = _probe_image(path, report, line, file)
        if size is None:
            continue
        report.truncated_records += truncated
        if split is not None and not isinstance(split, str):
            split = json.dumps(split)  # Not a name: _split_by_field reports it if fields are used.
        records.append(_Record(line, file, path, size, texts, split))
    return kind, records


# --- splits -------------------------------------------------------------------------------------


def _apportion(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder counts that sum to n exactly."""
    names = list(fractions)
    quotas = np.array([fractions[k] * n for k in names])
    take = np.floor(quotas).astype(int)
    order = np.argsort(-(quotas - take), kind="stable")
    take[order[: n - take.sum()]] += 1
    return dict(zip(names, take.tolist()))


def _group_key(seed: int, file: str) -> bytes:
    # A hash instead of an RNG permutation: the same on every machine and library version.
    return hashlib.sha256(f"mmjax/import/{seed}/{os.path.normpath(file)}".encode()).digest()


def _image_groups(records: list[_Record]) -> dict[str, list[_Record]]:
    groups: dict[str, list[_Record]] = {}
    for r in records:
        groups.setdefault(os.path.normpath(r.file), []).append(r)
    return groups


def _split_by_fraction(records: list[_Record], fractions: Mapping[str, float],
                       seed: int) -> dict[str, list[_Record]]:
    """Whole image groups, in hash order, fill the splits up to their largest-remainder counts:
    a group goes to the split whose range [start, end) holds the group's first position.

    Small imports: every split gets at least one group when there are at least as many groups as
    splits. A split whose count rounds to 0 takes one record from the largest count, and a split
    left without a group (a group of several records straddled its range) takes the last group,
    in hash order, of the split with the most groups. With fewer groups some split stays empty
    (an error in `_plan`)."""
    groups = _image_groups(records)
    counts = _apportion(len(records), fractions)
    for name in fractions:
        if counts[name] == 0:
            largest = max(counts, key=lambda k: counts[k])  # the first of equal ones
            if counts[largest] >= 2:
                counts[largest] -= 1
                counts[name] += 1
    bounds, end = [], 0
    for name, count in counts.items():
        end += count
        bounds.append((end, name))
    assigned: dict[str, list[str]] = {name: [] for name in fractions}
    position = 0
    for file in sorted(groups, key=lambda f: _group_key(seed, f)):
        split = next(name for end, name in bounds if position < end)
        assigned[split].append(file)
        position += len(groups[file])
    for name in fractions:
        if not assigned[name]:
            donor = max(assigned, key=lambda k: len(assigned[k]))
            if len(assigned[donor]) >= 2:
                assigned[name].append(assigned[donor].pop())
    return {name: [r for file in files for r in groups[file]] for name, files in assigned.items()}


def _split_by_field(records: list[_Record], report) -> dict[str, list[_Record]]:
    by_split: dict[str, list[_Record]] = {}
    for r in records:
        if r.split is None or not _SPLIT_NAME.match(r.split):
            detail = "no \"split\" field" if r.split is None else f"\"split\" {r.split!r} is not a " \
                     "split name (letters, digits, _; starting with a letter)"
            report("bad_split", detail + " (splits come from the records' fields)", line=r.line,
                   file=r.file)
            continue
        by_split.setdefault(r.split, []).append(r)
    return by_split


def _check_fractions(splits: Mapping[str, float]) -> dict[str, float]:
    fractions = dict(splits)
    if not fractions:
        raise ValueError("splits must name at least one split")
    for name, fraction in fractions.items():
        if not isinstance(name, str) or not _SPLIT_NAME.match(name):
            raise ValueError(f"split name {name!r} must be letters, digits and _, starting with a letter")
        if not fraction > 0:
            raise ValueError(f"split {name!r} has fraction {fraction}: fractions must be positive")
    if abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions} (sum "
                         f"{sum(fractions.values()):g})")
    return fractions


# --- second pass: pixels ------------------------------------------------------------------------


def _resize(im: Image.Image, size: int, mode: str) -> Image.Image:
    """PIL RGB image -> size×size by `mode` (the same geometry as DataConfig.resize_mode):
    "squash" ignores the aspect ratio; "center_crop" crops the central square of side
    min(H, W) and resizes it; "pad" resizes the long side to `size` and centres the image on a
    black square (the short side rounds to the nearest pixel, at least 1)."""
    w, h = im.size
    bicubic = Image.Resampling.BICUBIC
    if mode == "center_crop" and w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im, w, h = im.crop((left, top, left + side, top + side)), side, side
    if mode == "pad" and w != h:
        scale = size / max(w, h)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (size, size))
        canvas.paste(im.resize((new_w, new_h), bicubic), ((size - new_w) // 2, (size - new_h) // 2))
        return canvas
    return im if (w, h) == (size, size) else im.resize((size, size), bicubic)


def _load_pixels(record: _Record, plan: _Plan) -> np.ndarray | None:
    """uint8 [H, W, 3], or None after a (skipped) problem."""
    try:
        with Image.open(record.path) as im:
            im.load()  # Decodes every pixel: a truncated file raises here, not later.
            rgb = ImageOps.exif_transpose(im).convert("RGB")
    except Exception as e:
        return plan.problems(_image_problem(e), f"{record.path}: {type(e).__name__}: {e}",
                             line=record.line, file=record.file)
    if plan.image_size is not None:
        rgb = _resize(rgb, plan.image_size, plan.resize_mode)
    pixels = np.asarray(rgb, dtype=np.uint8)
    if pixels.shape != plan.image_shape:  # The header promised another size.
        return plan.problems("corrupt_image", f"{record.path}: decoded to {pixels.shape}, its "
                             f"header says {record.size}", line=record.line, file=record.file)
    return pixels


# --- the TFDS builder ---------------------------------------------------------------------------


class _ImportedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Builds one import (a `_Plan`). Subclassed per dataset name by `_builder_class`."""

    RELEASE_NOTES = {VERSION: "Imported with mmjax.data.importer.import_folder."}
    VERSION = tfds.core.Version(VERSION)

    def __init__(self, *, plan: _Plan, **kwargs):
        self._plan = plan
        self.split_sizes: dict[str, int] = {}
        kwargs.setdefault("file_format", "array_record")  # random access for grain
        super().__init__(**kwargs)

    def _log_download_bytes(self) -> None:
        pass  # TFDS would print "Downloading and preparing ..."; import_folder prints a summary.

    def _log_download_done(self) -> None:
        pass

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        if self._plan.kind == "captions":
            texts = {"caption": text, "captions": tfds.features.Sequence(tfds.features.Text())}
        else:
            texts = {"roles": tfds.features.Sequence(tfds.features.Text()),
                     "values": tfds.features.Sequence(tfds.features.Text())}
        # DatasetInfo directly (not dataset_info_from_configs, which reads a README.md from this
        # package's directory). Raw uint8 tensors, not PNG: decoding PNG while training is slow
        # and encoding it would need TensorFlow.
        return LocalDatasetInfo(
            builder=self,
            description=self._plan.description,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=self._plan.image_shape, dtype=np.uint8),
                "id": np.int64,
                "file": tfds.features.Text(),
                **texts,
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is local.
        return {split: self._generate_examples(split) for split in self._plan.by_split}

    def _generate_examples(self, split: str):
        """Yields (line number, example) for the split's records, in line order."""
        count = 0
        for record in self._plan.by_split[split]:
            pixels = _load_pixels(record, self._plan)
            if pixels is None:
                continue
            count += 1
            yield record.line, {"image": pixels, "id": record.line, "file": record.file, **record.texts}
        self.split_sizes[split] = count
        if count == 0:
            raise ValueError(f"split {split!r} of {self._plan.name!r} is empty: all its "
                             f"{len(self._plan.by_split[split])} records were skipped "
                             f"({dict(self._plan.problems.skipped)})")


@functools.cache
def _builder_class(name: str) -> type[_ImportedBuilder]:
    """A builder class named `name`, kept out of TFDS's global registry (a TFDS dataset of the
    same name, or a second import, must not clash)."""
    return types.new_class(f"Imported_{name}", (_ImportedBuilder,), {"skip_registration": True},
                           lambda ns: ns.update({"name": name, "__module__": __name__}))


# --- the public entry point ---------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"name {name!r} must be snake_case: a lower-case letter, then lower-case "
                         "letters, digits or _ (a TFDS dataset name)")
    if name in registry.BUILTIN:
        raise ValueError(f"name {name!r} is an mmjax built-in dataset; choose another name")
    try:
        tfds.builder_cls(name)
    except tfds.core.registered.DatasetNotFoundError:
        return
    raise ValueError(f"name {name!r} is a TFDS dataset name: reading it back by name would use "
                     "TFDS's own builder; choose another name")


def _check_options(image_size, resize_mode, on_error, on_long_caption, kind, max_caption_bytes):
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    for label, value, allowed in [("resize_mode", resize_mode, RESIZE_MODES), ("on_error", on_error, ON_ERROR),
                                  ("on_long_caption", on_long_caption, ON_LONG_CAPTION), ("kind", kind, KINDS)]:
        if value not in allowed:
            raise ValueError(f"{label} must be one of {allowed}, got {value!r}")
    if max_caption_bytes is not None and (not isinstance(max_caption_bytes, int) or max_caption_bytes < 1):
        raise ValueError(f"max_caption_bytes must be a positive int or None, got {max_caption_bytes!r}")


def _image_shape(records: list[_Record], image_size: int | None) -> tuple[int, int, int]:
    if image_size is not None:
        return (image_size, image_size, 3)
    first = records[0]
    for r in records:
        if r.size != first.size:
            raise ValueError(
                f"images differ in size ({first.file!r} on line {first.line} is {first.size[0]}x"
                f"{first.size[1]}, {r.file!r} on line {r.line} is {r.size[0]}x{r.size[1]}, height x "
                "width): pass image_size=N to resize every image to NxN (see resize_mode)")
    return (*first.size, 3)


def _plan(images_dir: str, annotations: str, *, name: str, kind: str, image_size: int | None,
          resize_mode: str, splits, on_error: str, on_long_caption: str,
          max_caption_bytes: int | None, seed: int) -> _Plan:
    problems = _Problems(on_error, annotations)
    kind, records = _read_records(annotations, images_dir, kind, problems, max_caption_bytes,
                                  on_long_caption)
    if not records:
        raise ValueError(f"{annotations}: no usable record (skipped: {dict(problems.skipped) or 'none'})")
    use_fields = splits == "field" or (splits is None and any(r.split is not None for r in records))
    if use_fields:
        by_split = _split_by_field(records, problems)
    else:
        if isinstance(splits, str):
            raise ValueError(f"splits must be a mapping of fractions, \"field\" or None, got {splits!r}")
        fractions = _check_fractions(DEFAULT_SPLITS if splits is None else splits)
        if any(r.split is not None for r in records):
            warnings.warn("records carry \"split\" fields, but splits= fractions were passed: the "
                          "fields are ignored", UserWarning, stacklevel=3)
        by_split = _split_by_fraction(records, fractions, seed)
    kept = [r for rs in by_split.values() for r in rs]
    if not kept:
        raise ValueError(f"{annotations}: no usable record (skipped: {dict(problems.skipped)})")
    for split, rs in by_split.items():
        if not rs:
            n_images = len(_image_groups(kept))
            raise ValueError(
                f"split {split!r} would be empty: {len(kept)} usable records of {n_images} image"
                f"{'s' if n_images != 1 else ''} cannot fill the {len(by_split)} splits "
                f"{splits if splits is not None else DEFAULT_SPLITS} (records that share an image "
                f"stay in one split, and each split needs one image). Import at least {len(by_split)} "
                "images, pass fewer splits, e.g. splits={'train': 1.0} for a single one, or give the "
                "records \"split\" fields")
    description = (f"Imported by mmjax.data.importer.import_folder from {images_dir} and "
                   f"{annotations} ({kind}).")
    return _Plan(name=name, kind=kind, image_shape=_image_shape(kept, image_size), image_size=image_size,
                 resize_mode=resize_mode, by_split=by_split, problems=problems, description=description)


def _report(plan: _Plan, builder: _ImportedBuilder, images_dir: str, annotations: str,
            max_caption_bytes: int | None, on_long_caption: str) -> dict[str, Any]:
    p = plan.problems
    return {
        "name": plan.name,
        "version": VERSION,
        "kind": plan.kind,
        "images_dir": images_dir,
        "annotations": annotations,
        "image_shape": list(plan.image_shape),
        "image_size": plan.image_size,
        "resize_mode": plan.resize_mode,
        "imported": dict(builder.split_sizes),
        "imported_total": sum(builder.split_sizes.values()),
        "skipped": dict(sorted(p.skipped.items())),
        "skipped_total": sum(p.skipped.values()),
        "truncated_records": p.truncated_records,
        "max_caption_bytes": max_caption_bytes,
        "on_long_caption": on_long_caption,
        "problems": p.listed,
    }


def _summary(report: dict[str, Any], path: str) -> str:
    splits = ", ".join(f"{k} {v}" for k, v in report["imported"].items())
    skipped = ", ".join(f"{k} {v}" for k, v in report["skipped"].items())
    return (f"import_folder: {report['name']} -> {path}: {report['imported_total']} imported "
            f"({splits}), {report['skipped_total']} skipped" + (f" ({skipped})" if skipped else "")
            + f", {report['truncated_records']} with truncated text")


def import_folder(images_dir: str | os.PathLike, annotations_jsonl: str | os.PathLike, *, name: str,
                  data_dir: str | os.PathLike | None = None, image_size: int | None = None,
                  resize_mode: str = "squash", splits: Mapping[str, float] | str | None = None,
                  on_error: str = "raise", max_caption_bytes: int | None = DEFAULT_MAX_CAPTION_BYTES,
                  on_long_caption: str = "truncate", kind: str = "auto", seed: int = 0,
                  overwrite: bool = False) -> str:
    """Imports `images_dir` + `annotations_jsonl` as TFDS dataset `name`; returns the data_dir.

    Args:
      images_dir: folder the records' "image" paths are relative to.
      annotations_jsonl: one JSON record a line (see the module docstring).
      name: the dataset name, snake_case; not an mmjax built-in or a TFDS-registered name.
      data_dir: where to write; None: `registry.default_data_dir()`.
      image_size: S, store every image as uint8 [S, S, 3]; None keeps the images' own size,
        which must then be the same for all.
      resize_mode: "squash", "center_crop" or "pad" (black bars), as DataConfig.resize_mode.
      splits: {"split": fraction, ...} summing to 1 (default {"train": 0.95, "test": 0.05}),
        or "field" to take each record's "split"; None: "field" if any record has one. Each split
        gets at least one image when there are at least as many images as splits (so a small
        folder imports with the default); with fewer, a ValueError says to pass fewer splits,
        e.g. {"train": 1.0}, or "split" fields.
      on_error: "raise" (the first bad record raises BadInputError, nothing is written) or
        "skip" (drop it, warn, count it in import_report.json).
      max_caption_bytes: longest caption / conversation turn in UTF-8 bytes; None: no limit.
      on_long_caption: "truncate" (at a character boundary; counted) or "reject" (a problem
        with reason "text_too_long", handled per on_error).
      kind: "captions", "conversations" or "auto" (the first usable record decides).
      seed: changes which images go to which split.
      overwrite: replace an existing dataset `name` in data_dir (only once the new one is built).

    Returns:
      The resolved data_dir: `registry.open_split(name, split, data_dir)` reads the result.
    """
    _check_options(image_size, resize_mode, on_error, on_long_caption, kind, max_caption_bytes)
    _check_name(name)
    images_dir, annotations = os.fspath(images_dir), os.fspath(annotations_jsonl)
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"images_dir {images_dir!r} is not a directory")
    if not os.path.isfile(annotations):
        raise FileNotFoundError(f"annotations_jsonl {annotations!r} is not a file")
    data_dir = registry.resolve_data_dir(data_dir)
    target = os.path.join(data_dir, name)
    if os.path.lexists(target) and not overwrite:
        raise FileExistsError(f"dataset {name!r} already exists in data_dir {data_dir!r} ({target}): "
                              "pass overwrite=True to replace it")

    plan = _plan(images_dir, annotations, name=name, kind=kind, image_size=image_size,
                 resize_mode=resize_mode, splits=splits, on_error=on_error,
                 on_long_caption=on_long_caption, max_caption_bytes=max_caption_bytes, seed=seed)

    made_data_dir = not os.path.isdir(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    # Staging inside data_dir, so the final rename stays on one filesystem (atomic).
    staging = tempfile.mkdtemp(prefix=f".{name}.importing-", dir=data_dir)
    try:
        builder = _builder_class(name)(plan=plan, data_dir=staging)
        try:
            builder.download_and_prepare(file_format="array_record")
        except Exception:
            if plan.problems.raised is not None:  # Ours, whatever TFDS wrapped it in.
                raise plan.problems.raised from None
            raise
        report = _report(plan, builder, images_dir, annotations, max_caption_bytes, on_long_caption)
        with open(os.path.join(staging, name, REPORT_FILE), "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        if os.path.lexists(target):
            if not overwrite:  # Another import finished first.
                raise FileExistsError(f"dataset {name!r} appeared in {data_dir!r} during the import")
            os.rename(target, os.path.join(staging, "replaced"))
        os.rename(os.path.join(staging, name), target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if made_data_dir:
            with contextlib.suppress(OSError):
                os.rmdir(data_dir)  # Only if still empty.
        raise
    shutil.rmtree(staging, ignore_errors=True)
    print(_summary(report, os.path.join(target, VERSION)))
    return data_dir

