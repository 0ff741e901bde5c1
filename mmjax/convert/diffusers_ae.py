"""diffusers `VQModel` / `AutoencoderKL` and taming-transformers VQGAN state dicts ↔ our `Autoencoder`
(mmjax/models/autoencoder.py).

All three are one network (taming wrote it; diffusers renamed it). Checkpoint keys, torch conv
weights [O, I, kh, kw] ↔ our HWIO kernels [kh, kw, I, O]:

    diffusers (diffusion_pytorch_model.safetensors)  → ours
      encoder.conv_in                                  → encoder/conv_in
      encoder.down_blocks.{i}.resnets.{j}.{norm1, conv1, norm2, conv2, conv_shortcut}
                                                       → encoder/down_{i}/block_{j}/{same names}
      encoder.down_blocks.{i}.attentions.{j}.{group_norm, to_q, to_k, to_v, to_out.0} (Linear [C, C])
                                                       → encoder/down_{i}/attn_{j}/{norm, query, key, value, out}
      encoder.down_blocks.{i}.downsamplers.0.conv      → encoder/down_{i}/downsample/conv
      encoder.mid_block.{resnets.0, attentions.0, resnets.1} → encoder/mid/{block_0, attn, block_1}
      encoder.conv_norm_out, encoder.conv_out          → encoder/norm_out, encoder/conv_out
      quant_conv, post_quant_conv                      → the same names
      quantize.embedding.weight [K, D]                 → quantizer/embedding
      decoder.up_blocks.{L-1-i}.* (lowest resolution first; upsamplers.0.conv) → decoder/up_{i}/* (upsample/conv)

    taming                                           → ours
      encoder.down.{i}.block.{j}.{norm1, conv1, norm2, conv2, nin_shortcut}
                                                       → encoder/down_{i}/block_{j}/{.., conv_shortcut}
      encoder.down.{i}.attn.{j}.{norm, q, k, v, proj_out} (1×1 convs)       → encoder/down_{i}/attn_{j}/{..}
      encoder.down.{i}.downsample.conv; {encoder,decoder}.mid.{block_1, attn_1, block_2} → mid/{block_0, attn, block_1}
      {encoder,decoder}.norm_out, conv_out; decoder.up.{i}.* (up[0] = highest resolution), upsample.conv
      quant_conv, post_quant_conv, quantize.embedding.weight

Older diffusers checkpoints (e.g. the first Stable Diffusion VAEs) name the attention projections
`query`, `key`, `value`, `proj_attn`; import reads both spellings, export writes the current one.

config.json is read strictly: every key diffusers writes for these classes is either mapped onto
`AutoencoderConfig`, refused with a ConversionError when its value is one we do not build, or listed
in `_HINTS` with the reason it does not change the network's function. Unknown keys are refused.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.convert.family import ExportPlan, Family, ImportPlan, LoadOptions
from mmjax.convert.rules import CONV_OIHW, DEFAULT_IGNORE, IDENTITY, ConversionError, Linear, Rule, Transform
from mmjax.models.autoencoder import Autoencoder, AutoencoderConfig
from mmjax.models.quantizer import QuantizerConfig

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"

DOWN_TYPES = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}  # type → has attention
UP_TYPES = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
DIFFUSERS_EPS = 1e-6  # diffusers hard-codes the GroupNorm eps of these models
DIFFUSERS_LOGVAR_CLAMP = (-30.0, 20.0)

# config.json keys that describe how pipelines use the model, not the function it computes.
_HINTS = {
    "_class_name": "the family", "_diffusers_version": "provenance", "_name_or_path": "provenance",
    "_use_default_values": "provenance",
    "force_upcast": "a hint to pipelines to run the VAE in float32; choose with load_pretrained(dtype=...)",
    "lookup_from_codebook": "what diffusers' decode(force_not_quantize=True) takes; ours: decode_indices",
}
_COMMON = {"in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
           "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor",
           "mid_block_add_attention"}
_KNOWN = {
    "VQModel": _COMMON | {"num_vq_embeddings", "vq_embed_dim", "norm_type"},
    "AutoencoderKL": _COMMON | {"shift_factor", "latents_mean", "latents_std", "use_quant_conv", "use_post_quant_conv"},
}
# diffusers' __init__ defaults, for keys a config.json leaves out (as diffusers does).
_DEFAULTS = {
    "VQModel": dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
                    up_block_types=["UpDecoderBlock2D"], block_out_channels=[64], layers_per_block=1, act_fn="silu",
                    latent_channels=3, sample_size=32, num_vq_embeddings=256, norm_num_groups=32, vq_embed_dim=None,
                    scaling_factor=0.18215, norm_type="group", mid_block_add_attention=True),
    "AutoencoderKL": dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
                          up_block_types=["UpDecoderBlock2D"], block_out_channels=[64], layers_per_block=1,
                          act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=0.18215,
                          shift_factor=None, latents_mean=None, latents_std=None, use_quant_conv=True,
                          use_post_quant_conv=True, mid_block_add_attention=True),
}


class Conv1x1AsDense(Transform):
    """taming's attention projections, 1×1 convs [O, I, 1, 1] ↔ our Dense kernel [I, O]."""

    def source_shape(self, shape):
        i, o = shape
        return (o, i, 1, 1)

    def to_ours(self, x, shape):
        return x[:, :, 0, 0].T

    def to_source(self, y):
        return y.T[:, :, None, None]


CONV1X1_AS_DENSE = Conv1x1AsDense()

_PARAMS = {
    "norm": (("weight", "scale", IDENTITY), ("bias", "bias", IDENTITY)),
    "conv": (("weight", "kernel", CONV_OIHW), ("bias", "bias", IDENTITY)),
    "linear": (("weight", "kernel", Linear(1)), ("bias", "bias", IDENTITY)),
    "conv1x1_dense": (("weight", "kernel", CONV1X1_AS_DENSE), ("bias", "bias", IDENTITY)),
}

# Sub-module names of one ResnetBlock and one AttnBlock: (ours, diffusers, taming).
_RESNET = (("norm1", "norm1", "norm1", "norm"), ("conv1", "conv1", "conv1", "conv"),
           ("norm2", "norm2", "norm2", "norm"), ("conv2", "conv2", "conv2", "conv"),
           ("conv_shortcut", "conv_shortcut", "nin_shortcut", "conv"))
_ATTN_NAMES = {  # layout → (norm, q, k, v, out), projection kind
    "diffusers": (("group_norm", "to_q", "to_k", "to_v", "to_out.0"), "linear"),
    "diffusers_old": (("group_norm", "query", "key", "value", "proj_attn"), "linear"),
    "taming": (("norm", "q", "k", "v", "proj_out"), "conv1x1_dense"),
}
_OUR_ATTN = ("norm", "query", "key", "value", "out")


def _module(source: str, ours: str, kind: str) -> list[Rule]:
    return [Rule(f"{ours}/{mine}".replace("/", "."), f"{source}.{theirs}", f"{ours}/{mine}", tf)
            for theirs, mine, tf in _PARAMS[kind]]


def _resnet(source: str, ours: str, layout: str) -> list[Rule]:
    col = 2 if layout == "taming" else 1
    return [r for names in _RESNET for r in _module(f"{source}.{names[col]}", f"{ours}/{names[0]}", names[3])]


def _attn(source: str, ours: str, layout: str) -> list[Rule]:
    names, proj = _ATTN_NAMES[layout]
    rules = _module(f"{source}.{names[0]}", f"{ours}/norm", "norm")
    for theirs, mine in zip(names[1:], _OUR_ATTN[1:]):
        rules += _module(f"{source}.{theirs}", f"{ours}/{mine}", proj)
    return rules


def _tower_rules(cfg: AutoencoderConfig, layout: str, attn_layout: str) -> list[Rule]:
    """Encoder, decoder and the 1×1 convs around the quantizer, for one naming layout."""
    taming = layout == "taming"
    rules = []
    for part in ("encoder", "decoder"):
        rules += _module(f"{part}.conv_in", f"{part}/conv_in", "conv")
        mid = f"{part}.mid" if taming else f"{part}.mid_block"
        rules += _resnet(f"{mid}.block_1" if taming else f"{mid}.resnets.0", f"{part}/mid/block_0", layout)
        rules += _attn(f"{mid}.attn_1" if taming else f"{mid}.attentions.0", f"{part}/mid/attn", attn_layout)
        rules += _resnet(f"{mid}.block_2" if taming else f"{mid}.resnets.1", f"{part}/mid/block_1", layout)
        rules += _module(f"{part}.norm_out" if taming else f"{part}.conv_norm_out", f"{part}/norm_out", "norm")
        rules += _module(f"{part}.conv_out", f"{part}/conv_out", "conv")
    # Encoder levels: the same index on both sides.
    down = "encoder.down.{i}" if taming else "encoder.down_blocks.{i}"
    rules += _resnet(f"{down}.block.{{j}}" if taming else f"{down}.resnets.{{j}}", "encoder/down_{i}/block_{j}",
                     layout)
    rules += _attn(f"{down}.attn.{{j}}" if taming else f"{down}.attentions.{{j}}", "encoder/down_{i}/attn_{j}",
                   attn_layout)
    rules += _module(f"{down}.downsample.conv" if taming else f"{down}.downsamplers.0.conv",
                     "encoder/down_{i}/downsample/conv", "conv")
    # Decoder levels: taming's up[i] is our up_i; diffusers lists them from the lowest resolution.
    for i in range(cfg.num_levels):
        up = f"decoder.up.{i}" if taming else f"decoder.up_blocks.{cfg.num_levels - 1 - i}"
        rules += _resnet(f"{up}.block.{{j}}" if taming else f"{up}.resnets.{{j}}", f"decoder/up_{i}/block_{{j}}",
                         layout)
        rules += _attn(f"{up}.attn.{{j}}" if taming else f"{up}.attentions.{{j}}", f"decoder/up_{i}/attn_{{j}}",
                       attn_layout)
        rules += _module(f"{up}.upsample.conv" if taming else f"{up}.upsamplers.0.conv",
                         f"decoder/up_{i}/upsample/conv", "conv")
    rules += _module("quant_conv", "quant_conv", "conv") + _module("post_quant_conv", "post_quant_conv", "conv")
    if cfg.kind == "vq":
        rules.append(Rule("quantizer.embedding", "quantize.embedding.weight", "quantizer/embedding"))
    return rules


def diffusers_rules(cfg: AutoencoderConfig) -> tuple[Rule, ...]:
    """Rules for a diffusers VQModel / AutoencoderKL with this config. The old attention names come
    after the current ones: import accepts either, export writes the current names."""
    return tuple(_tower_rules(cfg, "diffusers", "diffusers") + _tower_rules(cfg, "diffusers", "diffusers_old"))


def taming_rules(cfg: AutoencoderConfig) -> tuple[Rule, ...]:
    """Rules for a taming-transformers VQModel (kind="vq") or a latent-diffusion AutoencoderKL (kind="kl",
    the same names) state dict."""
    return tuple(_tower_rules(cfg, "taming", "taming"))


# --------------------------------------------------------------------------------------- configs
def _options_check(options: LoadOptions) -> None:
    if options.scan_layers:
        raise ConversionError("load_pretrained(scan_layers=True): the Autoencoder has no layer stack to scan")
    if options.remat != "none":
        raise ConversionError(f"load_pretrained(remat={options.remat!r}): the Autoencoder has no remat option")


def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(f"config.json {name}={list(value)}: only square sizes convert")
        value = value[0]
    return int(value)


def config_from_diffusers(hf: Mapping, class_name: str, options: LoadOptions | None = None) -> AutoencoderConfig:
    """A diffusers VQModel / AutoencoderKL config.json → AutoencoderConfig, or a ConversionError naming
    the field we do not build."""
    options = options or LoadOptions()
    unknown = sorted(set(hf) - _KNOWN[class_name] - set(_HINTS))
    if unknown:
        raise ConversionError(f"config.json of a diffusers {class_name} has key(s) {unknown} that mmjax's "
                              f"Autoencoder does not model; known: {sorted(_KNOWN[class_name])}")
    get = lambda k: hf[k] if k in hf and (hf[k] is not None or _DEFAULTS[class_name][k] is None) \
        else _DEFAULTS[class_name][k]
    widths = [int(w) for w in get("block_out_channels")]
    levels = len(widths)
    if any(w % widths[0] for w in widths):
        raise ConversionError(f"config.json block_out_channels={widths}: every width must be a multiple of the "
                              "first (mmjax's channel_mults are integers)")
    down, up = list(get("down_block_types")), list(get("up_block_types"))
    if len(down) != levels or len(up) != levels:
        raise ConversionError(f"config.json down_block_types ({len(down)}) and up_block_types ({len(up)}) must "
                              f"have one entry per block_out_channels ({levels})")
    for field, types, allowed in (("down_block_types", down, DOWN_TYPES), ("up_block_types", up, UP_TYPES)):
        bad = [t for t in types if t not in allowed]
        if bad:
            raise ConversionError(f"config.json {field} {bad}: mmjax's Autoencoder builds only "
                                  f"{', '.join(allowed)}")
    enc_attn = tuple(i for i, t in enumerate(down) if DOWN_TYPES[t])
    dec_attn = tuple(sorted(levels - 1 - j for j, t in enumerate(up) if UP_TYPES[t]))
    if enc_attn != dec_attn:
        raise ConversionError(f"config.json down_block_types {down} and up_block_types {up} put attention at "
                              f"different resolutions (encoder levels {enc_attn}, decoder levels {dec_attn}); "
                              "mmjax's attn_levels applies to both")
    if get("act_fn") not in ("silu", "swish"):
        raise ConversionError(f"config.json act_fn={get('act_fn')!r}: the Autoencoder uses silu/swish only")
    vq = class_name == "VQModel"
    if vq and get("norm_type") != "group":
        raise ConversionError(f"config.json norm_type={get('norm_type')!r}: only 'group' is built (the "
                              "'spatial' decoder norms of MoVQ are not)")
    if not vq:
        for field in ("use_quant_conv", "use_post_quant_conv"):
            if not get(field):
                raise ConversionError(f"config.json {field}=False: mmjax's Autoencoder always has this 1×1 conv")
        for field in ("latents_mean", "latents_std"):
            if get(field) is not None:
                raise ConversionError(f"config.json {field} is set: per-channel latent statistics are not kept "
                                      "by mmjax's AutoencoderConfig (only scaling_factor and shift_factor)")
    latent = int(get("latent_channels"))
    quantizer = QuantizerConfig()
    if vq:
        # diffusers' VQModel: beta 0.25, legacy loss, plain (not l2-normalised) codes.
        quantizer = QuantizerConfig(codebook_size=int(get("num_vq_embeddings")),
                                    code_dim=int(get("vq_embed_dim") or latent), l2_normalize=False, beta=0.25,
                                    legacy=True)
    shift = None if vq else get("shift_factor")
    try:
        return AutoencoderConfig(
            kind="vq" if vq else "kl", in_channels=int(get("in_channels")), out_channels=int(get("out_channels")),
            channels=widths[0], channel_mults=tuple(w // widths[0] for w in widths),
            blocks_per_level=int(get("layers_per_block")), attn_levels=enc_attn,
            mid_attention=bool(get("mid_block_add_attention")), latent_channels=latent,
            norm_groups=int(get("norm_num_groups")), norm_eps=DIFFUSERS_EPS, logvar_clamp=DIFFUSERS_LOGVAR_CLAMP,
            quantizer=quantizer, scaling_factor=float(get("scaling_factor")),
            shift_factor=None if shift is None else float(shift),
            image_size=_square(get("sample_size"), "sample_size"), dtype=options.dtype,
            param_dtype=options.param_dtype)
    except ValueError as e:
        raise ConversionError(f"config.json of a diffusers {class_name} gives an invalid config: {e}") from None


def config_to_diffusers(cfg: AutoencoderConfig) -> dict:
    """AutoencoderConfig → a diffusers config.json dict, or a ConversionError listing what diffusers'
    classes cannot express. Training-only settings (β, legacy, EMA, restarts) are not part of it."""
    vq = cfg.kind == "vq"
    problems = [msg for bad, msg in (
        (cfg.channel_mults[0] != 1, f"channel_mults[0]={cfg.channel_mults[0]} (diffusers' conv_in outputs the "
                                    "first level's width)"),
        (cfg.norm_eps != DIFFUSERS_EPS, f"norm_eps={cfg.norm_eps} (diffusers uses {DIFFUSERS_EPS})"),
        (vq and cfg.quantizer.l2_normalize, "quantizer.l2_normalize=True (diffusers' VectorQuantizer compares "
                                            "raw codes)"),
        (not vq and tuple(cfg.logvar_clamp) != DIFFUSERS_LOGVAR_CLAMP,
         f"logvar_clamp={cfg.logvar_clamp} (diffusers clamps to {DIFFUSERS_LOGVAR_CLAMP})"),
        (vq and cfg.shift_factor is not None, "shift_factor (VQModel has none)"),
        (cfg.encoder != "conv", f"encoder={cfg.encoder!r} (diffusers has taming's convolutional encoder only)"),
    ) if bad]
    if problems:
        raise ConversionError("this Autoencoder cannot be written as a diffusers "
                              f"{'VQModel' if vq else 'AutoencoderKL'}: " + "; ".join(problems))
    levels = cfg.num_levels
    out = {
        "_class_name": "VQModel" if vq else "AutoencoderKL",
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": list(cfg.level_channels), "layers_per_block": cfg.blocks_per_level,
        "down_block_types": ["AttnDownEncoderBlock2D" if i in cfg.attn_levels else "DownEncoderBlock2D"
                             for i in range(levels)],
        "up_block_types": ["AttnUpDecoderBlock2D" if levels - 1 - j in cfg.attn_levels else "UpDecoderBlock2D"
                           for j in range(levels)],
        "act_fn": "silu", "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.norm_groups,
        "sample_size": cfg.image_size, "scaling_factor": cfg.scaling_factor,
        "mid_block_add_attention": cfg.mid_attention,
    }
    if vq:
        out.update(num_vq_embeddings=cfg.quantizer.codebook_size, vq_embed_dim=cfg.quantizer.code_dim,
                   norm_type="group", lookup_from_codebook=False, force_upcast=False)
    else:
        out.update(shift_factor=cfg.shift_factor, latents_mean=None, latents_std=None, use_quant_conv=True,
                   use_post_quant_conv=True, force_upcast=True)
    return out


def example_images(cfg: AutoencoderConfig) -> tuple[jax.ShapeDtypeStruct]:
    """The smallest image the network takes (the params do not depend on the image size)."""
    s = cfg.downsample_factor
    return (jax.ShapeDtypeStruct((1, s, s, cfg.in_channels), jnp.float32),)


class _DiffusersAutoencoder(Family):
    model_class = Autoencoder
    weights_file = DIFFUSERS_WEIGHTS
    index_file = DIFFUSERS_INDEX

    def plan_import(self, hf: dict, keys: Collection[str], options: LoadOptions) -> ImportPlan:
        _options_check(options)
        class_name = self.class_names[0]
        cfg = config_from_diffusers(hf, class_name, options)
        return ImportPlan(Autoencoder(cfg), diffusers_rules(cfg), example_images(cfg), f"diffusers {class_name}",
                          DEFAULT_IGNORE)

    def plan_export(self, model: Autoencoder, params: dict) -> ExportPlan:
        # One model class serves both families: the config's kind picks the diffusers class.
        cfg = model.config
        hf = config_to_diffusers(cfg)
        return ExportPlan(hf, diffusers_rules(cfg), example_images(cfg), f"diffusers {hf['_class_name']}")


class DiffusersVQ(_DiffusersAutoencoder):
    name = "diffusers_vq"
    class_names = ("VQModel",)


class DiffusersKL(_DiffusersAutoencoder):
    name = "diffusers_kl"
    class_names = ("AutoencoderKL",)


VQ_FAMILY, KL_FAMILY = DiffusersVQ(), DiffusersKL()


# ------------------------------------------------------------------------------------------ taming
TAMING_IGNORE = DEFAULT_IGNORE + (r"^loss\.",)  # taming's Lightning checkpoints carry LPIPS + discriminator


def load_taming_state_dict(tensors: str | os.PathLike | Mapping[str, np.ndarray], config: AutoencoderConfig, *,
                           ignore: tuple[str, ...] = TAMING_IGNORE) -> tuple[Autoencoder, dict]:
    """A taming-transformers VQModel (or latent-diffusion AutoencoderKL) state dict → (Autoencoder, params).

    tensors: a .safetensors file or {key: numpy array}. mmjax never unpickles: convert a taming .ckpt
      once where you trust it, e.g. `safetensors.torch.save_file(torch.load(f, weights_only=True)
      ["state_dict"], "vqgan.safetensors")`.
    config: the architecture (taming's yaml: ch → channels, ch_mult → channel_mults, num_res_blocks →
      blocks_per_level, attn_resolutions → attn_levels (level i has resolution image_size/2^i),
      z_channels → latent_channels, embed_dim → quantizer.code_dim, n_embed → quantizer.codebook_size);
      the state dict cannot say it all (e.g. where attention sits is only visible in the keys).
    ignore: regexes of keys to skip; by default the `loss.*` tensors (LPIPS and discriminator) that
      taming's training checkpoints keep beside the autoencoder.
    Raises KeyDiffError listing every missing, unexpected and shape-mismatched tensor.
    """
    from mmjax.convert.core import _expected_params
    from mmjax.convert.rules import import_tensors
    from mmjax.convert.tree import flatten, unflatten

    if isinstance(tensors, Mapping):
        raw, source = dict(tensors), "taming state dict"
    else:
        if not str(tensors).endswith(".safetensors"):
            raise ConversionError(f"{tensors}: expected a .safetensors file (mmjax never unpickles weights)")
        from safetensors.numpy import load_file
        raw, source = load_file(str(tensors)), str(tensors)
    model = Autoencoder(config)
    expected = flatten(_expected_params(model, example_images(config)))
    flat = import_tensors(list(taming_rules(config)), raw, expected, ignore=ignore,
                          title=f"{source} (taming {'VQModel' if config.kind == 'vq' else 'AutoencoderKL'}) "
                                "does not fit our Autoencoder")
    return model, jax.tree.map(jnp.asarray, unflatten(flat))


def to_taming_state_dict(model: Autoencoder, params) -> dict[str, np.ndarray]:
    """Our params → taming key names (1×1-conv attention projections), {key: numpy array}."""
    from mmjax.convert.rules import export_tensors
    from mmjax.convert.tree import flatten, plain_params
    flat = flatten(jax.tree.map(np.asarray, plain_params(params)))
    return export_tensors(list(taming_rules(model.config)), flat, title="cannot write a taming state dict")
