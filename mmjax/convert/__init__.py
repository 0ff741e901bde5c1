"""Weights in and out: foreign checkpoints ↔ mmjax models, through named rules and loud diffs.

    model, params = mmjax.load_pretrained("hf_dir")              # config.json + *.safetensors
    mmjax.convert.save_pretrained(model, params, "out_dir")     # back to the HF layout

Modules: `core` (front door, family registry), `rules` (the rule engine and its errors),
`family` (what a family provides; LoadOptions), `tree` (flat paths, scanned layout), `hf_io`
(HF directories, safetensors only), `hf_vit` (HF ViT ↔ our ViT), `hf_clip`, `hf_llama`, `hf_llava`
(HF LLaVA ↔ our VLM, and the pieces HF VLMs share), `hf_paligemma`, `diffusers_ae`.
"""

from mmjax.convert.core import (
                                FAMILIES,
                                export_hf,
                                find_family,
                                from_hf,
                                load_pretrained,
                                save_pretrained,
                                to_hf,
)
from mmjax.convert.family import LoadOptions
from mmjax.convert.rules import ConversionError, KeyDiffError, Rule

__all__ = [
    "FAMILIES", "ConversionError", "KeyDiffError", "LoadOptions", "Rule", "export_hf", "find_family",
    "from_hf", "load_pretrained", "save_pretrained", "to_hf",
]
