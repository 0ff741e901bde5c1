"""Input-pipeline throughput: examples/s of `train_iterator` for a DataConfig on this machine.

    mmjax bench-data                      # shapes 32×32, captions tokenised, batch 256
    mmjax bench-data --name digits --no-text

Prints the figures and writes JSON. A benchmark, not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from mmjax.data.config import DataConfig


def run_data_bench(cfg: DataConfig, *, batch_size: int = 256, batches: int = 40, warmup: int = 3,
                   out: str | None = None) -> dict:
    from mmjax.data import pipeline, registry
    t0 = time.perf_counter()
    registry.ensure_prepared(cfg.name, cfg.data_dir)
    prepare_s = time.perf_counter() - t0
    it = pipeline.train_iterator(cfg, global_batch_size=batch_size, seed=0, process_index=0, process_count=1)
    for _ in range(warmup):
        batch = next(it)
    times = []
    for _ in range(batches):
        t = time.perf_counter()
        batch = next(it)
        times.append(time.perf_counter() - t)
    total = float(np.sum(times))
    result = {
        "benchmark": "data_pipeline", "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "batch_size": batch_size, "batches": batches, "prepare_s": prepare_s,
        "examples_per_s": batch_size * batches / total, "batch_ms_median": 1e3 * float(np.median(times)),
        "batch_ms_p90": 1e3 * float(np.percentile(times, 90)),
        "shapes": {k: list(np.shape(v)) for k, v in batch.items()},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "loadavg": list(os.getloadavg())},
    }
    print(f"{cfg.name}: {result['examples_per_s']:.0f} examples/s at batch {batch_size} "
          f"(median {result['batch_ms_median']:.1f} ms/batch, p90 {result['batch_ms_p90']:.1f} ms); "
          f"batch: {result['shapes']}")
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"wrote {out}")
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="mmjax bench-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="shapes")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--read-threads", type=int, default=1)
    p.add_argument("--tokenizer", default="bytes")
    p.add_argument("--max-text-len", type=int, default=64)
    p.add_argument("--no-text", action="store_true")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="bench_data.json")
    a = p.parse_args(argv)
    cfg = DataConfig(name=a.name, image_size=a.image_size, data_dir=a.data_dir, worker_count=a.workers,
                     read_threads=a.read_threads, text_field=None if a.no_text else "caption",
                     tokenizer=a.tokenizer, max_text_len=a.max_text_len, random_shift=0)
    run_data_bench(cfg, batch_size=a.batch_size, batches=a.batches, out=a.out)


if __name__ == "__main__":
    main()
