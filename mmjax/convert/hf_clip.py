"""HF transformers `CLIPModel` / `SiglipModel` and OpenAI/open_clip state dicts ↔ our `CLIP`
(mmjax/models/clip.py).

    CLIP   vision: conv P×P (no bias) → [CLS] + positions → pre_layrnorm → blocks → post_layernorm
                   → CLS → visual_projection (no bias)                       = get_image_features
           text:   tokens + positions → causal blocks → final_layer_norm
                   → pooled at argmax(ids) (legacy eos_token_id == 2) or the first eos_token_id
                   → text_projection (no bias)                               = get_text_features
    SigLIP vision: conv P×P (bias) + positions → blocks → post_layernorm (all tokens)
                   → MAP head (probe, fused in_proj q;k;v, out_proj, layernorm, mlp) = image features
           text:   full attention; pooled = last token → head (Linear with bias)
           logits: exp(logit_scale) · cos + logit_bias

HF applies post_layernorm to the pooled CLS only; ours final-norms all tokens then pools: the same
pooled vector. Checkpoint keys (relative to "vision_model." / "text_model."; ours under "vision/",
"text/"):

    embeddings.patch_embedding [D,C,P,P]          → vision/embedding/kernel [P,P,C,D] (+ bias SigLIP)
    embeddings.class_embedding [D]                → vision/cls [1,1,D]
    embeddings.position_embedding.weight [T,D]    → */posemb/pos_embedding [1,T,D]
    pre_layrnorm (sic)                            → vision/pre_norm
    encoder.layers.{i}.self_attn.{q,k,v}_proj     → */encoder/block_{i}/attn/{query,key,value}
    encoder.layers.{i}.self_attn.out_proj         → */encoder/block_{i}/attn/out
    encoder.layers.{i}.layer_norm{1,2}, mlp.fc{1,2} → norm1/norm2, mlp/fc1, mlp/fc2
    post_layernorm / final_layer_norm             → */encoder/final_norm
    vision_model.head.* (SigLIP)                  → vision/map_head/*
    embeddings.token_embedding.weight             → text/token_embedding
    visual_projection / text_projection / text_model.head → vision_proj / text_proj
    logit_scale ([] CLIP, [1] SigLIP), logit_bias [1] → logit_scale, logit_bias

Fused attention inputs (SigLIP's MAP head, open_clip's `in_proj_weight` rows q;k;v) are split into
q/k/v tensors before the rules run (`Family.prepare_tensors`) and fused again on export.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.convert.family import ExportPlan, Family, ImportPlan, LoadOptions
from mmjax.convert.hf_vit import ACTIVATIONS_FROM_HF, ACTIVATIONS_TO_HF, _square
from mmjax.convert.rules import (
    CONV_OIHW,
    DEFAULT_IGNORE,
    IDENTITY,
    RESHAPE,
    ConversionError,
    Linear,
    Rule,
    Transform,
    import_tensors,
)
from mmjax.convert.tree import flatten, is_scanned, plain_params, scan_tree, unflatten, unscan_tree
from mmjax.layers.transformer import TransformerConfig
from mmjax.models.clip import CLIP, CLIPConfig
from mmjax.models.text import TextConfig
from mmjax.models.vit import ViTConfig


class Unsqueeze0(Transform):
    """A table [T, D] in the checkpoint ↔ ours [1, T, D] (position embeddings)."""

    def source_shape(self, shape):
        return tuple(shape[1:])

    def to_ours(self, x, shape):
        return x.reshape(shape)

    def to_source(self, y):
        return y.reshape(y.shape[1:])


UNSQUEEZE0 = Unsqueeze0()

_PARAMS = {
    "norm": (("weight", "scale", IDENTITY), ("bias", "bias", IDENTITY)),
    "dense": (("weight", "kernel", Linear(1)), ("bias", "bias", IDENTITY)),
    "dense_nobias": (("weight", "kernel", Linear(1)),),
    "heads_in": (("weight", "kernel", Linear(1)), ("bias", "bias", RESHAPE)),
    "heads_out": (("weight", "kernel", Linear(2)), ("bias", "bias", IDENTITY)),
    "conv": (("weight", "kernel", CONV_OIHW), ("bias", "bias", IDENTITY)),
    "conv_nobias": (("weight", "kernel", CONV_OIHW),),
}


def _module(source: str, ours: str, kind: str) -> list[Rule]:
    return [Rule(f"{ours}/{mine}".replace("/", "."), f"{source}.{theirs}", f"{ours}/{mine}", tf)
            for theirs, mine, tf in _PARAMS[kind]]


def _attention(source: str, ours: str, q="q_proj", k="k_proj", v="v_proj", o="out_proj") -> list[Rule]:
    return (_module(f"{source}.{q}", f"{ours}/query", "heads_in")
            + _module(f"{source}.{k}", f"{ours}/key", "heads_in")
            + _module(f"{source}.{v}", f"{ours}/value", "heads_in")
            + _module(f"{source}.{o}", f"{ours}/out", "heads_out"))


def _hf_encoder(source: str, ours: str) -> list[Rule]:
    blk, mine = f"{source}.encoder.layers.{{i}}", f"{ours}/encoder/block_{{i}}"
    return (_module(f"{blk}.layer_norm1", f"{mine}/norm1", "norm") + _attention(f"{blk}.self_attn", f"{mine}/attn")
            + _module(f"{blk}.layer_norm2", f"{mine}/norm2", "norm")
            + _module(f"{blk}.mlp.fc1", f"{mine}/mlp/fc1", "dense")
            + _module(f"{blk}.mlp.fc2", f"{mine}/mlp/fc2", "dense"))


def hf_rules(siglip: bool) -> tuple[Rule, ...]:
    """Rules for HF CLIPModel (siglip=False) or SiglipModel (True), in the split-q/k/v key space."""
    v, t = "vision_model", "text_model"
    rules = [Rule("vision.posemb", f"{v}.embeddings.position_embedding.weight", "vision/posemb/pos_embedding",
                  UNSQUEEZE0),
             Rule("text.posemb", f"{t}.embeddings.position_embedding.weight", "text/posemb/pos_embedding",
                  UNSQUEEZE0),
             Rule("text.token_embedding", f"{t}.embeddings.token_embedding.weight", "text/token_embedding")]
    rules += _module(f"{v}.embeddings.patch_embedding", "vision/embedding", "conv" if siglip else "conv_nobias")
    rules += _hf_encoder(v, "vision") + _hf_encoder(t, "text")
    rules += _module(f"{v}.post_layernorm", "vision/encoder/final_norm", "norm")
    rules += _module(f"{t}.final_layer_norm", "text/encoder/final_norm", "norm")
    if siglip:
        h = f"{v}.head"
        rules += [Rule("vision.map_head.probe", f"{h}.probe", "vision/map_head/probe")]
        rules += _attention(f"{h}.attention", "vision/map_head/attn")
        rules += _module(f"{h}.layernorm", "vision/map_head/norm", "norm")
        rules += _module(f"{h}.mlp.fc1", "vision/map_head/mlp/fc1", "dense")
        rules += _module(f"{h}.mlp.fc2", "vision/map_head/mlp/fc2", "dense")
        rules += _module(f"{t}.head", "text_proj", "dense")
        rules += [Rule("logit_scale", "logit_scale", "logit_scale", RESHAPE),
                  Rule("logit_bias", "logit_bias", "logit_bias", RESHAPE)]
    else:
        rules += [Rule("vision.cls", f"{v}.embeddings.class_embedding", "vision/cls", RESHAPE)]
        rules += _module(f"{v}.pre_layrnorm", "vision/pre_norm", "norm")
        rules += _module("visual_projection", "vision_proj", "dense_nobias")
        rules += _module("text_projection", "text_proj", "dense_nobias")
        rules += [Rule("logit_scale", "logit_scale", "logit_scale")]
    return tuple(rules)


# ------------------------------------------------------------------------- fused q;k;v tensors
_FUSED = re.compile(r"^(?P<m>.*)\.in_proj_(?P<w>weight|bias)$")


def split_fused_qkv(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`X.in_proj_weight` [3D, D] / `X.in_proj_bias` [3D] (rows q;k;v, as torch's MultiheadAttention)
    → `X.{q,k,v}_proj.{weight,bias}`; other keys unchanged."""
    out = {}
    for key, x in tensors.items():
        m = _FUSED.match(key)
        if m is None:
            out[key] = x
            continue
        if x.shape[0] % 3:
            raise ConversionError(f"{key} {list(x.shape)}: first axis is not 3·D (rows q;k;v)")
        for name, part in zip("qkv", np.split(np.asarray(x), 3, axis=0)):
            out[f"{m['m']}.{name}_proj.{m['w']}"] = part
    return out


def fuse_qkv(tensors: dict[str, np.ndarray], modules: Collection[str]) -> dict[str, np.ndarray]:
    """Inverse of `split_fused_qkv` for the given modules (e.g. "vision_model.head.attention")."""
    out = dict(tensors)
    for mod in modules:
        for w in ("weight", "bias"):
            parts = [out.pop(f"{mod}.{n}_proj.{w}") for n in "qkv"]
            out[f"{mod}.in_proj_{w}"] = np.concatenate(parts, axis=0)
    return out


# ------------------------------------------------------------------------------------- configs
def activation_from_hf(name: str, where: str) -> str:
    if name not in ACTIVATIONS_FROM_HF:
        raise ConversionError(
            f"config.json {where} hidden_act {name!r} has no exact equivalent in mmjax; supported: "
            f"{', '.join(sorted(ACTIVATIONS_FROM_HF))}. (Substituting a near one would silently change "
            "the model's outputs.)")
    return ACTIVATIONS_FROM_HF[name]


def _encoder(width, depth, heads, mlp_dim, activation, eps, options: LoadOptions, where: str) -> TransformerConfig:
    if width % heads:
        raise ConversionError(f"{where}: hidden_size={width} is not divisible by num_attention_heads={heads}")
    return TransformerConfig(width=int(width), depth=int(depth), num_heads=int(heads), mlp_dim=int(mlp_dim),
                             activation=activation, norm="layernorm", norm_eps=float(eps), use_bias=True,
                             final_norm=True, scan_layers=options.scan_layers, remat=options.remat,
                             dtype=options.dtype, param_dtype=options.param_dtype,
                             ops=options.ops)


# Sub-config defaults of transformers' CLIP{Vision,Text}Config and Siglip{Vision,Text}Config.
_CLIP_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_CLIP_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5, eos_token_id=2)
_SIGLIP_VISION = dict(_CLIP_VISION, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
_SIGLIP_TEXT = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                    layer_norm_eps=1e-6, projection_size=None)


def _sub(hf: dict, name: str, defaults: dict) -> dict:
    got = hf.get(name) or {}
    return {k: (got[k] if got.get(k) is not None else d) for k, d in defaults.items()}


def _example_inputs(cfg: CLIPConfig):
    v, t = cfg.vision, cfg.text
    return (jax.ShapeDtypeStruct((1, v.image_size, v.image_size, v.channels), jnp.float32),
            jax.ShapeDtypeStruct((1, t.max_len), jnp.int32))


def clip_config_from_hf(hf: dict, options: LoadOptions, siglip: bool) -> CLIPConfig:
    vd = _sub(hf, "vision_config", _SIGLIP_VISION if siglip else _CLIP_VISION)
    td = _sub(hf, "text_config", _SIGLIP_TEXT if siglip else _CLIP_TEXT)
    venc = _encoder(vd["hidden_size"], vd["num_hidden_layers"], vd["num_attention_heads"], vd["intermediate_size"],
                    activation_from_hf(vd["hidden_act"], "vision_config"), vd["layer_norm_eps"], options,
                    "vision_config")
    tenc = _encoder(td["hidden_size"], td["num_hidden_layers"], td["num_attention_heads"], td["intermediate_size"],
                    activation_from_hf(td["hidden_act"], "text_config"), td["layer_norm_eps"], options,
                    "text_config")
    vision = ViTConfig(image_size=_square(vd["image_size"], "image_size"), channels=int(vd["num_channels"]),
                       patch_size=_square(vd["patch_size"], "patch_size"), encoder=venc,
                       pool="map" if siglip else "cls", posemb="learned", pre_norm=not siglip,
                       patch_bias=siglip)
    if siglip:
        if (hf.get("vision_config") or {}).get("vision_use_head", True) is False:
            raise ConversionError("SigLIP with vision_use_head=False has no pooled image features; "
                                  "mmjax's CLIP needs the MAP head")
        text = TextConfig(vocab_size=int(td["vocab_size"]), max_len=int(td["max_position_embeddings"]),
                          encoder=tenc, causal=False, pool="last")
        return CLIPConfig(vision=vision, text=text, embed_dim=int(td["projection_size"] or td["hidden_size"]),
                          vision_projection=False, text_projection=True, text_projection_bias=True,
                          logit_scale_init=math.log(10.0), logit_bias_init=-10.0)
    eos = int(td["eos_token_id"])
    text = TextConfig(vocab_size=int(td["vocab_size"]), max_len=int(td["max_position_embeddings"]), encoder=tenc,
                      causal=True, pool="eot_argmax" if eos == 2 else "eos", eos_id=None if eos == 2 else eos)
    return CLIPConfig(vision=vision, text=text, embed_dim=int(hf.get("projection_dim") or 512),
                      logit_scale_init=float(hf.get("logit_scale_init_value") or 2.6592))


class _HFTwoTowers(Family):
    siglip = False
    model_class = CLIP

    def prepare_tensors(self, hf_config: dict, tensors: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        return split_fused_qkv(tensors) if self.siglip else tensors

    def plan_import(self, hf: dict, keys: Collection[str], options: LoadOptions) -> ImportPlan:
        arch = self.pick_architecture(hf, default=self.architectures[0])
        cfg = clip_config_from_hf(hf, options, self.siglip)
        return ImportPlan(CLIP(cfg), hf_rules(self.siglip), _example_inputs(cfg), f"HF {arch}", DEFAULT_IGNORE)

    def plan_export(self, model: CLIP, params: dict) -> ExportPlan:
        c = model.cfg
        v, t = c.vision, c.text
        ve, te = v.encoder, t.encoder
        sig = v.pool == "map"  # one class, CLIP and SigLIP: the vision pooling tells them apart
        problems = [msg for bad, msg in (
            (v.pool != ("map" if sig else "cls"), f"vision pool={v.pool!r}"),
            (v.posemb != "learned", f"vision posemb={v.posemb!r}"),
            (v.pre_norm == sig, f"vision pre_norm={v.pre_norm}"),
            (v.patch_bias != sig, f"vision patch_bias={v.patch_bias}"),
            (v.representation_size is not None, "vision representation_size"),
            (c.vision_projection == sig, f"vision_projection={c.vision_projection}"),
            (c.vision_projection and c.vision_projection_bias, "vision_projection_bias=True"),
            (not c.text_projection, "text_projection=False"),
            (c.text_projection_bias != sig, f"text_projection_bias={c.text_projection_bias}"),
            ((c.logit_bias_init is not None) != sig, "logit_bias"),
            (t.causal == sig, f"text causal={t.causal}"),
            (t.posemb != "learned", f"text posemb={t.posemb!r}"),
            (sig and t.pool != "last", f"text pool={t.pool!r} (SigLIP pools the last token)"),
            (not sig and t.pool not in ("eot_argmax", "eos"), f"text pool={t.pool!r}"),
        ) if bad]
        for name, e in (("vision", ve), ("text", te)):
            problems += [f"{name} {msg}" for bad, msg in (
                (e.norm != "layernorm", f"norm={e.norm!r}"), (not e.final_norm, "final_norm=False"),
                (not e.use_bias, "use_bias=False"), (e.qk_norm is not None, "qk_norm"),
                (e.rope_base is not None, "rope_base"), (e.num_kv_heads not in (None, e.num_heads), "GQA"),
                (e.head_dim not in (None, e.width // e.num_heads), "head_dim != width/heads"),
                (e.activation not in ACTIVATIONS_TO_HF, f"activation={e.activation!r}")) if bad]
        if problems:
            raise ConversionError(f"this CLIP cannot be written as an HF {self.architectures[0]}: "
                                  + "; ".join(problems))
        vc = {"hidden_size": ve.width, "intermediate_size": ve.mlp_dim or 4 * ve.width,
              "num_hidden_layers": ve.depth, "num_attention_heads": ve.num_heads, "num_channels": v.channels,
              "image_size": v.image_size, "patch_size": v.patch_size,
              "hidden_act": ACTIVATIONS_TO_HF[ve.activation], "layer_norm_eps": ve.norm_eps}
        tc = {"vocab_size": t.vocab_size, "hidden_size": te.width, "intermediate_size": te.mlp_dim or 4 * te.width,
              "num_hidden_layers": te.depth, "num_attention_heads": te.num_heads,
              "max_position_embeddings": t.max_len, "hidden_act": ACTIVATIONS_TO_HF[te.activation],
              "layer_norm_eps": te.norm_eps}
        if sig:
            vc["vision_use_head"] = True
            tc["projection_size"] = c.embed_dim
            hf = {"architectures": ["SiglipModel"], "model_type": "siglip"}
        else:
            tc["eos_token_id"] = 2 if t.pool == "eot_argmax" else t.eos_id
            hf = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": c.embed_dim,
                  "logit_scale_init_value": c.logit_scale_init}
        hf.update(vision_config=vc, text_config=tc)
        return ExportPlan(hf, hf_rules(sig), _example_inputs(c), f"HF {hf['architectures'][0]}")

    def finish_tensors(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fused = "vision_model.head.attention"
        return fuse_qkv(tensors, [fused]) if f"{fused}.q_proj.weight" in tensors else tensors


class HFCLIP(_HFTwoTowers):
    name = "clip"
    model_types = ("clip",)
    architectures = ("CLIPModel",)


class HFSiglip(_HFTwoTowers):
    name = "siglip"
    model_types = ("siglip",)
    architectures = ("SiglipModel",)
    siglip = True
    # Our CLIP class serves both: export finds HFCLIP first, whose plan_export writes a SigLIP
    # checkpoint when the vision tower pools with a MAP head.


CLIP_FAMILY, SIGLIP_FAMILY = HFCLIP(), HFSiglip()


# ----------------------------------------------------------------------- OpenAI / open_clip dicts
def openclip_rules() -> tuple[Rule, ...]:
    """OpenAI/open_clip ViT-CLIP keys (with in_proj already split into q/k/v_proj)."""
    rules = [Rule("vision.cls", "visual.class_embedding", "vision/cls", RESHAPE),
             Rule("vision.posemb", "visual.positional_embedding", "vision/posemb/pos_embedding", UNSQUEEZE0),
             Rule("vision_proj", "visual.proj", "vision_proj/kernel"),  # [D, E], x @ proj
             Rule("text.posemb", "positional_embedding", "text/posemb/pos_embedding", UNSQUEEZE0),
             Rule("text.token_embedding", "token_embedding.weight", "text/token_embedding"),
             Rule("text_proj", "text_projection", "text_proj/kernel"),  # [D, E], x @ W
             Rule("logit_scale", "logit_scale", "logit_scale")]
    rules += _module("visual.conv1", "vision/embedding", "conv_nobias")
    rules += _module("visual.ln_pre", "vision/pre_norm", "norm")
    rules += _module("visual.ln_post", "vision/encoder/final_norm", "norm")
    rules += _module("ln_final", "text/encoder/final_norm", "norm")
    for src, ours in (("visual.transformer", "vision"), ("transformer", "text")):
        blk, mine = f"{src}.resblocks.{{i}}", f"{ours}/encoder/block_{{i}}"
        rules += (_module(f"{blk}.ln_1", f"{mine}/norm1", "norm") + _attention(f"{blk}.attn", f"{mine}/attn")
                  + _module(f"{blk}.ln_2", f"{mine}/norm2", "norm")
                  + _module(f"{blk}.mlp.c_fc", f"{mine}/mlp/fc1", "dense")
                  + _module(f"{blk}.mlp.c_proj", f"{mine}/mlp/fc2", "dense"))
    return tuple(rules)


def _depth(keys: Collection[str], prefix: str) -> int:
    idx = {int(m[1]) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def load_openclip_state_dict(path: str | os.PathLike | Mapping[str, np.ndarray], *, activation: str = "quick_gelu",
                             norm_eps: float = 1e-5, vision_heads: int | None = None,
                             text_heads: int | None = None, eos_id: int | None = None,
                             **options) -> tuple[CLIP, dict]:
    """An OpenAI/open_clip ViT-CLIP state dict (a .safetensors file, or {key: array}) → (CLIP, params).

    Such files carry no config, so the caller states what the tensors cannot say:
      activation: "quick_gelu" (OpenAI weights) or "gelu" (most open_clip trainings); a wrong one
        silently degrades the model, so there is deliberately no guessing.
      norm_eps: LayerNorm eps (1e-5 in both code bases).
      vision_heads / text_heads: head counts (default width // 64, open_clip's head width).
      eos_id: None → pool at argmax(ids) (OpenAI's EOT has the highest id); else the first eos_id.
    Sizes (width, depth, mlp, patch, image size, vocab, context length, embed dim) come from shapes.
    options: LoadOptions fields (scan_layers, remat, dtype, param_dtype, ops).
    """
    from mmjax.convert.core import _expected_params, _options
    opts = _options(options)
    if activation not in ACTIVATIONS_TO_HF:
        raise ConversionError(f"activation {activation!r} is not one mmjax has; use 'quick_gelu' (OpenAI) "
                              "or 'gelu' (open_clip trainings)")
    if isinstance(path, Mapping):
        raw, source = dict(path), "state dict"
    else:
        from safetensors.numpy import load_file
        if not str(path).endswith(".safetensors"):
            raise ConversionError(f"{path}: expected a .safetensors file (mmjax never unpickles weights)")
        raw, source = load_file(str(path)), str(path)
    tensors = split_fused_qkv(raw)
    if np.shape(tensors.get("logit_scale", np.zeros(()))) == (1,):  # some exports store it as [1]
        tensors["logit_scale"] = np.asarray(tensors["logit_scale"]).reshape(())
    needed = ("visual.conv1.weight", "visual.positional_embedding", "visual.transformer.resblocks.0.mlp.c_fc.weight",
              "token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight",
              "visual.proj")
    absent = [k for k in needed if k not in tensors]
    if absent:
        raise ConversionError(f"{source} is not an OpenAI/open_clip ViT-CLIP state dict: no {absent} "
                              f"(first keys: {sorted(tensors)[:5]})")
    vw, c, p, _ = tensors["visual.conv1.weight"].shape
    grid = math.isqrt(tensors["visual.positional_embedding"].shape[0] - 1)
    vocab, tw = tensors["token_embedding.weight"].shape
    venc = _encoder(vw, _depth(tensors, "visual.transformer.resblocks."), vision_heads or max(vw // 64, 1),
                    tensors["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0], activation, norm_eps,
                    opts, "vision")
    tenc = _encoder(tw, _depth(tensors, "transformer.resblocks."), text_heads or max(tw // 64, 1),
                    tensors["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], activation, norm_eps, opts, "text")
    cfg = CLIPConfig(
        vision=ViTConfig(image_size=grid * p, channels=c, patch_size=p, encoder=venc, pool="cls", pre_norm=True,
                         patch_bias=False),
        text=TextConfig(vocab_size=vocab, max_len=tensors["positional_embedding"].shape[0], encoder=tenc,
                        causal=True, pool="eot_argmax" if eos_id is None else "eos", eos_id=eos_id),
        embed_dim=tensors["visual.proj"].shape[1])
    model = CLIP(cfg)
    expected_tree = _expected_params(model, _example_inputs(cfg))
    flat = import_tensors(list(openclip_rules()), tensors, flatten(unscan_tree(expected_tree)),
                          title=f"{source} (OpenAI/open_clip CLIP) does not fit our CLIP",
                          ignore=DEFAULT_IGNORE + (r"^attn_mask$",))
    tree = unflatten(flat)
    if is_scanned(expected_tree):
        tree = scan_tree(tree)
    return model, jax.tree.map(jnp.asarray, tree)


def to_openclip_state_dict(model: CLIP, params) -> dict[str, np.ndarray]:
    """Our CLIP (OpenAI layout: CLS, pre-norm, no biases on projections) → OpenAI/open_clip keys."""
    from mmjax.convert.rules import export_tensors
    flat = flatten(unscan_tree(jax.tree.map(np.asarray, plain_params(params))))
    out = export_tensors(list(openclip_rules()), flat, title="cannot write an OpenAI/open_clip state dict")
    mods = sorted({k.rsplit(".", 2)[0] for k in out if k.endswith(".q_proj.weight")})
    return fuse_qkv(out, mods)
