"""The `mmjax` command: mistakes end in one `error: ...` line (no traceback), and `train --help`
documents the --config.KEY=VALUE overrides."""

import os
import subprocess
import sys

import pytest

from mmjax.cli import main

CONFIG = "experiments/vit_digits.py"


def test_a_mesh_that_does_not_fit_is_an_error_before_the_workdir_is_written(tmp_path, capsys):
    workdir = tmp_path / "run"
    rc = main(["train", "--config", CONFIG, "--workdir", str(workdir), "--config.mesh.shape=(3,1,1)"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: mesh.shape=(3, 1, 1) does not fit this machine: "), err
    assert "-1" in err and "Traceback" not in err
    assert not workdir.exists()  # nothing written: the same workdir takes the fixed config


def test_a_missing_config_file_is_an_error(tmp_path, capsys):
    missing = tmp_path / "nope.py"
    rc = main(["train", "--config", str(missing), "--workdir", str(tmp_path / "run")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err == f"error: --config {missing} does not exist (give an experiment file such as {CONFIG})\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args", [["--config", "nope/missing.py"], ["--config", CONFIG, "--config.mesh.shape=(3,1,1)"]],
                         ids=["missing-config", "mesh"])
def test_the_console_script_prints_one_error_line(tmp_path, args):
    """What a user sees from `mmjax train ...`: the exit status and one line, no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device
    script = "import sys; from mmjax.cli import entry; sys.argv[0] = 'mmjax'; entry()"
    out = subprocess.run([sys.executable, "-c", script, "train", "--workdir", str(tmp_path / "run"), *args],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert [line for line in out.stderr.splitlines() if line.startswith("error: ")], out.stderr
    assert not (tmp_path / "run").exists()


def test_train_help_documents_config_overrides(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--config.KEY=VALUE" in out.split("\n")[0]  # in the usage line
    assert "config overrides:" in out and "example:" in out
    assert "--config.train.steps=500" in out  # an example
