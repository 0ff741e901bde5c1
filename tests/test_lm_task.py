"""The LM task: trained through the real loop on (test-sized) shapes captions; the loss mask,
held-out perplexity and the unigram reference against independent numpy computations; bad input."""

import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data import registry
from mmjax.data.config import DataConfig
from mmjax.experiment import ExperimentConfig, TrainConfig
from mmjax.layers import TransformerConfig
from mmjax.models.lm import LMConfig
from mmjax.tasks.lm import LMLossConfig, LMTask, unigram_reference
from mmjax.train.optim import OptimConfig

TOKENIZER = "bpe:shapes:512"
MAX_LEN = 48
VOCAB = 512
STEPS = 30
PROMPTS = ("", "a red")


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory, small_shapes):
    return small_shapes(tmp_path_factory.mktemp("tfds_shapes"), {"train": 400, "test": 50, "test_novel": 10})


def _config(data_dir, **loss) -> ExperimentConfig:
    return ExperimentConfig(
        name="lm_test",
        task="lm",
        model=LMConfig(vocab_size=VOCAB,
                       encoder=TransformerConfig(width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                                                 activation="swiglu", norm="rmsnorm", use_bias=False,
                                                 rope_base=10000.0)),
        loss=LMLossConfig(sample_prompts=PROMPTS, samples_per_prompt=2, **loss),
        data=DataConfig(name="shapes", data_dir=data_dir, text_field="caption", tokenizer=TOKENIZER,
                        max_text_len=MAX_LEN, text_add_bos=True, text_add_eos=True),
        optim=OptimConfig(peak_lr=3e-3, warmup_steps=5, weight_decay=0.0),
        train=TrainConfig(steps=STEPS, batch_size=16, eval_batch_size=32, log_every=5, eval_every=STEPS // 2,
                          checkpoint_every=0, progress=True, peak_flops_per_device=1e11),
    )


@pytest.fixture(scope="module")
def run(shapes_dir, tmp_path_factory):
    """One short training run through the real loop (shared by the tests below), with the progress
    bar on: its eval line must cope with the text results (samples)."""
    from mmjax.train.loop import train
    workdir = tmp_path_factory.mktemp("lm_run")
    cfg = _config(shapes_dir, unigram_reference=True)
    results = train(cfg, workdir)
    return cfg, workdir, results


def _unboxed_params(task, seed):
    return nn.meta.unbox(task.init_params(jax.random.PRNGKey(seed)))


def _np_lse(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1)
    return m + np.log(np.exp(z - m[..., None]).sum(-1))


def _forward(model):
    return jax.jit(lambda params, ids: model.apply({"params": params}, ids)[0])


# ------------------------------------------------------------------------------------ training run

def test_loss_falls_from_log_vocab(run):
    cfg, workdir, _ = run
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    assert len(losses) == STEPS // cfg.train.log_every
    # Untrained: near-uniform predictions over the vocabulary, so the loss starts near log V.
    assert abs(losses[0] - math.log(VOCAB)) < 0.6, losses
    assert losses[-1] < losses[0] - 1.5, losses


def test_results_hold_perplexity_samples_and_unigram(run):
    cfg, workdir, results = run
    saved = json.loads((workdir / "results.json").read_text())
    ev = saved["eval"]
    assert ev == json.loads(json.dumps(results["eval"]))
    assert ev["count"] == 50
    assert ev["perplexity"] == pytest.approx(math.exp(ev["loss"]), rel=1e-6)
    assert 1.0 < ev["perplexity"] < VOCAB
    assert ev["unigram_perplexity"] > ev["unigram_perplexity_oracle"] > 1.0
    assert ev["samples/prompts"] == list(PROMPTS)
    assert len(ev["samples/greedy"]) == len(PROMPTS)
    assert len(ev["samples/sampled"]) == 2 * len(PROMPTS)
    for text in ev["samples/greedy"] + ev["samples/sampled"]:
        assert isinstance(text, str)
    evals = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if "eval/loss" in x]
    assert [e["step"] for e in evals] == [STEPS // 2, STEPS]
    assert evals[-1]["eval/samples/greedy"] == ev["samples/greedy"]
    assert evals[0]["eval/perplexity"] > evals[-1]["eval/perplexity"]
    # Samples are decoded prompt + continuation: the "a red" rows start with the prompt.
    assert ev["samples/greedy"][1].startswith("a red")
    assert all(t.startswith("a red") for t in ev["samples/sampled"][2:])


def test_heldout_perplexity_matches_rowwise_numpy(run, shapes_dir, read_params):
    """The padded, masked eval sums equal a per-caption computation: each test caption tokenised on
    its own, its tokens picked by slicing (after junk ids, not padding, fill the rest of the row:
    causal attention keeps them out of the real positions), log-softmax in float64."""
    from mmjax.data.pipeline import tokenizer_for
    cfg, workdir, results = run
    task = LMTask(cfg)
    params = jax.tree.unflatten(jax.tree.structure(_unboxed_params(task, 0)), read_params(workdir, STEPS))
    tok = tokenizer_for(cfg.data)
    source = registry.open_split("shapes", "test", shapes_dir)
    rows = [np.asarray(tok.encode(source[i]["caption"], add_bos=True, add_eos=True)[:MAX_LEN])
            for i in range(len(source))]
    batch = np.random.RandomState(0).randint(3, tok.vocab_size, size=(len(rows), MAX_LEN - 1)).astype(np.int32)
    for i, r in enumerate(rows):
        batch[i, :len(r) - 1] = r[:-1]
    logits = np.asarray(_forward(task.model)(params, jnp.asarray(batch)), np.float64)
    nll, correct, tokens = 0.0, 0, 0
    for i, r in enumerate(rows):
        z = logits[i, :len(r) - 1]
        nll += (_np_lse(z) - z[np.arange(len(r) - 1), r[1:]]).sum()
        correct += int((z.argmax(-1) == r[1:]).sum())
        tokens += len(r) - 1
    ev = results["eval"]
    assert ev["tokens"] == tokens
    assert ev["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert ev["accuracy"] == pytest.approx(correct / tokens, abs=1.5 / tokens)


# ------------------------------------------------------------------------------------ loss mask

def test_loss_mask_ignores_padding(shapes_dir):
    """A padded batch's loss = Σ over rows of each row's (nll + c·logsumexp²) computed unpadded, on
    its own, in float64, divided by the real target tokens: whatever ids sit in the padding."""
    c = 0.01
    task = LMTask(_config(shapes_dir, z_loss=c))
    params = _unboxed_params(task, 1)
    fwd = _forward(task.model)
    rs = np.random.RandomState(0)
    lengths = np.array([MAX_LEN, 5, 17, 2], np.int32)
    rows = [np.concatenate([[1], rs.randint(3, 400, size=n - 2), [2]]).astype(np.int32) for n in lengths]
    nll, zl, tokens = 0.0, 0.0, 0
    for r in rows:
        z = np.asarray(fwd(params, jnp.asarray(r[None, :-1]))[0], np.float64)
        lse = _np_lse(z)
        nll += (lse - z[np.arange(len(r) - 1), r[1:]]).sum()
        zl += c * (lse**2).sum()
        tokens += len(r) - 1
    loss_fn = jax.jit(task.loss_fn)
    for fill in ("pad", "junk"):  # the pad id, then arbitrary real ids in the padding
        ids = np.zeros((len(rows), MAX_LEN), np.int32) if fill == "pad" else \
            rs.randint(3, 400, size=(len(rows), MAX_LEN)).astype(np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        loss, (metrics, _) = loss_fn(params, {}, {"text_ids": jnp.asarray(ids), "text_len": jnp.asarray(lengths)},
                                     jax.random.PRNGKey(0))
        assert float(metrics["tokens"]) == tokens
        np.testing.assert_allclose(float(metrics["nll"]), nll / tokens, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["z_loss"]), zl / tokens, rtol=1e-5)
        np.testing.assert_allclose(float(loss), (nll + zl) / tokens, rtol=1e-5)


def test_unigram_reference_matches_direct_count(shapes_dir):
    """Counted again here with the tokenizer's batch encoder (a different code path)."""
    from mmjax.data.pipeline import tokenizer_for
    data = _config(shapes_dir).data
    tok = tokenizer_for(data)

    def counts(split):
        src = registry.open_split("shapes", split, shapes_dir)
        ids, lengths = tok.encode_batch([src[i]["caption"] for i in range(len(src))], max_len=MAX_LEN,
                                        add_bos=True, add_eos=True)
        return np.concatenate([row[1:n] for row, n in zip(ids, lengths)])

    train, test = counts("train"), counts("test")
    v = tok.vocab_size
    log_p = {t: math.log((np.sum(train == t) + 1) / (len(train) + v)) for t in np.unique(test)}
    expected = math.exp(-sum(log_p[t] for t in test) / len(test))
    freq = {t: np.mean(test == t) for t in np.unique(test)}
    oracle = math.exp(-sum(math.log(freq[t]) for t in test) / len(test))
    got = unigram_reference(data)
    assert got["unigram_perplexity"] == pytest.approx(expected, rel=1e-9)
    assert got["unigram_perplexity_oracle"] == pytest.approx(oracle, rel=1e-9)


# ------------------------------------------------------------------------------------ bad input

def test_ids_out_of_vocab_are_refused(shapes_dir):
    task = LMTask(_config(shapes_dir))
    ids = np.zeros((2, MAX_LEN), np.int32)
    ids[0, :3] = [1, VOCAB, 2]
    with pytest.raises(ValueError, match=r"token ids outside \[0, 512\)"):
        task.check_batch({"text_ids": ids, "text_len": np.array([3, 1], np.int32)}, step=4)
    with pytest.raises(ValueError, match="text_len outside"):
        task.check_batch({"text_ids": np.zeros((2, MAX_LEN), np.int32),
                          "text_len": np.array([3, MAX_LEN + 1], np.int32)}, step=4)


def test_bad_configs_are_refused(shapes_dir):
    cfg = _config(shapes_dir)
    with pytest.raises(ValueError, match="vocab"):  # the tokenizer emits more ids than the model has
        LMTask(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=10)))
    with pytest.raises(ValueError, match="text_add_bos"):
        LMTask(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, text_add_bos=False)))
    with pytest.raises(ValueError, match="text_field"):
        LMTask(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, text_field=None)))
    with pytest.raises(ValueError, match="sample_top_p"):
        LMTask(dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, sample_top_p=0.0)))
