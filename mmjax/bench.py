"""Train-step benchmarks: compile time, step time, memory, FLOPs, MFU; against HF PyTorch peers.

    python -m mmjax.bench [--model vit] [--variants S/16,B/16] [--image-size 224] [--batch-size 8]
                          [--steps 3] [--scan-modes off,on] [--dtype float32] [--out bench_vit.json]
    python -m mmjax.bench --model clip [--configs tiny,S/16] [--batch-size N] [--steps 5] [--warmup 2]
                          [--scan-modes off,on] [--dtype float32] [--hf-attn sdpa] [--out bench_clip.json]
    python -m mmjax.bench --suite gpu [--batch-size 256] [--steps 10] [--out bench_gpu.json]
    mmjax bench ...                      (the same, through the CLI)

Every mode shares one core: the library's real AdamW train step, timed the same way, the matmul
peak of the compute dtype measured in the same run, one process per timed side, JSON + a table.
Our side runs on `jax.devices()[0]`, whatever the platform; an HF peer runs on CUDA when
`torch.cuda.is_available()`, else on the CPU with `torch.set_num_threads(os.cpu_count())`.

`--dtype float32|bfloat16`: the compute dtype. Ours: `replace_in(model config, TransformerConfig,
dtype=...)` (mixed precision: params, optimizer state, norms, softmax and losses stay fp32). HF:
`torch.autocast(device, torch.bfloat16)` around forward + loss, fp32 master params. In float32 on a
GPU both sides multiply in TF32 (XLA's default precision there; PyTorch is set to match).

`--model vit`: for each ViT variant and each `scan_layers` setting, the library's own
classification task (ViT, 1000 classes, 3 channels) and its real AdamW train step
(`make_optimizer` → `make_train_step` → `jit_train_step`, state donated, state born sharded on a
one-device mesh exactly as the training loop does it). Ours only.

`--model clip`: for each CLIP config (see CLIP_CONFIGS) our contrastive task's train step against
HF transformers' `CLIPModel` train step in PyTorch, in the same run, on the same weights and the
same batch: a randomly initialised `CLIPModel` is saved with `save_pretrained` and loaded on our
side with `mmjax.load_pretrained` (so the two configs are one config, through the converter's
mapping), both see the same images, token ids and padding masks, compute the same CLIP softmax
loss (`return_loss=True` on HF's side), take gradients for every param and apply AdamW with the
same lr / betas / eps / weight decay on every param, no gradient clipping, no dropout. Each case
records both sides' loss at step 0: equal weights and equal work give equal losses (fp32: checked
to 1e-4 by tests/test_bench.py; bf16: to bf16's rounding).

`--suite gpu`: one command for a lent accelerator (it runs on a CPU too, at any size), in bf16 by
default, each case against its HF peer when torch and transformers import (`--no-hf`: ours only):

    vit_train    ViT-B/16 (--vit-variant) at 224 px, batch 256: our classification train step vs
                 HF `ViTForImageClassification` (SDPA), same weights (save_pretrained →
                 load_pretrained), same batch, softmax cross-entropy, AdamW as above
    clip_train   CLIP "B/16" (--clip-config; OpenAI CLIP ViT-B/16's sizes), batch 256: as --model clip
    decode       batch-8 greedy decoding, `mmjax.generate` vs HF `generate`, same weights
                 (`mmjax.bench_decode`; a TinyLlama-1.1B-shaped Llama on an accelerator, the
                 bench_decode default model on a CPU; weights and compute in the suite's dtype)

It prints one table (ours, HF, ours/HF, MFU against the measured and the datasheet peak, per case)
and writes one JSON (--out, default bench_gpu.json) with every case's full figures.

Figures, per timed side of a train step:

    compile_s      ours: wall time of `step.lower(state, batch)` + `.compile()` (reported separately too)
    step_s         median of `steps` timed steps after `warmup` untimed ones, each step synchronous
                   (`block_until_ready` on our side; `torch.cuda.synchronize()` on HF's on a GPU)
    images_per_s   batch_size / step_s
    flops_formula  task.train_flops_per_example() × batch: 3 × forward matmul FLOPs (ViT:
                   vit_forward_flops; CLIP: image tower + text tower over the padded length);
                   decode: 2 × the params a step multiplies with per generated token
    flops_xla      compiled.cost_analysis()["flops"]    (XLA's count for the whole step)
    mfu            flops_formula / step_s / peak, with the matmul peak of the compute dtype measured
                   by `measure_matmul_peak` (n×n×n, default n 2048 on a CPU, 8192 elsewhere) at the
                   start of this same run; the peak is measured again at the end, `mfu_best_peak`
                   uses the larger of the two, and a run whose two peaks differ by more than 15% is
                   flagged (other load on the machine: MFU unreliable)
    mfu_datasheet  the same against the device's dense datasheet peak for the dtype (DATASHEET_PEAKS,
                   by device_kind; float32 → TF32 on NVIDIA, bf16 passes on TPU, as XLA multiplies
                   by default); None for a device not in the table (e.g. a CPU)
    memory         XLA's buffer assignment of the compiled step (`memory_analysis()`: temp, argument,
                   output and alias bytes), the device's peak bytes in use where it reports them
                   (`Device.memory_stats()`; HF: `torch.cuda.max_memory_allocated()`), and the OS's
                   high-water mark of the process's resident memory (`getrusage(...).ru_maxrss`)

By default every timed side runs in a fresh spawned process so that its max RSS is its own
(ru_maxrss only ever grows within a process) and no compilation cache or thread pool is shared.
Processes that share one GPU run with XLA_PYTHON_CLIENT_PREALLOCATE=false (unless set), so that
no JAX process holds most of the device's memory.

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
import importlib.util
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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

MIB = 2**20
PEAK_DRIFT_WARN = 0.15  # start and end matmul peaks further apart than this: flag the run
DTYPES = ("float32", "bfloat16")

# Dense (no structured sparsity) datasheet peaks in FLOP/s, by a substring of jax's device_kind;
# the first match wins. An empty entry: a device of that name whose peaks are not in this table.
DATASHEET_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bfloat16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12}),
    ("H100 PCIe", {}),
    ("H100 NVL", {}),
    ("H100", {"bfloat16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12}),  # SXM
    ("A100", {"bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12}),
    ("TPU v6 lite", {"bfloat16": 918e12}),  # v6e
    ("TPU v5 lite", {"bfloat16": 197e12}),  # v5e
    ("TPU v5p", {"bfloat16": 459e12}),
    ("TPU v5", {"bfloat16": 459e12}),  # v5p reports "TPU v5"
    ("TPU v4", {"bfloat16": 275e12}),
)


def datasheet_peak(device_kind: str, platform_name: str, dtype: str) -> dict:
    """The datasheet peak for matmuls in `dtype` on a device: {"flops_per_s": float or None, "key":
    the table column used, "device_kind"}. float32 uses the precision XLA multiplies fp32 in by
    default: TF32 on NVIDIA GPUs, bf16 passes on TPUs."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    key = dtype
    if dtype == "float32":
        key = {"gpu": "tf32", "cuda": "tf32", "tpu": "bfloat16"}.get(platform_name, "float32")
    table = next((peaks for name, peaks in DATASHEET_PEAKS if name.lower() in device_kind.lower()), {})
    return {"device_kind": device_kind, "key": key, "flops_per_s": table.get(key),
            "source": "mmjax.bench.DATASHEET_PEAKS (dense datasheet figures, no sparsity)"}


@contextlib.contextmanager
def shared_device_env() -> Iterator[None]:
    """XLA_PYTHON_CLIENT_PREALLOCATE=false (unless set) while the block runs: read when a JAX
    process first initialises its GPU backend, and inherited by spawned processes, so that the
    sides sharing one GPU (and this process's peak measurement) take memory as they need it."""
    var = "XLA_PYTHON_CLIENT_PREALLOCATE"
    before = os.environ.get(var)
    if before is None:
        os.environ[var] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(var, None)


def hf_available() -> bool:
    """Whether torch and transformers can be imported (without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


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


def _device_memory_figures(device=None) -> dict:
    """The device's memory counters where it reports them (GPU, TPU; not the CPU)."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:
        stats = None
    if not stats:
        return {}
    out = {}
    for ours, theirs in (("device_peak_bytes_in_use", "peak_bytes_in_use"), ("device_bytes_limit", "bytes_limit")):
        if theirs in stats:
            out[ours] = int(stats[theirs])
    return out


def machine_info() -> dict:
    import flax
    import optax

    from mmjax.runtime import thp_mode
    try:
        import jaxlib
        jaxlib_version = getattr(jaxlib, "__version__", None)
    except ImportError:
        jaxlib_version = None
    dev = jax.devices()[0]
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib_version,
        "flax_version": flax.__version__,
        "optax_version": optax.__version__,
        "python_version": platform.python_version(),
        "backend": jax.default_backend(),
        "device_platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity_count": affinity,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        # The `mmjax` command runs under its malloc tunables (mmjax/runtime.py); benchmark sides
        # started from it, ours and PyTorch's, inherit the same environment.
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "thp_mode": thp_mode(),
    }


def _machine_words(m: dict) -> str:
    if m.get("device_platform", m["backend"]) == "cpu":
        return f"{m['backend']} ({m['cpu_model']}, {m['cpu_count']} CPUs)"
    return f"{m['backend']} ({m['device_kind']}, {m['device_count']} device(s); host {m['cpu_count']} CPUs)"


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
        "xla_generated_code_bytes": int(getattr(m, "generated_code_size_in_bytes", 0)),
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
    waits idle in `recv`. The child inherits this process's environment (`shared_device_env`)."""

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
    compile times, FLOPs (formula and XLA's), XLA memory, device memory and RSS (see the module
    docstring), after `extra_figures`.
    """
    import flax.linen as nn

    from mmjax import sharding as shd
    from mmjax.train.loop import create_sharded_state
    from mmjax.train.state import TrainState
    from mmjax.train.step import jit_train_step

    rss_start = _current_rss_bytes()
    batch_size = int(next(iter(local_batch.values())).shape[0])
    task.check_batch(local_batch, 0)
    device = jax.devices()[0]
    mesh = shd.make_mesh(dataclasses.replace(cfg.mesh, shape=(1, 1, 1)), [device])
    seed = cfg.train.seed
    with jax.set_mesh(mesh), shd.logical_rules(cfg.mesh.rules):
        boxed = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
        tx, schedule = task.make_optimizer(cfg.train.steps, nn.meta.unbox(boxed))
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
        step_fn = jit_train_step(task.make_train_step(tx, schedule), state_sh, batch_sh)

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
        return {**(extra_figures or {}), "device": str(device), "device_kind": device.device_kind,
                "num_params": n_params, "init_s": init_s, "lower_s": t1 - t0,
                "compile_only_s": t2 - t1,
                "compile_s": t2 - t0,  # lower + compile
                "flops_per_example": flops_per_example, "flops_formula": flops_formula, **cost,
                "xla_over_formula": cost["flops_xla"] / flops_formula, **_memory_figures(compiled),
                **_device_memory_figures(device),
                "rss_at_start_bytes": rss_start, "max_rss_bytes": _max_rss_bytes()}

    return LocalStepper(one_step, lambda m: float(m["loss"]), figures)


def _isolated(fn: Callable[..., dict], kwargs: dict) -> dict:
    """Runs `fn(**kwargs)` in a fresh spawned process (its own ru_maxrss, compilation and threads)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, **kwargs).result()


def _add_peak_ratios(obj, peak: float, best_peak: float, datasheet: float | None) -> None:
    """Next to every "achieved_flops_per_s" in a (nested) result: "mfu" (against the start peak,
    where not there yet), "mfu_best_peak" and "mfu_datasheet" (None for an unknown device)."""
    if isinstance(obj, dict):
        achieved = obj.get("achieved_flops_per_s")
        if isinstance(achieved, (int, float)):
            obj.setdefault("peak_flops_per_s", peak)
            obj.setdefault("mfu", achieved / peak)
            obj["mfu_best_peak"] = achieved / best_peak
            obj["mfu_datasheet"] = achieved / datasheet if datasheet else None
        for v in obj.values():
            _add_peak_ratios(v, peak, best_peak, datasheet)
    elif isinstance(obj, list):
        for v in obj:
            _add_peak_ratios(v, peak, best_peak, datasheet)


def _non_finite(obj, path=()) -> list[list]:
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [list(path)]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _non_finite(v, (*path, k))]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _non_finite(v, (*path, i))]
    return []


def default_peak_matmul_n() -> int:
    """2048 on a CPU; 8192 on an accelerator, where a 2048³ matmul takes tens of µs and the
    dispatch around it would read as a lower peak."""
    return 2048 if jax.default_backend() == "cpu" else 8192


def run_cases(cases: Sequence[tuple[Callable[[dict], dict], dict]], *, peak_matmul_n: int | None, peak_repeats: int,
              verbose: bool, dtype: str = "float32") -> tuple[list[dict], dict, dict]:
    """Measures the matmul peak in `dtype`, runs each `case_fn(dict(kwargs, peak_flops=peak))`,
    measures the peak again, and adds mfu_best_peak and mfu_datasheet everywhere (the datasheet
    peak of jax.devices()[0] for `dtype`). Returns (results, peak dict, machine dict). Runs under
    `shared_device_env`."""
    import jax.numpy as jnp

    from mmjax.train.metrics import measure_matmul_peak

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    with shared_device_env():
        n = peak_matmul_n or default_peak_matmul_n()
        jdt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        load_start = os.getloadavg()
        peak = measure_matmul_peak(n=n, dtype=jdt, repeats=peak_repeats)
        dev = jax.devices()[0]
        sheet = datasheet_peak(dev.device_kind, dev.platform, dtype)
        if verbose:
            print(f"{dtype} matmul peak ({n}³): {peak / 1e9:.1f} GFLOP/s; datasheet "
                  + (f"{sheet['flops_per_s'] / 1e12:.1f} TFLOP/s ({sheet['key']}, {dev.device_kind})"
                     if sheet["flops_per_s"] else f"unknown for {dev.device_kind!r}"), flush=True)
        results = [case_fn(dict(kwargs, peak_flops=peak)) for case_fn, kwargs in cases]
        peak_end = measure_matmul_peak(n=n, dtype=jdt, repeats=peak_repeats)
        best_peak = max(peak, peak_end)
        for r in results:
            _add_peak_ratios(r, peak, best_peak, sheet["flops_per_s"])
        peak_info = {"what": f"best of {peak_repeats} {dtype} n×n×n matmuls (2n³ FLOPs) via measure_matmul_peak "
                             f"on {dev}",
                     "dtype": dtype, "matmul_n": n, "flops_per_s": peak, "flops_per_s_end": peak_end,
                     "flops_per_s_best": best_peak,
                     "unstable": bool(abs(peak - peak_end) > PEAK_DRIFT_WARN * best_peak),
                     "datasheet": sheet}
        machine = {**machine_info(), "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg())}
    return results, peak_info, machine


def _fmt(f: str, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f.format(v)


def _table(cols: Sequence[tuple[str, str]], rows: Sequence[Sequence]) -> list[str]:
    cells = [[_fmt(f, v) for (_, f), v in zip(cols, row)] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (h, _) in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return [line([h for h, _ in cols]), line(["-" * w for w in widths])] + [line(c) for c in cells]


def _peak_line(pk: dict) -> str:
    dtype = pk.get("dtype", "float32")
    out = (f"{dtype} matmul peak ({pk['matmul_n']}³): {pk['flops_per_s'] / 1e9:.1f} GFLOP/s at start "
           f"(used for MFU), {pk['flops_per_s_end'] / 1e9:.1f} GFLOP/s at end")
    sheet = pk.get("datasheet") or {}
    if sheet.get("flops_per_s"):
        out += f"; datasheet {sheet['flops_per_s'] / 1e12:.1f} TFLOP/s ({sheet['key']}, {sheet['device_kind']})"
    else:
        out += f"; no datasheet peak for {sheet.get('device_kind', '?')!r}"
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
          "mfu_datasheet": "the same against the device's datasheet peak for the dtype (None: unknown device)",
          "xla_bytes": "memory_analysis temp + argument + output of the compiled train step",
          "xla_bytes_no_alias": "xla_bytes minus the donated (aliased) state's bytes",
          "xla_peak_memory_bytes": "memory_analysis().peak_memory_in_bytes as XLA reports it; on "
                                   "the CPU backend it has equalled argument bytes, i.e. it is "
                                   "not a live-buffer peak there",
          "device_peak_bytes_in_use": "Device.memory_stats()['peak_bytes_in_use'] of the process that "
                                      "ran the side (accelerators only)",
          "device_max_memory_allocated_bytes": "HF on CUDA: torch.cuda.max_memory_allocated()",
          "max_rss_bytes": "getrusage ru_maxrss of the process that ran the case "
                           "(a fresh process per case when isolate is true)"}

_SCAN_NOTE = ("scan_layers: XLA's cost analysis counts the scanned blocks' while-loop body once, so "
              "flops_xla covers about one of the encoder blocks")

# AdamW of every train step compared with PyTorch: torch.optim.AdamW's, decay on every param.
PEER_LR, PEER_WEIGHT_DECAY = 1e-3, 0.1
PEER_BETAS, PEER_EPS = (0.9, 0.999), 1e-8
CLIP_LR, CLIP_WEIGHT_DECAY, CLIP_BETAS, CLIP_EPS = PEER_LR, PEER_WEIGHT_DECAY, PEER_BETAS, PEER_EPS


def _peer_optim_config():
    from mmjax.train.optim import OptimConfig
    # As torch.optim.AdamW: decay on every param (wd_mask), no clipping; constant lr so that every
    # timed step is a full-size update.
    return OptimConfig(name="adamw", peak_lr=PEER_LR, schedule="constant", b1=PEER_BETAS[0], b2=PEER_BETAS[1],
                       eps=PEER_EPS, weight_decay=PEER_WEIGHT_DECAY, wd_mask=".*", grad_clip_norm=None)


_PEER_OPTIMIZER_JSON = {"name": "adamw", "lr": PEER_LR, "betas": list(PEER_BETAS), "eps": PEER_EPS,
                        "weight_decay": PEER_WEIGHT_DECAY, "weight_decay_on": "every param", "grad_clip": None,
                        "schedule": "constant"}


def _with_dtype(model_cfg, dtype: str):
    """The model config with compute dtype `dtype` in every TransformerConfig (params stay fp32)."""
    from mmjax.config import replace_in
    from mmjax.layers.transformer import TransformerConfig
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return replace_in(model_cfg, TransformerConfig, dtype=dtype)


# ----------------------------------------------------------------------------- HF PyTorch peers

def torch_device(torch):
    """"cuda" when PyTorch sees a GPU, else "cpu"."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _torch_setup(torch, dtype: str, seed: int):
    """Seeds, threads (CPU), TF32 for float32 on a GPU (as XLA's default precision) and the CUDA
    peak-memory counter; returns the device."""
    dev = torch_device(torch)
    if dev.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    else:
        torch.cuda.reset_peak_memory_stats(dev)
        if dtype == "float32":
            try:  # PyTorch ≥ 2.9's switch; the older flags below mean the same
                torch.backends.cuda.matmul.fp32_precision = "tf32"
                torch.backends.cudnn.conv.fp32_precision = "tf32"
            except (AttributeError, RuntimeError):
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    return dev


def _torch_cuda_fp32_matmul(torch) -> str:
    """How PyTorch multiplies fp32 matrices on CUDA: "tf32" or "ieee"."""
    try:
        value = str(torch.backends.cuda.matmul.fp32_precision)
        return "ieee" if value == "none" else value  # "none": the default, IEEE fp32
    except AttributeError:  # PyTorch < 2.9
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def torch_train_stepper(torch, model, forward: Callable[[], Any], *, dev, dtype: str, batch_size: int,
                        flops_per_example: float, rss_start: int | None) -> LocalStepper:
    """PyTorch's train step for `model`: zero_grad, `forward()` (→ the loss) under bf16 autocast
    when dtype is bfloat16, backward, torch.optim.AdamW (PEER_* hyper-parameters on every param;
    fused on CUDA, as HF Trainer's default adamw_torch_fused); synchronous on CUDA."""
    cuda = dev.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=PEER_LR, betas=PEER_BETAS, eps=PEER_EPS,
                            weight_decay=PEER_WEIGHT_DECAY, **({"fused": True} if cuda else {}))
    if dtype == "bfloat16":
        autocast = lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    def one_step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = forward()
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize(dev)
        return loss.detach()

    def all_figures():
        import transformers
        out = {
            "attn_implementation": model.config._attn_implementation,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if cuda else _cpu_model(),
            "autocast": "bfloat16" if dtype == "bfloat16" else None,
            "param_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "float32_matmul": _torch_cuda_fp32_matmul(torch) if cuda else "ieee",
            "torch_num_threads": torch.get_num_threads(),
            "torch_num_interop_threads": torch.get_num_interop_threads(),
            "mkldnn_enabled": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
            "optimizer": (f"torch.optim.AdamW(lr={PEER_LR}, betas={PEER_BETAS}, eps={PEER_EPS}, "
                          f"weight_decay={PEER_WEIGHT_DECAY}{', fused=True' if cuda else ''}) on every param, "
                          "defaults otherwise"),
            "num_params": int(sum(p.numel() for p in model.parameters())),
            "num_trainable_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
            "flops_per_example": flops_per_example,
            "flops_formula": flops_per_example * batch_size,
            "rss_at_start_bytes": rss_start,
            "max_rss_bytes": _max_rss_bytes(),
        }
        if cuda:
            out["device_max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated(dev))
        return out

    return LocalStepper(one_step, float, all_figures)


def _paired(hf: tuple[Callable[..., LocalStepper], dict] | None, ours: tuple[Callable[..., LocalStepper], dict], *,
            batch_size: int, warmup: int, steps: int, peak_flops: float, isolate: bool) -> tuple[dict, dict | None]:
    """Builds HF's side first (it writes the checkpoint ours loads), then ours; times them
    interleaved (`time_interleaved`). → (ours, hf or None)."""
    build = RemoteStepper if isolate else (lambda builder, kwargs: builder(**kwargs))
    sides = []
    try:
        for builder_kwargs in (hf, ours):
            if builder_kwargs is not None:
                sides.append(build(*builder_kwargs))
        timings = time_interleaved(sides, warmup=warmup, steps=steps)
        results = [_side_result(s.figures(), t, batch_size, peak_flops) for s, t in zip(sides, timings)]
    finally:
        for side in sides:
            side.close()
    return results[-1], (results[0] if hf is not None else None)


def _pair_fields(ours: dict, hf: dict | None) -> dict:
    if hf is None:
        return {"ours": ours, "hf": None, "ratio_ours_over_hf": None, "loss_step0_abs_diff": None}
    return {"ours": ours, "hf": hf, "ratio_ours_over_hf": ours["images_per_s"] / hf["images_per_s"],
            "loss_step0_abs_diff": abs(ours["loss_step0"] - hf["loss_step0"])}


# ----------------------------------------------------------------------------- ViT

def _vit_experiment(model_cfg, *, name: str, batch_size: int, total_steps: int, seed: int, optim=None):
    from mmjax.experiment import ExperimentConfig, TrainConfig, validate
    from mmjax.train.optim import OptimConfig
    # A constant lr keeps every timed step a full-size update (a cosine would decay to 0).
    optim = optim or OptimConfig(name="adamw", peak_lr=1e-3, schedule="constant", weight_decay=1e-4)
    return validate(ExperimentConfig(name=name, task="classification", model=model_cfg, optim=optim,
                                     train=TrainConfig(steps=total_steps, batch_size=batch_size, seed=seed,
                                                       progress=False)))


def vit_batch(image_size: int, batch_size: int, num_classes: int, seed: int) -> dict[str, np.ndarray]:
    """A deterministic batch in our layout: image [B, S, S, 3] float32, label [B] int32."""
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((batch_size, image_size, image_size, 3), np.float32),
            "label": rng.integers(0, num_classes, (batch_size,), dtype=np.int32)}


def bench_case(variant: str, *, scan: bool, image_size: int = 224, batch_size: int = 8, steps: int = 3,
               peak_flops: float, num_classes: int = 1000, seed: int = 0, dtype: str = "float32") -> dict:
    """Builds and times one ViT train step (compute dtype `dtype`, params fp32); returns its figures
    (see the module docstring)."""
    from mmjax.models.vit import vit_config, vit_forward_flops
    from mmjax.tasks import ClassificationTask

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    model = _with_dtype(vit_config(variant, image_size=image_size, channels=3, num_classes=num_classes,
                                   encoder={"scan_layers": scan, "param_dtype": "float32"}), dtype)
    cfg = _vit_experiment(model, name=f"bench_vit_{variant}", batch_size=batch_size, total_steps=steps + 1, seed=seed)
    task = ClassificationTask(cfg)
    stepper = jax_train_stepper(task, cfg, vit_batch(image_size, batch_size, num_classes, seed))
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
    sheet = (results["peak"].get("datasheet") or {}).get("flops_per_s")
    cols = [("variant", "{}"), ("scan", "{}"), ("params M", "{:.3g}"), ("compile s", "{:.1f}"),
            ("step ms", "{:.1f}"), ("img/s", "{:.2f}"), ("GFLOP formula", "{:.4g}"),
            ("GFLOP XLA", "{:.4g}"), ("XLA/form", "{:.2f}"), ("GFLOP/s", "{:.1f}"), ("MFU %", "{:.1f}"),
            ("MFU best %", "{:.1f}"), *([("MFU sheet %", "{:.1f}")] if sheet else []),
            ("XLA MiB t+a+o", "{:.0f}"), ("-alias", "{:.0f}"), ("RSS0 MiB", "{:.0f}"),
            ("maxRSS MiB", "{:.0f}")]
    rows = [[r["variant"], "on" if r["scan_layers"] else "off", r["num_params"] / 1e6, r["compile_s"],
             r["step_s"] * 1e3, r["images_per_s"], r["flops_formula"] / 1e9, r["flops_xla"] / 1e9,
             r["xla_over_formula"], r["achieved_flops_per_s"] / 1e9, 100 * r["mfu"],
             100 * r.get("mfu_best_peak", float("nan")),
             *([100 * r["mfu_datasheet"]] if sheet else []),
             r.get("xla_bytes", float("nan")) / MIB, r.get("xla_bytes_no_alias", float("nan")) / MIB,
             (r["rss_at_start_bytes"] or float("nan")) / MIB, r["max_rss_bytes"] / MIB]
            for r in results["cases"]]
    m = results["machine"]
    st = results["settings"]
    title = (f"ViT train step, {st['dtype']}, AdamW, batch {st['batch_size']}, {st['image_size']}px, median of "
             f"{st['steps']} steps after 1 warm-up — {_machine_words(m)}, jax {m['jax_version']}")
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
                  peak_matmul_n: int | None = None, peak_repeats: int = 10, dtype: str = "float32",
                  verbose: bool = True) -> dict:
    """Benchmarks the ViT train step for every (variant, scan) pair; prints a table, writes JSON to
    `out` (unless None) and returns the same dict.

    isolate: run each case in a fresh spawned process, so that each max RSS is the case's own.
    peak_matmul_n, peak_repeats: the matmul peak (in `dtype`) is the best of `peak_repeats` n×n×n
    matmuls, measured before the cases (used for MFU) and again after them (reported, to show
    drift); n None → `default_peak_matmul_n()`. dtype: the compute dtype ("float32", "bfloat16").
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    def case_fn(kwargs):
        r = _vit_case(kwargs)
        if verbose:
            print(f"  {r['variant']} scan={'on' if r['scan_layers'] else 'off'}: compile {r['compile_s']:.1f} s, "
                  f"step {r['step_s'] * 1e3:.0f} ms, {r['images_per_s']:.2f} img/s, "
                  f"MFU {100 * r['mfu']:.1f}%", flush=True)
        return r

    cases = [(case_fn, {"variant": v, "scan": bool(s), "image_size": image_size, "batch_size": batch_size,
                        "steps": steps, "isolate": isolate, "dtype": dtype}) for v in variants for s in scan_modes]
    results_cases, peak, machine = run_cases(cases, peak_matmul_n=peak_matmul_n, peak_repeats=peak_repeats,
                                             verbose=verbose, dtype=dtype)
    results = {
        "benchmark": "vit_train_step",
        "started": started,
        "settings": {"variants": list(variants), "image_size": image_size, "batch_size": batch_size,
                     "steps": steps, "scan_modes": [bool(s) for s in scan_modes], "isolate": isolate,
                     "dtype": dtype},
        "machine": machine,
        "peak": peak,
        "units": _UNITS,
        "cases": results_cases,
    }
    return _write(results, out, format_table(results) if verbose else "", verbose)


def vit_hf_config(variant: str, image_size: int, num_classes: int) -> dict:
    """kwargs of transformers.ViTConfig for our `vit_config(variant, ...)` classifier: the same
    network (pre-LN, exact GELU, our norm eps, CLS pooling, no pooler, no dropout)."""
    from mmjax.models.vit import vit_config
    c = vit_config(variant, image_size=image_size, channels=3, num_classes=num_classes)
    e = c.encoder
    return {"hidden_size": e.width, "num_hidden_layers": e.depth, "num_attention_heads": e.num_heads,
            "intermediate_size": e.mlp_dim or 4 * e.width, "hidden_act": e.activation,
            "layer_norm_eps": e.norm_eps, "image_size": image_size, "patch_size": c.patch_size,
            "num_channels": 3, "qkv_bias": True, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "num_labels": num_classes}


def hf_vit_stepper(variant: str, *, checkpoint_dir: str, image_size: int, num_classes: int, batch_size: int,
                   dtype: str = "float32", seed: int = 0, attn_implementation: str = "sdpa") -> LocalStepper:
    """Builds a random HF `ViTForImageClassification` (torch.manual_seed(seed)) for our ViT variant,
    saves it to `checkpoint_dir` for our side, and returns its train step: forward with labels
    (softmax cross-entropy), backward, AdamW (`torch_train_stepper`)."""
    import torch
    import transformers

    from mmjax.models.vit import vit_config, vit_forward_flops

    transformers.utils.logging.disable_progress_bar()
    rss_start = _current_rss_bytes()
    dev = _torch_setup(torch, dtype, seed)
    hf_cfg = transformers.ViTConfig(**vit_hf_config(variant, image_size, num_classes))
    model = transformers.ViTForImageClassification._from_config(hf_cfg, attn_implementation=attn_implementation)
    model = model.to(torch.float32)
    model.save_pretrained(checkpoint_dir)
    model = model.to(dev)
    model.train()  # dropout probabilities are all 0: train mode only selects the training code path
    batch = vit_batch(image_size, batch_size, num_classes, seed)
    pixel_values = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2))).to(dev)
    labels = torch.from_numpy(batch["label"].astype(np.int64)).to(dev)
    flops = 3.0 * vit_forward_flops(vit_config(variant, image_size=image_size, channels=3, num_classes=num_classes))
    return torch_train_stepper(
        torch, model, lambda: model(pixel_values=pixel_values, labels=labels).loss, dev=dev, dtype=dtype,
        batch_size=batch_size, flops_per_example=flops, rss_start=rss_start)


def ours_vit_stepper(variant: str, *, checkpoint_dir: str | None, image_size: int, num_classes: int, scan: bool,
                     batch_size: int, total_steps: int, dtype: str = "float32", seed: int = 0) -> LocalStepper:
    """Our classification train step: from HF's checkpoint (`mmjax.load_pretrained`) when given,
    else from our own init of `vit_config(variant)`; AdamW as HF's (PEER_*)."""
    from mmjax import load_pretrained
    from mmjax.config import to_dict
    from mmjax.models.vit import vit_config
    from mmjax.tasks import ClassificationTask

    if checkpoint_dir is not None:
        model, params = load_pretrained(checkpoint_dir, scan_layers=scan)
        model_cfg = model.cfg
    else:
        model_cfg = vit_config(variant, image_size=image_size, channels=3, num_classes=num_classes,
                               encoder={"scan_layers": scan})
        params = None
    cfg = _vit_experiment(_with_dtype(model_cfg, dtype), name=f"bench_vit_{variant}", batch_size=batch_size,
                          total_steps=total_steps, seed=seed, optim=_peer_optim_config())
    extra = {"mmjax_config": to_dict(cfg.model), "dtype": dtype, "param_dtype": cfg.model.encoder.param_dtype,
             **({"note": _SCAN_NOTE} if scan else {})}
    return jax_train_stepper(ClassificationTask(cfg), cfg, vit_batch(image_size, batch_size, num_classes, seed),
                             params=params, extra_figures=extra)


def vit_vs_hf_case(variant: str, *, scan: bool = False, image_size: int = 224, batch_size: int = 8, steps: int = 5,
                   warmup: int = 2, peak_flops: float, dtype: str = "float32", num_classes: int = 1000,
                   seed: int = 0, attn_implementation: str = "sdpa", isolate: bool = True, hf: bool = True) -> dict:
    """Our ViT classification train step against HF `ViTForImageClassification`'s (hf=False: ours
    only, from our own init), same weights and batch, timed interleaved."""
    with tempfile.TemporaryDirectory(prefix="mmjax_bench_vit_") as ckpt:
        common = {"image_size": image_size, "num_classes": num_classes, "batch_size": batch_size, "dtype": dtype,
                  "seed": seed}
        hf_side = (hf_vit_stepper, {"variant": variant, "checkpoint_dir": ckpt, **common,
                                    "attn_implementation": attn_implementation}) if hf else None
        ours_side = (ours_vit_stepper, {"variant": variant, "checkpoint_dir": ckpt if hf else None, "scan": scan,
                                        "total_steps": warmup + steps, **common})
        ours, hf_res = _paired(hf_side, ours_side, batch_size=batch_size, warmup=warmup, steps=steps,
                               peak_flops=peak_flops, isolate=isolate)
    return {"model": "vit", "variant": variant, "scan_layers": scan, "batch_size": batch_size,
            "image_size": image_size, "num_classes": num_classes, "dtype": dtype, "param_dtype": "float32",
            "hf_config": vit_hf_config(variant, image_size, num_classes), "isolated_process": isolate,
            **_pair_fields(ours, hf_res)}


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
    # OpenAI CLIP ViT-B/16's sizes: ViT-B/16 at 224 px + a 512-wide, 12-deep, 8-head text tower over
    # 77 tokens and a 49408-token vocabulary, 512-d embeddings, quick_gelu. The GPU suite's.
    "B/16": ClipBenchConfig(image_size=224, patch_size=16, vision_width=768, vision_depth=12, vision_heads=12,
                            vision_mlp=3072, text_width=512, text_depth=12, text_heads=8, text_mlp=2048, text_len=77,
                            vocab_size=49408, embed_dim=512, activation="quick_gelu", batch_size=256),
    # For tests: seconds to compile.
    "micro": ClipBenchConfig(image_size=16, patch_size=4, vision_width=32, vision_depth=2, vision_heads=2,
                             vision_mlp=64, text_width=32, text_depth=2, text_heads=2, text_mlp=64, text_len=8,
                             vocab_size=64, embed_dim=32, activation="quick_gelu", batch_size=8),
}


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
                    attn_implementation: str = "sdpa", init_noise: float = 0.0, dtype: str = "float32"
                    ) -> LocalStepper:
    """Builds a random HF `CLIPModel` (torch.manual_seed(seed)), saves it to `checkpoint_dir`
    (safetensors) for our side to load, and returns its train step (`torch_train_stepper`):
    forward with return_loss=True, backward, torch.optim.AdamW. init_noise > 0 adds
    N(0, init_noise²) to every weight first (tests: HF's init leaves biases at 0 and norms at 1,
    which would hide a mis-mapped one)."""
    import torch
    import transformers

    from mmjax.tasks.contrastive import ContrastiveTask

    transformers.utils.logging.disable_progress_bar()
    spec = _clip_spec(config)
    rss_start = _current_rss_bytes()
    dev = _torch_setup(torch, dtype, seed)
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
    model = model.to(dev)
    model.train()  # dropout probabilities are all 0: train mode only selects the training code path

    batch = clip_batch(spec, batch_size, seed)
    pixel_values = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2))).to(dev)
    input_ids = torch.from_numpy(batch["text_ids"].astype(np.int64)).to(dev)
    attention_mask = (torch.arange(spec.text_len)[None, :] < torch.from_numpy(batch["text_len"])[:, None]).long()
    attention_mask = attention_mask.to(dev)

    def forward():
        return model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                     return_loss=True).loss

    return torch_train_stepper(torch, model, forward, dev=dev, dtype=dtype, batch_size=batch_size,
                               flops_per_example=_clip_flops_per_example(ContrastiveTask, spec),
                               rss_start=rss_start)


def _clip_experiment(model_cfg, spec: ClipBenchConfig, batch_size: int, steps: int, seed: int):
    from mmjax.data.config import DataConfig
    from mmjax.experiment import ExperimentConfig, TrainConfig, validate
    from mmjax.tasks.contrastive import ContrastiveLossConfig
    return validate(ExperimentConfig(
        name="bench_clip", task="contrastive", model=model_cfg, loss=ContrastiveLossConfig(kind="clip"),
        data=DataConfig(name="synthetic", text_field="caption", max_text_len=spec.text_len),
        optim=_peer_optim_config(),
        train=TrainConfig(steps=steps + 10, batch_size=batch_size, seed=seed, progress=False)))


def _clip_model_config(spec: ClipBenchConfig, scan: bool = False):
    """Our CLIP config for `spec`, through the converter's mapping of its HF config."""
    from mmjax.convert.family import LoadOptions
    from mmjax.convert.hf_clip import clip_config_from_hf
    return clip_config_from_hf(spec.hf_config(), LoadOptions(scan_layers=scan), siglip=False)


def _clip_flops_per_example(task_cls, spec: ClipBenchConfig) -> float:
    """task.train_flops_per_example() of our contrastive task for this config (no params built)."""
    cfg = _clip_experiment(_clip_model_config(spec), spec, spec.batch_size, 1, 0)
    return task_cls(cfg).train_flops_per_example()


def ours_clip_stepper(config: str, *, checkpoint_dir: str | None, scan: bool, batch_size: int, total_steps: int,
                      seed: int = 0, dtype: str = "float32") -> LocalStepper:
    """Loads the HF checkpoint with `mmjax.load_pretrained` (None: our own init of the same config)
    and returns our contrastive task's jitted AdamW train step (compiled) on the same batch, in
    compute dtype `dtype` (params fp32)."""
    from mmjax import load_pretrained
    from mmjax.config import to_dict
    from mmjax.tasks.contrastive import ContrastiveTask

    spec = _clip_spec(config)
    if checkpoint_dir is not None:
        model, params = load_pretrained(checkpoint_dir, scan_layers=scan)
        model_cfg = model.cfg
    else:
        model_cfg, params = _clip_model_config(spec, scan), None
    cfg = _clip_experiment(_with_dtype(model_cfg, dtype), spec, batch_size, total_steps, seed)
    extra = {"mmjax_config": to_dict(cfg.model), "dtype": dtype, **({"note": _SCAN_NOTE} if scan else {})}
    return jax_train_stepper(ContrastiveTask(cfg), cfg, clip_batch(spec, batch_size, seed), params=params,
                             extra_figures=extra)


def clip_case(config: str, *, scan: bool, batch_size: int | None = None, steps: int = 5, warmup: int = 2,
              peak_flops: float, seed: int = 0, attn_implementation: str = "sdpa", isolate: bool = True,
              init_noise: float = 0.0, dtype: str = "float32", hf: bool = True) -> dict:
    """One CLIP config: HF's side is built first (it writes the shared checkpoint), then ours from
    that checkpoint; then both are timed interleaved (`time_interleaved`). hf=False: ours only."""
    spec = _clip_spec(config)
    batch_size = batch_size or spec.batch_size
    with tempfile.TemporaryDirectory(prefix="mmjax_bench_clip_") as ckpt:
        hf_side = (hf_clip_stepper, {"config": config, "checkpoint_dir": ckpt, "batch_size": batch_size, "seed": seed,
                                     "attn_implementation": attn_implementation, "init_noise": init_noise,
                                     "dtype": dtype}) if hf else None
        ours_side = (ours_clip_stepper, {"config": config, "checkpoint_dir": ckpt if hf else None, "scan": scan,
                                         "batch_size": batch_size, "total_steps": warmup + steps, "seed": seed,
                                         "dtype": dtype})
        ours, hf_res = _paired(hf_side, ours_side, batch_size=batch_size, warmup=warmup, steps=steps,
                               peak_flops=peak_flops, isolate=isolate)
    return {
        "model": "clip",
        "config": config,
        "scan_layers": scan,
        "batch_size": batch_size,
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "text_len": spec.text_len,
        "bench_config": dataclasses.asdict(spec),
        "hf_config": spec.hf_config(),
        "dtype": dtype,
        "param_dtype": "float32",
        "isolated_process": isolate,
        **_pair_fields(ours, hf_res),
    }


def format_clip_table(results: dict) -> str:
    sheet = (results["peak"].get("datasheet") or {}).get("flops_per_s")
    cols = [("config", "{}"), ("scan", "{}"), ("batch", "{}"), ("params M", "{:.3g}"), ("compile s", "{:.1f}"),
            ("ours ms", "{:.1f}"), ("ours img/s", "{:.2f}"), ("HF ms", "{:.1f}"), ("HF img/s", "{:.2f}"),
            ("ours/HF", "{:.2f}"), ("GFLOP form", "{:.4g}"), ("ours MFU %", "{:.1f}"), ("HF MFU %", "{:.1f}"),
            *([("ours sheet %", "{:.1f}"), ("HF sheet %", "{:.1f}")] if sheet else []),
            ("|Δloss0|", "{:.1e}"), ("XLA MiB-alias", "{:.0f}"), ("ours maxRSS", "{:.0f}"),
            ("HF maxRSS", "{:.0f}")]
    rows = [[r["config"], "on" if r["scan_layers"] else "off", r["batch_size"], r["ours"]["num_params"] / 1e6,
             r["ours"]["compile_s"], r["ours"]["step_s"] * 1e3, r["ours"]["images_per_s"], r["hf"]["step_s"] * 1e3,
             r["hf"]["images_per_s"], r["ratio_ours_over_hf"], r["ours"]["flops_formula"] / 1e9,
             100 * r["ours"]["mfu"], 100 * r["hf"]["mfu"],
             *([100 * r["ours"]["mfu_datasheet"], 100 * r["hf"]["mfu_datasheet"]] if sheet else []),
             r["loss_step0_abs_diff"],
             r["ours"].get("xla_bytes_no_alias", float("nan")) / MIB, r["ours"]["max_rss_bytes"] / MIB,
             r["hf"]["max_rss_bytes"] / MIB]
            for r in results["cases"]]
    m, st = results["machine"], results["settings"]
    hf_attn = {r["hf"]["attn_implementation"] for r in results["cases"]}
    hf_dev = {r["hf"]["device"] for r in results["cases"]}
    title = (f"CLIP train step (CLIP softmax loss, AdamW, {st['dtype']}): mmjax (jax {m['jax_version']}) vs HF "
             f"CLIPModel (torch {results['cases'][0]['hf']['torch_version'] if results['cases'] else '?'} on "
             f"{'/'.join(sorted(hf_dev))}, attention {'/'.join(sorted(hf_attn))}), median of {st['steps']} steps "
             f"after {st['warmup']} warm-up — {_machine_words(m)}")
    out = [title, _peak_line(results["peak"]), *_table(cols, rows)]
    out += ["GFLOP form: per train step, 3 × (image tower + text tower forward matmul FLOPs) × batch "
            f"(ContrastiveTask.train_flops_per_example); MFU against the {st['dtype']} matmul peak above"
            + (" and the datasheet peak (sheet)" if sheet else "") + ", both sides.",
            "|Δloss0|: |our loss − HF's loss| at step 0 (same weights, same batch). MiB: XLA temp+arg+out "
            "minus aliased; maxRSS: each side's process high-water mark."]
    return "\n".join(out)


def run_clip_bench(configs: Sequence[str] = ("tiny", "S/16"), batch_size: int | None = None, steps: int = 5,
                   warmup: int = 2, out: str | Path | None = "bench_clip.json",
                   scan_modes: Sequence[bool] = (False, True),
                   *, attn_implementation: str = "sdpa", isolate: bool = True, peak_matmul_n: int | None = None,
                   peak_repeats: int = 10, seed: int = 0, init_noise: float = 0.0, dtype: str = "float32",
                   verbose: bool = True) -> dict:
    """Benchmarks our CLIP train step against HF's CLIPModel for every (config, scan) pair; prints
    a table, writes JSON to `out` (unless None) and returns the same dict.

    batch_size: None → each config's own (tiny 128, S/16 16, B/16 256). attn_implementation: HF's
    ("sdpa" or "eager"). dtype: the compute dtype of both sides. Other arguments as `run_vit_bench`.
    """
    for c in configs:
        _clip_spec(c)
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
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
                        "init_noise": init_noise, "dtype": dtype})
             for c in configs for s in scan_modes]
    results_cases, peak, machine = run_cases(cases, peak_matmul_n=peak_matmul_n, peak_repeats=peak_repeats,
                                             verbose=verbose, dtype=dtype)
    results = {
        "benchmark": "clip_train_step_vs_hf",
        "started": started,
        "settings": {"configs": list(configs), "batch_size": batch_size, "steps": steps, "warmup": warmup,
                     "scan_modes": [bool(s) for s in scan_modes], "isolate": isolate, "dtype": dtype,
                     "hf_attn_implementation": attn_implementation, "seed": seed, "init_noise": init_noise,
                     "optimizer": _PEER_OPTIMIZER_JSON},
        "timing": _TIMING,
        "same_work": ("both sides: the same HF CLIPConfig (ours loaded from HF's save_pretrained checkpoint "
                      "with mmjax.load_pretrained, so the same initial weights), the same batch (images, "
                      "token ids padded to text_len, padding mask from text_len, EOS pooling), CLIP's "
                      "symmetric softmax loss over the batch, gradients for all params, AdamW as stated, "
                      f"no clipping, no dropout, compute in {dtype} (ours: TransformerConfig.dtype; HF: "
                      f"{'torch.autocast bf16' if dtype == 'bfloat16' else 'fp32'}), fp32 params; each step "
                      "synchronous"),
        "machine": machine,
        "peak": peak,
        "units": {**_UNITS, "ratio_ours_over_hf": "our images/s ÷ HF's images/s (> 1: ours is faster)",
                  "loss_step0_abs_diff": "|our loss − HF loss| of the first step (initial weights)"},
        "cases": results_cases,
    }
    return _write(results, out, format_clip_table(results) if verbose else "", verbose)


_TIMING = ("each side in its own process (isolate) or both in this one; `warmup` untimed steps of each, "
           "then `steps` rounds of one timed step per side, the order reversed every other round, so that "
           "other load on the machine falls on both alike; median per side")


# ----------------------------------------------------------------------------- the GPU suite

SUITE_CASES = ("vit", "clip", "decode")


def _decode_case(*, preset: str | None, batch_size: int, prompt_len: int, new_tokens: int, repeats: int,
                 dtype: str, seed: int, hf: bool, isolate: bool, verbose: bool, peak_flops: float) -> dict:
    """Batch-`batch_size` greedy decoding through `mmjax.bench_decode.run` (in a spawned process
    when isolate), the model `bench_decode.MODELS[preset]` (None: "1b" on an accelerator, "small"
    on a CPU), weights and compute in `dtype`."""
    from mmjax import bench_decode
    preset = preset or ("small" if jax.default_backend() == "cpu" else "1b")
    if not hf:
        return {"model": "llama", "preset": preset, "dtype": dtype,
                "skipped": "HF builds the shared weights: needs torch and transformers"}
    kwargs = {**bench_decode.MODELS[preset], "batch_sizes": (batch_size,), "prompt_len": prompt_len,
              "new_tokens": new_tokens, "repeats": repeats, "dtype": dtype, "seed": seed, "out": None,
              "verbose": verbose, "settle_s": bench_decode.SETTLE_S if jax.default_backend() == "cpu" else 0.05}
    res = _isolated(bench_decode.run, kwargs) if isolate else bench_decode.run(**kwargs)
    return {"preset": preset, "dtype": dtype, "batch_size": batch_size, "isolated_process": isolate, **res}


def _suite_summary(name: str, r: dict) -> dict:
    """One row of the suite's table from a case's result."""
    if "error" in r or "skipped" in r:
        return {"case": name, "error": r.get("error_message") or r.get("error"), "skipped": r.get("skipped")}
    if name == "decode":
        c = r["cases"][0]
        ours, hf = c["ours"], c.get("hf")
        m = r["model"]
        return {"case": name, "what": f"greedy decode, Llama {m['params'] / 1e6:.3g}M ({r['preset']}), "
                                      f"{c['prompt_len']}+{c['new_tokens']} tokens",
                "batch_size": c["batch_size"], "dtype": m["dtype"], "unit": "tokens/s",
                "ours": ours["tokens_per_s"], "hf": hf["tokens_per_s"] if hf else None,
                "ratio_ours_over_hf": c.get("ratio_tokens_per_s"),
                "ours_mfu": ours.get("mfu"), "hf_mfu": hf.get("mfu") if hf else None,
                "ours_mfu_datasheet": ours.get("mfu_datasheet"),
                "hf_mfu_datasheet": hf.get("mfu_datasheet") if hf else None,
                "ours_compile_s": ours["compile_s"], "check": "tokens_match", "check_value": c["tokens_match"],
                "our_device": r["our_device"], "hf_device": r["hf_device"]}
    ours, hf = r["ours"], r["hf"]
    what = (f"ViT-{r['variant']} train step, {r['image_size']} px" if r["model"] == "vit"
            else f"CLIP {r['config']} train step, {r['image_size']} px + {r['text_len']} tokens")
    return {"case": name, "what": what, "batch_size": r["batch_size"], "dtype": r["dtype"], "unit": "images/s",
            "ours": ours["images_per_s"], "hf": hf["images_per_s"] if hf else None,
            "ratio_ours_over_hf": r["ratio_ours_over_hf"],
            "ours_mfu": ours["mfu"], "hf_mfu": hf["mfu"] if hf else None,
            "ours_mfu_datasheet": ours["mfu_datasheet"], "hf_mfu_datasheet": hf["mfu_datasheet"] if hf else None,
            "ours_compile_s": ours["compile_s"], "check": "loss_step0_abs_diff",
            "check_value": r["loss_step0_abs_diff"], "our_device": ours["device"],
            "hf_device": hf["device"] if hf else None}


def _progress_line(name: str, r: dict) -> str:
    if "error" in r:
        return f"  {name}: ERROR\n{r['error']}"
    if "skipped" in r:
        return f"  {name}: skipped ({r['skipped']})"
    if name == "decode":
        c = r["cases"][0]
        return (f"  {name}: batch {c['batch_size']}, ours {c['ours']['tokens_per_s']:.1f} tok/s, HF "
                f"{c['hf']['tokens_per_s']:.1f} tok/s, ratio {c['ratio_tokens_per_s']:.2f}, tokens match "
                f"{c['tokens_match']:.2f}")
    hf = r["hf"]
    return (f"  {name}: batch {r['batch_size']}, ours {r['ours']['images_per_s']:.2f} img/s (compile "
            f"{r['ours']['compile_s']:.1f} s), " + (f"HF {hf['images_per_s']:.2f} img/s, ratio "
                                                     f"{r['ratio_ours_over_hf']:.2f}, |Δloss0| "
                                                     f"{r['loss_step0_abs_diff']:.1e}" if hf else "no HF"))


def format_suite_table(results: dict) -> str:
    cols = [("case", "{}"), ("batch", "{}"), ("dtype", "{}"), ("unit", "{}"), ("ours", "{:.4g}"), ("HF", "{:.4g}"),
            ("ours/HF", "{:.2f}"), ("ours MFU %", "{:.2f}"), ("HF MFU %", "{:.2f}"), ("ours sheet %", "{:.2f}"),
            ("HF sheet %", "{:.2f}"), ("compile s", "{:.1f}"), ("check", "{}"), ("what", "{}")]
    pct = lambda x: None if x is None else 100 * x
    rows = []
    for s in results["summary"]:
        if s.get("error") or s.get("skipped"):
            rows.append([s["case"], *[None] * 11, "ERROR" if s.get("error") else "skipped",
                         (s.get("skipped") or s["error"])[:120]])
            continue
        if s["hf"] is None:
            check = "no HF"
        elif s["check"] == "loss_step0_abs_diff":
            check = f"|Δloss0| {s['check_value']:.1e}"
        else:
            check = f"match {s['check_value']:.2f}"
        rows.append([s["case"], s["batch_size"], s["dtype"], s["unit"], s["ours"], s["hf"], s["ratio_ours_over_hf"],
                     pct(s["ours_mfu"]), pct(s["hf_mfu"]), pct(s["ours_mfu_datasheet"]), pct(s["hf_mfu_datasheet"]),
                     s["ours_compile_s"], check, s["what"]])
    m, st = results["machine"], results["settings"]
    where = sorted({f"ours on {s['our_device']}, HF on {s['hf_device'] or '-'}" for s in results["summary"]
                    if s.get("our_device")})
    title = (f"mmjax suite '{st['suite']}' ({st['dtype']}; train: median of {st['steps']} steps after {st['warmup']} "
             f"warm-up, AdamW) — {_machine_words(m)}, jax {m['jax_version']}; {'; '.join(where) or '-'}\n"
             f"HF peer: {results['hf_peer']}")
    out = [title, _peak_line(results["peak"]), *_table(cols, rows)]
    out += ["ours, HF: images/s (train) or tokens/s (decode, best of repeats); ours/HF > 1: ours is faster.",
            "MFU: formula FLOP/s (train: 3 × forward matmul FLOPs × batch per step; decode: 2 × matmul params "
            "per token) over the measured matmul peak above; sheet: over the datasheet peak (- where unknown).",
            "check: |our loss − HF's| at step 0 (same weights, same batch); decode: fraction of greedy tokens "
            "equal to HF's."]
    return "\n".join(out)


def run_gpu_suite(*, vit_variant: str = "B/16", clip_config: str = "B/16", image_size: int = 224,
                  batch_size: int = 256, steps: int = 10, warmup: int = 3, dtype: str = "bfloat16",
                  cases: Sequence[str] = SUITE_CASES, hf: bool | None = None, scan: bool = False,
                  attn_implementation: str = "sdpa", isolate: bool = True, decode_model: str | None = None,
                  decode_batch_size: int = 8, decode_prompt_len: int = 16, decode_new_tokens: int = 128,
                  decode_repeats: int = 3, peak_matmul_n: int | None = None, peak_repeats: int = 10, seed: int = 0,
                  out: str | Path | None = "bench_gpu.json", verbose: bool = True) -> dict:
    """The GPU suite (module docstring): ViT and CLIP train steps and batched greedy decoding, each
    against its HF peer (hf None: when torch and transformers import). A case that fails is
    recorded with its traceback ("error") and the others still run; `out` holds the cases done so
    far ("partial": true) until the run ends. Prints one table, writes JSON to `out` (unless None)
    and returns the same dict."""
    from mmjax import bench_decode
    from mmjax.models.vit import vit_config

    unknown = [c for c in cases if c not in SUITE_CASES]
    if unknown or not cases:
        raise ValueError(f"suite cases are among {', '.join(SUITE_CASES)}, got {list(cases)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    vit_config(vit_variant)  # a bad name fails before any work
    _clip_spec(clip_config)
    if decode_model is not None and decode_model not in bench_decode.MODELS:
        raise ValueError(f"unknown decode model {decode_model!r}; known: {', '.join(bench_decode.MODELS)}")
    hf = hf_available() if hf is None else hf
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    done: dict[str, dict] = {}

    def guarded(name: str, fn: Callable[..., dict]) -> Callable[[dict], dict]:
        def case_fn(kwargs):
            t = time.perf_counter()
            try:
                r = fn(**kwargs)
            except Exception as e:
                import traceback
                first = (str(e).strip().splitlines() or [""])[0]
                r = {"error": traceback.format_exc(), "error_message": f"{type(e).__name__}: {first}"}
            r = {"case": name, "wall_s": time.perf_counter() - t, **r}
            if verbose:
                print(_progress_line(name, r), flush=True)
            done[name] = r
            if out is not None:  # what a run cut short leaves behind; the full JSON replaces it at the end
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                Path(out).write_text(json.dumps({"benchmark": "suite_gpu", "partial": True, "started": started,
                                                 "cases": done}, indent=2))
            return r
        return case_fn

    train = {"steps": steps, "warmup": warmup, "dtype": dtype, "seed": seed, "isolate": isolate, "hf": hf,
             "attn_implementation": attn_implementation, "scan": scan, "batch_size": batch_size}
    todo = {
        "vit": ("vit_train", vit_vs_hf_case, {"variant": vit_variant, "image_size": image_size, **train}),
        "clip": ("clip_train", clip_case, {"config": clip_config, **train}),
        "decode": ("decode", _decode_case, {"preset": decode_model, "batch_size": decode_batch_size,
                                            "prompt_len": decode_prompt_len, "new_tokens": decode_new_tokens,
                                            "repeats": decode_repeats, "dtype": dtype, "seed": seed, "hf": hf,
                                            "isolate": isolate, "verbose": verbose}),
    }
    chosen = [todo[c] for c in SUITE_CASES if c in cases]
    results_cases, peak, machine = run_cases([(guarded(name, fn), kwargs) for name, fn, kwargs in chosen],
                                             peak_matmul_n=peak_matmul_n, peak_repeats=peak_repeats,
                                             verbose=verbose, dtype=dtype)
    by_name = {r["case"]: r for r in results_cases}
    results = {
        "benchmark": "suite_gpu",
        "started": started,
        "settings": {"suite": "gpu", "cases": [c for c in SUITE_CASES if c in cases], "vit_variant": vit_variant,
                     "clip_config": clip_config, "image_size": image_size, "batch_size": batch_size, "steps": steps,
                     "warmup": warmup, "dtype": dtype, "param_dtype": "float32 (train); decode: the dtype",
                     "scan_layers": scan, "hf": hf, "hf_attn_implementation": attn_implementation,
                     "isolate": isolate, "seed": seed, "optimizer": _PEER_OPTIMIZER_JSON,
                     "decode": {"model": decode_model, "batch_size": decode_batch_size,
                                "prompt_len": decode_prompt_len, "new_tokens": decode_new_tokens,
                                "repeats": decode_repeats, "dtype": dtype}},
        "hf_peer": ("HF transformers in PyTorch eager: torch.autocast bf16 around forward + loss, fp32 master "
                    f"params, attention {attn_implementation}, on CUDA when available, else the CPU"
                    if dtype == "bfloat16" else
                    f"HF transformers in PyTorch eager, fp32 (TF32 matmuls on a GPU), attention "
                    f"{attn_implementation}, on CUDA when available, else the CPU") if hf else "none (--no-hf)",
        "timing": _TIMING,
        "machine": machine,
        "peak": peak,
        "units": {**_UNITS, "summary.ours / summary.hf": "images/s (train) or tokens/s (decode)",
                  "ratio_ours_over_hf": "ours ÷ HF (> 1: ours is faster)"},
        "summary": [_suite_summary(name, by_name[name]) for name, _, _ in chosen],
        "cases": by_name,
    }
    results["failed"] = [s["case"] for s in results["summary"] if s.get("error")]
    return _write(results, out, format_suite_table(results) if verbose else "", verbose)


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
    p.add_argument("--suite", choices=("gpu",), default=None,
                   help="gpu: ViT and CLIP train steps and batch-8 decoding, each vs HF, in one run (--model ignored)")
    p.add_argument("--out", default=None, help="JSON path (default bench_vit.json / bench_clip.json / bench_gpu.json)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype, params stay fp32 (default float32; --suite gpu: bfloat16)")
    p.add_argument("--variants", default="S/16,B/16", help="vit: ViT variants")
    p.add_argument("--configs", default="tiny,S/16", help=f"clip: configs among {', '.join(CLIP_CONFIGS)}")
    p.add_argument("--image-size", type=int, default=224, help="vit and suite's ViT (CLIP configs fix their own)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="vit: default 8; clip: default per config (tiny 128, S/16 16, B/16 256); suite: 256 "
                        "(ViT and CLIP)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default vit 3, clip 5, suite 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default clip 2, suite 3; vit: 1)")
    p.add_argument("--scan-modes", type=_parse_bool_modes, default=None,
                   help="comma-separated on/off (default off,on; suite: one value, default off)")
    p.add_argument("--hf-attn", choices=("sdpa", "eager"), default="sdpa", help="HF attention implementation")
    p.add_argument("--init-noise", type=float, default=0.0,
                   help="clip: add N(0, x²) to every HF weight before saving (checks; HF's init hides a "
                        "mis-mapped bias or norm)")
    p.add_argument("--peak-matmul-n", type=int, default=None,
                   help="matmul size for the peak (default 2048 on a CPU, 8192 on an accelerator)")
    p.add_argument("--no-isolate", action="store_true",
                   help="run all cases in this process (max RSS then accumulates across cases)")
    s = p.add_argument_group("--suite gpu")
    s.add_argument("--cases", default=",".join(SUITE_CASES), help=f"among {','.join(SUITE_CASES)}")
    s.add_argument("--vit-variant", default="B/16", help="the suite's ViT (default B/16)")
    s.add_argument("--clip-config", default="B/16", help="the suite's CLIP config (default B/16)")
    s.add_argument("--no-hf", action="store_true", help="ours only (default: HF too when torch+transformers import)")
    s.add_argument("--decode-model", default=None,
                   help="mmjax.bench_decode.MODELS preset (default 1b on an accelerator, small on a CPU)")
    s.add_argument("--decode-batch-size", type=int, default=8)
    s.add_argument("--decode-prompt-len", type=int, default=16)
    s.add_argument("--decode-new-tokens", type=int, default=128)
    s.add_argument("--decode-repeats", type=int, default=3)
    args = p.parse_args(argv)
    isolate = not args.no_isolate
    if args.suite == "gpu":
        scan = args.scan_modes or (False,)
        if len(scan) != 1:
            p.error("--suite gpu takes one --scan-modes value")
        try:
            res = run_gpu_suite(vit_variant=args.vit_variant, clip_config=args.clip_config,
                                image_size=args.image_size, batch_size=args.batch_size or 256,
                                steps=args.steps or 10, warmup=args.warmup or 3, dtype=args.dtype or "bfloat16",
                                cases=_names(args.cases), hf=False if args.no_hf else None, scan=scan[0],
                                attn_implementation=args.hf_attn, isolate=isolate, decode_model=args.decode_model,
                                decode_batch_size=args.decode_batch_size, decode_prompt_len=args.decode_prompt_len,
                                decode_new_tokens=args.decode_new_tokens, decode_repeats=args.decode_repeats,
                                peak_matmul_n=args.peak_matmul_n, out=args.out or "bench_gpu.json")
        except ValueError as e:
            p.error(str(e))
        return 1 if res["failed"] else 0
    if args.model == "vit":
        run_vit_bench(variants=_names(args.variants), image_size=args.image_size, batch_size=args.batch_size or 8,
                      steps=args.steps or 3, out=args.out or "bench_vit.json",
                      scan_modes=args.scan_modes if args.scan_modes is not None else (False, True),
                      isolate=isolate, peak_matmul_n=args.peak_matmul_n, dtype=args.dtype or "float32")
    else:
        try:
            run_clip_bench(configs=_names(args.configs), batch_size=args.batch_size, steps=args.steps or 5,
                           warmup=args.warmup or 2, out=args.out or "bench_clip.json",
                           scan_modes=args.scan_modes if args.scan_modes is not None else (False, True),
                           attn_implementation=args.hf_attn, isolate=isolate,
                           peak_matmul_n=args.peak_matmul_n, init_noise=args.init_noise,
                           dtype=args.dtype or "float32")
        except ValueError as e:
            p.error(str(e))
    return 0


if __name__ == "__main__":
    # Run the importable module's main, so that what is sent to spawned processes (builders, case
    # functions) is named mmjax.bench.*, not __main__.* (which a process started by runpy or a
    # wrapper could not look up).
    from mmjax.bench import main as _main
    sys.exit(_main())
