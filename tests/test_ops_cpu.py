"""The native CPU kernels (mmjax/ops/cpu). The decode kernel: its products against float64 numpy over
shapes that reach every code path (row groups of 1–4, weight-row tiles and their remainder, inputs not
a multiple of 8, several chunks on two threads), its use by ops.dense_output_major, and its build errors.
The attention kernel: values and gradients against jax.nn.dot_product_attention and the forward against
float64 numpy, over masks (causal, padding with empty rows, per head), GQA/MQA and sizes off every
block boundary; its use by the Attention layer. Which implementation runs is the layer's OpsPolicy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import ops
from mmjax.ops import OpsPolicy
from mmjax.ops import cpu as kernels
from mmjax.ops.cpu import library

# Skipped only for a limit of the machine (no compiler, not x86-64 with AVX2/FMA); a kernel that fails
# to build or load on a capable machine fails test_the_kernel_builds_where_the_machine_allows_it.
LIMIT = library.machine_limit()
needs_kernel = pytest.mark.skipif(LIMIT is not None, reason=f"the kernel cannot be built on this machine: {LIMIT}")


@needs_kernel
def test_the_kernel_builds_where_the_machine_allows_it():
    library.load()
    assert library.unavailable_reason() is None


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
def test_dense_output_major_uses_the_kernel_for_a_few_fp32_rows_and_xla_otherwise():
    rng = np.random.default_rng(4)
    w_t = rng.standard_normal((24, 32), np.float32)     # [N, K]
    x = rng.standard_normal((2, 3, 32), np.float32)     # [B, T, K]: six rows
    ref = np.einsum("nk,btk->btn", w_t.astype(np.float64), x.astype(np.float64))

    def hlo(w, a, policy=ops.DEFAULT):
        return jax.jit(lambda w, a: ops.dense_output_major(a, w, policy=policy)).lower(w, a).compile().as_text()

    assert "mmjax_rowdot" in hlo(w_t, x)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda w, a: ops.dense_output_major(a, w))(w_t, x)), ref,
                               rtol=1e-5, atol=1e-5)
    assert "mmjax_rowdot" not in hlo(w_t, x, OpsPolicy(cpu_kernels=False))
    many = rng.standard_normal((kernels.matmul.ROWDOT_MAX_ROWS + 1, 32), np.float32)  # a prefill's rows: XLA's dot
    assert "mmjax_rowdot" not in hlo(w_t, many)
    assert "mmjax_rowdot" not in hlo(jnp.asarray(w_t, jnp.bfloat16), jnp.asarray(x, jnp.bfloat16))
    if len(jax.devices()) >= 2:  # a custom call on a mesh would gather its operands onto every device
        mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
        with jax.set_mesh(mesh):
            assert "mmjax_rowdot" not in hlo(w_t, x)


@needs_kernel
def test_rowdot_names_bad_operands():
    w_t, x = _case(2, 3, 8)
    with pytest.raises(ValueError, match=r"w_t \[N, K\] and x \[M, K\].*\(3, 8\) and \(2, 7\)"):
        kernels.rowdot(w_t, x[:, :7])
    with pytest.raises(TypeError, match="fp32 only"):
        kernels.rowdot(w_t.astype(np.float16), x)


def test_build_names_a_missing_compiler(tmp_path):
    with pytest.raises(library.KernelUnavailable, match="no C.. compiler 'no-such-compiler-mmjax'"):
        library.build(tmp_path, cxx="no-such-compiler-mmjax")
    assert not list(tmp_path.iterdir())


def test_build_names_a_failed_compile_and_leaves_no_partial_library(tmp_path):
    with pytest.raises(library.KernelUnavailable, match=r"compiling rowdot.cc, attention.cc, norm.cc failed"):
        library.build(tmp_path, cxx="false")  # runs, prints nothing, exits 1
    assert not list(tmp_path.iterdir())


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx fma avx2 bmi2\n")
    assert library.cpu_has_avx2_fma(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx\n")
    assert not library.cpu_has_avx2_fma(str(info))
    assert not library.cpu_has_avx2_fma(str(tmp_path / "missing"))


_FALLBACK = """
import json, sys, warnings
import numpy as np, jax
from mmjax import ops
policy = ops.OpsPolicy(cpu_kernels={cpu_kernels})
rng = np.random.default_rng(0)
w, x = rng.standard_normal((5, 8), np.float32), rng.standard_normal((3, 8), np.float32)
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    f = jax.jit(lambda w, x: ops.dense_output_major(x, w, policy=policy))
    y = np.asarray(f(w, x))
    hlo = f.lower(w, x).compile().as_text()
    jax.jit(lambda w, x: 2 * ops.dense_output_major(x, w, policy=policy))(w, x)  # a second trace: no second warning
err = float(np.abs(y - x.astype(np.float64) @ w.astype(np.float64).T).max())
print(json.dumps({{"warnings": [str(r.message) for r in rec], "custom_call": "mmjax_rowdot" in hlo, "err": err}}))
"""


@pytest.mark.parametrize("env,cpu_kernels,warns", [({"CXX": "no-such-compiler-mmjax"}, True, True), ({}, False, False)])
def test_without_the_kernel_decoding_uses_xla_and_says_why_once(tmp_path, env, cpu_kernels, warns):
    """A fresh process whose kernel cannot be built (no compiler) warns once, naming the reason, and
    multiplies with XLA's dot; with OpsPolicy(cpu_kernels=False) it does the same without a warning."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "MMJAX_CACHE_DIR": str(tmp_path / "cache"), **env}
    code = _FALLBACK.format(cpu_kernels=cpu_kernels)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert not res["custom_call"] and res["err"] < 1e-5
    if warns:
        (msg,) = res["warnings"]
        assert "native CPU decode matmul kernel is unavailable (no C++ compiler 'no-such-compiler-mmjax'" in msg
        assert "uses XLA's ops" in msg
    else:
        assert res["warnings"] == []
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


# --- softmax attention (attention.cc, mmjax.ops.cpu.attention) ---------------------------------------

def _attention_case(b, t, s, h, hkv, dh, mask_kind, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, dh), np.float32)
    k = rng.standard_normal((b, s, hkv, dh), np.float32)
    v = rng.standard_normal((b, s, hkv, dh), np.float32)
    mask = None
    if mask_kind == "causal":
        mask = np.tril(np.ones((t, s), bool))[None, None]
    elif mask_kind == "padding":  # key lengths 0..s: a length of 0 masks whole rows
        lengths = np.array([0, s, *rng.integers(1, s + 1, b - 2)])[:b]
        mask = (np.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
    elif mask_kind == "causal+padding":
        lengths = rng.integers(1, s + 1, b)
        mask = np.tril(np.ones((t, s), bool))[None, None] & (np.arange(s) < lengths[:, None])[:, None, None, :]
    elif mask_kind == "per_head":
        mask = rng.random((b, h, t, s)) < 0.6
    return q, k, v, mask


@needs_kernel
@pytest.mark.parametrize("b,t,s,h,hkv,dh,mask_kind", [
    (2, 5, 7, 2, 2, 8, None),                   # tiles smaller than one register block
    (2, 65, 65, 4, 4, 32, None),                # the tiny CLIP's vision tower
    (3, 48, 48, 4, 4, 32, "causal+padding"),    # its text tower
    (4, 13, 29, 4, 4, 20, "padding"),           # cross-attention T ≠ S, Dh not a multiple of 8, empty rows
    (2, 17, 33, 6, 2, 24, "causal"),            # GQA: 3 query heads per kv head
    (2, 11, 19, 4, 1, 16, "per_head"),          # MQA with a per-head mask
    (1, 1, 1, 1, 1, 1, None),
])
def test_cpu_attention_matches_jax_values_and_gradients(b, t, s, h, hkv, dh, mask_kind):
    """Against jax.nn.dot_product_attention (XLA, fp32, the same scale and masking, K/V repeated over the
    groups), forward and all three gradients."""
    from mmjax.ops.cpu import attention as cpu_attention
    q, k, v, mask = _attention_case(b, t, s, h, hkv, dh, mask_kind)
    g = h // hkv

    def ref(q, k, v):
        return jax.nn.dot_product_attention(q, jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2),
                                            mask=mask, implementation="xla")

    ours = lambda q, k, v: cpu_attention(q, k, v, mask)
    w = np.random.default_rng(1).standard_normal((b, t, h, dh), np.float32)
    for f in (ours, ref):
        assert jax.jit(f)(q, k, v).shape == (b, t, h, dh)
    np.testing.assert_allclose(jax.jit(ours)(q, k, v), jax.jit(ref)(q, k, v), rtol=1e-5, atol=2e-6)
    loss = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2)))
    for got, want, name in zip(loss(ours)(q, k, v), loss(ref)(q, k, v), "qkv"):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


@needs_kernel
def test_cpu_attention_against_float64_softmax():
    """The forward against float64 numpy from the equation, not only against XLA's fp32."""
    from mmjax.ops.cpu import attention as cpu_attention
    q, k, v, mask = _attention_case(3, 40, 37, 2, 2, 16, "padding", seed=3)
    logits = np.einsum("bthd,bshd->bhts", q.astype(np.float64), k.astype(np.float64)) / 4.0
    logits = np.where(mask, logits, -0.7 * np.finfo(np.float32).max)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bhts,bshd->bthd", p, v.astype(np.float64))
    np.testing.assert_allclose(jax.jit(cpu_attention)(q, k, v, mask), want, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_cpu_attention_under_vmap_and_with_bad_operands():
    from mmjax.ops.cpu import attention as cpu_attention
    q, k, v, _ = _attention_case(2, 9, 9, 2, 2, 8, None)
    stacked = jax.vmap(cpu_attention)(np.stack([q, 2 * q]), np.stack([k, k]), np.stack([v, -v]))
    np.testing.assert_allclose(stacked[1], -cpu_attention(2 * q, k, v), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"does not broadcast to \[B, H, T, S\]"):
        cpu_attention(q, k, v, np.ones((2, 1, 9, 8), bool))
    with pytest.raises(TypeError, match="must be boolean"):
        cpu_attention(q, k, v, np.ones((9, 9), np.float32))
    with pytest.raises(ValueError, match="cannot be grouped"):
        cpu_attention(np.concatenate([q, q[:, :, :1]], axis=2), k, v)
    with pytest.raises(TypeError, match="fp32 only"):
        cpu_attention(q.astype(jnp.bfloat16), k, v)


@needs_kernel
def test_attention_layer_uses_the_kernel_on_one_cpu_device_only():
    """Attention mixes with the kernel on one CPU device in fp32 (same values as XLA's path); with
    OpsPolicy(attention="xla") or cpu_kernels=False, in bf16, with dropout, and under a mesh of several
    devices it does not."""
    from mmjax.layers.attention import Attention
    from mmjax.layers.masks import make_attention_mask

    x = jax.random.normal(jax.random.key(0), (2, 12, 32))
    mask = make_attention_mask(12, 12, causal=True)

    def compiled(layer, dtype=jnp.float32, rngs=None, deterministic=True):
        params = layer.init(jax.random.key(1), x)
        f = jax.jit(lambda p, x: layer.apply(p, x.astype(dtype), mask=mask, deterministic=deterministic,
                                             rngs=rngs))
        return f(params, x), f.lower(params, x).as_text()

    out, text = compiled(Attention(num_heads=4))
    assert "mmjax_attention_fwd" in text
    ref, ref_text = compiled(Attention(num_heads=4, ops=OpsPolicy(attention="xla")))
    assert "mmjax_attention" not in ref_text
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert "mmjax_attention" not in compiled(Attention(num_heads=4, dtype=jnp.bfloat16), jnp.bfloat16)[1]
    assert "mmjax_attention" not in compiled(Attention(num_heads=4, dropout=0.1), rngs={"dropout": jax.random.key(2)},
                                             deterministic=False)[1]
    assert "mmjax_attention" not in compiled(Attention(num_heads=4, ops=OpsPolicy(cpu_kernels=False)))[1]
    if len(jax.devices()) >= 2:
        mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
        with jax.set_mesh(mesh):
            assert "mmjax_attention" not in compiled(Attention(num_heads=4))[1]


# --- attention over a head-major KV cache (attention.cc: mmjax_cache_attention) ----------------------

def _cache_case(b, t, h, hkv, s, dh, mask_kind, seed=0):
    """q [B, T, H, Dh], a head-major cache k, v [B, Hkv, S, Dh] and a mask [B, 1 or H, T, S]."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, dh), np.float32)
    k = rng.standard_normal((b, hkv, s, dh), np.float32)
    v = rng.standard_normal((b, hkv, s, dh), np.float32)
    mask = None
    if mask_kind == "decode":  # left-padded prompts, the cache filled up to the chunk's last token
        pad = rng.integers(0, 4, b)
        pos = s - 5 - t + np.arange(t)  # the last 5 slots are not written yet
        slots = np.arange(s)
        mask = ((slots[None, None] <= pos[None, :, None]) & (slots[None, None] >= pad[:, None, None]))[:, None]
    elif mask_kind == "empty_rows":  # some rows see no slot at all
        mask = rng.random((b, 1, t, s)) < 0.3
        mask[0, 0, 0] = False
    elif mask_kind == "per_head":
        mask = rng.random((b, h, t, s)) < 0.5
    return q, k, v, mask


def _cache_reference(q, k, v, mask):
    """The softmax over all S slots in float64, from the equation; a row that sees no slot gets uniform
    weights (jax.nn.dot_product_attention's finite masking)."""
    b, t, h, dh = q.shape
    g = h // k.shape[1]
    k64, v64 = np.repeat(k, g, axis=1).astype(np.float64), np.repeat(v, g, axis=1).astype(np.float64)
    logits = np.einsum("bthd,bhsd->bhts", q.astype(np.float64), k64) / np.sqrt(dh)
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
        logits = np.where(mask.any(-1, keepdims=True), logits, 0.0)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bhsd->bthd", p, v64)


@needs_kernel
@pytest.mark.parametrize("b,t,h,hkv,s,dh,mask_kind", [
    (8, 1, 8, 8, 144, 64, "decode"),     # a batch-8 decoding step of the bench's model
    (2, 16, 8, 2, 40, 64, "decode"),     # a GQA prefill chunk (T·G = 64 rows per task)
    (3, 1, 4, 1, 13, 12, None),          # MQA, no mask, S and Dh off the 8-slot / 8-lane grid
    (2, 3, 6, 3, 21, 20, "empty_rows"),  # rows that see nothing: the mean of V
    (2, 2, 4, 2, 19, 16, "per_head"),
    (1, 1, 1, 1, 1, 1, None),
])
def test_cache_attention_matches_float64_and_grouped_attention(b, t, h, hkv, s, dh, mask_kind):
    from mmjax.ops.cpu import cache_attention
    from mmjax.ops.xla import grouped_attention
    q, k, v, mask = _cache_case(b, t, h, hkv, s, dh, mask_kind)
    out = jax.jit(cache_attention)(q, k, v, mask)
    np.testing.assert_allclose(out, _cache_reference(q, k, v, mask), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(out, jax.jit(grouped_attention)(q, k, v, mask), rtol=1e-5, atol=2e-6)
    # Gradients, should anything differentiate through it, are those of grouped_attention.
    w = np.random.default_rng(1).standard_normal(q.shape, np.float32)
    grads = [jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v, mask) * w), argnums=(0, 1, 2)))(q, k, v)
             for f in (cache_attention, grouped_attention)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_cache_attention_reads_only_the_slots_its_queries_may_see():
    """Slots outside [first, last] visible slot are never read: NaN there (a cache not written yet)
    leaves the output finite and equal to the attention over the visible slots alone, where a
    product with zero weights (XLA's path) would give NaN."""
    from mmjax.ops.cpu import cache_attention
    q, k, v, _ = _cache_case(4, 1, 4, 2, 32, 16, None, seed=5)
    lo, hi = np.array([0, 3, 5, 1]), np.array([20, 12, 6, 32])
    slots = np.arange(32)
    mask = ((slots >= lo[:, None]) & (slots < hi[:, None]))[:, None, None, :]
    kn, vn = k.copy(), v.copy()
    for i in range(4):
        kn[i, :, hi[i]:], vn[i, :, hi[i]:] = np.nan, np.nan
        kn[i, :, :lo[i]], vn[i, :, :lo[i]] = np.nan, np.nan
    out = np.asarray(jax.jit(cache_attention)(q, kn, vn, mask))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, _cache_reference(q, k, v, mask), rtol=1e-5, atol=2e-6)


@needs_kernel
def test_cache_attention_names_bad_operands():
    from mmjax.ops.cpu import cache_attention
    q, k, v, mask = _cache_case(2, 1, 4, 2, 9, 8, "decode")
    with pytest.raises(ValueError, match=r"k, v \[B, Hkv, S, Dh\]"):
        cache_attention(q, k[:, :, :, :4], v, mask)
    with pytest.raises(ValueError, match="cannot be grouped"):
        cache_attention(q[:, :, :3], k, v, mask)
    with pytest.raises(ValueError, match="does not broadcast"):
        cache_attention(q, k, v, np.ones((2, 1, 1, 8), bool))
    with pytest.raises(TypeError, match="fp32 only"):
        cache_attention(q, k.astype(jnp.bfloat16), v, mask)


@needs_kernel
def test_attention_layer_uses_the_cache_kernel_when_decoding():
    """With a KV cache, Attention mixes with the cache kernel on one CPU device in fp32, with the values
    of OpsPolicy(attention="xla") (grouped_attention), at prefill and at a decoding step."""
    from mmjax.layers.attention import Attention
    from mmjax.layers.masks import make_attention_mask

    x = jax.random.normal(jax.random.key(0), (2, 6, 32))
    cache = {"k": jnp.zeros((2, 2, 8, 8)), "v": jnp.zeros((2, 2, 8, 8))}

    def steps(layer):
        params = layer.init(jax.random.key(1), x)

        @jax.jit
        def run(params, x, cache):
            out1, cache = layer.apply(params, x[:, :5], cache=cache, cache_index=0)
            mask = make_attention_mask(1, 8, causal=True, q_offset=5)
            out2, cache = layer.apply(params, x[:, 5:], cache=cache, cache_index=5, mask=mask)
            return out1, out2
        return run(params, x, cache), run.lower(params, x, cache).as_text()

    (a1, a2), text = steps(Attention(num_heads=4, num_kv_heads=2, rope_base=10_000.0))
    assert text.count(library.CACHE_ATTENTION) == 2
    (b1, b2), ref_text = steps(Attention(num_heads=4, num_kv_heads=2, rope_base=10_000.0,
                                         ops=OpsPolicy(attention="xla")))
    assert library.CACHE_ATTENTION not in ref_text
    np.testing.assert_allclose(a1, b1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a2, b2, rtol=1e-5, atol=1e-6)
    assert library.CACHE_ATTENTION not in steps(Attention(num_heads=4, num_kv_heads=2,
                                                          ops=OpsPolicy(cpu_kernels=False)))[1]


# --- transposes for the decode path's output-major kernels (rowdot.cc: mmjax_transpose) -------------

@needs_kernel
@pytest.mark.parametrize("k,n", [(1, 1), (3, 5), (8, 8), (9, 17), (33, 40), (64, 8), (100, 7), (512, 1376)])
def test_transpose_matches_numpy(k, n):
    x = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(kernels.transpose)(x)), x.T)


@needs_kernel
def test_transpose_names_bad_operands():
    with pytest.raises(ValueError, match=r"a matrix \[K, N\], got shape \(2, 3, 4\)"):
        kernels.transpose(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(TypeError, match="fp32 only, got float16"):
        kernels.transpose(np.zeros((2, 3), np.float16))


@needs_kernel
def test_output_major_uses_the_transpose_kernel_for_fp32_on_the_cpu():
    w = np.random.default_rng(1).standard_normal((6, 4, 5)).astype(np.float32)  # [in..., out...]
    for in_rank in (1, 2):
        want = w.reshape(int(np.prod(w.shape[:in_rank])), -1).T
        np.testing.assert_array_equal(np.asarray(jax.jit(lambda w, r=in_rank: ops.output_major(w, r))(w)), want)
    hlo = lambda w, policy=ops.DEFAULT: jax.jit(lambda w: ops.output_major(w, 1, policy=policy)).lower(w).as_text()
    assert library.TRANSPOSE in hlo(w)
    assert library.TRANSPOSE not in hlo(jnp.asarray(w, jnp.bfloat16))
    assert library.TRANSPOSE not in hlo(w, OpsPolicy(cpu_kernels=False))


# --- LayerNorm / RMSNorm (norm.cc, mmjax.ops.cpu.norm) ---------------------------------------------

@needs_kernel
@pytest.mark.parametrize("shape,rms,bias", [
    ((4, 7, 128), False, True), ((33, 13), False, False), ((200, 384), True, False), ((3, 1), False, True),
    ((130, 24), True, False), ((2, 65, 40), False, True),  # rows over several chunks, D off the 8-lane grid
])
def test_cpu_norm_matches_the_equation_values_and_gradients(shape, rms, bias):
    """Against the float64 equation (forward) and jax.grad of the same equation in fp32 (backward)."""
    from mmjax.ops.cpu import norm as cpu_norm
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, np.float32) * 3 + 1
    d = shape[-1]
    g = rng.standard_normal(d, np.float32)
    b = rng.standard_normal(d, np.float32) if bias else None

    def ref(x, g, b, xp=jnp):
        if rms:
            y = x / xp.sqrt(xp.mean(x * x, -1, keepdims=True) + 1e-5)
        else:
            m = x.mean(-1, keepdims=True)
            y = (x - m) / xp.sqrt(xp.mean((x - m) ** 2, -1, keepdims=True) + 1e-5)
        return y * g + (0 if b is None else b)

    ours = lambda x, g, b: cpu_norm(x, g, b, eps=1e-5, rms=rms)
    want = ref(x.astype(np.float64), g.astype(np.float64), None if b is None else b.astype(np.float64), xp=np)
    np.testing.assert_allclose(jax.jit(ours)(x, g, b), want, rtol=1e-5, atol=1e-5)
    w = rng.standard_normal(shape, np.float32)
    args = (0, 1, 2) if bias else (0, 1)
    grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=args))(x, g, b)
    for got, want, name in zip(grads(ours), grads(ref), ("x", "scale", "bias")):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5 * np.sqrt(x.size / d), err_msg=f"d{name}")


@needs_kernel
def test_norm_layer_uses_the_kernel_for_many_rows_and_names_bad_operands():
    from mmjax.layers.norms import Norm
    x = jax.random.normal(jax.random.key(0), (4, 20, 16))

    def run(layer, dtype=jnp.float32, x=x):
        p = layer.init(jax.random.key(1), x.astype(dtype))
        f = jax.jit(lambda p, x: layer.apply(p, x))
        return f(p, x.astype(dtype)), f.lower(p, x.astype(dtype)).as_text()

    for kind in ("layernorm", "rmsnorm"):
        out, text = run(Norm(kind))
        assert library.NORM_FWD in text
        ref, ref_text = run(Norm(kind, ops=OpsPolicy(norm="xla")))
        assert library.NORM_FWD not in ref_text
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # bf16 activations: Norm takes its statistics in fp32 anyway, so the kernel serves them too.
    out16, text16 = run(Norm("layernorm", dtype=jnp.bfloat16), jnp.bfloat16)
    assert library.NORM_FWD in text16 and out16.dtype == jnp.bfloat16
    # A decode step's few rows stay with XLA (MIN_ROWS).
    assert library.NORM_FWD not in run(Norm("rmsnorm"), x=x[:, :1])[1]
    with pytest.raises(ValueError, match="RMSNorm has no bias"):
        kernels.norm(x, jnp.ones(16), jnp.zeros(16), eps=1e-6, rms=True)
    with pytest.raises(ValueError, match=r"scale and bias \[D\]"):
        kernels.norm(x, jnp.ones(15), None, eps=1e-6)


_AVX2_ATTENTION = """
import json, sys
import numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, {tests!r})
from test_ops_cpu import _attention_case
from mmjax.ops.cpu import library
from mmjax.ops.cpu import attention as cpu_attention
errs = []
for case in [(2, 65, 65, 4, 4, 32, None), (3, 19, 29, 4, 2, 20, "causal+padding")]:
    q, k, v, mask = _attention_case(*case)
    g = case[3] // case[4]
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, jnp.repeat(k, g, 2), jnp.repeat(v, g, 2), mask=mask)
    ours = lambda q, k, v: cpu_attention(q, k, v, mask)
    w = np.ones((case[0], case[1], case[3], case[5]), np.float32)
    grad = lambda f: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)
    errs.append(float(jnp.abs(ours(q, k, v) - ref(q, k, v)).max()))
    errs += [float(jnp.abs(a - b).max()) for a, b in zip(grad(ours), grad(ref))]
print(json.dumps({{"flags": library.build_flags(), "errs": errs}}))
"""


@needs_kernel
@pytest.mark.skipif("avx512f" not in library.cpu_flags(), reason="this CPU has no AVX-512: the suite tests the AVX2 "
                    "blocks already")
def test_cpu_attention_avx2_blocks_on_an_avx512_machine(tmp_path):
    """On a CPU with AVX-512 the suite runs the zmm register blocks; MMJAX_CPU_AVX512=0 builds the ymm
    ones (what an AVX2-only CPU runs), checked here in a fresh process against XLA's attention."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "MMJAX_CACHE_DIR": str(tmp_path / "cache"), library.AVX512_SWITCH: "0"}
    code = _AVX2_ATTENTION.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert "-mavx512f" not in res["flags"] and max(res["errs"]) < 1e-4, res
