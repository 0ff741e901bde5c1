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
way `restore_latest` names the step and the reason (one line: the error tensorstore or orbax
really raised), moves the step aside to `<dir>_corrupt/<step>` (`<step>.1`, `<step>.2`, ... when
a step of that number was set aside before; nothing is deleted) and falls back to the previous
good step. Once a step fails to restore, the tracebacks that orbax's abandoned reads of it would
print (one per array, through asyncio's logger and `sys.unraisablehook`) are dropped: the reason
says it (`_quiet_abandoned_reads`).
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
import warnings
from collections.abc import Callable
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


def failure_reason(e: BaseException, limit: int = 400) -> str:
    """One line saying why a restore failed: the innermost cause of `e` (orbax wraps tensorstore's
    error in an Exception whose message is a repr of the bound method `TensorStore.spec`), without
    the tensorstore spec JSON that tensorstore appends. A longer message keeps its start (what was
    read) and its end (tensorstore's most specific reason), `limit` characters in all."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
        if nxt is None:
            break
        e = nxt
    text = str(e).strip()
    text = text.split(" [tensorstore_spec", 1)[0]
    text = re.sub(r'(?:Error opening "[\w-]+" driver: )+', "", text)  # tensorstore's driver layers
    text = re.sub(r"\s+", " ", text.splitlines()[0] if text else "")
    if len(text) > limit:
        half = (limit - 5) // 2
        text = f"{text[:half]} ... {text[-half:]}"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _through_orbax(tb) -> bool:
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _is_abandoned_read(exc: BaseException | None, tb=None, text: str = "") -> bool:
    """Whether an error reported after the fact comes from the reads of a failed orbax restore."""
    if exc is not None and tb is None:
        tb = exc.__traceback__
    if _through_orbax(tb) or "orbax" in text or "tensorstore" in text.lower():
        return True
    if exc is None:
        return False
    if "tensorstore" in str(exc).lower() or "OCDBT" in str(exc):
        return True
    # tensorstore completing a read into orbax's event loop after orbax closed it
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and "call_soon_threadsafe" in frames


class _DropAbandonedReads(logging.Filter):
    """asyncio's "Task/Future exception was never retrieved" for orbax's abandoned reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "exception was never retrieved" not in text:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return not _is_abandoned_read(exc, None, text)


def _quiet_abandoned_reads() -> Callable[[], None]:
    """Keeps the reads of a failed restore from printing tracebacks; returns a function that undoes
    it (called when the restore succeeds: then nothing was abandoned).

    When orbax fails to restore a step, its other reads of that step go on in tensorstore's threads
    and report later (each with the whole tensorstore spec; thousands of lines for a real model,
    some of them only at interpreter exit): "Task/Future exception was never retrieved" through
    asyncio's logger, "Exception ignored in: <coroutine _read_array_index_and_device_put>" and
    "RuntimeError: Event loop is closed" through `sys.unraisablehook`, and a RuntimeWarning for
    each read coroutine that never started (that filter stays even after a successful restore).
    The step's one-line reason already says what is wrong, so these are dropped, from the restore
    on for the rest of the process; any other unraisable exception or asyncio error still gets
    through."""
    # Reads that never started: "RuntimeWarning: coroutine ... was never awaited" when collected.
    warnings.filterwarnings("ignore", message=r"coroutine '_read_array_index_and_device_put' was never awaited",
                            category=RuntimeWarning)
    asyncio_log = logging.getLogger("asyncio")
    undo = []
    if not any(isinstance(f, _DropAbandonedReads) for f in asyncio_log.filters):
        drop = _DropAbandonedReads()
        asyncio_log.addFilter(drop)
        undo.append(lambda: asyncio_log.removeFilter(drop))
    previous = sys.unraisablehook
    if not getattr(previous, "_mmjax_quiet", False):
        def hook(u):
            if not _is_abandoned_read(u.exc_value, u.exc_traceback, repr(u.object) if u.object is not None else ""):
                previous(u)

        def restore_hook():
            if sys.unraisablehook is hook:
                sys.unraisablehook = previous

        hook._mmjax_quiet = True
        sys.unraisablehook = hook
        undo.append(restore_hook)

    def undo_all() -> None:
        for f in undo:
            f()

    return undo_all


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

        A damaged step is reported with a one-line reason, moved to `<dir>_corrupt/<step>` (or
        `<step>.N` beside an earlier copy) and skipped. When steps exist but every one is damaged,
        this raises a CheckpointError naming each step and its reason instead of silently starting
        from scratch (the damaged steps are then set aside, so a second start begins afresh).
        """
        steps = self.all_steps()
        reasons = []
        for step in reversed(steps):
            unquiet = _quiet_abandoned_reads()
            try:
                state = self.restore(step, abstract_state, data_iterator=data_iterator)
            except Exception as e:  # the quieting stays: the abandoned reads report later
                reason = failure_reason(e)
            else:
                unquiet()
                return step, state
            dst = self._quarantine(step)
            log.warning("checkpoint step %d in %s is damaged (%s); moved to %s", step, self.directory, reason, dst)
            print(f"WARNING: checkpoint step {step} in {self.directory} is damaged ({reason}); "
                  f"moved to {dst}, falling back to an earlier step", flush=True)
            reasons.append(f"  step {step}: {reason}")
        if steps:
            raise CheckpointError(
                f"every checkpoint in {self.directory} is damaged, so the run stops rather than start "
                f"over; they were moved to {self.corrupt_directory}:\n" + "\n".join(reasons)) from None
        return None

    @property
    def corrupt_directory(self) -> Path:
        return self.directory.parent / f"{self.directory.name}_corrupt"

    def _quarantine(self, step: int) -> Path:
        """Moves step `step` to `<dir>_corrupt/<step>`, or `<step>.1`, `<step>.2`, ... when that
        name is taken (the same step number damaged again in this workdir); returns where."""
        dst = self.corrupt_directory / str(step)
        n = 0
        while dst.exists():
            n += 1
            dst = self.corrupt_directory / f"{step}.{n}"
        if jax.process_index() == 0:
            src = self.directory / str(step)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.exists():
                shutil.move(str(src), str(dst))  # dst does not exist: a rename, never into a directory
        self.manager.reload()
        return dst

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or structs) with the given shardings."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


__all__ = ["CheckpointError", "Checkpointer", "abstract_like", "fingerprint"]
