"""The LLaVA-style VLM (mmjax/models/vlm.py) and its HF converters (mmjax/convert/hf_llava.py,
hf_paligemma.py), against transformers' LlavaForConditionalGeneration (CLIP vision + Llama) and
PaliGemmaForConditionalGeneration (SigLIP vision + Gemma) on tiny random models saved with
save_pretrained: logits, greedy generation with images, export back to HF, every key layout, the
placeholder count, the CLS rule, causal vs prefix-LM masks, and a (2, 2, 2) mesh.

HF runs in fp32 eval; its outputs are the golden values. Weights are redrawn at random (LayerNorm and
Llama RMSNorm scales around 1, Gemma's stored norm weights around 0, as its scale is 1 + w; text
layers with std 0.3, the rest 0.1) so that a mis-mapped norm shows and greedy decoding neither
repeats one token nor meets near-ties.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from safetensors.numpy import load_file

import mmjax
from mmjax import sharding as shd
from mmjax.convert import ConversionError, KeyDiffError, from_hf, save_pretrained
from mmjax.layers import TransformerConfig
from mmjax.models import vlm as vlm_lib
from mmjax.models.vit import ViTConfig
from mmjax.models.vlm import VLM, VLMConfig, check_image_tokens

TOL = 1e-4
VOCAB, IMG, BOS, NEW = 100, 99, 1, 24
LLAVA_N, PG_N = 16, 4  # image tokens per image: (32/8)² CLIP patches (CLS dropped); (16/8)² SigLIP patches


def _redraw(model, seed, gemma_text=False):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            text = "language_model" in name
            base = 1.0 if "norm" in name and not (gemma_text and text) else 0.0
            # The text layers get std 0.3: with 0.1 the (tied, √D-scaled) input embedding dominates the
            # residual stream and greedy decoding repeats one token, which would make the test vacuous.
            std = 0.3 if text and "norm" not in name and "embed" not in name else 0.1
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    model.generation_config.eos_token_id = None  # greedy runs its full length, as ours with eos_id=None
    model.generation_config.pad_token_id = 0
    return model.eval()


def _llava_config():
    vc = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8)
    tc = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96)
    return T.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMG)


def _paligemma_config():
    vc = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=16, patch_size=8)  # vision_use_head=True: an unused head is saved
    tc = T.GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=96)
    return T.PaliGemmaConfig(vision_config=vc, text_config=tc, image_token_index=IMG, projection_dim=32,
                             hidden_size=32, vocab_size=VOCAB)


def _converted(hf, path):
    hf.save_pretrained(path)
    model, params = mmjax.load_pretrained(path)
    fwd = jax.jit(lambda p, images, ids, prefix: model.apply({"params": p}, images, ids, prefix_len=prefix)[0])
    return dict(hf=hf, path=path, model=model, params=params, fwd=fwd)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return _converted(_redraw(T.LlavaForConditionalGeneration(_llava_config()), 0), tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def paligemma(tmp_path_factory):
    hf = _redraw(T.PaliGemmaForConditionalGeneration(_paligemma_config()), 1, gemma_text=True)
    return _converted(hf, tmp_path_factory.mktemp("paligemma"))


def _pixels(n, size, seed):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)  # NCHW, as HF


def _nhwc(pixels, per_row=1):
    x = pixels.transpose(0, 2, 3, 1)
    return x if per_row == 1 else x.reshape((-1, per_row) + x.shape[1:])


def _text(rows, n, seed):
    return np.random.default_rng(seed).integers(3, IMG, (rows, n))


def _llava_ids(rows, images_per_row, seed):
    """[BOS, 2 text, (N <image> + 2 text) per image, 3 text]: placeholders among text, as LLaVA prompts."""
    parts = [np.full((rows, 1), BOS), _text(rows, 2, seed)]
    for k in range(images_per_row):
        parts += [np.full((rows, LLAVA_N), IMG), _text(rows, 2, seed + 1 + k)]
    return np.concatenate(parts + [_text(rows, 3, seed + 9)], 1).astype(np.int32)


def _pg_ids(rows, prompt, answer, seed):
    """PaliGemma's layout: N <image>, BOS, prompt (ending in its "\\n"), answer."""
    return np.concatenate([np.full((rows, PG_N), IMG), np.full((rows, 1), BOS), _text(rows, prompt, seed),
                           _text(rows, answer, seed + 1)], 1).astype(np.int32)


def _hf_logits(hf, ids, pixels, token_type_ids=None):
    kw = {} if token_type_ids is None else {"token_type_ids": torch.from_numpy(token_type_ids.astype(np.int64))}
    with torch.no_grad():
        return hf(input_ids=torch.from_numpy(ids.astype(np.int64)), pixel_values=torch.from_numpy(pixels),
                  **kw).logits.numpy()


# ------------------------------------------------------------------------------------- logits
@pytest.mark.parametrize("images_per_row", [1, 2])
def test_llava_logits_match_hf(llava, images_per_row):
    m = llava
    assert m["model"].cfg.vision_feature_layers == (-2,) and m["model"].cfg.vision_feature_select_strategy == "default"
    ids = _llava_ids(2, images_per_row, seed=1)
    pixels = _pixels(2 * images_per_row, 32, seed=2)  # HF: a flat list of images, in placeholder order
    ours = np.asarray(m["fwd"](m["params"], _nhwc(pixels, images_per_row), ids, None))
    np.testing.assert_allclose(ours, _hf_logits(m["hf"], ids, pixels), atol=TOL, rtol=TOL)


def test_llava_two_feature_layers_full_strategy_match_hf(tmp_path):
    # hidden_states[-2] (block 0's output) and [-1] (the last block's, before post_layernorm)
    # concatenated on channels, CLS kept: N = 16 + 1 features per image, a projector input of 2 · 32.
    cfg = _llava_config()
    cfg.vision_feature_layer, cfg.vision_feature_select_strategy = [-2, -1], "full"
    m = _converted(_redraw(T.LlavaForConditionalGeneration(cfg), 2), tmp_path)
    assert m["model"].cfg.vision_feature_layers == (-2, -1)
    assert m["params"]["projector"]["linear_1"]["kernel"].shape == (64, 32)
    ids = np.concatenate([np.full((2, 1), BOS), np.full((2, LLAVA_N + 1), IMG), _text(2, 4, 20)], 1).astype(np.int32)
    pixels = _pixels(2, 32, seed=21)
    ours = np.asarray(m["fwd"](m["params"], _nhwc(pixels), ids, None))
    np.testing.assert_allclose(ours, _hf_logits(m["hf"], ids, pixels), atol=TOL, rtol=TOL)


def test_paligemma_logits_match_hf_with_per_row_prefix(paligemma):
    m = paligemma
    c = m["model"].cfg
    assert c.attention == "prefix" and c.lm.embed_scale == pytest.approx(32 ** 0.5) and c.lm.encoder.head_dim == 16
    ids = _pg_ids(2, prompt=4, answer=5, seed=3)
    prefix = np.array([PG_N + 1 + 4, PG_N + 3], np.int32)  # row 1: part of its prompt is causal
    token_type = (np.arange(ids.shape[1])[None, :] >= prefix[:, None]).astype(np.int64)
    pixels = _pixels(2, 16, seed=4)
    ours = np.asarray(m["fwd"](m["params"], _nhwc(pixels), ids, prefix))
    np.testing.assert_allclose(ours, _hf_logits(m["hf"], ids, pixels, token_type), atol=TOL, rtol=TOL)


# --------------------------------------------------------------------------------- generation
def _hf_greedy(hf, ids, pixels, **kw):
    kw = {k: torch.from_numpy(v.astype(np.int64)) for k, v in kw.items()}
    with torch.no_grad():
        out = hf.generate(input_ids=torch.from_numpy(ids.astype(np.int64)), pixel_values=torch.from_numpy(pixels),
                          attention_mask=torch.ones(ids.shape, dtype=torch.long), max_new_tokens=NEW,
                          do_sample=False, num_beams=1, top_k=None, top_p=None, temperature=None, **kw)
    gen = out[:, ids.shape[1]:].numpy()
    assert gen.shape[1] == NEW  # no EOS, so HF ran the full length
    return gen


def _ragged(rows):
    """Right-padded ids [B, T] and lengths from prompts of different lengths."""
    lens = np.array([len(r) for r in rows], np.int32)
    ids = np.zeros((len(rows), lens.max()), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return ids, lens


def test_llava_greedy_generation_matches_hf(llava):
    m = llava
    full = _llava_ids(2, 1, seed=5)
    rows = [full[0], full[1, :-2]]  # two prompt lengths: ours decodes them as one left-padded batch
    pixels = _pixels(2, 32, seed=6)
    ref = np.stack([_hf_greedy(m["hf"], r[None], pixels[i: i + 1])[0] for i, r in enumerate(rows)])
    ids, lens = _ragged(rows)
    out = vlm_lib.generate(m["model"], m["params"], _nhwc(pixels), ids, lengths=lens, max_new_tokens=NEW)
    np.testing.assert_array_equal(out.tokens, ref)
    assert all(len(set(r)) > 4 for r in ref)  # a real sequence, not one repeated token


def test_paligemma_greedy_generation_matches_hf(paligemma):
    m = paligemma
    full = _pg_ids(2, prompt=5, answer=0, seed=7)
    rows = [full[0], full[1, :-2]]
    pixels = _pixels(2, 16, seed=8)
    # HF: the whole prompt is prefix (token_type_ids 0), generated tokens causal; ours: prefix_len = lengths.
    ref = np.stack([_hf_greedy(m["hf"], r[None], pixels[i: i + 1], token_type_ids=np.zeros((1, len(r))))[0]
                    for i, r in enumerate(rows)])
    ids, lens = _ragged(rows)
    out = vlm_lib.generate(m["model"], m["params"], _nhwc(pixels), ids, lengths=lens, max_new_tokens=NEW)
    np.testing.assert_array_equal(out.tokens, ref)
    assert all(len(set(r)) > 4 for r in ref)  # a real sequence, not one repeated token
    # The prefix is what HF's token_type_ids select: a causal prefill (prefix of 1) decodes otherwise.
    causal = vlm_lib.generate(m["model"], m["params"], _nhwc(pixels), ids, lengths=lens, max_new_tokens=NEW,
                              prefix_len=1)
    assert (causal.tokens != ref).any()


# ------------------------------------------------------------------------------------- export
def test_llava_export_roundtrip_hf_reloads(llava, tmp_path):
    m = llava
    out = save_pretrained(m["model"], m["params"], tmp_path / "llava")
    assert set(load_file(str(out / "model.safetensors"))) == set(load_file(str(m["path"] / "model.safetensors")))
    back = T.LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids, pixels = _llava_ids(2, 1, seed=9), _pixels(2, 32, seed=10)
    ref = _hf_logits(m["hf"], ids, pixels)
    np.testing.assert_allclose(_hf_logits(back, ids, pixels), ref, atol=1e-6, rtol=1e-6)
    # And back into mmjax with both towers scanned (feature layers then index the stacked block outputs).
    model2, params2 = mmjax.load_pretrained(out, scan_layers=True)
    assert "blocks" in params2["vision"]["encoder"] and "blocks" in params2["lm"]["encoder"]
    ours = jax.jit(lambda p, images, i: model2.apply({"params": p}, images, i)[0])(params2, _nhwc(pixels), ids)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=TOL)


def test_paligemma_export_roundtrip_hf_reloads(paligemma, tmp_path):
    m = paligemma
    out = save_pretrained(m["model"], m["params"], tmp_path / "pg")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "paligemma" and cfg["vision_config"]["vision_use_head"] is False
    saved = set(load_file(str(m["path"] / "model.safetensors")))
    assert set(load_file(str(out / "model.safetensors"))) == {k for k in saved if ".head." not in k}
    back = T.PaliGemmaForConditionalGeneration.from_pretrained(out).eval()
    ids, pixels = _pg_ids(2, prompt=3, answer=3, seed=11), _pixels(2, 16, seed=12)
    tt = (np.arange(ids.shape[1]) >= PG_N + 4).astype(np.int64)[None].repeat(2, 0)
    # Gemma's norms go through scale = 1 + w and back: w is exact to float32 rounding of the sum.
    np.testing.assert_allclose(_hf_logits(back, ids, pixels, tt), _hf_logits(m["hf"], ids, pixels, tt),
                               atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------- key layouts
def _renamed(tensors, pairs):
    out = {}
    for k, v in tensors.items():
        for old, new in pairs:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


LAYOUTS = {
    "hub": [("vision_tower.", "vision_tower.vision_model.")],
    "v5_memory": [("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
                  ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")],
    "v4_52_memory": [("vision_tower.", "model.vision_tower.vision_model."),
                     ("multi_modal_projector.", "model.multi_modal_projector."),
                     ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")],
}


@pytest.mark.parametrize("which", ["llava", "paligemma"])
def test_every_key_layout_loads_the_same_params(which, request):
    m = request.getfixturevalue(which)
    cfg = json.loads((m["path"] / "config.json").read_text())
    on_disk = load_file(str(m["path"] / "model.safetensors"))
    assert any(k.startswith("language_model.model.") for k in on_disk)  # what 5.25 writes
    want = jax.tree.leaves(m["params"])
    for name, pairs in LAYOUTS.items():
        model, params = from_hf(cfg, _renamed(on_disk, pairs), source=name)
        assert model.cfg == m["model"].cfg
        for a, b in zip(jax.tree.leaves(params), want, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_key_diff_names_missing_and_unexpected(llava):
    cfg = json.loads((llava["path"] / "config.json").read_text())
    tensors = _renamed(load_file(str(llava["path"] / "model.safetensors")), LAYOUTS["v5_memory"])
    tensors.pop("model.multi_modal_projector.linear_2.bias")
    tensors["model.multi_modal_projector.linear_3.weight"] = np.zeros((32, 32), np.float32)
    with pytest.raises(KeyDiffError) as err:
        from_hf(cfg, tensors)
    msg = str(err.value)
    assert "1 missing, 1 unexpected" in msg and "projector/linear_2/bias" in msg
    assert "'model.multi_modal_projector.linear_2.bias'" in msg and "model.multi_modal_projector.linear_3.weight" in msg


# ------------------------------------------------------------------------------ loud errors
def test_placeholder_count_error_names_both_numbers(llava):
    m = llava
    ids = _llava_ids(2, 1, seed=13)
    ids[0, 3:7] = 5  # row 0 keeps 12 of its 16 placeholders
    with pytest.raises(ValueError, match=r"12 <image> tokens \(id 99\) in row 0 but the vision tower gives 16 "
                                         r"features per image; 1 of 2 rows"):
        m["model"].apply({"params": m["params"]}, _nhwc(_pixels(2, 32, 0)), ids)  # concrete ids: checked
    with pytest.raises(ValueError, match=r"20 <image> tokens .* row 1 but its 2 images give 32 features \(16 per"):
        check_image_tokens(np.stack([np.full(32, IMG), np.r_[np.full(20, IMG), np.zeros(12)]]), IMG, 16, 2)
    with pytest.raises(ValueError, match="prefix_len is for attention='prefix'"):
        m["model"].apply({"params": m["params"]}, _nhwc(_pixels(2, 32, 0)), _llava_ids(2, 1, 0), prefix_len=3)


def test_default_strategy_never_drops_a_real_patch():
    siglip = ViTConfig(image_size=16, patch_size=8, pool="none", patch_bias=True,
                       encoder=TransformerConfig(width=32, depth=2, num_heads=4, mlp_dim=64))
    images, ids = jnp.zeros((1, 16, 16, 3)), jnp.full((1, 4), 255, jnp.int32)
    with pytest.raises(ValueError, match="no CLS token: it would drop a real image patch"):
        VLM(VLMConfig(vision=siglip, vision_feature_select_strategy="default")).init(jax.random.key(0), images, ids)
    VLM(VLMConfig(vision=siglip, vision_feature_select_strategy="full")).init(jax.random.key(0), images, ids)
    with pytest.raises(ValueError, match=r"hidden_states\[0\], the stack's input"):  # depth 2: −3 is the input
        VLM(VLMConfig(vision=siglip, vision_feature_select_strategy="full", vision_feature_layers=(-3,))).init(
            jax.random.key(0), images, ids)
    # The converter refuses such an HF LLaVA config instead of dropping a patch silently.
    hf = _llava_config().to_dict()
    hf["vision_config"] = T.SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4).to_dict()
    with pytest.raises(ConversionError, match="no CLS token"):
        from_hf(hf, {})


def test_prefix_lm_sees_later_prompt_tokens_causal_does_not(llava, paligemma):
    # PaliGemma: prefix = image + BOS + 5 prompt tokens; change prompt token 9, look at position 6.
    m = paligemma
    ids = _pg_ids(1, prompt=5, answer=4, seed=14)
    pixels, prefix = _nhwc(_pixels(1, 16, 15)), np.array([PG_N + 6], np.int32)
    changed = ids.copy()
    changed[0, 9] = 3 if ids[0, 9] != 3 else 4
    a, b = (np.asarray(m["fwd"](m["params"], pixels, x, prefix)) for x in (ids, changed))
    assert np.abs(a[0, 6] - b[0, 6]).max() > 1e-3  # bidirectional inside the prefix
    changed_answer = ids.copy()
    changed_answer[0, 12] = 3 if ids[0, 12] != 3 else 4
    c = np.asarray(m["fwd"](m["params"], pixels, changed_answer, prefix))
    np.testing.assert_array_equal(c[0, :12], a[0, :12])  # the answer is causal
    # LLaVA is causal: a later prompt token never changes an earlier position.
    m = llava
    ids = _llava_ids(1, 1, seed=16)
    changed = ids.copy()
    changed[0, -2] = 3 if ids[0, -2] != 3 else 4
    pixels = _nhwc(_pixels(1, 32, 17))
    a, b = (np.asarray(m["fwd"](m["params"], pixels, x, None)) for x in (ids, changed))
    np.testing.assert_array_equal(a[0, :-2], b[0, :-2])
    assert np.abs(a[0, -1] - b[0, -1]).max() > 1e-3


# ---------------------------------------------------------------------------------- sharding
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_sharded_forward_on_2x2x2_mesh_equals_one_device(llava):
    m = llava
    model, params = m["model"], m["params"]
    ids, pixels = _llava_ids(4, 1, seed=18), _nhwc(_pixels(4, 32, seed=19))
    one = np.asarray(m["fwd"](params, pixels, ids, None))
    mesh = shd.make_mesh(shd.MeshConfig(shape=(2, 2, 2)), jax.devices())
    with jax.set_mesh(mesh), shd.logical_rules(shd.DEFAULT_RULES):
        abstract = jax.eval_shape(model.init, jax.random.key(0), pixels, ids)["params"]
        sharded = jax.device_put(params, shd.tree_shardings(abstract, mesh))
        kernel = sharded["projector"]["linear_1"]["kernel"]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
        fwd = jax.jit(lambda p, images, i: model.apply({"params": p}, images, i)[0])
        out = fwd(sharded, jax.device_put(pixels, shd.batch_sharding(mesh, 4)),
                  jax.device_put(ids, shd.batch_sharding(mesh, 2)))
    np.testing.assert_allclose(np.asarray(out), one, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- M-RoPE
def test_grid_image_positions_put_patches_on_rows_and_columns_and_generate_consistently():
    import dataclasses

    from mmjax.models.lm import LM, LMConfig
    # by hand: a 2×2 image block at slots 1..4 of positions 0..6, text on the diagonal
    pos = vlm_lib.grid_positions(np.arange(7)[None], np.array([[0, 1, 1, 1, 1, 0, 0]], bool), 2)
    np.testing.assert_array_equal(np.asarray(pos)[0], [[0, 0], [1, 1], [1, 2], [2, 1], [2, 2], [5, 5], [6, 6]])
    enc = TransformerConfig(width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64, activation="swiglu",
                            norm="rmsnorm", use_bias=False, rope_base=10_000.0, rope_2d_channels="interleaved")
    cfg = VLMConfig(lm=LMConfig(vocab_size=VOCAB, max_len=96, rope_2d=True, encoder=enc), image_token_id=IMG,
                    image_positions="grid")
    model, seq = VLM(cfg), VLM(dataclasses.replace(cfg, image_positions="sequence"))
    ids = np.concatenate([[[BOS]], np.full((1, LLAVA_N), IMG), _text(1, 6, seed=20)], axis=1).astype(np.int32)
    pixels = _nhwc(_pixels(1, 32, 21))
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, model.init(jax.random.key(0), pixels, ids)["params"])
    logits, aux = model.apply({"params": params}, pixels, ids)
    # the LM on the spliced embeddings, with the 4×4 patches at (1 + r, 1 + c) and text at (p, p)
    want = [[0, 0]] + [[1 + j // 4, 1 + j % 4] for j in range(LLAVA_N)] + [[p, p] for p in range(17, 23)]
    x, _ = model.apply({"params": params}, pixels, ids, method=VLM.embed)
    ref, _ = LM(cfg.lm).apply({"params": params["lm"]}, x, positions=jnp.asarray([want]))
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(ref))
    flat, _ = seq.apply({"params": params}, pixels, ids)      # same params, raster positions: only the
    np.testing.assert_array_equal(np.asarray(flat)[0, 0], np.asarray(logits)[0, 0])        # image part moves
    assert np.abs(np.asarray(flat)[0, -1] - np.asarray(logits)[0, -1]).max() > 1e-3
    # greedy generation (prefill + KV-cache steps) = the argmax of one forward over the whole sequence
    out = vlm_lib.generate(model, params, pixels, ids, max_new_tokens=6, temperature=0.0, disallowed_ids=(IMG,))
    full = np.concatenate([ids, out.tokens], axis=1)
    steps, _ = model.apply({"params": params}, pixels, full)
    np.testing.assert_array_equal(np.argmax(np.asarray(steps)[0, ids.shape[1] - 1:-1], -1), out.tokens[0])
    for bad, match in ((dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, encoder=dataclasses.replace(
            enc, rope_2d_channels="halves"))), "rope_2d_channels='interleaved'"),
                       (dataclasses.replace(cfg, multicrop_grid=1), "not with multi-crop")):
        with pytest.raises(ValueError, match=match):
            VLM(bad).init(jax.random.key(0), pixels, ids)
