"""The binding diagnostics (mmjax.evals.binding): questions by hand, recorded attention weights
against the attention output (the command on a trained run: tests/test_vlm_task.py)."""

import numpy as np

from mmjax import ops
from mmjax.data import shapes
from mmjax.evals import binding
from mmjax.ops.mask import make_attention_mask


def test_binding_questions_by_hand():
    circle, square, red, blue = shapes.SHAPES.index("circle"), shapes.SHAPES.index("square"), \
        shapes.COLORS.index("red"), shapes.COLORS.index("blue")
    scene = shapes.Scene((shapes.ShapeObject(circle, red, 0, 0), shapes.ShapeObject(circle, blue, 1, 4),
                          shapes.ShapeObject(square, blue, 1, 8)), background=0)
    got = [(k, q, a) for k, q, a, _ in binding.binding_questions(scene)]
    top_left, centre, bottom_right = (shapes.position_phrases(p)[0] for p in (0, 4, 8))
    assert got == [
        ("shape_at", f"what shape is {top_left}?", "circle"),
        ("color_at", f"what color is the shape {top_left}?", "red"),
        ("shape_at", f"what shape is {centre}?", "circle"), ("color_at", f"what color is the shape {centre}?", "blue"),
        ("shape_at", f"what shape is {bottom_right}?", "square"),
        ("color_at", f"what color is the shape {bottom_right}?", "blue"),
        ("color_of", "what color is the square?", "blue"),  # two circles: "the circle" names none
    ]


def test_neighbour_questions_by_hand_one_kind_per_direction():
    # A red circle at the top left, a blue star right of it, a green square at the bottom right: the
    # one neighbour question the grammar asks is "left of the star" (every other direction from an
    # object holds two objects, or none in the neighbouring cell).
    circle, star, square = (shapes.SHAPES.index(n) for n in ("circle", "star", "square"))
    red, blue, green = (shapes.COLORS.index(n) for n in ("red", "blue", "green"))
    the_star = shapes.ShapeObject(star, blue, 1, 1)
    scene = shapes.Scene((shapes.ShapeObject(circle, red, 0, 0), the_star, shapes.ShapeObject(square, green, 1, 8)), 0)
    got = [q for q in binding.binding_questions(scene) if q[0].startswith("neighbour")]
    assert got == [("neighbour_left", "what shape is directly to the left of the blue star?", "circle", the_star)]
    assert set(binding.KINDS) >= {"neighbour_above", "neighbour_below", "neighbour_left", "neighbour_right"}


def test_recorded_weights_reproduce_the_attention_output():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 5, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, 5, 2, 8)).astype(np.float32) for _ in range(2))  # GQA: 2 kv heads for 4
    mask = make_attention_mask(5, 5, causal=True)
    original = ops.attention
    with binding.record_attention() as weights:
        out = np.asarray(ops.attention(q, k, v, mask))
    assert ops.attention is original and len(weights) == 1
    w = weights[0]
    assert w.shape == (2, 4, 5, 5)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    assert np.all(np.triu(w, k=1) == 0)  # causal: nothing above the diagonal
    np.testing.assert_allclose(out, np.einsum("bhts,bshd->bthd", w, np.repeat(v, 2, axis=2)), atol=1e-5)

