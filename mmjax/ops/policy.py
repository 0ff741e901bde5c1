"""OpsPolicy: which implementation each backend-aware op uses, and the per-platform choice.

A policy is a frozen config field (TransformerConfig.ops), so it is part of a model's config and of
every function traced from it: nothing else decides which kernel runs. With "auto", the platform
is that of the devices the program is compiled for, never `jax.default_backend()`:

- traced under a mesh (`jax.set_mesh`, as the training loop, the benchmarks and a sharded
  `generate` do), the mesh's devices name it, and the op calls that platform's implementation;
- traced without one, the op stages one branch per platform with `jax.lax.platform_dependent`, and
  the branch of the platform the program is lowered for is the one compiled. So a program exported
  from a CPU host for GPU or TPU holds no CPU kernel.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

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


def mesh_platform() -> str | None:
    """The platform of the mesh being traced for ("cpu", "cuda", "rocm", "tpu"), or None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
    if device is None:
        return None
    if device.platform == "gpu":  # jax's device platform; lax.platform_dependent says cuda or rocm
        from mmjax.ops.gpu import cuda_backend
        return "cuda" if cuda_backend() else "rocm"
    return device.platform


def on_platforms(*args, default: Callable, cpu: Callable | None = None, cuda: Callable | None = None,
                 tpu: Callable | None = None):
    """The branch given for the platform the program is compiled for, else `default`, on `args`: the
    mesh's platform under a mesh, else chosen at lowering (`jax.lax.platform_dependent`)."""
    per = {name: fn for name, fn in (("cpu", cpu), ("cuda", cuda), ("tpu", tpu)) if fn is not None}
    platform = mesh_platform()
    if platform is not None:
        return per.get(platform, default)(*args)
    if not per:
        return default(*args)
    return _switch(default, tuple(per.items()), *args)


def _switch(default: Callable, per: tuple, *args):
    """`lax.platform_dependent` under a `jax.custom_vjp` whose backward is another platform choice over
    each branch's VJP (recomputing the branch's forward, which XLA merges with the primal one where
    it can). Differentiating a conditional itself makes JAX linearise, partially evaluate and
    transpose every branch and join their residuals: several times the trace time of this."""
    flat, tree = jax.tree.flatten(args)
    diff = tuple(jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in flat)
    fns = (default,) + tuple(fn for _, fn in per)

    def choose(make, *operands):
        return jax.lax.platform_dependent(*operands, default=make(0),
                                          **{name: make(i + 1) for i, (name, _) in enumerate(per)})

    def primal(i):
        return lambda *leaves: fns[i](*jax.tree.unflatten(tree, leaves))

    @jax.custom_vjp
    def switched(*leaves):
        return choose(primal, *leaves)

    def fwd(*leaves):
        return choose(primal, *leaves), leaves

    def bwd(leaves, ct):
        def backward(i):
            def run(leaves, ct):
                def f(*d):
                    it = iter(d)
                    return primal(i)(*[next(it) if is_diff else x for x, is_diff in zip(leaves, diff)])
                _, vjp = jax.vjp(f, *[x for x, is_diff in zip(leaves, diff) if is_diff])
                return vjp(ct)
            return run
        cts = iter(choose(backward, leaves, ct))
        return tuple(next(cts) if is_diff else np.zeros(np.shape(x), jax.dtypes.float0)
                     for x, is_diff in zip(leaves, diff))

    switched.defvjp(fwd, bwd)
    return switched(*flat)


@functools.cache
def note(message: str) -> None:
    """Logs an implementation choice once per process (logger "mmjax.ops", level INFO)."""
    log.info(message)
