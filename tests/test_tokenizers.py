"""Tokenizers: byte layout and round trips, HF tokenizer.json and sentencepiece wrappers checked
against the libraries themselves (and transformers), BPE training, batching, loading, vocab checks.

Golden values come from Python (`str.encode`) and from the reference libraries, never from our
own output. Everything is trained locally on generated text: no downloads.
"""

import json
import pickle

import numpy as np
import pytest

from mmjax.data.tokenizers import (
    SPEC_FILE,
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    check_vocab,
    load_tokenizer,
    train_bpe,
)

SAMPLES = [
    "a red circle at the top left",
    "Crème brûlée à la française, naïve café",
    "Cafe\u0301 (decomposed accent)",  # NFD: must not be normalised away
    "東京の猫は可愛い。中文字符 한국어",
    "emoji 🐱🚀 family 👨‍👩‍👧 flag 🇫🇷 skin 👍🏽",
    "tabs\tand\nnewlines\r\n and  double  spaces ",
    "\x00 nul and \x7f del",
    "",
]

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
PLACES = ["top left", "top right", "bottom left", "bottom right", "centre"]


def corpus():
    """Generated captions (a shapes-dataset flavour), deterministic."""
    return [f"a {size} {c} {s} in the {p} of the image"
            for size in ("small", "large") for c in COLORS for s in SHAPES for p in PLACES]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    return train_bpe(corpus(), 400, d), d


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus() + SAMPLES[:5]), model_prefix=str(d / "sp"),
                                   vocab_size=400, model_type="unigram", byte_fallback=True,
                                   hard_vocab_limit=False, minloglevel=2, num_threads=1)
    return d / "sp.model"


@pytest.fixture(scope="module")
def clip_like(tmp_path_factory):
    """A tokenizer.json shaped like CLIP's: <|startoftext|>/<|endoftext|> specials, a post-processor
    that adds them, lowercasing, and truncation/padding switched on in the file."""
    from tokenizers import Tokenizer as T
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = T(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=350, special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    tok.enable_truncation(max_length=5)
    tok.enable_padding(length=77, pad_id=eos, pad_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("clip") / "tokenizer.json"
    tok.save(str(path))
    return path


# -- bytes --------------------------------------------------------------------------------------


def test_byte_ids_are_python_utf8_and_round_trip():
    tok = ByteTokenizer()
    for s in SAMPLES:
        ids = tok.encode(s)
        assert ids == list(s.encode("utf-8"))  # golden: Python's codec
        assert tok.decode(ids, errors="strict") == s
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_byte_layout_specials_never_collide_with_bytes():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.vocab_size) == (256, 257, 258, None, 259)
    assert tok.special_tokens == {"<pad>": 256, "<bos>": 257, "<eos>": 258}
    image, boi = tok.add_special_tokens(["<image>", "<boi>"])
    assert (image, boi, tok.vocab_size) == (259, 260, 261)
    all_bytes = set(range(256))
    assert not all_bytes & set(tok.special_tokens.values())
    assert len(set(tok.special_tokens.values())) == len(tok.special_tokens)
    assert tok.encode("hi", add_bos=True, add_eos=True) == [257, 104, 105, 258]
    assert tok.encode("", add_bos=True, add_eos=True) == [257, 258]
    check_vocab(tok, tok.vocab_size)


def test_byte_added_specials_single_id_idempotent_longest_first():
    tok = ByteTokenizer()
    image, = tok.add_special_tokens(["<image>"])
    assert tok.add_special_tokens(["<image>"]) == [image] and tok.vocab_size == 260  # idempotent
    assert tok.add_special_tokens(["<eos>"]) == [tok.eos_id]  # a built-in name returns its id
    start, = tok.add_special_tokens(["<image_start>"])
    ids = tok.encode("look: <image><image_start>!")
    assert ids == list(b"look: ") + [image, start] + [ord("!")]
    assert tok.decode(ids) == "look: !"
    assert tok.decode(ids, skip_special=False) == "look: <image><image_start>!"
    # built-in specials are never produced from text: "<eos>" in a caption stays bytes
    assert tok.encode("<eos>") == list(b"<eos>")
    assert tok.token_to_id("<image>") == image and tok.token_to_id("a") == 97 and tok.token_to_id("ab") is None
    assert tok.id_to_token(0xC3) == "<0xC3>" and tok.token_to_id("<0xC3>") == 0xC3
    with pytest.raises(TypeError, match="single str"):
        tok.add_special_tokens("<x>")
    with pytest.raises(ValueError, match="empty"):
        tok.add_special_tokens([""])


def test_byte_text_edge_cases():
    tok = ByteTokenizer()
    for bad in (None, 3, ["a"], 1.5):
        with pytest.raises(TypeError, match=type(bad).__name__):
            tok.encode(bad)
    assert tok.encode("é".encode()) == list("é".encode())  # UTF-8 bytes are accepted
    with pytest.raises(ValueError, match="not valid UTF-8"):
        tok.encode(b"ok \xff\xfe")
    assert tok.encode(b"ok \xff", errors="replace") == list("ok \ufffd".encode())
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode("\ud800")
    # a model may emit bytes that are not UTF-8: replaced by default, strict on request
    assert tok.decode([0xFF, 65, 0xC3]) == "\ufffdA\ufffd"
    with pytest.raises(ValueError, match="UTF-8"):
        tok.decode([0xFF], errors="strict")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([259])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([-1])
    assert tok.decode(np.array([104, 105, 258], np.int32)) == "hi"


# -- batching -----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", ["bytes", "bpe"])
def test_encode_batch_padding_truncation(make, bpe):
    tok = ByteTokenizer() if make == "bytes" else bpe[0]
    texts = ["short", "a much longer text that will not fit into the window " * 4, ""]
    ids, lengths = tok.encode_batch(texts, max_len=12)
    assert ids.shape == (3, 12) and ids.dtype == np.int32 and lengths.dtype == np.int32
    full = [tok.encode(t, add_eos=True) for t in texts]
    assert lengths.tolist() == [len(full[0]), 12, 1]
    assert ids[0, : lengths[0]].tolist() == full[0] and (ids[0, lengths[0]:] == tok.pad_id).all()
    assert ids[1, -1] == tok.eos_id and ids[1, :11].tolist() == full[1][:11]  # EOS kept at the end
    assert ids[2, 0] == tok.eos_id
    mask = np.arange(12) < lengths[:, None]
    assert mask.sum() == lengths.sum()

    ids, lengths = tok.encode_batch(texts, max_len=12, add_bos=True, truncation="left")
    body = tok.encode(texts[1])
    assert ids[1].tolist() == [tok.bos_id] + body[-10:] + [tok.eos_id]
    ids, lengths = tok.encode_batch(texts[:1], max_len=40, add_eos=False)
    assert lengths.tolist() == [len(tok.encode(texts[0]))]
    assert tok.encode_batch([], max_len=4)[0].shape == (0, 4)
    huge = "the image shows a red circle. " * 5000  # 150k characters
    ids, lengths = tok.encode_batch([huge], max_len=16)
    assert lengths.tolist() == [16] and ids[0, -1] == tok.eos_id
    with pytest.raises(ValueError, match="max_len"):
        tok.encode_batch(texts, max_len=0)
    with pytest.raises(ValueError, match="max_len"):
        tok.encode_batch(texts, max_len=-3)
    with pytest.raises(ValueError, match="no room"):
        tok.encode_batch(texts, max_len=1, add_bos=True, add_eos=True)
    with pytest.raises(ValueError, match="max_len=12"):
        tok.encode_batch(texts, max_len=12, truncation="error")
    with pytest.raises(ValueError, match="truncation"):
        tok.encode_batch(texts, max_len=12, truncation="middle")
    with pytest.raises(TypeError, match="single str"):
        tok.encode_batch("one text", max_len=12)


# -- BPE and tokenizer.json ---------------------------------------------------------------------


def test_bpe_compresses_round_trips_and_is_deterministic(bpe, tmp_path):
    tok, d = bpe
    assert (d / "tokenizer.json").is_file() and (d / SPEC_FILE).is_file()
    assert 256 + 4 < tok.vocab_size <= 400
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)  # special tokens come first
    text = "a large purple star in the bottom right of the image"
    assert len(tok.encode(text)) < len(text.encode()) / 2
    for s in SAMPLES:  # byte-level: text never seen in training still round-trips exactly
        assert tok.decode(tok.encode(s)) == s
    again = train_bpe(corpus(), 400, tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (d / "tokenizer.json").read_bytes()
    assert again.describe()["sha256"] == tok.describe()["sha256"]
    lower = train_bpe([t.upper() for t in corpus()], 400, tmp_path / "lower", lowercase=True)
    assert lower.encode("A RED CIRCLE") == lower.encode("a red circle")
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(corpus(), 100, tmp_path / "small")
    with pytest.raises(TypeError, match="bytes"):
        train_bpe(["ok", b"raw"], 300, tmp_path / "bad")


def test_hf_agrees_with_tokenizers_and_transformers(bpe):
    from tokenizers import Tokenizer as T
    from transformers import PreTrainedTokenizerFast

    tok, d = bpe
    ref = T.from_file(str(d / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    for s in SAMPLES + corpus()[:20]:
        ids = tok.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False).ids
        assert ids == fast.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == ref.decode(ids)
    assert tok.vocab_size == ref.get_vocab_size() == len(fast)


def test_hf_added_special_tokens(bpe, tmp_path):
    tok, d = bpe
    tok = load_tokenizer(str(d))  # a fresh copy: the fixture is shared
    n = tok.vocab_size
    image, = tok.add_special_tokens(["<image>"])
    assert image == n and tok.vocab_size == n + 1 and tok.add_special_tokens(["<image>"]) == [image]
    ids = tok.encode("a red <image> circle<image>")
    assert ids.count(image) == 2 and len([i for i in ids if i >= n]) == 2
    assert tok.decode(ids) == "a red  circle" and "<image>" in tok.decode(ids, skip_special=False)
    assert tok.special_tokens["<image>"] == image
    # the library does the same with the same token
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as T
    ref = T.from_file(str(d / "tokenizer.json"))
    ref.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    assert ids == ref.encode("a red <image> circle<image>", add_special_tokens=False).ids
    # save → load keeps the added token and its id
    back = load_tokenizer(str(tok.save(tmp_path / "saved")))
    assert isinstance(back, HFTokenizer) and back.token_to_id("<image>") == image
    assert back.describe()["sha256"] == tok.describe()["sha256"]


def test_hf_clip_like_file(clip_like):
    from tokenizers import Tokenizer as T

    tok = load_tokenizer(str(clip_like))
    ref = T.from_file(str(clip_like))
    ref.no_truncation()
    ref.no_padding()
    sos, eot = ref.token_to_id("<|startoftext|>"), ref.token_to_id("<|endoftext|>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (sos, eot, eot, None)  # pad falls back to EOS
    text = "A Small RED circle in the top left of the image"
    # the file's truncation (5) and padding (77) are not applied; the flags reproduce its post-processor
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
    assert tok.encode(text, add_bos=True, add_eos=True) == ref.encode(text).ids
    assert len(tok.encode(text)) > 5
    named = load_tokenizer(str(clip_like), bos_token="<|endoftext|>")
    assert named.bos_id == eot
    with pytest.raises(ValueError, match=r"pad_token='<pad>'.*<\|endoftext\|>"):
        load_tokenizer(str(clip_like), pad_token="<pad>")


def test_hf_without_bos_is_a_clear_error(tmp_path):
    tok = train_bpe(corpus(), 300, tmp_path, special_tokens=("<eos>",))
    assert tok.bos_id is None and tok.pad_id == tok.eos_id
    with pytest.raises(ValueError, match="no BOS"):
        tok.encode("a", add_bos=True)


# -- sentencepiece ------------------------------------------------------------------------------


def test_sentencepiece_agrees_with_processor(sp_model, tmp_path):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = load_tokenizer(str(sp_model))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (ref.unk_id(), ref.bos_id(), ref.eos_id())
    assert ref.pad_id() == -1 and tok.pad_id == ref.eos_id()  # no pad in the model: pads with EOS
    assert tok.vocab_size == ref.vocab_size()
    for s in SAMPLES + corpus()[:10]:
        ids = tok.encode(s)
        assert ids == ref.encode(s)
        assert tok.decode(ids) == ref.decode(ids)
        assert tok.encode(s, add_bos=True, add_eos=True) == ref.encode(s, add_bos=True, add_eos=True)
    ids, lengths = tok.encode_batch(corpus()[:3], max_len=8)
    assert ids.shape == (3, 8) and (ids[np.arange(3), lengths - 1] == tok.eos_id).all()

    image, = tok.add_special_tokens(["<image>"])
    assert image == ref.vocab_size() and tok.vocab_size == image + 1
    ids = tok.encode("a red <image> circle")
    assert ids.count(image) == 1 and ids == ref.encode("a red ") + [image] + ref.encode(" circle")
    assert tok.decode(ids, skip_special=False) == "a red<image>circle"  # sentencepiece trims each piece
    back = load_tokenizer(str(tok.save(tmp_path / "saved")))
    assert back.token_to_id("<image>") == image and back.encode("a red <image> circle") == ids
    assert tok.token_to_id("no-such-piece") is None and tok.token_to_id("<unk>") == ref.unk_id()


# -- loading, checks, records -------------------------------------------------------------------


def test_load_tokenizer_dispatch_and_errors(bpe, sp_model, tmp_path):
    _, d = bpe
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    assert isinstance(load_tokenizer(str(d / "tokenizer.json")), HFTokenizer)
    assert isinstance(load_tokenizer(d), HFTokenizer)  # a directory (and a Path) works
    assert isinstance(load_tokenizer(str(sp_model)), SentencePieceTokenizer)
    only_json = tmp_path / "only_json"
    only_json.mkdir()
    (only_json / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes())
    assert isinstance(load_tokenizer(str(only_json)), HFTokenizer)

    byte = ByteTokenizer(added_special_tokens=["<image>"])
    back = load_tokenizer(str(byte.save(tmp_path / "bytes_saved")))
    assert isinstance(back, ByteTokenizer) and back.token_to_id("<image>") == 259

    for spec in ("gpt2", "openai/clip-vit-base-patch32", "byte"):
        with pytest.raises(ValueError, match=rf"{spec!r}.*never downloads.*accepted: \"bytes\""):
            load_tokenizer(spec)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="missing.model"):
        load_tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="directory without"):
        load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizers tokenizer.json"):
        load_tokenizer(str(tmp_path / "junk.json"))
    with pytest.raises(TypeError, match="int"):
        load_tokenizer(3)


def test_check_vocab(bpe):
    tok, _ = bpe
    check_vocab(tok, tok.vocab_size)
    check_vocab(tok, 1024)  # a padded-up model vocabulary is fine
    with pytest.raises(ValueError, match=rf"vocab_size >= {tok.vocab_size}"):
        check_vocab(tok, tok.vocab_size - 1)
    byte = ByteTokenizer()
    check_vocab(byte, 259)
    byte.add_special_tokens(["<image>"])
    with pytest.raises(ValueError, match="ids up to 259"):
        check_vocab(byte, 259)
    with pytest.raises(ValueError, match="positive"):
        check_vocab(byte, 0)


def test_describe_is_json_and_tokenizers_pickle(bpe, sp_model):
    toks = [ByteTokenizer(["<image>"]), load_tokenizer(str(bpe[1])), load_tokenizer(str(sp_model))]
    for tok in toks:
        assert isinstance(tok, Tokenizer)
        rec = json.loads(json.dumps(tok.describe()))
        assert rec["vocab_size"] == tok.vocab_size and rec["pad_id"] == tok.pad_id
        tok.add_special_tokens(["<image>"])
        clone = pickle.loads(pickle.dumps(tok))  # grain workers may pickle a transform holding one
        s = "a red <image> circle 🐱"
        assert clone.encode(s) == tok.encode(s) and clone.vocab_size == tok.vocab_size
    assert {t.describe()["type"] for t in toks} == {"bytes", "hf", "sentencepiece"}


def test_dataset_bpe_spec_trains_once_and_feeds_the_pipeline(digits_dir):
    """"bpe:<dataset>:<vocab>" trains on the train split's text once, caches it in the data dir,
    and the pipeline tokenises with exactly that tokenizer."""
    import os

    from mmjax.data import pipeline
    from mmjax.data.config import DataConfig
    from mmjax.data.digits import caption_for
    from mmjax.data.registry import resolve_tokenizer
    from mmjax.data.tokenizers import load_tokenizer

    path = resolve_tokenizer("bpe:digits:300", digits_dir, "caption")
    assert path.startswith(digits_dir) and os.path.isfile(os.path.join(path, "tokenizer.json"))
    stamp = os.path.getmtime(os.path.join(path, "tokenizer.json"))
    assert resolve_tokenizer("bpe:digits:300", digits_dir, "caption") == path
    assert os.path.getmtime(os.path.join(path, "tokenizer.json")) == stamp  # not trained again
    tok = load_tokenizer(path)
    assert 256 + 4 <= tok.vocab_size <= 300
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    seven = caption_for(7)
    assert tok.decode(tok.encode(seven)) == seven
    assert len(tok.encode(seven)) < len(seven.encode()) // 3  # merges learnt from the captions

    cfg = DataConfig(name="digits", data_dir=digits_dir, text_field="caption", tokenizer="bpe:digits:300",
                     max_text_len=16)
    batch = next(iter(pipeline.eval_batches(cfg, split="test", global_batch_size=4)))
    for ids, n, label in zip(batch["text_ids"], batch["text_len"], batch["label"]):
        assert list(ids[:n]) == tok.encode(caption_for(int(label)), add_eos=True)
        assert (ids[n:] == tok.pad_id).all()

    assert resolve_tokenizer("bytes", digits_dir, "caption") == "bytes"  # other specs pass through
    for bad in ("bpe:digits", "bpe::300", "bpe:digits:many"):
        with pytest.raises(ValueError, match="bpe:<dataset>:<vocab_size>"):
            resolve_tokenizer(bad, digits_dir, "caption")
    with pytest.raises(ValueError, match="text_field"):
        resolve_tokenizer("bpe:digits:300", digits_dir, None)
    with pytest.raises(ValueError, match="no text field 'title'"):
        resolve_tokenizer("bpe:digits:301", digits_dir, "title")
