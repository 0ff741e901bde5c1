"""Meshes, logical axis rules and sharding helpers.

Params and key activations carry logical axis names; one rules table maps each name to mesh axes.

    mesh axes   data  – pure data parallelism (params replicated)
                fsdp  – data parallelism with params/optimizer state sharded (ZeRO-3)
                tensor – model parallelism over heads / mlp / vocab

A rule maps a logical name to a mesh axis, a tuple of mesh axes, or None (replicated). A name's
rule is dropped for one array (it stays replicated on that dimension) when the dimension is not
divisible by the mesh axes' size, or when those mesh axes were already used by an earlier
dimension: the fallback MaxText calls "unsharded if it doesn't fit".
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax.config import config

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name → mesh axes. Param names first, then activation names ("act_*").
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("classes", None),
    ("layers", None),
    ("norm", None),
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
)


@config
class MeshConfig:
    """Mesh shape over (data, fsdp, tensor); one entry may be -1 to take the remaining devices."""

    shape: tuple[int, int, int] = (-1, 1, 1)
    rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES
    # Multi-process start: None → only when the environment says so (JAX_COORDINATOR_ADDRESS or a
    # cluster JAX auto-detects); otherwise "host:port" with num_processes / process_id.
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries for {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: entries must be positive or -1")
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh shape {shape} cannot fill {num_devices} devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if int(np.prod(shape)) != num_devices:
        raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices, "
                         f"but {num_devices} are available")
    return shape


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (GSPMD propagates the shardings we state)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(cfg.shape, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def maybe_initialize_distributed(cfg: MeshConfig) -> None:
    """Starts multi-process JAX when the config names a coordinator or the environment asks.

    Call before anything touches a device. On CPU the cross-process collectives go through gloo.
    """
    if jax.distributed.is_initialized():
        return
    addr = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if addr is None:
        return
    # CPU collectives across processes go through gloo. Set unconditionally: asking for the backend
    # here would initialise it before jax.distributed, and the flag is ignored on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    num = cfg.num_processes if cfg.num_processes is not None else int(os.environ["JAX_NUM_PROCESSES"])
    pid = cfg.process_id if cfg.process_id is not None else int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(addr, num_processes=num, process_id=pid)


# ----------------------------------------------------------------------------- logical → mesh

_state = threading.local()


@contextlib.contextmanager
def logical_rules(rules: Sequence[tuple[str, Any]]):
    """Makes `rules` the table that `constrain` uses while tracing inside this block."""
    prev = getattr(_state, "rules", None)
    _state.rules = tuple(rules)
    try:
        yield
    finally:
        _state.rules = prev


def current_rules() -> tuple[tuple[str, Any], ...]:
    return getattr(_state, "rules", None) or DEFAULT_RULES


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int],
                    mesh_shape: dict[str, int], rules: Sequence[tuple[str, Any]] | None = None) -> P:
    """Maps logical names for each dim of an array of `shape` to a mesh PartitionSpec."""
    if names is None:
        return P()
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(f"logical names {names} do not match an array of rank {len(shape)}")
    table = dict(rules if rules is not None else current_rules())
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to mesh.rules")
        axes = table[name]
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        axes = tuple(a for a in axes if mesh_shape.get(a, 1) > 1 and a not in used)
        size = int(np.prod([mesh_shape[a] for a in axes])) if axes else 1
        if not axes or dim % size:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def tree_shardings(abstract_boxed_tree, mesh: Mesh, rules=None):
    """NamedShardings for every leaf of a tree whose params are `nn.LogicallyPartitioned` boxes.

    Leaves without logical names (step counters, rngs, ...) are replicated.
    """
    logical = nn.get_partition_spec(abstract_boxed_tree)
    shapes = nn.meta.unbox(abstract_boxed_tree)
    mesh_shape = dict(mesh.shape)

    def one(spec, leaf):
        names = tuple(spec) if isinstance(spec, P) else None
        return NamedSharding(mesh, logical_to_spec(names, leaf.shape, mesh_shape, rules))

    return jax.tree.map(one, logical, shapes, is_leaf=lambda x: isinstance(x, P))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context (`jax.set_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    spec = logical_to_spec(names, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dim over data × fsdp, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process numpy batch → global jax.Arrays sharded over (data, fsdp) on the batch dim.

    Each process passes only the examples it read; the global batch is their concatenation in
    process order.
    """
    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
    return jax.tree.map(one, local_batch)
