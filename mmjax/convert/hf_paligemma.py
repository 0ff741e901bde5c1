"""HF transformers `PaliGemmaForConditionalGeneration` ↔ our `VLM` (mmjax/models/vlm.py).

    pixels → SigLIP vision tower → last_hidden_state (post_layernorm, every patch, no CLS)
      → multi_modal_projector.linear (Dv → D, bias; projection_dim = D) = image features (raw)
    ids → Gemma embed_tokens × √D (text only; placeholders are overwritten, OOV ids read row 0)
    masked_scatter of the image features where ids == image_token_index → Gemma → tied head
    mask: token_type_ids 0 (image + BOS + prompt + "\\n") attend bidirectionally, 1 (the answer) causally
          = our prefix-LM with prefix_len = the number of type-0 tokens

Gemma (v1) is Llama with three changes, so its mapping is `hf_llama.llama_rules` (re-prefixed as for
LLaVA, `hf_llava`) and its config `hf_llama.lm_config_from_hf` with:
  * the MLP: gelu_tanh-gated (our "geglu") instead of SwiGLU;
  * the embedding scale √D (transformers 5.25: `GemmaTextScaledWordEmbedding`, the scale a float32
    tensor cast to the weights' dtype) → LMConfig.embed_scale = √D;
  * RMSNorm x̂ · (1 + w) with w stored around 0 → folded into the converter: our scale = 1 + w on
    import, w = scale − 1 on export (`PlusOne`). The model then has one RMSNorm (no flag in the
    shared layers) and the sum is exact in float32, as HF computes (1 + w) in float32; with
    bfloat16 params the stored 1 + w is coarser than w itself would be (8 bits of mantissa near 1).
HF's positions are 1-indexed; ours start at 0: RoPE sees only position differences, so the logits
agree to rounding.

Refused: Gemma 2 / 3 text models (PaliGemma 2: soft-capping, sliding windows, extra norms), a
projection_dim other than the text width, vision towers other than SigLIP. SigLIP's unused
attention-pooling head (an explicit SiglipVisionConfig defaults vision_use_head=True) is skipped on
import and not written (vision_use_head=False).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping

import numpy as np

from mmjax.convert import hf_llama
from mmjax.convert.family import ExportPlan, Family, ImportPlan, LoadOptions
from mmjax.convert.hf_clip import activation_from_hf
from mmjax.convert.hf_llava import (
    Layout,
    checked,
    detect_layout,
    example_inputs,
    lm_rules,
    projector_rules,
    tied_from_hf,
    vision_tower_config,
    vision_tower_hf_config,
    vision_tower_rules,
    vlm_ignore,
)
from mmjax.convert.rules import ConversionError, Transform
from mmjax.models.lm import LM, LMConfig
from mmjax.models.vlm import VLM, VLMConfig


class PlusOne(Transform):
    """Gemma's RMSNorm weight w (scale 1 + w) ↔ our scale."""

    def to_ours(self, x, shape):
        return np.asarray(x, np.float32) + np.float32(1.0)

    def to_source(self, y):
        return np.asarray(y, np.float32) - np.float32(1.0)


PLUS_ONE = PlusOne()

# PaliGemmaConfig's sub-config defaults (its init_kwargs over GemmaConfig's and SiglipVisionConfig's),
# for keys a config.json leaves out.
GEMMA_DEFAULTS = dict(vocab_size=257152, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                      num_attention_heads=8, num_key_value_heads=1, head_dim=256, hidden_act="gelu_pytorch_tanh",
                      max_position_embeddings=8192, rms_norm_eps=1e-6, attention_bias=False)
PALIGEMMA_VISION_DEFAULTS = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4096,
                                 num_hidden_layers=27, num_attention_heads=16, image_size=224, patch_size=14)
_GEMMA2_FIELDS = ("final_logit_softcapping", "attn_logit_softcapping", "sliding_window", "query_pre_attn_scalar")


def gemma_lm_config(text: Mapping, options: LoadOptions, tied: bool) -> LMConfig:
    """An HF GemmaConfig dict → our LMConfig (Llama's mapping + geglu + √D; norms: `PlusOne`)."""
    model_type = text.get("model_type") or "gemma"
    if model_type != "gemma":
        raise ConversionError(f"config.json text_config model_type {model_type!r}: mmjax reads PaliGemma with a "
                              "Gemma (v1) text model only (PaliGemma 2's Gemma 2 adds soft-capping, sliding "
                              "windows and extra norms)")
    extra = [k for k in _GEMMA2_FIELDS if text.get(k) is not None]
    if extra:
        raise ConversionError(f"config.json text_config sets {extra}: Gemma 2 features mmjax's LM does not compute")
    t = {**GEMMA_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
    act = t.pop("hidden_activation", None) or t["hidden_act"]
    act = "gelu_pytorch_tanh" if act == "gelu" else act  # as GemmaConfig: legacy "gelu" means the tanh form
    if activation_from_hf(act, "text_config") != "gelu_tanh":
        raise ConversionError(f"config.json text_config hidden_act {act!r}: Gemma's MLP is gelu_tanh-gated")
    cfg = hf_llama.lm_config_from_hf({**t, "hidden_act": "silu"}, options)  # the Llama mapping, then Gemma's
    return dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, activation="geglu"),
                               embed_scale=math.sqrt(int(t["hidden_size"])), tie_embeddings=tied)


def paligemma_config_from_hf(hf: Mapping, options: LoadOptions) -> VLMConfig:
    text = dict(hf.get("text_config") or {})
    vc = hf.get("vision_config") or {}
    vision, siglip = vision_tower_config(vc, PALIGEMMA_VISION_DEFAULTS, options, "vision_config")
    if not siglip:
        raise ConversionError(f"config.json vision_config model_type {vc.get('model_type')!r}: PaliGemma's "
                              "vision tower is SigLIP (siglip_vision_model)")
    lm_cfg = gemma_lm_config(text, options, tied_from_hf(hf, text, True))
    proj = hf.get("projection_dim") or (vc.get("projection_dim") if isinstance(vc, Mapping) else None) or 2048
    if int(proj) != lm_cfg.encoder.width:
        raise ConversionError(f"config.json projection_dim={proj} differs from the text hidden_size "
                              f"{lm_cfg.encoder.width}: the projected image features are the LM's inputs")
    cfg = VLMConfig(vision=vision, lm=lm_cfg, image_token_id=int(hf.get("image_token_index",
                                                                        hf.get("image_token_id", 256000))),
                    vision_feature_layers=None, vision_feature_select_strategy="full", projector="linear",
                    projector_bias=True, attention="prefix")
    return checked(cfg, "config.json (PaliGemma)")


class HFPaliGemma(Family):
    name = "paligemma"
    model_types = ("paligemma",)
    architectures = ("PaliGemmaForConditionalGeneration",)
    model_class = VLM  # export arrives through HFLlava, which hands linear-projector VLMs here

    def plan_import(self, hf: dict, keys: Collection[str], options: LoadOptions) -> ImportPlan:
        arch = self.pick_architecture(hf, default=self.architectures[0])
        cfg = paligemma_config_from_hf(hf, options)
        layout = detect_layout(keys)
        rules = (vision_tower_rules(True, layout.vision) + projector_rules(("linear",), True, layout.projector)
                 + lm_rules(layout, cfg.lm.tie_embeddings, PLUS_ONE))
        return ImportPlan(VLM(cfg), rules, example_inputs(cfg), f"HF {arch} ({layout.describe()})",
                          vlm_ignore(layout, cfg.lm.tie_embeddings, siglip=True))

    def plan_export(self, model: VLM, params: dict) -> ExportPlan:
        c, e = model.cfg, model.cfg.lm.encoder
        problems = [msg for bad, msg in (
            (c.projector != "linear" or not c.projector_bias, "PaliGemma's projector is one Linear with bias"),
            (c.attention != "prefix", f"attention={c.attention!r} (PaliGemma is a prefix-LM)"),
            (c.vision_feature_layers is not None, "vision_feature_layers (PaliGemma uses the final-normed output)"),
            (c.vision_feature_select_strategy != "full", "select strategy 'default' (PaliGemma keeps every patch)"),
            (c.vision.pool == "cls", "a CLIP tower (PaliGemma's is SigLIP)"),
            (e.activation != "geglu", f"lm activation={e.activation!r} (Gemma: geglu)"),
            (not math.isclose(c.lm.embed_scale, math.sqrt(e.width), rel_tol=1e-6),
             f"lm.embed_scale={c.lm.embed_scale} (Gemma: √{e.width})"),
        ) if bad]
        if problems:
            raise ConversionError("this VLM cannot be written as an HF PaliGemmaForConditionalGeneration: "
                                  + "; ".join(problems))
        vc, _ = vision_tower_hf_config(c.vision)
        # Gemma is written as Llama with its three changes (module docstring); hf_llama checks the rest.
        as_llama = dataclasses.replace(c.lm, encoder=dataclasses.replace(e, activation="swiglu"), embed_scale=1.0)
        llama = hf_llama.FAMILY.plan_export(LM(as_llama), {}).config
        text = {k: llama[k] for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "attention_bias", "attention_dropout", "rope_parameters")}
        text.update(model_type="gemma", hidden_act="gelu_pytorch_tanh", use_bidirectional_attention=True)
        vc["projection_dim"] = e.width
        hf = {"architectures": list(self.architectures), "model_type": "paligemma", "vision_config": vc,
              "text_config": text, "image_token_index": c.image_token_id, "projection_dim": e.width,
              "hidden_size": e.width, "vocab_size": c.lm.vocab_size, "tie_word_embeddings": c.lm.tie_embeddings}
        layout = Layout()
        rules = (vision_tower_rules(True, layout.vision) + projector_rules(("linear",), True, layout.projector)
                 + lm_rules(layout, c.lm.tie_embeddings, PLUS_ONE))
        return ExportPlan(hf, rules, example_inputs(c), "HF PaliGemmaForConditionalGeneration")


FAMILY = HFPaliGemma()
