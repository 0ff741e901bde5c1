"""Weight conversion: HF transformers ViT ↔ mmjax ViT, checked against HF's own PyTorch forward.

Checkpoints are written here from randomly initialised HF models (no hub access). HF's init leaves
biases at 0 and LayerNorm at 1/0, which would hide a mis-mapped bias or norm, so every parameter
is redrawn at random before saving.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as torch_save_file
from transformers import ViTConfig as HFViTConfig
from transformers import ViTForImageClassification, ViTModel

import mmjax
from mmjax.config import ConfigError
from mmjax.convert import ConversionError, KeyDiffError, from_hf, save_pretrained, to_hf
from mmjax.convert.rules import CONV_OIHW, RESHAPE, Linear, Rule, import_tensors
from mmjax.convert.tree import scan_tree, unscan_tree
from mmjax.models.vit import ViT

TOL = 1e-4

# name → (HF config kwargs, HF class, ViTModel add_pooling_layer)
CASES = {
    "w32_gelu_pooler": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=16, patch_size=4, num_channels=3, hidden_act="gelu"), ViTModel, True),
    "w48_gelu_new_gray_nopool": (dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=96, image_size=32, patch_size=8, num_channels=1,
                                      hidden_act="gelu_new", layer_norm_eps=1e-6), ViTModel, False),
    "w32_classifier_quick_gelu": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=48, image_size=32, patch_size=8, num_channels=3,
                                       hidden_act="quick_gelu", num_labels=5),
                                  ViTForImageClassification, None),
    "w48_tanh_pooler24_noqkvbias": (dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, image_size=16, patch_size=4, num_channels=3,
                                         hidden_act="gelu_pytorch_tanh", pooler_output_size=24,
                                         qkv_bias=False), ViTModel, True),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "layernorm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


def _build_hf(name: str, seed: int = 0):
    kwargs, cls, pooler = CASES[name]
    torch.manual_seed(seed)
    cfg = HFViTConfig(**kwargs)
    model = cls(cfg) if cls is ViTForImageClassification else cls(cfg, add_pooling_layer=pooler)
    _randomize(model, seed)
    return model.eval()


def _images(cfg, seed: int = 1):
    x = np.random.default_rng(seed).standard_normal((2, cfg.num_channels, cfg.image_size, cfg.image_size))
    x = x.astype(np.float32)
    return torch.from_numpy(x), x.transpose(0, 2, 3, 1)  # NCHW for torch, NHWC for us


def _hf_outputs(model, x_nchw) -> dict[str, np.ndarray]:
    with torch.no_grad():
        if isinstance(model, ViTForImageClassification):
            return {"encoded": model.vit(x_nchw).last_hidden_state.numpy(),
                    "logits": model(x_nchw).logits.numpy()}
        out = model(x_nchw)
        ref = {"encoded": out.last_hidden_state.numpy()}
        if out.pooler_output is not None:
            ref["pre_logits"] = out.pooler_output.numpy()
        return ref


def _our_outputs(model, params, x_nhwc) -> dict[str, np.ndarray]:
    out, aux = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x_nhwc)
    ours = {"encoded": np.asarray(aux["encoded"]), "pre_logits": np.asarray(aux["pre_logits"])}
    if model.cfg.num_classes is not None:
        ours["logits"] = np.asarray(out)
    return ours


def _max_diffs(ref: dict, ours: dict) -> dict[str, float]:
    return {k: float(np.max(np.abs(ours[k] - v))) for k, v in ref.items()}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """A saved HF checkpoint with its reference outputs on fixed random images."""
    name = request.param
    hf = _build_hf(name)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    x_nchw, x_nhwc = _images(hf.config)
    return dict(name=name, hf=hf, path=path, x_nchw=x_nchw, x_nhwc=x_nhwc, ref=_hf_outputs(hf, x_nchw))


# ------------------------------------------------------------------------------------------ parity
def test_parity_with_hf(case):
    model, params = mmjax.load_pretrained(case["path"])
    diffs = _max_diffs(case["ref"], _our_outputs(model, params, case["x_nhwc"]))
    print(f"\n{case['name']}: max |ours - HF| = {diffs}")
    assert all(d <= TOL for d in diffs.values()), diffs
    # The checkpoint's activation and eps live on in the returned model's config.
    hf_cfg = case["hf"].config
    expected_act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                    "quick_gelu": "quick_gelu"}[hf_cfg.hidden_act]
    assert model.cfg.encoder.activation == expected_act
    assert model.cfg.encoder.norm_eps == hf_cfg.layer_norm_eps
    assert model.cfg.channels == hf_cfg.num_channels
    if isinstance(case["hf"], ViTForImageClassification):
        assert model.cfg.num_classes == hf_cfg.num_labels and model.cfg.representation_size is None
    else:
        pooled = case["hf"].pooler is not None
        assert model.cfg.representation_size == (hf_cfg.pooler_output_size if pooled else None)


def test_scan_layers_same_output(case):
    model, params = mmjax.load_pretrained(case["path"], scan_layers=True)
    depth = case["hf"].config.num_hidden_layers
    assert model.cfg.encoder.scan_layers
    assert params["encoder"]["blocks"]["block"]["mlp"]["fc1"]["kernel"].shape[0] == depth
    diffs = _max_diffs(case["ref"], _our_outputs(model, params, case["x_nhwc"]))
    assert all(d <= TOL for d in diffs.values()), diffs


def test_export_round_trip(case, tmp_path):
    """ours → save_pretrained → HF from_pretrained: the same tensors, the same outputs."""
    model, params = mmjax.load_pretrained(case["path"], scan_layers=True)  # export unstacks
    save_pretrained(model, params, tmp_path)
    hf = case["hf"]
    if isinstance(hf, ViTForImageClassification):
        back = ViTForImageClassification.from_pretrained(tmp_path)
    else:
        back = ViTModel.from_pretrained(tmp_path, add_pooling_layer=hf.pooler is not None)
    back.eval()
    original, reloaded = hf.state_dict(), back.state_dict()
    assert set(original) == set(reloaded)
    for k in original:
        torch.testing.assert_close(reloaded[k], original[k], rtol=0, atol=0, msg=k)
    diffs = _max_diffs(case["ref"], _hf_outputs(back, case["x_nchw"]))
    # Same tensors; only gelu_new vs gelu_pytorch_tanh (both the tanh form) round differently.
    assert all(d <= 1e-5 for d in diffs.values()), diffs
    assert back.config.hidden_act == hf.config.hidden_act or (
        hf.config.hidden_act == "gelu_new" and back.config.hidden_act == "gelu_pytorch_tanh")
    # And our export reads back into the same params.
    model2, params2 = mmjax.load_pretrained(tmp_path)
    assert model2.cfg == dataclasses.replace(
        model.cfg, encoder=dataclasses.replace(model.cfg.encoder, scan_layers=False))
    for a, b in zip(jax.tree.leaves(unscan_tree(jax.tree.map(np.asarray, params))), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------ other file layouts
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The first case, for the layout and error tests (they edit copies of its files)."""
    hf = _build_hf("w32_gelu_pooler", seed=3)
    path = tmp_path_factory.mktemp("small")
    hf.save_pretrained(path)
    x_nchw, x_nhwc = _images(hf.config)
    return dict(hf=hf, path=path, x_nchw=x_nchw, x_nhwc=x_nhwc, ref=_hf_outputs(hf, x_nchw))


def _copy(small, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(small["path"], dst)
    return dst


def _edit_tensors(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_sharded_checkpoint(small, tmp_path):
    small["hf"].save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    model, params = mmjax.load_pretrained(tmp_path)
    diffs = _max_diffs(small["ref"], _our_outputs(model, params, small["x_nhwc"]))
    assert all(d <= TOL for d in diffs.values()), diffs


def test_transformers5_in_memory_names_and_position_ids(small, tmp_path):
    """A state_dict saved without save_pretrained uses transformers 5's module names
    (layers.{i}.attention.q_proj, ...); a stray position_ids buffer is ignored."""
    state = {k: v.contiguous() for k, v in small["hf"].state_dict().items()}
    assert any(k.startswith("layers.0.attention.q_proj") for k in state)
    state["embeddings.position_ids"] = torch.arange(17)[None]
    shutil.copy(small["path"] / "config.json", tmp_path / "config.json")
    torch_save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model, params = mmjax.load_pretrained(tmp_path)
    diffs = _max_diffs(small["ref"], _our_outputs(model, params, small["x_nhwc"]))
    assert all(d <= TOL for d in diffs.values()), diffs


def test_bfloat16_checkpoint(small, tmp_path):
    hf16 = _build_hf("w32_gelu_pooler", seed=3).to(torch.bfloat16)
    hf16.save_pretrained(tmp_path)
    model, params = mmjax.load_pretrained(tmp_path)
    assert params["cls"].dtype == np.float32
    ref = _hf_outputs(hf16.float(), small["x_nchw"])  # the same bf16-rounded weights, in fp32
    diffs = _max_diffs(ref, _our_outputs(model, params, small["x_nhwc"]))
    assert all(d <= TOL for d in diffs.values()), diffs


# ------------------------------------------------------------------------------------------ errors
def test_missing_key(small, tmp_path):
    path = _copy(small, tmp_path)
    _edit_tensors(path, lambda t: t.pop("encoder.layer.1.attention.attention.key.weight"))
    with pytest.raises(KeyDiffError) as e:
        mmjax.load_pretrained(path)
    msg = str(e.value)
    assert "1 missing, 0 unexpected, 0 shape-mismatched" in msg
    assert "encoder/block_1/attn/key/kernel [32, 2, 16]" in msg
    assert "'encoder.layer.1.attention.attention.key.weight' [32, 32]" in msg


def test_unexpected_keys(small, tmp_path):
    path = _copy(small, tmp_path)

    def add(t):
        t["encoder.layer.0.attention.extra.weight"] = np.zeros((3,), np.float32)
        t["encoder.layer.5.layernorm_before.weight"] = np.ones((32,), np.float32)  # depth is 2
    _edit_tensors(path, add)
    with pytest.raises(KeyDiffError) as e:
        mmjax.load_pretrained(path)
    msg = str(e.value)
    assert "0 missing, 2 unexpected" in msg
    assert "encoder.layer.0.attention.extra.weight [3]  (no rule matches this key)" in msg
    assert "encoder.layer.5.layernorm_before.weight [32]" in msg and "encoder/block_5/norm1/scale" in msg


def test_wrong_shape(small, tmp_path):
    path = _copy(small, tmp_path)
    # A transposed fc1 has the right size: only a shape check (not a reshape) catches it.
    key = "encoder.layer.0.intermediate.dense.weight"
    _edit_tensors(path, lambda t: t.update({key: np.ascontiguousarray(t[key].T)}))
    with pytest.raises(KeyDiffError) as e:
        mmjax.load_pretrained(path)
    msg = str(e.value)
    assert "0 missing, 0 unexpected, 1 shape-mismatched" in msg
    assert ("encoder.layer.0.intermediate.dense.weight [32, 64]: expected [64, 32] for our "
            "encoder/block_0/mlp/fc1/kernel [32, 64]") in msg


def test_all_problems_in_one_error(small, tmp_path):
    path = _copy(small, tmp_path)

    def edit(t):
        t.pop("layernorm.bias")
        t["pooler.extra"] = np.zeros((2,), np.float32)
        t["embeddings.position_embeddings"] = np.zeros((1, 5, 32), np.float32)
    _edit_tensors(path, edit)
    with pytest.raises(KeyDiffError) as e:
        mmjax.load_pretrained(path)
    err = e.value
    assert len(err.missing) == 1 and "encoder/final_norm/bias" in err.missing[0]
    assert len(err.unexpected) == 1 and "pooler.extra" in err.unexpected[0]
    assert len(err.mismatched) == 1 and "embeddings.position_embeddings [1, 5, 32]" in err.mismatched[0]


def test_unknown_model_type(small, tmp_path):
    path = _copy(small, tmp_path)
    _edit_config(path, model_type="blip_2", architectures=["Blip2Model"])
    with pytest.raises(ConversionError, match=r"model_type 'blip_2' \(architectures: \['Blip2Model'\]\).*"
                                              r"Supported: vit \(ViTModel, ViTForImageClassification\)"):
        mmjax.load_pretrained(path)


def test_unsupported_architecture(small, tmp_path):
    path = _copy(small, tmp_path)
    _edit_config(path, architectures=["ViTForMaskedImageModeling"])
    with pytest.raises(ConversionError, match="ViTForMaskedImageModeling.*supported: ViTModel"):
        mmjax.load_pretrained(path)


def test_unknown_activation(small, tmp_path):
    path = _copy(small, tmp_path)
    _edit_config(path, hidden_act="gelu_10")
    with pytest.raises(ConversionError, match="hidden_act 'gelu_10'.*supported: .*gelu_new"):
        mmjax.load_pretrained(path)


def test_pickled_weights_refused(tmp_path, small):
    shutil.copy(small["path"] / "config.json", tmp_path / "config.json")
    # Never unpickled, so any bytes do: the file must be refused by name, not opened.
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin.*refuses pickled weights.*safetensors"):
        mmjax.load_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["random", "empty", "truncated"])
def test_invalid_safetensors_file_is_named(small, tmp_path, damage):
    """A model.safetensors that is not one (random bytes, empty, cut short): a ConversionError that
    names the file and says so, with safetensors' own reason, instead of a bare SafetensorError."""
    path = _copy(small, tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"random": np.random.default_rng(0).bytes(4096), "empty": b"",
                         "truncated": data[: len(data) // 2]}[damage])
    with pytest.raises(ConversionError) as info:
        mmjax.load_pretrained(path)
    msg = str(info.value)
    assert str(weights) in msg and "is not a valid safetensors file" in msg, msg
    assert "header" in msg  # safetensors' reason
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_config(small, tmp_path):
    shutil.copy(small["path"] / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no config\.json in .*found: model\.safetensors"):
        mmjax.load_pretrained(tmp_path)


def test_missing_weights_and_unknown_option(small, tmp_path):
    shutil.copy(small["path"] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        mmjax.load_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="scan_layer.*known: .*scan_layers"):
        mmjax.load_pretrained(small["path"], scan_layer=True)


def test_export_refuses_what_hf_cannot_hold(small):
    model, params = mmjax.load_pretrained(small["path"])
    gap = ViT(dataclasses.replace(model.cfg, pool="gap"))
    with pytest.raises(ConversionError, match="pool='gap'"):
        to_hf(gap, params)
    partial = {k: v for k, v in params.items() if k != "pre_logits"}
    with pytest.raises(KeyDiffError, match=r"(?s)2 missing.*not in the params.*pre_logits/kernel \[32, 32\]"):
        to_hf(model, partial)


# ---------------------------------------------------------------------------------- rule engine
def test_transforms_invert_each_other():
    rng = np.random.default_rng(0)
    for tf, ours_shape in ((Linear(1), (6, 2, 3)), (Linear(2), (2, 3, 6)), (CONV_OIHW, (4, 4, 3, 8)),
                           (RESHAPE, (2, 3))):
        src = rng.standard_normal(tf.source_shape(ours_shape)).astype(np.float32)
        ours = tf.to_ours(src, ours_shape)
        assert ours.shape == ours_shape
        np.testing.assert_array_equal(tf.to_source(ours), src)
    # torch Linear: y = x Wᵀ; ours: y = x·K with K [D, H, Dh].
    w = rng.standard_normal((6, 4)).astype(np.float32)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(np.einsum("bd,dhk->bhk", x, Linear(1).to_ours(w, (4, 2, 3))).reshape(5, 6),
                               x @ w.T, rtol=1e-6)


def test_zero_filled_params_and_scan_helpers():
    rules = [Rule("k", "l.{i}.w", "enc/block_{i}/w"), Rule("b", None, "enc/block_{i}/b")]
    expected = {f"enc/block_{i}/{n}": jax.ShapeDtypeStruct((2,), np.float32) for i in range(2) for n in "wb"}
    flat = import_tensors(rules, {"l.0.w": np.ones(2), "l.1.w": np.full(2, 2.0)}, expected, title="t")
    np.testing.assert_array_equal(flat["enc/block_1/b"], np.zeros(2))
    tree = {"enc": {"block_0": {"w": np.ones(2)}, "block_1": {"w": np.full(2, 2.0)}, "norm": np.ones(3)}}
    scanned = scan_tree(tree)
    assert scanned["enc"]["blocks"]["block"]["w"].shape == (2, 2)
    back = unscan_tree(scanned)
    np.testing.assert_array_equal(back["enc"]["block_1"]["w"], tree["enc"]["block_1"]["w"])


def test_from_hf_in_memory(small):
    """The same import without files: a config dict and {key: array}."""
    tensors = {k: v.numpy() for k, v in small["hf"].state_dict().items()}
    model, params = from_hf(small["hf"].config.to_dict(), tensors)
    diffs = _max_diffs(small["ref"], _our_outputs(model, params, small["x_nhwc"]))
    assert all(d <= TOL for d in diffs.values()), diffs
