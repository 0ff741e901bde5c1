"""OpsPolicy: which implementation each backend-aware op uses, and the per-platform choice.

A policy is a frozen config field (TransformerConfig.ops), so it is part of a model's config and of
every function traced from it: nothing else decides which kernel runs. With "auto", an op stages out
one branch per platform with `jax.lax.platform_dependent`, and the branch of the platform the
program is lowered for is the one compiled: the devices a function is compiled for decide, not
`jax.default_backend()`. So a program exported from a CPU host for GPU or TPU holds no CPU kernel.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Literal

import jax

from mmjax.config import config

log = logging.getLogger("mmjax.ops")

AttentionImpl = Literal["auto", "xla", "cudnn", "splash", "native"]
NormImpl = Literal["auto", "xla", "native"]


@config
class OpsPolicy:
    """Implementations of mmjax.ops' attention, cached attention, norm and dense.

    attention: "auto" picks per platform where the program is compiled: CPU mmjax's native kernel
      (with cpu_kernels), GPU cuDNN flash attention where its constraints hold (bf16/fp16, head dim
      ≤ 128 and a multiple of 8, no mask or a causal one; sequence lengths padded to a multiple of 64),
      TPU Pallas splash attention (no mask, causal, padding as segment ids), XLA otherwise. "xla",
      "cudnn", "splash", "native" force one (an error where it cannot run). Attention with dropout is
      always XLA's. Over a KV cache: "auto"/"native" → the native cache kernel on the CPU, else XLA.
    norm: "auto" → the native kernel on the CPU (with cpu_kernels, from 64 rows), XLA elsewhere.
    cpu_kernels: whether "auto" may use mmjax's native CPU kernels and XLA:CPU layouts (dense layers
      as 2-D products; output-major weights when decoding). The library is built on the first
      lowering for the CPU that uses it, or by `python -m mmjax.ops.cpu`; never while tracing.
    """

    attention: AttentionImpl = "auto"
    norm: NormImpl = "auto"
    cpu_kernels: bool = True


XLA_ONLY = OpsPolicy(attention="xla", norm="xla", cpu_kernels=False)


def on_platforms(*args, default: Callable, cpu: Callable | None = None, cuda: Callable | None = None,
                 tpu: Callable | None = None):
    """`default(*args)`, or the branch given for the platform the program is lowered for
    (`jax.lax.platform_dependent`); with no branch given, no conditional at all."""
    per = {name: fn for name, fn in (("cpu", cpu), ("cuda", cuda), ("tpu", tpu)) if fn is not None}
    if not per:
        return default(*args)
    return jax.lax.platform_dependent(*args, default=default, **per)


@functools.cache
def note(message: str) -> None:
    """Logs an implementation choice once per process (logger "mmjax.ops", level INFO)."""
    log.info(message)
