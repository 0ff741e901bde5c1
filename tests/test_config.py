from pathlib import Path

import pytest

from mmjax.config import ConfigError, apply_overrides, from_dict, to_dict
from mmjax.experiment import ExperimentConfig, from_json, load_experiment


@pytest.fixture(scope="module")
def cfg():
    return load_experiment("experiments/vit_digits.py")


def test_overrides_parse_by_type(cfg):
    c = apply_overrides(cfg, ["optim.peak_lr=3e-4", "model.encoder.depth=2", "mesh.shape=(2,2,2)",
                              "train.progress=false", "optim.grad_clip_norm=None"])
    assert c.optim.peak_lr == 3e-4 and c.model.encoder.depth == 2
    assert c.mesh.shape == (2, 2, 2) and c.train.progress is False and c.optim.grad_clip_norm is None
    assert cfg.model.encoder.depth == 4  # the original is untouched (frozen)


@pytest.mark.parametrize("override, needle", [
    ("optim.peak_lrr=1", "peak_lrr"),
    ("model.encoder.deepth=2", "deepth"),
    ("nonsense=1", "nonsense"),
])
def test_unknown_key_is_named(cfg, override, needle):
    with pytest.raises(ConfigError, match=needle):
        apply_overrides(cfg, [override])


@pytest.mark.parametrize("override, needle", [
    ("train.steps=abc", "train.steps|steps"),
    ("train.steps=1.5", "int"),
    ("model.pool=avg", "pool"),
    ("train.progress=maybe", "bool"),
    ("train.steps", "key=value"),
])
def test_bad_values_are_named(cfg, override, needle):
    with pytest.raises(ConfigError, match=needle):
        apply_overrides(cfg, [override])


def test_json_round_trip_is_strict(cfg):
    d = to_dict(cfg)
    assert from_json(d) == cfg
    d["train"]["stepz"] = 3
    with pytest.raises(ConfigError, match="train.stepz"):
        from_json(d)
    with pytest.raises(ConfigError, match="typo"):
        from_dict(ExperimentConfig, {"typo": 1})


@pytest.mark.parametrize("path", sorted(str(p) for p in Path("experiments").glob("*.py")))
def test_every_experiment_config_loads_and_round_trips(path):
    """Each shipped experiment builds, validates against its task, survives the JSON round trip
    that a resumed run relies on (config.json in the workdir) and has a schedule that fits its steps."""
    import json

    from mmjax.experiment import validate
    c = validate(load_experiment(path))
    assert c.name == Path(path).stem
    assert from_json(json.loads(json.dumps(to_dict(c)))) == c
    # and its learning-rate schedule fits its steps (warm-up and cool-down inside train.steps)
    from mmjax.train.optim import make_schedule
    make_schedule(c.optim, c.train.steps)
