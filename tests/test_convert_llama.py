"""Weight conversion: HF LlamaForCausalLM ↔ mmjax LM, checked against HF's own PyTorch forward
(fp32, eval) on randomly initialised, saved models: plain and left-padded batches, GQA, tied and
untied heads, two RoPE bases, an explicit head_dim; export back and HF reloads the same function.

Every parameter is redrawn at random before saving (HF's init leaves the RMSNorm scales at 1,
which would hide a mis-mapped norm).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from safetensors.numpy import load_file

import mmjax
from mmjax.convert import ConversionError, KeyDiffError, LoadOptions, from_hf, save_pretrained
from mmjax.convert.hf_llama import lm_config_from_hf
from mmjax.layers import TransformerConfig
from mmjax.models.lm import LM, LMConfig

TOL = 1e-4

# name → LlamaConfig kwargs (hidden 32-64, 2 layers, vocab 100-300)
CASES = {
    "mha_untied_theta1e4": dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10_000.0),
    "gqa_tied_theta5e5": dict(vocab_size=257, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500_000.0),
    "gqa1_untied_headdim": dict(vocab_size=100, hidden_size=48, intermediate_size=80, num_attention_heads=4,
                                num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
                                rope_theta=10_000.0, rms_norm_eps=1e-5),
}


def _build(name, seed=0):
    kw = dict(CASES[name], num_hidden_layers=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = T.LlamaForCausalLM(T.LlamaConfig(**kw, attn_implementation="eager"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            base = 1.0 if "norm" in pname else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _hf_logits(hf, ids, mask=None):
    """HF's forward; with a padding mask, position_ids as HF's generate computes them."""
    ids_t = torch.from_numpy(ids.astype(np.int64))
    kw = {}
    if mask is not None:
        m = torch.from_numpy(mask.astype(np.int64))
        pos = m.cumsum(-1) - 1
        kw = dict(attention_mask=m, position_ids=pos.masked_fill(m == 0, 1))
    with torch.no_grad():
        return hf(input_ids=ids_t, **kw).logits.numpy()


def _left_padded(vocab, lengths, total, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(len(lengths), total))
    valid = np.arange(total)[None, :] >= (total - np.asarray(lengths))[:, None]
    ids = np.where(valid, ids, 0)
    return ids.astype(np.int32), valid


def _positions(valid):
    return np.maximum(np.cumsum(valid, axis=-1) - 1, 0).astype(np.int32)


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
    hf = _build(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    model, params = mmjax.load_pretrained(path)
    fwd = jax.jit(lambda p, ids, pos, valid: model.apply({"params": p}, ids, positions=pos, kv_valid=valid)[0])
    return request.param, hf, path, model, params, fwd


def test_logits_match_hf(converted):
    name, hf, _, model, params, fwd = converted
    c = CASES[name]
    e = model.cfg.encoder
    assert model.cfg.tie_embeddings == c["tie_word_embeddings"] and ("head" in params) != c["tie_word_embeddings"]
    assert e.rope_base == c["rope_theta"] and (e.num_kv_heads or e.num_heads) == c["num_key_value_heads"]
    ids, valid = _left_padded(c["vocab_size"], [9, 9], 9, seed=1)
    ours = fwd(params, ids, _positions(valid), valid)
    np.testing.assert_allclose(ours, _hf_logits(hf, ids), atol=TOL, rtol=TOL)


def test_left_padded_batch_matches_hf(converted):
    name, hf, _, model, params, fwd = converted
    ids, valid = _left_padded(CASES[name]["vocab_size"], [9, 4, 6], 9, seed=2)
    ours = np.asarray(fwd(params, ids, _positions(valid), valid))
    ref = _hf_logits(hf, ids, valid)
    # Padding positions are never read; compare every real token.
    np.testing.assert_allclose(ours[valid], ref[valid], atol=TOL, rtol=TOL)


def test_export_roundtrip_hf_reloads(converted, tmp_path):
    name, hf, src, model, params, fwd = converted
    out = save_pretrained(model, params, tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] == CASES[name]["tie_word_embeddings"]
    assert set(load_file(str(out / "model.safetensors"))) == set(load_file(str(src / "model.safetensors")))
    back = T.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids, valid = _left_padded(CASES[name]["vocab_size"], [7, 3], 7, seed=3)
    np.testing.assert_allclose(_hf_logits(back, ids, valid)[valid], _hf_logits(hf, ids, valid)[valid],
                               atol=1e-6, rtol=1e-6)
    # And back into mmjax, scanned this time: the same logits as the unscanned import.
    model2, params2 = mmjax.load_pretrained(out, scan_layers=True)
    assert model2.cfg.encoder.scan_layers and "blocks" in params2["encoder"]
    logits2 = model2.apply({"params": params2}, ids, positions=_positions(valid), kv_valid=valid)[0]
    logits1 = np.asarray(fwd(params, ids, _positions(valid), valid))
    np.testing.assert_allclose(np.asarray(logits2)[valid], logits1[valid], atol=1e-5, rtol=1e-5)


_BASE = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=50, hidden_size=32,
             intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)


@pytest.mark.parametrize("extra, match", [
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling has rope_type 'llama3'"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_type 'linear'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "rope_parameters has rope_type 'yarn'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
    (dict(architectures=["LlamaForSequenceClassification"]), "LlamaForSequenceClassification"),
])
def test_unsupported_hf_configs_are_refused(extra, match):
    with pytest.raises(ConversionError, match=match):
        from_hf(dict(_BASE, **extra), {})


def test_rope_theta_read_from_either_place():
    tensors = {}  # the config is read before the tensors are matched: a KeyDiffError proves we got past it
    for cfg, theta in ((dict(_BASE, rope_theta=5e5), 5e5),
                       (dict(_BASE, rope_parameters={"rope_type": "default", "rope_theta": 2e5}), 2e5),
                       (dict(_BASE), 1e4)):
        with pytest.raises(KeyDiffError) as err:
            from_hf(cfg, tensors)
        assert "model.embed_tokens.weight" in str(err.value)
        assert lm_config_from_hf(cfg, LoadOptions()).encoder.rope_base == theta


def test_key_diff_names_missing_and_unexpected(converted):
    _, _, path, _, _, _ = converted
    tensors = load_file(str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.1.self_attn.q_norm.weight"] = np.ones(4, np.float32)
    with pytest.raises(KeyDiffError) as err:
        from_hf(cfg, tensors)
    msg = str(err.value)
    assert "encoder/block_1/mlp/fc1/kernel" in msg and "model.layers.1.mlp.up_proj.weight" in msg
    assert "model.layers.1.self_attn.q_norm.weight" in msg and "1 missing, 1 unexpected" in msg


def test_export_refuses_what_llama_cannot_hold(tmp_path):
    enc = TransformerConfig(width=32, depth=1, num_heads=4, mlp_dim=64, activation="swiglu", norm="rmsnorm",
                            use_bias=False, rope_base=1e4, qk_norm="rmsnorm")
    model = LM(LMConfig(vocab_size=20, max_len=16, encoder=enc))
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ConversionError, match="qk_norm"):
        save_pretrained(model, params, tmp_path / "x")
    gemma_scaled = LM(LMConfig(vocab_size=20, max_len=16, encoder=dataclasses.replace(enc, qk_norm=None),
                               embed_scale=32 ** 0.5))
    with pytest.raises(ConversionError, match="embed_scale=5.65.*does not scale its embeddings"):
        save_pretrained(gemma_scaled, params, tmp_path / "y")
