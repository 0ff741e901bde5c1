"""The training loop end to end on the real digits: outputs, resume after SIGKILL, bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
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


@pytest.mark.slow
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


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_batch_sizes_the_mesh_cannot_split_are_config_errors_before_the_workdir(digits_dir, tmp_path):
    for key in ("batch_size", "eval_batch_size"):
        with pytest.raises(ConfigError, match=rf"train.{key}=36 is not divisible by the data×fsdp mesh size 8"):
            train(_cfg(digits_dir, "train.steps=5", f"train.{key}=36"), tmp_path / key)
        assert not (tmp_path / key).exists()


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


@pytest.mark.slow
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
    """`mmjax train` on a workdir whose every step is damaged: a short `error:` naming each step and
    why, not thousands of lines of tracebacks from orbax's abandoned reads."""
    args = ("train.steps=10", "train.checkpoint_every=5", "train.log_every=5")
    train(_cfg(digits_dir, *args), tmp_path)
    for step in (5, 10):
        _damage(tmp_path / "checkpoints" / str(step), "truncate")
    overrides = [f"--config.{o}" for o in TINY + [f"data.data_dir={digits_dir}", *args]]
    out = subprocess.run([sys.executable, "-m", "mmjax.cli", "train", "--config", "experiments/vit_digits.py",
                          "--workdir", str(tmp_path), *overrides], capture_output=True, text=True)
    assert out.returncode == 1, out.stdout + out.stderr
    errors = [x for x in out.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "every checkpoint" in errors[0], out.stderr
    assert re.search(r"\n  step 10: \w+: .*\n  step 5: \w+: ", out.stderr), out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert len((out.stdout + out.stderr).splitlines()) < 30, out.stdout + out.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints_corrupt").iterdir()) == ["10", "5"]


# ----------------------------------------------------------------------------- Checkpointer on a tiny tree

def _tiny_checkpointer(directory, steps=(5, 10), leaves=1):
    """A Checkpointer in `directory` holding `steps` of a small state (`w`: 1000 random floats, and
    `leaves` more); returns (ckpt, abstract)."""
    import jax
    import jax.numpy as jnp

    from mmjax.train.checkpoint import Checkpointer, abstract_like
    state = {"w": jax.random.normal(jax.random.PRNGKey(0), (1000,)),
             **{f"b{i}": jnp.full(10 + i, float(i)) for i in range(leaves)}}
    ckpt = Checkpointer(directory, async_save=False)
    for step in steps:
        if step not in ckpt.all_steps():
            ckpt.save(step, state, force=True)
    ckpt.wait()
    return ckpt, abstract_like(state, jax.tree.map(lambda x: x.sharding, state))


def _damage_chunks(step_dir: Path, every: bool = False) -> None:
    """Truncates the largest data file of the state, the one holding w's values, or `every` data
    file (orbax then raises an Exception whose message is a repr of the bound method
    TensorStore.spec; the real error is its __cause__)."""
    files = sorted((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda f: f.stat().st_size)
    assert files[-1].stat().st_size > 3000  # 1000 random float32
    for f in files if every else files[-1:]:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_a_step_damaged_again_is_set_aside_beside_the_first_without_nesting(tmp_path, capsys):
    """The same step number damaged three times in one workdir: each copy is kept, none nested."""
    for _ in range(3):
        ckpt, abstract = _tiny_checkpointer(tmp_path / "checkpoints")
        _damage_chunks(tmp_path / "checkpoints" / "10")
        step, _ = ckpt.restore_latest(abstract)
        ckpt.close()
        assert step == 5
    corrupt = tmp_path / "checkpoints_corrupt"
    assert sorted(p.name for p in corrupt.iterdir()) == ["10", "10.1", "10.2"]
    for p in corrupt.iterdir():
        assert (p / "state").is_dir() and not (p / "10").exists()
    out = capsys.readouterr().out
    assert f"moved to {corrupt / '10.2'}" in out


def test_damage_reason_is_the_real_error_not_a_method_repr(tmp_path, capsys):
    ckpt, abstract = _tiny_checkpointer(tmp_path / "checkpoints")
    _damage_chunks(tmp_path / "checkpoints" / "10")
    assert ckpt.restore_latest(abstract)[0] == 5
    ckpt.close()
    line = next(x for x in capsys.readouterr().out.splitlines() if "checkpoint step 10" in x)
    reason = line.split(" is damaged (", 1)[1].split("); moved to ", 1)[0]
    assert "bound method" not in reason and "tensorstore_spec" not in reason, line
    assert reason.startswith("ValueError: OUT_OF_RANGE: "), line  # what tensorstore really said
    assert "byte range" in reason and len(reason) < 450, line


def test_every_step_damaged_is_one_short_error_without_tracebacks(tmp_path, capfd, caplog, monkeypatch):
    """The CheckpointError names each step with a one-line reason, with nothing chained to it; the
    reads orbax abandons print no tracebacks (asyncio's log, sys.unraisablehook), now or later."""
    import gc
    import time

    from mmjax.train.checkpoint import CheckpointError
    for _ in range(3):  # what earlier tests' restores left behind reports to the hook they saw
        gc.collect()
        time.sleep(0.1)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    ckpt, abstract = _tiny_checkpointer(tmp_path / "checkpoints", leaves=24)
    _damage_chunks(tmp_path / "checkpoints" / "10", every=True)
    _damage(tmp_path / "checkpoints" / "5", "truncate")
    with pytest.raises(CheckpointError) as info:
        ckpt.restore_latest(abstract)
    ckpt.close()
    for _ in range(3):  # the abandoned reads finish in tensorstore's threads and report late
        gc.collect()
        time.sleep(0.2)
    err = info.value
    assert err.__cause__ is None and err.__suppress_context__
    msg = str(err)
    assert "every checkpoint" in msg and "step 10: " in msg and "step 5: " in msg
    assert "bound method" not in msg and "tensorstore_spec" not in msg and len(msg.splitlines()) == 3, msg
    out = capfd.readouterr()
    assert "Traceback" not in out.out + out.err
    assert not unraisable, [u.exc_value for u in unraisable]
    assert not [r for r in caplog.records if r.exc_info or r.name == "asyncio"]
    # an unrelated unraisable exception still reaches the hook
    from types import SimpleNamespace
    sys.unraisablehook(SimpleNamespace(exc_type=ValueError, exc_value=ValueError("x"), exc_traceback=None,
                                       err_msg=None, object="other"))
    assert len(unraisable) == 1
