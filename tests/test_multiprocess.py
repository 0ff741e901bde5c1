"""Two processes (jax.distributed over gloo on 127.0.0.1) train like one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

CMD = [sys.executable, "-m", "mmjax.cli", "train", "--config", "experiments/vit_digits.py"]


def _overrides(digits_dir):
    # SGD: Adam would turn float noise in exactly-zero gradients (the key bias) into lr-sized steps.
    return [f"--config.{o}" for o in (
        "model.encoder.width=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
        "model.encoder.mlp_dim=64", "train.batch_size=32", "train.eval_batch_size=64", "train.steps=12",
        "train.log_every=4", "train.checkpoint_every=6", "train.progress=false", "optim.warmup_steps=2",
        "optim.name=sgd", "optim.peak_lr=0.1", f"data.data_dir={digits_dir}", "train.peak_flops_per_device=1e11")]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _xla_flags(devices: int) -> str:
    """The suite's XLA_FLAGS (tests/conftest.py) with `devices` simulated devices instead of 8."""
    keep = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    return " ".join([*keep, f"--xla_force_host_platform_device_count={devices}"])


@pytest.mark.slow
def test_two_processes_match_one(digits_dir, tmp_path, read_params):
    # One process with 4 devices vs two processes with 2 devices each: the same 4-device mesh.
    env1 = dict(os.environ, XLA_FLAGS=_xla_flags(4))
    subprocess.run(CMD + ["--workdir", str(tmp_path / "one")] + _overrides(digits_dir), env=env1,
                   check=True, capture_output=True)
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS=_xla_flags(2),
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(CMD + ["--workdir", str(tmp_path / "two")] + _overrides(digits_dir),
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["eval"]["count"] == one["eval"]["count"] == 360
    assert two["eval"]["accuracy"] == pytest.approx(one["eval"]["accuracy"], abs=1 / 360)
    assert two["eval"]["loss"] == pytest.approx(one["eval"]["loss"], rel=1e-4)
    assert two["train"]["loss"] == pytest.approx(one["train"]["loss"], rel=1e-4)
    # Each process read its own slice: the two saved their own iterator state.
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "12" / "data").iterdir()
                  if p.suffix == ".json") == ["process_0-of-2.json", "process_1-of-2.json"]
    for a, b in zip(read_params(tmp_path / "one", 12), read_params(tmp_path / "two", 12)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
