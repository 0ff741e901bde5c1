"""Layers against equations and hand computations (numpy references, not our own outputs)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from mmjax.layers import (
    Attention,
    ConvStem,
    DenseGeneral,
    Mlp,
    Norm,
    Transformer,
    TransformerConfig,
    apply_rope,
    make_attention_mask,
    patchify,
    resize_posemb,
    sincos_2d,
)


def _np_attention(q, k, v, mask):
    """Plain softmax attention in numpy. q [B,Q,H,D], k/v [B,K,Hkv,D], mask [B,1,Q,K]."""
    h, hkv = q.shape[2], k.shape[2]
    k, v = np.repeat(k, h // hkv, axis=2), np.repeat(v, h // hkv, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -1e30)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


@pytest.mark.parametrize("in_rank,features", [(1, 6), (1, (4, 3)), (2, 5)])
def test_dense_and_its_output_major_form_match_numpy(in_rank, features):
    """DenseGeneral against x · W + b in numpy, and the decode path's form of the same product: the kernel
    as an output-major matrix (`ops.output_major`: output axes first, flattened) through
    `ops.dense_output_major`, in XLA's and in the native CPU implementation."""
    from mmjax import ops
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 2) if in_rank == 2 else (2, 3, 8)).astype(np.float32)
    layer = DenseGeneral(features, ("a",) * (in_rank + len(np.atleast_1d(features))), in_rank=in_rank)
    params = nn.meta.unbox(layer.init(jax.random.key(1), x)["params"])
    params["bias"] = np.random.default_rng(2).normal(size=params["bias"].shape).astype(np.float32)
    w, b = np.asarray(params["kernel"]), params["bias"]
    in_axes = "ij"[:in_rank]
    want = np.einsum(f"bt{in_axes},{in_axes}...->bt...", x, w) + b
    np.testing.assert_allclose(layer.apply({"params": params}, x), want, rtol=1e-5, atol=1e-5)

    n_in = int(np.prod(w.shape[:in_rank]))
    for policy in (ops.OpsPolicy(), ops.XLA_ONLY):
        w_t = jax.jit(lambda k, policy=policy: ops.output_major(k, in_rank, policy=policy))(w)
        np.testing.assert_array_equal(w_t, w.reshape(n_in, -1).T)
        y = jax.jit(lambda a, k, policy=policy: ops.dense_output_major(a, k, policy=policy))(
            x.reshape(2, 3, n_in), w_t)
        np.testing.assert_allclose(np.asarray(y).reshape(want.shape) + b, want, rtol=1e-5, atol=1e-5)


def test_mask_helper_cases():
    full = make_attention_mask(3)
    assert full.shape == (1, 1, 3, 3) and full.all()
    causal = make_attention_mask(3, causal=True)[0, 0]
    np.testing.assert_array_equal(causal, np.tril(np.ones((3, 3), bool)))
    prefix = make_attention_mask(4, causal=True, prefix_len=jnp.array([2, 0]))
    np.testing.assert_array_equal(prefix[0, 0], [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(prefix[1, 0], np.tril(np.ones((4, 4), bool)))
    pad = make_attention_mask(3, causal=True, kv_valid=jnp.array([[True, True, False]]))[0, 0]
    np.testing.assert_array_equal(pad, [[1, 0, 0], [1, 1, 0], [1, 1, 0]])
    step = make_attention_mask(1, 5, causal=True, q_offset=jnp.array([2, 4]))  # a KV-cache step
    np.testing.assert_array_equal(step[:, 0, 0], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="prefix_len"):
        make_attention_mask(3, prefix_len=1)
    # Segments with a shared prefix: tokens 0-1 are segment 0, 2-3 segment 1, 4 segment 2 (causal).
    seg = make_attention_mask(5, causal=True, segment_ids=jnp.array([[0, 0, 1, 1, 2]]))[0, 0]
    np.testing.assert_array_equal(seg, [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                                        [1, 1, 0, 0, 1]])
    with pytest.raises(ValueError, match="segment_ids must be"):
        make_attention_mask(1, 5, causal=True, segment_ids=jnp.zeros((1, 1), jnp.int32))


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_attention_matches_numpy(heads, kv_heads):
    b, n, d = 2, 5, 32
    x = jax.random.normal(jax.random.PRNGKey(0), (b, n, d))
    mask = make_attention_mask(n, causal=True, kv_valid=jnp.array([[1, 1, 1, 1, 0], [1] * 5], bool))
    attn = Attention(num_heads=heads, num_kv_heads=kv_heads)
    params = nn.meta.unbox(attn.init(jax.random.PRNGKey(1), x, mask=mask))["params"]
    out = attn.apply({"params": params}, x, mask=mask)
    p = jax.tree.map(np.asarray, params)
    xn = np.asarray(x)
    q = np.einsum("bnd,dhk->bnhk", xn, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("bnd,dhk->bnhk", xn, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("bnd,dhk->bnhk", xn, p["value"]["kernel"]) + p["value"]["bias"]
    ref = np.einsum("bnhk,hkd->bnd", _np_attention(q, k, v, np.asarray(mask)), p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert p["key"]["kernel"].shape == (d, kv_heads, d // heads)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_grouped_attention_on_head_major_keys_matches_numpy(heads, kv_heads):
    """The KV-cache path: keys/values stored [B, Hkv, K, Dh]; per-batch and per-head masks, and a
    fully masked query row (uniform weights, the mean of v, as the numpy reference gives)."""
    from mmjax.layers.attention import grouped_attention
    b, nq, nk, dh = 2, 3, 6, 8
    rq, rk, rv, rm = jax.random.split(jax.random.key(3), 4)
    q = np.asarray(jax.random.normal(rq, (b, nq, heads, dh)))
    k = np.asarray(jax.random.normal(rk, (b, nk, kv_heads, dh)))
    v = np.asarray(jax.random.normal(rv, (b, nk, kv_heads, dh)))
    hm = lambda a: jnp.asarray(a.transpose(0, 2, 1, 3))  # [B, K, Hkv, Dh] → head-major [B, Hkv, K, Dh]
    mask = np.asarray(make_attention_mask(nq, nk, causal=True, q_offset=2,
                                          kv_valid=jnp.array([[0, 0, 0, 1, 1, 1], [1] * 6], bool)))
    assert not mask[0, 0, 0].any()  # row 0's first query sees only padding: fully masked
    got = grouped_attention(jnp.asarray(q), hm(k), hm(v), jnp.asarray(mask))
    np.testing.assert_allclose(got, _np_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[0, 0], np.repeat(v[0].mean(0), heads // kv_heads, axis=0), atol=1e-5)
    per_head = np.asarray(jax.random.bernoulli(rm, 0.6, (b, heads, nq, nk)))
    got = grouped_attention(jnp.asarray(q), hm(k), hm(v), jnp.asarray(per_head))
    np.testing.assert_allclose(got, _np_attention(q, k, v, per_head), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="head axis"):
        grouped_attention(jnp.asarray(q), hm(k), hm(v), jnp.ones((b, 3, nq, nk), bool))


def test_norms_match_equations():
    x = np.random.RandomState(0).randn(3, 7).astype(np.float32) * 3 + 1
    ln = Norm("layernorm", eps=1e-5)
    v = ln.init(jax.random.PRNGKey(0), x)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(ln.apply(v, x), ref, atol=1e-5)
    rms = Norm("rmsnorm", eps=1e-6)
    v = rms.init(jax.random.PRNGKey(0), x)
    np.testing.assert_allclose(rms.apply(v, x), x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6), atol=1e-5)
    assert "bias" not in nn.meta.unbox(v)["params"]


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "quick_gelu", "swiglu"])
def test_mlp_activations(act):
    x = np.random.RandomState(1).randn(2, 3, 8).astype(np.float32)
    mlp = Mlp(16, act)
    p = jax.tree.map(np.asarray, nn.meta.unbox(mlp.init(jax.random.PRNGKey(0), x))["params"])
    h = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    f = {"gelu": lambda z: 0.5 * z * (1 + erf(z / np.sqrt(2))),
         "gelu_tanh": lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3))),
         "quick_gelu": lambda z: z / (1 + np.exp(-1.702 * z))}
    if act == "swiglu":
        g = x @ p["gate"]["kernel"] + p["gate"]["bias"]
        h = g / (1 + np.exp(-g)) * h
    else:
        h = f[act](h)
    ref = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    np.testing.assert_allclose(mlp.apply({"params": p}, x), ref, atol=1e-5)
    with pytest.raises(ValueError, match="unknown activation 'gelu2'"):
        Mlp(16, "gelu2").init(jax.random.PRNGKey(0), x)


def test_patchify_counts_and_order():
    img = np.arange(2 * 8 * 12 * 3, dtype=np.float32).reshape(2, 8, 12, 3)
    p = patchify(img, 4)
    assert p.shape == (2, 8 * 12 // 16, 4, 4, 3)  # N = HW / P²
    np.testing.assert_array_equal(p[1, 4], img[1, 4:8, 4:8])  # row 1, column 1 of a 2×3 grid
    with pytest.raises(ValueError, match="not divisible by the patch size 5"):
        patchify(img, 5)


def test_conv_stem_matches_torch():
    """ConvStem against torch: Conv2d (no bias) → LayerNorm over channels → exact GELU per layer.
    XLA's "SAME" padding for a 3×3 stride-2 conv on an even size pads (0, 1), torch's padding=1
    pads (1, 1): the reference pads explicitly."""
    import torch
    import torch.nn.functional as F

    layers = ((6, 1), (8, 2), (12, 2))
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    stem = ConvStem(layers, norm_eps=1e-5)
    # Params from numpy at the shapes init would make: compiling the random initialisers of 3×3
    # kernels takes XLA:CPU ~20 s on the 2-core machine, and the values do not matter here.
    shapes = nn.meta.unbox(jax.eval_shape(stem.init, jax.random.PRNGKey(0), x))["params"]
    noise = np.random.default_rng(1)
    params = jax.tree.map(lambda p: (0.3 * noise.normal(size=p.shape) + (p.ndim == 1)).astype(np.float32), shapes)
    out = np.asarray(stem.apply({"params": params}, x))
    assert out.shape == (2, 4, 4, 12)

    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    for i, (_, stride) in enumerate(layers):
        w = torch.from_numpy(np.asarray(params[f"conv_{i}"]["kernel"])).permute(3, 2, 0, 1)  # HWIO → OIHW
        t = F.conv2d(F.pad(t, (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1)), w, stride=stride)
        norm = params[f"norm_{i}"]
        t = F.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],), torch.from_numpy(np.asarray(norm["scale"])),
                         torch.from_numpy(np.asarray(norm["bias"])), eps=1e-5)
        t = F.gelu(t).permute(0, 3, 1, 2)
    np.testing.assert_allclose(out, t.permute(0, 2, 3, 1).numpy(), atol=2e-5)


def test_sincos2d_and_resize():
    t = sincos_2d(2, 3, 8)
    assert t.shape == (6, 8)
    # token (y=1, x=2): first quarter is sin(x·ω) with ω_0 = 1
    np.testing.assert_allclose(t[5, 0], np.sin(2.0), rtol=1e-6)
    np.testing.assert_allclose(t[5, 4], np.sin(1.0), rtol=1e-6)
    table = np.random.RandomState(0).randn(1, 1 + 16, 4).astype(np.float32)
    r = resize_posemb(table, (8, 8), num_prefix_tokens=1)
    assert r.shape == (1, 65, 4)
    np.testing.assert_array_equal(r[:, 0], table[:, 0])
    same = resize_posemb(table, (4, 4), num_prefix_tokens=1)
    np.testing.assert_allclose(same, table, atol=1e-6)


def test_rope_rotate_half():
    x = np.random.RandomState(0).randn(1, 3, 2, 4).astype(np.float32)
    pos = np.array([[0, 1, 5]])
    out = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), base=100.0))
    inv = 1.0 / 100.0 ** (np.arange(0, 4, 2) / 4)
    ang = pos[..., None] * inv
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    rot = np.concatenate([-x[..., 2:], x[..., :2]], -1)
    ref = x * np.concatenate([cos, cos], -1) + rot * np.concatenate([sin, sin], -1)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(out[:, 0], x[:, 0], atol=1e-6)  # position 0 is unrotated


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_equals_unscanned(remat):
    from mmjax.layers import stack_block_params
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 32))
    base = TransformerConfig(width=32, depth=3, num_heads=4, mlp_dim=64)
    plain = Transformer(base)
    p = nn.meta.unbox(plain.init(jax.random.PRNGKey(1), x))["params"]
    import dataclasses
    scanned = Transformer(dataclasses.replace(base, scan_layers=True, remat=remat))
    ps = stack_block_params(jax.tree.map(np.asarray, p), 3)
    y1, a1 = plain.apply({"params": p}, x, return_blocks=True)
    y2, a2 = scanned.apply({"params": ps}, x, return_blocks=True)
    np.testing.assert_allclose(y1, y2, atol=1e-5)
    np.testing.assert_allclose(a1["blocks"], a2["blocks"], atol=1e-5)
    g1 = jax.grad(lambda p: plain.apply({"params": p}, x)[0].sum())(p)
    g2 = jax.grad(lambda p: scanned.apply({"params": p}, x)[0].sum())(ps)
    np.testing.assert_allclose(g1["block_2"]["mlp"]["fc1"]["kernel"],
                               g2["blocks"]["block"]["mlp"]["fc1"]["kernel"][2], atol=1e-4)


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason=f"inspects XLA:CPU's reductions; this backend is {jax.default_backend()}")
def test_dense_with_head_axes_sums_its_bias_gradient_over_a_2d_array():
    """A q/k/v projection's output [B, T, H, Dh]: under a CPU mesh the bias is added to the [B·T, H·Dh]
    product, so db is a column sum of a 2D array. Added to [B, T, H, Dh], db reduced two leading axes of
    a 4D array, which in the tiny CLIP step XLA:CPU rewrote into 4D reduce-windows that ran at under
    1 GB/s (101 ms of the step's 1.27 s of thread time for 24 such sums). In-rank 2 (the output
    projection) too. Checked here: the gradients, and that every sum reduces into one flat axis."""
    import re

    x = jax.random.normal(jax.random.key(0), (40, 48, 16))  # both row axes > 32: XLA's tree reduction
    for layer, xin in ((DenseGeneral((4, 12), ("embed", "heads", "head_dim")), x),
                       (DenseGeneral(16, ("heads", "head_dim", "embed"), in_rank=2), x.reshape(40, 48, 4, 4))):
        params = nn.unbox(layer.init(jax.random.key(1), xin))
        f = jax.jit(jax.grad(lambda p, x, layer=layer: jnp.sum(jnp.tanh(layer.apply(p, x)))))
        with _one_cpu_mesh():  # the layout is for programs traced for the CPU
            g = f(params, xin)["params"]
            hlo = f.lower(params, xin).compile().as_text()
        kernel = np.asarray(params["params"]["kernel"], np.float64)
        xn = np.asarray(xin, np.float64).reshape(40 * 48, -1)
        dy = 1 - np.tanh(xn @ kernel.reshape(xn.shape[1], -1)) ** 2
        np.testing.assert_allclose(g["kernel"], (xn.T @ dy).reshape(kernel.shape), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(g["bias"], dy.sum(0).reshape(g["bias"].shape), rtol=1e-4, atol=1e-4)
        sums = [line for line in hlo.splitlines() if re.search(r" (reduce|reduce-window)\(", line)]
        assert sums and all(re.search(r"= f32\[\d+\]\{0\} reduce", line) for line in sums), sums  # into [H·Dh]


def _one_cpu_mesh():
    from mmjax.sharding import MeshConfig, make_mesh
    return jax.set_mesh(make_mesh(MeshConfig(shape=(1, 1, 1)), jax.devices()[:1]))


def _dense_grads(flatten: bool):
    """Grads of sum(tanh(x · W + b)) for x [B, T, D] through DenseGeneral, and the compiled HLO; flatten:
    the CPU layout of mmjax.ops (OpsPolicy cpu_kernels) or XLA's dot_general as it is."""
    from mmjax.ops import OpsPolicy
    layer = DenseGeneral(48, ("embed", "mlp"), ops=OpsPolicy(cpu_kernels=flatten))
    x = jax.random.normal(jax.random.key(0), (4, 24, 16))
    params = layer.init(jax.random.key(1), x)
    f = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.tanh(layer.apply(p, x)))))
    with _one_cpu_mesh():
        return params, x, f(params, x), f.lower(params, x).compile().as_text()


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason=f"inspects XLA:CPU's dot canonicalisation; this backend is {jax.default_backend()}")
def test_dense_flattens_rows_so_the_kernel_gradient_needs_no_transposed_copy():
    import re
    params, x, flat, flat_hlo = _dense_grads(True)
    _, _, nested, nested_hlo = _dense_grads(False)
    xn = np.asarray(x, np.float64).reshape(-1, 16)
    dy = 1 - np.tanh(xn @ np.asarray(nn.unbox(params)["params"]["kernel"])) ** 2  # the bias is zero at init
    for grads in (flat, nested):
        g = nn.unbox(grads)["params"]
        np.testing.assert_allclose(g["kernel"], xn.T @ dy, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g["bias"], dy.sum(0), rtol=1e-5, atol=1e-5)
    # dy [4, 24, 48] transposed to [48, 96] (or [48, 4, 24]) for the kernel-gradient dot.
    copy = re.compile(r"= f32\[48,(96|4,24)\]\{[\d,]+\} (fusion|copy|transpose)\(")
    assert copy.search(nested_hlo), "XLA:CPU no longer copies dy for a two-axis contraction: dense_rows may go"
    assert not copy.search(flat_hlo), [line for line in flat_hlo.splitlines() if copy.search(line)]
