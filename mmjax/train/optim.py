"""Optimizer factory: AdamW or SGD, warmup + cosine/linear decay, global-norm clipping,
a weight-decay mask, frozen params and per-group learning-rate multipliers, all by regex over
param paths such as "encoder/block_3/attn/query/kernel".

    tx = chain(zero frozen grads, clip by global norm, multi_transform({group: base(lr · mult)}))
"""

from __future__ import annotations

import re
from typing import Literal

import jax
import optax

from mmjax.config import ConfigError, config


@config
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    peak_lr: float = 1e-3
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    end_lr_ratio: float = 0.0  # the decayed lr at the last step, as a fraction of peak_lr
    # "constant" only: a linear decay to end_lr_ratio · peak_lr over the last cooldown_steps
    # (warmup-stable-decay, MiniCPM's WSD: the rate stays high until late, then anneals)
    cooldown_steps: int = 0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.9  # sgd
    nesterov: bool = False
    weight_decay: float = 0.0  # decoupled (AdamW-style) for both optimizers
    wd_mask: str = r".*kernel$"  # regex: params whose path matches get weight decay
    grad_clip_norm: float | None = 1.0
    freeze: tuple[str, ...] = ()  # regexes: matching params are not updated (and hold no opt state)
    lr_mults: tuple[tuple[str, float], ...] = ()  # (regex, multiplier); the first match wins


def param_paths(tree) -> dict:
    """A tree of the same structure whose leaves are '/'-joined key paths."""
    def name(path, _):
        return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    return jax.tree_util.tree_map_with_path(name, tree)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if cfg.warmup_steps >= total_steps and cfg.schedule != "constant":
        raise ConfigError(f"optim.warmup_steps={cfg.warmup_steps} must be below the {total_steps} total steps "
                          "(train.steps); lower the warm-up or train longer")
    if cfg.cooldown_steps and (cfg.schedule != "constant" or cfg.cooldown_steps < 0
                               or cfg.warmup_steps + cfg.cooldown_steps > total_steps):
        raise ConfigError(f"optim.cooldown_steps={cfg.cooldown_steps} needs schedule='constant' and must fit after "
                          f"the {cfg.warmup_steps} warm-up steps in the {total_steps} total steps")
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    end = cfg.peak_lr * cfg.end_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.peak_lr, decay_steps, alpha=cfg.end_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.peak_lr, end, decay_steps)
    elif cfg.cooldown_steps:
        decay = optax.join_schedules([optax.constant_schedule(cfg.peak_lr),
                                      optax.linear_schedule(cfg.peak_lr, end, cfg.cooldown_steps)],
                                     [decay_steps - cfg.cooldown_steps])
    else:
        decay = optax.constant_schedule(cfg.peak_lr)
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.peak_lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def _base(cfg: OptimConfig, lr: optax.Schedule, wd_mask) -> optax.GradientTransformation:
    if cfg.name == "adamw":
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=wd_mask)
    if cfg.name == "sgd":
        parts = [optax.trace(cfg.momentum, nesterov=cfg.nesterov)] if cfg.momentum else []
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay, wd_mask))
        return optax.chain(*parts, optax.scale_by_learning_rate(lr))
    raise ValueError(f"unknown optimizer {cfg.name!r}; expected 'adamw' or 'sgd'")


def make_optimizer(cfg: OptimConfig, total_steps: int, params_example=None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (tx, schedule). `params_example` (arrays or ShapeDtypeStructs) is only used to
    check that every freeze / lr-mult regex matches at least one param (a typo is an error)."""
    schedule = make_schedule(cfg, total_steps)
    freeze = [re.compile(r) for r in cfg.freeze]
    mults = [(re.compile(r), float(m)) for r, m in cfg.lr_mults]
    wd_re = re.compile(cfg.wd_mask)

    def label(path: str) -> str:
        if any(r.fullmatch(path) for r in freeze):
            return "frozen"
        for i, (r, _) in enumerate(mults):
            if r.fullmatch(path):
                return f"mult{i}"
        return "default"

    def labels(params):
        return jax.tree.map(label, param_paths(params))

    def wd_mask(params):
        return jax.tree.map(lambda p: bool(wd_re.fullmatch(p)), param_paths(params))

    if params_example is not None:
        paths = jax.tree.leaves(param_paths(params_example))
        for r in freeze + [r for r, _ in mults]:
            if not any(r.fullmatch(p) for p in paths):
                raise ValueError(f"optimizer regex {r.pattern!r} matches no param; e.g. {paths[:3]}")

    groups = {"default": _base(cfg, schedule, wd_mask), "frozen": optax.set_to_zero()}
    for i, (_, m) in enumerate(mults):
        groups[f"mult{i}"] = _base(cfg, lambda s, m=m: schedule(s) * m, wd_mask)
    parts = []
    if freeze:
        # Frozen grads must not count towards the clipping norm.
        parts.append(optax.masked(optax.set_to_zero(), lambda p: jax.tree.map(lambda x: x == "frozen", labels(p))))
    if cfg.grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(optax.multi_transform(groups, labels))
    return optax.chain(*parts), schedule
