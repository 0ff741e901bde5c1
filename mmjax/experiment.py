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
    # Params copied into a fresh run before step 1 (not on resume: the checkpoint wins), as
    # (target, source) pairs; see `init_from_params`. E.g. a VLM from a CLIP run's image tower and an
    # LM run: (("vision", "runs/clip_shapes:vision"), ("lm", "runs/lm_captions")).
    init_from: tuple[tuple[str, str], ...] = ()


# Keys that may differ between a workdir's saved config and a resumed run: they change how a run is
# executed or reported, not what it computes (a different mesh restores by resharding).
RESUMABLE_KEYS = ("mesh.", "train.progress", "train.log_every", "train.async_checkpoints",
                  "data.worker_count", "data.prefetch_buffer", "train.peak_flops_per_device",
                  "init_from")  # init_from only shapes step 0; a resumed run restores its checkpoint


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


class InitFromError(ConfigError):
    """Params that cannot initialise the model: the message lists every path and shape that differ."""


def latest_checkpoint_step(workdir: str | Path) -> int | None:
    """The newest step saved under workdir/checkpoints (None when there is none)."""
    ckpt = Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in ckpt.iterdir() if p.is_dir() and p.name.isdigit()] if ckpt.is_dir() else []
    return max(steps) if steps else None


def load_run(workdir: str | Path, step: int | None = None) -> tuple[ExperimentConfig, int, Any]:
    """(config, step, params as numpy) of a run directory's latest (or given) checkpoint, read onto
    the host whatever mesh saved it (the state as saved, without the train state's structure: the
    loop's fingerprints are not checked here). FileNotFoundError when the directory
    holds no run (config.json) or no checkpoint."""
    import json

    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    workdir = Path(workdir)
    if not (workdir / "config.json").is_file():
        raise FileNotFoundError(f"{workdir} is not a run directory (no config.json; `mmjax train --workdir` "
                                "writes one)")
    cfg = validate(from_json(json.loads((workdir / "config.json").read_text())))
    step = latest_checkpoint_step(workdir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"run {workdir} has no checkpoint yet (nothing under {workdir / 'checkpoints'})")
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    path = (workdir / "checkpoints" / str(step) / "state").absolute()
    ckptr = ocp.StandardCheckpointer()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                            dict(ckptr.metadata(path).item_metadata))
    state = ckptr.restore(path, abstract)
    return cfg, step, jax.tree.map(np.asarray, state["params"])


def _source_params(source: str, target: str):
    """The params a SOURCE[:SUBTREE] names: a run directory's latest checkpoint, or an HF
    directory (`mmjax.load_pretrained`); SUBTREE selects a '/'-path inside them. Without it, the
    subtree named like the target's last part when the source has one (a CLIP run's "vision" for
    "vision"), else the whole tree."""
    import jax
    import numpy as np

    path, _, sub = source.partition(":") if not Path(source).exists() else (source, "", "")
    p = Path(path)
    if (p / "checkpoints").is_dir() or ((p / "config.json").is_file() and not any(p.glob("*.safetensors*"))):
        _, step, params = load_run(p)
        where = f"{p} (run, step {step})"
    elif (p / "config.json").is_file():
        from mmjax.convert import load_pretrained
        _, params = load_pretrained(p)
        params = jax.tree.map(np.asarray, params)
        where = f"{p} (HF directory)"
    else:
        raise InitFromError(f"init_from source {path!r} is neither a run directory (checkpoints/) nor an HF "
                                "directory (config.json + safetensors)")
    last = target.rsplit("/", 1)[-1]
    if sub:
        for part in sub.split("/"):
            if not isinstance(params, dict) or part not in params:
                raise InitFromError(f"init_from source {where} has no subtree {sub!r} (top level: "
                                    f"{sorted(params) if isinstance(params, dict) else type(params).__name__})")
            params = params[part]
        where += f":{sub}"
    elif last and isinstance(params, dict) and last in params:
        params, where = params[last], where + f":{last}"
    return params, where


# Leaves whose vocabulary axis may grow (rows copied, the new ones keep the model's init): the LM's
# token embedding [V, D] (axis 0) and an untied head [D, V] (axis 1).
VOCAB_AXIS = {"token_embedding": 0, "head/kernel": 1}


def init_from_params(params, init_from, *, log=print):
    """Copies the sources of `init_from` ((target, source) pairs) into `params` (a fresh model's
    params, arrays or numpy; target "" = the whole tree, else a '/'-path such as "vision" or "lm").

    Every leaf of the target subtree must exist in the source with the same shape; otherwise an
    `InitFromError` lists the missing, unexpected and shape-mismatched paths. One growth is allowed
    and said in `log`: a vocabulary axis (VOCAB_AXIS) larger in the model than in the source (e.g.
    the LM's tokenizer plus `<image>`): rows 0..V_src-1 are copied, rows V_src.. keep the model's init.
    Returns the new params (each new leaf placed with the sharding of the leaf it replaces).
    """
    import jax
    import numpy as np

    from mmjax.convert.tree import flatten

    flat_model = flatten(params)
    out = dict(flat_model)
    for target, source in init_from:
        src, where = _source_params(source, target)
        prefix = f"{target}/" if target else ""
        want = {k[len(prefix):]: v for k, v in flat_model.items() if k.startswith(prefix)}
        if not want:
            raise InitFromError(f"init_from target {target!r} is no subtree of the model (top level: "
                                f"{sorted({k.split('/')[0] for k in flat_model})})")
        have = flatten(src)
        missing = sorted(set(want) - set(have))
        unexpected = sorted(set(have) - set(want))
        shapes, grown = [], []
        for k in sorted(set(want) & set(have)):
            a, b = tuple(want[k].shape), tuple(np.shape(have[k]))
            if a == b:
                continue
            axis = next((ax for name, ax in VOCAB_AXIS.items() if k.endswith(name)), None)
            if (axis is not None and len(a) == len(b) == 2 and a[1 - axis] == b[1 - axis] and a[axis] > b[axis]):
                grown.append((k, b[axis], a[axis]))
            else:
                shapes.append(f"    {k}: model {a}, source {b}")
        if missing or unexpected or shapes:
            lines = [f"init_from {target or '<whole model>'!r} ← {where} does not fit the model:"]
            if shapes:
                lines += ["  shape mismatches (path: model, source):"] + shapes
            if missing:
                lines += [f"  in the model, not in the source ({len(missing)}): {', '.join(missing[:12])}"]
            if unexpected:
                lines += [f"  in the source, not in the model ({len(unexpected)}): {', '.join(unexpected[:12])}"]
            raise InitFromError("\n".join(lines))
        for k, v in want.items():
            new = np.asarray(have[k]).astype(v.dtype)
            hit = next((g for g in grown if g[0] == k), None)
            if hit:
                axis = next(ax for name, ax in VOCAB_AXIS.items() if k.endswith(name))
                base = np.array(jax.device_get(v))
                idx = (slice(None),) * axis + (slice(0, hit[1]),)
                base[idx] = new
                new = base
                log(f"init_from: {prefix}{k} grows its vocabulary axis {hit[1]} → {hit[2]}: rows 0..{hit[1] - 1} "
                    f"copied from {where}, rows {hit[1]}..{hit[2] - 1} keep the model's init")
            sharding = getattr(v, "sharding", None)
            out[prefix + k] = (jax.make_array_from_callback(new.shape, sharding, lambda i, a=new: a[i])
                               if isinstance(sharding, jax.sharding.Sharding) else new)
        log(f"init_from: {target or '<whole model>'} ← {where} ({len(want)} arrays)")
    return _unflatten_like(params, out)


def _unflatten_like(tree, flat: dict):
    """`flat` ('/'-paths → leaves) back into the nested dicts of `tree`."""
    if not isinstance(tree, dict):
        raise TypeError(f"params must be nested dicts, got {type(tree).__name__}")

    def build(node, prefix):
        return {k: build(v, f"{prefix}{k}/") if isinstance(v, dict) else flat[f"{prefix}{k}"]
                for k, v in node.items()}
    return build(tree, "")


__all__ = ["ExperimentConfig", "InitFromError", "TrainConfig", "from_json", "init_from_params",
           "latest_checkpoint_step", "load_experiment", "load_run", "to_dict", "validate"]
