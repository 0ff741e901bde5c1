"""HF transformers `LlavaForConditionalGeneration` ↔ our `VLM` (mmjax/models/vlm.py), and the pieces
every HF VLM family shares (the vision tower, the key layouts, re-prefixed rules).

    pixels → CLIP (or SigLIP) vision tower → hidden_states[vision_feature_layer] (−2: penultimate
      block, before post_layernorm) → drop CLS ("default") → multi_modal_projector
      linear_1 → act (projector_hidden_act, "gelu" = erf) → linear_2  (bias: multimodal_projector_bias)
      → masked_scatter into the Llama input embeddings where ids == image_token_index → Llama → lm_head

The mappings are not repeated here: the vision tower's rules are the `vision_model.*` rules of
`hf_clip.hf_rules` and the LM's are `hf_llama.llama_rules`, each re-prefixed (`rebase_rules`) to where
the composite checkpoint keeps them. One checkpoint, several key layouts in use; import reads any
of them (picked per component from the keys present), export writes the one transformers 5.25's
save_pretrained writes:

    component   5.25 on disk (written)       hub (< 4.52)                  in memory (≥ 4.52 / 5.x)
    vision      vision_tower.*               vision_tower.vision_model.*   model.vision_tower[.vision_model].*
    projector   multi_modal_projector.*      multi_modal_projector.*       model.multi_modal_projector.*
    LM          language_model.model.*       language_model.model.*        model.language_model.*
    head        language_model.lm_head.*     language_model.lm_head.*      lm_head.*

Ours: vision/... (ViT), projector/linear_{1,2}/{kernel, bias}, lm/... (LM).

Refused with a ConversionError: text models other than Llama (mistral, qwen2, ... differ in ways our
LM would silently get wrong), vision towers other than CLIP / SigLIP, "default" feature selection
with a SigLIP tower (it drops a real patch, not a CLS token), a feature layer of hidden_states[0].
A SigLIP tower's unused attention-pooling head (vision_use_head) is skipped on import, not written.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping

import jax
import jax.numpy as jnp

from mmjax.convert import hf_llama
from mmjax.convert.family import ExportPlan, Family, ImportPlan, LoadOptions
from mmjax.convert.hf_clip import activation_from_hf, clip_config_from_hf, hf_rules
from mmjax.convert.hf_vit import ACTIVATIONS_TO_HF
from mmjax.convert.rules import DEFAULT_IGNORE, IDENTITY, ConversionError, Linear, Rule
from mmjax.models.lm import LM
from mmjax.models.vit import ViTConfig
from mmjax.models.vlm import VLM, VLMConfig, check_vlm_config, image_tokens_per_image


# ------------------------------------------------------------------------------ shared pieces
def rebase_rules(rules, prefixes: Mapping[str, str], target_prefix: str) -> tuple[Rule, ...]:
    """A sub-model's rules moved into a composite checkpoint: each source key's leading prefix (a
    key of `prefixes`, first match) is replaced by its value, and our paths get `target_prefix`.
    E.g. llama_rules with {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}
    and "lm/": "model.norm.weight" → "language_model.model.norm.weight", ours "lm/encoder/final_norm/scale"."""
    out = []
    for r in rules:
        src = r.source
        if src is not None:
            old = next((p for p in prefixes if src.startswith(p)), None)
            if old is None:
                raise ValueError(f"rule {r.name!r}: source {src!r} starts with none of {list(prefixes)}")
            src = prefixes[old] + src[len(old):]
        out.append(dataclasses.replace(r, name=target_prefix.replace("/", ".") + r.name, source=src,
                                       target=target_prefix + r.target))
    return tuple(out)


# Key layouts per component (module docstring); the first is the one export writes.
VISION_PREFIXES = ("vision_tower.", "vision_tower.vision_model.", "model.vision_tower.",
                   "model.vision_tower.vision_model.")
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
LM_PREFIXES = ("language_model.model.", "model.language_model.")
HEAD_PREFIXES = ("language_model.lm_head.", "lm_head.")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one checkpoint keeps each component (prefixes of its keys)."""

    vision: str = VISION_PREFIXES[0]
    projector: str = PROJECTOR_PREFIXES[0]
    lm: str = LM_PREFIXES[0]
    head: str = HEAD_PREFIXES[0]

    def describe(self) -> str:
        return f"keys {self.vision}*, {self.projector}*, {self.lm}*, {self.head}*"


def detect_layout(keys: Collection[str]) -> Layout:
    """The layout of each component, from a key it must have; a component found in none of the
    layouts gets the written one (the key diff then names what it expected)."""
    keys = set(keys)

    def pick(prefixes, probe, default_index=0):
        found = [p for p in prefixes if probe(p)]
        return found[0] if found else prefixes[default_index]

    lm = pick(LM_PREFIXES, lambda p: f"{p}embed_tokens.weight" in keys)
    return Layout(
        vision=pick(VISION_PREFIXES, lambda p: f"{p}embeddings.patch_embedding.weight" in keys),
        projector=pick(PROJECTOR_PREFIXES, lambda p: any(k.startswith(p) for k in keys)),
        lm=lm,
        head=pick(HEAD_PREFIXES, lambda p: f"{p}weight" in keys, LM_PREFIXES.index(lm)))


VISION_MODEL_TYPES = {"clip_vision_model": False, "siglip_vision_model": True}  # model_type → SigLIP?


def vision_tower_config(vc: Mapping, defaults: Mapping, options: LoadOptions, where: str) -> tuple[ViTConfig, bool]:
    """An HF CLIP / SigLIP vision_config → (our ViT config, is SigLIP), through hf_clip's mapping:
    CLIP pool="cls" with pre-norm; SigLIP pool="none" (its pooling head is unused by VLMs)."""
    model_type = vc.get("model_type") or "clip_vision_model"
    if model_type not in VISION_MODEL_TYPES:
        raise ConversionError(f"config.json {where} model_type {model_type!r}: mmjax's VLM converters read CLIP "
                              f"and SigLIP vision towers only ({', '.join(VISION_MODEL_TYPES)})")
    siglip = VISION_MODEL_TYPES[model_type]
    filled = {**defaults, **{k: v for k, v in vc.items() if v is not None}, "vision_use_head": True}
    vision = clip_config_from_hf({"vision_config": filled}, options, siglip).vision
    return (dataclasses.replace(vision, pool="none") if siglip else vision), siglip


def vision_tower_rules(siglip: bool, prefix: str) -> tuple[Rule, ...]:
    """hf_clip's vision_model.* rules (without SigLIP's pooling head), re-prefixed to `prefix`."""
    rules = [r for r in hf_rules(siglip) if r.target.startswith("vision/") and "map_head" not in r.target]
    return rebase_rules(rules, {"vision_model.": prefix}, "")


def vision_tower_hf_config(v: ViTConfig) -> tuple[dict, bool]:
    """Our ViT → (HF CLIPVisionConfig / SiglipVisionConfig dict, is SigLIP); ConversionError listing
    what such a tower cannot hold."""
    e = v.encoder
    siglip = v.pool != "cls"
    problems = [msg for bad, msg in (
        (v.pool not in ("cls", "none"), f"pool={v.pool!r} (CLIP: 'cls', SigLIP: 'none')"),
        (v.pre_norm == siglip, f"pre_norm={v.pre_norm} (CLIP has pre_layrnorm, SigLIP none)"),
        (v.patch_bias != siglip, f"patch_bias={v.patch_bias} (CLIP: no bias, SigLIP: bias)"),
        (v.posemb != "learned", f"posemb={v.posemb!r}"), (bool(v.stem), "a conv stem"),
        (v.representation_size is not None, "representation_size"), (v.num_classes is not None, "a head"),
        (e.norm != "layernorm", f"norm={e.norm!r}"), (not e.final_norm, "final_norm=False"),
        (not e.use_bias, "use_bias=False"), (e.qk_norm is not None, "qk_norm"), (e.rope_base is not None, "RoPE"),
        (e.num_kv_heads not in (None, e.num_heads), "GQA"),
        (e.head_dim not in (None, e.width // e.num_heads), "head_dim != width/heads"),
        (e.activation not in ACTIVATIONS_TO_HF, f"activation={e.activation!r}"),
    ) if bad]
    if problems:
        raise ConversionError("this vision tower cannot be written as an HF CLIP/SigLIP vision model: "
                              + "; ".join(problems))
    vc = {"model_type": "siglip_vision_model" if siglip else "clip_vision_model", "hidden_size": e.width,
          "intermediate_size": e.mlp_dim or 4 * e.width, "num_hidden_layers": e.depth,
          "num_attention_heads": e.num_heads, "num_channels": v.channels, "image_size": v.image_size,
          "patch_size": v.patch_size, "hidden_act": ACTIVATIONS_TO_HF[e.activation], "layer_norm_eps": e.norm_eps}
    if siglip:
        vc["vision_use_head"] = False
    return vc, siglip


def projector_rules(names: tuple[str, ...], bias: bool, prefix: str) -> tuple[Rule, ...]:
    """multi_modal_projector.{name}.{weight, bias} ↔ projector/{name}/{kernel, bias}."""
    rules = []
    for n in names:
        rules.append(Rule(f"projector.{n}.kernel", f"{prefix}{n}.weight", f"projector/{n}/kernel", Linear(1)))
        if bias:
            rules.append(Rule(f"projector.{n}.bias", f"{prefix}{n}.bias", f"projector/{n}/bias", IDENTITY))
    return tuple(rules)


def vlm_ignore(layout: Layout, tied: bool, siglip: bool) -> tuple[str, ...]:
    """Keys that are not weights of our model: buffers, a tied head saved anyway, SigLIP's unused head."""
    ignore = DEFAULT_IGNORE + (r"\.rotary_emb\.inv_freq$",)
    if tied:
        ignore += tuple(f"^{re.escape(p)}weight$" for p in HEAD_PREFIXES)
    if siglip:
        ignore += (f"^{re.escape(layout.vision)}head\\.",)
    return ignore


def lm_rules(layout: Layout, tied: bool, norm_transform=None) -> tuple[Rule, ...]:
    """hf_llama's rules under lm/ at the layout's prefixes (norm_transform: Gemma's (1 + w) norms)."""
    rules = hf_llama.llama_rules(tied)
    if norm_transform is not None:
        rules = [dataclasses.replace(r, transform=norm_transform) if r.target.endswith("norm1/scale")
                 or r.target.endswith("norm2/scale") or r.target.endswith("final_norm/scale") else r for r in rules]
    return rebase_rules(rules, {"model.": layout.lm, "lm_head.": layout.head}, "lm/")


def example_inputs(cfg: VLMConfig) -> tuple[jax.ShapeDtypeStruct, ...]:
    v = cfg.vision
    return (jax.ShapeDtypeStruct((1, v.image_size, v.image_size, v.channels), jnp.float32),
            jax.ShapeDtypeStruct((1, 1), jnp.int32))


def checked(cfg: VLMConfig, where: str) -> VLMConfig:
    """cfg after `check_vlm_config`, its ValueErrors as ConversionErrors naming the config."""
    try:
        check_vlm_config(cfg)
    except ValueError as e:
        raise ConversionError(f"{where}: {e}") from None
    return cfg


def tied_from_hf(hf: Mapping, text: Mapping, default: bool) -> bool:
    """transformers ties the head when the top level or (older saves) the text config says so."""
    top = hf.get("tie_word_embeddings")
    return bool(text.get("tie_word_embeddings")) or bool(default if top is None else top)


# ------------------------------------------------------------------------------------ LLaVA
# LlavaConfig's vision sub-config defaults (CLIP ViT-L/14 at 336 px), for keys a config.json leaves out.
LLAVA_VISION_DEFAULTS = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                             num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14)


def llava_config_from_hf(hf: Mapping, options: LoadOptions) -> tuple[VLMConfig, bool]:
    """An HF LlavaConfig dict → (VLMConfig, the tower is SigLIP)."""
    text = dict(hf.get("text_config") or {})
    text_type = text.get("model_type") or "llama"
    if text_type != "llama":
        raise ConversionError(f"config.json text_config model_type {text_type!r}: mmjax's LLaVA converter reads "
                              "Llama text models only")
    vision, siglip = vision_tower_config(hf.get("vision_config") or {}, LLAVA_VISION_DEFAULTS, options,
                                         "vision_config")
    lm_cfg = hf_llama.lm_config_from_hf(text, options)
    lm_cfg = dataclasses.replace(lm_cfg, tie_embeddings=tied_from_hf(hf, text, False))
    layer = hf.get("vision_feature_layer", -2)
    layers = tuple(int(x) for x in layer) if isinstance(layer, (list, tuple)) else (int(layer),)
    strategy = hf.get("vision_feature_select_strategy") or "default"
    if strategy not in ("default", "full"):
        raise ConversionError(f"config.json vision_feature_select_strategy {strategy!r}: expected 'default' or 'full'")
    cfg = VLMConfig(
        vision=vision, lm=lm_cfg, image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 32000))),
        vision_feature_layers=layers, vision_feature_select_strategy=strategy, projector="mlp",
        projector_activation=activation_from_hf(hf.get("projector_hidden_act") or "gelu", "projector"),
        projector_bias=bool(hf.get("multimodal_projector_bias", True)), attention="causal")
    return checked(cfg, "config.json (LLaVA)"), siglip


class HFLlava(Family):
    name = "llava"
    model_types = ("llava",)
    architectures = ("LlavaForConditionalGeneration",)
    model_class = VLM

    def plan_import(self, hf: dict, keys: Collection[str], options: LoadOptions) -> ImportPlan:
        arch = self.pick_architecture(hf, default=self.architectures[0])
        cfg, siglip = llava_config_from_hf(hf, options)
        layout = detect_layout(keys)
        rules = (vision_tower_rules(siglip, layout.vision)
                 + projector_rules(("linear_1", "linear_2"), cfg.projector_bias, layout.projector)
                 + lm_rules(layout, cfg.lm.tie_embeddings))
        return ImportPlan(VLM(cfg), rules, example_inputs(cfg), f"HF {arch} ({layout.describe()})",
                          vlm_ignore(layout, cfg.lm.tie_embeddings, siglip))

    def plan_export(self, model: VLM, params: dict) -> ExportPlan:
        c = model.cfg
        if c.projector == "linear":  # one class, two families: the projector tells them apart
            from mmjax.convert.hf_paligemma import FAMILY as PALIGEMMA
            return PALIGEMMA.plan_export(model, params)
        problems = [msg for bad, msg in (
            (c.attention != "causal", f"attention={c.attention!r} (LLaVA is causal)"),
            (c.vision_feature_layers is None, "vision_feature_layers=None (LLaVA picks hidden_states layers)"),
            (c.projector_activation not in ACTIVATIONS_TO_HF, f"projector_activation={c.projector_activation!r}"),
            (c.lm.embed_scale != 1.0, f"lm.embed_scale={c.lm.embed_scale} (Llama does not scale embeddings)"),
        ) if bad]
        if problems:
            raise ConversionError("this VLM cannot be written as an HF LlavaForConditionalGeneration: "
                                  + "; ".join(problems))
        vc, siglip = vision_tower_hf_config(c.vision)
        text = dict(hf_llama.FAMILY.plan_export(LM(c.lm), {}).config)
        text.pop("architectures", None)
        layers = list(c.vision_feature_layers)
        hf = {"architectures": list(self.architectures), "model_type": "llava", "vision_config": vc,
              "text_config": text, "image_token_index": c.image_token_id,
              "image_seq_length": image_tokens_per_image(c),
              "projector_hidden_act": ACTIVATIONS_TO_HF[c.projector_activation],
              "multimodal_projector_bias": c.projector_bias,
              "vision_feature_layer": layers[0] if len(layers) == 1 else layers,
              "vision_feature_select_strategy": c.vision_feature_select_strategy,
              "tie_word_embeddings": c.lm.tie_embeddings}
        layout = Layout()
        rules = (vision_tower_rules(siglip, layout.vision)
                 + projector_rules(("linear_1", "linear_2"), c.projector_bias, layout.projector)
                 + lm_rules(layout, c.lm.tie_embeddings))
        return ExportPlan(hf, rules, example_inputs(c), "HF LlavaForConditionalGeneration")


FAMILY = HFLlava()
