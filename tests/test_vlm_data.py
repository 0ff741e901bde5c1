"""VLM sequences, the shapes VQA / caption transforms, the caption parser and the VQA / caption
scores, against sequences, parses and scores written out by hand."""

import dataclasses

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data import shapes as S
from mmjax.data import vlm
from mmjax.data.transforms import BadExample
from mmjax.objectives.lm import next_token_targets

# A made-up vocabulary: pad 0, bos 1, eos 2, placeholder 9, text ids >= 20.
IDS = dict(image_id=9, pad_id=0, bos_id=1, eos_id=2)


def test_one_turn_ids_weights_and_prefix_by_hand():
    out = vlm.build_vlm_sequence(3, [30, 31], [40], system_ids=[20, 21], max_len=12, **IDS)
    #                   bos system  image    prompt  ans eos pad
    expected_ids = [1, 20, 21, 9, 9, 9, 30, 31, 40, 2, 0, 0]
    expected_w = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0]
    np.testing.assert_array_equal(out["ids"], expected_ids)
    np.testing.assert_array_equal(out["loss_weights"], expected_w)
    assert out["ids"].dtype == np.int32 and out["loss_weights"].dtype == np.float32
    assert int(out["prefix_len"]) == 8 and int(out["length"]) == 10
    # After the shift the loss sits on the predictions made at positions 7 (prompt end → 40) and 8
    # (40 → eos): targets ids[1:], weights w[1:].
    _, targets, w = next_token_targets(jnp.asarray(out["ids"])[None], jnp.asarray(out["loss_weights"])[None])
    assert np.flatnonzero(np.asarray(w[0])).tolist() == [7, 8]
    assert np.asarray(targets[0])[[7, 8]].tolist() == [40, 2]


def test_turns_and_optional_bos_eos_by_hand():
    out = vlm.build_vlm_turns(2, [([30], [40, 41]), ([32, 33], [42])], max_len=14, **IDS)
    np.testing.assert_array_equal(out["ids"], [1, 9, 9, 30, 40, 41, 2, 32, 33, 42, 2, 0, 0, 0])
    np.testing.assert_array_equal(out["loss_weights"], [0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0])
    assert int(out["prefix_len"]) == 4 and int(out["length"]) == 11
    bare = vlm.build_vlm_sequence(2, [30], [40], max_len=6, image_id=9, pad_id=0, bos_id=None, eos_id=None)
    np.testing.assert_array_equal(bare["ids"], [9, 9, 30, 40, 0, 0])
    np.testing.assert_array_equal(bare["loss_weights"], [0, 0, 0, 1, 0, 0])
    assert int(bare["prefix_len"]) == 3


def test_answer_position_places_every_answer_at_one_position_by_hand():
    # Packed: bos, 2 image tokens (positions 0-2), turn 1 prompt [30] → 7, answer from 8; turn 2's
    # two prompt tokens → 6, 7, its answer from 8 too.
    out = vlm.build_vlm_turns(2, [([30], [40, 41]), ([32, 33], [42])], max_len=14, packed=True, answer_position=8,
                              **IDS)
    np.testing.assert_array_equal(out["ids"], [1, 9, 9, 30, 40, 41, 2, 32, 33, 42, 2, 0, 0, 0])
    np.testing.assert_array_equal(out["positions"][:11], [0, 1, 2, 7, 8, 9, 10, 6, 7, 8, 9])
    # One turn: the same positions, and prompt_positions gives them from prefix_len alone (as asked).
    one = vlm.build_vlm_sequence(2, [32, 33], [42], max_len=9, answer_position=8, **IDS)
    np.testing.assert_array_equal(one["positions"][:7], [0, 1, 2, 6, 7, 8, 9])
    np.testing.assert_array_equal(vlm.prompt_positions([one["prefix_len"]], 3, 8, 7)[0], one["positions"][:7])
    np.testing.assert_array_equal(vlm.prompt_positions([5], 3, None, 4)[0], [0, 1, 2, 3])
    with pytest.raises(vlm.VLMSequenceError, match=r"prompt of 2 tokens does not fit between the image block's "
                                                   r"end \(position 3\) and answer_position=4 \(room for 1\)"):
        vlm.build_vlm_sequence(2, [32, 33], [42], max_len=9, answer_position=4, **IDS)
    with pytest.raises(ValueError, match="2 unpacked turns would overlap"):
        vlm.build_vlm_turns(2, [([30], [40]), ([31], [41])], max_len=14, answer_position=8, **IDS)


def test_an_explicit_image_block_is_kept_whole():
    block = [50, 9, 9, 51, 9, 9, 51, 52]  # start, 2 rows of 2 placeholders + row end, end
    out = vlm.build_vlm_sequence(block, [30], [40], max_len=12, **IDS)
    np.testing.assert_array_equal(out["ids"], [1, 50, 9, 9, 51, 9, 9, 51, 52, 30, 40, 2])
    assert out["loss_weights"].tolist() == [0] * 10 + [1, 1]
    with pytest.raises(vlm.VLMSequenceError, match="holds no placeholder id 9"):
        vlm.build_vlm_sequence([50, 51], [30], [40], max_len=12, **IDS)


def test_truncation_cuts_text_only():
    # 1 + 3 + 1 + 6 + 1 = 12 tokens into 9: the answer's end and the eos go, 3 answer tokens stay.
    out = vlm.build_vlm_sequence(3, [30], [40, 41, 42, 43, 44, 45], max_len=8, **IDS)
    np.testing.assert_array_equal(out["ids"], [1, 9, 9, 9, 30, 40, 41, 42])
    np.testing.assert_array_equal(out["loss_weights"], [0, 0, 0, 0, 0, 1, 1, 1])
    assert int(out["length"]) == 8
    # Later turns go first.
    out = vlm.build_vlm_turns(1, [([30], [40]), ([31], [41])], max_len=6, **IDS)
    np.testing.assert_array_equal(out["ids"], [1, 9, 30, 40, 2, 31])


def test_loud_errors_name_the_numbers():
    with pytest.raises(vlm.VLMSequenceError, match=r"cut the image block \(5 ids, 5 placeholders\)") as e:
        vlm.build_vlm_sequence(5, [30], [40], max_len=4, **IDS)
    assert isinstance(e.value, ValueError) and isinstance(e.value, BadExample)
    # The image fits but the prompt leaves no room for one answer token.
    with pytest.raises(vlm.VLMSequenceError, match=r"no supervised token \(the first answer token would sit "
                                                   r"at 7 >= max_len=6\)"):
        vlm.build_vlm_sequence(2, [30, 31, 32, 33], [40], max_len=6, **IDS)
    with pytest.raises(vlm.VLMSequenceError, match="6 tokens.*more than max_len=5 and truncation is off"):
        vlm.build_vlm_sequence(2, [30], [40], max_len=5, truncate=False, **IDS)
    with pytest.raises(vlm.VLMSequenceError, match="no supervised token.*empty answers and eos_id=None"):
        vlm.build_vlm_sequence(2, [30], [], max_len=8, image_id=9, pad_id=0, bos_id=1, eos_id=None)
    with pytest.raises(vlm.VLMSequenceError, match=r"placeholder id 9 appears inside the text \(prompt of turn 0, "
                                                   r"at token 1 of 2\)"):
        vlm.build_vlm_sequence(2, [30, 9], [40], max_len=8, **IDS)
    with pytest.raises(vlm.VLMSequenceError, match=r"answer of turn 1"):
        vlm.build_vlm_turns(2, [([30], [40]), ([31], [9])], max_len=12, **IDS)
    with pytest.raises(vlm.VLMSequenceError, match="system text"):
        vlm.build_vlm_sequence(2, [30], [40], system_ids=[9], max_len=8, **IDS)
    with pytest.raises(ValueError, match="placeholder id 2 is also eos_id"):
        vlm.build_vlm_sequence(2, [30], [40], max_len=8, image_id=2, pad_id=0, bos_id=1, eos_id=2)


# --- shapes ---------------------------------------------------------------------------------------

EXAMPLES = [S.generate_example("train", i) for i in range(6)]


def test_question_kinds_and_groups():
    by_hand = {
        "how many objects are there?": ("count", "count"),
        "how many stars are there?": ("count_shape", "count"),
        "how many red objects are there?": ("count_color", "count"),
        "what shape is in the middle left?": ("shape_at", "shape"),
        "what color is the shape at the top left?": ("color_at", "colour"),
        "what size is the shape in the center?": ("size_at", "size"),
        "what color is the circle?": ("color_of", "colour"),
        "what size is the red circle?": ("size_of", "size"),
        "what shape is directly below the red circle?": ("neighbour", "position"),
        "is there an orange star?": ("exists", "exists"),
    }
    for q, (kind, group) in by_hand.items():
        assert S.question_kind(q) == kind and vlm.GROUP_OF_KIND[kind] == group, q
    with pytest.raises(ValueError, match="not a question of any template"):
        S.question_kind("what is the meaning of this?")
    # Every generated question has a kind, and its answer is a word of its group's vocabulary.
    vocab = {"count": S.NUMBER_WORDS, "colour": S.COLORS, "size": S.SIZES, "shape": S.SHAPES,
             "position": S.SHAPES, "exists": ("yes", "no")}
    for split in ("train", "test_novel"):
        for i in range(40):
            rng = S.example_rng(split, i)
            scene = S.sample_split_scene(split, rng)
            S.caption_scene(scene, rng)
            for q, a in S.questions_for(scene, rng):
                assert a in vocab[vlm.GROUP_OF_KIND[S.question_kind(q)]], (q, a)


def test_shapes_vqa_sequences():
    tok = vlm.vlm_tokenizer("bytes")
    image_id = tok.token_to_id("<image>")
    n = 4
    for ex in EXAMPLES[:3]:
        for k in range(len(ex["questions"])):
            t = vlm.ShapesToVLM(image_tokens=n, max_len=80, question_index=k)
            out = t.map(ex)
            ids, w, p, length = out["ids"], out["loss_weights"], int(out["prefix_len"]), int(out["length"])
            question, answer = ex["questions"][k], ex["answers"][k]
            # [bos] <image>×4 question "\n" answer [eos]: the parts decode back to the example's text.
            assert ids[0] == tok.bos_id and (ids[1:1 + n] == image_id).all() and (ids == image_id).sum() == n
            assert tok.decode(ids[1 + n:p]) == question + "\n"
            assert tok.decode(ids[p:length]) == answer and ids[length - 1] == tok.eos_id
            np.testing.assert_array_equal(w, (np.arange(80) >= p) & (np.arange(80) < length))
            assert S.QUESTION_KINDS[out["question_kind"]] == S.question_kind(question)
            assert vlm.QUESTION_GROUPS[out["question_group"]] == vlm.GROUP_OF_KIND[S.question_kind(question)]
            assert "questions" not in out and out["image"] is ex["image"]  # text consumed, image untouched
    # Without question_index a pair is drawn with grain's rng: different examples get different
    # questions, the same seed the same ones.
    t = vlm.ShapesToVLM(image_tokens=n, max_len=80, keep_text=True)
    ds = grain.MapDataset.source(EXAMPLES).random_map(t, seed=3)
    drawn = [ds[i]["prompt"] for i in range(len(EXAMPLES))]
    assert all(q in ex["questions"] for q, ex in zip(drawn, EXAMPLES))
    assert drawn == [grain.MapDataset.source(EXAMPLES).random_map(t, seed=3)[i]["prompt"] for i in range(len(EXAMPLES))]
    assert len({ex["questions"].index(q) for q, ex in zip(drawn, EXAMPLES)}) > 1
    batch = ds.batch(3)[0]
    assert batch["ids"].shape == (3, 80) and batch["image"].shape == (3, 32, 32, 3)


def test_shapes_turns_and_caption_sequences():
    tok = vlm.vlm_tokenizer("bytes")
    ex = EXAMPLES[0]
    out = vlm.ShapesToVLM(task="vqa_turns", image_tokens=2, max_len=400).map(ex)
    assert out["loss_weights"].sum() == sum(len(a) + 1 for a in ex["answers"])  # every answer and its eos
    text = tok.decode(out["ids"][:out["length"]])
    assert text == "".join(f"{q}\n{a}" for q, a in zip(ex["questions"], ex["answers"]))
    # Drawn per example: the same turns, reordered, and the order differs between draws.
    orders = set()
    for seed in range(6):
        drawn = vlm.ShapesToVLM(task="vqa_turns", image_tokens=2, max_len=400).random_map(
            ex, np.random.default_rng(seed))
        drawn_text = tok.decode(drawn["ids"][:drawn["length"]])
        starts = sorted((drawn_text.index(f"{q}\n{a}"), q) for q, a in zip(ex["questions"], ex["answers"]))
        assert len(drawn_text) == len(text) and drawn["loss_weights"].sum() == out["loss_weights"].sum()
        orders.add(tuple(q for _, q in starts))
    assert len(orders) > 1
    cap = vlm.ShapesToVLM(task="caption", image_tokens=2, max_len=300).map(ex)
    p, length = int(cap["prefix_len"]), int(cap["length"])
    assert tok.decode(cap["ids"][:p]) == "describe the image.\n"
    assert tok.decode(cap["ids"][p:length]) == ex["caption"] and cap["loss_weights"].sum() == len(ex["caption"]) + 1
    # TFDS gives text as bytes, the pipeline's decode step as a 0-d bytes array: the same sequence.
    for caption in (ex["caption"].encode(), np.array(ex["caption"].encode())):
        ids = vlm.ShapesToVLM(task="caption", image_tokens=2, max_len=300).map({**ex, "caption": caption})["ids"]
        np.testing.assert_array_equal(ids, cap["ids"])
    with pytest.raises(vlm.VLMSequenceError, match="example 0: .*cut the image block"):
        vlm.ShapesToVLM(task="caption", image_tokens=40, max_len=30).map(ex)
    with pytest.raises(vlm.VLMSequenceError, match="truncation is off"):
        vlm.ShapesToVLM(task="caption", image_tokens=2, max_len=30, on_long="error").map(ex)
    with pytest.raises(vlm.VLMSequenceError, match="placeholder id"):
        vlm.ShapesToVLM(image_tokens=2, question_index=0).map({**ex, "questions": ["what is <image>?"] * 6})
    with pytest.raises(ValueError, match="task must be one of"):
        vlm.ShapesToVLM(task="chat")
    # caption_rate: a drawn example is either the caption turn (as task "caption" builds it) or all
    # its questions; rate 1 always the caption, and no rate outside vqa_turns.
    mixed = vlm.ShapesToVLM(task="vqa_turns", image_tokens=2, max_len=400, caption_rate=0.5)
    kinds = []
    for seed in range(12):
        drawn = mixed.random_map(ex, np.random.default_rng(seed))
        is_caption = tok.decode(drawn["ids"][:int(drawn["prefix_len"])]) == "describe the image.\n"
        if is_caption:
            np.testing.assert_array_equal(drawn["ids"][:length], cap["ids"][:length])
        else:
            assert drawn["loss_weights"].sum() == out["loss_weights"].sum()
        kinds.append(is_caption)
    assert 0 < sum(kinds) < len(kinds)
    always = dataclasses.replace(mixed, caption_rate=1.0).random_map(ex, np.random.default_rng(0))
    np.testing.assert_array_equal(always["ids"][:300], cap["ids"])
    with pytest.raises(ValueError, match="caption_rate"):
        vlm.ShapesToVLM(task="vqa", caption_rate=0.5)



def test_reading_order_caption_targets_answer_the_labels_caption():
    tok = vlm.vlm_tokenizer("bytes")
    for ex in EXAMPLES[:3]:
        out = vlm.ShapesToVLM(task="caption", image_tokens=2, max_len=300, caption_targets="reading_order").map(ex)
        p, length = int(out["prefix_len"]), int(out["length"])
        want = S.reading_order_caption(S.scene_from_example(ex))
        assert tok.decode(out["ids"][p:length]) == want and out["loss_weights"].sum() == len(want) + 1
        assert S.parse_caption(want) == S.parse_caption(ex["caption"])   # the same scene, another caption
    with pytest.raises(ValueError, match="caption_targets must be one of"):
        vlm.ShapesToVLM(task="caption", caption_targets="sorted")
    t = vlm.ReadingOrderTarget()
    assert t.map(EXAMPLES[0])["target_text"] == S.reading_order_caption(S.scene_from_example(EXAMPLES[0]))
    with pytest.raises(ValueError, match=r"no \['size', 'position'\] \(list them in data.extra_fields\)"):
        t.map({k: v for k, v in EXAMPLES[0].items() if k not in ("size", "position")})


def test_all_questions_of_a_kind_come_first_from_the_labels():
    # By hand: a red circle at the top left, a blue star right of it, a green square at the bottom
    # right. The one neighbour question the grammar asks is "left of the star" (the circle has two
    # objects to its right and below it the square is two rows down; the square has two objects
    # above and left of it).
    scene = S.Scene((S.ShapeObject(0, 0, 0, 0), S.ShapeObject(5, 5, 1, 1), S.ShapeObject(1, 3, 1, 8)), 0)
    stored = S.questions_for(scene, np.random.default_rng(3))
    pad = lambda xs: np.array((list(xs) + [-1] * 3)[:3], np.int32)
    ex = {"id": 0, "num_objects": np.int32(3), "questions": [q for q, _ in stored], "answers": [a for _, a in stored],
          **{k: pad(getattr(o, k) for o in scene.objects) for k in ("shape", "color", "size", "position")}}
    tok = vlm.vlm_tokenizer("bytes")
    out = vlm.ShapesToVLM(task="vqa_turns", image_tokens=2, max_len=400, all_questions_of=("neighbour",)).map(ex)
    want = [("what shape is directly to the left of the blue star?", "circle")]
    want += [(q, a) for q, a in stored if S.question_kind(q) != "neighbour"][: len(stored) - 1]
    assert tok.decode(out["ids"][:out["length"]]) == "".join(f"{q}\n{a}" for q, a in want)
    with pytest.raises(ValueError, match=r"unknown: \['neighbor'\]"):
        vlm.ShapesToVLM(task="vqa_packed", all_questions_of=("neighbor",))
    with pytest.raises(ValueError, match="is for tasks 'vqa_turns' and 'vqa_packed'"):
        vlm.ShapesToVLM(task="vqa", all_questions_of=("neighbour",))
    with pytest.raises(ValueError, match="all_questions_of is built from the scene's labels"):
        vlm.ShapesToVLM(task="vqa_turns", image_tokens=2, max_len=400, all_questions_of=("neighbour",)).map(
            {k: v for k, v in ex.items() if k != "position"})

# --- evaluation -----------------------------------------------------------------------------------


def test_vqa_accuracy_by_hand():
    preds = ["Red.", "circle", " two", "no", "large"]
    refs = ["red", "square", "two", "yes", "large"]
    types = ["color_of", "shape_at", "count", vlm.QUESTION_GROUPS.index("exists"), "size"]
    out = vlm.vqa_accuracy(preds, refs, types)
    assert out["accuracy"] == pytest.approx(3 / 5) and out["examples"] == 5
    assert out["accuracy/colour"] == 1.0 and out["accuracy/shape"] == 0.0 and out["accuracy/count"] == 1.0
    assert out["accuracy/exists"] == 0.0 and out["accuracy/size"] == 1.0 and "accuracy/position" not in out
    with pytest.raises(ValueError, match="one of each"):
        vlm.vqa_accuracy(preds, refs[:2], types)
    by_count = vlm.vqa_accuracy(preds, refs, types, num_objects=[1, 1, 3, 3, 3])  # right: 1 of 2, 2 of 3
    assert by_count["accuracy/objects_1"] == 0.5 and by_count["accuracy/objects_3"] == pytest.approx(2 / 3)
    assert by_count["examples/objects_3"] == 3 and "accuracy/objects_2" not in by_count
    with pytest.raises(ValueError, match="one per question"):
        vlm.vqa_accuracy(preds, refs, types, num_objects=[1, 2])


def test_caption_parser_round_trips_the_test_split():
    # Caption i of `test` exactly as generate_example makes it: the scene, then the caption, from
    # the example's rng (checked against generate_example on a few).
    for i in range(S.SPLIT_SIZES["test"]):
        rng = S.example_rng("test", i)
        scene = S.sample_split_scene("test", rng)
        caption = S.caption_scene(scene, rng)
        if i < 3:
            ex = S.generate_example("test", i)
            assert ex["caption"] == caption and S.scene_from_example(ex).objects == scene.objects
        assert S.parse_caption(caption) == scene.objects, (i, caption)


def test_caption_parser_by_hand():
    circle, square = S.ShapeObject(0, 0, 0, 0), S.ShapeObject(1, 5, 1, 4)  # small red circle top left, ...
    assert S.parse_caption("two shapes: a small red circle in the top left corner and directly below it "
                           "is a large square in blue") == (circle, S.ShapeObject(1, 5, 1, 3))
    assert S.parse_caption("in the middle there is a large blue square; a small circle in red is to the "
                           "left of the square") == (S.ShapeObject(0, 0, 0, 3), square)
    with pytest.raises(S.CaptionParseError, match="says three objects but states 1"):
        S.parse_caption("three objects: a small red circle at the top left")
    with pytest.raises(S.CaptionParseError, match="no cell above top left"):
        S.parse_caption("a small red circle at the top left. a large blue square above it")
    with pytest.raises(S.CaptionParseError, match="0 noun phrases"):
        S.parse_caption("a small red circle at the top left. something else")
    # Lenient: the clause it cannot read is skipped, and a second object in a taken cell dropped.
    assert S.parse_caption("a small red circle at the top left. something else. a large blue square in the "
                           "center. a small green star at the top left", strict=False) == (circle, square)


def test_caption_scores_by_hand():
    circle, square = S.ShapeObject(0, 0, 0, 0), S.ShapeObject(1, 5, 1, 4)
    right = "a small red circle at the top left and a large blue square in the center"
    misplaced = "a small red circle at the top left and a large blue square in the bottom right corner"
    extra = right + " and a small green star at the top right"
    garbage = "the cat sat on the mat"
    out = vlm.caption_attribute_accuracy([right, misplaced, extra, garbage], [(circle, square)] * 4)
    # 8 labelled objects: shape/colour/size right for 6 (all but garbage's two), positions for 5.
    assert out["shape"] == out["colour"] == out["size"] == pytest.approx(6 / 8)
    assert out["position"] == pytest.approx(5 / 8)
    assert out["count"] == pytest.approx(2 / 4) and out["scene"] == pytest.approx(1 / 4)
    assert out["parsed"] == pytest.approx(3 / 4) and out["examples"] == 4
    assert out["position_2_objects"] == pytest.approx(5 / 8)  # every scene here has two objects
    # by object count: the one-object scene placed right, the two-object scene with its pair swapped
    swapped = "a small red circle in the center and a large blue square at the top left"
    by_k = vlm.caption_attribute_accuracy(["a small red circle at the top left", swapped],
                                          [(circle,), (circle, square)])
    assert by_k["position_1_objects"] == 1.0 and by_k["position_2_objects"] == 0.0
    assert by_k["position"] == pytest.approx(1 / 3) and "position_3_objects" not in by_k
    # A square stated as a circle in the square's cell matches by the most agreeing attributes.
    one = vlm.score_caption("a large blue circle in the center and a small red circle at the top left",
                            (circle, square))
    assert one == {"shape": 0.5, "colour": 1.0, "size": 1.0, "position": 1.0, "count": 1.0, "scene": 0.0,
                   "parsed": 1.0}


def test_shapes_sequence_with_a_multicrop_image_block():
    from mmjax.layers import multicrop_layout

    names = ("<image>", "<im_start>", "<im_end>", "<im_col>")
    tok = vlm.vlm_tokenizer("bytes", names)
    image_id, start, end, col = (tok.token_to_id(t) for t in names)
    layout = multicrop_layout(2, 1, 2, image_id=image_id, start_id=start, end_id=end, col_id=col)
    t = vlm.ShapesToVLM(image_tokens=tuple(int(i) for i in layout.ids), extra_special_tokens=names[1:],
                        max_len=80, question_index=0)
    out = t.map(EXAMPLES[0])
    block = len(layout.ids)  # 2 + 1·(2+1) + 2 + 2·(4+1) = 17
    assert block == 17
    np.testing.assert_array_equal(out["ids"][1:1 + block], layout.ids)
    assert (out["ids"] == image_id).sum() == layout.num_features == 10
    assert out["loss_weights"][:1 + block].sum() == 0
    assert tok.decode(out["ids"][int(out["prefix_len"]):int(out["length"])]) == EXAMPLES[0]["answers"][0]
