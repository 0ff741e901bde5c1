"""Train-step benchmarks on this machine, in fp32: compile time, step time, memory, FLOPs, MFU.

    python -m mmjax.bench [--model vit] [--variants S/16,B/16] [--image-size 224] [--batch-size 8]
                          [--steps 3] [--scan-modes off,on] [--out bench_vit.json]
    python -m mmjax.bench --model clip [--configs tiny,S/16] [--batch-size N] [--steps 5]
                          [--warmup 2] [--scan-modes off,on] [--hf-attn sdpa] [--out bench_clip.json]
    mmjax bench ...                      (the same, through the CLI)

Two model families share one core (the library's real AdamW train step, timed the same way, the
fp32 matmul peak measured in the same run, one process per case, JSON + a printed table):

`--model vit`: for each ViT variant and each `scan_layers` setting, the library's own
classification task (ViT, 1000 classes, 3 channels) and its real AdamW train step
(`make_optimizer` → `make_train_step` → `jit_train_step`, state donated, state born sharded on a
one-device mesh exactly as the training loop does it).

`--model clip`: for each CLIP config ("tiny", "S/16"; see CLIP_CONFIGS) our contrastive task's
train step against HF transformers' `CLIPModel` train step in PyTorch, in the same run, on the
same weights and the same batch: a randomly initialised `CLIPModel` is saved with
`save_pretrained` and loaded on our side with `mmjax.load_pretrained` (so the two configs are one
config, through the converter's mapping), both see the same images, token ids and padding masks,
compute the same CLIP softmax loss (`return_loss=True` on HF's side), take gradients for every
param and apply AdamW with the same lr / betas / eps / weight decay on every param, no gradient
clipping, no dropout, fp32 both. HF runs with `torch.set_num_threads(os.cpu_count())`. Each case
records both sides' loss at step 0: equal weights and equal work give equal losses (checked to
1e-4 by tests/test_bench.py).

Figures, per timed side:

    compile_s      ours: wall time of `step.lower(state, batch)` + `.compile()` (reported separately too)
    step_s         median of `steps` timed steps after `warmup` untimed ones, each step synchronous
                   (`block_until_ready` on our side; PyTorch on the CPU is synchronous)
    images_per_s   batch_size / step_s
    flops_formula  task.train_flops_per_example() × batch: 3 × forward matmul FLOPs (ViT:
                   vit_forward_flops; CLIP: image tower + text tower over the padded length)
    flops_xla      compiled.cost_analysis()["flops"]    (XLA's count for the whole step)
    mfu            flops_formula / step_s / peak, with the fp32 matmul peak measured by
                   `measure_matmul_peak` at the start of this same run; the peak is measured again
                   at the end, `mfu_best_peak` uses the larger of the two, and a run whose two peaks
                   differ by more than 15% is flagged (other load on the cores: MFU unreliable)
    memory         XLA's buffer assignment of the compiled step (`memory_analysis()`: temp, argument,
                   output and alias bytes) and, separately, the OS's high-water mark of the process's
                   resident memory (`getrusage(...).ru_maxrss`)

By default every timed side runs in a fresh spawned process so that its max RSS is its own
(ru_maxrss only ever grows within a process) and no compilation cache or thread pool is shared.

Caveats that the figures carry with them (and the JSON states):
- XLA's cost analysis counts a while loop's body once, not once per trip. With scan_layers the
  encoder blocks are one `while` loop, so `flops_xla` then covers roughly one block of `depth`.
- XLA counts elementwise ops (norms, GELU, softmax, AdamW) as FLOPs too; the formula does not.
- temp + argument + output double-counts the donated state (its outputs alias its arguments);
  `xla_bytes_no_alias` subtracts the aliased bytes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

MIB = 2**20
PEAK_DRIFT_WARN = 0.15  # start and end matmul peaks further apart than this: flag the run


# ----------------------------------------------------------------------------- machine facts

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _current_rss_bytes() -> int | None:
    """Resident memory now (Linux /proc/self/statm); None elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _max_rss_bytes() -> int:
    """The process's resident-memory high-water mark (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def machine_info() -> dict:
    import flax
    import jaxlib
    import optax

    from mmjax.runtime import thp_mode
    dev = jax.devices()[0]
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "flax_version": flax.__version__,
        "optax_version": optax.__version__,
        "python_version": platform.python_version(),
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity_count": affinity,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # The `mmjax` command runs under its malloc tunables (mmjax/runtime.py); benchmark sides
        # started from it, ours and PyTorch's, inherit the same environment.
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "thp_mode": thp_mode(),
    }


# ----------------------------------------------------------------------------- shared timing core

def _memory_figures(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:  # some backends do not report it
        return {"xla_memory_available": False}
    temp, arg, out, alias = (int(m.temp_size_in_bytes), int(m.argument_size_in_bytes),
                             int(m.output_size_in_bytes), int(m.alias_size_in_bytes))
    figs = {
        "xla_memory_available": True,
        "xla_temp_bytes": temp,
        "xla_argument_bytes": arg,
        "xla_output_bytes": out,
        "xla_alias_bytes": alias,
        "xla_generated_code_bytes": int(m.generated_code_size_in_bytes),
        "xla_bytes": temp + arg + out,  # temp + argument + output, as XLA reports them
        "xla_bytes_no_alias": temp + arg + out - alias,  # donated outputs reuse argument buffers
    }
    peak = getattr(m, "peak_memory_in_bytes", None)
    if peak is not None:
        figs["xla_peak_memory_bytes"] = int(peak)
    return figs


def _cost_figures(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per computation
        cost = cost[0] if cost else {}
    cost = cost or {}
    return {"flops_xla": float(cost.get("flops", float("nan"))),
            "transcendentals_xla": float(cost.get("transcendentals", float("nan"))),
            "bytes_accessed_xla": float(cost.get("bytes accessed", float("nan")))}


class LocalStepper:
    """One side's train step, built (and compiled) and ready to time.

    step() runs one train step and returns only when its work is done; loss_of(result) reads the
    step's loss (outside the timed region); figures() returns the side's static figures (sizes,
    compile time, memory, ...) at the end of the run."""

    def __init__(self, step: Callable[[], Any], loss_of: Callable[[Any], float], figures: Callable[[], dict]):
        self._step, self._loss_of, self._figures = step, loss_of, figures

    def timed_step(self) -> tuple[float, float]:
        """→ (seconds, loss)."""
        t = time.perf_counter()
        out = self._step()
        dt = time.perf_counter() - t
        return dt, float(self._loss_of(out))

    def figures(self) -> dict:
        return self._figures()

    def close(self) -> None:
        pass


def _serve(conn, builder: Callable[..., LocalStepper], kwargs: dict) -> None:
    """The child's side of RemoteStepper: build, then answer "step" / "figures" until "close"."""
    import traceback
    try:
        stepper = builder(**kwargs)
        conn.send(("ok", None))
        while (cmd := conn.recv()) != "close":
            conn.send(("ok", stepper.timed_step() if cmd == "step" else stepper.figures()))
    except BaseException:  # reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))


class RemoteStepper:
    """A LocalStepper built by `builder(**kwargs)` in a fresh spawned process, driven over a pipe:
    its max RSS, compilation cache and thread pools are its own, and while another side steps it
    waits idle in `recv`."""

    def __init__(self, builder: Callable[..., LocalStepper], kwargs: dict):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._what = getattr(builder, "__name__", str(builder))
        self._proc = ctx.Process(target=_serve, args=(child, builder, kwargs), daemon=True)
        self._proc.start()
        child.close()
        self._recv()

    def _recv(self):
        try:
            status, value = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the benchmark process for {self._what} died (exit code "
                               f"{self._proc.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"the benchmark process for {self._what} failed:\n{value}")
        return value

    def timed_step(self) -> tuple[float, float]:
        self._conn.send("step")
        return tuple(self._recv())

    def figures(self) -> dict:
        self._conn.send("figures")
        return self._recv()

    def close(self) -> None:
        if self._proc.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send("close")
            self._proc.join(30)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join()
        self._conn.close()


def time_interleaved(steppers: Sequence, *, warmup: int, steps: int) -> list[dict]:
    """Times several sides under the same conditions: `warmup` untimed steps of each, then `steps`
    rounds in which every side takes one timed step, the order reversed every other round (A B,
    B A, ...) so that load from other processes falls on both sides alike.

    Returns per side {"loss_step0": the first step's loss (at the initial params), "last_loss",
    "step_times_s": [steps], "step_s": their median}.
    """
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1 (the first step pays one-off costs), got {warmup}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    n = len(steppers)
    first = [s.timed_step()[1] for s in steppers]
    for _ in range(warmup - 1):
        for s in steppers:
            s.timed_step()
    times: list[list[float]] = [[] for _ in range(n)]
    last = [math.nan] * n
    for k in range(steps):
        for i in (range(n) if k % 2 == 0 else reversed(range(n))):
            dt, last[i] = steppers[i].timed_step()
            times[i].append(dt)
    return [{"loss_step0": first[i], "last_loss": last[i], "step_times_s": times[i],
             "step_s": statistics.median(times[i])} for i in range(n)]


def _throughput_figures(flops_per_example: float, batch_size: int, step_s: float, peak_flops: float) -> dict:
    from mmjax.train.metrics import mfu
    images_per_s = batch_size / step_s
    return {"images_per_s": images_per_s,
            "achieved_flops_per_s": flops_per_example * batch_size / step_s,
            "peak_flops_per_s": peak_flops,
            # CPU: the measured peak is per host (simulated devices share its cores), as the loop does.
            "mfu": mfu(flops_per_example, images_per_s, peak_flops, 1)}


def _side_result(static: dict, timing: dict, batch_size: int, peak_flops: float) -> dict:
    """A side's figures: its static ones, its timing and the throughput derived from them."""
    return {**static, **timing,
            **_throughput_figures(static["flops_per_example"], batch_size, timing["step_s"], peak_flops)}


def jax_train_stepper(task, cfg, local_batch: dict, *, params=None, extra_figures: dict | None = None
                      ) -> LocalStepper:
    """Builds and compiles the library's train step for `task` on a one-device mesh.

    The state is born sharded as in the training loop; from `params` (a plain param tree, e.g.
    from `load_pretrained`) when given, else from `task.init_params`. local_batch: the task's
    batch as numpy arrays, global batch = its leading dim. figures(): sizes, init / lower /
    compile times, FLOPs (formula and XLA's), XLA memory and RSS (see the module docstring),
    after `extra_figures`.
    """
    import flax.linen as nn

    from mmjax import sharding as shd
    from mmjax.train.loop import create_sharded_state
    from mmjax.train.optim import make_optimizer
    from mmjax.train.state import TrainState
    from mmjax.train.step import jit_train_step, make_train_step

    rss_start = _current_rss_bytes()
    batch_size = int(next(iter(local_batch.values())).shape[0])
    task.check_batch(local_batch, 0)
    mesh = shd.make_mesh(dataclasses.replace(cfg.mesh, shape=(1, 1, 1)), jax.devices()[:1])
    seed = cfg.train.seed
    with jax.set_mesh(mesh), shd.logical_rules(cfg.mesh.rules):
        boxed = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
        tx, schedule = make_optimizer(cfg.optim, cfg.train.steps, nn.meta.unbox(boxed))
        init_fn, _, state_sh, _ = create_sharded_state(task, cfg, mesh, tx)
        t = time.perf_counter()
        if params is None:
            state = jax.block_until_ready(init_fn(jax.random.PRNGKey(seed)))
        else:
            from_params = jax.jit(lambda p, rng: TrainState.create(params=p, tx=tx, rng=rng,
                                                                   extra=task.init_extra(p)),
                                  out_shardings=state_sh)
            state = jax.block_until_ready(from_params(params, jax.random.PRNGKey(seed)))
        init_s = time.perf_counter() - t
        n_params = int(sum(x.size for x in jax.tree.leaves(state.params)))

        example = task.example_batch(batch_size)
        batch_sh = {k: shd.batch_sharding(mesh, len(v.shape)) for k, v in example.items()}
        batch = shd.make_global_batch(local_batch, mesh)
        step_fn = jit_train_step(make_train_step(task.loss_fn, tx, schedule), state_sh, batch_sh)

        t0 = time.perf_counter()
        lowered = step_fn.lower(state, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()

    def one_step():
        nonlocal state
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        return metrics

    def figures():
        flops_per_example = task.train_flops_per_example()
        flops_formula = flops_per_example * batch_size
        cost = _cost_figures(compiled)
        return {**(extra_figures or {}), "num_params": n_params, "init_s": init_s, "lower_s": t1 - t0,
                "compile_only_s": t2 - t1,
                "compile_s": t2 - t0,  # lower + compile
                "flops_per_example": flops_per_example, "flops_formula": flops_formula, **cost,
                "xla_over_formula": cost["flops_xla"] / flops_formula, **_memory_figures(compiled),
                "rss_at_start_bytes": rss_start, "max_rss_bytes": _max_rss_bytes()}

    return LocalStepper(one_step, lambda m: float(m["loss"]), figures)


def _isolated(fn: Callable[..., dict], kwargs: dict) -> dict:
    """Runs `fn(**kwargs)` in a fresh spawned process (its own ru_maxrss, compilation and threads)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, **kwargs).result()


def _add_best_peak(obj, best_peak: float) -> None:
    """Adds "mfu_best_peak" next to every "achieved_flops_per_s" in a (nested) result dict."""
    if isinstance(obj, dict):
        if "achieved_flops_per_s" in obj:
            obj["mfu_best_peak"] = obj["achieved_flops_per_s"] / best_peak
        for v in obj.values():
            _add_best_peak(v, best_peak)


def _non_finite(obj, path=()) -> list[list]:
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [list(path)]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _non_finite(v, (*path, k))]
    return []


def run_cases(cases: Sequence[tuple[Callable[[dict], dict], dict]], *, peak_matmul_n: int, peak_repeats: int,
              verbose: bool) -> tuple[list[dict], dict, dict]:
    """Measures the fp32 matmul peak, runs each `case_fn(dict(kwargs, peak_flops=peak))`, measures
    the peak again, and adds mfu_best_peak everywhere. Returns (results, peak dict, machine dict)."""
    from mmjax.train.metrics import measure_matmul_peak

    load_start = os.getloadavg()
    peak = measure_matmul_peak(n=peak_matmul_n, repeats=peak_repeats)
    if verbose:
        print(f"fp32 matmul peak ({peak_matmul_n}³): {peak / 1e9:.1f} GFLOP/s", flush=True)
    results = [case_fn(dict(kwargs, peak_flops=peak)) for case_fn, kwargs in cases]
    peak_end = measure_matmul_peak(n=peak_matmul_n, repeats=peak_repeats)
    best_peak = max(peak, peak_end)
    for r in results:
        _add_best_peak(r, best_peak)
    peak_info = {"what": f"best of {peak_repeats} fp32 n×n×n matmuls (2n³ FLOPs) via measure_matmul_peak",
                 "matmul_n": peak_matmul_n, "flops_per_s": peak, "flops_per_s_end": peak_end,
                 "flops_per_s_best": best_peak,
                 "unstable": bool(abs(peak - peak_end) > PEAK_DRIFT_WARN * best_peak)}
    machine = {**machine_info(), "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg())}
    return results, peak_info, machine


def _table(cols: Sequence[tuple[str, str]], rows: Sequence[Sequence]) -> list[str]:
    cells = [[f.format(v) for (_, f), v in zip(cols, row)] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (h, _) in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return [line([h for h, _ in cols]), line(["-" * w for w in widths])] + [line(c) for c in cells]


def _peak_line(pk: dict) -> str:
    out = (f"fp32 matmul peak ({pk['matmul_n']}³): {pk['flops_per_s'] / 1e9:.1f} GFLOP/s at start "
           f"(used for MFU), {pk['flops_per_s_end'] / 1e9:.1f} GFLOP/s at end")
    if pk.get("unstable"):
        out += ("  ** the two peaks differ by more than "
                f"{int(100 * PEAK_DRIFT_WARN)}%: the machine was busy; MFU is unreliable **")
    return out


def _write(results: dict, out: str | Path | None, table: str, verbose: bool) -> dict:
    bad = _non_finite(results.get("cases", []), ("cases",))
    if bad:
        results["non_finite"] = bad
    if verbose:
        print(table, flush=True)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
        if verbose:
            print(f"wrote {out}", flush=True)
    return results


_UNITS = {"*_s": "seconds", "*_bytes": "bytes", "flops_*": "FLOPs per train step",
          "mfu": "achieved formula FLOP/s as a fraction of the peak measured at the start",
          "mfu_best_peak": "the same against the larger of the start and end peaks (a peak "
                           "measured while other processes use the cores reads low)",
          "xla_bytes": "memory_analysis temp + argument + output of the compiled train step",
          "xla_bytes_no_alias": "xla_bytes minus the donated (aliased) state's bytes",
          "xla_peak_memory_bytes": "memory_analysis().peak_memory_in_bytes as XLA reports it; on "
                                   "the CPU backend it has equalled argument bytes, i.e. it is "
                                   "not a live-buffer peak there",
          "max_rss_bytes": "getrusage ru_maxrss of the process that ran the case "
                           "(a fresh process per case when isolate is true)"}

_SCAN_NOTE = ("scan_layers: XLA's cost analysis counts the scanned blocks' while-loop body once, so "
              "flops_xla covers about one of the encoder blocks")


# ----------------------------------------------------------------------------- ViT

def bench_case(variant: str, *, scan: bool, image_size: int = 224, batch_size: int = 8, steps: int = 3,
               peak_flops: float, num_classes: int = 1000, seed: int = 0) -> dict:
    """Builds and times one ViT train step in fp32; returns its figures (see the module docstring)."""
    from mmjax.experiment import ExperimentConfig, TrainConfig, validate
    from mmjax.models.vit import vit_config, vit_forward_flops
    from mmjax.tasks import ClassificationTask
    from mmjax.train.optim import OptimConfig

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    model = vit_config(variant, image_size=image_size, channels=3, num_classes=num_classes,
                       encoder={"scan_layers": scan, "dtype": "float32", "param_dtype": "float32"})
    cfg = validate(ExperimentConfig(
        name=f"bench_vit_{variant}", task="classification", model=model,
        # A constant lr keeps every timed step a full-size update (a cosine would decay to 0).
        optim=OptimConfig(name="adamw", peak_lr=1e-3, schedule="constant", weight_decay=1e-4),
        train=TrainConfig(steps=steps + 1, batch_size=batch_size, seed=seed, progress=False)))
    task = ClassificationTask(cfg)
    rng = np.random.default_rng(seed)
    local = {"image": rng.standard_normal((batch_size, image_size, image_size, 3), np.float32),
             "label": rng.integers(0, num_classes, (batch_size,), dtype=np.int32)}
    stepper = jax_train_stepper(task, cfg, local)
    (timing,) = time_interleaved([stepper], warmup=1, steps=steps)
    figs = _side_result(stepper.figures(), timing, batch_size, peak_flops)
    assert figs["flops_per_example"] == 3.0 * vit_forward_flops(cfg.model)
    result = {
        "variant": variant,
        "scan_layers": scan,
        "image_size": image_size,
        "batch_size": batch_size,
        "num_classes": num_classes,
        "dtype": cfg.model.encoder.dtype,
        "param_dtype": cfg.model.encoder.param_dtype,
        "optimizer": "adamw",
        "tokens_per_image": (image_size // model.patch_size) ** 2 + (1 if model.pool == "cls" else 0),
        "warmup_loss": figs.pop("loss_step0"),
        **figs,
    }
    if scan:
        result["note"] = _SCAN_NOTE
    return result


def format_table(results: dict) -> str:
    """A fixed-width table of the ViT cases plus the peak line."""
    cols = [("variant", "{}"), ("scan", "{}"), ("params M", "{:.3g}"), ("compile s", "{:.1f}"),
            ("step ms", "{:.1f}"), ("img/s", "{:.2f}"), ("GFLOP formula", "{:.4g}"),
            ("GFLOP XLA", "{:.4g}"), ("XLA/form", "{:.2f}"), ("GFLOP/s", "{:.1f}"), ("MFU %", "{:.1f}"),
            ("MFU best %", "{:.1f}"),
            ("XLA MiB t+a+o", "{:.0f}"), ("-alias", "{:.0f}"), ("RSS0 MiB", "{:.0f}"),
            ("maxRSS MiB", "{:.0f}")]
    rows = [[r["variant"], "on" if r["scan_layers"] else "off", r["num_params"] / 1e6, r["compile_s"],
             r["step_s"] * 1e3, r["images_per_s"], r["flops_formula"] / 1e9, r["flops_xla"] / 1e9,
             r["xla_over_formula"], r["achieved_flops_per_s"] / 1e9, 100 * r["mfu"],
             100 * r.get("mfu_best_peak", float("nan")),
             r.get("xla_bytes", float("nan")) / MIB, r.get("xla_bytes_no_alias", float("nan")) / MIB,
             (r["rss_at_start_bytes"] or float("nan")) / MIB, r["max_rss_bytes"] / MIB]
            for r in results["cases"]]
    m = results["machine"]
    st = results["settings"]
    title = (f"ViT train step, fp32, AdamW, batch {st['batch_size']}, {st['image_size']}px, median of "
             f"{st['steps']} steps after 1 warm-up — {m['backend']} ({m['device_kind']}, {m['cpu_count']} CPUs), "
             f"jax {m['jax_version']}")
    out = [title, _peak_line(results["peak"]), *_table(cols, rows)]
    out += [("GFLOP: per train step. formula = 3 × vit_forward_flops × batch (matmuls only); "
             "XLA = cost_analysis of the compiled step (with scan on, the loop body is counted once)."),
            ("XLA MiB t+a+o: temp + argument + output of the compiled step; -alias: the same minus the "
             "donated state's aliased bytes."),
            ("RSS0: the case's process resident memory before building the model; maxRSS: that process's "
             "high-water mark (getrusage ru_maxrss).")]
    return "\n".join(out)


def _vit_case(kwargs: dict) -> dict:
    isolate = kwargs.pop("isolate")
    r = _isolated(bench_case, kwargs) if isolate else bench_case(**kwargs)
    r["isolated_process"] = isolate
    return r


def run_vit_bench(variants: Sequence[str] = ("S/16", "B/16"), image_size: int = 224, batch_size: int = 8,
                  steps: int = 3, out: str | Path | None = "bench_vit.json",
                  scan_modes: Sequence[bool] = (False, True), *, isolate: bool = True,
                  peak_matmul_n: int = 2048, peak_repeats: int = 10, verbose: bool = True) -> dict:
    """Benchmarks the ViT train step for every (variant, scan) pair; prints a table, writes JSON to
    `out` (unless None) and returns the same dict.

    isolate: run each case in a fresh spawned process, so that each max RSS is the case's own.
    peak_matmul_n, peak_repeats: the fp32 matmul peak is the best of `peak_repeats` n×n×n matmuls,
    measured before the cases (used for MFU) and again after them (reported, to show drift).
    """
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    def case_fn(kwargs):
        r = _vit_case(kwargs)
        if verbose:
            print(f"  {r['variant']} scan={'on' if r['scan_layers'] else 'off'}: compile {r['compile_s']:.1f} s, "
                  f"step {r['step_s'] * 1e3:.0f} ms, {r['images_per_s']:.2f} img/s, "
                  f"MFU {100 * r['mfu']:.1f}%", flush=True)
        return r

    cases = [(case_fn, {"variant": v, "scan": bool(s), "image_size": image_size, "batch_size": batch_size,
                        "steps": steps, "isolate": isolate}) for v in variants for s in scan_modes]
    results_cases, peak, machine = run_cases(cases, peak_matmul_n=peak_matmul_n, peak_repeats=peak_repeats,
                                             verbose=verbose)
    results = {
        "benchmark": "vit_train_step",
        "started": started,
        "settings": {"variants": list(variants), "image_size": image_size, "batch_size": batch_size,
                     "steps": steps, "scan_modes": [bool(s) for s in scan_modes], "isolate": isolate,
                     "dtype": "float32"},
        "machine": machine,
        "peak": peak,
        "units": _UNITS,
        "cases": results_cases,
    }
    return _write(results, out, format_table(results) if verbose else "", verbose)


# ----------------------------------------------------------------------------- CLIP vs HF CLIPModel

@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipBenchConfig:
    """One CLIP size, stated as an HF `CLIPConfig` (our side gets it through the converter)."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_depth: int
    vision_heads: int
    vision_mlp: int
    text_width: int
    text_depth: int
    text_heads: int
    text_mlp: int
    text_len: int  # = the position table: every text is padded to it
    vocab_size: int
    embed_dim: int
    activation: str  # HF hidden_act of both towers
    batch_size: int  # default batch for this config
    layer_norm_eps: float = 1e-5

    def hf_config(self) -> dict:
        """kwargs of transformers.CLIPConfig. Token ids: pad 0, BOS vocab-2, EOS vocab-1 (pooled at
        the first EOS, HF's non-legacy rule; ours: TextConfig pool="eos")."""
        def tower(width, depth, heads, mlp):
            return {"hidden_size": width, "num_hidden_layers": depth, "num_attention_heads": heads,
                    "intermediate_size": mlp, "hidden_act": self.activation, "layer_norm_eps": self.layer_norm_eps,
                    "attention_dropout": 0.0, "dropout": 0.0}
        v = self.vocab_size
        return {"vision_config": {**tower(self.vision_width, self.vision_depth, self.vision_heads, self.vision_mlp),
                                  "image_size": self.image_size, "patch_size": self.patch_size, "num_channels": 3},
                "text_config": {**tower(self.text_width, self.text_depth, self.text_heads, self.text_mlp),
                                "vocab_size": v, "max_position_embeddings": self.text_len,
                                "pad_token_id": 0, "bos_token_id": v - 2, "eos_token_id": v - 1},
                "projection_dim": self.embed_dim}


CLIP_CONFIGS: dict[str, ClipBenchConfig] = {
    # A tiny CLIP of the size clip_shapes trains (32 px, a 512-token BPE vocabulary, 48-token texts),
    # as HF's CLIPModel can express it: patch 4 (N = 64), both towers 128 wide and 4 deep.
    "tiny": ClipBenchConfig(image_size=32, patch_size=4, vision_width=128, vision_depth=4, vision_heads=4,
                            vision_mlp=512, text_width=128, text_depth=4, text_heads=4, text_mlp=512, text_len=48,
                            vocab_size=512, embed_dim=128, activation="gelu", batch_size=128),
    # ViT-S/16 at 224 px (N = 196) + a 384-wide, 12-deep text tower over OpenAI's 77 tokens and
    # 49408-token vocabulary; quick_gelu as OpenAI's CLIP.
    "S/16": ClipBenchConfig(image_size=224, patch_size=16, vision_width=384, vision_depth=12, vision_heads=6,
                            vision_mlp=1536, text_width=384, text_depth=12, text_heads=6, text_mlp=1536, text_len=77,
                            vocab_size=49408, embed_dim=384, activation="quick_gelu", batch_size=16),
    # For tests: seconds to compile.
    "micro": ClipBenchConfig(image_size=16, patch_size=4, vision_width=32, vision_depth=2, vision_heads=2,
                             vision_mlp=64, text_width=32, text_depth=2, text_heads=2, text_mlp=64, text_len=8,
                             vocab_size=64, embed_dim=32, activation="quick_gelu", batch_size=8),
}

CLIP_LR, CLIP_WEIGHT_DECAY = 1e-3, 0.1
CLIP_BETAS, CLIP_EPS = (0.9, 0.999), 1e-8


def clip_batch(spec: ClipBenchConfig, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """A deterministic batch in our layout: image [B, S, S, 3] float32, text_ids [B, L] int32
    (BOS, ordinary tokens, EOS at text_len-1, then pad 0) and text_len [B] int32 in [L/2, L]."""
    rng = np.random.default_rng(seed)
    b, length, v = batch_size, spec.text_len, spec.vocab_size
    images = rng.standard_normal((b, spec.image_size, spec.image_size, 3), np.float32)
    lengths = rng.integers(max(2, length // 2), length + 1, b).astype(np.int32)
    ids = rng.integers(1, v - 2, (b, length)).astype(np.int32)
    ids[:, 0] = v - 2
    ids[np.arange(b), lengths - 1] = v - 1
    ids[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return {"image": images, "text_ids": ids, "text_len": lengths}


def _clip_spec(name: str) -> ClipBenchConfig:
    if name not in CLIP_CONFIGS:
        raise ValueError(f"unknown CLIP benchmark config {name!r}; known: {', '.join(CLIP_CONFIGS)}")
    return CLIP_CONFIGS[name]


def hf_clip_stepper(config: str, *, checkpoint_dir: str, batch_size: int, seed: int = 0,
                    attn_implementation: str = "sdpa", init_noise: float = 0.0) -> LocalStepper:
    """Builds a random HF `CLIPModel` (torch.manual_seed(seed)), saves it to `checkpoint_dir`
    (safetensors) for our side to load, and returns its fp32 train step: forward with
    return_loss=True, backward, torch.optim.AdamW. init_noise > 0 adds N(0, init_noise²) to every
    weight first (tests: HF's init leaves biases at 0 and norms at 1, which would hide a
    mis-mapped one)."""
    import torch
    import transformers

    from mmjax.tasks.contrastive import ContrastiveTask

    transformers.utils.logging.disable_progress_bar()
    spec = _clip_spec(config)
    rss_start = _current_rss_bytes()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)
    hf_cfg = transformers.CLIPConfig(**spec.hf_config())
    model = transformers.CLIPModel._from_config(hf_cfg, attn_implementation=attn_implementation)
    model = model.to(torch.float32)
    if init_noise:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim:  # not logit_scale
                    p.add_(init_noise * torch.randn(p.shape, generator=g))
    model.save_pretrained(checkpoint_dir)
    model.train()  # dropout probabilities are all 0: train mode only selects the training code path
    opt = torch.optim.AdamW(model.parameters(), lr=CLIP_LR, betas=CLIP_BETAS, eps=CLIP_EPS,
                            weight_decay=CLIP_WEIGHT_DECAY)

    batch = clip_batch(spec, batch_size, seed)
    pixel_values = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
    input_ids = torch.from_numpy(batch["text_ids"].astype(np.int64))
    attention_mask = (torch.arange(spec.text_len)[None, :] < torch.from_numpy(batch["text_len"])[:, None]).long()

    def one_step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                    return_loss=True)
        out.loss.backward()
        opt.step()
        return out.loss.detach()

    def figures():
        flops_per_example = _clip_flops_per_example(ContrastiveTask, spec)
        return {
            "attn_implementation": model.config._attn_implementation,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "torch_num_threads": torch.get_num_threads(),
            "torch_num_interop_threads": torch.get_num_interop_threads(),
            "mkldnn_enabled": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
            "optimizer": (f"torch.optim.AdamW(lr={CLIP_LR}, betas={CLIP_BETAS}, eps={CLIP_EPS}, "
                          f"weight_decay={CLIP_WEIGHT_DECAY}) on every param, defaults otherwise"),
            "num_params": int(sum(p.numel() for p in model.parameters())),
            "num_trainable_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
            "flops_per_example": flops_per_example,
            "flops_formula": flops_per_example * batch_size,
            "rss_at_start_bytes": rss_start,
            "max_rss_bytes": _max_rss_bytes(),
        }

    return LocalStepper(one_step, float, figures)


def _clip_experiment(model_cfg, spec: ClipBenchConfig, batch_size: int, steps: int, seed: int):
    from mmjax.data.config import DataConfig
    from mmjax.experiment import ExperimentConfig, TrainConfig, validate
    from mmjax.tasks.contrastive import ContrastiveLossConfig
    from mmjax.train.optim import OptimConfig
    return validate(ExperimentConfig(
        name="bench_clip", task="contrastive", model=model_cfg, loss=ContrastiveLossConfig(kind="clip"),
        data=DataConfig(name="synthetic", text_field="caption", max_text_len=spec.text_len),
        # As torch.optim.AdamW: decay on every param (wd_mask), no clipping; constant lr so that
        # every timed step is a full-size update.
        optim=OptimConfig(name="adamw", peak_lr=CLIP_LR, schedule="constant", b1=CLIP_BETAS[0],
                          b2=CLIP_BETAS[1], eps=CLIP_EPS, weight_decay=CLIP_WEIGHT_DECAY, wd_mask=".*",
                          grad_clip_norm=None),
        train=TrainConfig(steps=steps + 10, batch_size=batch_size, seed=seed, progress=False)))


def _clip_flops_per_example(task_cls, spec: ClipBenchConfig) -> float:
    """task.train_flops_per_example() of our contrastive task for this config (no params built)."""
    from mmjax.convert.family import LoadOptions
    from mmjax.convert.hf_clip import clip_config_from_hf
    model_cfg = clip_config_from_hf(spec.hf_config(), LoadOptions(), siglip=False)
    cfg = _clip_experiment(model_cfg, spec, spec.batch_size, 1, 0)
    return task_cls(cfg).train_flops_per_example()


def ours_clip_stepper(config: str, *, checkpoint_dir: str, scan: bool, batch_size: int, total_steps: int,
                      seed: int = 0) -> LocalStepper:
    """Loads the HF checkpoint with `mmjax.load_pretrained` and returns our contrastive task's
    jitted AdamW train step (compiled) on the same batch."""
    from mmjax import load_pretrained
    from mmjax.config import to_dict
    from mmjax.tasks.contrastive import ContrastiveTask

    spec = _clip_spec(config)
    model, params = load_pretrained(checkpoint_dir, scan_layers=scan)
    cfg = _clip_experiment(model.cfg, spec, batch_size, total_steps, seed)
    extra = {"mmjax_config": to_dict(model.cfg), **({"note": _SCAN_NOTE} if scan else {})}
    return jax_train_stepper(ContrastiveTask(cfg), cfg, clip_batch(spec, batch_size, seed), params=params,
                             extra_figures=extra)


def clip_case(config: str, *, scan: bool, batch_size: int | None = None, steps: int = 5, warmup: int = 2,
              peak_flops: float, seed: int = 0, attn_implementation: str = "sdpa", isolate: bool = True,
              init_noise: float = 0.0) -> dict:
    """One CLIP config: HF's side is built first (it writes the shared checkpoint), then ours from
    that checkpoint; then both are timed interleaved (`time_interleaved`)."""
    spec = _clip_spec(config)
    batch_size = batch_size or spec.batch_size
    build = RemoteStepper if isolate else (lambda builder, kwargs: builder(**kwargs))
    with tempfile.TemporaryDirectory(prefix="mmjax_bench_clip_") as ckpt:
        sides = []
        try:
            sides.append(build(hf_clip_stepper, {"config": config, "checkpoint_dir": ckpt, "batch_size": batch_size,
                                                 "seed": seed, "attn_implementation": attn_implementation,
                                                 "init_noise": init_noise}))
            sides.append(build(ours_clip_stepper, {"config": config, "checkpoint_dir": ckpt, "scan": scan,
                                                   "batch_size": batch_size, "total_steps": warmup + steps,
                                                   "seed": seed}))
            hf_t, ours_t = time_interleaved(sides, warmup=warmup, steps=steps)
            hf = _side_result(sides[0].figures(), hf_t, batch_size, peak_flops)
            ours = _side_result(sides[1].figures(), ours_t, batch_size, peak_flops)
        finally:
            for side in sides:
                side.close()
    return {
        "config": config,
        "scan_layers": scan,
        "batch_size": batch_size,
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "text_len": spec.text_len,
        "bench_config": dataclasses.asdict(spec),
        "hf_config": spec.hf_config(),
        "dtype": "float32",
        "isolated_process": isolate,
        "ours": ours,
        "hf": hf,
        "ratio_ours_over_hf": ours["images_per_s"] / hf["images_per_s"],
        "loss_step0_abs_diff": abs(ours["loss_step0"] - hf["loss_step0"]),
    }


def format_clip_table(results: dict) -> str:
    cols = [("config", "{}"), ("scan", "{}"), ("batch", "{}"), ("params M", "{:.3g}"), ("compile s", "{:.1f}"),
            ("ours ms", "{:.1f}"), ("ours img/s", "{:.2f}"), ("HF ms", "{:.1f}"), ("HF img/s", "{:.2f}"),
            ("ours/HF", "{:.2f}"), ("GFLOP form", "{:.4g}"), ("ours MFU %", "{:.1f}"), ("HF MFU %", "{:.1f}"),
            ("|Δloss0|", "{:.1e}"), ("XLA MiB-alias", "{:.0f}"), ("ours maxRSS", "{:.0f}"),
            ("HF maxRSS", "{:.0f}")]
    rows = [[r["config"], "on" if r["scan_layers"] else "off", r["batch_size"], r["ours"]["num_params"] / 1e6,
             r["ours"]["compile_s"], r["ours"]["step_s"] * 1e3, r["ours"]["images_per_s"], r["hf"]["step_s"] * 1e3,
             r["hf"]["images_per_s"], r["ratio_ours_over_hf"], r["ours"]["flops_formula"] / 1e9,
             100 * r["ours"]["mfu"], 100 * r["hf"]["mfu"], r["loss_step0_abs_diff"],
             r["ours"].get("xla_bytes_no_alias", float("nan")) / MIB, r["ours"]["max_rss_bytes"] / MIB,
             r["hf"]["max_rss_bytes"] / MIB]
            for r in results["cases"]]
    m, st = results["machine"], results["settings"]
    hf_attn = {r["hf"]["attn_implementation"] for r in results["cases"]}
    title = (f"CLIP train step (CLIP softmax loss, AdamW, fp32): mmjax (jax {m['jax_version']}) vs HF CLIPModel "
             f"(torch {results['cases'][0]['hf']['torch_version'] if results['cases'] else '?'}, attention "
             f"{'/'.join(sorted(hf_attn))}), median of {st['steps']} steps after {st['warmup']} warm-up — "
             f"{m['backend']} ({m['cpu_model']}, {m['cpu_count']} CPUs)")
    out = [title, _peak_line(results["peak"]), *_table(cols, rows)]
    out += ["GFLOP form: per train step, 3 × (image tower + text tower forward matmul FLOPs) × batch "
            "(ContrastiveTask.train_flops_per_example); MFU against the fp32 matmul peak above, both sides.",
            "|Δloss0|: |our loss − HF's loss| at step 0 (same weights, same batch). MiB: XLA temp+arg+out "
            "minus aliased; maxRSS: each side's process high-water mark."]
    return "\n".join(out)


def run_clip_bench(configs: Sequence[str] = ("tiny", "S/16"), batch_size: int | None = None, steps: int = 5,
                   warmup: int = 2, out: str | Path | None = "bench_clip.json",
                   scan_modes: Sequence[bool] = (False, True),
                   *, attn_implementation: str = "sdpa", isolate: bool = True, peak_matmul_n: int = 2048,
                   peak_repeats: int = 10, seed: int = 0, init_noise: float = 0.0, verbose: bool = True) -> dict:
    """Benchmarks our CLIP train step against HF's CLIPModel for every (config, scan) pair; prints
    a table, writes JSON to `out` (unless None) and returns the same dict.

    batch_size: None → each config's own (tiny 128, S/16 16). attn_implementation: HF's ("sdpa"
    or "eager"). Other arguments as `run_vit_bench`.
    """
    for c in configs:
        _clip_spec(c)
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    def case_fn(kwargs):
        r = clip_case(**kwargs)
        if verbose:
            print(f"  {r['config']} scan={'on' if r['scan_layers'] else 'off'} batch {r['batch_size']}: "
                  f"ours {r['ours']['images_per_s']:.2f} img/s (compile {r['ours']['compile_s']:.1f} s), "
                  f"HF {r['hf']['images_per_s']:.2f} img/s, ratio {r['ratio_ours_over_hf']:.2f}, "
                  f"|Δloss0| {r['loss_step0_abs_diff']:.1e}", flush=True)
        return r

    cases = [(case_fn, {"config": c, "scan": bool(s), "batch_size": batch_size, "steps": steps, "warmup": warmup,
                        "seed": seed, "attn_implementation": attn_implementation, "isolate": isolate,
                        "init_noise": init_noise})
             for c in configs for s in scan_modes]
    results_cases, peak, machine = run_cases(cases, peak_matmul_n=peak_matmul_n, peak_repeats=peak_repeats,
                                             verbose=verbose)
    results = {
        "benchmark": "clip_train_step_vs_hf",
        "started": started,
        "settings": {"configs": list(configs), "batch_size": batch_size, "steps": steps, "warmup": warmup,
                     "scan_modes": [bool(s) for s in scan_modes], "isolate": isolate, "dtype": "float32",
                     "hf_attn_implementation": attn_implementation, "seed": seed, "init_noise": init_noise,
                     "optimizer": {"name": "adamw", "lr": CLIP_LR, "betas": list(CLIP_BETAS), "eps": CLIP_EPS,
                                   "weight_decay": CLIP_WEIGHT_DECAY, "weight_decay_on": "every param",
                                   "grad_clip": None, "schedule": "constant"}},
        "timing": ("each side in its own process (isolate) or both in this one; `warmup` untimed steps "
                   "of each, then `steps` rounds of one timed step per side, the order reversed every "
                   "other round, so that other load on the machine falls on both alike; median per side"),
        "same_work": ("both sides: the same HF CLIPConfig (ours loaded from HF's save_pretrained checkpoint "
                      "with mmjax.load_pretrained, so the same initial weights), the same batch (images, "
                      "token ids padded to text_len, padding mask from text_len, EOS pooling), CLIP's "
                      "symmetric softmax loss over the batch, gradients for all params, AdamW as stated, "
                      "no clipping, no dropout, fp32; each step synchronous"),
        "machine": machine,
        "peak": peak,
        "units": {**_UNITS, "ratio_ours_over_hf": "our images/s ÷ HF's images/s (> 1: ours is faster)",
                  "loss_step0_abs_diff": "|our loss − HF loss| of the first step (initial weights)"},
        "cases": results_cases,
    }
    return _write(results, out, format_clip_table(results) if verbose else "", verbose)


# ----------------------------------------------------------------------------- command line

def _parse_bool_modes(text: str) -> tuple[bool, ...]:
    table = {"off": False, "false": False, "0": False, "on": True, "true": True, "1": True}
    try:
        return tuple(table[s.strip().lower()] for s in text.split(",") if s.strip())
    except KeyError as e:
        raise argparse.ArgumentTypeError(f"scan modes are on/off, got {e.args[0]!r}") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmjax.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("vit", "clip"), default="vit", help="model family (default vit)")
    p.add_argument("--out", default=None, help="JSON path (default bench_vit.json / bench_clip.json)")
    p.add_argument("--variants", default="S/16,B/16", help="vit: ViT variants")
    p.add_argument("--configs", default="tiny,S/16", help=f"clip: configs among {', '.join(CLIP_CONFIGS)}")
    p.add_argument("--image-size", type=int, default=224, help="vit only (CLIP configs fix their own)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="vit: default 8; clip: default per config (tiny 128, S/16 16)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default vit 3, clip 5)")
    p.add_argument("--warmup", type=int, default=2, help="clip: untimed steps first (vit: always 1)")
    p.add_argument("--scan-modes", type=_parse_bool_modes, default=None,
                   help="comma-separated on/off (default off,on)")
    p.add_argument("--hf-attn", choices=("sdpa", "eager"), default="sdpa", help="clip: HF attention implementation")
    p.add_argument("--init-noise", type=float, default=0.0,
                   help="clip: add N(0, x²) to every HF weight before saving (checks; HF's init hides a "
                        "mis-mapped bias or norm)")
    p.add_argument("--peak-matmul-n", type=int, default=2048, help="matmul size for the fp32 peak")
    p.add_argument("--no-isolate", action="store_true",
                   help="run all cases in this process (max RSS then accumulates across cases)")
    args = p.parse_args(argv)
    if args.model == "vit":
        run_vit_bench(variants=_names(args.variants), image_size=args.image_size, batch_size=args.batch_size or 8,
                      steps=args.steps or 3, out=args.out or "bench_vit.json",
                      scan_modes=args.scan_modes if args.scan_modes is not None else (False, True),
                      isolate=not args.no_isolate, peak_matmul_n=args.peak_matmul_n)
    else:
        try:
            run_clip_bench(configs=_names(args.configs), batch_size=args.batch_size, steps=args.steps or 5,
                           warmup=args.warmup, out=args.out or "bench_clip.json",
                           scan_modes=args.scan_modes if args.scan_modes is not None else (False, True),
                           attn_implementation=args.hf_attn, isolate=not args.no_isolate,
                           peak_matmul_n=args.peak_matmul_n, init_noise=args.init_noise)
        except ValueError as e:
            p.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
