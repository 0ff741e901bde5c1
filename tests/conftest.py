"""Test set-up: 8 simulated CPU devices for the sharding tests (must be set before jax loads), XLA's
backend at -O0, one persistent compilation cache per test run, and huge-page malloc for the workers."""

import os
import shutil
import tempfile

# The suite compiles far more than it runs (tiny models, a few steps each): XLA:CPU's LLVM backend
# at -O0 compiles them much faster (the sharded tokenizer-step test: 55 s → 33 s) and the few long
# runs lose less than that. The experiments and benchmarks run at XLA's default level.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Many tests compile the same programs (the same tiny train step in several training-loop tests, in
# both xdist workers and in the CLI runs they start): a compilation cache made by the controlling
# process, inherited by the workers and their subprocesses through the environment, compiles each
# once (tests/test_train.py + test_contrastive_task.py with -n 2: 248 s → 209 s). It is removed at
# the end; a cache dir set from outside is used as it is.
_OWN_CACHE = None
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="mmjax-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

# xdist workers and CLI subprocesses run under the huge-page malloc that MMJAX_HUGEPAGE_MALLOC=1
# gives the `mmjax` command (mmjax/runtime.py, docs/cpu.md: XLA:CPU's per-execution temp block
# otherwise faults in again on every call).
if "PYTEST_XDIST_WORKER" not in os.environ:
    from mmjax.runtime import hugepage_malloc_env_here

    _env = hugepage_malloc_env_here()
    if _env is not None:
        os.environ["GLIBC_TUNABLES"] = _env["GLIBC_TUNABLES"]

import pytest  # noqa: E402  (after the environment above)

# The modules that take longest (summed test times of full runs, 2026-12-07: the notebooks 330 s,
# vq_ar 175-215 s, the next four 70-137 s; docs/testing.md), longest first. One xdist worker runs
# a module whole (--dist loadscope) and, with --no-loadscope-reorder, in this order: the long units
# start first and the two workers finish together, instead of one running the notebooks alone at
# the end (xdist's own order is by test count, which put the 10 notebook tests last). Unlisted
# modules follow in collection order.
SLOWEST_MODULES = ("test_colabs.py", "test_vq_ar.py", "test_vlm_task.py", "test_tokenizer_task.py",
                   "test_train.py", "test_contrastive_task.py", "test_ops_cpu.py", "test_ops.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a module kept


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """A TFDS data dir with the built-in digits prepared once per test session (worker)."""
    from mmjax.data.registry import ensure_prepared
    return ensure_prepared("digits", str(tmp_path_factory.mktemp("tfds")))


def prepare_small_shapes(data_dir, split_sizes: dict[str, int]) -> str:
    """The real `shapes` builder (same name, version and examples) with test-sized splits,
    prepared in `data_dir` at 32 px; returns data_dir."""
    from mmjax.data import shapes as S

    class _SmallShapes(S.ShapesBuilder, skip_registration=True):
        name = "shapes"

    _SmallShapes.split_sizes = dict(split_sizes)
    _SmallShapes(data_dir=str(data_dir), config="32").download_and_prepare(file_format="array_record")
    return str(data_dir)


@pytest.fixture(scope="session")
def small_shapes():
    """`prepare_small_shapes`, for module fixtures that build their own test-sized shapes."""
    return prepare_small_shapes


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

