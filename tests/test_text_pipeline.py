"""Captions through the grain pipeline: tokenised, padded, and long ones truncated, refused or skipped."""

import dataclasses

import numpy as np
import pytest

from mmjax.data import pipeline, transforms
from mmjax.data.config import DataConfig
from mmjax.data.digits import caption_for
from mmjax.data.tokenizers import ByteTokenizer

# Byte lengths + EOS: "one", "two", "six" → 24 ids; "zero", "four", "five", "nine" → 25;
# "three", "seven", "eight" → 26.
LONG = {3, 7, 8}


@pytest.fixture(scope="module")
def cfg(digits_dir):
    return DataConfig(name="digits", data_dir=digits_dir, text_field="caption", max_text_len=32)


def test_captions_are_tokenised_and_padded(cfg):
    batch = next(pipeline.train_iterator(cfg, global_batch_size=16, seed=0))
    tok = ByteTokenizer()
    assert batch["text_ids"].shape == (16, 32) and batch["text_ids"].dtype == np.int32
    for ids, n, label in zip(batch["text_ids"], batch["text_len"], batch["label"]):
        assert ids[n - 1] == tok.eos_id and (ids[n:] == tok.pad_id).all()
        assert tok.decode(ids[:n]) == caption_for(int(label))  # golden: the builder's caption


def test_long_captions_truncate_keep_eos(cfg):
    batch = next(pipeline.train_iterator(dataclasses.replace(cfg, max_text_len=10), global_batch_size=16, seed=0))
    tok = ByteTokenizer()
    assert (batch["text_len"] == 10).all() and (batch["text_ids"][:, 9] == tok.eos_id).all()
    assert tok.decode(batch["text_ids"][0, :9]) == "a handwri"


def test_long_captions_error_names_the_example(cfg):
    it = pipeline.train_iterator(dataclasses.replace(cfg, max_text_len=25, on_long_text="error"),
                                 global_batch_size=64, seed=0)
    with pytest.raises(transforms.BadExample, match=r"id=\d+: text of 26 tokens is longer than max_text_len=25"):
        next(it)


def test_long_captions_skipped_and_counted(cfg):
    before = transforms.SKIPPED["TokenizeText"]
    c = dataclasses.replace(cfg, max_text_len=25, on_long_text="skip")
    with pytest.warns(UserWarning, match="longer than max_text_len=25"):
        batches = [b for b, _ in zip(pipeline.train_iterator(c, global_batch_size=32, seed=0), range(4))]
    labels = np.concatenate([b["label"] for b in batches])
    assert labels.size == 128 and not set(labels.tolist()) & LONG
    assert transforms.SKIPPED["TokenizeText"] > before
    # Eval: each skipped example is a masked slot, so every usable one is counted exactly once.
    with pytest.warns(UserWarning):
        ev = list(pipeline.eval_batches(c, global_batch_size=64))
    mask = np.concatenate([b["mask"] for b in ev])
    lab = np.concatenate([b["label"] for b in ev])[mask]
    assert mask.size == 384 and not set(lab.tolist()) & LONG
    assert 0.2 * 360 < 360 - mask.sum() < 0.4 * 360  # about 3 classes of 10 were skipped


# ----------------------------------------------------------------------------- hard negative texts

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def test_negative_texts_swap_one_group_word(cfg):
    c = dataclasses.replace(cfg, text_negatives=(NUMBERS,))
    batch = next(pipeline.train_iterator(c, global_batch_size=32, seed=0))
    tok = ByteTokenizer()
    assert batch["neg_text_ids"].shape == batch["text_ids"].shape and (batch["neg_valid"] == 1).all()
    for ids, n, nids, nn, label in zip(batch["text_ids"], batch["text_len"], batch["neg_text_ids"],
                                       batch["neg_text_len"], batch["label"]):
        caption, negative = tok.decode(ids[:n]), tok.decode(nids[:nn])
        assert caption == caption_for(int(label))
        prefix, word = caption.rsplit(" ", 1)
        assert word == NUMBERS[int(label)]
        neg_prefix, neg_word = negative.rsplit(" ", 1)  # only the number word changed, to another one
        assert neg_prefix == prefix and neg_word in NUMBERS and neg_word != word
    # Deterministic per (seed, stream position).
    again = next(pipeline.train_iterator(c, global_batch_size=32, seed=0))
    np.testing.assert_array_equal(again["neg_text_ids"], batch["neg_text_ids"])
    # Eval batches carry no negatives.
    assert "neg_text_ids" not in next(iter(pipeline.eval_batches(c, global_batch_size=16)))


def test_several_negative_texts_are_distinct_swaps(cfg):
    """text_negatives_per_text K: K distinct swaps without replacement; the digits captions have one
    number word, so 9 swaps exist and K = 4 draws 4 different numbers, never the caption's own."""
    c = dataclasses.replace(cfg, text_negatives=(NUMBERS,), text_negatives_per_text=4)
    batch = next(pipeline.train_iterator(c, global_batch_size=16, seed=0))
    tok = ByteTokenizer()
    assert batch["neg_text_ids"].shape == (16, 4, batch["text_ids"].shape[1])
    assert batch["neg_text_len"].shape == batch["neg_valid"].shape == (16, 4) and (batch["neg_valid"] == 1).all()
    for ids, n, nids, nn in zip(batch["text_ids"], batch["text_len"], batch["neg_text_ids"], batch["neg_text_len"]):
        prefix, word = tok.decode(ids[:n]).rsplit(" ", 1)
        negs = [tok.decode(x[:m]).rsplit(" ", 1) for x, m in zip(nids, nn)]
        assert all(p == prefix and w in NUMBERS and w != word for p, w in negs)
        assert len({w for _, w in negs}) == 4
    with pytest.raises(ValueError, match="text_negatives_per_text=3 needs text_negatives"):
        pipeline.train_iterator(dataclasses.replace(cfg, text_negatives_per_text=3), global_batch_size=16, seed=0)


def test_swap_word_negative_count_draws_without_replacement():
    swap = transforms.SwapWordNegative((("circle", "square", "star"), ("red", "blue")), count=4)
    rng = np.random.default_rng(0)
    all_five = {"a blue circle, stars and a square.", "a red square, stars and a square.",
                "a red star, stars and a square.", "a red circle, stars and a circle.",
                "a red circle, stars and a star."}
    seen = set()
    for _ in range(50):
        out = swap.random_map({"text": "a red circle, stars and a square."}, rng)
        assert len(set(out["neg_text"])) == 4 and set(out["neg_text"]) <= all_five
        np.testing.assert_array_equal(out["neg_valid"], [1, 1, 1, 1])
        seen |= set(out["neg_text"])
    assert seen == all_five
    out = transforms.SwapWordNegative((("red", "blue", "green"),), count=4).random_map({"text": "a red dot"}, rng)
    assert sorted(out["neg_text"][:2]) == ["a blue dot", "a green dot"] and out["neg_text"][2:] == ["a red dot"] * 2
    np.testing.assert_array_equal(out["neg_valid"], [1, 1, 0, 0])  # only 2 swaps exist: the rest are left out
    with pytest.raises(ValueError, match="text_negatives_per_text must be an int >= 1"):
        transforms.SwapWordNegative((("red", "blue"),), count=0)


def test_swap_word_negative_rules():
    swap = transforms.SwapWordNegative((("circle", "square", "star"), ("red", "blue")))
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        out = swap.random_map({"text": "a red circle, stars and a square."}, rng)
        assert out["neg_valid"] == 1
        seen.add(out["neg_text"])
    # One whole-word occurrence replaced by another word of its group; "stars" is not "star".
    assert seen == {"a blue circle, stars and a square.", "a red square, stars and a square.",
                    "a red star, stars and a square.", "a red circle, stars and a circle.",
                    "a red circle, stars and a star."}
    out = swap.random_map({"text": "nothing to swap, stars"}, rng)
    assert out["neg_valid"] == 0 and out["neg_text"] == "nothing to swap, stars"
    with pytest.raises(ValueError, match="at least two distinct words"):
        transforms.SwapWordNegative((("circle", "circle"),))
    with pytest.raises(ValueError, match="'red' is in groups 0 and 1"):
        transforms.SwapWordNegative((("red", "blue"), ("red", "green")))
    with pytest.raises(ValueError, match="not a single word"):
        transforms.SwapWordNegative((("red car", "blue"),))
    with pytest.raises(ValueError, match="text_negatives needs text_field"):
        pipeline.train_iterator(DataConfig(name="digits", text_negatives=(NUMBERS,)), global_batch_size=8, seed=0)
