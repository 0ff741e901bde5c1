"""One JAX primitive for every native CPU kernel, whose CPU lowering builds and loads the library.

`call(target, results, *operands, **attrs)` stages out an XLA FFI custom call to `target` (one of
`library.TARGETS`) like `jax.ffi.ffi_call` does, with one difference: the primitive's lowering rule
(registered for the CPU only) runs `library.load()` first. So the library is compiled when a program
that calls a kernel is first lowered for the CPU, never while tracing, and a program lowered for
GPU or TPU (the CPU branch of `lax.platform_dependent` dropped) never touches the compiler.
Under `jax.vmap` the kernel runs once per batch element (`lax.map`), as `vmap_method="sequential"`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from mmjax.ops.cpu import library

kernel_p = Primitive("mmjax_cpu_kernel")
kernel_p.multiple_results = True


def _abstract_eval(*avals, target, results, attrs):
    del avals, target, attrs
    return [jax.core.ShapedArray(shape, dtype) for shape, dtype in results]


def _impl(*args, **params):
    return jax.jit(functools.partial(kernel_p.bind, **params))(*args)


def _lower(ctx, *args, target, results, attrs):
    del results
    library.load()  # KernelUnavailable names the reason
    return jax.ffi.ffi_lowering(target)(ctx, *args, **dict(attrs))


def _batch(args, dims, **params):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    moved = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    batched = [d is not None for d in dims]

    def one(xs):
        it = iter(xs)
        return kernel_p.bind(*[next(it) if b else a for a, b in zip(moved, batched)], **params)

    outs = jax.lax.map(one, [a for a, b in zip(moved, batched) if b])
    assert all(o.shape[0] == size for o in outs)
    return outs, [0] * len(outs)


kernel_p.def_abstract_eval(_abstract_eval)
kernel_p.def_impl(_impl)
mlir.register_lowering(kernel_p, _lower, platform="cpu")


def _never_run(ctx, *args, target, results, attrs):
    # Other platforms: only reached in a multi-platform lowering of a CPU-only branch, never executed.
    del target, attrs
    return mlir.lower_fun(lambda *_: [jnp.zeros(s, d) for s, d in results], multiple_results=True)(ctx, *args)


for _platform in ("cuda", "rocm", "tpu"):
    mlir.register_lowering(kernel_p, _never_run, platform=_platform)
batching.primitive_batchers[kernel_p] = _batch


def call(target: str, results: Sequence[jax.ShapeDtypeStruct], *operands: jax.Array, **attrs) -> list[jax.Array]:
    """The FFI handler `target` on `operands` with attributes `attrs` (Python bools, np.float32 ...) →
    one array per entry of `results`."""
    if target not in library.TARGETS:
        raise ValueError(f"unknown mmjax CPU kernel {target!r}; known: {sorted(library.TARGETS)}")
    spec = tuple((tuple(r.shape), np.dtype(r.dtype)) for r in results)
    return kernel_p.bind(*operands, target=target, results=spec, attrs=tuple(sorted(attrs.items())))


def usable(*arrays: jax.Array, what: str) -> bool:
    """Whether a kernel may take these operands in the program being traced for the CPU: fp32 operands,
    at most one device in the mesh being traced for (a custom call cannot be partitioned: XLA would
    gather its operands onto every device), and a machine that can build the kernels (else one
    warning naming the reason, and XLA's ops)."""
    if any(jnp.dtype(a.dtype) != jnp.float32 for a in arrays):
        return False
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty and mesh.size > 1:
        return False
    reason = library.unavailable_reason()
    if reason is not None:
        _warn_once(what, reason)
        return False
    return True


@functools.cache
def _warn_once(what: str, reason: str) -> None:
    warnings.warn(f"mmjax: the native CPU {what} kernel is unavailable ({reason}); {what} uses XLA's ops "
                  "(OpsPolicy(cpu_kernels=False) silences this)", stacklevel=5)
