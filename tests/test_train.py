"""The training loop end to end on the real digits: outputs, resume after SIGKILL, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mmjax.config import ConfigError, apply_overrides, to_dict
from mmjax.experiment import load_experiment
from mmjax.train.loop import NonFiniteError, train

# A CLS token with learned positions moves off chance within 40 steps; the main job's GAP +
# sin-cos recipe needs a few hundred.
TINY = ["model.pool=cls", "model.posemb=learned", "model.encoder.width=32", "model.encoder.depth=1",
        "model.encoder.num_heads=2", "model.encoder.mlp_dim=64", "train.batch_size=32", "train.eval_batch_size=64",
        "train.progress=false", "optim.warmup_steps=2", "mesh.shape=(-1,1,1)"]


def _cfg(digits_dir, *extra):
    return apply_overrides(load_experiment("experiments/vit_digits.py"),
                           TINY + [f"data.data_dir={digits_dir}", *extra])


def test_run_writes_outputs_and_learns(digits_dir, tmp_path):
    cfg = _cfg(digits_dir, "train.steps=40", "train.log_every=10", "train.eval_every=20",
               "train.checkpoint_every=20")
    res = train(cfg, tmp_path)
    assert res["step"] == 40 and res["eval"]["count"] == 360  # every test digit exactly once
    assert res["eval"]["accuracy"] > 0.2  # chance is 0.1
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "train/loss" in x]
    assert [x["step"] for x in train_lines] == [10, 20, 30, 40]
    for key in ("train/loss", "train/grad_norm", "train/lr", "train/examples_per_sec", "train/mfu"):
        assert np.isfinite(train_lines[-1][key])
    assert train_lines[-1]["train/loss"] < train_lines[0]["train/loss"]
    assert [x["step"] for x in lines if "eval/accuracy" in x] == [20, 40]
    assert json.loads((tmp_path / "results.json").read_text())["eval"] == res["eval"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents*"))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [20, 40]


def test_workdir_with_other_config_is_refused(digits_dir, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(to_dict(_cfg(digits_dir, "train.steps=5"))))
    with pytest.raises(ConfigError, match=r"optim.peak_lr: 0.002 \(saved\) → 0.1 \(new\)"):
        train(_cfg(digits_dir, "train.steps=5", "optim.peak_lr=0.1"), tmp_path)


def test_warmup_longer_than_the_run_is_a_cli_error_before_the_workdir_is_written(tmp_path, capsys):
    from mmjax.cli import main
    workdir = tmp_path / "run"
    rc = main(["train", "--config", "experiments/vit_digits.py", "--workdir", str(workdir), "--config.train.steps=20"])
    assert rc == 2
    assert "error: optim.warmup_steps=100 must be below the 20 total steps" in capsys.readouterr().err
    assert not workdir.exists()  # the same workdir still takes the fixed config


def test_nan_guard_names_step_and_metric(digits_dir, tmp_path):
    cfg = _cfg(digits_dir, "train.steps=30", "train.log_every=30", "optim.peak_lr=1e12",
               "optim.grad_clip_norm=None", "optim.warmup_steps=0", "optim.schedule=constant",
               "train.checkpoint_every=0")
    with pytest.raises(NonFiniteError, match=r"step \d+: metric '(loss|grad_norm|accuracy)' is (nan|inf)"):
        train(cfg, tmp_path)
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))  # nothing non-finite was saved


def _damage(step_dir: Path, how: str) -> None:
    """Overwrites 16 bytes in the middle of, or truncates to half, every data file of the state."""
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        data = bytearray(f.read_bytes())
        if how == "overwrite":
            data[len(data) // 2: len(data) // 2 + 16] = bytes(16)
        else:
            data = data[: len(data) // 2]
        f.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["overwrite", "truncate"])
def test_corrupt_checkpoint_falls_back_to_previous_step(digits_dir, tmp_path, read_params, how, capsys):
    args = ("train.steps=20", "train.checkpoint_every=10", "train.log_every=10")
    first = train(_cfg(digits_dir, *args), tmp_path / "a")
    good = read_params(tmp_path / "a", 20)
    _damage(tmp_path / "a" / "checkpoints" / "20", how)
    capsys.readouterr()
    again = train(_cfg(digits_dir, *args), tmp_path / "a")  # resumes from 10, redoes 11..20
    out = capsys.readouterr().out
    assert "checkpoint step 20" in out and "damaged" in out and "resumed from step 10" in out
    assert (tmp_path / "a" / "checkpoints_corrupt" / "20").is_dir()  # moved aside, not deleted
    assert again["eval"] == first["eval"]
    for x, y in zip(good, read_params(tmp_path / "a", 20)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sigkill_resume_is_bitwise(digits_dir, tmp_path, read_params):
    """Kill a CLI run with SIGKILL after its second checkpoint, restart it, and compare with an
    uninterrupted run: same final params (bitwise) and the same final eval."""
    overrides = [f"--config.{o}" for o in TINY + [f"data.data_dir={digits_dir}", "train.steps=150",
                                                  "train.checkpoint_every=25", "train.log_every=25",
                                                  "model.encoder.depth=2", "train.batch_size=64"]]
    cmd = [sys.executable, "-m", "mmjax.cli", "train", "--config", "experiments/vit_digits.py"]
    env = dict(os.environ, XLA_FLAGS="")  # keeps the suite's compilation cache (tests/conftest.py)
    subprocess.run(cmd + ["--workdir", str(tmp_path / "ref")] + overrides, check=True, env=env,
                   capture_output=True)
    proc = subprocess.Popen(cmd + ["--workdir", str(tmp_path / "killed")] + overrides, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while not (ckpts / "50").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_at_kill = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert 150 not in steps_at_kill  # it really was killed mid-training
    out = subprocess.run(cmd + ["--workdir", str(tmp_path / "killed")] + overrides, check=True, env=env,
                         capture_output=True, text=True)
    assert "resumed from step" in out.stdout
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    res = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert res["eval"] == ref["eval"]
    for x, y in zip(read_params(tmp_path / "ref", 150), read_params(tmp_path / "killed", 150)):
        np.testing.assert_array_equal(x, y)
    # The metrics log holds each step once after the resume.
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in x]
    assert steps == sorted(set(steps)) == list(range(25, 151, 25))


def test_resume_onto_a_different_mesh(digits_dir, tmp_path, read_params, capsys):
    """Checkpoint on a (8,1,1) mesh, resume on (1,4,2): the same result as never stopping."""
    import shutil
    args = ("train.steps=10", "train.checkpoint_every=5", "train.log_every=5", "optim.name=sgd",
            "optim.peak_lr=0.1")
    ref = train(_cfg(digits_dir, *args, "mesh.shape=(8,1,1)"), tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "10")
    capsys.readouterr()
    res = train(_cfg(digits_dir, *args, "mesh.shape=(1,4,2)"), tmp_path / "b")
    assert "resumed from step 5" in capsys.readouterr().out
    assert res["eval"]["accuracy"] == pytest.approx(ref["eval"]["accuracy"], abs=1 / 360)
    assert res["eval"]["loss"] == pytest.approx(ref["eval"]["loss"], rel=1e-4)
    for x, y in zip(read_params(tmp_path / "a", 10), read_params(tmp_path / "b", 10)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_all_checkpoints_damaged_stops_with_the_reason(digits_dir, tmp_path):
    from mmjax.train.checkpoint import CheckpointError
    args = ("train.steps=10", "train.checkpoint_every=5", "train.log_every=5")
    train(_cfg(digits_dir, *args), tmp_path)
    for step in (5, 10):
        _damage(tmp_path / "checkpoints" / str(step), "truncate")
    with pytest.raises(CheckpointError, match=r"every checkpoint .* is damaged.*step 10: .*step 5: "):
        train(_cfg(digits_dir, *args), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints_corrupt").iterdir()) == ["10", "5"]
