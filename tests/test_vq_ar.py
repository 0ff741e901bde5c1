"""Caption-conditional AR over VQ codes: the sequence layout and the loss by hand, config errors,
guided sampling constrained to codes (scale 1 = unguided), and a tiny run through the loop on a
tiny tokenizer run that learns the codes and writes a sample grid."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from mmjax import sharding as shd
from mmjax.config import ConfigError
from mmjax.data.config import DataConfig
from mmjax.evals.probe import LABEL_FIELDS
from mmjax.experiment import ExperimentConfig, TrainConfig, validate
from mmjax.layers import TransformerConfig
from mmjax.models.autoencoder import AutoencoderConfig
from mmjax.models.lm import LMConfig
from mmjax.models.quantizer import QuantizerConfig
from mmjax.tasks.autoencoder import AutoencoderLossConfig
from mmjax.tasks.vq_ar import ImageTextVocab, VQARLossConfig, VQARTask
from mmjax.train.optim import OptimConfig

SIZE = 8  # 8-px scenes, f = 2: a 4×4 code grid
CODES = 16
LC = 48  # caption slots (data.max_text_len)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory, small_shapes):
    return small_shapes(tmp_path_factory.mktemp("shapes_vq_ar"), {"train": 96, "test": 24, "test_novel": 8})


@pytest.fixture(scope="module")
def tokenizer_run(shapes_dir, tmp_path_factory):
    """A tiny VQ tokenizer, trained for a few steps (its codes need only be a function of the image)."""
    from mmjax.train.loop import train
    workdir = tmp_path_factory.mktemp("vq_tok")
    cfg = validate(ExperimentConfig(
        name="vq_tok", task="autoencoder",
        model=AutoencoderConfig(kind="vq", channels=8, channel_mults=(1, 2), blocks_per_level=1, norm_groups=1,
                                latent_channels=4, image_size=SIZE, mid_attention=False,
                                quantizer=QuantizerConfig(codebook_size=CODES, code_dim=4, l2_normalize=True)),
        loss=AutoencoderLossConfig(probe=False, eval_lpips=False),
        data=DataConfig(name="shapes", data_dir=shapes_dir, image_size=SIZE, value_range="symmetric"),
        optim=OptimConfig(name="adamw", peak_lr=3e-3, warmup_steps=2, schedule="constant"),
        train=TrainConfig(steps=10, batch_size=16, eval_batch_size=24, log_every=10, eval_every=0,
                          checkpoint_every=10, progress=False),
        mesh=shd.MeshConfig(shape=(-1, 1, 1))))
    train(cfg, workdir)
    return str(workdir)


def _config(data_dir, tok_dir, **loss):
    return validate(ExperimentConfig(
        name="vq_ar_test", task="vq_ar",
        # both orders place text up to position 2·Lc + 2 + 4 (the image block after the caption slots)
        model=LMConfig(vocab_size=512, max_len=2 * LC + 7, rope_2d=True, zero_init_head=True,
                       learned_positions=True,
                       encoder=TransformerConfig(width=32, depth=2, num_heads=2, mlp_dim=64, activation="swiglu",
                                                 norm="rmsnorm", use_bias=False, rope_base=10000.0)),
        loss=VQARLossConfig(**{"tokenizer_workdir": tok_dir, "cfg_scale": 2.0, "eval_prompts": 0, "samples": 4,
                               **loss}),
        data=DataConfig(name="shapes", data_dir=data_dir, image_size=SIZE, value_range="symmetric",
                        text_field="caption", tokenizer="bpe:shapes:512", max_text_len=LC, text_add_bos=False,
                        text_add_eos=False, extra_fields=LABEL_FIELDS),
        optim=OptimConfig(name="adamw", peak_lr=3e-3, warmup_steps=5, schedule="cosine"),
        train=TrainConfig(steps=80, batch_size=16, eval_batch_size=24, log_every=40, checkpoint_every=80,
                          progress=False, seed=0),
        mesh=shd.MeshConfig(shape=(-1, 1, 1))))


@pytest.fixture(scope="module")
def task(shapes_dir, tokenizer_run):
    return VQARTask(_config(shapes_dir, tokenizer_run))


def _unbox(params):
    return jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params, is_leaf=lambda x: hasattr(x, "value"))


def test_vocabulary_layout():
    v = ImageTextVocab(text_size=10, codebook_size=4)
    assert (v.boi, v.eoi, v.null, v.code_offset, v.size, v.code_range) == (10, 11, 12, 13, 17, (13, 17))
    c = ImageTextVocab(text_size=0, codebook_size=4, num_classes=3)  # class-conditional: classes after the codes
    assert (c.boi, c.null, c.code_range, c.class_offset, c.size) == (0, 2, (3, 7), 7, 10)


def test_sequence_layout_by_hand(task):
    lc = task.cond_len
    v = task.vocab
    text = np.zeros((2, lc), np.int32)
    text[0, :3] = [5, 6, 7]
    text[1, :2] = [8, 9]
    codes = np.arange(2 * CODES).reshape(2, 4, 4) % CODES
    seq, valid, weights = jax.device_get(task.sequences(text, np.array([3, 2]), codes, np.array([False, True])))
    # row 0: the caption right-aligned before BOI, pads hidden; row 1: dropped to [NULL] before BOI
    np.testing.assert_array_equal(seq[0, lc - 3: lc + 1], [5, 6, 7, v.boi])
    assert not valid[0, : lc - 3].any() and valid[0, lc - 3:].all()
    np.testing.assert_array_equal(seq[1, lc - 1: lc + 1], [v.null, v.boi])
    assert not valid[1, : lc - 1].any() and valid[1, lc - 1:].all()
    np.testing.assert_array_equal(seq[:, lc + 1:], codes.reshape(2, -1) + v.code_offset)
    np.testing.assert_array_equal(weights, np.broadcast_to(np.arange(lc + 1 + CODES) > lc, weights.shape))
    pos = task.positions()
    np.testing.assert_array_equal(pos[lc], [lc, lc])              # BOI on the diagonal after the caption
    np.testing.assert_array_equal(pos[lc + 1 + 6], [lc + 2, lc + 3])  # code 6 = row 1, column 2


def test_loss_is_the_code_cross_entropy_by_hand(task):
    params = _unbox(task.init_params(jax.random.PRNGKey(0)))
    params = jax.tree.map(lambda x: x + 0.05 * np.random.default_rng(0).standard_normal(x.shape, np.float32)
                          if x.ndim == 2 else x, params)  # the zero head would make every logit equal
    extra = task.init_extra(params)
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (3, SIZE, SIZE, 3)).astype(np.float32)
    text = np.zeros((3, LC), np.int32)
    text[:, :4] = rng.integers(0, 100, (3, 4))
    lens = np.array([4, 2, 3], np.int32)
    batch = {"image": images, "text_ids": text, "text_len": lens, "mask": np.array([1, 1, 0], np.int32)}
    sums = jax.device_get(task.eval_fn(params, extra, batch))
    # by hand: the tokenizer's codes, [pads | caption | BOI | codes] with the pads hidden, log-softmax
    # of the model's logits at the code targets only, over the two real rows
    codes = np.asarray(task.tokenize(extra["tokenizer"], images)).reshape(3, -1)
    total = 0.0
    for b in range(2):
        cap = text[b, : lens[b]]
        seq = np.concatenate([cap, [task.vocab.boi], codes[b] + task.vocab.code_offset])
        pos = task.positions()[LC - lens[b]:]
        logits = np.asarray(task.model.apply({"params": params}, seq[None, :-1], positions=pos[None, :-1])[0][0],
                            np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        total -= sum(logp[lens[b] + i, seq[lens[b] + 1 + i]] for i in range(CODES))
    assert sums["tokens"] == 2 * CODES and sums["count"] == 2
    assert sums["nll"] == pytest.approx(total, rel=1e-4)
    out = task.summarize_eval({k: float(v) for k, v in sums.items()})
    assert out["bits_per_dim"] == pytest.approx(total / 2 / (3 * SIZE * SIZE * math.log(2)), rel=1e-4)


def test_config_errors_name_the_problem(shapes_dir, tokenizer_run, tmp_path):
    cfg = _config(shapes_dir, tokenizer_run)
    with pytest.raises(ConfigError, match="not a run directory|no config.json"):
        VQARTask(dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, tokenizer_workdir=str(tmp_path))))
    with pytest.raises(ConfigError, match="rope_2d=True"):
        VQARTask(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, rope_2d=False)))
    with pytest.raises(ConfigError, match="needs loss.cond_dropout > 0"):
        VQARTask(dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, cond_dropout=0.0)))
    with pytest.raises(ConfigError, match=r"image_size=16.*must be the tokenizer's \(8"):
        VQARTask(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=16)))
    with pytest.raises(ConfigError, match="model.vocab_size=256 is below"):
        VQARTask(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=256)))
    with pytest.raises(ConfigError, match="untied head"):
        LMConfig(tie_embeddings=True, zero_init_head=True)


BOTH = ("caption_to_image", "image_to_caption")


def test_image_first_layout_and_caption_loss_by_hand(shapes_dir, tokenizer_run):
    task = VQARTask(_config(shapes_dir, tokenizer_run, directions=BOTH))
    v, lc, eos = task.vocab, task.cond_len, task.tokenizer.eos_id
    assert task.seq_len == lc + CODES + 3
    text = np.zeros((2, lc), np.int32)
    text[0, :3] = [5, 6, 7]
    text[1, :1] = [8]
    codes = (np.arange(2 * CODES).reshape(2, 4, 4) * 3) % CODES
    seq, valid, w = jax.device_get(task.image_first_sequences(text, np.array([3, 1]), codes))
    want = [v.boi, *(codes[0].ravel() + v.code_offset), v.eoi, 5, 6, 7, eos]
    np.testing.assert_array_equal(seq[0, : CODES + 6], want)
    np.testing.assert_array_equal(seq[1, CODES + 1: CODES + 4], [v.eoi, 8, eos])
    assert valid.all()
    # targets: the caption and EOS only (all_tokens off)
    np.testing.assert_array_equal(np.nonzero(w[0])[0], np.arange(CODES + 2, CODES + 6))
    np.testing.assert_array_equal(np.nonzero(w[1])[0], [CODES + 2, CODES + 3])
    # caption-first sequences of this run end with EOI (a target) and one pad
    seq2, valid2, w2 = jax.device_get(task.sequences(text, np.array([3, 1]), codes, np.array([False, False])))
    assert (seq2[:, lc + 1 + CODES] == v.eoi).all() and not valid2[:, -1].any()
    np.testing.assert_array_equal(np.nonzero(w2[0])[0], np.arange(lc + 1, lc + CODES + 2))
    pos = task.positions("image_to_caption")
    np.testing.assert_array_equal(pos[[0, 1, CODES, CODES + 1, CODES + 2]] - lc,
                                  [[0, 0], [1, 1], [4, 4], [5, 5], [6, 6]])
    # the image block (BOI, the 4×4 grid, EOI) sits where it does after a caption: one cell, one embedding
    np.testing.assert_array_equal(pos[: CODES + 2], task.positions("caption_to_image")[lc: lc + CODES + 2])
    assert pos.max() == 2 * lc + 6 < task.cfg.model.max_len
    with pytest.raises(ConfigError, match=r"max_len=100 is too small .* up to position 102 \(set max_len >= 103\)"):
        VQARTask(dataclasses.replace(task.cfg, model=dataclasses.replace(task.cfg.model, max_len=100)))
    # the image → caption NLL by hand: log-softmax at the caption + EOS targets of a real row
    params = _unbox(task.init_params(jax.random.PRNGKey(0)))
    params = jax.tree.map(lambda x: x + 0.05 * np.random.default_rng(0).standard_normal(x.shape, np.float32)
                          if x.ndim == 2 else x, params)
    extra = task.init_extra(params)
    images = np.random.default_rng(2).uniform(-1, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    batch = {"image": images, "text_ids": text[:1], "text_len": np.array([3]), "mask": np.ones(1, np.int32)}
    sums = jax.device_get(task.eval_fn(params, extra, batch))
    c = np.asarray(task.tokenize(extra["tokenizer"], images)).ravel()
    seq = np.array([v.boi, *(c + v.code_offset), v.eoi, 5, 6, 7, eos])
    logits = np.asarray(task.model.apply({"params": params}, seq[None, :-1], positions=pos[None, : len(seq) - 1])[0][0],
                        np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -sum(logp[t, seq[t + 1]] for t in range(CODES + 1, CODES + 5))
    assert sums["text_tokens"] == 4 and sums["text_nll"] == pytest.approx(nll, rel=1e-4)


def test_caption_rate_sets_the_share_of_image_first_examples(shapes_dir, tokenizer_run):
    cfg = _config(shapes_dir, tokenizer_run, directions=BOTH)
    for bad in (0.0, 1.0):
        with pytest.raises(ConfigError, match=f"caption_rate={bad} must lie in"):
            VQARTask(dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, caption_rate=bad)))
    images = np.random.default_rng(4).uniform(-1, 1, (64, SIZE, SIZE, 3)).astype(np.float32)
    text = np.zeros((64, LC), np.int32)
    text[:, :2] = [5, 6]
    batch = {"image": images, "text_ids": text, "text_len": np.full(64, 2)}
    tokens = {}
    for rate in (0.1, 0.5, 0.9):
        task = VQARTask(dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, caption_rate=rate)))
        params = _unbox(task.init_params(jax.random.PRNGKey(0)))
        s = task._token_sums(params, batch, direction="mixed", train=False, rng=jax.random.PRNGKey(7),
                             extra=task.init_extra(params), drop=np.zeros(64, bool))
        tokens[rate] = float(s["weight_sum"])
    # an image-first row supervises its 2 caption ids + EOS (3), a caption-first row 16 codes + EOI (17)
    share = {r: (17 * 64 - t) / (14 * 64) for r, t in tokens.items()}
    assert share[0.1] < 0.25 and 0.3 < share[0.5] < 0.7 and share[0.9] > 0.75, share


def test_reading_order_targets_teach_image_to_caption_and_leave_the_condition(shapes_dir, tokenizer_run):
    from mmjax.data import shapes
    from mmjax.data.vlm import labels_of
    cfg = _config(shapes_dir, tokenizer_run, directions=BOTH, caption_targets="reading_order")
    with pytest.raises(ConfigError, match="caption_targets='fancy' must be one of"):
        VQARTask(dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, caption_targets="fancy")))
    with pytest.raises(ConfigError, match=r"needs 'image_to_caption' .* \(missing \['num_objects'"):
        VQARTask(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, extra_fields=())))
    with pytest.raises(ConfigError, match="needs 'image_to_caption' in loss.directions"):
        VQARTask(dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, directions=("caption_to_image",))))
    task = VQARTask(cfg)
    batch = next(iter(task.train_iterator(global_batch_size=8, seed=0)))
    tok = task.tokenizer
    for i in range(8):   # the target is the scene's reading-order caption, the condition its own caption
        scene = shapes.Scene(labels_of({k: batch[k][i] for k in LABEL_FIELDS}), 0)
        assert tok.decode(batch["target_ids"][i][: batch["target_len"][i]]) == shapes.reading_order_caption(scene)
        assert shapes.parse_caption(tok.decode(batch["text_ids"][i][: batch["text_len"][i]])) == scene.objects
    # image → caption supervises the target's ids + EOS; caption → image still reads text_ids
    params = _unbox(task.init_params(jax.random.PRNGKey(0)))
    extra = task.init_extra(params)
    text, target = np.zeros((1, LC), np.int32), np.zeros((1, LC), np.int32)
    text[0, :3], target[0, :5] = [5, 6, 7], [9, 10, 11, 12, 13]
    images = np.random.default_rng(2).uniform(-1, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    b = {"image": images, "text_ids": text, "text_len": np.array([3]), "target_ids": target,
         "target_len": np.array([5]), "mask": np.ones(1, np.int32)}
    sums = jax.device_get(task.eval_fn(params, extra, b))
    plain = VQARTask(dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, caption_targets="dataset")))
    want = jax.device_get(plain.eval_fn(params, extra, {**b, "text_ids": target, "text_len": np.array([5])}))
    assert sums["text_tokens"] == 6 and sums["text_nll"] == pytest.approx(float(want["text_nll"]), rel=1e-6)
    dataset = jax.device_get(plain.eval_fn(params, extra, b))
    assert dataset["text_tokens"] == 4 and sums["nll"] == pytest.approx(float(dataset["nll"]), rel=1e-6)


def test_image_prefix_reads_the_image_both_ways_in_training_and_captioning(shapes_dir, tokenizer_run):
    cfg = _config(shapes_dir, tokenizer_run, directions=BOTH, image_prefix=True)
    task = VQARTask(cfg)
    with pytest.raises(ConfigError, match="image_prefix .* loss.all_tokens=False"):
        VQARTask(dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, all_tokens=True)))
    with pytest.raises(ConfigError, match="image_prefix .* needs 'image_to_caption'"):
        VQARTask(dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, directions=BOTH[:1])))
    v, eos, n = task.vocab, task.tokenizer.eos_id, CODES + 2
    assert task.image_prefix_len == n
    params = _unbox(task.init_params(jax.random.PRNGKey(1)))
    params = jax.tree.map(lambda x: x + 0.3 * np.random.default_rng(1).standard_normal(x.shape, np.float32)
                          if x.ndim == 2 else x, params)
    extra = task.init_extra(params)
    images = np.random.default_rng(3).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    c = np.asarray(task.tokenize(extra["tokenizer"], images)).reshape(2, -1)
    pos = task.positions("image_to_caption")

    t_max = n + LC + 1  # the image block, a caption and EOS
    fwd = jax.jit(lambda seq, prefix: task.model.apply({"params": params}, seq, positions=pos[None, :t_max],
                                                       prefix_len=prefix)[0])

    def logits(seq, prefix=n):  # one compiled forward: trailing pads cannot reach earlier slots (causal text)
        padded = np.zeros((1, t_max), np.int32)
        padded[0, : len(seq)] = seq
        return np.asarray(fwd(padded, np.array([prefix], np.int32))[0, : len(seq)], np.float64)
    # the codes see the codes after them: BOI's output moves when the last code changes (not when causal)
    seq = np.array([v.boi, *(c[0] + v.code_offset), v.eoi, 5, 6, 7], np.int32)
    other = seq.copy()
    other[n - 2] = v.code_offset + (c[0, -1] + 1) % CODES
    assert np.abs(logits(seq)[0] - logits(other)[0]).max() > 1e-4
    np.testing.assert_array_equal(logits(seq, 0)[0], logits(other, 0)[0])
    # text still reads causally: a caption token's output ignores the tokens after it
    np.testing.assert_allclose(logits(seq)[n], logits(np.concatenate([seq[:n + 1], [9, 9]]).astype(np.int32))[n],
                               atol=1e-5)
    # the eval's image → caption NLL is the prefix model's, by hand from those logits
    batch = {"image": images[:1], "text_ids": np.pad([[5, 6, 7]], ((0, 0), (0, LC - 3))).astype(np.int32),
             "text_len": np.array([3]), "mask": np.ones(1, np.int32)}
    full = np.array([*seq, eos], np.int32)
    lg = logits(full[:-1])
    logp = lg - lg.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -sum(logp[t, full[t + 1]] for t in range(n - 1, n + 3))
    sums = jax.device_get(task.eval_fn(params, extra, batch))
    assert sums["text_tokens"] == 4 and sums["text_nll"] == pytest.approx(nll, rel=1e-4)
    # captioning prefills with the same prefix: its greedy tokens are the argmax of full forwards
    got = task.caption_images(params, images, tok_params=extra["tokenizer"])
    never = {i for i in (task.tokenizer.bos_id, task.tokenizer.pad_id) if i is not None and i != eos}
    for row in range(2):
        s = [v.boi, *(c[row] + v.code_offset), v.eoi]
        for _ in range(LC + 1):
            lg = logits(np.array(s, np.int32))[-1][: v.text_size].copy()
            lg[list(never)] = -np.inf
            s.append(int(lg.argmax()))
            if s[-1] == eos:
                break
        assert got[row] == task.tokenizer.decode(s[n:])


@pytest.fixture(scope="module")
def run(shapes_dir, tokenizer_run, tmp_path_factory):
    """One tiny model trained both ways (caption → image and image → caption)."""
    from mmjax.train.loop import train
    workdir = tmp_path_factory.mktemp("vq_ar_run")
    cfg = _config(shapes_dir, tokenizer_run, directions=BOTH, eval_prompts=8, probe=False)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, peak_lr=1e-2),
                              train=dataclasses.replace(cfg.train, steps=120, checkpoint_every=120))
    return cfg, workdir, train(cfg, workdir)


def test_a_run_learns_both_ways_and_the_sample_command_draws_a_caption(run, tmp_path, capsys):
    # One test for the one run: under pytest-xdist every test of a module fixture may rebuild it.
    from PIL import Image

    from mmjax.cli import main
    from mmjax.experiment import load_run
    cfg, workdir, results = run
    ev = results["eval"]
    task = VQARTask(cfg)
    _, _, params = load_run(workdir)
    # A model that knows only how often each code occurs (fitted on these very test codes) scores
    # their entropy; the AR model must do better, from the caption and the codes before.
    _, real, _, _ = task.prompt_set("test", 24)
    counts = np.bincount(np.asarray(task.tokenize(task.ae_params, real)).ravel(), minlength=CODES)
    q = counts[counts > 0] / counts.sum()
    entropy = float(-(q * np.log(q)).sum())
    assert ev["nll_per_code"] < entropy - 0.1, (ev, entropy)
    assert (workdir / "images" / f"samples_{cfg.train.steps:06d}.png").is_file()
    assert len((workdir / "images" / f"samples_{cfg.train.steps:06d}.txt").read_text().splitlines()) == 4
    ids, _, _, _ = task.prompt_set("test", 3)
    key = jax.random.PRNGKey(3)
    guided = task.sample_codes(params, ids, rng=key, cfg_scale=4.0)
    assert guided.shape == (3, 4, 4) and guided.min() >= 0 and guided.max() < CODES  # codes only
    # scale 1 is the conditional model: the same draws as unguided sampling with the same key
    np.testing.assert_array_equal(task.sample_codes(params, ids, rng=key, cfg_scale=1.0),
                                  task.sample_codes(params, ids, rng=key))
    # guided greedy decoding with grid positions on a (2, 2, 2) mesh of 8 devices = one device
    mesh = shd.make_mesh(shd.MeshConfig(shape=(2, 2, 2)))
    greedy = task.sample_codes(params, ids, rng=key, cfg_scale=2.0, temperature=0.0)
    assert len(np.unique(greedy)) > 1  # not one code everywhere: the comparison can fail
    np.testing.assert_array_equal(task.sample_codes(params, ids, rng=key, cfg_scale=2.0, temperature=0.0, mesh=mesh),
                                  greedy)
    images = task.sample(params, ["a red circle at the top left"], rng=key, cfg_scale=2.0)
    assert images.shape == (1, SIZE, SIZE, 3) and np.abs(images).max() <= 1.0
    # the other way: captions from images, text ids only
    assert ev["caption_nll"] < 0.6 * math.log(task.vocab.text_size), ev
    captions = task.caption_images(params, real[:2])
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions)
    assert ev["captions/examples"] == 8 and 0.0 <= ev["captions/parsed"] <= 1.0
    assert ev["nocfg/codes_used"] <= CODES and "cfg/seconds_per_image" in ev
    out = tmp_path / "grid.png"
    assert main(["sample", "--workdir", str(workdir), "--prompt", "a small red circle at the top left",
                 "--num", "3", "--out", str(out), "--cfg-scale", "2"]) == 0
    with Image.open(out) as im:
        assert im.size[1] >= SIZE and im.size[0] >= 3 * SIZE
    assert main(["sample", "--workdir", str(workdir), "--num", "2", "--out", str(out)]) == 2
    assert "give --prompt" in capsys.readouterr().err


def test_caption_command_reproduces_the_runs_eval_and_splits_position_by_objects(run, tokenizer_run, tmp_path,
                                                                                  capsys):
    from mmjax.data.vlm import CAPTION_ATTRIBUTES
    from mmjax.evals.captions import main
    cfg, workdir, results = run
    ev = results["eval"]
    path = tmp_path / "captions.json"
    assert main([str(workdir), "--num", "8", "--json", str(path)]) == 0
    out = json.loads(path.read_text())
    assert out == json.loads(capsys.readouterr().out) and out["examples"] == 8 and out["split"] == "test"
    # the same 8 test scenes the training run's own evaluation captioned, with the same weights
    for k in CAPTION_ATTRIBUTES + ("count", "scene", "parsed"):
        assert out[k] == pytest.approx(ev[f"captions/{k}"]), k
    # position by object count: its object-weighted mean is the overall position
    _, _, labels, _ = VQARTask(cfg).prompt_set("test", 8)
    n = np.bincount(labels["num_objects"])
    ks = np.nonzero(n)[0]
    assert sorted(f"position_{k}_objects" for k in ks) == sorted(x for x in out if x.startswith("position_"))
    assert sum(n[k] * k * out[f"position_{k}_objects"] for k in ks) / (n * np.arange(len(n))).sum() == \
        pytest.approx(out["position"])
    assert main([tokenizer_run]) == 2
    assert "does not caption images (task 'autoencoder')" in capsys.readouterr().err


def test_generator_comparison_rows_metrics_and_refusals(run, tokenizer_run, tmp_path, capsys):
    """`python -m mmjax.evals.generators` on the tiny run: the real row, the null condition, the
    first test captions without and with CFG, each drawn as the task draws them, scored by a probe;
    a VQ tokenizer (no prior) is refused before any probe is trained."""
    from mmjax.evals import generators as G
    from mmjax.evals.probe import ProbeConfig
    from mmjax.experiment import load_run
    cfg, workdir, results = run
    num = 6
    rows = G.compare([str(workdir)], num, seed=5, probe_config=ProbeConfig(steps=10, batch_size=16, warmup_steps=2),
                     log=None)
    assert [(r.family, r.mode) for r in rows] == [("real", f"{num} other test images"), ("unified LM", "NULL"),
                                                   ("unified LM", "caption"), ("unified LM", "caption, CFG 2")]
    task = VQARTask(cfg)
    _, _, params = load_run(workdir)
    ids, real, labels, _ = task.prompt_set("test", 2 * num)
    key = jax.random.PRNGKey(5)
    np.testing.assert_array_equal(rows[0].images, real[num:])  # the next num test images
    np.testing.assert_allclose(rows[1].images, task.decode_codes(task.sample_codes(params, [[task.vocab.null]] * num,
                                                                                   rng=key)), atol=1e-6)
    np.testing.assert_allclose(rows[3].images, task.decode_codes(task.sample_codes(params, ids[:num], rng=key,
                                                                                   cfg_scale=2.0)), atol=1e-6)
    for k in labels:
        np.testing.assert_array_equal(rows[2].labels[k], labels[k][:num])  # prompted with the first num scenes
    for r in rows:
        assert r.images.shape == (num, SIZE, SIZE, 3) and np.abs(r.images).max() <= 1.0
        assert r.metrics["fd_probe"] >= 0.0 and np.isfinite(r.metrics["kid_probe"])
        conditional = r.mode.startswith("caption")
        assert all((f"probe_{k}" in r.metrics) == conditional for k in G.ATTRIBUTES), r.metrics
        assert (r.seconds_per_image is None) == (r.family == "real")
        assert r.bits_per_dim == (None if r.family == "real" else results["eval"]["bits_per_dim"])
    text = G.table(rows)
    assert len(text.splitlines()) == 2 + len(rows) and "| unified LM |" in text and "| — |" in text
    # refusals name the problem, before the probe
    with pytest.raises(ValueError, match="no prior to sample"):
        G.compare([str(workdir), tokenizer_run], num)
    assert G.main([str(workdir), "--num", "40"]) == 2
    assert "needs at least 42" in capsys.readouterr().err


def _class_config(data_dir, tok_dir, **loss):
    cfg = _config(data_dir, tok_dir, class_field="num_objects", num_classes=4, probe=False, **loss)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, text_field=None))


def test_class_conditional_layout_errors_run_and_sample_command(shapes_dir, tokenizer_run, tmp_path, capsys):
    """LlamaGen's class-conditional model: [CLASS_k | BOI | codes], the same loop, CFG and `mmjax sample --class`."""
    from mmjax.cli import main
    from mmjax.experiment import load_run
    from mmjax.train.loop import train
    cfg = _class_config(shapes_dir, tokenizer_run)
    task = VQARTask(cfg)
    v = task.vocab
    assert (task.cond_len, task.seq_len, v.text_size, v.class_offset) == (1, 2 + CODES, 0, 3 + CODES)
    ids, lens = jax.device_get(task.condition({"num_objects": np.array([3, 1])}))
    np.testing.assert_array_equal(ids, [[v.class_offset + 3], [v.class_offset + 1]])
    codes = np.arange(2 * CODES).reshape(2, 4, 4) % CODES
    seq, valid, w = jax.device_get(task.sequences(ids, lens, codes, np.array([False, True])))
    np.testing.assert_array_equal(seq[:, :2], [[v.class_offset + 3, v.boi], [v.null, v.boi]])
    np.testing.assert_array_equal(seq[:, 2:], codes.reshape(2, -1) + v.code_offset)
    assert valid.all() and (w[:, 2:] == 1).all() and (w[:, :2] == 0).all()
    with pytest.raises(ValueError, match=r"'num_objects' holds classes outside \[0, 4\).*max 7"):
        task.check_batch({"image": np.zeros((2, SIZE, SIZE, 3), np.float32),
                          "num_objects": np.array([1, 7], np.int32)}, 5)
    with pytest.raises(ValueError, match=r"classes \[4\] are outside \[0, 4\)"):
        task.condition_ids([1, 4])
    for bad in ({"num_classes": 0}, {"class_field": "label"}):
        with pytest.raises(ConfigError, match="makes the run class-conditional"):
            VQARTask(dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, **bad)))
    with pytest.raises(ConfigError, match="leave data.text_field None"):
        VQARTask(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, text_field="caption")))
    # a short run learns codes below their own entropy and draws each class on request
    workdir = tmp_path / "run"
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, peak_lr=1e-2),
                              train=dataclasses.replace(cfg.train, steps=60, checkpoint_every=60))
    ev = train(cfg, workdir)["eval"]
    _, real, labels, texts = task.prompt_set("test", 24)
    assert texts[0] == f"num_objects {labels['num_objects'][0]}"
    counts = np.bincount(np.asarray(task.tokenize(task.ae_params, real)).ravel(), minlength=CODES)
    q = counts[counts > 0] / counts.sum()
    assert ev["nll_per_code"] < float(-(q * np.log(q)).sum()) - 0.1, ev
    _, _, params = load_run(workdir)
    images = task.sample(params, [1, 3], rng=jax.random.PRNGKey(0), cfg_scale=2.0)
    assert images.shape == (2, SIZE, SIZE, 3)
    out = tmp_path / "grid.png"
    assert main(["sample", "--workdir", str(workdir), "--class", "2", "--num", "2", "--out", str(out)]) == 0
    assert out.is_file()
    assert main(["sample", "--workdir", str(workdir), "--prompt", "a red circle", "--out", str(out)]) == 2
    assert "give --class K" in capsys.readouterr().err
    assert main(["sample", "--workdir", str(workdir), "--class", "9", "--out", str(out)]) == 2
    assert "outside [0, 4)" in capsys.readouterr().err
