"""Test set-up: 8 simulated CPU devices for the sharding tests (must be set before jax loads)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """A TFDS data dir with the built-in digits prepared once per test session (worker)."""
    from mmjax.data.registry import ensure_prepared
    return ensure_prepared("digits", str(tmp_path_factory.mktemp("tfds")))


def restore_params(workdir, step):
    """The params saved at `step` in a run's workdir, as numpy leaves (whatever mesh saved them)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    path = workdir / "checkpoints" / str(step) / "state"
    ckptr = ocp.StandardCheckpointer()
    tree = dict(ckptr.metadata(path).item_metadata)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), tree)
    return [np.asarray(x) for x in jax.tree.leaves(ckptr.restore(path, target)["params"])]


@pytest.fixture
def read_params():
    return restore_params
