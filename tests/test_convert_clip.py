"""Weight conversion: HF CLIPModel / SiglipModel and OpenAI/open_clip state dicts ↔ mmjax CLIP,
checked against HF's own PyTorch forward (fp32, eval) on randomly initialised, saved models.

Every parameter is redrawn at random before saving (HF's init leaves biases at 0 and norms at 1,
which would hide a mis-mapped bias or norm).
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers as T
from safetensors.numpy import load_file, save_file

import mmjax
from mmjax.convert import ConversionError, KeyDiffError, save_pretrained
from mmjax.convert.hf_clip import load_openclip_state_dict, to_openclip_state_dict

TOL = 1e-4


def _tower(width, depth, heads, mlp, act, eps, **kw):
    return dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp,
                hidden_act=act, layer_norm_eps=eps, **kw)


# name → (HF class, config kwargs)
CASES = {
    "clip_quickgelu_legacy_eos": (T.CLIPModel, dict(
        vision_config=_tower(32, 2, 2, 64, "quick_gelu", 1e-5, image_size=16, patch_size=4),
        text_config=_tower(32, 2, 4, 48, "quick_gelu", 1e-5, vocab_size=40, max_position_embeddings=12,
                           eos_token_id=2),
        projection_dim=24)),
    "clip_gelu_eos7": (T.CLIPModel, dict(
        vision_config=_tower(48, 1, 4, 96, "gelu", 1e-6, image_size=24, patch_size=8),
        text_config=_tower(24, 2, 2, 64, "gelu", 1e-6, vocab_size=30, max_position_embeddings=10,
                           eos_token_id=7, bos_token_id=1, pad_token_id=0),
        projection_dim=16)),
    "siglip": (T.SiglipModel, dict(
        vision_config=_tower(32, 2, 2, 64, "gelu_pytorch_tanh", 1e-6, image_size=16, patch_size=4),
        text_config=_tower(32, 2, 4, 48, "gelu_pytorch_tanh", 1e-6, vocab_size=40, max_position_embeddings=12,
                           eos_token_id=3, bos_token_id=1, pad_token_id=0, projection_size=32))),
}


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = ("norm" in name or "layrnorm" in name) and name.endswith("weight")
            p.copy_((1.0 if norm else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
        if hasattr(model, "logit_bias"):
            model.logit_bias.fill_(-1.5)
        model.logit_scale.fill_(2.3)


def _build(name, seed=0):
    cls, kw = CASES[name]
    cfg_cls = T.SiglipConfig if cls is T.SiglipModel else T.CLIPConfig
    torch.manual_seed(seed)
    model = cls(cfg_cls(**kw))
    _randomize(model, seed)
    return model.eval()


def _inputs(hf, seed=1):
    vc, tc = hf.config.vision_config, hf.config.text_config
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, vc.image_size, vc.image_size)).astype(np.float32)
    length = tc.max_position_embeddings - 2
    ids = rng.integers(3, tc.vocab_size - 1, size=(3, length)).astype(np.int64)
    ids[:, 0] = 1
    eos = tc.eos_token_id if tc.eos_token_id != 2 else tc.vocab_size - 1
    ids[0, 4] = eos  # EOS in the middle (later tokens are ignored by the causal pooling)
    ids[1, -1] = eos
    ids[2, 2] = eos
    if tc.eos_token_id != 2:
        ids[0, 5] = eos  # two EOS: the first one pools
    return x, ids


def _hf_out(hf, x, ids):
    with torch.no_grad():
        tx, ti = torch.from_numpy(x), torch.from_numpy(ids)
        img = hf.get_image_features(pixel_values=tx)
        txt = hf.get_text_features(input_ids=ti)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        out = hf(input_ids=ti, pixel_values=tx)
        return {"image": img.numpy(), "text": txt.numpy(), "logits": out.logits_per_image.numpy()}


def _our_out(model, params, x, ids):
    xi, ti = x.transpose(0, 2, 3, 1), ids.astype(np.int32)
    img = model.apply({"params": params}, xi, method=model.encode_image)
    txt = model.apply({"params": params}, ti, method=model.encode_text)
    logits, _, _ = model.apply({"params": params}, xi, ti)
    return {"image": np.asarray(img), "text": np.asarray(txt), "logits": np.asarray(logits)}


def _diffs(ref, ours):
    return {k: float(np.max(np.abs(ours[k] - v))) for k, v in ref.items()}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    name = request.param
    hf = _build(name)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    x, ids = _inputs(hf)
    return dict(name=name, hf=hf, path=path, x=x, ids=ids, ref=_hf_out(hf, x, ids))


def test_parity_with_hf(case):
    model, params = mmjax.load_pretrained(case["path"])
    d = _diffs(case["ref"], _our_out(model, params, case["x"], case["ids"]))
    print(f"\n{case['name']}: max |ours - HF| = {d}")
    assert all(v <= TOL for v in d.values()), d
    vc, tc = case["hf"].config.vision_config, case["hf"].config.text_config
    acts = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}
    assert model.cfg.vision.encoder.activation == acts[vc.hidden_act]
    assert model.cfg.text.encoder.activation == acts[tc.hidden_act]
    assert model.cfg.vision.encoder.norm_eps == vc.layer_norm_eps
    assert model.cfg.text.encoder.norm_eps == tc.layer_norm_eps
    if case["name"].startswith("clip"):
        assert model.cfg.text.pool == ("eot_argmax" if tc.eos_token_id == 2 else "eos")


def test_scan_layers(case):
    model, params = mmjax.load_pretrained(case["path"], scan_layers=True)
    d = _diffs(case["ref"], _our_out(model, params, case["x"], case["ids"]))
    assert all(v <= TOL for v in d.values()), d


def test_export_round_trip(case, tmp_path):
    model, params = mmjax.load_pretrained(case["path"])
    save_pretrained(model, params, tmp_path)
    hf = case["hf"]
    back = type(hf).from_pretrained(tmp_path).eval()
    orig, new = hf.state_dict(), back.state_dict()
    orig = {k: v for k, v in orig.items() if not k.endswith("position_ids")}
    new = {k: v for k, v in new.items() if not k.endswith("position_ids")}
    assert set(orig) == set(new)
    for k in orig:
        torch.testing.assert_close(new[k], orig[k], rtol=0, atol=0, msg=k)
    d = _diffs(case["ref"], _hf_out(back, case["x"], case["ids"]))
    assert all(v <= 1e-5 for v in d.values()), d
    model2, params2 = mmjax.load_pretrained(tmp_path)
    assert model2.cfg == model.cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------ OpenAI layout
def _to_openai(sd: dict, depth_v: int, depth_t: int) -> dict:
    """HF CLIPModel state dict → OpenAI/open_clip keys (the mapping written independently here)."""
    n = lambda k: sd[k].numpy()
    out = {"visual.conv1.weight": n("vision_model.embeddings.patch_embedding.weight"),
           "visual.class_embedding": n("vision_model.embeddings.class_embedding"),
           "visual.positional_embedding": n("vision_model.embeddings.position_embedding.weight"),
           "visual.proj": n("visual_projection.weight").T.copy(),
           "token_embedding.weight": n("text_model.embeddings.token_embedding.weight"),
           "positional_embedding": n("text_model.embeddings.position_embedding.weight"),
           "text_projection": n("text_projection.weight").T.copy(),
           "logit_scale": n("logit_scale")}
    for ours, theirs in (("visual.ln_pre", "vision_model.pre_layrnorm"),
                         ("visual.ln_post", "vision_model.post_layernorm"),
                         ("ln_final", "text_model.final_layer_norm")):
        for w in ("weight", "bias"):
            out[f"{ours}.{w}"] = n(f"{theirs}.{w}")
    for pre, hf_pre, depth in (("visual.transformer", "vision_model", depth_v), ("transformer", "text_model", depth_t)):
        for i in range(depth):
            a, b = f"{pre}.resblocks.{i}", f"{hf_pre}.encoder.layers.{i}"
            for w in ("weight", "bias"):
                out[f"{a}.attn.in_proj_{w}"] = np.concatenate(
                    [n(f"{b}.self_attn.{p}_proj.{w}") for p in "qkv"], axis=0)
                for x, y in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    out[f"{a}.{x}.{w}"] = n(f"{b}.{y}.{w}")
    return {k: np.ascontiguousarray(v).reshape(v.shape) for k, v in out.items()}  # keep 0-d 0-d


@pytest.fixture(scope="module")
def openai(tmp_path_factory):
    hf = _build("clip_quickgelu_legacy_eos", seed=5)
    path = tmp_path_factory.mktemp("openai") / "open_clip.safetensors"
    sd = _to_openai(hf.state_dict(), 2, 2)
    sd["attn_mask"] = np.zeros((12, 12), np.float32)  # a buffer some exports carry
    save_file(sd, str(path))
    x, ids = _inputs(hf)
    return dict(hf=hf, path=path, sd=sd, x=x, ids=ids, ref=_hf_out(hf, x, ids))


def test_openclip_state_dict(openai):
    model, params = load_openclip_state_dict(openai["path"], activation="quick_gelu", vision_heads=2, text_heads=4)
    d = _diffs(openai["ref"], _our_out(model, params, openai["x"], openai["ids"]))
    print(f"\nopen_clip layout: max |ours - HF| = {d}")
    assert all(v <= TOL for v in d.values()), d
    back = to_openclip_state_dict(model, params)
    expected = {k: v for k, v in openai["sd"].items() if k != "attn_mask"}
    assert set(back) == set(expected)
    for k in expected:
        np.testing.assert_array_equal(back[k], expected[k], err_msg=k)
    # The wrong activation is the caller's statement, not a guess: it changes the outputs.
    model_g, params_g = load_openclip_state_dict(openai["path"], activation="gelu", vision_heads=2, text_heads=4)
    assert model_g.cfg.vision.encoder.activation == "gelu"
    with pytest.raises(ConversionError, match="activation 'swish'"):
        load_openclip_state_dict(openai["path"], activation="swish")


def test_openclip_missing_key(openai):
    sd = {k: v for k, v in openai["sd"].items() if k != "visual.ln_post.bias"}
    with pytest.raises(KeyDiffError, match=r"(?s)1 missing.*vision/encoder/final_norm/bias.*'visual\.ln_post\.bias'"):
        load_openclip_state_dict(sd, vision_heads=2, text_heads=4)
    with pytest.raises(ConversionError, match="not an OpenAI/open_clip ViT-CLIP state dict"):
        load_openclip_state_dict({"vit.embeddings.cls_token": np.zeros((1, 1, 4), np.float32)})


# ------------------------------------------------------------------------------------ errors
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    hf = _build("clip_quickgelu_legacy_eos", seed=3)
    path = tmp_path_factory.mktemp("small")
    hf.save_pretrained(path)
    return dict(hf=hf, path=path)


def _copy(small, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(small["path"], dst)
    return dst


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    t = load_file(str(path / "model.safetensors"))
    fn(t)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_unknown_activation(small, tmp_path):
    path = _copy(small, tmp_path)
    _edit_config(path, lambda c: c["text_config"].update(hidden_act="gelu_10"))
    with pytest.raises(ConversionError, match="text_config hidden_act 'gelu_10'"):
        mmjax.load_pretrained(path)


def test_missing_and_unexpected_keys(small, tmp_path):
    path = _copy(small, tmp_path)

    def edit(t):
        t.pop("text_model.encoder.layers.1.self_attn.k_proj.weight")
        t["vision_model.encoder.layers.7.layer_norm1.weight"] = np.ones((32,), np.float32)
        t["vision_model.extra"] = np.zeros((2,), np.float32)
        t["text_model.embeddings.position_ids"] = np.arange(12)[None]  # ignored buffer
    _edit_tensors(path, edit)
    with pytest.raises(KeyDiffError) as e:
        mmjax.load_pretrained(path)
    msg = str(e.value)
    assert "1 missing, 2 unexpected, 0 shape-mismatched" in msg
    assert "text/encoder/block_1/attn/key/kernel [32, 4, 8]" in msg
    assert "vision_model.extra [2]  (no rule matches this key)" in msg
    assert "vision/encoder/block_7/norm1/scale" in msg


def test_wrong_family_checkpoint(small, tmp_path):
    # A ViT directory's tensors under a CLIP config: every key is unexpected, loudly.
    path = _copy(small, tmp_path)
    _edit_tensors(path, lambda t: t.update({"vit.embeddings.cls_token": np.zeros((1, 1, 32), np.float32)}))
    with pytest.raises(KeyDiffError, match=r"vit\.embeddings\.cls_token \[1, 1, 32\]  \(no rule matches"):
        mmjax.load_pretrained(path)
    _edit_config(path, lambda c: c.update(architectures=["CLIPVisionModel"]))
    with pytest.raises(ConversionError, match="CLIPVisionModel.*supported: CLIPModel"):
        mmjax.load_pretrained(path)


def test_text_errors(small):
    model, params = mmjax.load_pretrained(small["path"])
    too_long = np.ones((1, 13), np.int32)
    with pytest.raises(ValueError, match="longer than the position table"):
        model.apply({"params": params}, too_long, method=model.encode_text)
    with pytest.raises(ValueError, match="token ids out of range"):
        model.apply({"params": params}, np.full((1, 4), 40, np.int32), method=model.encode_text)


def test_padded_text_with_attention_mask(case):
    """HF's attention_mask [B, L] is our `valid`: padded positions are masked out as keys."""
    model, params = mmjax.load_pretrained(case["path"])
    ids = case["ids"].copy()
    mask = np.ones_like(ids)
    mask[1, -3:] = 0  # row 1: EOS moved before 3 pad positions
    eos = ids[1, -1]
    ids[1, -4], ids[1, -3:] = eos, 0
    with torch.no_grad():
        ref = case["hf"].get_text_features(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    ref = getattr(ref, "pooler_output", ref).numpy()
    ours = model.apply({"params": params}, ids.astype(np.int32), valid=mask.astype(bool), method=model.encode_text)
    assert float(np.max(np.abs(np.asarray(ours) - ref))) <= TOL
