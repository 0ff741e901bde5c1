"""The vlm task: masked CE against numpy, freeze stages, init_from, 8-device equality, `mmjax ask`,
multi-crop end to end; tiny configs (width 32, depth 2, 16-px images, patch 8) on test-sized shapes."""

import dataclasses
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import sharding as shd
from mmjax.data import shapes as S
from mmjax.data.config import DataConfig
from mmjax.data.vlm import vlm_tokenizer
from mmjax.experiment import ExperimentConfig, InitFromError, TrainConfig, init_from_params, load_run, validate
from mmjax.layers import TransformerConfig
from mmjax.models.lm import LMConfig
from mmjax.models.vit import ViTConfig
from mmjax.models.vlm import VLMConfig
from mmjax.tasks.vlm import VLMLossConfig, VLMTask
from mmjax.train.loop import create_sharded_state
from mmjax.train.optim import OptimConfig, make_optimizer, param_paths
from mmjax.train.step import jit_train_step, make_train_step

IMAGE_ID = vlm_tokenizer("bytes").token_to_id("<image>")  # 259: bytes + bos/eos/pad, then <image>
MAX_LEN = 72  # bos + 4 placeholders + the longest question in bytes + answer + eos


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory, small_shapes):
    return small_shapes(tmp_path_factory.mktemp("tfds_shapes_vlm"), {"train": 64, "test": 12, "test_novel": 6})


def _model(multicrop_grid=0, vocab=None, vision_width=32):
    # The LM embeds every id but the placeholder (the last id, without multi-crop's 3 markers after it).
    vocab = vocab or (IMAGE_ID + 4 if multicrop_grid else IMAGE_ID)
    tower = TransformerConfig(width=vision_width, depth=2, num_heads=4, mlp_dim=64, norm_eps=1e-5)
    return VLMConfig(
        vision=ViTConfig(image_size=16, patch_size=8, pool="cls", pre_norm=True, patch_bias=False, encoder=tower),
        lm=LMConfig(vocab_size=vocab, max_len=MAX_LEN + 8,
                    encoder=TransformerConfig(width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                                              activation="swiglu", norm="rmsnorm", use_bias=False,
                                              rope_base=10000.0)),
        image_token_id=IMAGE_ID, vision_feature_layers=(-1,), multicrop_grid=multicrop_grid)


def _config(data_dir, *, model=None, multicrop_grid=0, steps=4, freeze=(), mesh=(-1, 1, 1), **loss):
    return validate(ExperimentConfig(
        name="vlm_test", task="vlm", model=model or _model(multicrop_grid),
        loss=VLMLossConfig(max_len=MAX_LEN, **loss),
        data=DataConfig(name="shapes", data_dir=data_dir, image_size=16, multi_crop_grid=multicrop_grid),
        optim=OptimConfig(name="sgd", peak_lr=0.5, schedule="constant", freeze=freeze, grad_clip_norm=None),
        train=TrainConfig(steps=steps, batch_size=8, eval_batch_size=8, log_every=2, checkpoint_every=0,
                          progress=False, peak_flops_per_device=1e11, seed=1),
        mesh=shd.MeshConfig(shape=mesh)))


def _init(task, seed=0):
    return nn.meta.unbox(task.init_params(jax.random.PRNGKey(seed)))


@pytest.fixture(scope="module")
def batch(shapes_dir):
    task = VLMTask(_config(shapes_dir))
    it = task.train_iterator(global_batch_size=8, seed=0)
    return {k: v for k, v in next(it).items() if k in task.example_batch(1)}


@pytest.fixture(scope="module")
def run(shapes_dir, tmp_path_factory):
    """A tiny run trained for 4 steps through the real loop (evaluated on test and test_novel)."""
    from mmjax.train.loop import train
    workdir = tmp_path_factory.mktemp("vlm_run")
    cfg = _config(shapes_dir, eval_splits=("test_novel",), max_answer_tokens=4)
    cfg = dataclasses.replace(cfg, optim=OptimConfig(peak_lr=3e-3))
    results = train(cfg, workdir)
    return workdir, results


def test_loss_is_the_hand_computed_masked_cross_entropy(shapes_dir, batch):
    task = VLMTask(_config(shapes_dir))
    params = _init(task)
    ids, w = batch["ids"], batch["loss_weights"]
    logits, _ = jax.jit(task.model.apply)({"params": params}, batch["image"], jnp.asarray(ids[:, :-1]))
    z = np.asarray(logits, np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    weights = w[:, 1:]  # the prediction at t counts iff the token it predicts (ids[t+1]) is an answer token
    targets = np.where(weights > 0, ids[:, 1:], 0)  # unweighted targets may be the placeholder (≥ V)
    nll = lse - np.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    assert ((ids[:, 1:] == IMAGE_ID) * weights).sum() == 0  # no image position is a target
    expected = (weights * nll).sum() / weights.sum()
    loss, (metrics, _) = jax.jit(task.loss_fn)(params, {}, {k: jnp.asarray(v) for k, v in batch.items()}, None)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(metrics["tokens"]) == weights.sum()


def _moved(shapes_dir, batch, freeze):
    """Param paths whose value changes in one SGD step with these freeze regexes."""
    cfg = _config(shapes_dir, freeze=freeze)
    task = VLMTask(cfg)
    params = _init(task)
    tx, sched = make_optimizer(cfg.optim, 1, params)
    from mmjax.train.state import TrainState
    state = TrainState.create(params=params, tx=tx, rng=jax.random.PRNGKey(1))
    new, _ = jax.jit(make_train_step(task.loss_fn, tx, sched))(state, {k: jnp.asarray(v) for k, v in batch.items()})
    paths = jax.tree.leaves(param_paths(params))
    return {p for p, a, b in zip(paths, jax.tree.leaves(params), jax.tree.leaves(new.params))
            if not np.array_equal(np.asarray(a), np.asarray(b))}, set(paths)


def test_freeze_stages_move_only_their_params(shapes_dir, batch):
    moved, paths = _moved(shapes_dir, batch, (r"vision/.*", r"lm/.*"))        # stage 1: projector only
    assert moved == {p for p in paths if p.startswith("projector/")}
    moved, paths = _moved(shapes_dir, batch, (r"vision/.*",))                  # stage 2: projector + LM
    assert {p.split("/")[0] for p in moved} == {"projector", "lm"}
    assert len(moved) > 0.9 * len([p for p in paths if not p.startswith("vision/")])


def test_init_from_loads_tower_and_lm_and_refuses_mismatches(shapes_dir, run):
    workdir, _ = run
    _, step, saved = load_run(workdir)
    assert step == 4
    task = VLMTask(_config(shapes_dir))
    fresh = _init(task, 5)
    out = init_from_params(fresh, (("vision", str(workdir)), ("lm", f"{workdir}:lm")), log=lambda m: None)
    for part in ("vision", "lm"):
        for a, b in zip(jax.tree.leaves(out[part]), jax.tree.leaves(saved[part])):
            np.testing.assert_array_equal(np.asarray(a), b)
    for a, b in zip(jax.tree.leaves(out["projector"]), jax.tree.leaves(fresh["projector"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # not named: kept
    # A wider vision tower (every vision width + 16): every differing path with both shapes.
    wide = {**fresh, "vision": jax.tree.map(lambda x: np.zeros(x.shape[:-1] + (x.shape[-1] + 16,)), fresh["vision"])}
    with pytest.raises(InitFromError, match=r"shape mismatches.*\n.*: model \(.*48,?\), source \(.*32,?\)") as e:
        init_from_params(wide, (("vision", str(workdir)),))
    assert "init_from 'vision'" in str(e.value)
    with pytest.raises(InitFromError, match="no subtree 'text'"):
        init_from_params(fresh, (("vision", f"{workdir}:text"),))
    # A larger LM vocabulary (the LM run's tokenizer + new special tokens): rows copied, new rows kept.
    rows = np.random.RandomState(0).normal(size=(IMAGE_ID + 8, 32)).astype(np.float32)
    big = {**fresh, "lm": {**fresh["lm"], "token_embedding": rows}}
    said = []
    grown = init_from_params(big, (("lm", str(workdir)),), log=said.append)
    emb = np.asarray(grown["lm"]["token_embedding"])
    np.testing.assert_array_equal(emb[:IMAGE_ID], saved["lm"]["token_embedding"])
    np.testing.assert_array_equal(emb[IMAGE_ID:], rows[IMAGE_ID:])
    assert any(f"grows its vocabulary axis {IMAGE_ID} → {IMAGE_ID + 8}" in m for m in said)


def test_run_reports_vqa_accuracy_by_group_and_test_novel(run):
    _, results = run
    ev = results["eval"]
    for key in ("loss", "token_accuracy", "vqa/accuracy", "test_novel/vqa/accuracy", "test_novel/loss"):
        assert key in ev, sorted(ev)
    assert ev["vqa/examples"] == 12 and ev["test_novel/vqa/examples"] == 6
    assert any(k.startswith("vqa/accuracy/") for k in ev)
    assert sum(ev[k] for k in ev if k.startswith("vqa/examples/objects_")) == 12  # every question, by object count
    assert np.isfinite(results["train"]["loss"])


def test_vqa_turns_trains_long_mixed_sequences_and_scores_single_questions(shapes_dir):
    cfg = _config(shapes_dir, sequence="vqa_turns", eval_max_len=MAX_LEN - 8, caption_rate=0.5)
    task = VLMTask(cfg)
    assert (task.transform.task, task.transform.max_len, task.transform.caption_rate) == ("vqa_turns", MAX_LEN, 0.5)
    assert (task.eval_transform.task, task.eval_transform.max_len, task.eval_transform.caption_rate) == (
        "vqa", MAX_LEN - 8, 0.0)
    train = next(task.train_iterator(global_batch_size=8, seed=0))
    assert train["ids"].shape == (8, MAX_LEN)
    ev = next(iter(task.eval_batches("test")))
    assert ev["ids"].shape == (8, MAX_LEN - 8) and "question_group" in ev
    # Trained on captions too, so scored on both: captions in training-length sequences, prompted by
    # the caption prompt alone, generated for caption_tokens and parsed against the scene's labels.
    assert task.eval_kinds == ("vqa", "caption")
    cap = next(iter(task.eval_batches("test", kind="caption")))
    prompt = task.tokenizer.decode(cap["ids"][0, :cap["prefix_len"][0]])
    assert cap["ids"].shape == (8, MAX_LEN) and prompt == "describe the image.\n" and "shape" in cap
    with pytest.raises(ValueError, match="scored as .'vqa'.*not 'captions'"):
        task.eval_batches("test", kind="captions")
    cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, max_answer_tokens=2, caption_tokens=3,
                                                            eval_max_examples=8))
    task = VLMTask(cfg)
    mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh), shd.logical_rules(cfg.mesh.rules):
        results = task.evaluate(_init(task), {}, mesh)
    for key in ("loss", "vqa/accuracy", "caption/loss", "caption/token_accuracy", "caption/attribute_accuracy",
                "caption/parsed"):
        assert key in results, sorted(results)
    assert results["vqa/examples"] == 8 and results["caption/examples"] == 8
    assert results["caption/loss"] != results["loss"]  # two different sets of sequences
    # Byte tokens: at most one character each. Captions run to caption_tokens, answers to max_answer_tokens.
    captions = [s.split(" → ")[1] for s in results["caption/samples"]]
    answers = [s.split(" → ")[1] for s in results["samples"]]
    assert max(map(len, captions)) == 3 and max(map(len, answers)) <= 2, (captions, answers)


@pytest.mark.parametrize("answer_position", [None, 90])
def test_packed_turns_compute_each_turn_as_its_single_question_sequence(shapes_dir, answer_position):
    """vqa_packed: the logits of every turn of a packed sequence equal those of the same question
    asked alone ("vqa" with question_index), and the loss weights cover every answer once; also with
    every answer at answer_position (the questions take up to ~60 bytes after a 17-token image)."""
    from mmjax.data import shapes as shapes_data
    cfg = _config(shapes_dir, sequence="vqa_packed")
    cfg = dataclasses.replace(  # six questions in bytes
        cfg, loss=dataclasses.replace(cfg.loss, max_len=320, answer_position=answer_position),
        model=dataclasses.replace(cfg.model, lm=dataclasses.replace(cfg.model.lm, max_len=400)))
    task = VLMTask(cfg)
    params = _init(task)
    ex = shapes_data.generate_example("test", 3)
    image = (ex["image"][None, ::2, ::2].astype(np.float32) / 255.0)         # the 16-px tower
    packed = task.transform.map(ex)
    assert packed["segment_ids"].max() == len(ex["questions"]) + 1            # turns 1..6, then padding
    logits, _ = task.model.apply({"params": params}, image, packed["ids"][None],
                                 positions=packed["positions"][None], segment_ids=packed["segment_ids"][None])
    # Every question alone, in one batch (causal: the padding after a question changes nothing before it).
    singles = [dataclasses.replace(task.transform, task="vqa", question_index=i).map(ex)
               for i in range(len(ex["questions"]))]
    ref, _ = task.model.apply({"params": params}, np.repeat(image, len(singles), axis=0),
                              np.stack([x["ids"] for x in singles]),
                              positions=None if answer_position is None
                              else np.stack([x["positions"] for x in singles]))
    supervised = 0
    for i, single in enumerate(singles):
        n = int(single["length"])
        turn = np.flatnonzero(packed["segment_ids"] == i + 1)
        start = n - turn.size                                    # alone, the turn follows the image block
        np.testing.assert_array_equal(packed["ids"][turn], single["ids"][start:n])
        np.testing.assert_allclose(logits[0, turn], ref[i, start:n], atol=2e-5, rtol=1e-5)
        np.testing.assert_array_equal(packed["loss_weights"][turn], single["loss_weights"][start:n])
        if answer_position is not None:  # the turn's first answer token sits at answer_position
            first = turn[np.flatnonzero(packed["loss_weights"][turn])[0]]
            assert packed["positions"][first] == answer_position
        supervised += single["loss_weights"].sum()
    assert packed["loss_weights"].sum() == supervised
    with pytest.raises(ValueError, match="vqa_packed.*causal"):
        VLMTask(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="prefix")))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_sharded_step_equals_one_device(shapes_dir, batch):
    def go(mesh_shape, devices):
        cfg = _config(shapes_dir, mesh=mesh_shape)
        task = VLMTask(cfg)
        mesh = shd.make_mesh(cfg.mesh, devices)
        with jax.set_mesh(mesh), shd.logical_rules(cfg.mesh.rules):
            tx, sched = make_optimizer(cfg.optim, 1)
            init_fn, _, state_sh, _ = create_sharded_state(task, cfg, mesh, tx)
            state = init_fn(jax.random.PRNGKey(0))
            batch_sh = {k: shd.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
            step = jit_train_step(make_train_step(task.loss_fn, tx, sched), state_sh, batch_sh)
            state, m = step(state, shd.make_global_batch(batch, mesh))
            return float(m["loss"]), jax.tree.map(np.asarray, state.params)

    one, p1 = go((1, 1, 1), jax.devices()[:1])
    eight, p8 = go((2, 2, 2), jax.devices()[:8])
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_ask_end_to_end_and_its_errors(run, tmp_path, capsys):
    from PIL import Image

    from mmjax.cli import main
    workdir, _ = run
    png = tmp_path / "scene.png"
    Image.fromarray(S.generate_example("test", 0)["image"]).save(png)
    assert main(["ask", "--workdir", str(workdir), "--image", str(png), "what color is the circle?"]) == 0
    out = capsys.readouterr().out
    assert isinstance(out, str) and out.endswith("\n")
    # Not a run, not a VLM run, no checkpoint, an unreadable image: exit 2 with a line saying which.
    assert main(["ask", "--workdir", str(tmp_path), "--image", str(png), "q?"]) == 2
    assert "no config.json" in capsys.readouterr().err
    other = tmp_path / "lm_run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"task": "lm"}))
    assert main(["ask", "--workdir", str(other), "--image", str(png), "q?"]) == 2
    assert "not a VLM run" in capsys.readouterr().err
    empty = tmp_path / "no_ckpt"
    empty.mkdir()
    shutil.copy(workdir / "config.json", empty / "config.json")
    assert main(["ask", "--workdir", str(empty), "--image", str(png), "q?"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert main(["ask", "--workdir", str(workdir), "--image", str(bad), "q?"]) == 2
    assert "not a readable image" in capsys.readouterr().err


def test_multicrop_runs_end_to_end_above_the_tower_size(shapes_dir):
    # 32-px shapes images, a 16-px tower: the global view + 2×2 tiles of the image at 32 px, each
    # crop's 2×2 patches pooled to one feature: 5 placeholders inside the layout's marker ids.
    cfg = _config(shapes_dir, multicrop_grid=2)
    task = VLMTask(cfg)
    b = next(task.train_iterator(global_batch_size=8, seed=0))
    assert b["crops"].shape == (8, 5, 16, 16, 3)
    assert ((b["ids"] == IMAGE_ID).sum(1) == 5).all()
    task.check_batch({k: b[k] for k in task.example_batch(1)}, 1)
    params = _init(task)
    assert "multicrop_pool" in params
    batch = {k: jnp.asarray(b[k]) for k in task.example_batch(1)}
    loss, _ = jax.jit(task.loss_fn)(params, {}, batch, None)
    assert np.isfinite(float(loss))
    answers = task.answer(params, b["crops"][:2], b["ids"][:2], b["prefix_len"][:2], max_new_tokens=2)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_binding_diagnostics_run_on_a_trained_vlm(run, capsys):
    from mmjax.evals import binding
    workdir, _ = run
    assert binding.main(["--workdir", str(workdir), "--scenes", "2", "--attention_scenes", "5"]) == 0
    printed = capsys.readouterr().out
    assert "shape_at" in printed and "color_at" in printed
    cfg, _, params = load_run(workdir)
    rows = [line.split(":")[1].split() for line in printed.splitlines() if line.strip().startswith("layer ")]
    tv = np.array(rows, float)  # [layers, heads] TV distances
    assert tv.shape == (cfg.model.lm.encoder.depth, cfg.model.lm.encoder.num_heads)
    assert np.all((tv >= 0) & (tv <= 1))
    with pytest.raises(ValueError, match="two objects"):
        binding.attention_dependence(VLMTask(cfg), params, scenes=0)
