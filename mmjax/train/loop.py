"""The training loop: owns the mesh, the sharded state, data, checkpoints, logging and evaluation.

    state = init or restore          (born sharded: eval_shape → shardings → jit(init, out_shardings))
    for step: batch → step_fn(state, batch) → (state, metrics)
    every log_every: NaN/Inf guard, metrics.jsonl + TensorBoard (loss, grad norm, lr, examples/s, MFU)
    every eval_every / checkpoint_every: exact eval over padded batches / async orbax checkpoint
    at the end: final eval → results.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax import sharding as shd
from mmjax.config import ConfigError, diff, to_dict
from mmjax.experiment import RESUMABLE_KEYS, ExperimentConfig, validate
from mmjax.tasks import Task, get_task_class
from mmjax.train.checkpoint import Checkpointer, abstract_like
from mmjax.train.metrics import MetricWriter, measure_matmul_peak, mfu
from mmjax.train.state import TrainState
from mmjax.train.step import jit_train_step


class NonFiniteError(FloatingPointError):
    """Training produced NaN or Inf; the message names the step and the metric."""


def create_sharded_state(task: Task, cfg: ExperimentConfig, mesh, tx):
    """Returns (init_fn, abstract_state_with_shardings, state_shardings, param_shardings).

    The params' shardings come from their logical names through the rules table; optimizer-state
    leaves that mirror params (Adam's mu and nu) get their param's sharding; the rest is replicated.
    """
    rules = cfg.mesh.rules
    replicated = NamedSharding(mesh, P())
    rng = jax.random.PRNGKey(cfg.train.seed)

    def init_state(rng):
        p_rng, s_rng = jax.random.split(rng)
        params = nn.meta.unbox(task.init_params(p_rng))
        return TrainState.create(params=params, tx=tx, rng=s_rng, extra=task.init_extra(params))

    boxed = jax.eval_shape(task.init_params, rng)
    param_sh = shd.tree_shardings(boxed, mesh, rules)
    abstract = jax.eval_shape(init_state, rng)
    opt_sh = _opt_state_shardings(abstract.opt_state, abstract.params, param_sh, replicated)
    state_sh = TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated,
                          extra=jax.tree.map(lambda _: replicated, abstract.extra))
    init_fn = jax.jit(init_state, out_shardings=state_sh)
    return init_fn, abstract_like(abstract, state_sh), state_sh, param_sh


def _dict_keys(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _opt_state_shardings(opt_state, params, param_sh, replicated):
    """Each optimizer-state leaf that mirrors a param (Adam's mu and nu, momentum; inside any
    composition of chains, masks and multi_transform groups) takes that param's sharding: a leaf
    whose dict-key path ends with a param's path and has its shape. Everything else (counts,
    scalars) is replicated."""
    by_path = {}
    for (path, p), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_sh)):
        by_path[_dict_keys(path)] = (p.shape, sh)

    def pick(path, leaf):
        keys = _dict_keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == getattr(leaf, "shape", None):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def check_workdir_config(workdir: Path, cfg_dict: dict) -> None:
    path = workdir / "config.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    changed = [k for k in diff(old, cfg_dict) if not any(k.startswith(r) for r in RESUMABLE_KEYS)]
    if changed:
        def get(d, k):
            for part in k.split("."):
                d = d.get(part, "<absent>") if isinstance(d, dict) else "<absent>"
            return d
        lines = "\n".join(f"  {k}: {get(old, k)!r} (saved) → {get(cfg_dict, k)!r} (new)" for k in changed)
        raise ConfigError(f"workdir {workdir} holds a run with a different config:\n{lines}\n"
                          "Use a new --workdir, or run with the saved config to resume.")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drops metric lines logged after the restored step (they will be logged again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _is_due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def train(cfg: ExperimentConfig, workdir: str | Path) -> dict:
    """Runs (or resumes) an experiment in `workdir`; returns the results also written to
    workdir/results.json."""
    cfg = validate(cfg)
    shd.maybe_initialize_distributed(cfg.mesh)
    t = cfg.train
    # The mesh and the batch are checked before anything is written to the workdir, so that the
    # same workdir still takes the fixed config.
    try:
        mesh = shd.make_mesh(cfg.mesh)
    except ValueError as e:
        raise ConfigError(f"mesh.shape={tuple(cfg.mesh.shape)} does not fit this machine: {e} "
                          "(an entry of -1 takes the remaining devices, e.g. (-1,1,1))") from None
    n_proc = jax.process_count()
    for key, size in (("batch_size", t.batch_size), ("eval_batch_size", t.eval_batch_size)):
        if size % (n_proc * mesh.shape["data"] * mesh.shape["fsdp"]):
            raise ConfigError(f"train.{key}={size} is not divisible by the data×fsdp mesh size "
                              f"{mesh.shape['data'] * mesh.shape['fsdp']} and {n_proc} processes")

    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_dict = to_dict(cfg)
    check_workdir_config(workdir, cfg_dict)
    is_main = jax.process_index() == 0
    if is_main:
        (workdir / "config.json").write_text(json.dumps(cfg_dict, indent=2))

    task = get_task_class(cfg.task)(cfg)

    # Measured before the mesh context: the probe runs on one device.
    peak = t.peak_flops_per_device or measure_matmul_peak()
    with jax.set_mesh(mesh), shd.logical_rules(cfg.mesh.rules):
        boxed = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
        tx, schedule = task.make_optimizer(t.steps, nn.meta.unbox(boxed))
        init_fn, abstract_state, state_sh, param_sh = create_sharded_state(task, cfg, mesh, tx)

        train_iter = task.train_iterator(global_batch_size=t.batch_size, seed=t.seed)
        ckpt = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints, async_save=t.async_checkpoints)
        restored = ckpt.restore_latest(abstract_state, data_iterator=train_iter)
        if restored is None:
            start, state = 0, init_fn(jax.random.PRNGKey(t.seed))
            if cfg.init_from:  # pretrained params into the fresh state (Adam's zeros do not depend on them)
                from mmjax.experiment import init_from_params
                state = state.replace(params=init_from_params(state.params, cfg.init_from,
                                                              log=lambda m: print(m, flush=True)))
        else:
            start, state = restored
            print(f"resumed from step {start} in {ckpt.directory}", flush=True)
            if is_main:
                _truncate_metrics(workdir / "metrics.jsonl", start)

        example = task.example_batch(t.batch_size)
        batch_sh = {k: shd.batch_sharding(mesh, len(v.shape)) for k, v in example.items()}
        step_fn = jit_train_step(task.make_train_step(tx, schedule), state_sh, batch_sh)

        writer = MetricWriter(workdir)
        flops = task.train_flops_per_example()
        # Simulated CPU devices share the host's cores: the measured peak is per host.
        n_dev = n_proc if jax.default_backend() == "cpu" else jax.device_count()
        bar = None
        if t.progress and is_main:
            from tqdm import tqdm
            bar = tqdm(total=t.steps, initial=start, desc=cfg.name, dynamic_ncols=True)

        pending: list[tuple[int, dict]] = []
        last_train: dict = {}
        last_eval: dict = {}
        tick, tick_step = time.perf_counter(), start
        try:
            for s in range(start + 1, t.steps + 1):
                local = next(train_iter)
                local = {k: local[k] for k in example}
                if t.check_batches:
                    task.check_batch(local, s)
                state, metrics = step_fn(state, shd.make_global_batch(local, mesh))
                pending.append((s, metrics))
                if bar is not None:
                    bar.update(1)
                eval_due = _is_due(s, t.eval_every, t.steps)
                ckpt_due = _is_due(s, t.checkpoint_every, t.steps)
                if _is_due(s, t.log_every, t.steps) or eval_due or ckpt_due:
                    host = jax.device_get(pending)
                    jax.block_until_ready(state)
                    for step_i, m in host:
                        for k, v in m.items():
                            if not np.all(np.isfinite(v)):
                                done = ckpt.all_steps()
                                raise NonFiniteError(
                                    f"step {step_i}: metric '{k}' is {float(np.mean(v))}; stopping. "
                                    f"Last checkpoint: {done[-1] if done else 'none'} in {ckpt.directory}")
                    elapsed = time.perf_counter() - tick
                    eps = (s - tick_step) * t.batch_size / max(elapsed, 1e-9)
                    # Means over the interval, except the learning rate: its value at the last step.
                    last_train = {k: float(np.mean([m[k] for _, m in host])) for k in host[-1][1]}
                    if "lr" in last_train:
                        last_train["lr"] = float(host[-1][1]["lr"])
                    last_train["examples_per_sec"] = eps
                    last_train["mfu"] = mfu(flops, eps, peak, n_dev)
                    writer.write(s, last_train, prefix="train/")
                    if bar is not None:
                        bar.set_postfix(loss=f"{last_train['loss']:.4f}")
                    pending = []
                    if eval_due:
                        last_eval = task.evaluate(state.params, state.extra, mesh)
                        writer.write(s, last_eval, prefix="eval/")
                        if is_main:
                            task.save_eval_artifacts(state.params, state.extra, mesh, workdir, s)
                        if bar is not None:
                            # Numbers only: text results (an LM's sampled captions) go to the files.
                            bar.write(f"step {s}: eval " + ", ".join(f"{k}={v:.4g}" for k, v in last_eval.items()
                                                                     if isinstance(v, (int, float))))
                    if ckpt_due:
                        ckpt.save(s, state, data_iterator=train_iter, config=cfg_dict)
                    tick, tick_step = time.perf_counter(), s
            if not last_eval:
                last_eval = task.evaluate(state.params, state.extra, mesh)
                writer.write(int(state.step), last_eval, prefix="eval/")
                if is_main:
                    task.save_eval_artifacts(state.params, state.extra, mesh, workdir, int(state.step))
            if t.steps not in ckpt.all_steps() and start < t.steps:
                ckpt.save(t.steps, state, data_iterator=train_iter, config=cfg_dict, force=True)
        finally:
            if bar is not None:
                bar.close()
            ckpt.close()
            writer.close()

    results = {"name": cfg.name, "step": int(jax.device_get(state.step)), "eval": last_eval,
               "train": last_train, "train_flops_per_example": flops, "peak_flops_per_device": peak}
    if is_main:
        (workdir / "results.json").write_text(json.dumps(results, indent=2))
    return results


__all__ = ["NonFiniteError", "create_sharded_state", "train"]
