"""Tests for mmjax.data.shapes: pixels, captions and answers against the structured labels.

The checks never take a golden value from the generator's output: pixels are compared with the
named RGB constants and an independent cell geometry, captions and questions are parsed back with
a word-level parser written here (it only shares the vocabularies), and the parsed scene must
equal the stored labels. The datasets are built with small split sizes into a temporary data_dir.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from mmjax.data import pipeline, registry
from mmjax.data import shapes as S
from mmjax.data.config import DataConfig

SMALL_SIZES = {"train": 240, "test": 60, "test_novel": 60}


class _SmallShapes(S.ShapesBuilder, skip_registration=True):
    """The real builder with test-sized splits (same name, configs, version and examples)."""

    name = "shapes"  # TFDS would name a subclass after itself ("__small_shapes")
    split_sizes = SMALL_SIZES


class _TinyShapes(S.ShapesBuilder, skip_registration=True):
    name = "shapes"
    split_sizes = {"train": 6, "test": 3, "test_novel": 3}


def test_a_build_says_nothing_is_downloaded(tmp_path, capfd):
    """TFDS would print "Downloading and preparing dataset Unknown size ..." for this local build."""
    _TinyShapes(data_dir=str(tmp_path), config="64").download_and_prepare(file_format="array_record")
    out = capfd.readouterr()
    text = out.out + out.err
    assert "download" not in text.lower().replace("nothing is downloaded", ""), text
    assert (f"mmjax: building the local TFDS dataset shapes/64 in {tmp_path}/shapes/64/1.0.0 "
            "(nothing is downloaded)") in text, text


def _build(data_dir: Path, config: str = "32") -> Path:
    _SmallShapes(data_dir=str(data_dir), config=config).download_and_prepare(file_format="array_record")
    return data_dir


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, str]:
    """Two independent builds of shapes/32 and one of shapes/64 (test-sized)."""
    first = _build(tmp_path_factory.mktemp("tfds_a"))
    _build(first, "64")
    second = _build(tmp_path_factory.mktemp("tfds_b"))
    return {"a": str(first), "b": str(second)}


def _read_all(data_dir: str, split: str, name: str = "shapes") -> list[dict]:
    source = registry.open_split(name, split, data_dir)
    return sorted((source[i] for i in range(len(source))), key=lambda ex: int(ex["id"]))


def _examples(n_per_split: int, resolution: int = 32) -> list[tuple[str, dict]]:
    return [(split, S.generate_example(split, i, resolution))
            for split in S.SPLIT_SIZES for i in range(n_per_split)]


def _labels(ex) -> list[tuple[int, int, int, int]]:
    """[(size, color, shape, position)] of the stored labels, checking the -1 padding."""
    n = int(ex["num_objects"])
    assert 1 <= n <= 3
    for key in ("shape", "color", "size", "position"):
        values = np.asarray(ex[key])
        assert values.shape == (3,) and np.all(values[n:] == -1) and np.all(values[:n] >= 0), key
    return sorted((int(ex["size"][i]), int(ex["color"][i]), int(ex["shape"][i]), int(ex["position"][i]))
                  for i in range(n))


# --- pixels -------------------------------------------------------------------------------------


def _cell_of_pixel_square(i: int, resolution: int) -> int | None:
    """The grid row (or column) whose band [k R/3, (k+1) R/3] holds the whole pixel [i, i+1]."""
    k = int(3 * i // resolution)
    return k if (k + 1) * resolution / 3 >= i + 1 else None


@pytest.mark.parametrize("resolution", [32, 64])
def test_pixels_are_the_named_colors_inside_their_cells(resolution):
    for split, ex in _examples(60, resolution):
        image, n = ex["image"], int(ex["num_objects"])
        assert image.shape == (resolution, resolution, 3) and image.dtype == np.uint8
        background = S.BACKGROUND_RGB[ex["background"]]
        cell_color = {int(ex["position"][i]): S.COLOR_RGB[ex["color"][i]] for i in range(n)}
        assert len(cell_color) == n  # one object per cell
        for position, rgb in cell_color.items():
            row, col = divmod(position, 3)
            centre = (int((row + 0.5) * resolution / 3), int((col + 0.5) * resolution / 3))
            np.testing.assert_array_equal(image[centre], rgb)
        last = resolution - 1
        for corner in [(0, 0), (0, last), (last, 0), (last, last)]:
            np.testing.assert_array_equal(image[corner], background)
        # Every other pixel is background, or lies wholly inside an occupied cell in its color.
        for y, x in zip(*np.nonzero(np.any(image != background, axis=-1))):
            row, col = _cell_of_pixel_square(y, resolution), _cell_of_pixel_square(x, resolution)
            assert row is not None and col is not None, f"{split}: pixel {(y, x)} crosses a cell edge"
            assert 3 * row + col in cell_color, f"{split}: pixel {(y, x)} in an empty cell"
            np.testing.assert_array_equal(image[y, x], cell_color[3 * row + col])
    # Object and background palettes never meet, and the named colors are far apart.
    palette = np.concatenate([S.COLOR_RGB, S.BACKGROUND_RGB]).astype(int)
    distances = np.linalg.norm(palette[:, None] - palette[None], axis=-1)
    assert distances[~np.eye(len(palette), dtype=bool)].min() > 90


def test_sizes_are_distinguishable_and_objects_scale_with_resolution():
    def area(shape, size, resolution, position=4):
        image = S.render_scene([S.ShapeObject(shape, 0, size, position)], 0, resolution)
        return int(np.any(image != 0, axis=-1).sum())

    def width(shape, size, resolution):
        image = S.render_scene([S.ShapeObject(shape, 0, size, 4)], 0, resolution)
        return int(np.any(image != 0, axis=(0, 2)).sum())

    for shape in range(len(S.SHAPES)):
        for resolution in S.RESOLUTIONS:
            small = [area(shape, 0, resolution, p) for p in range(9)]
            large = [area(shape, 1, resolution, p) for p in range(9)]
            # The same shape is large or small by at least 1.4x its area in every cell.
            assert min(large) >= 1.4 * max(small), (S.SHAPES[shape], resolution, small, large)
        for size in (0, 1):
            ratio = width(shape, size, 64) / width(shape, size, 32)
            # Half extent R/6 - 1: 9.67 / 4.33 = 2.2x, give or take a pixel of rounding.
            assert 1.7 < ratio < 2.8, (S.SHAPES[shape], size, ratio)


def test_render_scene_is_pure():
    objs = [S.ShapeObject(5, 2, 1, 0), S.ShapeObject(4, 7, 0, 8)]
    a = S.render_scene(objs, 1, 32)
    a[:] = 0  # the result is a fresh array: writing to it changes nothing cached
    np.testing.assert_array_equal(S.render_scene(objs, 1, 32), S.render_scene(objs[::-1], 1, 32))
    assert S.render_scene(objs, 1, 32).any()


# --- captions -----------------------------------------------------------------------------------

_COLOR = "|".join(S.COLORS)
_SHAPE = "|".join(S.SHAPES)
_RELATIVE = re.compile(rf"\b(?:directly |just )?(above|below|under|to the left of|to the right of) "
                       rf"(it|the (?:({_COLOR}) )?({_SHAPE}))\b")
_STEP = {"above": (-1, 0), "below": (1, 0), "under": (1, 0), "to the left of": (0, -1),
         "to the right of": (0, 1)}


def _absolute_cell(words: set[str]) -> int:
    """A cell from the position words of a phrase: "in the top left corner", "on the right"..."""
    assert words & {"top", "bottom", "left", "right", "center", "middle"}, words
    row = 0 if "top" in words else 2 if "bottom" in words else 1
    col = 0 if "left" in words else 2 if "right" in words else 1
    return 3 * row + col


def _one(words: list[str], vocabulary) -> int:
    hits = [w for w in words if w in vocabulary]
    assert len(hits) == 1, (words, vocabulary)
    return vocabulary.index(hits[0])


def parse_caption(caption: str) -> tuple[list[tuple[int, int, int, int]], int | None, int]:
    """Caption -> ([(size, color, shape, position)], stated count or None, relative phrases used).

    Each clause names one object by a size, a color and a shape word, and its cell by position
    words or by a relative phrase to "it" (the previous object) or to "the [color] shape", which
    must name exactly one object of the whole scene.
    """
    count = None
    if ": " in caption:
        prefix, caption = caption.split(": ", 1)
        (count,) = [S.NUMBER_WORDS.index(w) for w in prefix.split() if w in S.NUMBER_WORDS]
    objects, references, used = [], [], 0
    for clause in re.split(r", and |, | and |\. |; ", caption):
        match = _RELATIVE.search(clause)
        if match:
            relation, ref, ref_color, ref_shape = match.groups()
            used += 1
            if ref == "it":
                anchor = objects[-1]
            else:
                color = S.COLORS.index(ref_color) if ref_color else None
                shape = S.SHAPES.index(ref_shape)
                references.append((color, shape))
                (anchor,) = [o for o in objects if o[2] == shape and color in (None, o[1])]
            dr, dc = _STEP[relation]
            row, col = divmod(anchor[3], 3)
            assert 0 <= row + dr < 3 and 0 <= col + dc < 3
            position = 3 * (row + dr) + col + dc
            clause = clause[:match.start()] + clause[match.end():]
        words = clause.split()
        if not match:
            position = _absolute_cell(set(words))
        objects.append((_one(words, S.SIZES), _one(words, S.COLORS), _one(words, S.SHAPES), position))
    for color, shape in references:  # "the circle" / "the red circle" is one object of the scene
        assert sum(o[2] == shape and color in (None, o[1]) for o in objects) == 1
    return sorted(objects), count, used


def test_captions_state_every_object_exactly():
    relative = counted = 0
    templates = set()
    for split, ex in _examples(150):
        caption = ex["caption"]
        assert caption == caption.strip().lower() and "  " not in caption
        objects, count, used = parse_caption(caption)
        assert objects == _labels(ex), (split, caption)
        assert count in (None, int(ex["num_objects"])), caption
        relative += used > 0
        counted += count is not None
        skeleton = re.sub(rf"\b({_COLOR}|{_SHAPE}|small|large|one|two|three)\b", "_", caption)
        templates.add(re.sub(r"\b(top|bottom|left|right|center|middle)\b", "P", skeleton))
    # The grammar varies: relative phrases, count prefixes and many distinct sentence frames.
    assert relative > 50 and counted > 50 and len(templates) > 150


def test_relative_phrases_only_for_neighbours():
    # A hand-made scene: the only objects next to each other are the circle (top left) and the
    # star right of it; the square (bottom right) is two cells from both.
    scene = S.Scene((S.ShapeObject(0, 0, 1, 0), S.ShapeObject(5, 5, 0, 1), S.ShapeObject(1, 3, 1, 8)), 0)
    seen_relative = False
    for seed in range(200):
        caption = S.caption_scene(scene, np.random.default_rng(seed))
        objects, _, used = parse_caption(caption)
        assert objects == sorted((o.size, o.color, o.shape, o.position) for o in scene.objects)
        for match in _RELATIVE.finditer(caption):
            seen_relative = True
            assert match.group(1) in ("to the left of", "to the right of"), caption
    assert seen_relative



def test_reading_order_caption_by_hand_and_parsed_back():
    # Written out by hand: the count, then the cells in reading order (top left first), each named
    # by row and column, "there is", and the noun phrase in size-color-shape order.
    scene = S.Scene((S.ShapeObject(1, 3, 1, 8), S.ShapeObject(0, 0, 0, 0), S.ShapeObject(5, 5, 1, 5)), 0)
    assert S.reading_order_caption(scene) == (
        "three objects: at the top left there is a small red circle; in the middle right there is a large "
        "blue star; at the bottom right there is a large green square")
    assert S.reading_order_caption(S.Scene((S.ShapeObject(3, 7, 0, 4),), 1)) == (
        "one object: in the center there is a small white diamond")
    for _, ex in _examples(60):
        scene = S.scene_from_example(ex)
        caption = S.reading_order_caption(scene)
        objects, count, used = parse_caption(caption)       # this file's parser, not the module's
        assert objects == _labels(ex) and count == int(ex["num_objects"]) and used == 0, caption
        assert S.parse_caption(caption) == scene.objects

# --- questions ----------------------------------------------------------------------------------

_POSITION_Q = re.compile(r"what (shape|color|size) is (?:the shape )?((?:at|in|on) the [a-z ]+)\?")


def answer(question: str, objects: list[tuple[int, int, int, int]]) -> str | None:
    """The answer the labels give to a question; None if the question is ambiguous for them."""
    def unique(color, shape):
        found = [o for o in objects if o[2] == shape and color in (None, o[1])]
        return found[0] if len(found) == 1 else None

    def number(k):
        return S.NUMBER_WORDS[k]

    if question == "how many objects are there?":
        return number(len(objects))
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return number(sum(S.SHAPE_PLURALS[o[2]] == m[1] for o in objects))
    if m := re.fullmatch(rf"how many ({_COLOR}) objects are there\?", question):
        return number(sum(o[1] == S.COLORS.index(m[1]) for o in objects))
    if m := re.fullmatch(rf"is there an? ({_COLOR}) ({_SHAPE})\?", question):
        article = question.split()[2]
        assert article == ("an" if m[1][0] in "aeiou" else "a")
        present = any(o[1:3] == (S.COLORS.index(m[1]), S.SHAPES.index(m[2])) for o in objects)
        return "yes" if present else "no"
    if m := re.fullmatch(rf"what color is the ({_SHAPE})\?", question):
        obj = unique(None, S.SHAPES.index(m[1]))
        return obj and S.COLORS[obj[1]]
    if m := re.fullmatch(rf"what size is the ({_COLOR}) ({_SHAPE})\?", question):
        obj = unique(S.COLORS.index(m[1]), S.SHAPES.index(m[2]))
        return obj and S.SIZES[obj[0]]
    if m := re.fullmatch(rf"what shape is directly (above|below|to the left of|to the right of) "
                         rf"the ({_COLOR}) ({_SHAPE})\?", question):
        ref = unique(S.COLORS.index(m[2]), S.SHAPES.index(m[3]))
        if ref is None:
            return None
        dr, dc = _STEP[m[1]]
        r0, c0 = divmod(ref[3], 3)
        # Unambiguous only if exactly one object lies that way at all, in the neighbouring cell.
        that_way = [o for o in objects if (dr and np.sign(o[3] // 3 - r0) == dr)
                    or (dc and np.sign(o[3] % 3 - c0) == dc)]
        if len(that_way) != 1 or divmod(that_way[0][3], 3) != (r0 + dr, c0 + dc):
            return None
        return S.SHAPES[that_way[0][2]]
    if m := _POSITION_Q.fullmatch(question):
        words = set(m[2].split())
        # Row and column both named ("in the middle left"), or the center: never a bare "on the
        # left", which could also mean the top left object.
        assert len(words & {"top", "bottom", "left", "right", "middle"}) == 2 or words >= {"center"}
        cell = _absolute_cell(words)
        found = [o for o in objects if o[3] == cell]
        if len(found) != 1:
            return None
        size, color, shape, _ = found[0]
        return {"shape": S.SHAPES[shape], "color": S.COLORS[color], "size": S.SIZES[size]}[m[1]]
    raise AssertionError(f"unknown question form: {question!r}")


def test_answers_follow_from_the_labels():
    frames = set()
    for split, ex in _examples(150):
        objects = _labels(ex)
        questions, answers = ex["questions"], ex["answers"]
        assert 3 <= len(questions) == len(answers) <= S.NUM_QUESTIONS
        assert len(set(questions)) == len(questions)
        for q, a in zip(questions, answers):
            assert re.fullmatch(r"[a-z]+", a), a  # one word
            assert answer(q, objects) == a, (split, q, a, objects)
            frames.add(re.sub(rf"\b({_COLOR}|{_SHAPE}|{'|'.join(S.SHAPE_PLURALS)}|top|bottom|left|right|"
                              rf"center|above|below)\b", "_", q))
        # Train and test keep the held-out pairs out of their text too.
        if split != "test_novel":
            for color, shape in S.HELD_OUT_PAIRS:
                assert f"{color} {shape}" not in " ".join(questions) + ex["caption"]
    assert len(frames) >= 9, frames
    yes_no = [a for _, ex in _examples(60) for a in ex["answers"] if a in ("yes", "no")]
    assert 0.3 < yes_no.count("yes") / len(yes_no) < 0.7


# --- splits, determinism and the built dataset --------------------------------------------------


def test_held_out_pairs_only_in_test_novel(built):
    held_out = {(S.COLORS.index(c), S.SHAPES.index(s)) for c, s in S.HELD_OUT_PAIRS}
    assert len(held_out) >= 3 and len(held_out) / (len(S.COLORS) * len(S.SHAPES)) < 0.15
    for split, size in SMALL_SIZES.items():
        examples = _read_all(built["a"], split)
        assert [int(ex["id"]) for ex in examples] == list(range(size))
        for ex in examples:
            pairs = {(c, s) for _, c, s, _ in _labels(ex)}
            if split == "test_novel":
                assert pairs & held_out
            else:
                assert not pairs & held_out
    # Every color and shape word still appears in training, in other pairs.
    train = [o for ex in _read_all(built["a"], "train") for o in _labels(ex)]
    assert {o[1] for o in train} == set(range(len(S.COLORS)))
    assert {o[2] for o in train} == set(range(len(S.SHAPES)))


def test_train_and_test_never_share_a_scene():
    def key(scene):
        return (scene.background, tuple(sorted(scene.objects)))

    train = {key(S.sample_split_scene("train", S.example_rng("train", i))) for i in range(4000)}
    test = [key(S.sample_split_scene("test", S.example_rng("test", i))) for i in range(400)]
    # One-object scenes are few (43 pairs x 2 sizes x 9 cells x 3 backgrounds), so without the
    # split by scene hash dozens of these test scenes would also be train scenes.
    assert sum(len(objs) == 1 for _, objs in test) > 80
    assert not train & set(test)


def test_builds_are_deterministic_and_match_generate_example(built):
    for split in SMALL_SIZES:
        a, b = _read_all(built["a"], split), _read_all(built["b"], split)
        assert len(a) == len(b) == SMALL_SIZES[split]
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
        # Per-example seeding: any index, generated alone and in any order, is the stored example.
        for i in (SMALL_SIZES[split] - 1, 17, 0):
            fresh = S.generate_example(split, i)
            stored = a[i]
            np.testing.assert_array_equal(stored["image"], fresh["image"])
            assert stored["caption"].decode() == fresh["caption"]
            assert [q.decode() for q in stored["questions"]] == fresh["questions"]
            assert [t.decode() for t in stored["answers"]] == fresh["answers"]
            assert S.scene_from_example(stored) == S.scene_from_example(fresh)
    # The files themselves are byte-identical.
    files_a = sorted(Path(built["a"], "shapes", "32").rglob("*array_record*"))
    assert files_a
    for fa in files_a:
        fb = Path(built["b"]) / fa.relative_to(built["a"])
        assert fa.read_bytes() == fb.read_bytes(), fa.name


def test_64_pixel_config_has_the_same_scenes(built):
    small = _read_all(built["a"], "test_novel")
    big = _read_all(built["a"], "test_novel", name="shapes/64")  # read back from its files
    for s, b in zip(small, big):
        assert b["image"].shape == (64, 64, 3)
        assert s["caption"] == b["caption"] and S.scene_from_example(s) == S.scene_from_example(b)
        background = S.BACKGROUND_RGB[s["background"]]
        fg_small = np.any(s["image"] != background, axis=-1).sum()
        fg_big = np.any(b["image"] != background, axis=-1).sum()
        # Area ~ R^2, loosely: a thin cross is 1 px wide at 32 px but 5 px at 64 px.
        assert 3 * fg_small < fg_big < 9 * fg_small


def test_open_split_gives_documented_fields(built):
    source = registry.open_split("shapes", "train", built["a"])
    assert len(source) == SMALL_SIZES["train"]
    ex = source[3]
    assert set(ex) == {"image", "caption", "id", "num_objects", "shape", "color", "size", "position",
                       "background", "questions", "answers"}
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 3)
    for key in ("shape", "color", "size", "position"):
        assert ex[key].dtype == np.int32 and ex[key].shape == (3,)
    assert isinstance(ex["caption"], bytes) and all(isinstance(q, bytes) for q in ex["questions"])
    assert int(ex["background"]) in range(len(S.BACKGROUNDS))
    # And through the grain eval pipeline with the caption as text.
    cfg = DataConfig(name="shapes", data_dir=built["a"], text_field="caption", max_text_len=256)
    batch = next(iter(pipeline.eval_batches(cfg, global_batch_size=16, process_index=0, process_count=1)))
    assert batch["image"].shape == (16, 32, 32, 3) and batch["text_ids"].shape == (16, 256)
    assert set(batch["id"][batch["mask"]]) <= set(range(SMALL_SIZES["test"]))
