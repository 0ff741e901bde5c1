"""The backend seam (mmjax/ops): what a program holds for each platform, the layers without backend
code, pure functions under jit with captured inputs, Pallas splash attention (interpret mode) against
XLA's, and mixed precision (bf16 compute, fp32 params, norms, softmax and losses) against fp32."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export

from mmjax import ops
from mmjax.config import replace_in
from mmjax.layers import Attention, TransformerConfig
from mmjax.models.clip import CLIP, CLIPConfig
from mmjax.models.lm import LM, LMConfig, init_cache
from mmjax.models.text import TextConfig, TextTransformer
from mmjax.models.vit import ViT, ViTConfig
from mmjax.objectives.lm import lm_cross_entropy
from mmjax.ops import AttentionMask, OpsPolicy
from mmjax.ops import tpu as ops_tpu
from mmjax.sharding import MeshConfig, make_mesh

ROOT = Path(__file__).resolve().parents[1]
ENC = TransformerConfig(width=32, depth=1, num_heads=4, mlp_dim=64)
VIT = ViTConfig(image_size=8, patch_size=2, encoder=ENC, num_classes=5, head_zero_init=False)  # 16 patches + CLS
TEXT = TextConfig(vocab_size=50, max_len=8, encoder=dataclasses.replace(ENC, activation="quick_gelu"))
CLIP_CFG = CLIPConfig(vision=ViTConfig(image_size=8, patch_size=2, pre_norm=True, patch_bias=False, encoder=ENC),
                      text=TEXT, embed_dim=16)
LM_CFG = LMConfig(vocab_size=64, max_len=32, encoder=dataclasses.replace(LMConfig().encoder, depth=1))


def _custom_calls(text: str) -> set[str]:
    return set(re.findall(r"custom_call @([\w.]+)", text)) | set(re.findall(r'call_target_name = "([\w.]+)"', text))


def test_layers_and_models_hold_no_backend_code():
    """Only mmjax/ops knows platforms and kernels; layers and models hold no backend switches."""
    pattern = re.compile(r"default_backend|kernels|platform_dependent|ffi|FLATTEN_ROWS|FUSION_BARRIERS|os\.environ")
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
            for d in ("mmjax/layers", "mmjax/models") for p in sorted((ROOT / d).glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _vit_step():
    model = ViT(VIT)
    images = jnp.ones((4, 8, 8, 3))
    labels = jnp.arange(4) % 5
    params = model.init(jax.random.key(0), images)["params"]

    def step(params, images, labels):
        def loss(p):
            logits, _ = model.apply({"params": p}, images, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return jax.grad(loss)(params)
    return step, (params, images, labels)


def _lm_decode_step():
    model = LM(LM_CFG)
    params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    cache = init_cache(LM_CFG, 2, 16)

    def step(params, tok, cache, index):
        logits, aux = model.apply({"params": params}, tok, cache=cache, cache_index=index)
        return jnp.argmax(logits[:, -1], -1), aux["cache"]
    return step, (params, jnp.ones((2, 1), jnp.int32), cache, jnp.int32(3))


@pytest.mark.parametrize("make", [_vit_step, _lm_decode_step], ids=["vit_train", "lm_decode"])
def test_export_for_gpu_and_tpu_from_this_cpu_host_holds_no_cpu_code(make):
    """Exported for ("cuda", "tpu") from the CPU host: no mmjax kernel, no CPU-only construct (the
    barriers' optimization_barrier); exported for the TPU alone, the ViT's attention is splash's
    Mosaic kernel; the same ViT step compiled here for the CPU uses the native kernels."""
    step, args = make()
    exported = export.export(jax.jit(step), platforms=("cuda", "tpu"))(*_abstract(args))
    text = exported.mlir_module()
    calls = _custom_calls(text)
    assert not {c for c in calls if c.startswith("mmjax")}, calls
    assert "optimization_barrier" not in text
    assert exported.platforms == ("cuda", "tpu")
    if make is _vit_step:
        tpu_only = export.export(jax.jit(step), platforms=("tpu",))(*_abstract(args)).mlir_module()
        assert "tpu_custom_call" in _custom_calls(tpu_only)
        here = jax.jit(step).lower(*args).compile().as_text()
        assert "mmjax_attention_fwd" in here and "mmjax_norm_fwd" in here, "the CPU program lost its kernels"


def _ids():
    return jnp.array([[3, 7, 1, 9, 2, 0, 0, 0], [5, 5, 6, 1, 2, 3, 4, 8]], jnp.int32)


@pytest.mark.parametrize("which", ["vit", "text", "clip", "lm"])
def test_jit_with_captured_inputs_init_apply_and_grad(which):
    """Inputs closed over by a jitted function are constants of the trace, not tracers: checks that read
    values (token ids in range) must not turn them into tracers (ConcretizationTypeError before)."""
    images = jnp.ones((2, 8, 8, 3))
    ids = _ids()
    model, args = {"vit": (ViT(VIT), (images,)), "text": (TextTransformer(TEXT), (ids,)),
                   "clip": (CLIP(CLIP_CFG), (images, ids)), "lm": (LM(LM_CFG), (ids,))}[which]
    variables = jax.jit(lambda: model.init(jax.random.key(0), *args))()
    out = jax.jit(lambda v: model.apply(v, *args))(variables)
    assert all(np.isfinite(o).all() for o in jax.tree.leaves(out))
    if which == "lm":  # and differentiated with the ids captured
        grads = jax.jit(jax.grad(lambda v: jnp.sum(model.apply(v, *args)[0] ** 2)))(variables)
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    if which in ("text", "lm"):
        bad = ids.at[0, 0].set(999)
        with pytest.raises(ValueError, match="out of range|must lie in"):
            jax.jit(lambda v: model.apply(v, bad))(variables)


def test_tracing_builds_nothing_and_the_first_cpu_lowering_builds_the_kernels(tmp_path):
    """In a fresh process whose C++ compiler is a script that logs its calls and fails: eval_shape of a
    ViT's init and an export for GPU/TPU never call it; the first lowering for the CPU does, and the
    error names the failed build."""
    code = """
import json, os, sys
import jax, jax.numpy as jnp
from jax import export
from mmjax.layers import TransformerConfig
from mmjax.models.vit import ViT, ViTConfig
m = ViT(ViTConfig(image_size=8, patch_size=2, encoder=TransformerConfig(width=32, depth=1, num_heads=4, mlp_dim=64)))
x = jax.ShapeDtypeStruct((64, 8, 8, 3), jnp.float32)
shapes = jax.eval_shape(m.init, jax.random.key(0), x)
export.export(jax.jit(lambda v, x: m.apply(v, x)[0]), platforms=("cuda", "tpu"))(shapes, x)
log = os.environ["CXX_LOG"]
after_trace = open(log).read().count("called") if os.path.exists(log) else 0
try:
    jax.jit(lambda v, x: m.apply(v, x)[0]).lower(shapes, x).compile()
    error = None
except Exception as e:
    error = str(e)
print(json.dumps({"after_trace": after_trace, "after_compile": open(log).read().count("called"), "error": error}))
"""
    cxx = tmp_path / "fake-c++"
    cxx.write_text('#!/bin/sh\necho called >> "$CXX_LOG"\n[ "$1" = --version ] && exit 0\nexit 1\n')
    cxx.chmod(0o755)
    env = {**os.environ, "MMJAX_CACHE_DIR": str(tmp_path / "cache"), "CXX": str(cxx),
           "CXX_LOG": str(tmp_path / "cxx.log")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["after_trace"] == 0
    assert res["after_compile"] >= 1 and "failed" in res["error"], res


def test_a_forced_implementation_that_cannot_run_here_says_why():
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match="cudnn.*no CUDA backend"):
        ops.attention(q, q, q, policy=OpsPolicy(attention="cudnn"))
    with pytest.raises(ValueError, match="splash.*arbitrary mask"):
        ops.attention(q, q, q, jnp.ones((1, 1, 4, 4), bool), policy=OpsPolicy(attention="splash"))


def test_attention_mask_parts_equal_the_array_in_every_implementation():
    """An AttentionMask and its array give the same attention (XLA, native CPU), GQA included."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 6, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 6, 2, 8)), jnp.float32) for _ in range(2))
    valid = jnp.array([[1, 1, 1, 1, 0, 0], [1] * 6], bool)
    for mask in (AttentionMask(causal=True), AttentionMask(kv_valid=valid), AttentionMask(causal=True, prefix_len=3),
                 AttentionMask(causal=True, kv_valid=valid, q_offset=0)):
        want = ops.xla.attention(q, k, v, mask.array(6, 6))
        for policy in (OpsPolicy(), ops.XLA_ONLY):
            got = jax.jit(lambda q, k, v, m, policy=policy: ops.attention(q, k, v, m, policy=policy))(q, k, v, mask)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _splash_case(b, t, h, hkv, dh, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, h, dh)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, t, hkv, dh)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, hkv, dh)), jnp.float32)
    return q, k, v


@pytest.mark.parametrize("t,h,hkv,mask", [
    (128, 4, 2, AttentionMask(causal=True)),         # GQA: the multi-query kernel per kv head
    (100, 2, 1, "padding"),                          # padded to 128 (hidden keys) + padding as segment ids
])
def test_splash_attention_in_interpret_mode_matches_xla(t, h, hkv, mask):
    """The TPU path (Pallas splash attention) run by Pallas' interpreter on the CPU: values and gradients
    against XLA's attention."""
    q, k, v = _splash_case(1, t, h, hkv, 16)
    if mask == "padding":
        mask = AttentionMask(kv_valid=jnp.arange(t)[None, :] < 37)
    assert ops_tpu.unsupported(q, k, mask) is None
    ours = lambda q, k, v: ops_tpu.splash_attention(q, k, v, mask, interpret=True)
    ref = lambda q, k, v: ops.xla.attention(q, k, v, None if mask is None else mask.array(t, t))
    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), rtol=1e-4, atol=1e-5)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    grad = lambda f: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)
    for got, want, name in zip(grad(ours), grad(ref), "qkv"):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4, err_msg=f"d{name}")


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
def test_splash_attention_on_a_mesh_runs_per_shard():
    """On a (data 2, fsdp 2, tensor 2) mesh the kernel runs under shard_map, batch and heads split."""
    q, k, v = _splash_case(4, 128, 4, 4, 16, seed=2)
    mask = AttentionMask(causal=True)
    mesh = make_mesh(MeshConfig(shape=(2, 2, 2)))
    with jax.set_mesh(mesh):
        got = jax.jit(lambda q, k, v: ops_tpu.splash_attention(q, k, v, mask, interpret=True))(q, k, v)
    np.testing.assert_allclose(got, ops.xla.attention(q, k, v, mask.array(128, 128)), rtol=1e-4, atol=1e-5)


def _close(a, b, what, rtol):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)
    assert cos > 1 - rtol, f"{what}: cosine {cos:.5f}"


def _mixed(cfg):
    return replace_in(cfg, TransformerConfig, dtype="bfloat16")


@pytest.mark.parametrize("which", ["vit", "clip", "lm"])
def test_bf16_compute_train_step_stays_close_to_fp32(which):
    """fp32 params, bf16 compute: the step runs, its activations are bf16, its params and grads fp32,
    the loss and the gradients close to the fp32 step's (norm statistics, softmax and the loss in fp32)."""
    images = jax.random.uniform(jax.random.key(1), (8, 8, 8, 3), minval=-1, maxval=1)
    ids = jax.random.randint(jax.random.key(2), (8, 8), 1, 50)
    if which == "vit":
        build, args, cfg = ViT, (images,), VIT

        def loss(model, p):
            logits, _ = model.apply({"params": p}, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.arange(8) % 5).mean()

        def activations(model, p):
            return model.apply({"params": p}, images)[1]["encoded"]
    elif which == "clip":
        build, args, cfg = CLIP, (images, ids), CLIP_CFG

        def loss(model, p):
            logits, _, _ = model.apply({"params": p}, images, ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(8)).mean()

        def activations(model, p):
            return model.apply({"params": p}, ids, method=CLIP.encode_text)
    else:
        build, args, cfg = LM, (ids,), LM_CFG

        def loss(model, p):
            logits, _ = model.apply({"params": p}, ids)
            sums = lm_cross_entropy(logits[:, :-1], ids[:, 1:])
            return sums["loss_sum"] / sums["weight_sum"]

        def activations(model, p):
            return model.apply({"params": p}, ids)[1]["hidden"]
    full, mixed = build(cfg), build(_mixed(cfg))
    results = {}
    with jax.set_mesh(make_mesh(MeshConfig(shape=(1, 1, 1)), jax.devices()[:1])):  # as the trainer runs it
        params = nn.meta.unbox(jax.jit(full.init)(jax.random.key(0), *args)["params"])
        mixed_params = nn.meta.unbox(jax.eval_shape(mixed.init, jax.random.key(0), *args)["params"])
        assert jax.tree.structure(params) == jax.tree.structure(mixed_params)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(mixed_params))
        for name, model in (("fp32", full), ("bf16", mixed)):
            value, grads = jax.jit(jax.value_and_grad(lambda p, m=model: loss(m, p)))(params)
            results[name] = value, jax.eval_shape(lambda p, m=model: activations(m, p), params), grads
    (l32, a32, g32), (l16, a16, g16) = results["fp32"], results["bf16"]
    assert a32.dtype == jnp.float32 and a16.dtype == jnp.bfloat16
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
    assert np.isfinite(float(l16)) and abs(float(l16) - float(l32)) < 0.02 * max(1.0, abs(float(l32)))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g16), jax.tree.leaves(g32)):
        if np.linalg.norm(b) > 1e-6:
            _close(a, b, jax.tree_util.keystr(path), 0.05)
    _close(np.concatenate([np.ravel(g) for g in jax.tree.leaves(g16)]),
           np.concatenate([np.ravel(g) for g in jax.tree.leaves(g32)]), "all grads", 0.01)


def test_attention_layer_under_every_cpu_policy_agrees():
    x = jax.random.normal(jax.random.key(0), (2, 70, 32))
    mask = AttentionMask(causal=True)
    outs = []
    for policy in (OpsPolicy(), OpsPolicy(attention="native", norm="native"), ops.XLA_ONLY):
        layer = Attention(num_heads=4, num_kv_heads=2, qk_norm="layernorm", ops=policy)
        params = layer.init(jax.random.key(1), x, mask=mask)
        outs.append(jax.jit(lambda p, x, layer=layer: layer.apply(p, x, mask=mask))(params, x))
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=1e-5, atol=1e-5)
