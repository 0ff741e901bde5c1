"""The interface every task implements for the trainer."""

from __future__ import annotations

import abc
from typing import Any

import jax
import numpy as np


class Task(abc.ABC):
    """A model, its loss and its evaluation, for one kind of batch.

    `model_config_cls` and `loss_config_cls` are the config types of `ExperimentConfig.model` and
    `ExperimentConfig.loss` for this task (used to read a saved config.json back strictly).
    """

    model_config_cls: type
    loss_config_cls: type
    # A grain Map applied to every example before tokenisation, in training and in `evaluate`.
    example_transform = None

    def __init__(self, cfg):
        self.cfg = cfg

    @abc.abstractmethod
    def example_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of one batch (for init, sharding and validation)."""

    @abc.abstractmethod
    def init_params(self, rng: jax.Array) -> Any:
        """Params with `nn.LogicallyPartitioned` boxes (sharding names), as `model.init` returns."""

    def train_iterator(self, *, global_batch_size: int, seed: int):
        """This process's training batches (`mmjax.data.pipeline.train_iterator` over cfg.data); a
        task whose examples need a transform of its own (a VLM's sequences) passes it here."""
        from mmjax.data import pipeline
        return pipeline.train_iterator(self.cfg.data, global_batch_size=global_batch_size, seed=seed,
                                       example_transform=self.example_transform)

    def init_extra(self, params) -> Any:
        return {}

    def make_optimizer(self, total_steps: int, params_example) -> tuple[Any, Any]:
        """→ (optax tx, lr schedule) over the whole param tree. Default: `cfg.optim` for every param;
        a task with several players (a GAN) returns one `optax.multi_transform` with a group each."""
        from mmjax.train.optim import make_optimizer
        return make_optimizer(self.cfg.optim, total_steps, params_example)

    def make_train_step(self, tx, schedule):
        """→ the pure `(state, batch) -> (state, metrics)` the loop jits. Default: the step factory
        over `loss_fn`; a task whose update is not one gradient of one loss (a GAN's two players,
        an EMA codebook written after the optimizer) builds its own step here."""
        from mmjax.train.step import make_train_step
        return make_train_step(self.loss_fn, tx, schedule)

    @abc.abstractmethod
    def loss_fn(self, params, extra, batch: dict, rng: jax.Array):
        """→ (scalar loss, (metrics dict, new extra)). A mean over the global batch."""

    @abc.abstractmethod
    def eval_fn(self, params, extra, batch: dict) -> dict[str, jax.Array]:
        """Sums over the valid examples of one padded eval batch; must include "count"."""

    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        return sums

    def evaluate(self, params, extra, mesh) -> dict[str, float]:
        """One exact pass over the eval split: `eval_fn` sums over padded global batches, then
        `summarize_eval`. Tasks whose metrics need all examples at once (retrieval) override this."""
        from mmjax import sharding as shd
        from mmjax.data import pipeline
        if not hasattr(self, "_eval_step"):
            self._eval_step = jax.jit(self.eval_fn)
        sums: dict[str, float] = {}
        for local in pipeline.eval_batches(self.cfg.data, split=self.cfg.data.eval_split,
                                           global_batch_size=self.cfg.train.eval_batch_size,
                                           example_transform=self.example_transform):
            out = jax.device_get(self._eval_step(params, extra, shd.make_global_batch(local, mesh)))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return self.summarize_eval(sums)

    def save_eval_artifacts(self, params, extra, mesh, directory, step: int) -> None:
        """Called on the main process after each evaluation: write what a person should look at
        (PNG grids of reconstructions or samples) under `directory` (the run's workdir).
        Default: nothing to look at."""
        return None

    @abc.abstractmethod
    def train_flops_per_example(self) -> float:
        """FLOPs of forward + backward for one example (3 × forward; formula in the model file)."""

    def check_batch(self, batch: dict[str, np.ndarray], step: int) -> None:
        """Host-side checks of a batch before it reaches the device; raise naming key and step."""
        expected = self.example_batch(1)
        for key, spec in expected.items():
            if key not in batch:
                raise ValueError(f"batch for step {step} has no {key!r} (keys: {sorted(batch)})")
            x = batch[key]
            if x.ndim != len(spec.shape) or tuple(x.shape[1:]) != tuple(spec.shape[1:]):
                raise ValueError(f"batch for step {step}: {key!r} has shape {x.shape}, expected "
                                 f"[B, {', '.join(map(str, spec.shape[1:]))}]")
            if np.dtype(x.dtype) != np.dtype(spec.dtype):
                raise TypeError(f"batch for step {step}: {key!r} has dtype {x.dtype}, expected {spec.dtype}")
            if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
                bad = np.unique(np.nonzero(~np.isfinite(x))[0])[:8].tolist()
                raise ValueError(f"batch for step {step}: {key!r} contains NaN/Inf (examples {bad})")
