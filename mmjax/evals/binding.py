"""Does a `shapes` VLM bind attributes to objects, and does it read the image according to the question?

`binding_accuracy`: every object of a scene asked about by its cell ("what shape is at the top
left?", "what color is the shape at the top left?") and, when its shape is unique, by its shape
("what color is the circle?"), and every neighbour question the scene answers ("what shape is
directly to the right of the red circle?", `shapes.questions_for`'s kind "neighbour"), one kind per
direction; scored by exact match per kind and per number of objects k. A model that reads the
scene as a bag of attributes is right with one object and near 1/k with k.

`attention_dependence`: the attention of the query that predicts the answer (the prompt's last
token) over the image tokens, per LM layer and head, for questions about the different cells of one
scene: the total-variation distance between those distributions, averaged over pairs,

    TV = ½ Σ_n |a_q(n) − a_q'(n)|   (a_q: the head's image-token weights for question q, renormalised)

0 means the model reads the image the same way whatever it is asked; 1 means disjoint tokens. (With
`answer_position`, layer 0 is 0 by construction: its query is the same token at the same position.)

    python -m mmjax.evals.binding --workdir runs/vlm_shapes [--scenes 150] [--split test]
        [--kinds neighbour_above,neighbour_below,...] [--attention_scenes 0 (skip)]

Weights are read by `record_attention`, which swaps `mmjax.ops.attention` for a version that also
hands the softmax weights to the host: a diagnostic hook, never used in training.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import ops
from mmjax.data import shapes
from mmjax.ops.mask import mask_array

KINDS = ("shape_at", "color_at", "color_of") + tuple(f"neighbour_{rel}" for rel in shapes.RELATIONS)


def binding_questions(scene: shapes.Scene) -> list[tuple[str, str, str, shapes.ShapeObject]]:
    """(kind, question, answer, object) for every object of `scene`: its shape and colour asked by
    its cell, and its colour by its shape when no other object has that shape; then every neighbour
    question of the scene, kind "neighbour_<direction>", object = the one the question names."""
    out = []
    for obj in scene.objects:
        cell = shapes.position_phrases(obj.position)[0]
        out.append(("shape_at", f"what shape is {cell}?", shapes.SHAPES[obj.shape], obj))
        out.append(("color_at", f"what color is the shape {cell}?", shapes.COLORS[obj.color], obj))
        if sum(o.shape == obj.shape for o in scene.objects) == 1:
            out.append(("color_of", f"what color is the {shapes.SHAPES[obj.shape]}?", shapes.COLORS[obj.color], obj))
    for obj in scene.objects:  # as shapes.questions_for asks them: about objects their pair names
        if sum((o.shape, o.color) == (obj.shape, obj.color) for o in scene.objects) == 1:
            for rel, question, answer in shapes.neighbour_questions(scene, obj):
                out.append((f"neighbour_{rel}", question, answer, obj))
    return out


@contextlib.contextmanager
def record_attention() -> Iterator[list[np.ndarray]]:
    """Within the block, every `mmjax.ops.attention` call (uncached: training-style forwards) also
    appends its weights softmax(q·k/√Dh, masked) [B, H, Q, K] (numpy, fp32) to the yielded list, in
    call order. The outputs are unchanged (the original function computes them)."""
    weights: list[np.ndarray] = []
    original = ops.attention

    def attention(q, k, v, mask=None, **kwargs):
        t, s = q.shape[1], k.shape[1]
        keys = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)                      # GQA: [B, S, H, Dh]
        logits = jnp.einsum("bthd,bshd->bhts", q, keys, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
        m = mask_array(mask, t, s)
        if m is not None:
            logits = jnp.where(jnp.reshape(m, (1,) * (4 - m.ndim) + m.shape), logits, jnp.finfo(jnp.float32).min)
        jax.debug.callback(lambda w: weights.append(np.asarray(w)), jax.nn.softmax(logits, axis=-1))
        return original(q, k, v, mask, **kwargs)

    ops.attention = attention
    try:
        yield weights
    finally:
        ops.attention = original


def _check_task(task) -> None:
    if task.cfg.model.multicrop_grid:
        raise ValueError("the binding diagnostics read a single view's token grid; this run uses multi-crop")
    if task.cfg.loss.sequence == "caption":
        raise ValueError("the binding diagnostics ask questions; this run was trained to caption")


def _scenes(split: str, count: int):
    for i in range(count):
        ex = shapes.generate_example(split, i)
        yield shapes.scene_from_example(ex), np.asarray(ex["image"], np.float32) / 255.0


def binding_accuracy(task, params, *, split: str = "test", scenes: int = 150, batch_size: int = 64,
                     kinds: tuple[str, ...] = KINDS) -> dict:
    """Greedy exact match on the `binding_questions` of `kinds` of the first `scenes` scenes of
    `split`: {"<kind>/objects_<k>": accuracy, "<kind>/examples_<k>": count} for each kind and object
    count, and "<kind>/all", "<kind>/examples" over every count."""
    from mmjax.tasks.vlm import ask_prompt, image_for
    _check_task(task)
    if not kinds or set(kinds) - set(KINDS):
        raise ValueError(f"kinds must be some of {KINDS}, got {kinds}")
    rows = []  # (kind, k, image, prompt ids, answer)
    for scene, image in _scenes(split, scenes):
        pixels = image_for(task, image)[0]
        for kind, question, answer, _ in binding_questions(scene):
            if kind in kinds:
                rows.append((kind, len(scene.objects), pixels, ask_prompt(task, question)[0], answer))
    hits = collections.defaultdict(list)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        lengths = [len(r[3]) for r in chunk]
        ids = np.zeros((len(chunk), max(lengths)), np.int32)
        for j, r in enumerate(chunk):
            ids[j, :lengths[j]] = r[3]
        answers = task.answer(params, np.stack([r[2] for r in chunk]), ids, lengths)
        for r, a in zip(chunk, answers):
            hits[(r[0], r[1])].append(a.strip() == r[4])
    out = {}
    for (kind, k), h in sorted(hits.items()):
        out[f"{kind}/objects_{k}"], out[f"{kind}/examples_{k}"] = float(np.mean(h)), len(h)
    for kind in {kind for kind, _ in hits}:
        h = [x for (kk, _), v in hits.items() if kk == kind for x in v]
        out[f"{kind}/all"], out[f"{kind}/examples"] = float(np.mean(h)), len(h)
    return out


def attention_dependence(task, params, *, split: str = "test", scenes: int = 30) -> np.ndarray:
    """Mean TV distance [layers, heads] between the answer query's image-token attention for
    "what color is the shape <cell>?" about the different objects of each multi-object scene."""
    from mmjax.data.vlm import prompt_positions
    from mmjax.tasks.vlm import ask_prompt, image_for
    _check_task(task)
    first, end = task.image_end - task.transform.image_tokens, task.image_end  # the image block's slots
    distances = []
    for scene, image in _scenes(split, scenes):
        if len(scene.objects) < 2:
            continue
        pixels, per_question = image_for(task, image), []
        for _, question, _, _ in [q for q in binding_questions(scene) if q[0] == "color_at"]:
            ids = ask_prompt(task, question)
            n = ids.shape[1]
            positions = prompt_positions([n], task.image_end, task.cfg.loss.answer_position, n)
            with record_attention() as weights:
                task.model.apply({"params": params}, pixels, ids, positions=jnp.asarray(positions))
            lm = [w for w in weights if w.shape[-2:] == (n, n)]                       # the LM's layers
            a = np.stack([w[0, :, n - 1, first:end] for w in lm])                     # [layers, H, N]
            per_question.append(a / np.maximum(a.sum(-1, keepdims=True), 1e-30))
        for i in range(len(per_question)):
            for j in range(i + 1, len(per_question)):
                distances.append(0.5 * np.abs(per_question[i] - per_question[j]).sum(-1))
    if not distances:
        raise ValueError(f"none of the first {scenes} {split} scenes has two objects; give more scenes")
    return np.mean(distances, axis=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmjax.evals.binding", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a `mmjax train` run of task 'vlm' on shapes")
    p.add_argument("--split", default="test")
    p.add_argument("--scenes", type=int, default=150, help="scenes asked about (binding accuracy)")
    p.add_argument("--attention_scenes", type=int, default=30,
                   help="scenes for the attention measurement (0: skip it)")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help=f"question kinds asked, comma-separated ({', '.join(KINDS)})")
    args = p.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if not kinds or set(kinds) - set(KINDS):
        p.error(f"--kinds: some of {', '.join(KINDS)}, got {args.kinds!r}")
    from mmjax.experiment import load_run
    from mmjax.tasks.vlm import VLMTask
    cfg, step, params = load_run(args.workdir)
    task = VLMTask(cfg)
    acc = binding_accuracy(task, params, split=args.split, scenes=args.scenes, kinds=kinds)
    print(f"{args.workdir} step {step}, {args.split}: accuracy by number of objects in the scene")
    for kind in kinds:
        if f"{kind}/all" not in acc:
            print(f"  {kind:15s} no such question in these scenes")
            continue
        cells = [f"{k} obj {100 * acc[f'{kind}/objects_{k}']:.1f}% (n={acc[f'{kind}/examples_{k}']})"
                 for k in range(1, shapes.MAX_OBJECTS + 1) if f"{kind}/objects_{k}" in acc]
        print(f"  {kind:15s} all {100 * acc[f'{kind}/all']:.1f}% (n={acc[f'{kind}/examples']}); " + ", ".join(cells))
    if args.attention_scenes == 0:
        return 0
    tv = attention_dependence(task, params, split=args.split, scenes=args.attention_scenes)
    print("answer query's image attention, TV distance between questions about different cells [layer × head]:")
    for layer, row in enumerate(tv):
        print(f"  layer {layer}: " + " ".join(f"{x:.2f}" for x in row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
