"""Tests for mmjax.data: the digits TFDS builder, the registry and the grain pipelines.

Golden values come from scikit-learn's own copy of the digits, never from our output. The datasets
are built once per module into a temporary data_dir, by subprocesses, so this process never imports
TensorFlow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from mmjax.data import pipeline, registry
from mmjax.data.config import DataConfig
from mmjax.data.transforms import resize_bilinear

REPO = Path(__file__).resolve().parents[1]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NUM_TRAIN, NUM_TEST = 1437, 360

# A dataset that mmjax does not know: built with TFDS directly, then read as "any prepared TFDS
# dataset". 4x4 RGB PNG images, so it also exercises TFDS's Image decoding; no `id`, no test split.
_TINY_BUILD = """
import sys
import numpy as np
import tensorflow_datasets as tfds

class MmjaxTiny(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("0.1.0")
    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(4, 4, 3)),
            "label": tfds.features.ClassLabel(num_classes=3)}))
    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}
    def _generate_examples(self):
        for i in range(10):
            image = ((np.arange(48) * 5 + i) % 256).astype(np.uint8).reshape(4, 4, 3)
            yield i, {"image": image, "label": i % 3}

MmjaxTiny(data_dir=sys.argv[1], file_format="array_record").download_and_prepare()
"""

# Prepares digits and reports whether this process generated the examples (i.e. built it).
_PREPARE = """
import json, sys
from mmjax.data import digits, registry
calls = []
generate = digits.DigitsBuilder._split_generators
digits.DigitsBuilder._split_generators = lambda self, dl: calls.append(1) or generate(self, dl)
out = registry.ensure_prepared("digits", sys.argv[1])
print(json.dumps({"data_dir": out, "built": bool(calls)}))
"""


def _python(script: str, workdir: Path, *args: str) -> subprocess.Popen:
    """Runs `script` in a fresh interpreter, from a file in `workdir` (TFDS wants a builder's
    module to have a file)."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", dir=workdir, delete=False) as f:
        f.write(textwrap.dedent(script))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, f.name, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, outputs: list | None = None) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    if outputs is not None:
        outputs.append(out + err)
    return out


# stdout + stderr of the process that built digits in `data_dir` (for the build-message test)
_BUILD_OUTPUT: list[str] = []


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """A data_dir with digits (prepared by two racing processes) and the non-built-in mmjax_tiny."""
    d = str(tmp_path_factory.mktemp("tfds"))
    scripts = tmp_path_factory.mktemp("scripts")
    procs = [_python(_PREPARE, scripts, d), _python(_PREPARE, scripts, d),
             _python(_TINY_BUILD, scripts, d)]
    outputs: list[str] = []
    reports = [json.loads(_finish(p, outputs).strip().splitlines()[-1]) for p in procs[:2]]
    _finish(procs[2])
    assert all(r["data_dir"] == d for r in reports)
    # The file lock lets exactly one racer build; the other finds the finished files.
    assert sorted(r["built"] for r in reports) == [False, True]
    assert not [p for p in Path(d, "digits").iterdir() if p.name.startswith("incomplete")]
    _BUILD_OUTPUT[:] = [out for out, r in zip(outputs, reports) if r["built"]]
    return d


@pytest.fixture(scope="module")
def sk():
    return load_digits()


def _cfg(data_dir, **kw) -> DataConfig:
    return DataConfig(data_dir=data_dir, **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(batches_a, batches_b) -> bool:
    return len(batches_a) == len(batches_b) and all(
        a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        for a, b in zip(batches_a, batches_b))


def _unit_pixels(sk, row) -> np.ndarray:
    """sklearn's 8x8 image `row` (0..16) as our pipeline should give it: round(v*255/16) / 255."""
    return np.round(sk.images[row] * 255 / 16) / 255


def _split_ids(data_dir, split) -> list[int]:
    source = registry.open_split("digits", split, data_dir)
    return sorted(int(source[i]["id"]) for i in range(len(source)))


def _train(data_dir, *, batch=64, seed=0, index=0, count=1, **kw):
    return pipeline.train_iterator(_cfg(data_dir, **kw), global_batch_size=batch, seed=seed,
                                   process_index=index, process_count=count)


# --- the digits dataset -------------------------------------------------------------------------


def test_digits_splits_match_sklearn(data_dir, sk):
    ids = {}
    for split, size in [("train", NUM_TRAIN), ("test", NUM_TEST)]:
        source = registry.open_split("digits", split, data_dir)
        assert len(source) == size
        examples = [source[i] for i in range(len(source))]
        ids[split] = np.array([ex["id"] for ex in examples])
        for ex in examples:
            row = int(ex["id"])
            assert ex["label"] == sk.target[row]
            expected = np.array([[round(v * 255 / 16) for v in line] for line in sk.images[row]])
            assert ex["image"].dtype == np.uint8 and ex["image"].shape == (8, 8, 1)
            np.testing.assert_array_equal(ex["image"][:, :, 0], expected)
            assert ex["caption"].decode() == f"a handwritten digit {WORDS[sk.target[row]]}"
    # Disjoint, together all 1,797 rows, each once.
    assert len(set(ids["train"])) == NUM_TRAIN and len(set(ids["test"])) == NUM_TEST
    assert sorted(np.concatenate([ids["train"], ids["test"]])) == list(range(len(sk.target)))
    # Stratified: every class has its proportional share of the test split, within one example.
    share = np.bincount(sk.target) * NUM_TEST / len(sk.target)
    assert np.all(np.abs(np.bincount(sk.target[ids["test"]], minlength=10) - share) < 1)
    # Plain TFDS reads the files too (what grain users would call without mmjax).
    assert len(tfds.data_source("digits", split="test", data_dir=data_dir, download=False)) == NUM_TEST
    # A permutation, not sklearn's order (whose last rows come from a few writers only).
    assert sorted(ids["test"]) != list(range(len(sk.target) - NUM_TEST, len(sk.target)))


def test_ensure_prepared_does_not_rebuild_and_never_downloads(data_dir, tmp_path):
    # Prepared already: nothing is rewritten (every file keeps its modification time).
    files = {p: p.stat().st_mtime_ns for p in Path(data_dir, "digits").rglob("*") if p.is_file()}
    assert files
    assert registry.ensure_prepared("digits", data_dir) == data_dir
    assert {p: p.stat().st_mtime_ns for p in Path(data_dir, "digits").rglob("*") if p.is_file()} == files
    # Not built-in and not prepared: an error naming both, and no files written.
    for name in ["no_such_dataset", "mnist"]:  # mnist is a TFDS name: still no download.
        with pytest.raises(FileNotFoundError, match=f"'{name}'.*{re.escape(str(tmp_path))}"):
            registry.ensure_prepared(name, str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_building_a_builtin_says_nothing_is_downloaded(data_dir):
    """TFDS would print "Downloading and preparing dataset Unknown size ..." for a local build."""
    (output,) = _BUILD_OUTPUT
    assert "download" not in output.lower().replace("nothing is downloaded", ""), output
    assert (f"mmjax: building the local TFDS dataset digits in {data_dir}/digits/1.0.0 (nothing is "
            "downloaded)") in output, output


def test_builders_leave_no_temporary_directories(monkeypatch, tmp_path):
    # TFDS's DatasetBuilder.__init__ makes a temporary directory for GCS metadata whenever the data
    # directory holds no prepared dataset, and keeps it; our builders' LocalDatasetInfo skips that.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    for name in registry.BUILTIN:
        builder = registry.get_builder(name, str(tmp_path / "data"))
        assert not builder.is_prepared()
    assert list(scratch.iterdir()) == []


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MMJAX_DATA_DIR", str(tmp_path))
    assert registry.resolve_data_dir(None) == str(tmp_path)
    monkeypatch.delenv("MMJAX_DATA_DIR")
    assert registry.resolve_data_dir(None) == os.path.expanduser("~/.cache/mmjax/tensorflow_datasets")
    assert registry.resolve_data_dir("/x/y") == "/x/y"


# --- training pipeline --------------------------------------------------------------------------


def test_train_batches_hold_sklearn_pixels(data_dir, sk):
    (batch,) = _take(_train(data_dir, batch=32), 1)
    assert batch["image"].shape == (32, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["id"].dtype == np.int32
    for image, label, row in zip(batch["image"], batch["label"], batch["id"]):
        assert label == sk.target[row]
        np.testing.assert_allclose(image[:, :, 0], _unit_pixels(sk, row), atol=1e-6)
    # Resized and mapped to [-1, 1].
    (batch,) = _take(_train(data_dir, batch=32, image_size=16, value_range="symmetric"), 1)
    assert batch["image"].shape == (32, 16, 16, 1)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and batch["image"].min() == -1


def test_resize_matches_jax_image_resize():
    import jax
    image = np.random.default_rng(0).random((8, 8, 3), dtype=np.float32)
    for size in [16, 32, 5, 4]:
        expected = jax.image.resize(image, (size, size, 3), method="bilinear")
        np.testing.assert_allclose(resize_bilinear(image, size), expected, atol=1e-5)


def test_random_shift_and_flip_are_translations_and_mirrors(data_dir, sk):
    k = 2
    (batch,) = _take(_train(data_dir, batch=64, random_shift=k, random_flip=True), 1)
    moved = flipped = 0
    for image, row in zip(batch["image"][..., 0], batch["id"]):
        original = _unit_pixels(sk, row)
        padded = np.pad(original, k)
        offsets = range(2 * k + 1)
        crops = {(dy, dx): padded[dy:dy + 8, dx:dx + 8] for dy in offsets for dx in offsets}
        candidates = {(dy, dx, flip): crop[:, ::-1] if flip else crop
                      for (dy, dx), crop in crops.items() for flip in (False, True)}
        matches = [key for key, c in candidates.items() if np.allclose(c, image, atol=1e-6)]
        assert matches, f"example {row} is not a shifted / flipped copy of its original"
        moved += (k, k, False) not in matches and (k, k, True) not in matches
        flipped += all(flip for _, _, flip in matches)
    assert moved > 32 and 10 < flipped < 54  # 24/25 shifts move the image; flips are p = 1/2


def test_train_is_deterministic_and_reshuffles_each_epoch(data_dir):
    kw = dict(batch=64, random_shift=1)
    first = _take(_train(data_dir, seed=7, **kw), 3)
    assert _same(first, _take(_train(data_dir, seed=7, **kw), 3))
    assert not np.array_equal(first[0]["id"], _take(_train(data_dir, seed=8, **kw), 1)[0]["id"])
    other = _take(_train(data_dir, seed=7, shuffle_seed=1, **kw), 1)
    assert not np.array_equal(first[0]["id"], other[0]["id"])
    # Global stream of one process, batch 479 = 1437 / 3: epoch 0 is batches 0-2, epoch 1 is 3-5.
    ids = np.concatenate([b["id"] for b in _take(_train(data_dir, batch=479, seed=7), 6)])
    epoch0, epoch1 = ids[:NUM_TRAIN], ids[NUM_TRAIN:]
    assert len(set(epoch0)) == len(set(epoch1)) == NUM_TRAIN and set(epoch0) == set(epoch1)
    assert not np.array_equal(epoch0, epoch1)


def test_two_processes_split_every_epoch_and_match_one_process(data_dir):
    steps, batch = 23, 64  # 23 * 64 = 1472 >= 1437: more than one epoch
    kw = dict(batch=batch, seed=3, random_shift=1)
    single = _take(_train(data_dir, **kw), steps)
    halves = [_take(_train(data_dir, index=p, count=2, **kw), steps) for p in range(2)]
    for s in range(steps):
        parts = [h[s] for h in halves]
        assert all(part["image"].shape[0] == batch // 2 for part in parts)
        # Process p holds global positions p, p + 2, ...: interleaving the two local batches of a
        # step gives the one-process global batch, augmentations included.
        for key in single[s]:
            merged = np.empty_like(single[s][key])
            merged[0::2], merged[1::2] = parts[0][key], parts[1][key]
            np.testing.assert_array_equal(merged, single[s][key])
    # Epoch 0 (global positions < 1437) is the train split exactly once, the two processes'
    # parts of it disjoint.
    local = [np.concatenate([b["id"] for b in h]) for h in halves]
    epoch0 = [local[0][: (NUM_TRAIN + 1) // 2], local[1][: NUM_TRAIN // 2]]
    assert not set(epoch0[0]) & set(epoch0[1])
    assert sorted(np.concatenate(epoch0)) == _split_ids(data_dir, "train")


def test_default_process_slot_comes_from_jax(data_dir):
    it = pipeline.train_iterator(_cfg(data_dir), global_batch_size=16, seed=0)
    assert _same(_take(it, 2), _take(_train(data_dir, batch=16), 2))


def test_resume_with_get_state_set_state(data_dir):
    kw = dict(batch=32, seed=11, random_shift=2, index=1, count=2)
    reference = _take(_train(data_dir, **kw), 8)
    it = _train(data_dir, **kw)
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON round trip
    resumed = _train(data_dir, **kw)
    resumed.set_state(state)
    assert _same(_take(resumed, 3), reference[5:])


def test_resume_through_orbax_checkpoint_manager(data_dir, tmp_path):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    kw = dict(batch=16, seed=5, random_shift=1)
    reference = _take(_train(data_dir, **kw), 7)
    it = _train(data_dir, **kw)
    _take(it, 4)
    state = {"w": jnp.arange(8.0)}
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
        mngr.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=pipeline.iterator_checkpoint_args(it)))
        _take(it, 2)  # the loop goes on while orbax writes: the saved position must stay at 4
        mngr.wait_until_finished()
    fresh = _train(data_dir, **kw)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state),
            data=pipeline.iterator_checkpoint_args(fresh, restore=True)))
    assert restored["data"] is fresh
    np.testing.assert_array_equal(restored["state"]["w"], state["w"])
    assert _same(_take(fresh, 3), reference[4:])


def test_worker_processes_give_the_same_batches(data_dir):
    kw = dict(batch=32, seed=2, random_shift=1)
    reference = _take(_train(data_dir, **kw), 5)
    it = _train(data_dir, worker_count=2, **kw)
    try:
        got = _take(it, 3)
        state = it.get_state()
        got += _take(it, 2)
    finally:
        it.close()
    assert _same(got, reference)
    resumed = _train(data_dir, worker_count=2, **kw)
    try:
        resumed.set_state(state)
        assert _same(_take(resumed, 2), reference[3:])
    finally:
        resumed.close()


# --- eval pipeline ------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2])
def test_eval_covers_the_split_once_with_padding(data_dir, sk, count):
    batch = 64  # does not divide 360: 6 batches, 24 padding examples
    seen = []
    for p in range(count):
        batches = list(pipeline.eval_batches(_cfg(data_dir), global_batch_size=batch,
                                             process_index=p, process_count=count))
        assert len(batches) == 6
        for b in batches:
            assert b["image"].shape == (batch // count, 8, 8, 1) and b["mask"].dtype == np.bool_
            assert np.all(b["image"][~b["mask"]] == 0) and np.all(b["label"][~b["mask"]] == 0)
            real = b["mask"]
            for image, label, row in zip(b["image"][real], b["label"][real], b["id"][real]):
                assert label == sk.target[row]
                np.testing.assert_allclose(image[:, :, 0], _unit_pixels(sk, row), atol=1e-6)
            seen.extend(b["id"][b["mask"]].tolist())
    assert sorted(seen) == _split_ids(data_dir, "test")  # each test example once over processes


def test_eval_is_reiterable(data_dir):
    ds = pipeline.eval_batches(_cfg(data_dir), global_batch_size=100, process_index=0, process_count=1)
    assert _same(list(ds), list(ds))


# --- a non-built-in TFDS dataset ----------------------------------------------------------------


def test_reads_a_prepared_non_builtin_dataset(data_dir):
    cfg = _cfg(data_dir, name="mmjax_tiny", value_range="symmetric")
    ds = pipeline.eval_batches(cfg, split="train", global_batch_size=4, process_index=0, process_count=1)
    batches = list(ds)
    assert len(batches) == 3 and set(batches[0]) == {"image", "label", "mask"}  # no `id` feature
    images = np.concatenate([b["image"][b["mask"]] for b in batches]).reshape(10, 48)
    expected = np.stack([((np.arange(48) * 5 + i) % 256) / 255 * 2 - 1 for i in range(10)])
    images = images[np.argsort(images[:, 0])]  # pixel 0 is i / 255 * 2 - 1: sorts by example
    np.testing.assert_allclose(images, expected, atol=1e-6)
    with pytest.raises(ValueError, match="no split 'test'.*available splits: train"):
        pipeline.eval_batches(cfg, global_batch_size=4, process_index=0, process_count=1)


# --- errors and TensorFlow-free reading ---------------------------------------------------------


def test_bad_inputs_raise_clear_errors(data_dir):
    cfg = _cfg(data_dir)
    unknown = "'no_such_dataset'.*built-ins: digits.*" + re.escape(data_dir)
    with pytest.raises(FileNotFoundError, match=unknown):
        _train(data_dir, name="no_such_dataset")
    with pytest.raises(ValueError, match="no split 'validation'.*available splits: test, train"):
        pipeline.eval_batches(cfg, split="validation", global_batch_size=8,
                              process_index=0, process_count=1)
    with pytest.raises(ValueError, match="global_batch_size=63 must be a positive multiple of "
                                         "process_count=2"):
        _train(data_dir, batch=63, index=0, count=2)
    with pytest.raises(ValueError, match="process_index < process_count"):
        _train(data_dir, batch=64, index=2, count=2)
    with pytest.raises(ValueError, match="both process_index and process_count"):
        pipeline.train_iterator(cfg, global_batch_size=8, seed=0, process_index=0)
    with pytest.raises(ValueError, match="value_range"):
        _train(data_dir, value_range="zero_one")


def test_reading_does_not_import_tensorflow(data_dir, tmp_path):
    script = """
    import sys
    from mmjax.data import pipeline, registry
    from mmjax.data.config import DataConfig
    cfg = DataConfig(data_dir=sys.argv[1], image_size=12, random_shift=1)
    registry.ensure_prepared("digits", sys.argv[1])
    next(pipeline.train_iterator(cfg, global_batch_size=8, seed=0, process_index=0, process_count=1))
    next(iter(pipeline.eval_batches(cfg, global_batch_size=8, process_index=0, process_count=1)))
    tiny = DataConfig(data_dir=sys.argv[1], name="mmjax_tiny", eval_split="train")  # PNG images
    next(iter(pipeline.eval_batches(tiny, global_batch_size=8, process_index=0, process_count=1)))
    print(sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")))
    """
    assert _finish(_python(script, tmp_path, data_dir)).strip().splitlines()[-1] == "[]"
