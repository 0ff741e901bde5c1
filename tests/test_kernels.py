"""The native CPU decode kernel (mmjax/kernels): its products against float64 numpy over shapes that
reach every code path (row groups of 1–4, weight-row tiles and their remainder, inputs not a multiple
of 8, several chunks on two threads), its use by weight_major_dot, and its build errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import kernels
from mmjax.layers.linear import weight_major_dot

# Skipped only for a limit of the machine (no compiler, not x86-64 with AVX2/FMA); a kernel that fails
# to build or load on a capable machine fails test_the_kernel_builds_where_the_machine_allows_it.
LIMIT = kernels.machine_limit()
needs_kernel = pytest.mark.skipif(LIMIT is not None, reason=f"the kernel cannot be built on this machine: {LIMIT}")


@needs_kernel
def test_the_kernel_builds_where_the_machine_allows_it():
    assert kernels.rowdot_unavailable_reason() is None


def _case(m, n, k, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, k), np.float32), rng.standard_normal((m, k), np.float32)


def _check(y, w_t, x):
    ref = x.astype(np.float64) @ w_t.astype(np.float64).T
    # fp32 sums of k products: rounding grows like sqrt(k) times the typical product size.
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=2e-6 * np.sqrt(w_t.shape[1]) * 4)


@needs_kernel
@pytest.mark.parametrize("m,n,k", [
    (1, 1, 1), (1, 7, 8), (2, 3, 13), (3, 10, 16), (4, 5, 31), (5, 4, 9), (7, 11, 24), (8, 512, 512),
    (9, 100, 70), (13, 301, 129), (64, 37, 40),
])
def test_rowdot_matches_float64_numpy(m, n, k):
    w_t, x = _case(m, n, k)
    _check(jax.jit(kernels.rowdot)(w_t, x), w_t, x)


@needs_kernel
def test_rowdot_splits_many_weight_rows_into_chunks_across_threads():
    # K = 64: 192 weight rows per chunk, so 5000 rows make 27 chunks claimed by both pool threads.
    w_t, x = _case(8, 5000, 64, seed=1)
    _check(jax.jit(kernels.rowdot)(w_t, x), w_t, x)


@needs_kernel
def test_rowdot_under_vmap_and_in_a_loop():
    w_t, x = _case(6, 40, 20, seed=2)
    xs = np.stack([x, 2 * x, -x])
    ys = jax.jit(jax.vmap(kernels.rowdot, in_axes=(None, 0)))(w_t, xs)
    for y, xi in zip(ys, xs):
        _check(y, w_t, xi)
    # Inside a scan, as in the decode loop: y feeds the next step's rows.
    sq, _ = _case(6, 20, 20, seed=3)
    sq = (sq / np.sqrt(20)).astype(np.float32)

    def body(h, _):
        h = kernels.rowdot(sq, h)
        return h, None

    out, _ = jax.jit(lambda h: jax.lax.scan(body, h, None, length=5))(x)
    ref = x.astype(np.float64)
    for _ in range(5):
        ref = ref @ sq.astype(np.float64).T
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_weight_major_dot_uses_the_kernel_for_fp32_rows_and_xla_otherwise(monkeypatch):
    rng = np.random.default_rng(4)
    w_t = rng.standard_normal((4, 6, 32), np.float32)  # [heads, head_dim, in]: two output axes
    x = rng.standard_normal((2, 3, 32), np.float32)     # [B, T, in]: six rows
    ref = np.einsum("hdk,btk->bthd", w_t.astype(np.float64), x.astype(np.float64))

    def hlo():
        return jax.jit(lambda w, a: weight_major_dot(w, a, 2)).lower(w_t, x).compile().as_text()

    assert kernels.TARGET in hlo()
    np.testing.assert_allclose(np.asarray(jax.jit(lambda w, a: weight_major_dot(w, a, 2))(w_t, x)), ref,
                               rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(kernels, "ROWDOT", False)
    assert kernels.TARGET not in hlo()
    monkeypatch.setattr(kernels, "ROWDOT", None)
    with kernels.cpu_kernels_disabled():
        assert kernels.TARGET not in hlo()
    assert kernels.TARGET in hlo()
    many = rng.standard_normal((kernels.ROWDOT_MAX_ROWS + 1, 32), np.float32)  # a prefill's rows: XLA's dot
    assert kernels.TARGET not in jax.jit(lambda w, a: weight_major_dot(w, a, 2)).lower(w_t, many).as_text()
    bf16 = jnp.asarray(w_t, jnp.bfloat16)
    assert kernels.TARGET not in jax.jit(lambda w, a: weight_major_dot(w, a, 2)).lower(bf16, x).as_text()


@needs_kernel
def test_rowdot_names_bad_operands():
    w_t, x = _case(2, 3, 8)
    with pytest.raises(ValueError, match=r"w_t \[N, K\] and x \[M, K\].*\(3, 8\) and \(2, 7\)"):
        kernels.rowdot(w_t, x[:, :7])
    with pytest.raises(TypeError, match="fp32 only"):
        kernels.rowdot(w_t.astype(np.float16), x)


def test_build_names_a_missing_compiler(tmp_path):
    with pytest.raises(kernels.KernelUnavailable, match="no C.. compiler 'no-such-compiler-mmjax'"):
        kernels.build(tmp_path, cxx="no-such-compiler-mmjax")
    assert not list(tmp_path.iterdir())


def test_build_names_a_failed_compile_and_leaves_no_partial_library(tmp_path):
    with pytest.raises(kernels.KernelUnavailable, match=r"compiling rowdot.cc failed"):
        kernels.build(tmp_path, cxx="false")  # runs, prints nothing, exits 1
    assert not list(tmp_path.iterdir())


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx fma avx2 bmi2\n")
    assert kernels.cpu_has_avx2_fma(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx\n")
    assert not kernels.cpu_has_avx2_fma(str(info))
    assert not kernels.cpu_has_avx2_fma(str(tmp_path / "missing"))


_FALLBACK = """
import json, sys, warnings
import numpy as np, jax
from mmjax.layers.linear import weight_major_dot
rng = np.random.default_rng(0)
w, x = rng.standard_normal((5, 8), np.float32), rng.standard_normal((3, 8), np.float32)
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    f = jax.jit(lambda w, x: weight_major_dot(w, x, 1))
    y = np.asarray(f(w, x))
    hlo = f.lower(w, x).compile().as_text()
    jax.jit(lambda w, x: 2 * weight_major_dot(w, x, 1))(w, x)  # a second trace: no second warning
err = float(np.abs(y - x.astype(np.float64) @ w.astype(np.float64).T).max())
print(json.dumps({"warnings": [str(r.message) for r in rec], "custom_call": "mmjax_rowdot" in hlo, "err": err}))
"""


@pytest.mark.parametrize("env,warns", [({"CXX": "no-such-compiler-mmjax"}, True), ({"MMJAX_CPU_KERNELS": "0"}, False)])
def test_without_the_kernel_decoding_uses_xla_and_says_why_once(tmp_path, env, warns):
    """A fresh process whose kernel cannot be built (no compiler) warns once, naming the reason, and
    multiplies with XLA's dot; switched off by the user, it does the same without a warning."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "MMJAX_CACHE_DIR": str(tmp_path / "cache"), **env}
    out = subprocess.run([sys.executable, "-c", _FALLBACK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert not res["custom_call"] and res["err"] < 1e-5
    if warns:
        (msg,) = res["warnings"]
        assert "CPU decode kernel is unavailable (no C++ compiler 'no-such-compiler-mmjax'" in msg
        assert "uses XLA's dot" in msg
    else:
        assert res["warnings"] == []
