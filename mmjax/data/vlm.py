"""VLM sequences on the host: image placeholders, prompts and supervised answers as one id stream.

A LLaVA-style VLM reads one sequence per example, in which placeholder ids (`<image>`) mark the
slots that the projected image features replace in the LM's input embeddings:

    [bos] [system] <image>×N [prompt] [answer] [eos] [pad ...]          (one turn)
    [bos] [system] <image>×N [prompt₁] [answer₁] [eos] [prompt₂] [answer₂] [eos] ...   (turns)

Packed turns (`packed=True`) are the same ids with `segment_ids` and `positions`: bos, system and
image are segment 0, turn k is segment k + 1 and sees only segment 0 and itself (the mask helper's
shared-prefix rule), and every turn's positions restart where the image ends. Each turn is then
computed exactly as the single-turn sequence [bos] [system] image [prompt_k] [answer_k] [eos]
would be, while the image block is encoded and attended once for all turns.

`answer_position` A (one turn, or packed turns) moves each turn's positions so that its answer
starts at position A whatever the prompt's length: the prompt takes A − |prompt| … A − 1, leaving
a gap after the image block (positions are RoPE angles, not slots: the ids stay contiguous). Each
image token then lies at one fixed distance from the answer, so "the patch k positions back" names
the same place in every question; with contiguous positions that distance moves with the
question's length, and a small LM learns to address image tokens by place far more slowly
(docs/vlm.md).

Loss weights sit on the *ids* (inputs), not on the targets: w_t = 1 iff ids_t is a token the model
must produce, i.e. an answer token or the eos that ends an answer; 0 on bos, system, image, prompt
and padding positions. The next-token shift then moves them onto the targets, exactly as the LM
task does:

    inputs, targets, target_w = mmjax.objectives.lm.next_token_targets(ids, loss_weights)
    # targets = ids[:, 1:], target_w = loss_weights[:, 1:]: the prediction made at position t counts
    # iff the token it predicts (ids_{t+1}) is supervised; image positions leave the loss here.
    sums = lm_cross_entropy(logits(inputs), targets, target_w)

`prefix_len` P is the number of positions before the first answer token ([bos] [system] image
[prompt₁]): ids[:P] is the prompt to generate from at evaluation, and the prefix a PaliGemma-style
prefix-LM attends to bidirectionally (positions >= P are causal).

Parts are tokenised separately and their ids concatenated, so the weights follow the parts by
construction. (LLaVA tokenises the whole conversation and re-derives the mask from per-part token
counts; when the two disagree it masks the whole sample and the loss silently becomes 0, its most
reported bug.) A sample that cannot be built right fails loudly with `VLMSequenceError`, naming the
numbers: a truncation that would cut the image block, a sample left with no supervised token, a
placeholder id inside the text.

`ShapesToVLM` turns `shapes` examples into such sequences (VQA or captioning) as a grain
transform; `vqa_accuracy` and `caption_attribute_accuracy` score generated text.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from mmjax.data import shapes
from mmjax.data.transforms import BadExample

IMAGE_TOKEN = "<image>"
# What a caption turn answers: the example's own caption, or `shapes.reading_order_caption` of its labels.
CAPTION_TARGETS = ("dataset", "reading_order")
TASKS = ("vqa", "vqa_turns", "vqa_packed", "caption")
# The groups VQA accuracy is reported by, and which question kind of shapes.questions_for falls in
# which: the attribute a question asks for, "position" for the neighbour questions (the answer is a
# shape, but finding it means resolving "directly below the red circle"). "exists" (yes/no about a
# color–shape pair) asks for none of the five attributes, so it is reported on its own.
QUESTION_GROUPS = ("colour", "shape", "size", "count", "position", "exists")
GROUP_OF_KIND = {
    "count": "count", "count_shape": "count", "count_color": "count",
    "color_at": "colour", "color_of": "colour",
    "shape_at": "shape",
    "size_at": "size", "size_of": "size",
    "neighbour": "position",
    "exists": "exists",
}
assert set(GROUP_OF_KIND) == set(shapes.QUESTION_KINDS) and set(GROUP_OF_KIND.values()) == set(QUESTION_GROUPS)
CAPTION_ATTRIBUTES = ("shape", "colour", "size", "position")


class VLMSequenceError(BadExample):
    """A VLM sample that cannot be built as asked (a ValueError; `GuardBad` may skip it)."""


# --------------------------------------------------------------------------------------------
# Sequences


def _as_ids(ids: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
    """ids as int64 [n] (a list, tuple or 1-D integer array; empty is fine)."""
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros((0,), np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{what} must be a 1-D sequence of int ids, got shape {arr.shape} of {arr.dtype}")
    if arr.min() < 0:
        raise VLMSequenceError(f"{what} holds a negative id {int(arr.min())}")
    return arr.astype(np.int64)


def image_block(image_tokens: int | Sequence[int], image_id: int) -> np.ndarray:
    """The ids an image occupies: N placeholders for an int N, or a given block as it is (e.g. a
    multi-crop layout, `mmjax.layers.multicrop.multicrop_layout(...).ids`, whose start / row-end /
    end ids are ordinary text ids around the placeholders). int64 [N_block]."""
    if isinstance(image_tokens, (int, np.integer)):
        if image_tokens < 1:
            raise VLMSequenceError(f"an image needs at least one placeholder, got image_tokens={image_tokens}")
        return np.full((int(image_tokens),), image_id, np.int64)
    block = _as_ids(image_tokens, "the image block")
    if not (block == image_id).any():
        raise VLMSequenceError(f"the image block of {block.size} ids holds no placeholder id {image_id}")
    return block


def _check_text(ids: np.ndarray, image_id: int, what: str) -> None:
    hits = np.flatnonzero(ids == image_id)
    if hits.size:
        raise VLMSequenceError(f"the placeholder id {image_id} appears inside the text ({what}, at token "
                               f"{int(hits[0])} of {ids.size}); only the image block may hold it, or the "
                               "features would be spliced into the wrong slots")


def build_vlm_turns(image_tokens: int | Sequence[int], turns: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                    max_len: int, image_id: int, pad_id: int, bos_id: int | None, eos_id: int | None,
                    system_ids: Sequence[int] = (), truncate: bool = True,
                    packed: bool = False, answer_position: int | None = None) -> dict[str, np.ndarray]:
    """One training sequence with several (prompt, answer) turns, each answer supervised:

        [bos] [system] image [prompt₁] [answer₁] [eos] [prompt₂] [answer₂] [eos] ... [pad]

    Args:
      image_tokens: N (the image's N placeholders) or an explicit image block (see `image_block`).
      turns: (prompt ids, answer ids) pairs, without bos/eos.
      max_len: T, the padded length.
      image_id: the placeholder id; it must not appear in the text.
      pad_id, bos_id, eos_id: bos None = no bos; eos None = answers end without an end token.
      system_ids: text before the image (no loss).
      truncate: a sequence longer than T is cut at T (the end of the text goes: later turns, then
        the end of the last answer kept) if that keeps the image block and at least one supervised
        token; otherwise, or with truncate=False, `VLMSequenceError`.
      packed: also return segment_ids and positions (module docstring): each turn sees only the
        prefix and itself.
      answer_position: A, the position of every turn's first answer token (one turn, or packed):
        the prompt sits just before it, leaving a gap after the image block, so each image token is
        the same RoPE distance from the answer whatever the prompt's length (module docstring).
        Also returns positions. A prompt that does not fit between the image block and A fails.

    Returns:
      ids int32 [T]; loss_weights float32 [T], aligned with ids (1 on answer tokens and the eos
      after each answer; see the module docstring for the shift onto targets); prefix_len int32 []
      (positions before the first answer token); length int32 [] (tokens before the padding);
      with packed, segment_ids int32 [T] (0 prefix, k + 1 turn k, padding a segment of its own) and
      positions int32 [T] (prefix 0 … E − 1, each turn E, E + 1, …; E = the end of the image block;
      with answer_position A, turn k from A − |prompt_k|).
    """
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2 (a token and the one it predicts), got {max_len!r}")
    if not turns:
        raise VLMSequenceError("a VLM sample needs at least one (prompt, answer) turn")
    clashes = {name: i for name, i in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)) if i == image_id}
    if clashes:
        raise ValueError(f"the placeholder id {image_id} is also {', '.join(clashes)}: give the image its own token")
    if answer_position is not None and len(turns) > 1 and not packed:
        raise ValueError(f"answer_position places one answer; {len(turns)} unpacked turns would overlap (pack them)")
    image = image_block(image_tokens, image_id)
    system = _as_ids(system_ids, "the system text")
    _check_text(system, image_id, "system text")
    parts = [(np.asarray([bos_id] if bos_id is not None else [], np.int64), 0.0), (system, 0.0), (image, 0.0)]
    segments = [0, 0, 0]  # per part
    for i, (prompt, answer) in enumerate(turns):
        prompt, answer = _as_ids(prompt, f"prompt {i}"), _as_ids(answer, f"answer {i}")
        _check_text(prompt, image_id, f"prompt of turn {i}")
        _check_text(answer, image_id, f"answer of turn {i}")
        if eos_id is not None:
            answer = np.concatenate([answer, [eos_id]])
        parts += [(prompt, 0.0), (answer, 1.0)]
        segments += [i + 1, i + 1]
    ids = np.concatenate([p for p, _ in parts])
    segment_ids = np.concatenate([np.full(p.size, g, np.int32) for (p, _), g in zip(parts, segments)])
    weights = np.concatenate([np.full(p.size, w, np.float32) for p, w in parts])
    image_end = sum(p.size for p, _ in parts[:3])
    prefix_len = image_end + parts[3][0].size
    # Where each turn's positions start: right after the image, or so its answer starts at A.
    turn_start = [image_end] * len(turns)
    if answer_position is not None:
        longest = max(parts[3 + 2 * i][0].size for i in range(len(turns)))
        if answer_position - longest < image_end:
            raise VLMSequenceError(f"a prompt of {longest} tokens does not fit between the image block's end "
                                   f"(position {image_end}) and answer_position={answer_position} "
                                   f"(room for {answer_position - image_end}); raise answer_position")
        turn_start = [answer_position - parts[3 + 2 * i][0].size for i in range(len(turns))]
    if ids.size > max_len:
        described = (f"the sample has {ids.size} tokens (image block ends at {image_end}, first answer token "
                     f"at {prefix_len}), more than max_len={max_len}")
        if not truncate:
            raise VLMSequenceError(f"{described} and truncation is off")
        if image_end > max_len:
            raise VLMSequenceError(f"{described}: truncating would cut the image block "
                                   f"({image.size} ids, {int((image == image_id).sum())} placeholders)")
        ids, weights, segment_ids = ids[:max_len], weights[:max_len], segment_ids[:max_len]
    if not weights.any():
        where = (f"the first answer token would sit at {prefix_len} >= max_len={max_len}" if prefix_len >= max_len
                 else f"no answer token within the first {ids.size} tokens: empty answers and eos_id=None")
        raise VLMSequenceError(f"the sample has no supervised token ({where}): its loss would be 0 "
                               "(LLaVA's silent 'tokenization mismatch')")
    num_placeholders = int((image == image_id).sum())
    if int((ids == image_id).sum()) != num_placeholders:  # the text was checked: only the image block has them
        raise AssertionError(f"{int((ids == image_id).sum())} placeholders in the sequence, {num_placeholders} "
                             "in the image block")
    length = ids.size
    out_ids = np.full((max_len,), pad_id, np.int32)
    out_ids[:length] = ids
    out_w = np.zeros((max_len,), np.float32)
    out_w[:length] = weights
    out = {"ids": out_ids, "loss_weights": out_w, "prefix_len": np.int32(prefix_len), "length": np.int32(length)}
    if packed:
        out_seg = np.full((max_len,), len(turns) + 1, np.int32)   # padding: its own segment
        out_seg[:length] = segment_ids
        out["segment_ids"] = out_seg
    if packed or answer_position is not None:
        # Segment ids never decrease along the sequence: a segment starts at its first index.
        start = np.searchsorted(segment_ids, segment_ids, side="left")
        base = np.asarray([0] + turn_start, np.int64)[segment_ids]
        positions = np.full((max_len,), image_end, np.int32)
        positions[:length] = np.where(segment_ids == 0, np.arange(length), base + np.arange(length) - start)
        out["positions"] = positions
    return out


def prompt_positions(prefix_len, image_end: int, answer_position: int | None, width: int) -> np.ndarray:
    """The positions `build_vlm_turns` gives a single-turn prompt and what follows it, for prompts
    ids[b, :prefix_len[b]] whose image block ends at `image_end`: 0 … E − 1, then the prompt up to
    A − 1 and the answer from A = answer_position (None: contiguous). int32 [B, width]."""
    p = np.asarray(prefix_len, np.int64).reshape(-1, 1)
    j = np.arange(width)[None, :]
    if answer_position is None:
        return np.broadcast_to(j, (p.shape[0], width)).astype(np.int32)
    return np.where(j < image_end, j, answer_position - p + j).astype(np.int32)


def build_vlm_sequence(image_tokens: int | Sequence[int], prompt_ids: Sequence[int], answer_ids: Sequence[int], *,
                       max_len: int, image_id: int, pad_id: int, bos_id: int | None, eos_id: int | None,
                       system_ids: Sequence[int] = (), truncate: bool = True,
                       answer_position: int | None = None) -> dict[str, np.ndarray]:
    """One turn, [bos] [system] <image>×N [prompt] [answer] [eos] [pad]: `build_vlm_turns` with
    turns = [(prompt_ids, answer_ids)] (same arguments and outputs)."""
    return build_vlm_turns(image_tokens, [(prompt_ids, answer_ids)], max_len=max_len, image_id=image_id,
                           pad_id=pad_id, bos_id=bos_id, eos_id=eos_id, system_ids=system_ids, truncate=truncate,
                           answer_position=answer_position)


# --------------------------------------------------------------------------------------------
# shapes → sequences


@functools.lru_cache(maxsize=8)
def vlm_tokenizer(spec: str, special_tokens: tuple[str, ...] = (IMAGE_TOKEN,)):
    """The tokenizer `spec` with `special_tokens` added in this order (the image placeholder first),
    one instance per process. A fresh instance, not the cached one the text pipelines share, so
    adding tokens here never changes another pipeline's vocabulary."""
    from mmjax.data.tokenizers import load_tokenizer
    tok = load_tokenizer(spec)
    tok.add_special_tokens(list(special_tokens))
    return tok


def _text(value: Any) -> str:
    """str, UTF-8 bytes, or a 0-d bytes array (how the pipeline's decode step keeps a text field) → str."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    return str(value)


@dataclasses.dataclass(frozen=True)
class ShapesToVLM(grain.transforms.Map, grain.transforms.RandomMap):
    """A `shapes` example → a VLM sequence (`build_vlm_turns`); the image is left as it is.

    Both a grain Map (`ds.map(t)`: captioning, all turns, or a fixed question_index) and a
    RandomMap (`ds.random_map(t, seed=s)`: "vqa" draws its pair from grain's per-example rng).

    Tasks:
      "vqa"        one (question, one-word answer) pair: the `question_index`-th of the example's
                   pairs, or (None) one drawn with grain's per-example rng. Also `question_kind`
                   (index into shapes.QUESTION_KINDS) and `question_group` (into QUESTION_GROUPS).
      "vqa_turns"  every pair of the example, one turn each: in stored order (map), or in an order
                   drawn per example (random_map), so each question is also asked first, alone
                   with the image, as single-question evaluation asks it.
      "vqa_packed" the same turns packed (`build_vlm_turns(packed=True)`): each turn sees only the
                   image block and itself, at the positions a single question has; adds
                   segment_ids and positions int32 [max_len].
      "caption"    prompt `caption_prompt`, answer the caption (caption_targets "dataset"), or the
                   scene's `shapes.reading_order_caption` ("reading_order"; the label fields
                   num_objects, shape, color, size and position must be in the example).
    `all_questions_of` (vqa_turns / vqa_packed): question kinds asked as often as the scene allows,
    e.g. ("neighbour",) — every neighbour question `shapes.questions_for` finds in the scene (from
    its label fields), then the stored questions of other kinds, as many turns as were stored; the
    dataset stores at most one question of a kind until every kind has one, so a rare kind (one
    training question in 30) can be raised without new data.
    `caption_rate` p (vqa_turns / vqa_packed under random_map only): each example is instead, with
    probability p, the caption turn (CapPa's argument, Tschannen et al. 2023: a whole caption
    supervises every object's attributes in their places; its one trial on shapes read the captions
    wrongly, docs/vlm.md).
    Each prompt is `prompt_template.format(prompt=question or caption_prompt)`: the template's
    separator ("\\n") stands between the question and the answer.

    Input: the example's `questions` and `answers` (or `caption`), str or UTF-8 bytes (as TFDS or
    DecodeImage's extra_fields give them). Output: the example without its text fields, plus
    ids int32 [max_len], loss_weights float32 [max_len], prefix_len int32 [], length int32 [],
    and with keep_text the strings `prompt` and `answer` (host-side evaluation only). Other fields
    (image, labels) pass through.

    At evaluation, ids[:prefix_len] is the prompt to generate from; run it once per
    question_index (shapes has NUM_QUESTIONS questions per example) to score every question.
    """

    tokenizer: str = "bytes"
    # N placeholders, or an explicit image block (a tuple of ids, e.g. a multi-crop layout's ids made
    # with this tokenizer's ids for the placeholder and for extra_special_tokens).
    image_tokens: int | tuple[int, ...] = 16
    max_len: int = 64
    task: str = "vqa"
    question_index: int | None = None
    system: str = ""
    caption_prompt: str = "describe the image."
    prompt_template: str = "{prompt}\n"
    image_token: str = IMAGE_TOKEN
    extra_special_tokens: tuple[str, ...] = ()  # e.g. multi-crop "<im_start>", "<im_end>", "<im_col>"
    on_long: str = "truncate"
    add_bos: bool = True
    keep_text: bool = False
    caption_rate: float = 0.0
    answer_position: int | None = None
    caption_targets: str = "dataset"
    all_questions_of: tuple[str, ...] = ()

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.on_long not in ("truncate", "error"):
            raise ValueError(f"on_long must be 'truncate' or 'error' (skip with GuardBad), got {self.on_long!r}")
        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"prompt_template {self.prompt_template!r} has no '{{prompt}}'")
        if self.question_index is not None and self.task != "vqa":
            raise ValueError(f"question_index is for task 'vqa', not {self.task!r}")
        if self.answer_position is not None and self.task not in ("vqa", "vqa_packed", "caption"):
            raise ValueError(f"answer_position places one answer per turn segment: tasks 'vqa', 'vqa_packed' and "
                             f"'caption', not {self.task!r}")
        bad = [k for k in self.all_questions_of if k not in shapes.QUESTION_KINDS]
        if bad or (self.all_questions_of and self.task not in ("vqa_turns", "vqa_packed")):
            raise ValueError(f"all_questions_of names question kinds of shapes.QUESTION_KINDS (unknown: {bad}) and "
                             f"is for tasks 'vqa_turns' and 'vqa_packed' (got {self.task!r})")
        if self.caption_targets not in CAPTION_TARGETS:
            raise ValueError(f"caption_targets must be one of {CAPTION_TARGETS}, got {self.caption_targets!r}")
        if not 0.0 <= self.caption_rate <= 1.0 or (self.caption_rate and self.task not in ("vqa_turns", "vqa_packed")):
            raise ValueError(f"caption_rate must lie in [0, 1] and is for tasks 'vqa_turns' and 'vqa_packed', got "
                             f"{self.caption_rate!r} with task {self.task!r}")

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return (self.image_token, *self.extra_special_tokens)

    def _pairs(self, example: dict[str, Any]) -> list[tuple[str, str]]:
        questions, answers = [_text(q) for q in example["questions"]], [_text(a) for a in example["answers"]]
        if len(questions) != len(answers) or not questions:
            raise VLMSequenceError(f"example {example.get('id', '?')}: {len(questions)} questions and "
                                   f"{len(answers)} answers")
        return list(zip(questions, answers))

    def _with_all_questions_of(self, example, pairs, rng):
        """Every question of the kinds `all_questions_of` that the scene answers (`shapes.questions_for`
        over its labels), then the example's stored questions of other kinds, as many pairs as it
        stored (more if the listed kinds alone are more)."""
        scene = shapes.Scene(labels_of(_require_labels(example, "all_questions_of")), 0)
        drawn = shapes.questions_for(scene, rng if rng is not None else np.random.default_rng(0),
                                     max_questions=1 << 30, exclude_pairs=shapes.HELD_OUT_PAIRS)
        first = [(q, a) for q, a in drawn if shapes.question_kind(q) in self.all_questions_of]
        rest = [(q, a) for q, a in pairs if shapes.question_kind(q) not in self.all_questions_of]
        return (first + rest)[:max(len(pairs), len(first))]

    def random_map(self, example: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        tok = vlm_tokenizer(self.tokenizer, self.special_tokens)
        image_id = tok.token_to_id(self.image_token)
        encode = tok.encode
        if self.task == "caption" or (rng is not None and self.caption_rate and rng.random() < self.caption_rate):
            caption = (ReadingOrderTarget().map(example)["target_text"] if self.caption_targets == "reading_order"
                       else _text(example["caption"]))
            pairs = [(self.caption_prompt, caption)]
        else:
            pairs = self._pairs(example)
            if self.task == "vqa":
                if self.question_index is not None:
                    if not 0 <= self.question_index < len(pairs):
                        raise VLMSequenceError(f"example {example.get('id', '?')} has {len(pairs)} questions, "
                                               f"question_index={self.question_index}")
                    pairs = [pairs[self.question_index]]
                else:
                    if rng is None:
                        raise ValueError("task 'vqa' without question_index draws a pair: use random_map with a seed")
                    pairs = [pairs[int(rng.integers(len(pairs)))]]
            else:  # vqa_turns, vqa_packed
                if self.all_questions_of:
                    pairs = self._with_all_questions_of(example, pairs, rng)
                if rng is not None:
                    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
        turns = [(encode(self.prompt_template.format(prompt=p)), encode(a)) for p, a in pairs]
        try:
            seq = build_vlm_turns(self.image_tokens, turns, max_len=self.max_len, image_id=image_id,
                                  pad_id=tok.pad_id, bos_id=tok.bos_id if self.add_bos else None, eos_id=tok.eos_id,
                                  system_ids=encode(self.system), truncate=self.on_long == "truncate",
                                  packed=self.task == "vqa_packed", answer_position=self.answer_position)
        except VLMSequenceError as e:
            raise VLMSequenceError(f"example {example.get('id', '?')}: {e}") from None
        out = {k: v for k, v in example.items() if k not in ("questions", "answers", "caption", "text")}
        out.update(seq)
        if self.task == "vqa":  # after building: a sequence error is the one to report
            kind = shapes.question_kind(pairs[0][0])
            out["question_kind"] = np.int32(shapes.QUESTION_KINDS.index(kind))
            out["question_group"] = np.int32(QUESTION_GROUPS.index(GROUP_OF_KIND[kind]))
        if self.keep_text:
            out["prompt"] = "\n".join(p for p, _ in pairs)
            out["answer"] = "\n".join(a for _, a in pairs)
        return out

    def map(self, example: dict[str, Any]) -> dict[str, Any]:
        """The deterministic form (captioning, all turns, or a fixed question_index)."""
        return self.random_map(example, None)


# --------------------------------------------------------------------------------------------
# Evaluation


def normalize_answer(text: str) -> str:
    """A generated answer as compared: lower case, surrounding whitespace and final '.', '!' or '?'
    removed, inner whitespace collapsed ("Red." → "red")."""
    return " ".join(_text(text).strip().lower().rstrip(".!?").split())


def _group_name(question_type: str | int) -> str:
    if isinstance(question_type, (int, np.integer)):
        return QUESTION_GROUPS[int(question_type)]
    if question_type in GROUP_OF_KIND:
        return GROUP_OF_KIND[question_type]
    if question_type in QUESTION_GROUPS:
        return question_type
    raise ValueError(f"unknown question type {question_type!r}: a kind {shapes.QUESTION_KINDS}, "
                     f"a group {QUESTION_GROUPS} or a group index")


def vqa_accuracy(predictions: Sequence[str], references: Sequence[str],
                 question_types: Sequence[str | int], num_objects: Sequence[int] | None = None) -> dict[str, float]:
    """Exact-match accuracy of generated answers, overall and per QUESTION_GROUPS group.

    correct_i = [normalize_answer(prediction_i) == normalize_answer(reference_i)]
    question_types: per question a kind (shapes.QUESTION_KINDS), a group name or a group index
    (the `question_group` field). Returns {"accuracy", "examples", "accuracy/<group>",
    "examples/<group>"} for the groups present; with num_objects (per question, its scene's object
    count) also "accuracy/objects_<n>", "examples/objects_<n>": a model that reads the scene as a bag
    of attributes, without binding them to objects, is right with one object and near chance with more.
    """
    if not len(predictions) == len(references) == len(question_types):
        raise ValueError(f"{len(predictions)} predictions, {len(references)} references and "
                         f"{len(question_types)} question types: one of each per question")
    if num_objects is not None and len(num_objects) != len(predictions):
        raise ValueError(f"{len(num_objects)} object counts for {len(predictions)} questions: one per question")
    if not predictions:
        raise ValueError("no questions to score")
    correct = np.array([normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)])
    groups = np.array([_group_name(t) for t in question_types])
    out = {"accuracy": float(correct.mean()), "examples": len(correct)}
    for g in QUESTION_GROUPS:
        if (sel := groups == g).any():
            out[f"accuracy/{g}"] = float(correct[sel].mean())
            out[f"examples/{g}"] = int(sel.sum())
    if num_objects is not None:
        counts = np.asarray(num_objects)
        for n in np.unique(counts):
            out[f"accuracy/objects_{n}"] = float(correct[counts == n].mean())
            out[f"examples/objects_{n}"] = int((counts == n).sum())
    return out


def _agreement(pred: shapes.ShapeObject | None, true: shapes.ShapeObject) -> tuple[bool, bool, bool, bool]:
    """(shape, colour, size, position) equal, in CAPTION_ATTRIBUTES order."""
    if pred is None:
        return (False, False, False, False)
    return (pred.shape == true.shape, pred.color == true.color, pred.size == true.size,
            pred.position == true.position)


def score_caption(caption: str, labels: Sequence[shapes.ShapeObject]) -> dict[str, float]:
    """One generated caption against its scene's objects.

    The caption is read with `shapes.parse_caption(strict=False)`; its objects are matched one to
    one to the labelled objects by the assignment that agrees on the most attributes (at most 3
    labelled objects: every assignment is tried). Per labelled object, an attribute is right when
    its match has the same value; an unmatched object has every attribute wrong. Returns the
    fractions of labelled objects per attribute, count (1 if the caption states as many objects
    as the scene has), scene (1 if it states exactly the labelled objects) and parsed (1 if the
    caption parses strictly).
    """
    labels = tuple(labels)
    predicted = shapes.parse_caption(caption, strict=False)
    try:
        shapes.parse_caption(caption, strict=True)
        parsed = 1.0
    except shapes.CaptionParseError:
        parsed = 0.0
    slots = list(predicted) + [None] * len(labels)
    best = max((np.array([_agreement(p, t) for p, t in zip(choice, labels)], float)
                for choice in itertools.permutations(slots, len(labels))),
               key=lambda a: a.sum())
    out = dict(zip(CAPTION_ATTRIBUTES, best.mean(axis=0).tolist()))
    out["count"] = float(len(predicted) == len(labels))
    out["scene"] = float(tuple(sorted(predicted, key=lambda o: o.position))
                         == tuple(sorted(labels, key=lambda o: o.position)))
    out["parsed"] = parsed
    return out


def labels_of(example: dict[str, Any]) -> tuple[shapes.ShapeObject, ...]:
    """A shapes example's objects from its label fields (num_objects, shape, color, size, position)."""
    return shapes.scene_from_example({**example, "background": example.get("background", 0)}).objects


def _require_labels(example: dict[str, Any], what: str) -> dict[str, Any]:
    missing = [k for k in ("num_objects", "shape", "color", "size", "position") if k not in example]
    if missing:
        raise ValueError(f"{what} is built from the scene's labels: the example has no {missing} (list them in "
                         "data.extra_fields)")
    return example


class ReadingOrderTarget(grain.transforms.Map):
    """A `shapes` example (with its label fields) -> the same plus `target_text`: the scene's
    `shapes.reading_order_caption`, which the text pipeline tokenises into `target_ids` /
    `target_len` beside the example's own caption."""

    def map(self, example: dict[str, Any]) -> dict[str, Any]:
        scene = shapes.Scene(labels_of(_require_labels(example, "a reading-order caption")), 0)
        return {**example, "target_text": shapes.reading_order_caption(scene)}


def caption_attribute_accuracy(captions: Sequence[str],
                               labels: Sequence[Sequence[shapes.ShapeObject]]) -> dict[str, float]:
    """`score_caption` averaged over examples: {"shape", "colour", "size", "position" (per object),
    "count", "scene", "parsed" (per caption), "examples"}, and "position_<k>_objects" for each
    object count k present: position over scenes of k objects only (binding: a captioner that pairs
    the objects it names with the occupied cells at random scores 1/k there, and 100% at k = 1).
    labels[i]: the objects of scene i (`labels_of(example)`, or `Scene.objects`)."""
    if len(captions) != len(labels):
        raise ValueError(f"{len(captions)} captions for {len(labels)} scenes")
    if not captions:
        raise ValueError("no captions to score")
    scores = [score_caption(c, objs) for c, objs in zip(captions, labels)]
    weights = np.array([len(objs) for objs in labels], float)  # attributes: per object, not per scene
    out = {a: float(np.average([s[a] for s in scores], weights=weights)) for a in CAPTION_ATTRIBUTES}
    out |= {k: float(np.mean([s[k] for s in scores])) for k in ("count", "scene", "parsed")}
    for k in sorted({len(objs) for objs in labels}):
        out[f"position_{k}_objects"] = float(np.mean([s["position"] for s, objs in zip(scores, labels)
                                                      if len(objs) == k]))
    out["examples"] = len(captions)
    return out


__all__ = [
    "CAPTION_ATTRIBUTES", "CAPTION_TARGETS", "GROUP_OF_KIND", "IMAGE_TOKEN", "QUESTION_GROUPS", "TASKS",
    "ReadingOrderTarget", "ShapesToVLM", "VLMSequenceError", "build_vlm_sequence", "build_vlm_turns",
    "caption_attribute_accuracy", "image_block",
    "labels_of", "normalize_answer", "score_caption", "vlm_tokenizer", "vqa_accuracy",
]
