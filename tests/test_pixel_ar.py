"""Pixel-level AR (iGPT baseline): the palette by hand, the loss against a hand-computed raster
cross-entropy, config errors, and a tiny run through the loop that learns and samples palette images."""

import dataclasses
import math

import jax
import numpy as np
import pytest

from mmjax import sharding as shd
from mmjax.config import ConfigError
from mmjax.data import palette as pal
from mmjax.data import shapes as S
from mmjax.data.config import DataConfig
from mmjax.experiment import ExperimentConfig, TrainConfig, validate
from mmjax.layers import TransformerConfig
from mmjax.models.lm import LMConfig
from mmjax.tasks.pixel_ar import PixelARLossConfig, PixelARTask
from mmjax.train.optim import OptimConfig

SIZE = 8  # 32-px scenes resized to 8×8: a 64-token raster


def test_quantise_and_dequantise_by_hand():
    palette = np.array([[0, 0, 0], [1, 0, 0], [0, 0, 1]], np.float32)
    pixels = np.array([[[0.1, 0.1, 0.1], [0.9, 0.2, 0.0]], [[0.2, 0.1, 0.7], [0.6, 0.0, 0.5]]], np.float32)
    # nearest by hand: black; red; blue (0.2²+0.1²+0.3² = .14 vs .77 / .54); red (.16+.25 = .41 vs .36+.25=.61)
    ids = pal.quantise(pixels, palette)
    np.testing.assert_array_equal(ids, [[0, 1], [2, 1]])
    np.testing.assert_array_equal(np.asarray(pal.quantise(jax.numpy.asarray(pixels), palette)), ids)
    np.testing.assert_array_equal(pal.dequantise(ids, palette)[1, 0], [0, 0, 1])
    sq = [0.03, 0.01 + 0.04, 0.04 + 0.01 + 0.09, 0.16 + 0.25]
    assert pal.quantisation_error(pixels, palette) == pytest.approx(sum(sq) / 12, rel=1e-5)


def test_fit_palette_recovers_flat_colours_in_luminance_order():
    colours = np.array([[1, 1, 1], [0, 0, 1], [1, 0, 0], [0, 0, 0]], np.float32)
    rng = np.random.default_rng(0)
    image = colours[rng.integers(0, 4, size=(20, 20))]
    got = pal.fit_palette(image, 4)
    # luminance 0.299 R + 0.587 G + 0.114 B: black 0, blue .114, red .299, white 1
    np.testing.assert_allclose(got, [[0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 1, 1]], atol=1e-6)
    assert pal.quantisation_error(image, got) == 0.0
    with pytest.raises(ValueError, match="4 distinct colours, fewer than k=5"):
        pal.fit_palette(image, 5)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        pal.fit_palette(image * 255, 4)


def test_a_palette_of_the_shapes_colours_is_lossless():
    images = np.stack([S.generate_example("train", i)["image"] for i in range(60)]).astype(np.float32) / 255
    palette = pal.fit_palette(images, 11)  # 8 object colours on 3 backgrounds
    assert pal.quantisation_error(images, palette) == 0.0


def _config(data_dir, **loss):
    return validate(ExperimentConfig(
        name="pixel_ar_test", task="pixel_ar",
        model=LMConfig(vocab_size=16, max_len=SIZE * SIZE + 1, encoder=TransformerConfig(
            width=32, depth=2, num_heads=2, mlp_dim=64, activation="swiglu", norm="rmsnorm", use_bias=False,
            rope_base=10000.0)),
        loss=PixelARLossConfig(**{"palette_size": 6, "palette_images": 40, "samples": 4, **loss}),
        data=DataConfig(name="shapes", data_dir=data_dir, image_size=SIZE, value_range="unit"),
        optim=OptimConfig(name="adamw", peak_lr=3e-3, warmup_steps=5, schedule="cosine"),
        train=TrainConfig(steps=60, batch_size=16, eval_batch_size=16, log_every=20, checkpoint_every=0,
                          progress=False, seed=0),
        mesh=shd.MeshConfig(shape=(-1, 1, 1))))


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory, small_shapes):
    return small_shapes(tmp_path_factory.mktemp("shapes_px"), {"train": 64, "test": 32, "test_novel": 8})


def test_loss_is_the_raster_cross_entropy_by_hand(shapes_dir):
    task = PixelARTask(_config(shapes_dir))
    params = task.init_params(jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                          is_leaf=lambda x: hasattr(x, "value"))
    rng = np.random.default_rng(1)
    images = rng.uniform(size=(3, SIZE, SIZE, 3)).astype(np.float32)
    mask = np.array([1, 1, 0], np.int32)  # the last row is padding
    sums = jax.device_get(task.eval_fn(params, {}, {"image": images, "mask": mask}))
    # by hand: nearest palette colour per pixel, BOS = k first, log-softmax of the model's logits
    d = ((images[..., None, :] - task.palette) ** 2).sum(-1)
    seq = np.concatenate([np.full((3, 1), task.k), d.argmin(-1).reshape(3, -1)], axis=1)
    logits = np.asarray(task.model.apply({"params": params}, seq[:, :-1])[0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, seq[:, 1:, None], -1)[..., 0][:2].sum()
    assert sums["tokens"] == 2 * SIZE * SIZE and sums["count"] == 2
    assert sums["nll"] == pytest.approx(nll, rel=1e-5)
    out = task.summarize_eval({k: float(v) for k, v in sums.items()})
    assert out["bits_per_dim"] == pytest.approx(nll / (2 * SIZE * SIZE) / (3 * math.log(2)), rel=1e-5)


def test_config_errors_name_the_problem(shapes_dir):
    cfg = _config(shapes_dir)
    with pytest.raises(ConfigError, match="value_range='unit'"):
        PixelARTask(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, value_range="symmetric")))
    with pytest.raises(ConfigError, match="palette_size \\+ 1 = 17"):
        PixelARTask(dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, palette_size=16)))
    with pytest.raises(ConfigError, match="= 65 positions"):
        PixelARTask(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_len=32)))


@pytest.fixture(scope="module")
def run(shapes_dir, tmp_path_factory):
    from mmjax.train.loop import train
    workdir = tmp_path_factory.mktemp("pixel_ar_run")
    cfg = dataclasses.replace(_config(shapes_dir), train=dataclasses.replace(_config(shapes_dir).train,
                                                                             checkpoint_every=60))
    return cfg, workdir, train(cfg, workdir)


def test_a_run_learns_and_samples_palette_images(run):
    from mmjax.experiment import load_run
    cfg, workdir, results = run
    ev = results["eval"]
    uniform = math.log2(cfg.loss.palette_size) / 3  # bits/dim of a model that predicts nothing
    assert ev["bits_per_dim"] < 0.5 * uniform, ev
    assert (workdir / "images" / f"samples_{cfg.train.steps:06d}.png").is_file()
    task = PixelARTask(cfg)
    _, _, params = load_run(workdir)
    images = task.sample(params, 3, rng=jax.random.PRNGKey(0))
    assert images.shape == (3, SIZE, SIZE, 3)
    colours = {tuple(c) for c in task.palette.tolist()}
    assert {tuple(c) for c in images.reshape(-1, 3).tolist()} <= colours  # palette colours only


def test_sample_command_writes_a_grid_and_refuses_other_runs(run, tmp_path, capsys):
    from PIL import Image

    from mmjax.cli import main
    cfg, workdir, _ = run
    out = tmp_path / "grid.png"
    assert main(["sample", "--workdir", str(workdir), "--num", "3", "--out", str(out), "--temperature", "0.5"]) == 0
    assert Image.open(out).size[0] > 3 * SIZE and "3 images" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"task": "lm"}')
    assert main(["sample", "--workdir", str(tmp_path / "other"), "--out", str(out)]) == 2
    assert "'lm' run" in capsys.readouterr().err
    assert main(["sample", "--workdir", str(workdir), "--num", "0", "--out", str(out)]) == 2
