"""Checkpoints with orbax: train state + data-iterator state + config + fingerprints, async, atomic.

Each step directory holds four items:
  state        the TrainState pytree (orbax StandardSave; restorable onto any mesh by passing
               target shardings)
  data         the grain iterator's state (one JSON per process)
  config       the experiment config (JSON)
  fingerprint  one uint32 per state leaf: the wrap-around sum of the leaf's raw bits

orbax writes a step into a temporary directory and renames it when complete, so a run killed
mid-save leaves no half step behind. A step that later gets damaged on disk (truncated or
overwritten files) either fails to restore or restores values whose fingerprint differs; either
way `restore_latest` names the step and the reason, moves the step aside to
`<dir>_corrupt/<step>` (nothing is deleted) and falls back to the previous good step.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


@jax.jit
def _fingerprints(tree):
    """Per-leaf uint32 sum of the raw bits (exact and independent of how the leaf is sharded)."""
    def one(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        if x.dtype.itemsize == 8:
            x = x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.uint32)
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        u = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)
        # Weight by position so that swapped values change the sum too.
        w = (jnp.arange(u.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + 1).reshape(u.shape)
        return jnp.sum(u * w, dtype=jnp.uint32)
    return jax.tree.map(one, tree)


def fingerprint(tree) -> list[int]:
    return [int(v) for v in jax.tree.leaves(jax.device_get(_fingerprints(tree)))]


def _leaf_paths(tree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


class Checkpointer:
    """Keeps the last `keep` steps of a run in `directory`."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state, *, data_iterator=None, config: dict | None = None,
             force: bool = False) -> bool:
        import grain
        items = {"state": ocp.args.StandardSave(state),
                 "fingerprint": ocp.args.JsonSave({"leaves": fingerprint(state)})}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, step: int, abstract_state, *, data_iterator=None):
        """Restores step `step` into arrays laid out like `abstract_state` (ShapeDtypeStructs
        with shardings: a different mesh than the one that saved is fine). Verifies fingerprints."""
        import grain
        items = {"state": ocp.args.StandardRestore(abstract_state), "fingerprint": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = restored["state"]
        expected = restored["fingerprint"]["leaves"]
        got = fingerprint(state)
        if len(expected) != len(got):
            raise CheckpointError(f"step {step}: the saved state has {len(expected)} leaves, "
                                  f"the run expects {len(got)}")
        bad = [p for p, a, b in zip(_leaf_paths(state), expected, got) if a != b]
        if bad:
            raise CheckpointError(f"step {step}: restored values differ from what was saved "
                                  f"(fingerprint mismatch) in {len(bad)} leaves, e.g. {bad[:3]}")
        return state

    def restore_config(self, step: int) -> dict | None:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception:
            return None

    def restore_latest(self, abstract_state, *, data_iterator=None):
        """(step, state) of the newest step that restores intact, or None when there is no step.

        A damaged step is reported, moved to `<dir>_corrupt/<step>` and skipped. When steps exist
        but every one is damaged, this raises instead of silently starting from scratch (the
        damaged steps are then set aside, so a second start begins afresh).
        """
        steps = self.all_steps()
        reasons = []
        for step in reversed(steps):
            try:
                return step, self.restore(step, abstract_state, data_iterator=data_iterator)
            except Exception as e:
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log.warning("checkpoint step %d in %s is damaged (%s); falling back to an earlier step",
                            step, self.directory, reason)
                print(f"WARNING: checkpoint step {step} in {self.directory} is damaged ({reason}); "
                      "moved aside, falling back to an earlier step", flush=True)
                self._quarantine(step)
                reasons.append(f"step {step}: {reason}")
        if steps:
            raise CheckpointError(
                f"every checkpoint in {self.directory} is damaged, so the run stops rather than start "
                f"over; they were moved to {self.directory}_corrupt. " + "; ".join(reasons))
        return None

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            src = self.directory / str(step)
            dst = self.directory.parent / f"{self.directory.name}_corrupt" / str(step)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.exists():
                shutil.move(str(src), str(dst))
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or structs) with the given shardings."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


__all__ = ["CheckpointError", "Checkpointer", "abstract_like", "fingerprint"]
