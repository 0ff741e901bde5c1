"""HF transformers ViT (`ViTModel`, `ViTForImageClassification`) ↔ our `ViT` (mmjax/models/vit.py).

Both are the same pre-LN network:

    pixels [B, C, H, W] (torch) / [B, H, W, C] (ours)
      → conv P×P stride P (= linear on patches) → [B, N, D], N = HW/P²
      → prepend CLS, add learned positions [1, N+1, D]
      → depth × (x + Attn(LN(x)); x + Mlp(LN(x)))  → final LN       = last_hidden_state / aux["encoded"]
      → ViTModel pooler: tanh(Dense(x[:, 0]))                        = pooler_output / aux["pre_logits"]
      → ViTForImageClassification: Linear(x[:, 0]) (no pooler)       = logits / out

Checkpoint keys (on disk; the `vit.` prefix comes with ViTForImageClassification):

    [vit.]embeddings.cls_token [1,1,D]            → cls [1,1,D]
    [vit.]embeddings.position_embeddings [1,N+1,D]→ posemb/pos_embedding
    [vit.]embeddings.patch_embeddings.projection  → embedding (conv OIHW → HWIO)
    [vit.]encoder.layer.{i}.attention.attention.{query,key,value} [H·Dh, D] → attn/{..}/kernel [D, H, Dh]
    [vit.]encoder.layer.{i}.attention.output.dense [D, H·Dh]                → attn/out/kernel [H, Dh, D]
    [vit.]encoder.layer.{i}.{layernorm_before, layernorm_after}             → norm1, norm2
    [vit.]encoder.layer.{i}.{intermediate.dense, output.dense}              → mlp/fc1, mlp/fc2
    [vit.]layernorm                                → encoder/final_norm
    pooler.dense                                   → pre_logits (representation_size = pooler_output_size)
    classifier                                     → head (num_classes = num_labels)

transformers 5 renames modules in memory (`layers.{i}.attention.q_proj`, `mlp.fc1`, ...) but still
writes the names above to disk; a state_dict saved directly from a v5 module uses the in-memory
names, so import accepts both and export writes the on-disk names every version reads.
"""

from __future__ import annotations

import re
from collections.abc import Collection

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.convert.family import ExportPlan, Family, ImportPlan, LoadOptions
from mmjax.convert.rules import CONV_OIHW, DEFAULT_IGNORE, IDENTITY, RESHAPE, ConversionError, Linear, Rule
from mmjax.layers.transformer import TransformerConfig
from mmjax.models.vit import ViT, ViTConfig

# HF activation name → ours. Only exact equivalents: gelu_new, gelu_pytorch_tanh and gelu_fast are
# all the tanh approximation; gelu and gelu_python are the exact erf form.
ACTIVATIONS_FROM_HF = {
    "gelu": "gelu", "gelu_python": "gelu",
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu", "relu": "relu", "silu": "silu", "swish": "silu",
}
ACTIVATIONS_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu",
                     "relu": "relu", "silu": "silu"}

# transformers' ViTConfig defaults, used for keys a config.json leaves out (as transformers does).
HF_DEFAULTS = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": 224, "patch_size": 16,
    "num_channels": 3, "qkv_bias": True, "pooler_act": "tanh", "pooler_output_size": None,
}

# How each kind of torch module's tensors become ours: (torch param, our param, transform).
_PARAMS = {
    "norm": (("weight", "scale", IDENTITY), ("bias", "bias", IDENTITY)),
    "dense": (("weight", "kernel", Linear(1)), ("bias", "bias", IDENTITY)),
    "heads_in": (("weight", "kernel", Linear(1)), ("bias", "bias", RESHAPE)),  # [H·Dh, D] → [D, H, Dh]
    "heads_out": (("weight", "kernel", Linear(2)), ("bias", "bias", IDENTITY)),  # [D, H·Dh] → [H, Dh, D]
    "conv": (("weight", "kernel", CONV_OIHW), ("bias", "bias", IDENTITY)),
}

# One transformer block. Keys are relative to "encoder.layer.{i}." (on disk) or "layers.{i}."
# (transformers-5 in memory); our paths to "encoder/block_{i}/".
_BLOCK = (
    # on-disk module             in-memory module      ours          kind
    ("layernorm_before",          "layernorm_before",   "norm1",      "norm"),
    ("attention.attention.query", "attention.q_proj",   "attn/query", "heads_in"),
    ("attention.attention.key",   "attention.k_proj",   "attn/key",   "heads_in"),
    ("attention.attention.value", "attention.v_proj",   "attn/value", "heads_in"),
    ("attention.output.dense",    "attention.o_proj",   "attn/out",   "heads_out"),
    ("layernorm_after",           "layernorm_after",    "norm2",      "norm"),
    ("intermediate.dense",        "mlp.fc1",            "mlp/fc1",    "dense"),
    ("output.dense",              "mlp.fc2",            "mlp/fc2",    "dense"),
)
_QKV = ("attn/query", "attn/key", "attn/value")

# Outside the blocks, relative to the "vit." prefix (the same names in both layouts).
_TOP = (
    ("embeddings.patch_embeddings.projection", "embedding", "conv"),
    ("layernorm", "encoder/final_norm", "norm"),
    ("pooler.dense", "pre_logits", "dense"),
)


def _module_rules(source: str | None, ours: str, kind: str, skip_bias: bool = False) -> list[Rule]:
    """Rules for one module's tensors; the rule name is our path with dots."""
    out = []
    for theirs, mine, transform in _PARAMS[kind]:
        path = f"{ours}/{mine}"
        src = None if skip_bias and theirs == "bias" else f"{source}.{theirs}"
        out.append(Rule(path.replace("/", "."), src, path, transform))
    return out


def vit_rules(prefix: str = "", layout: str = "disk", qkv_bias: bool = True) -> tuple[Rule, ...]:
    """The rule list for one checkpoint flavour.

    prefix: "" (ViTModel) or "vit." (ViTForImageClassification).
    layout: "disk" (what every transformers version writes) or "memory" (transformers-5 module
      names, as in a state_dict saved without save_pretrained).
    qkv_bias: False → no q/k/v bias tensors; our (always present) biases are zero-filled.
    """
    if layout not in ("disk", "memory"):
        raise ValueError(f"layout must be 'disk' or 'memory', got {layout!r}")
    rules = [Rule("cls", prefix + "embeddings.cls_token", "cls"),  # [1, 1, D] both sides
             Rule("posemb", prefix + "embeddings.position_embeddings", "posemb/pos_embedding")]
    for source, ours, kind in _TOP:
        rules += _module_rules(prefix + source, ours, kind)
    block = prefix + ("encoder.layer.{i}." if layout == "disk" else "layers.{i}.")
    for disk, memory, ours, kind in _BLOCK:
        rules += _module_rules(block + (disk if layout == "disk" else memory), "encoder/block_{i}/" + ours,
                               kind, skip_bias=ours in _QKV and not qkv_bias)
    # The classifier sits beside "vit.", not under it.
    rules += _module_rules("classifier", "head", "dense")
    return tuple(rules)


def activation_from_hf(name: str) -> str:
    if name not in ACTIVATIONS_FROM_HF:
        raise ConversionError(
            f"config.json hidden_act {name!r} has no exact equivalent in mmjax; supported: "
            f"{', '.join(sorted(ACTIVATIONS_FROM_HF))}. (Substituting a near one would silently change "
            "the model's outputs.)")
    return ACTIVATIONS_FROM_HF[name]


def _square(value, name: str) -> int:
    """HF allows int or [h, w]; our ViT is square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(f"config.json {name}={list(value)}: mmjax's ViT supports square sizes only")
        value = value[0]
    return int(value)


def _num_labels(hf: dict) -> int:
    if hf.get("id2label"):
        return len(hf["id2label"])
    return int(hf.get("num_labels", 2))  # transformers' default


def _example_images(cfg: ViTConfig) -> tuple[jax.ShapeDtypeStruct]:
    return (jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32),)


class HFViT(Family):
    name = "vit"
    model_types = ("vit",)
    architectures = ("ViTModel", "ViTForImageClassification")
    model_class = ViT

    def plan_import(self, hf: dict, keys: Collection[str], options: LoadOptions) -> ImportPlan:
        arch = self.pick_architecture(
            hf, default="ViTForImageClassification" if "classifier.weight" in keys else "ViTModel")
        get = lambda k: hf[k] if hf.get(k) is not None else HF_DEFAULTS[k]
        width, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        if width % heads:
            raise ConversionError(f"config.json hidden_size={width} is not divisible by "
                                  f"num_attention_heads={heads}")
        prefix = "vit." if any(k.startswith("vit.") for k in keys) else ""
        # The v5 in-memory names only if the on-disk ones are absent; a mix shows up as a diff.
        memory = any(k.startswith(prefix + "layers.") for k in keys)
        disk = any(k.startswith(prefix + "encoder.layer.") for k in keys)
        ignore = DEFAULT_IGNORE
        representation_size = num_classes = None
        if arch == "ViTForImageClassification":
            # HF's classifier reads the CLS token after the final LayerNorm; a pooler, if a
            # checkpoint carries one, is unused by the reference too.
            ignore = ignore + (r"^vit\.pooler\.",)
            num_classes = _num_labels(hf) or None  # num_labels=0: HF uses an Identity head
        elif f"{prefix}pooler.dense.weight" in keys:
            if get("pooler_act") != "tanh":
                raise ConversionError(f"config.json pooler_act={get('pooler_act')!r}: our pre_logits "
                                      "layer is Dense + tanh, so only 'tanh' converts")
            representation_size = int(get("pooler_output_size") or width)
        encoder = TransformerConfig(
            width=width, depth=int(get("num_hidden_layers")), num_heads=heads,
            mlp_dim=int(get("intermediate_size")), activation=activation_from_hf(get("hidden_act")),
            norm="layernorm", norm_eps=float(get("layer_norm_eps")), use_bias=True, final_norm=True,
            scan_layers=options.scan_layers, remat=options.remat, dtype=options.dtype,
            param_dtype=options.param_dtype, ops=options.ops)
        cfg = ViTConfig(
            image_size=_square(get("image_size"), "image_size"), channels=int(get("num_channels")),
            patch_size=_square(get("patch_size"), "patch_size"), encoder=encoder, pool="cls",
            posemb="learned", pre_norm=False, patch_bias=True, num_classes=num_classes,
            representation_size=representation_size)
        rules = vit_rules(prefix, "memory" if memory and not disk else "disk", bool(get("qkv_bias")))
        return ImportPlan(ViT(cfg), rules, _example_images(cfg), f"HF {arch}", ignore)

    def plan_export(self, model: ViT, params: dict) -> ExportPlan:
        c, e = model.cfg, model.cfg.encoder
        width = e.width
        unsupported = [
            msg for bad, msg in (
                (c.pool != "cls", f"pool={c.pool!r} (HF ViT pools the CLS token)"),
                (c.posemb != "learned", f"posemb={c.posemb!r} (HF ViT has learned positions)"),
                (c.pre_norm, "pre_norm=True (HF ViT has no LayerNorm before the stack)"),
                (not c.patch_bias, "patch_bias=False (HF ViT's patch conv has a bias)"),
                (c.num_classes is not None and c.representation_size is not None,
                 "a head on top of representation_size (HF's classifier reads the CLS token directly)"),
                (e.norm != "layernorm", f"norm={e.norm!r}"),
                (not e.final_norm, "final_norm=False"),
                (not e.use_bias, "use_bias=False (HF ViT's output and MLP layers have biases)"),
                (e.qk_norm is not None, f"qk_norm={e.qk_norm!r}"),
                (e.rope_base is not None, "rope_base (HF ViT has no RoPE)"),
                (e.num_kv_heads not in (None, e.num_heads), f"num_kv_heads={e.num_kv_heads} (GQA)"),
                (e.head_dim not in (None, width // e.num_heads), f"head_dim={e.head_dim} != width/heads"),
                (width % e.num_heads != 0, f"width {width} not divisible by num_heads {e.num_heads}"),
                (e.activation not in ACTIVATIONS_TO_HF, f"activation={e.activation!r}"),
            ) if bad]
        if unsupported:
            raise ConversionError("this ViT cannot be written as an HF ViT checkpoint: "
                                  + "; ".join(unsupported))
        # HF drops q/k/v biases with qkv_bias=False; keep them unless all are exactly zero.
        qkv_bias = any(np.any(np.asarray(v) != 0) for p, v in params.items()
                       if re.fullmatch(r"encoder/block_\d+/attn/(query|key|value)/bias", p))
        arch = "ViTForImageClassification" if c.num_classes is not None else "ViTModel"
        hf = {
            "architectures": [arch], "model_type": "vit",
            "hidden_size": width, "num_hidden_layers": e.depth, "num_attention_heads": e.num_heads,
            "intermediate_size": e.mlp_dim or 4 * width, "hidden_act": ACTIVATIONS_TO_HF[e.activation],
            "layer_norm_eps": e.norm_eps, "image_size": c.image_size, "patch_size": c.patch_size,
            "num_channels": c.channels, "qkv_bias": qkv_bias,
            "hidden_dropout_prob": e.dropout, "attention_probs_dropout_prob": 0.0,
            "pooler_output_size": c.representation_size or width, "pooler_act": "tanh",
            "initializer_range": 0.02, "encoder_stride": c.patch_size,
        }
        if c.num_classes is not None:
            hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(c.num_classes)}
            hf["label2id"] = {f"LABEL_{i}": i for i in range(c.num_classes)}
        prefix = "vit." if c.num_classes is not None else ""
        return ExportPlan(hf, vit_rules(prefix, "disk", qkv_bias), _example_images(c), f"HF {arch}")


FAMILY = HFViT()
