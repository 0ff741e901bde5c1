"""Run logging (metrics.jsonl + TensorBoard events) and model-FLOPs utilisation.

MFU = (training FLOPs per example × examples/s) / (peak FLOP/s per device × devices), with the
task's stated FLOPs formula (3 × forward matmul FLOPs) and a peak that is either given or measured
here as the best of a few large fp32 matmuls on this machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


class MetricWriter:
    """Appends one JSON object per line to workdir/metrics.jsonl and mirrors scalars to TensorBoard.

    Only process 0 writes. Safe to reopen after a restart (append mode).
    """

    def __init__(self, workdir: str | Path, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
            self._file = open(self.path, "a")

    def write(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        clean = {prefix + k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist())
                 for k, v in metrics.items()}
        self._file.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._file.flush()
        for k, v in clean.items():
            if isinstance(v, float):
                self._tb.add_scalar(k, v, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 5,
                        device: jax.Device | None = None) -> float:
    """Best observed FLOP/s of an n×n×n matmul on one device (2n³ FLOPs each)."""
    device = device or jax.local_devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def mfu(train_flops_per_example: float, examples_per_sec: float, peak_flops_per_device: float,
        num_devices: int) -> float:
    return train_flops_per_example * examples_per_sec / (peak_flops_per_device * num_devices)
