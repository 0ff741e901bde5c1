"""`shapes`: procedural, compositional image–text scenes as a local TFDS dataset.

Every scene is one to three flat-coloured objects on a 3×3 grid (at most one per cell) over a
plain background. Each object has four attributes, each drawn from a small named vocabulary:

    shape     circle square triangle diamond cross star                      (SHAPES)
    color     red orange yellow green cyan blue purple white                 (COLORS, COLOR_RGB)
    size      small large                                                    (SIZES)
    position  one cell of the grid below                                     (POSITIONS)

    top left    | top    | top right                                         (POSITION_GRID)
    left        | center | right
    bottom left | bottom | bottom right

and the background is black (60%), gray or navy (BACKGROUNDS, BACKGROUND_RGB), never an object
color. Words are American English ("color", "center", "gray"), all lower case.

Each example (builder config "32" = 32×32, the default, or "64" = 64×64):

    image        uint8 [R, R, 3]   flat colors, exactly the named RGB values, no anti-aliasing
    caption      text              every object's size, color, shape and cell, e.g.
                                   "two objects: a small red circle at the top left and below it
                                   is a large blue square"
    id           int64             the example's index in its split: generate_example(split, id)
                                   rebuilds it
    num_objects  int32             1..3
    shape, color, size, position
                 int32 [3]         class indices (into SHAPES, ...), objects in reading order of
                                   their cells (top left first), padded with -1
    background   int32             index into BACKGROUNDS
    questions, answers
                 Sequence(text)    up to NUM_QUESTIONS VQA pairs with one-word answers, only
                                   questions whose answer the scene fixes ("what color is the
                                   circle?" is asked only when there is exactly one circle)

Captions. Objects are mentioned in a random order; each mention states size, color and shape,
and the cell either absolutely ("at the top left", "in the bottom right corner", "on the left
side", "in the middle") or relative to an object mentioned earlier ("below it", "to the right of
the circle", "directly above the red star"). A relative phrase always means the *neighbouring*
cell in that direction, and names its reference unambiguously ("it" = the object mentioned just
before; "the circle" only when there is one circle; "the red circle" only when there is one red
circle), so every caption pins down the whole scene. Clause templates, noun-phrase forms, joiners
and an optional count prefix vary.

Splits (SPLIT_SIZES; per-example seeded from (SEED, split, index), so example i of a split does
not depend on how many examples were generated before it or in which order):

    train       20,000   no object has a held-out color–shape pair (HELD_OUT_PAIRS, 5 of 48)
    test         2,000   same distribution as train, but never the same scene: a hash of the scene
                         (background + every object's attributes) puts each possible scene into
                         exactly one of train / test (TEST_SCENE_FRACTION of them into test)
    test_novel   2,000   every scene has at least one object with a held-out pair; the rest of
                         its objects are unconstrained

The generator is pure NumPy and deterministic: the same VERSION gives the same examples on every
machine (the scene and text randomness comes from `np.random.Generator`, whose PCG64 stream and
the `integers` / `random` / `permutation` algorithms NumPy keeps stable). Any change to the
sampler, the grammar or the drawing must bump VERSION.

Neither building nor reading imports TensorFlow (raw-tensor, text and scalar features only).
Don't train with horizontal flips on this dataset: a flipped image contradicts "left"/"right" in
its caption.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from mmjax.data.local_info import LocalBuildMessages, LocalDatasetInfo

# --- vocabularies -------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
SHAPE_PLURALS = ("circles", "squares", "triangles", "diamonds", "crosses", "stars")
COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
COLOR_RGB = np.array([
    (255, 0, 0),      # red
    (255, 140, 0),    # orange
    (255, 255, 0),    # yellow
    (0, 200, 0),      # green
    (0, 255, 255),    # cyan
    (0, 64, 255),     # blue
    (160, 32, 240),   # purple
    (255, 255, 255),  # white
], np.uint8)
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right",
             "left", "center", "right",
             "bottom left", "bottom", "bottom right")  # index = 3 * row + column
POSITION_GRID = ("top left    | top    | top right\n"
                 "left        | center | right\n"
                 "bottom left | bottom | bottom right")
BACKGROUNDS = ("black", "gray", "navy")
BACKGROUND_RGB = np.array([(0, 0, 0), (110, 110, 110), (0, 0, 100)], np.uint8)
BACKGROUND_PROBS = (0.6, 0.2, 0.2)
NUMBER_WORDS = ("zero", "one", "two", "three")
MAX_OBJECTS = 3

# Color–shape pairs that train and test never show (~10% of the 48 pairs). Each color and each
# shape is held out at most once, so every word is still seen in training, in other pairs.
HELD_OUT_PAIRS = (("red", "triangle"), ("blue", "star"), ("green", "cross"),
                  ("yellow", "circle"), ("purple", "square"))
_HELD_OUT_IDS = frozenset((COLORS.index(c), SHAPES.index(s)) for c, s in HELD_OUT_PAIRS)
TRAIN_PAIRS = tuple((c, s) for c in range(len(COLORS)) for s in range(len(SHAPES))
                    if (c, s) not in _HELD_OUT_IDS)  # (color index, shape index)
NOVEL_PAIRS = tuple(sorted(_HELD_OUT_IDS))
ALL_PAIRS = tuple((c, s) for c in range(len(COLORS)) for s in range(len(SHAPES)))

RESOLUTIONS = (32, 64)
SPLIT_SIZES = {"train": 20_000, "test": 2_000, "test_novel": 2_000}
SPLIT_IDS = {"train": 0, "test": 1, "test_novel": 2}  # part of each example's seed
SEED = 0
TEST_SCENE_FRACTION = 0.1
NUM_QUESTIONS = 6
# Object half-extent in pixels: large = R/6 - 1 keeps every drawn pixel inside its R/3 cell (the
# cell centre is rounded to a pixel centre, up to 0.5 px off); small = 0.7 × large. At 32 px that
# is 3.0 px vs 4.3 px (about 7 vs 9 px across): 0.6 was tried and left a small star a 3-pixel blob.
SIZE_SCALE = (0.7, 1.0)


class ShapeObject(NamedTuple):
    """One object of a scene; every field is a class index into its vocabulary."""

    shape: int
    color: int
    size: int
    position: int  # 3 * row + column, row 0 at the top


class Scene(NamedTuple):
    objects: tuple[ShapeObject, ...]  # in reading order of their cells
    background: int


# --- geometry and drawing -----------------------------------------------------------------------


def cell_center(position: int, resolution: int) -> tuple[float, float]:
    """(y, x) of the cell's centre in pixel coordinates (pixel (i, j) covers [i, i+1) × [j, j+1)).

    The exact centre (k + 1/2)·R/3 is moved to the nearest pixel centre, floor(·) + 1/2, so shapes
    are symmetric on the pixel grid and the pixel `center_pixel` lies exactly under it.
    """
    row, col = divmod(position, 3)
    return (np.floor((row + 0.5) * resolution / 3) + 0.5, np.floor((col + 0.5) * resolution / 3) + 0.5)


def center_pixel(position: int, resolution: int) -> tuple[int, int]:
    """(row, column) of the pixel under a cell's (object's) centre."""
    y, x = cell_center(position, resolution)
    return int(y), int(x)


def half_extent(size: int, resolution: int) -> float:
    """An object's half width in pixels: its unit shape (inside [-1, 1]²) is scaled by this."""
    return SIZE_SCALE[size] * (resolution / 6 - 1)


def _star_polygon() -> np.ndarray:
    """5-pointed star, point up, outer radius 1, inner radius 0.5 (0.45 lost the feet of a small
    star at 32 px): [10, 2] (x, y), y down."""
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _inside_polygon(u: np.ndarray, v: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule: which points (u, v) lie inside `polygon` [K, 2]; vectorised over points."""
    inside = np.zeros(np.broadcast(u, v).shape, bool)
    for (x0, y0), (x1, y1) in zip(polygon, np.roll(polygon, -1, axis=0)):
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def unit_shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which points (u, v) of the unit square [-1, 1]² (v down) the shape covers.

    Every shape covers a neighbourhood of (0, 0) of radius >= 0.3 (so the centre pixel is always
    the object's color) and stays inside [-1, 1]² (so it stays inside its cell).
    """
    name = SHAPES[shape]
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if name == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if name == "triangle":  # point up; apex (0, -0.9), base from (-1, 0.85) to (1, 0.85)
        return (v <= 0.85) & (np.abs(u) <= (v + 0.9) / 1.75)
    if name == "cross":  # a plus sign with arms 0.6 wide: thin, so a small one is no blob
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if name == "star":
        return _inside_polygon(u, v, _star_polygon())
    raise ValueError(f"unknown shape index {shape}")


@functools.lru_cache(maxsize=None)
def object_mask(shape: int, size: int, position: int, resolution: int) -> np.ndarray:
    """bool [R, R]: the pixels whose centres the object covers (cached; read-only)."""
    cy, cx = cell_center(position, resolution)
    s = half_extent(size, resolution)
    centres = np.arange(resolution) + 0.5
    v = (centres[:, None] - cy) / s
    u = (centres[None, :] - cx) / s
    mask = unit_shape_mask(shape, u, v)
    mask.setflags(write=False)
    return mask


def render_scene(objects: Sequence[ShapeObject], background: int, resolution: int) -> np.ndarray:
    """The scene's picture: uint8 [R, R, 3], background color plus each object's flat color.

    Pure: depends only on its arguments. Objects sit in distinct cells and never leave them, so
    drawing order does not matter.
    """
    image = np.empty((resolution, resolution, 3), np.uint8)
    image[:] = BACKGROUND_RGB[background]
    for obj in objects:
        image[object_mask(obj.shape, obj.size, obj.position, resolution)] = COLOR_RGB[obj.color]
    return image


# --- sampling -----------------------------------------------------------------------------------


def sample_scene(rng: np.random.Generator, *, novel: bool = False,
                 num_objects: int | None = None) -> Scene:
    """A random scene: 1..3 objects (uniform) in distinct cells, background by BACKGROUND_PROBS.

    novel=False: every object's (color, shape) is one of TRAIN_PAIRS (uniform over them).
    novel=True: one object (a uniformly chosen one) has a held-out pair; the others any pair.
    """
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if num_objects is None else num_objects
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be in 1..{MAX_OBJECTS}, got {n}")
    positions = rng.permutation(9)[:n]
    pool = ALL_PAIRS if novel else TRAIN_PAIRS
    pairs = [pool[i] for i in rng.integers(0, len(pool), size=n)]
    if novel:
        pairs[int(rng.integers(0, n))] = NOVEL_PAIRS[int(rng.integers(0, len(NOVEL_PAIRS)))]
    sizes = rng.integers(0, len(SIZES), size=n)
    background = int(rng.choice(len(BACKGROUNDS), p=BACKGROUND_PROBS))
    objects = [ShapeObject(shape=s, color=c, size=int(z), position=int(p))
               for (c, s), z, p in zip(pairs, sizes, positions)]
    return Scene(tuple(sorted(objects, key=lambda o: o.position)), background)


def scene_key(scene: Scene) -> bytes:
    """A canonical byte string of everything that determines the picture."""
    fields = [scene.background] + [a for o in sorted(scene.objects, key=lambda o: o.position) for a in o]
    return bytes(fields)


def is_test_scene(scene: Scene) -> bool:
    """Whether this scene belongs to `test` (else to `train`): a fixed hash of `scene_key`."""
    digest = hashlib.sha256(b"mmjax/shapes/bucket/" + scene_key(scene)).digest()
    return int.from_bytes(digest[:4], "big") < TEST_SCENE_FRACTION * 2**32


def has_held_out_pair(obj: ShapeObject) -> bool:
    return (obj.color, obj.shape) in _HELD_OUT_IDS


def example_rng(split: str, index: int) -> np.random.Generator:
    """The generator of example `index` of `split`: seeded from (SEED, split, index) only."""
    return np.random.default_rng([SEED, SPLIT_IDS[split], index])


def sample_split_scene(split: str, rng: np.random.Generator) -> Scene:
    """A scene for `split`: train/test by rejection on `is_test_scene`, test_novel via novel=True."""
    if split == "test_novel":
        return sample_scene(rng, novel=True)
    want_test = split == "test"
    while True:  # ~1.1 draws for train, ~10 for test: microseconds either way
        scene = sample_scene(rng)
        if is_test_scene(scene) == want_test:
            return scene


# --- text ---------------------------------------------------------------------------------------

# Relations between two cells, each the *neighbouring* cell: (row step, column step).
_RELATION_STEPS = {"above": (-1, 0), "below": (1, 0), "left": (0, -1), "right": (0, 1)}
_RELATION_WORDS = {
    "above": ("above", "directly above", "just above"),
    "below": ("below", "directly below", "just below", "under"),
    "left": ("to the left of", "directly to the left of"),
    "right": ("to the right of", "directly to the right of"),
}


def relation(position: int, reference: int) -> str | None:
    """"above" / "below" / "left" / "right" if `position` is the neighbouring cell of `reference`
    in that direction (same column / row, one step), else None."""
    (r, c), (r0, c0) = divmod(position, 3), divmod(reference, 3)
    for name, (dr, dc) in _RELATION_STEPS.items():
        if (r - r0, c - c0) == (dr, dc):
            return name
    return None


def _strictly_in_direction(position: int, reference: int, name: str) -> bool:
    """The loose reading of a relation: any lower row for "below", any column left for "left"..."""
    (r, c), (r0, c0) = divmod(position, 3), divmod(reference, 3)
    return {"above": r < r0, "below": r > r0, "left": c < c0, "right": c > c0}[name]


RELATIONS = tuple(_RELATION_STEPS)  # "above", "below", "left", "right"


def neighbour_questions(scene: Scene, obj: ShapeObject) -> list[tuple[str, str, str]]:
    """(relation, question, answer) for each direction in which exactly one object of `scene` lies
    at all and that object is in the neighbouring cell: "what shape is directly below the red
    circle?" -> its shape. The answer is the same under the loose reading ("anywhere below") and the
    strict one. `obj` is named by colour and shape: the caller asks only when that pair is unique."""
    out = []
    for rel, words in _RELATION_WORDS.items():
        loose = [o for o in scene.objects if _strictly_in_direction(o.position, obj.position, rel)]
        if len(loose) == 1 and relation(loose[0].position, obj.position) == rel:
            out.append((rel, f"what shape is {words[1]} the {COLORS[obj.color]} {SHAPES[obj.shape]}?",
                        SHAPES[loose[0].shape]))
    return out


def position_phrases(position: int) -> tuple[str, ...]:
    """Ways a caption may name a cell absolutely.

    The first one is what questions use: it names both the row and the column, so "what shape is
    in the middle left?" stays unambiguous when the top left cell is taken too (a bare "on the
    left" means the middle left cell only by the POSITION_GRID convention).
    """
    name = POSITIONS[position]
    row, col = divmod(position, 3)
    if name == "center":
        return ("in the center", "at the center", "in the middle")
    if row != 1 and col != 1:  # corners
        return (f"at the {name}", f"in the {name}", f"in the {name} corner")
    if row != 1:  # top, bottom
        return (f"in the {name} middle", f"at the {name}", f"at the {name} center")
    return (f"in the middle {name}", f"on the {name}", f"on the {name} side")  # left, right


def _choice(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(0, len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(obj: ShapeObject, rng: np.random.Generator) -> str:
    size, color, shape = SIZES[obj.size], COLORS[obj.color], SHAPES[obj.shape]
    if rng.random() < 0.75:
        return f"a {size} {color} {shape}"
    return f"a {size} {shape} in {color}"


def _reference_names(obj: ShapeObject, scene: Scene) -> list[str]:
    """Unambiguous names for `obj` in `scene`: "the circle" if the only circle, "the red circle"
    if the only red circle."""
    names = []
    if sum(o.shape == obj.shape for o in scene.objects) == 1:
        names.append(f"the {SHAPES[obj.shape]}")
    if sum((o.shape, o.color) == (obj.shape, obj.color) for o in scene.objects) == 1:
        names.append(f"the {COLORS[obj.color]} {SHAPES[obj.shape]}")
    return names


_CLAUSES = ("{np} {loc}", "{loc} there is {np}", "{np} is {loc}", "there is {np} {loc}", "{loc} is {np}")


def caption_scene(scene: Scene, rng: np.random.Generator) -> str:
    """A caption that states every object's size, color, shape and cell (see the module docstring).

    Lower case, no final period. Relative phrases appear only between neighbouring cells and with
    an unambiguous reference, so the caption determines the scene exactly.
    """
    order = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    clauses = []
    for i, obj in enumerate(order):
        relative = []  # (relation, how the reference is named)
        if i > 0 and (rel := relation(obj.position, order[i - 1].position)):
            relative.append((rel, "it"))
        for earlier in order[:i]:
            if rel := relation(obj.position, earlier.position):
                relative += [(rel, name) for name in _reference_names(earlier, scene)]
        if relative and rng.random() < 0.6:
            rel, ref = _choice(rng, relative)
            loc = f"{_choice(rng, _RELATION_WORDS[rel])} {ref}"
        else:
            loc = _choice(rng, position_phrases(obj.position))
        clauses.append(_choice(rng, _CLAUSES).format(np=_noun_phrase(obj, rng), loc=loc))
    n = len(clauses)
    if n == 1:
        text = clauses[0]
    else:
        style = int(rng.integers(0, 3))
        if style == 0:
            text = ", ".join(clauses[:-1]) + " and " + clauses[-1]
        else:
            text = (". " if style == 1 else "; ").join(clauses)
    if rng.random() < 0.25:
        noun = _choice(rng, ("object", "shape")) + ("s" if n > 1 else "")
        prefix = _choice(rng, (f"{NUMBER_WORDS[n]} {noun}", f"there {'are' if n > 1 else 'is'} "
                                                            f"{NUMBER_WORDS[n]} {noun}"))
        text = f"{prefix}: {text}"
    return text


def reading_order_caption(scene: Scene) -> str:
    """The one canonical caption of a scene, a deterministic member of `caption_scene`'s grammar:
    the count, then the objects in reading order of their cells, each as "<cell> there is <noun
    phrase>" with the cell named by row and column (`position_phrases(p)[0]`), joined by "; ".

        "two objects: at the top left there is a small red circle; in the middle right there is
         a large blue square"

    A training target for captioners: the cell comes first and the order is fixed, so describing an
    object is asking what is at a cell, and no word depends on which object the caption happened to
    mention first. (Pix2Seq, writing detections as tokens, compares object orders and keeps a random
    one over a long COCO schedule; on `shapes` at CPU budgets the fixed order is what binds.)"""
    objs = sorted(scene.objects, key=lambda o: o.position)
    n = len(objs)
    clauses = [f"{position_phrases(o.position)[0]} there is a {SIZES[o.size]} {COLORS[o.color]} {SHAPES[o.shape]}"
               for o in objs]
    return f"{NUMBER_WORDS[n]} object{'s' if n > 1 else ''}: " + "; ".join(clauses)


def questions_for(scene: Scene, rng: np.random.Generator, *, max_questions: int = NUM_QUESTIONS,
                  exclude_pairs: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Up to `max_questions` (question, one-word answer) pairs that the scene answers uniquely.

    Question kinds, at most one of each kind until every kind was used (then more of the same kinds):
    counting ("how many objects are there?", "how many stars are there?", "how many red objects
    are there?" -> "zero".."three"), attribute of a unique object ("what color is the circle?",
    "what size is the red circle?"), attribute at a cell, named by row and column ("what shape is
    at the top left?", "what color is the shape in the middle right?"), existence ("is there a
    blue star?" -> "yes"/"no", one present and one absent pair), and a neighbour ("what shape is
    directly below the red circle?", asked only when exactly one object lies below it at all, and
    in the neighbouring cell).
    `exclude_pairs` (color, shape) names are never asked about as absent pairs (train keeps held-out
    pairs out of its text too).
    """
    objs = scene.objects
    kinds: dict[str, list[tuple[str, str]]] = {}

    def add(kind, question, answer):
        kinds.setdefault(kind, []).append((question, answer))

    add("count", "how many objects are there?", NUMBER_WORDS[len(objs)])
    shape = int(rng.integers(0, len(SHAPES))) if rng.random() < 0.5 else _choice(rng, objs).shape
    add("count_shape", f"how many {SHAPE_PLURALS[shape]} are there?",
        NUMBER_WORDS[sum(o.shape == shape for o in objs)])
    color = int(rng.integers(0, len(COLORS))) if rng.random() < 0.5 else _choice(rng, objs).color
    add("count_color", f"how many {COLORS[color]} objects are there?",
        NUMBER_WORDS[sum(o.color == color for o in objs)])
    for obj in objs:
        pos = position_phrases(obj.position)[0]
        add("shape_at", f"what shape is {pos}?", SHAPES[obj.shape])
        add("color_at", f"what color is the shape {pos}?", COLORS[obj.color])
        add("size_at", f"what size is the shape {pos}?", SIZES[obj.size])
        shape_name, pair_name = SHAPES[obj.shape], f"{COLORS[obj.color]} {SHAPES[obj.shape]}"
        if sum(o.shape == obj.shape for o in objs) == 1:  # "the circle" names it
            add("color_of", f"what color is the {shape_name}?", COLORS[obj.color])
        if sum((o.shape, o.color) == (obj.shape, obj.color) for o in objs) == 1:  # "the red circle"
            add("size_of", f"what size is the {pair_name}?", SIZES[obj.size])
            for _, question, answer in neighbour_questions(scene, obj):
                add("neighbour", question, answer)
    present = sorted({(o.color, o.shape) for o in objs})
    c, s = _choice(rng, present)
    add("exists", f"is there {_article(COLORS[c])} {COLORS[c]} {SHAPES[s]}?", "yes")
    excluded = {(COLORS.index(c), SHAPES.index(s)) for c, s in exclude_pairs}
    absent = [p for p in ALL_PAIRS if p not in present and p not in excluded]
    c, s = _choice(rng, absent)
    add("exists", f"is there {_article(COLORS[c])} {COLORS[c]} {SHAPES[s]}?", "no")

    # Shuffle within kinds, then take round-robin over the kinds in a random order.
    pools = [[items[i] for i in rng.permutation(len(items))] for items in kinds.values()]
    pools = [pools[i] for i in rng.permutation(len(pools))]
    chosen = []
    while len(chosen) < max_questions and any(pools):
        for pool in pools:
            if pool and len(chosen) < max_questions:
                chosen.append(pool.pop(0))
    return chosen


# --- reading text back: the grammar inverted ----------------------------------------------------
# Used to score generated captions and to group VQA questions; nothing here is part of generation.


class CaptionParseError(ValueError):
    """A caption that the grammar of `caption_scene` cannot produce (the message says where)."""


_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)
# A noun phrase of `_noun_phrase`: "a small red circle" or "a small circle in red".
_NOUN_PHRASE = re.compile(rf"\ba (small|large) (?:({_COLOR_RE}) ({_SHAPE_RE})|({_SHAPE_RE}) in ({_COLOR_RE}))\b")
_ABSOLUTE_PHRASES = {phrase: p for p in range(9) for phrase in position_phrases(p)}
_RELATION_OF_WORDS = {words: name for name, options in _RELATION_WORDS.items() for words in options}
_RELATIVE_PHRASE = re.compile(
    "(" + "|".join(sorted(map(re.escape, _RELATION_OF_WORDS), key=len, reverse=True)) + ")"
    + rf" (it|the (?:({_COLOR_RE}) )?({_SHAPE_RE}))")
_COUNT_PREFIX = re.compile(r"(?:there (?:is|are) )?(one|two|three) (?:object|shape)s?: ")
_CLAUSE_JOINERS = re.compile(r", | and |\. |; ")  # no clause contains one (see caption_scene)


def _parse_location(loc: str, mentioned: list[ShapeObject]) -> int:
    """The cell a clause's location names: an absolute phrase, or a relative one resolved against
    the objects mentioned before it ("it" = the last one; "the [color] shape" = the one such)."""
    if loc in _ABSOLUTE_PHRASES:
        return _ABSOLUTE_PHRASES[loc]
    m = _RELATIVE_PHRASE.fullmatch(loc)
    if m is None:
        raise CaptionParseError(f"{loc!r} is neither an absolute nor a relative location")
    words, ref, ref_color, ref_shape = m.groups()
    if ref == "it":
        if not mentioned:
            raise CaptionParseError(f"{loc!r}: 'it' before any object was mentioned")
        anchor = mentioned[-1]
    else:
        shape = SHAPES.index(ref_shape)
        color = None if ref_color is None else COLORS.index(ref_color)
        found = [o for o in mentioned if o.shape == shape and color in (None, o.color)]
        if len(found) != 1:
            raise CaptionParseError(f"{loc!r}: {len(found)} earlier objects fit {ref!r}, need exactly one")
        anchor = found[0]
    dr, dc = _RELATION_STEPS[_RELATION_OF_WORDS[words]]
    row, col = divmod(anchor.position, 3)
    if not (0 <= row + dr < 3 and 0 <= col + dc < 3):
        raise CaptionParseError(f"{loc!r}: no cell {_RELATION_OF_WORDS[words]} {POSITIONS[anchor.position]}")
    return 3 * (row + dr) + col + dc


def _parse_clause(clause: str, mentioned: list[ShapeObject]) -> ShapeObject:
    """One clause of `_CLAUSES` ("{np} {loc}", "{loc} there is {np}", "{np} is {loc}",
    "there is {np} {loc}", "{loc} is {np}") → its object."""
    matches = list(_NOUN_PHRASE.finditer(clause))
    if len(matches) != 1:
        raise CaptionParseError(f"clause {clause!r} has {len(matches)} noun phrases ('a <size> <color> <shape>'), "
                                "need exactly one")
    m = matches[0]
    size, color_a, shape_a, shape_b, color_b = m.groups()
    before, after = clause[:m.start()], clause[m.end():]
    if before in ("", "there is ") and after.startswith(" "):
        loc = after[1:]
        if before == "" and loc.startswith("is "):
            loc = loc[3:]
    elif after == "" and before.endswith(" there is "):
        loc = before[: -len(" there is ")]
    elif after == "" and before.endswith(" is "):
        loc = before[: -len(" is ")]
    else:
        raise CaptionParseError(f"clause {clause!r} fits none of the clause templates")
    position = _parse_location(loc, mentioned)
    return ShapeObject(shape=SHAPES.index(shape_a or shape_b), color=COLORS.index(color_a or color_b),
                       size=SIZES.index(size), position=position)


def parse_caption(caption: str, *, strict: bool = True) -> tuple[ShapeObject, ...]:
    """The objects a caption states, in reading order of their cells: the inverse of `caption_scene`.

    caption = [count prefix ": "] clause (joiner clause)*, joiners ", " / " and " / ". " / "; ";
    each clause is one object's noun phrase and location (see `_parse_clause`). Relative
    locations resolve against the objects mentioned before, like the generator names them.

    strict=True: anything the grammar cannot produce raises `CaptionParseError` (an unknown
    clause, an unresolvable reference, two objects in one cell, more than MAX_OBJECTS objects, a
    stated count that differs from the clauses, or a reference "the circle" that is not unique in
    the scene). strict=False (scoring a model's captions): clauses that do not parse are skipped
    and a later object in an already taken cell is dropped, so a partly wrong caption still yields
    the objects it states clearly.
    """
    text = caption.strip()
    stated = None
    if m := _COUNT_PREFIX.match(text):
        stated = NUMBER_WORDS.index(m[1])
        text = text[m.end():]
    objects: list[ShapeObject] = []
    for clause in _CLAUSE_JOINERS.split(text):
        try:
            obj = _parse_clause(clause, objects)
            if any(o.position == obj.position for o in objects):
                raise CaptionParseError(f"clause {clause!r} puts a second object at the {POSITIONS[obj.position]}")
        except CaptionParseError:
            if strict:
                raise
            continue
        objects.append(obj)
    if strict:
        if not 1 <= len(objects) <= MAX_OBJECTS:
            raise CaptionParseError(f"{len(objects)} objects, a scene has 1..{MAX_OBJECTS}: {caption!r}")
        if stated is not None and stated != len(objects):
            raise CaptionParseError(f"the caption says {NUMBER_WORDS[stated]} objects but states {len(objects)}: "
                                    f"{caption!r}")
        for m in _RELATIVE_PHRASE.finditer(text):  # "the circle" names the only circle of the scene
            if m[2] != "it":
                shape, color = SHAPES.index(m[4]), None if m[3] is None else COLORS.index(m[3])
                if sum(o.shape == shape and color in (None, o.color) for o in objects) != 1:
                    raise CaptionParseError(f"{m[2]!r} is not unique in the scene: {caption!r}")
    return tuple(sorted(objects, key=lambda o: o.position))


# Kinds of `questions_for`, in its order. A question's kind is read back from its text.
QUESTION_KINDS = ("count", "count_shape", "count_color", "shape_at", "color_at", "size_at", "color_of",
                  "size_of", "neighbour", "exists")
_QUESTION_CELL = "|".join(re.escape(position_phrases(p)[0]) for p in range(9))
_QUESTION_FORMS = (
    ("count", re.compile(r"how many objects are there\?")),
    ("count_shape", re.compile(rf"how many (?:{'|'.join(SHAPE_PLURALS)}) are there\?")),
    ("count_color", re.compile(rf"how many (?:{_COLOR_RE}) objects are there\?")),
    ("shape_at", re.compile(rf"what shape is (?:{_QUESTION_CELL})\?")),
    ("color_at", re.compile(rf"what color is the shape (?:{_QUESTION_CELL})\?")),
    ("size_at", re.compile(rf"what size is the shape (?:{_QUESTION_CELL})\?")),
    ("color_of", re.compile(rf"what color is the (?:{_SHAPE_RE})\?")),
    ("size_of", re.compile(rf"what size is the (?:{_COLOR_RE}) (?:{_SHAPE_RE})\?")),
    ("neighbour", re.compile(rf"what shape is (?:{'|'.join(w[1] for w in _RELATION_WORDS.values())}) "
                             rf"the (?:{_COLOR_RE}) (?:{_SHAPE_RE})\?")),
    ("exists", re.compile(rf"is there an? (?:{_COLOR_RE}) (?:{_SHAPE_RE})\?")),
)


def question_kind(question: str) -> str:
    """Which of QUESTION_KINDS `questions_for` made `question` from (read from its template);
    a ValueError for any other text."""
    for kind, form in _QUESTION_FORMS:
        if form.fullmatch(question):
            return kind
    raise ValueError(f"{question!r} is not a question of any template of questions_for ({', '.join(QUESTION_KINDS)})")


# --- examples and the TFDS builder --------------------------------------------------------------


def _padded(values: Sequence[int]) -> np.ndarray:
    out = np.full((MAX_OBJECTS,), -1, np.int32)
    out[: len(values)] = values
    return out


def generate_example(split: str, index: int, resolution: int = 32) -> dict:
    """Example `index` of `split` exactly as the builder stores it (see the module docstring)."""
    rng = example_rng(split, index)
    scene = sample_split_scene(split, rng)
    caption = caption_scene(scene, rng)
    qa = questions_for(scene, rng, exclude_pairs=() if split == "test_novel" else HELD_OUT_PAIRS)
    objs = scene.objects
    return {
        "image": render_scene(objs, scene.background, resolution),
        "caption": caption,
        "id": index,
        "num_objects": np.int32(len(objs)),
        "shape": _padded([o.shape for o in objs]),
        "color": _padded([o.color for o in objs]),
        "size": _padded([o.size for o in objs]),
        "position": _padded([o.position for o in objs]),
        "background": np.int32(scene.background),
        "questions": [q for q, _ in qa],
        "answers": [a for _, a in qa],
    }


def scene_from_example(example: dict) -> Scene:
    """The Scene back from an example's structured labels (as stored or as read)."""
    n = int(example["num_objects"])
    objs = tuple(ShapeObject(int(example["shape"][i]), int(example["color"][i]),
                             int(example["size"][i]), int(example["position"][i])) for i in range(n))
    return Scene(objs, int(example["background"]))


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    resolution: int = 32


class ShapesBuilder(LocalBuildMessages, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder for the procedural shapes scenes (see the module docstring).

    Configs "32" (default) and "64": the same scenes, captions and questions at two resolutions.
    Not registered in TFDS's name table; mmjax.data.registry constructs it. Split sizes come from
    the class attribute `split_sizes` (tests subclass it with small ones).
    """

    name = "shapes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: 20,000 train / 2,000 test / 2,000 test_novel."}
    BUILDER_CONFIGS = [ShapesConfig(name=str(r), description=f"{r}x{r} RGB", resolution=r)
                       for r in RESOLUTIONS]
    DEFAULT_CONFIG_NAME = "32"
    split_sizes: dict[str, int] = SPLIT_SIZES

    def __init__(self, **kwargs):
        # ArrayRecord gives random access, which grain's MapDataset needs (TFRecord does not).
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        labels = tfds.features.Tensor(shape=(MAX_OBJECTS,), dtype=np.int32)
        return LocalDatasetInfo(
            builder=self,
            description=("Procedural scenes of 1-3 colored shapes on a 3x3 grid with captions, "
                         "attribute labels and VQA pairs; test_novel holds out color-shape pairs."),
            features=tfds.features.FeaturesDict({
                # Raw bytes, not PNG: decoding PNGs is slow and encoding them needs TensorFlow.
                "image": tfds.features.Tensor(shape=(r, r, 3), dtype=np.uint8),
                "caption": tfds.features.Text(),
                "id": np.int64,
                "num_objects": np.int32,
                "shape": labels,
                "color": labels,
                "size": labels,
                "position": labels,
                "background": np.int32,
                "questions": tfds.features.Sequence(tfds.features.Text()),
                "answers": tfds.features.Sequence(tfds.features.Text()),
            }),
            homepage="https://github.com/mmjax",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: every example is drawn from its seed.
        return {split: self._generate_examples(split, size) for split, size in self.split_sizes.items()}

    def _generate_examples(self, split: str, size: int):
        resolution = self.builder_config.resolution
        for index in range(size):
            yield index, generate_example(split, index, resolution)
