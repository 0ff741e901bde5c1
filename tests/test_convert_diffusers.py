"""Weight conversion: diffusers VQModel / AutoencoderKL and taming VQGAN state dicts ↔ mmjax's
Autoencoder, checked against diffusers' own PyTorch forward (fp32) on tiny random models.

Every parameter is redrawn at random before saving (diffusers' init leaves biases at 0 and norms
at 1, which would hide a mis-mapped bias or norm).
"""

from __future__ import annotations

import functools
import json
import re
import shutil

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, VQModel
from safetensors.numpy import load_file, save_file

import mmjax
from mmjax.convert import ConversionError, KeyDiffError, from_hf, save_pretrained
from mmjax.convert.diffusers_ae import DIFFUSERS_WEIGHTS, load_taming_state_dict, to_taming_state_dict
from mmjax.models.autoencoder import Autoencoder

TOL = 1e-4

CASES = {
    # 2 levels, attention at the lower resolution (Attn*Block2D), a conv_shortcut, mid attention,
    # a codebook dimension (3) different from the latent channels (4).
    "vq": (VQModel, dict(block_out_channels=(32, 64), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                         up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
                         vq_embed_dim=3, num_vq_embeddings=16, norm_num_groups=32, sample_size=16,
                         scaling_factor=0.5)),
    # 2 levels, 2 blocks per level, 16 groups, mid attention, a shift factor.
    "kl": (AutoencoderKL, dict(block_out_channels=(32, 64), layers_per_block=2,
                               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                               latent_channels=4, norm_num_groups=16, sample_size=16, scaling_factor=0.7,
                               shift_factor=0.1)),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = "norm" in name and name.endswith("weight")
            p.copy_((1.0 if norm else 0.0) + (0.3 if "embedding" in name else 0.1) * torch.randn(p.shape, generator=g))


def _build(name: str, seed: int = 0):
    cls, kw = CASES[name]
    torch.manual_seed(seed)
    model = cls(**kw)
    _randomize(model, seed)
    return model.eval()


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(model: Autoencoder, variables, x, rng):
    # As in tests/test_autoencoder.py, whose fixtures have these configs: one compile for both files.
    return model.apply(variables, x, sample_rng=rng)


def _reference(ref, x: np.ndarray) -> dict[str, np.ndarray]:
    """diffusers' outputs on NCHW images."""
    t = torch.from_numpy(x)
    with torch.no_grad():
        if isinstance(ref, VQModel):
            z = ref.encode(t).latents
            z_q, loss, (_, _, idx) = ref.quantize(z)
            return dict(z=z.numpy(), z_q=z_q.numpy(), indices=idx.numpy().reshape(x.shape[0], *z.shape[2:]),
                        quant_loss=loss.numpy(), recon=ref.decode(z_q, force_not_quantize=True).sample.numpy(),
                        forward=ref(t).sample.numpy())
        dist = ref.encode(t).latent_dist
        return dict(mean=dist.mean.numpy(), logvar=dist.logvar.numpy(), kl=dist.kl().numpy(),
                    recon=ref.decode(dist.mean).sample.numpy())


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    name = request.param
    ref = _build(name)
    path = tmp_path_factory.mktemp(name)
    ref.save_pretrained(path)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    model, params = mmjax.load_pretrained(path)
    out, aux = _forward(model, {"params": params}, x.transpose(0, 2, 3, 1), None)
    return dict(name=name, ref=ref, path=path, x=x, expected=_reference(ref, x), model=model, params=params,
                out=out, aux=aux)


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ------------------------------------------------------------------------------------------ parity
def test_parity(case):
    e, aux, cfg = case["expected"], case["aux"], case["model"].config
    if case["name"] == "vq":
        diffs = {"z": _max_abs(nchw(aux["z"]), e["z"]), "z_q": _max_abs(nchw(aux["z_q"]), e["z_q"]),
                 "recon": _max_abs(nchw(case["out"]), e["recon"]),
                 "quant_loss": _max_abs(aux["quant_loss"], e["quant_loss"])}
        np.testing.assert_array_equal(np.asarray(aux["indices"]), e["indices"])
        # diffusers' forward (decode quantizes by default) is the same thing.
        assert _max_abs(e["forward"], e["recon"]) < 1e-6
        q = cfg.quantizer
        assert (q.codebook_size, q.code_dim, q.l2_normalize, q.legacy, q.beta) == (16, 3, False, True, 0.25)
        assert cfg.attn_levels == (1,) and cfg.latent_channels == 4
    else:
        diffs = {"mean": _max_abs(nchw(aux["mean"]), e["mean"]), "logvar": _max_abs(nchw(aux["logvar"]), e["logvar"]),
                 "recon": _max_abs(nchw(case["out"]), e["recon"])}
        np.testing.assert_allclose(np.asarray(aux["kl"]), e["kl"], rtol=1e-4)
        assert cfg.attn_levels == () and cfg.blocks_per_level == 2 and cfg.shift_factor == 0.1
    print(f"\n{case['name']}: max |ours - diffusers| = {diffs}")
    assert all(d <= TOL for d in diffs.values()), diffs
    assert cfg.channels == 32 and cfg.channel_mults == (1, 2) and cfg.mid_attention
    assert cfg.scaling_factor == case["ref"].config.scaling_factor and cfg.image_size == 16


def test_export_round_trip(case, tmp_path):
    """ours → save_pretrained → diffusers from_pretrained: no missing/unexpected keys, the same tensors."""
    save_pretrained(case["model"], case["params"], tmp_path)
    assert (tmp_path / DIFFUSERS_WEIGHTS).is_file()
    ref = case["ref"]
    back, info = type(ref).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    original, reloaded = ref.state_dict(), back.state_dict()
    assert set(original) == set(reloaded)
    for k in original:
        torch.testing.assert_close(reloaded[k], original[k], rtol=0, atol=0, msg=k)
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "latent_channels",
                "norm_num_groups", "scaling_factor", "sample_size", "mid_block_add_attention"):
        norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v
        assert norm(back.config[key]) == norm(ref.config[key]), key
    x = torch.from_numpy(case["x"])
    with torch.no_grad():
        if isinstance(ref, VQModel):
            same = torch.equal(back(x).sample, ref(x).sample)
        else:
            same = torch.equal(back.encode(x).latent_dist.mean, ref.encode(x).latent_dist.mean)
    assert same
    model2, params2 = mmjax.load_pretrained(tmp_path)
    assert model2.config == case["model"].config
    for a, b in zip(jax.tree.leaves(case["params"]), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------- file layouts
@pytest.fixture(scope="module")
def vq_files(tmp_path_factory):
    ref = _build("vq", seed=3)
    path = tmp_path_factory.mktemp("vq_files")
    ref.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    tensors = load_file(str(path / DIFFUSERS_WEIGHTS))
    model, params = mmjax.load_pretrained(path)
    return dict(ref=ref, path=path, config=config, tensors=tensors, model=model, params=params)


def _same_params(a, b):
    fa, fb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))


def test_sharded_checkpoint_and_old_attention_names(vq_files, tmp_path):
    vq_files["ref"].save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    _, params = mmjax.load_pretrained(tmp_path)
    _same_params(params, vq_files["params"])
    # The first Stable Diffusion VAEs were saved with query/key/value/proj_attn.
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {re.sub(r"\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f".{old_names[m[1]]}.", k): v
               for k, v in vq_files["tensors"].items()}
    assert any(".proj_attn." in k for k in renamed)
    _, params = from_hf(vq_files["config"], renamed)
    _same_params(params, vq_files["params"])


def test_key_diff_lists_every_problem(vq_files):
    tensors = dict(vq_files["tensors"])
    tensors.pop("decoder.up_blocks.1.resnets.0.conv_shortcut.weight")
    tensors["encoder.conv_out.weight"] = np.zeros((4, 64, 1, 1), np.float32)
    tensors["decoder.up_blocks.0.resnets.5.norm1.weight"] = np.ones(64, np.float32)
    with pytest.raises(KeyDiffError) as info:
        from_hf(vq_files["config"], tensors)
    err = info.value
    assert "1 missing, 1 unexpected, 1 shape-mismatched" in str(err)
    assert "decoder/up_0/block_0/conv_shortcut/kernel [1, 1, 64, 32]" in err.missing[0]
    assert "'decoder.up_blocks.1.resnets.0.conv_shortcut.weight' [32, 64, 1, 1]" in err.missing[0]
    assert "encoder.conv_out.weight [4, 64, 1, 1]: expected [4, 64, 3, 3]" in err.mismatched[0]
    assert "decoder.up_blocks.0.resnets.5.norm1.weight" in err.unexpected[0]
    assert "decoder/up_1/block_5/norm1/scale" in err.unexpected[0]


@pytest.mark.parametrize("changes, message", [
    ({"norm_type": "spatial"}, "norm_type='spatial'"),
    ({"act_fn": "gelu"}, "act_fn='gelu'"),
    ({"down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"]},
     r"attention at different resolutions \(encoder levels \(\), decoder levels \(1,\)\)"),
    ({"up_block_types": ["CrossAttnUpBlock2D", "UpDecoderBlock2D"]}, r"up_block_types \['CrossAttnUpBlock2D'\]"),
    ({"block_out_channels": [32, 48]}, r"block_out_channels=\[32, 48\]: every width must be a multiple"),
    ({"use_some_new_option": True}, r"key\(s\) \['use_some_new_option'\]"),
    ({"_class_name": "AutoencoderTiny"}, r"_class_name 'AutoencoderTiny' is not supported.*diffusers VQModel"),
])
def test_config_refused_by_name(vq_files, changes, message):
    with pytest.raises(ConversionError, match=message):
        from_hf({**vq_files["config"], **changes}, vq_files["tensors"])


def test_kl_config_refusals_and_options(vq_files):
    base = {**CASES["kl"][1], "_class_name": "AutoencoderKL"}
    base = {k: list(v) if isinstance(v, tuple) else v for k, v in base.items()}
    for changes, message in (({"use_quant_conv": False}, "use_quant_conv=False"),
                             ({"latents_mean": [0.0] * 4}, "latents_mean is set")):
        with pytest.raises(ConversionError, match=message):
            from_hf({**base, **changes}, {})
    with pytest.raises(ConversionError, match="scan_layers=True"):
        from_hf(vq_files["config"], vq_files["tensors"], scan_layers=True)


def test_pickled_weights_refused(vq_files, tmp_path):
    shutil.copy(vq_files["path"] / "config.json", tmp_path / "config.json")
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(ConversionError, match=r"diffusion_pytorch_model\.bin.*refuses pickled weights"):
        mmjax.load_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------ taming
_TAMING_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def diffusers_to_taming(tensors: dict[str, np.ndarray], levels: int) -> dict[str, np.ndarray]:
    """An independent re-keying diffusers → taming (written from the two code bases' module names)."""
    out = {}
    for key, x in tensors.items():
        k = key
        k = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
        k = k.replace("mid_block.attentions.0", "mid.attn_1")
        k = re.sub(r"^encoder\.down_blocks\.(\d+)", r"encoder.down.\1", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)", lambda m: f"decoder.up.{levels - 1 - int(m[1])}", k)
        k = re.sub(r"\.resnets\.(\d+)\.", r".block.\1.", k)
        k = k.replace(".conv_shortcut.", ".nin_shortcut.")
        k = k.replace(".downsamplers.0.conv.", ".downsample.conv.").replace(".upsamplers.0.conv.", ".upsample.conv.")
        k = k.replace("conv_norm_out", "norm_out")
        m = re.match(r"^(.*)\.attentions\.(\d+)\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", k) or \
            re.match(r"^(.*\.attn_1)\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", k)
        if m and ".attentions." in k:
            k = f"{m[1]}.attn.{m[2]}.{_TAMING_ATTN[m[3]]}.{m[4]}"
        elif m:
            k = f"{m[1]}.{_TAMING_ATTN[m[2]]}.{m[3]}"
        if re.search(r"\.(q|k|v|proj_out)\.weight$", k):
            x = x[:, :, None, None]  # taming's attention projections are 1×1 convs
        out[k] = x
    return out


def test_taming_state_dict(vq_files, tmp_path):
    model = vq_files["model"]
    taming = diffusers_to_taming(vq_files["tensors"], model.config.num_levels)
    assert "encoder.down.1.attn.0.proj_out.weight" in taming and "decoder.up.0.block.0.nin_shortcut.weight" in taming
    assert taming["decoder.up.1.attn.1.q.weight"].shape == (64, 64, 1, 1)
    taming["loss.discriminator.main.0.weight"] = np.zeros((8, 3, 4, 4), np.float32)  # ignored by default
    save_file(taming, str(tmp_path / "vqgan.safetensors"))
    loaded_model, params = load_taming_state_dict(tmp_path / "vqgan.safetensors", model.config)
    _same_params(params, vq_files["params"])
    # Outputs match diffusers' (the params are those the parity test checks; run once more anyway).
    x = np.random.default_rng(5).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    out, aux = _forward(loaded_model, {"params": params}, x.transpose(0, 2, 3, 1), None)
    ref = vq_files["ref"]
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).sample.numpy()
        idx = ref.quantize(ref.encode(torch.from_numpy(x)).latents)[2][2].numpy()
    assert _max_abs(nchw(out), expected) <= TOL
    np.testing.assert_array_equal(np.asarray(aux["indices"]).reshape(-1), idx.reshape(-1))
    # Export to taming names gives the same dict back (without the ignored loss tensors).
    back = to_taming_state_dict(loaded_model, params)
    taming.pop("loss.discriminator.main.0.weight")
    assert set(back) == set(taming)
    for k in taming:
        np.testing.assert_array_equal(back[k], taming[k], err_msg=k)
    taming.pop("encoder.mid.attn_1.q.bias")
    with pytest.raises(KeyDiffError, match=r"encoder/mid/attn/query/bias \[64\]  <- expected checkpoint key "
                                           r"'encoder.mid.attn_1.q.bias'"):
        load_taming_state_dict(taming, model.config)
