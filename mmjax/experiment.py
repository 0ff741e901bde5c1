"""The experiment config: everything a run needs, in one typed tree.

An experiment file (experiments/NAME.py) defines `get_config() -> ExperimentConfig`; the CLI
applies `--config.a.b=value` overrides. `model` and `loss` are typed by the task (see
mmjax.tasks.TASKS), so `from_json` reads a saved config back as strictly as it was written.
"""

from __future__ import annotations

import dataclasses
import runpy
from pathlib import Path
from typing import Any

from mmjax.config import ConfigError, config, from_dict, to_dict
from mmjax.data.config import DataConfig
from mmjax.sharding import MeshConfig
from mmjax.train.optim import OptimConfig


@config
class TrainConfig:
    steps: int = 1000
    batch_size: int = 128  # global, over all processes
    eval_batch_size: int = 256  # global; the last batch is padded and masked
    seed: int = 0
    log_every: int = 50
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    check_batches: bool = True  # host-side shape/dtype/NaN checks of every batch
    progress: bool = True  # a tqdm progress bar on process 0
    peak_flops_per_device: float | None = None  # None: measure the fp32 matmul peak at start


@config
class ExperimentConfig:
    name: str = "experiment"
    task: str = "classification"
    model: Any = None
    loss: Any = None
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()


# Keys that may differ between a workdir's saved config and a resumed run: they change how a run is
# executed or reported, not what it computes (a different mesh restores by resharding).
RESUMABLE_KEYS = ("mesh.", "train.progress", "train.log_every", "train.async_checkpoints",
                  "data.worker_count", "data.prefetch_buffer", "train.peak_flops_per_device")


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Runs an experiment file and returns its `get_config()`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment config file {path} does not exist")
    ns = runpy.run_path(str(path))
    if "get_config" not in ns:
        raise ConfigError(f"{path} defines no get_config()")
    cfg = ns["get_config"]()
    if not isinstance(cfg, ExperimentConfig):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not ExperimentConfig")
    return cfg


def from_json(d: dict) -> ExperimentConfig:
    from mmjax.tasks import get_task_class
    task_cls = get_task_class(d.get("task", ExperimentConfig.task))
    d = dict(d)
    model = from_dict(task_cls.model_config_cls, d.pop("model") or {}, _prefix="model.")
    loss = from_dict(task_cls.loss_config_cls, d.pop("loss") or {}, _prefix="loss.")
    return dataclasses.replace(from_dict(ExperimentConfig, d), model=model, loss=loss)


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Fills `loss` with the task's defaults and checks the sections have the task's types."""
    from mmjax.tasks import get_task_class
    task_cls = get_task_class(cfg.task)
    if cfg.loss is None:
        cfg = dataclasses.replace(cfg, loss=task_cls.loss_config_cls())
    for key, cls in (("model", task_cls.model_config_cls), ("loss", task_cls.loss_config_cls)):
        if not isinstance(getattr(cfg, key), cls):
            raise ConfigError(f"task {cfg.task!r} needs config.{key} to be a {cls.__name__}, "
                              f"got {type(getattr(cfg, key)).__name__}")
    t = cfg.train
    if t.steps <= 0 or t.batch_size <= 0 or t.eval_batch_size <= 0:
        raise ConfigError("train.steps, train.batch_size and train.eval_batch_size must be positive")
    from mmjax.train.optim import make_schedule
    make_schedule(cfg.optim, t.steps)  # a warm-up as long as the run: refused before the workdir is touched
    return cfg


__all__ = ["ExperimentConfig", "TrainConfig", "from_json", "load_experiment", "to_dict", "validate"]
