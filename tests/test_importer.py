"""Tests for mmjax.data.importer: a folder of images + JSONL -> a TFDS dataset read by the registry.

Golden values are the pixels and texts the tests themselves write into the folder (PIL-encoded
PNG exactly, JPEG within its tolerance), never the importer's output.
"""

from __future__ import annotations

import json
import os
import tempfile
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mmjax.data import registry
from mmjax.data.importer import REPORT_FILE, BadInputError, SkippedRecordWarning, import_folder

SIZE = 16  # every image in the main folder is SIZE x SIZE
NUM_IMAGES = 12
JPEG_ATOL = 4  # uniform-colour JPEGs at quality 95 come back within a few levels


def _png_pixels(i: int) -> np.ndarray:
    """A distinct, non-uniform RGB image per i (PNG keeps it exactly)."""
    y, x = np.mgrid[:SIZE, :SIZE]
    return np.stack([(i * 20 + y * 7) % 256, (x * 13 + i) % 256, np.full_like(x, 255 - i * 9)],
                    axis=-1).astype(np.uint8)


def _jpeg_pixels(i: int) -> np.ndarray:
    """A uniform colour (JPEG keeps flat colour within a few levels)."""
    return np.broadcast_to(np.array([30 * i % 256, 200 - 10 * i, 50 + 15 * i], np.uint8),
                           (SIZE, SIZE, 3)).copy()


def _write_jsonl(path: Path, lines: list) -> Path:
    """Each item a dict (written as JSON) or raw bytes (written as they are)."""
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else json.dumps(line).encode())
            f.write(b"\n")
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict:
    """images/png/0..7.png and images/jpg/8..11.jpg with known pixels, plus the JSONL files."""
    root = tmp_path_factory.mktemp("folder")
    images = root / "images"
    (images / "png").mkdir(parents=True)
    (images / "jpg").mkdir()
    files, pixels = [], []
    for i in range(NUM_IMAGES):
        if i < 8:
            array, file = _png_pixels(i), f"png/{i}.png"
            Image.fromarray(array).save(images / file)
        else:
            array, file = _jpeg_pixels(i), f"jpg/{i}.jpg"
            Image.fromarray(array).save(images / file, quality=95)
        files.append(file)
        pixels.append(array)
    # Captions: one record per image (line i + 1), then two more for image 0 and image 8; line 3
    # carries several captions.
    captions = [{"image": f, "caption": f"picture number {i}"} for i, f in enumerate(files)]
    captions[2] = {"image": files[2], "captions": ["first of two", "second of two"]}
    captions += [{"image": files[0], "caption": "image zero again"},
                 {"image": files[8], "caption": "image eight again"}]
    # Conversations with their own split fields (line i + 1 is image i).
    conversations = []
    for i, f in enumerate(files):
        turns = [{"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
                 {"from": "gpt", "value": f"Picture {i}, café."}]
        if i % 3 == 0:
            turns += [{"from": "human", "value": "And the colour?"}, {"from": "gpt", "value": "Blue-ish."}]
        conversations.append({"image": f, "conversations": turns,
                              "split": ["train", "validation", "test"][i % 3]})
    return {
        "root": root, "images": images, "files": files, "pixels": pixels,
        "captions": captions, "captions_jsonl": _write_jsonl(root / "captions.jsonl", captions),
        "conversations": conversations,
        "conversations_jsonl": _write_jsonl(root / "conversations.jsonl", conversations),
    }


def _read(name: str, data_dir: str, split: str) -> list[dict]:
    source = registry.open_split(name, split, data_dir)
    return [source[i] for i in range(len(source))]


def _report(data_dir, name) -> dict:
    return json.loads(Path(data_dir, name, REPORT_FILE).read_text())


def _check_pixels(folder, example) -> None:
    index = folder["files"].index(example["file"].decode())
    expected = folder["pixels"][index]
    assert example["image"].dtype == np.uint8 and example["image"].shape == (SIZE, SIZE, 3)
    if index < 8:
        np.testing.assert_array_equal(example["image"], expected)
    else:
        diff = np.abs(example["image"].astype(int) - expected.astype(int))
        assert diff.max() <= JPEG_ATOL, f"{example['file']}: max diff {diff.max()}"


def _listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# --- good input ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captions_import(folder, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds_captions"))
    out = import_folder(folder["images"], folder["captions_jsonl"], name="my_captions",
                        data_dir=data_dir, splits={"train": 0.75, "test": 0.25})
    return out


def test_captions_round_trip(folder, captions_import, capsys):
    data_dir = captions_import
    records = folder["captions"]
    split_of = {}
    for split in ("train", "test"):
        for ex in _read("my_captions", data_dir, split):
            line = int(ex["id"])
            record = records[line - 1]
            assert ex["file"].decode() == record["image"]
            expected = record.get("captions", [record.get("caption")])
            assert [c.decode() for c in ex["captions"]] == expected
            assert ex["caption"].decode() == expected[0]
            _check_pixels(folder, ex)
            assert line not in split_of, "an example in two splits"
            split_of[line] = split
    # Every record once; 14 records at 75/25 -> 11 / 3 by largest remainder (10.5 / 3.5, tie to
    # the first split), up to the two images that have two records each.
    assert sorted(split_of) == list(range(1, len(records) + 1))
    sizes = {s: sum(v == s for v in split_of.values()) for s in ("train", "test")}
    assert abs(sizes["test"] - 3.5) <= 2 and sizes["train"] + sizes["test"] == 14
    # Records that share an image share a split (no test image seen in training).
    assert split_of[1] == split_of[13] and split_of[9] == split_of[14]
    report = _report(data_dir, "my_captions")
    assert report["imported"] == sizes and report["skipped"] == {} and report["kind"] == "captions"
    # Plain TFDS reads it too, without mmjax.
    assert len(tfds.data_source("my_captions", split="test", data_dir=data_dir, download=False)) == sizes["test"]


def test_import_is_deterministic_and_seeded(folder, captions_import, tmp_path):
    def files(data_dir):
        version = Path(data_dir, "my_captions", "1.0.0")
        return {p.name: p.read_bytes() for p in version.glob("*.array_record*")}

    again = import_folder(folder["images"], folder["captions_jsonl"], name="my_captions",
                          data_dir=tmp_path / "a", splits={"train": 0.75, "test": 0.25})
    assert files(again) == files(captions_import)  # byte for byte
    reseeded = import_folder(folder["images"], folder["captions_jsonl"], name="my_captions",
                             data_dir=tmp_path / "b", splits={"train": 0.75, "test": 0.25}, seed=1)

    def test_ids(d):
        return sorted(int(ex["id"]) for ex in _read("my_captions", d, "test"))

    assert test_ids(reseeded) != test_ids(captions_import)


def test_conversations_with_split_fields(folder, tmp_path):
    data_dir = import_folder(folder["images"], folder["conversations_jsonl"], name="my_chats",
                             data_dir=tmp_path)
    records = folder["conversations"]
    seen = []
    for split in ("train", "validation", "test"):
        for ex in _read("my_chats", data_dir, split):
            record = records[int(ex["id"]) - 1]
            assert record["split"] == split
            assert [r.decode() for r in ex["roles"]] == [t["from"] for t in record["conversations"]]
            assert [v.decode("utf-8") for v in ex["values"]] == [t["value"] for t in record["conversations"]]
            _check_pixels(folder, ex)
            seen.append(int(ex["id"]))
    assert sorted(seen) == list(range(1, NUM_IMAGES + 1))
    assert _report(data_dir, "my_chats")["imported"] == {"train": 4, "validation": 4, "test": 4}


# --- bad input ----------------------------------------------------------------------------------


GOOD = 6  # good records (images 0..5) before and after each bad line


def _bad_folder(folder, tmp_path) -> dict:
    """Bad images next to copies of the good ones, and one record per bad case (by reason)."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(GOOD):
        Image.fromarray(folder["pixels"][i]).save(images / f"{i}.png")
    (images / "corrupt.png").write_bytes(b"this is not an image at all")
    whole = (images / "0.png").read_bytes()
    (images / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return {
        "corrupt_image": {"image": "corrupt.png", "caption": "broken"},
        "truncated_image": {"image": "truncated.png", "caption": "cut short"},
        "missing_image": {"image": "nowhere.png", "caption": "lost"},
        "empty_text": {"image": "1.png", "caption": "   "},
        "text_too_long": {"image": "2.png", "caption": "x" * 100},
        "not_utf8": b'{"image": "3.png", "caption": "caf\xe9"}',
        "bad_json": b'{"image": "4.png", "caption": "no closing brace"',
        "no_image": {"caption": "a caption without a picture"},
        "no_text": {"image": "5.png"},
    }


def _lines_with(bad_lines: list) -> list:
    good = [{"image": f"{i}.png", "caption": f"good {i}"} for i in range(GOOD)]
    return good[:3] + bad_lines + good[3:]


@pytest.mark.parametrize("reason", ["corrupt_image", "truncated_image", "missing_image", "empty_text",
                                    "text_too_long", "not_utf8", "bad_json", "no_image", "no_text"])
def test_bad_input_raises_naming_line_file_and_reason(folder, tmp_path, reason):
    cases = _bad_folder(folder, tmp_path)
    jsonl = _write_jsonl(tmp_path / "ann.jsonl", _lines_with([cases[reason]]))
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    (data_dir / "keep.txt").write_text("someone else's file")
    with pytest.raises(BadInputError, match=f"ann.jsonl line 4.*{reason}") as info:
        import_folder(tmp_path / "images", jsonl, name="bad", data_dir=data_dir, max_caption_bytes=50,
                      on_long_caption="reject", splits={"train": 0.5, "test": 0.5})
    assert info.value.reason == reason and info.value.line == 4
    record = cases[reason]
    if isinstance(record, dict) and "image" in record:
        assert repr(record["image"]) in str(info.value)
    # Nothing half-written: TFDS's incomplete.* folder and our staging folder are both gone
    # (truncated_image fails inside TFDS's build, the others before it starts).
    inside_tfds = "tensorflow_datasets" in "".join(traceback.format_tb(info.tb))
    assert inside_tfds == (reason == "truncated_image")
    assert _listing(data_dir) == ["keep.txt"]


def test_failed_import_into_new_data_dir_leaves_nothing(folder, tmp_path):
    cases = _bad_folder(folder, tmp_path)
    jsonl = _write_jsonl(tmp_path / "ann.jsonl", _lines_with([cases["truncated_image"]]))
    with pytest.raises(BadInputError, match="truncated_image"):
        import_folder(tmp_path / "images", jsonl, name="bad", data_dir=tmp_path / "new" / "tfds",
                      splits={"train": 0.5, "test": 0.5})
    assert not (tmp_path / "new" / "tfds").exists()


def test_import_leaves_no_temporary_directories(folder, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    import_folder(folder["images"], folder["captions_jsonl"], name="my_captions",
                  data_dir=tmp_path / "data", splits={"train": 0.75, "test": 0.25})
    assert list(scratch.iterdir()) == []


def test_bad_input_is_skipped_counted_and_warned(folder, tmp_path, capsys):
    cases = _bad_folder(folder, tmp_path)
    bad = list(cases.values()) + [{"image": "0.png", "caption": "é" * 40}]  # 80 bytes: truncated
    jsonl = _write_jsonl(tmp_path / "ann.jsonl", _lines_with(bad))
    with pytest.warns(SkippedRecordWarning) as caught:
        data_dir = import_folder(tmp_path / "images", jsonl, name="skipping", data_dir=tmp_path / "tfds",
                                 on_error="skip", max_caption_bytes=51, splits={"train": 0.5, "test": 0.5})
    messages = " ".join(str(w.message) for w in caught)
    assert all(reason in messages for reason in cases if reason != "text_too_long")
    assert all(w.filename == __file__ for w in caught)  # attributed to the caller
    report = _report(data_dir, "skipping")
    # text_too_long is truncated by default (on_long_caption="truncate"), so 8 reasons skip.
    expected_skips = {reason: 1 for reason in cases if reason != "text_too_long"}
    assert report["skipped"] == expected_skips and report["skipped_total"] == 8
    assert report["truncated_records"] == 2  # "x" * 100 and "é" * 40
    assert {p["reason"]: p["line"] for p in report["problems"]} == {
        reason: 4 + k for k, reason in enumerate(cases) if reason != "text_too_long"}
    examples = _read("skipping", data_dir, "train") + _read("skipping", data_dir, "test")
    captions = {ex["caption"].decode() for ex in examples}
    assert {f"good {i}" for i in range(GOOD)} <= captions
    # Truncated to the byte limit at a character boundary: 51 bytes hold 25 two-byte "é".
    assert "x" * 51 in captions and "é" * 25 in captions
    assert len(examples) == report["imported_total"] == GOOD + 2
    out = capsys.readouterr().out
    assert "import_folder: skipping" in out and "8 skipped" in out and "bad_json 1" in out


def test_truncated_image_found_while_building_is_skipped(folder, tmp_path):
    cases = _bad_folder(folder, tmp_path)
    jsonl = _write_jsonl(tmp_path / "ann.jsonl", _lines_with([cases["truncated_image"]]))
    with pytest.warns(SkippedRecordWarning, match="line 4 .*truncated.png.*truncated_image"):
        data_dir = import_folder(tmp_path / "images", jsonl, name="trunc", data_dir=tmp_path / "tfds",
                                 on_error="skip", splits={"train": 0.5, "test": 0.5})
    report = _report(data_dir, "trunc")
    assert report["skipped"] == {"truncated_image": 1} and report["imported_total"] == GOOD


def test_a_small_folder_imports_with_the_default_splits(folder, tmp_path):
    """6 images and a bad record, on_error="skip", default 95/5 splits: 95% of 6 rounds to all 6,
    but every split still gets an image (here test gets one), so the import works."""
    cases = _bad_folder(folder, tmp_path)
    jsonl = _write_jsonl(tmp_path / "ann.jsonl", _lines_with([cases["missing_image"]]))
    with pytest.warns(SkippedRecordWarning):
        data_dir = import_folder(tmp_path / "images", jsonl, name="small", data_dir=tmp_path / "tfds",
                                 on_error="skip")
    assert _report(data_dir, "small")["imported"] == {"train": GOOD - 1, "test": 1}
    files = [ex["file"].decode() for split in ("train", "test") for ex in _read("small", data_dir, split)]
    assert sorted(files) == [f"{i}.png" for i in range(GOOD)]  # each image in exactly one split


def test_too_few_images_for_the_splits_is_a_clear_error(folder, tmp_path):
    """Records of a single image cannot fill two splits: the error says how to choose splits."""
    _bad_folder(folder, tmp_path)
    jsonl = _write_jsonl(tmp_path / "ann.jsonl", [{"image": "0.png", "caption": "one"},
                                                  {"image": "0.png", "caption": "the same image"}])
    with pytest.raises(ValueError, match=r"split 'test' would be empty: 2 usable records of 1 image.*"
                                         r"splits=\{'train': 1\.0\}"):
        import_folder(tmp_path / "images", jsonl, name="tiny", data_dir=tmp_path / "tfds")
    assert not (tmp_path / "tfds").exists()
    data_dir = import_folder(tmp_path / "images", jsonl, name="tiny", data_dir=tmp_path / "tfds",
                             splits={"train": 1.0})
    assert _report(data_dir, "tiny")["imported"] == {"train": 2}


def test_wrong_kind_and_bad_conversation(folder, tmp_path):
    _bad_folder(folder, tmp_path)
    chat = {"image": "0.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]}
    jsonl = _write_jsonl(tmp_path / "ann.jsonl", _lines_with([chat]))
    with pytest.raises(BadInputError, match="line 4.*wrong_kind.*decided by line 1"):
        import_folder(tmp_path / "images", jsonl, name="mixed", data_dir=tmp_path / "tfds")
    good_chat = {"image": "1.png", "conversations": [{"from": "human", "value": "hi"}]}
    jsonl = _write_jsonl(tmp_path / "chat.jsonl", [good_chat, chat, {"image": "2.png", "conversations": "hi"}])
    with pytest.raises(BadInputError, match=r"line 2.*empty_text: conversations\[1\].value is empty"):
        import_folder(tmp_path / "images", jsonl, name="chat", data_dir=tmp_path / "tfds")
    with pytest.warns(SkippedRecordWarning) as caught:
        data_dir = import_folder(tmp_path / "images", jsonl, name="chat", data_dir=tmp_path / "tfds",
                                 on_error="skip", splits={"train": 1.0})
    assert [str(w.message).split(": ")[2] for w in caught] == ["empty_text", "bad_record"]
    assert _report(data_dir, "chat")["skipped"] == {"bad_record": 1, "empty_text": 1}


# --- names, overwrite, options ------------------------------------------------------------------


def test_overwrite_protection(folder, tmp_path):
    _bad_folder(folder, tmp_path)
    first = _write_jsonl(tmp_path / "a.jsonl", [{"image": f"{i}.png", "caption": f"old {i}"} for i in range(4)])
    second = _write_jsonl(tmp_path / "b.jsonl", [{"image": f"{i}.png", "caption": f"new {i}"} for i in range(4)])
    broken = _write_jsonl(tmp_path / "c.jsonl", [{"image": f"{i}.png", "caption": "x"} for i in range(3)]
                          + [{"image": "truncated.png", "caption": "x"}])  # fails while building
    kw = dict(name="mine", data_dir=tmp_path / "tfds", splits={"train": 0.5, "test": 0.5})
    data_dir = import_folder(tmp_path / "images", first, **kw)

    def captions():
        return sorted(ex["caption"].decode() for s in ("train", "test") for ex in _read("mine", data_dir, s))

    assert captions() == [f"old {i}" for i in range(4)]
    with pytest.raises(FileExistsError, match="'mine' already exists.*overwrite=True"):
        import_folder(tmp_path / "images", second, **kw)
    # A failing overwrite keeps the old dataset.
    with pytest.raises(BadInputError):
        import_folder(tmp_path / "images", broken, overwrite=True, **kw)
    assert captions() == [f"old {i}" for i in range(4)]
    import_folder(tmp_path / "images", second, overwrite=True, **kw)
    assert captions() == [f"new {i}" for i in range(4)]
    assert sorted(os.listdir(data_dir)) == ["mine"]  # no staging folder left


def test_bad_names_and_options(folder, tmp_path, tmp_path_factory):
    args = (folder["images"], folder["captions_jsonl"])
    for name, match in [("digits", "built-in"), ("mnist", "TFDS dataset name"), ("My-Data", "snake_case")]:
        with pytest.raises(ValueError, match=match):
            import_folder(*args, name=name, data_dir=tmp_path)
    with pytest.raises(ValueError, match="resize_mode"):
        import_folder(*args, name="x", data_dir=tmp_path, image_size=8, resize_mode="stretch")
    with pytest.raises(ValueError, match="sum to 1"):
        import_folder(*args, name="x", data_dir=tmp_path, splits={"train": 0.9, "test": 0.2})
    with pytest.raises(ValueError, match="split 'b' would be empty: 2 usable records of 1 image"):
        import_folder(folder["images"], _write_jsonl(tmp_path_factory.mktemp("one") / "one.jsonl",
                                                     folder["captions"][:1] * 2),
                      name="x", data_dir=tmp_path, splits={"a": 0.5, "b": 0.25, "c": 0.25})
    assert list(tmp_path.iterdir()) == []


# --- image sizes --------------------------------------------------------------------------------


def test_resize_modes(tmp_path):
    # 40 wide x 20 high: blue | green | red columns of widths 10 | 20 | 10.
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :10] = (0, 0, 255)
    wide[:, 10:30] = (0, 255, 0)
    wide[:, 30:] = (255, 0, 0)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(wide).save(images / "wide.png")
    Image.fromarray(np.full((30, 10, 3), 200, np.uint8)).save(images / "tall.png")
    jsonl = _write_jsonl(tmp_path / "a.jsonl", [{"image": "wide.png", "caption": "wide", "split": "train"},
                                                {"image": "tall.png", "caption": "tall", "split": "train"}])
    # Different sizes need image_size.
    with pytest.raises(ValueError, match="images differ in size.*image_size"):
        import_folder(images, jsonl, name="sizes", data_dir=tmp_path / "tfds")

    def load(mode):
        d = import_folder(images, jsonl, name=f"sizes_{mode}", data_dir=tmp_path / "tfds", image_size=16,
                          resize_mode=mode)
        return {ex["file"].decode(): ex["image"].astype(int) for ex in _read(f"sizes_{mode}", d, "train")}

    def close(pixel, colour):
        return np.abs(pixel - np.array(colour)).max() <= 40

    squash = load("squash")["wide.png"]
    assert squash.shape == (16, 16, 3)
    assert close(squash[8, 1], (0, 0, 255)) and close(squash[8, 8], (0, 255, 0)) and close(squash[8, 14], (255, 0, 0))
    crop = load("center_crop")["wide.png"]  # the central 20x20 square is all green
    assert crop.shape == (16, 16, 3) and all(close(p, (0, 255, 0)) for p in crop.reshape(-1, 3))
    padded = load("pad")
    wide16 = padded["wide.png"]  # 40x20 -> 16x8, centred: rows 4..11, black bars above and below
    assert wide16.shape == (16, 16, 3)
    assert (wide16[:4] == 0).all() and (wide16[12:] == 0).all() and (wide16[4:12].max(axis=-1) > 0).all()
    assert close(wide16[8, 1], (0, 0, 255)) and close(wide16[8, 8], (0, 255, 0)) and close(wide16[8, 14], (255, 0, 0))
    tall16 = padded["tall.png"]  # 10x30 -> 5x16 (5.33 rounds to 5), centred at columns 5..9
    assert (tall16[:, :5] == 0).all() and (tall16[:, 10:] == 0).all()
    assert (np.abs(tall16[:, 5:10] - 200) <= 2).all()


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((10, 20, 3), np.uint8)  # 20 wide, 10 high as stored; left half red
    stored[:, :10] = (255, 0, 0)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    (tmp_path / "images").mkdir()
    image.save(tmp_path / "images" / "phone.jpg", exif=exif, quality=95)
    jsonl = _write_jsonl(tmp_path / "a.jsonl", [{"image": "phone.jpg", "caption": "upright", "split": "train"}])
    data_dir = import_folder(tmp_path / "images", jsonl, name="phone", data_dir=tmp_path / "tfds")
    (example,) = _read("phone", data_dir, "train")
    # Displayed upright: 10 wide, 20 high, the red half on top.
    assert example["image"].shape == (20, 10, 3)
    assert np.abs(example["image"][2, 5].astype(int) - (255, 0, 0)).max() <= JPEG_ATOL
    assert np.abs(example["image"][17, 5].astype(int)).max() <= JPEG_ATOL


def test_no_warnings_for_clean_input(folder, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedRecordWarning)
        import_folder(folder["images"], folder["conversations_jsonl"], name="clean", data_dir=tmp_path)


def test_the_training_pipeline_reads_an_import(folder, captions_import):
    from mmjax.data import pipeline
    from mmjax.data.config import DataConfig

    cfg = DataConfig(name="my_captions", data_dir=captions_import, eval_split="test", image_size=8)
    batches = list(pipeline.eval_batches(cfg, global_batch_size=4, process_index=0, process_count=1))
    ids = [int(i) for b in batches for i in b["id"][b["mask"]]]
    assert batches[0]["image"].shape == (4, 8, 8, 3) and batches[0]["image"].dtype == np.float32
    assert sorted(ids) == sorted(int(ex["id"]) for ex in _read("my_captions", captions_import, "test"))
