"""`only_on(platform, fn, *args)`: fn(*args), lowered for one platform only.

A program lowered for several platforms at once (`jax.export(..., platforms=("cuda", "tpu"))`) lowers
every branch of `lax.platform_dependent` for all of them, so a branch holding a TPU-only kernel
(Pallas/Mosaic) or a CUDA-only one (cuDNN) fails to lower for the other platform, although it would
never run there. `only_on` stages fn as one primitive whose lowering is fn's for `platform` and
zeros of fn's output shapes for every other platform (never executed: the branch's platform index
routes around it). `only_on_vjp` does the same for a differentiable fn, forward and backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive, jaxpr_as_fun
from jax.interpreters import mlir

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")

only_on_p = Primitive("mmjax_only_on")
only_on_p.multiple_results = True
only_on_p.def_abstract_eval(lambda *avals, platform, jaxpr: list(jaxpr.out_avals))
only_on_p.def_impl(lambda *args, **params: jax.jit(functools.partial(only_on_p.bind, **params))(*args))


def _lower(ctx, *args, here: str, platform: str, jaxpr):
    if here == platform:
        fn = jaxpr_as_fun(jaxpr)
    else:
        def fn(*_):
            return [jnp.zeros(a.shape, a.dtype) for a in jaxpr.out_avals]
    return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)


for _p in PLATFORMS:
    mlir.register_lowering(only_on_p, functools.partial(_lower, here=_p), platform=_p)


def only_on(platform: str, fn, *args):
    """fn(*args) (any pytrees in and out), lowered for `platform` only (module docstring)."""
    if platform not in PLATFORMS:
        raise ValueError(f"only_on: platform must be one of {PLATFORMS}, got {platform!r}")
    flat, in_tree = jax.tree.flatten(args)
    out_tree = []

    def flat_fn(*leaves):
        out = fn(*jax.tree.unflatten(in_tree, leaves))
        leaves_out, tree = jax.tree.flatten(out)
        out_tree.append(tree)
        return leaves_out

    jaxpr = jax.make_jaxpr(flat_fn)(*flat)
    out = only_on_p.bind(*flat, platform=platform, jaxpr=jaxpr)
    return jax.tree.unflatten(out_tree[0], out)


def only_on_vjp(platform: str, fn, n_diff: int):
    """fn(*args) lowered for `platform` only, differentiable in its first n_diff args (the rest are
    integer side inputs, e.g. segment ids: they get no gradient)."""
    @jax.custom_vjp
    def call(*args):
        return only_on(platform, fn, *args)

    def fwd(*args):
        def forward(*args):
            out, vjp = jax.vjp(lambda *d: fn(*d, *args[n_diff:]), *args[:n_diff])
            return out, vjp
        out, vjp = only_on(platform, forward, *args)
        return out, (vjp, tuple(np.zeros(np.shape(a), jax.dtypes.float0) for a in args[n_diff:]))

    def bwd(res, ct):
        vjp, zeros = res
        return tuple(only_on(platform, lambda v, c: v(c), vjp, ct)) + zeros

    call.defvjp(fwd, bwd)
    return call
