"""ViT train-step benchmark on this machine, in fp32: compile time, step time, memory, FLOPs, MFU.

    python -m mmjax.bench [--variants S/16,B/16] [--image-size 224] [--batch-size 8] [--steps 3]
                          [--scan-modes off,on] [--out bench_vit.json]
    mmjax bench ...                      (the same, through the CLI)

For each ViT variant and each `scan_layers` setting, the benchmark builds the library's own
classification task (ViT, 1000 classes, 3 channels) and its real AdamW train step
(`make_optimizer` → `make_train_step` → `jit_train_step`, state donated, state born sharded on a
one-device mesh exactly as the training loop does it), then measures:

    compile_s      wall time of `step.lower(state, batch)` + `.compile()` (reported separately too)
    step_s         median of `steps` timed steps after one warm-up step, each to block_until_ready
    images_per_s   batch_size / step_s
    flops_formula  3 × vit_forward_flops(cfg) × batch   (the stated formula: matmuls only)
    flops_xla      compiled.cost_analysis()["flops"]    (XLA's count for the whole step)
    mfu            flops_formula / step_s / peak, with the fp32 matmul peak measured by
                   `measure_matmul_peak` at the start of this same run; the peak is measured again
                   at the end, `mfu_best_peak` uses the larger of the two, and a run whose two peaks
                   differ by more than 15% is flagged (other load on the cores: MFU unreliable)
    memory         XLA's buffer assignment of the compiled step (`memory_analysis()`: temp, argument,
                   output and alias bytes) and, separately, the OS's high-water mark of the process's
                   resident memory (`getrusage(...).ru_maxrss`)

By default each (variant, scan) case runs in a fresh spawned process so that its max RSS is its own
(ru_maxrss only ever grows within a process) and no compilation cache is shared between cases.

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
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

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
    }


# ----------------------------------------------------------------------------- one case

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


def bench_case(variant: str, *, scan: bool, image_size: int = 224, batch_size: int = 8, steps: int = 3,
               peak_flops: float, num_classes: int = 1000, seed: int = 0) -> dict:
    """Builds and times one ViT train step in fp32; returns its figures (see the module docstring)."""
    import flax.linen as nn

    from mmjax import sharding as shd
    from mmjax.experiment import ExperimentConfig, TrainConfig, validate
    from mmjax.models.vit import vit_config, vit_forward_flops
    from mmjax.tasks import ClassificationTask
    from mmjax.train.loop import create_sharded_state
    from mmjax.train.metrics import mfu
    from mmjax.train.optim import OptimConfig, make_optimizer
    from mmjax.train.step import jit_train_step, make_train_step

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    rss_start = _current_rss_bytes()
    model = vit_config(variant, image_size=image_size, channels=3, num_classes=num_classes,
                       encoder={"scan_layers": scan, "dtype": "float32", "param_dtype": "float32"})
    cfg = validate(ExperimentConfig(
        name=f"bench_vit_{variant}", task="classification", model=model,
        # A constant lr keeps every timed step a full-size update (a cosine would decay to 0).
        optim=OptimConfig(name="adamw", peak_lr=1e-3, schedule="constant", weight_decay=1e-4),
        train=TrainConfig(steps=steps + 1, batch_size=batch_size, seed=seed, progress=False)))
    task = ClassificationTask(cfg)
    mesh = shd.make_mesh(dataclasses.replace(cfg.mesh, shape=(1, 1, 1)), jax.devices()[:1])

    rng = np.random.default_rng(seed)
    local = {"image": rng.standard_normal((batch_size, image_size, image_size, 3), np.float32),
             "label": rng.integers(0, num_classes, (batch_size,), dtype=np.int32)}
    task.check_batch(local, 0)

    with jax.set_mesh(mesh), shd.logical_rules(cfg.mesh.rules):
        boxed = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
        tx, schedule = make_optimizer(cfg.optim, cfg.train.steps, nn.meta.unbox(boxed))
        init_fn, _, state_sh, _ = create_sharded_state(task, cfg, mesh, tx)
        t = time.perf_counter()
        state = jax.block_until_ready(init_fn(jax.random.PRNGKey(seed)))
        init_s = time.perf_counter() - t
        n_params = int(sum(x.size for x in jax.tree.leaves(state.params)))

        example = task.example_batch(batch_size)
        batch_sh = {k: shd.batch_sharding(mesh, len(v.shape)) for k, v in example.items()}
        batch = shd.make_global_batch(local, mesh)
        step_fn = jit_train_step(make_train_step(task.loss_fn, tx, schedule), state_sh, batch_sh)

        t0 = time.perf_counter()
        lowered = step_fn.lower(state, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()

    # Warm-up step (first-run allocations, thread-pool start), then the timed steps.
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    first_loss = float(metrics["loss"])
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    last_loss = float(metrics["loss"])
    step_s = statistics.median(times)

    flops_per_example = task.train_flops_per_example()  # 3 × vit_forward_flops(cfg.model)
    assert flops_per_example == 3.0 * vit_forward_flops(cfg.model)
    flops_formula = flops_per_example * batch_size
    images_per_s = batch_size / step_s
    cost = _cost_figures(compiled)
    result = {
        "variant": variant,
        "scan_layers": scan,
        "image_size": image_size,
        "batch_size": batch_size,
        "num_classes": num_classes,
        "dtype": cfg.model.encoder.dtype,
        "param_dtype": cfg.model.encoder.param_dtype,
        "optimizer": "adamw",
        "num_params": n_params,
        "tokens_per_image": (image_size // model.patch_size) ** 2 + (1 if model.pool == "cls" else 0),
        "init_s": init_s,
        "lower_s": t1 - t0,
        "compile_only_s": t2 - t1,
        "compile_s": t2 - t0,  # lower + compile
        "warmup_loss": first_loss,
        "last_loss": last_loss,
        "step_times_s": times,
        "step_s": step_s,
        "images_per_s": images_per_s,
        "flops_formula": flops_formula,
        **cost,
        "xla_over_formula": cost["flops_xla"] / flops_formula,
        "achieved_flops_per_s": flops_formula / step_s,
        "peak_flops_per_s": peak_flops,
        # CPU: the measured peak is per host (simulated devices share its cores), as the loop does.
        "mfu": mfu(flops_per_example, images_per_s, peak_flops, 1),
        **_memory_figures(compiled),
        "rss_at_start_bytes": rss_start,
        "max_rss_bytes": _max_rss_bytes(),
    }
    if scan:
        result["note"] = ("scan_layers: XLA's cost analysis counts the scanned blocks' while-loop body "
                          "once, so flops_xla covers about one of the encoder blocks")
    return result


def _bench_case_isolated(kwargs: dict) -> dict:
    """Runs `bench_case` in a fresh spawned process (its own ru_maxrss and compilation)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(bench_case, **kwargs).result()


# ----------------------------------------------------------------------------- the run

def format_table(results: dict) -> str:
    """A fixed-width table of the cases plus the peak line."""
    cols = [("variant", "{}"), ("scan", "{}"), ("params M", "{:.3g}"), ("compile s", "{:.1f}"),
            ("step ms", "{:.1f}"), ("img/s", "{:.2f}"), ("GFLOP formula", "{:.4g}"),
            ("GFLOP XLA", "{:.4g}"), ("XLA/form", "{:.2f}"), ("GFLOP/s", "{:.1f}"), ("MFU %", "{:.1f}"),
            ("MFU best %", "{:.1f}"),
            ("XLA MiB t+a+o", "{:.0f}"), ("-alias", "{:.0f}"), ("RSS0 MiB", "{:.0f}"),
            ("maxRSS MiB", "{:.0f}")]
    rows = []
    for r in results["cases"]:
        rows.append([r["variant"], "on" if r["scan_layers"] else "off", r["num_params"] / 1e6, r["compile_s"],
                     r["step_s"] * 1e3, r["images_per_s"], r["flops_formula"] / 1e9, r["flops_xla"] / 1e9,
                     r["xla_over_formula"], r["achieved_flops_per_s"] / 1e9, 100 * r["mfu"],
                     100 * r.get("mfu_best_peak", float("nan")),
                     r.get("xla_bytes", float("nan")) / MIB, r.get("xla_bytes_no_alias", float("nan")) / MIB,
                     (r["rss_at_start_bytes"] or float("nan")) / MIB, r["max_rss_bytes"] / MIB])
    cells = [[f.format(v) for (_, f), v in zip(cols, row)] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (h, _) in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    m = results["machine"]
    st, pk = results["settings"], results["peak"]
    title = (f"ViT train step, fp32, AdamW, batch {st['batch_size']}, {st['image_size']}px, median of "
             f"{st['steps']} steps after 1 warm-up — {m['backend']} ({m['device_kind']}, {m['cpu_count']} CPUs), "
             f"jax {m['jax_version']}")
    peak_line = (f"fp32 matmul peak ({pk['matmul_n']}³): {pk['flops_per_s'] / 1e9:.1f} GFLOP/s at start "
                 f"(used for MFU), {pk['flops_per_s_end'] / 1e9:.1f} GFLOP/s at end")
    if pk.get("unstable"):
        peak_line += ("  ** the two peaks differ by more than "
                      f"{int(100 * PEAK_DRIFT_WARN)}%: the machine was busy; MFU is unreliable **")
    out = [title, peak_line, line([h for h, _ in cols]), line(["-" * w for w in widths])]
    out += [line(c) for c in cells]
    out += [("GFLOP: per train step. formula = 3 × vit_forward_flops × batch (matmuls only); "
             "XLA = cost_analysis of the compiled step (with scan on, the loop body is counted once)."),
            ("XLA MiB t+a+o: temp + argument + output of the compiled step; -alias: the same minus the "
             "donated state's aliased bytes."),
            ("RSS0: the case's process resident memory before building the model; maxRSS: that process's "
             "high-water mark (getrusage ru_maxrss).")]
    return "\n".join(out)


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
    from mmjax.train.metrics import measure_matmul_peak

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_start = os.getloadavg()
    peak = measure_matmul_peak(n=peak_matmul_n, repeats=peak_repeats)
    if verbose:
        print(f"fp32 matmul peak ({peak_matmul_n}³): {peak / 1e9:.1f} GFLOP/s", flush=True)
    cases = []
    for variant in variants:
        for scan in scan_modes:
            kwargs = {"variant": variant, "scan": bool(scan), "image_size": image_size,
                      "batch_size": batch_size, "steps": steps, "peak_flops": peak}
            r = _bench_case_isolated(kwargs) if isolate else bench_case(**kwargs)
            r["isolated_process"] = isolate
            cases.append(r)
            if verbose:
                print(f"  {variant} scan={'on' if scan else 'off'}: compile {r['compile_s']:.1f} s, "
                      f"step {r['step_s'] * 1e3:.0f} ms, {r['images_per_s']:.2f} img/s, "
                      f"MFU {100 * r['mfu']:.1f}%", flush=True)
    peak_end = measure_matmul_peak(n=peak_matmul_n, repeats=peak_repeats)
    best_peak = max(peak, peak_end)
    unstable = abs(peak - peak_end) > PEAK_DRIFT_WARN * best_peak
    for r in cases:
        r["mfu_best_peak"] = r["achieved_flops_per_s"] / best_peak
    results = {
        "benchmark": "vit_train_step",
        "started": started,
        "settings": {"variants": list(variants), "image_size": image_size, "batch_size": batch_size,
                     "steps": steps, "scan_modes": [bool(s) for s in scan_modes], "isolate": isolate,
                     "dtype": "float32"},
        "machine": {**machine_info(), "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg())},
        "peak": {"what": f"best of {peak_repeats} fp32 n×n×n matmuls (2n³ FLOPs) via measure_matmul_peak",
                 "matmul_n": peak_matmul_n, "flops_per_s": peak, "flops_per_s_end": peak_end,
                 "flops_per_s_best": best_peak, "unstable": bool(unstable)},
        "units": {"*_s": "seconds", "*_bytes": "bytes", "flops_*": "FLOPs per train step",
                  "mfu": "achieved formula FLOP/s as a fraction of the peak measured at the start",
                  "mfu_best_peak": "the same against the larger of the start and end peaks (a peak "
                                   "measured while other processes use the cores reads low)",
                  "xla_bytes": "memory_analysis temp + argument + output of the compiled train step",
                  "xla_bytes_no_alias": "xla_bytes minus the donated (aliased) state's bytes",
                  "xla_peak_memory_bytes": "memory_analysis().peak_memory_in_bytes as XLA reports it; on "
                                           "the CPU backend it has equalled argument bytes, i.e. it is "
                                           "not a live-buffer peak there",
                  "max_rss_bytes": "getrusage ru_maxrss of the process that ran the case "
                                   "(a fresh process per case when isolate is true)"},
        "cases": cases,
    }
    bad = [(c["variant"], c["scan_layers"], k) for c in cases for k, v in c.items()
           if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        results["non_finite"] = [list(b) for b in bad]
    if verbose:
        print(format_table(results), flush=True)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
        if verbose:
            print(f"wrote {out}", flush=True)
    return results


def _parse_bool_modes(text: str) -> tuple[bool, ...]:
    table = {"off": False, "false": False, "0": False, "on": True, "true": True, "1": True}
    try:
        return tuple(table[s.strip().lower()] for s in text.split(",") if s.strip())
    except KeyError as e:
        raise argparse.ArgumentTypeError(f"scan modes are on/off, got {e.args[0]!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmjax.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_vit.json")
    p.add_argument("--variants", default="S/16,B/16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--scan-modes", type=_parse_bool_modes, default=(False, True),
                   help="comma-separated on/off (default: off,on)")
    p.add_argument("--peak-matmul-n", type=int, default=2048, help="matmul size for the fp32 peak")
    p.add_argument("--no-isolate", action="store_true",
                   help="run all cases in this process (max RSS then accumulates across cases)")
    args = p.parse_args(argv)
    run_vit_bench(variants=[v.strip() for v in args.variants.split(",") if v.strip()],
                  image_size=args.image_size, batch_size=args.batch_size, steps=args.steps, out=args.out,
                  scan_modes=args.scan_modes, isolate=not args.no_isolate,
                  peak_matmul_n=args.peak_matmul_n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
