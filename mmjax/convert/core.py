"""The converter's front door: `load_pretrained` / `save_pretrained` and the family registry.

    model, params = mmjax.load_pretrained("path/to/hf_dir", scan_layers=True)
    out, aux = model.apply({"params": params}, images)          # images [B, H, W, C]
    mmjax.convert.save_pretrained(model, params, "out_dir")      # config.json + model.safetensors

Import, in order: read config.json → pick the family from its model_type (and architectures) →
the family maps the config to our typed config and names its rules → `jax.eval_shape` of the
model's init gives the expected param tree → the rules map every tensor, and one KeyDiffError
lists whatever is missing, unexpected or shape-mismatched → the blocks are stacked if the model
scans its layers. Export runs the same rules backwards.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import ConfigError, from_dict
from mmjax.convert import diffusers_ae, hf_clip, hf_io, hf_llama, hf_llava, hf_paligemma, hf_vit
from mmjax.convert.family import Family, LoadOptions
from mmjax.convert.rules import ConversionError, KeyDiffError, export_tensors, fmt_shape, import_tensors
from mmjax.convert.tree import flatten, is_scanned, plain_params, scan_tree, unflatten, unscan_tree

# Every family, explicitly (no string-based imports). LLaVA before PaliGemma: both export our VLM, and
# LLaVA's export hands a linear-projector VLM to PaliGemma's.
FAMILIES: tuple[Family, ...] = (hf_vit.FAMILY, hf_clip.CLIP_FAMILY, hf_clip.SIGLIP_FAMILY, hf_llama.FAMILY,
                                hf_llava.FAMILY, hf_paligemma.FAMILY, diffusers_ae.VQ_FAMILY, diffusers_ae.KL_FAMILY)


def supported() -> str:
    """'vit (ViTModel, ViTForImageClassification), ...' for error messages."""
    return "; ".join(f"{'/'.join(f.model_types)} ({', '.join(f.architectures)})" if f.model_types
                     else f"diffusers {'/'.join(f.class_names)}" for f in FAMILIES)


def find_family(hf_config: Mapping[str, Any], where: str = "config.json") -> Family:
    """The family that reads a checkpoint with this config.json, or a ConversionError saying what
    was found and what is supported."""
    model_type = hf_config.get("model_type")
    archs = hf_config.get("architectures")
    class_name = hf_config.get("_class_name")  # diffusers writes this instead of model_type
    if not model_type and class_name:
        for family in FAMILIES:
            if class_name in family.class_names:
                return family
        raise ConversionError(f"{where}: diffusers _class_name {class_name!r} is not supported by mmjax's "
                              f"converters. Supported: {supported()}")
    if not model_type:
        raise ConversionError(f"{where} has no 'model_type' (architectures: {archs}); cannot tell which "
                              f"converter applies. Supported: {supported()}")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ConversionError(f"{where}: model_type {model_type!r} (architectures: {archs}) is not supported "
                          f"by mmjax's converters. Supported: {supported()}")


def family_for_model(model: nn.Module) -> Family:
    for family in FAMILIES:
        if family.model_class is not None and isinstance(model, family.model_class):
            return family
    raise ConversionError(f"no converter exports {type(model).__name__}; exportable: "
                          f"{', '.join(f.model_class.__name__ for f in FAMILIES if f.model_class)}")


def _options(options: dict) -> LoadOptions:
    try:
        return from_dict(LoadOptions, options)
    except ConfigError as e:
        raise ConfigError(f"load_pretrained option: {e}") from None


def _expected_params(model: nn.Module, example_inputs) -> dict:
    """The param tree `model` would create ({...: ShapeDtypeStruct}), without allocating it."""
    abstract = jax.eval_shape(model.init, jax.random.key(0), *example_inputs)
    return plain_params(abstract)


def from_hf(hf_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], *,
            source: str = "checkpoint", **options) -> tuple[nn.Module, dict]:
    """In-memory import: an HF config dict and its tensors {key: array} → (model, params).

    options: fields of LoadOptions (scan_layers, remat, dtype, param_dtype, ops).
    Returns params as a plain tree of jax arrays, in the scanned layout if scan_layers=True.
    """
    opts = _options(options)
    family = find_family(hf_config, where=f"{source} config")
    tensors = family.prepare_tensors(dict(hf_config), tensors)  # e.g. split fused q;k;v
    plan = family.plan_import(dict(hf_config), set(tensors), opts)
    expected_tree = _expected_params(plan.model, plan.example_inputs)
    expected = flatten(unscan_tree(expected_tree))  # rules speak the unscanned layout
    flat = import_tensors(list(plan.rules), tensors, expected, ignore=plan.ignore,
                          title=f"{source} ({plan.description}) does not fit our {type(plan.model).__name__}")
    tree = unflatten(flat)
    if is_scanned(expected_tree):
        tree = scan_tree(tree)
    _check_same_tree(tree, expected_tree, "converted params")
    return plan.model, jax.tree.map(jnp.asarray, tree)


def load_pretrained(path: str | os.PathLike, **options) -> tuple[nn.Module, dict]:
    """Loads an HF model directory (config.json + model.safetensors or sharded safetensors).

    Args:
      path: the directory.
      **options: LoadOptions fields: scan_layers (bool), remat, dtype, param_dtype, ops.
    Returns:
      (model, params): a Flax module whose config keeps the checkpoint's activation, norm eps and
      sizes, and its params (plain tree of jax arrays) for `model.apply({"params": params}, x)`.
    Raises:
      FileNotFoundError (no config.json / no weights), ConversionError (pickled weights only, a
      weights file that is not valid safetensors (named), unknown family or activation, ...),
      KeyDiffError (tensors do not fit the model).
    """
    hf_config = hf_io.read_config(path)
    family = find_family(hf_config, where=str(Path(path) / hf_io.CONFIG))  # fail on the family before reading GBs
    tensors = hf_io.read_tensors(path, family.weights_file, family.index_file)
    return from_hf(hf_config, tensors, source=str(path), **options)


def to_hf(model: nn.Module, params) -> tuple[dict, dict[str, np.ndarray]]:
    """In-memory export: (model, params) → (HF config dict, {checkpoint key: array}).

    params: {"params": tree} or the tree itself, scanned or not, boxed or not."""
    family = family_for_model(model)
    tree = plain_params(params)
    flat = {k: _exportable(v) for k, v in flatten(unscan_tree(jax.tree.map(np.asarray, tree))).items()}
    plan = family.plan_export(model, flat)
    # The params must be those of this model: a partial tree would write a partial checkpoint.
    expected = flatten(unscan_tree(_expected_params(model, plan.example_inputs)))
    _check_flat(flat, expected, f"params given to save_pretrained do not fit {type(model).__name__}",
                "the params")
    tensors = export_tensors(list(plan.rules), flat, title=f"cannot write {plan.description}")
    return plan.config, family.finish_tensors(tensors)


def save_pretrained(model: nn.Module, params, path: str | os.PathLike) -> Path:
    """Writes `path/config.json` + `path/model.safetensors` in the family's HF layout, loadable by
    transformers' `from_pretrained` and by `load_pretrained`. Returns the directory."""
    config, tensors = to_hf(model, params)
    return hf_io.write_dir(path, config, tensors, family_for_model(model).weights_file)


export_hf = save_pretrained


def _exportable(x) -> np.ndarray:
    x = np.asarray(x)
    # safetensors' numpy writer has no bfloat16/float8: widen those to float32 (lossless).
    if x.dtype.name == "bfloat16" or x.dtype.name.startswith("float8"):
        return x.astype(np.float32)
    return x


def _check_flat(flat: Mapping[str, Any], expected: Mapping[str, Any], title: str, source: str) -> None:
    missing = [f"{p} {fmt_shape(expected[p].shape)}" for p in sorted(set(expected) - set(flat))]
    unexpected = [f"{p} {fmt_shape(np.shape(flat[p]))}" for p in sorted(set(flat) - set(expected))]
    mismatched = [f"{p} {fmt_shape(np.shape(flat[p]))}: expected {fmt_shape(expected[p].shape)}"
                  for p in sorted(set(flat) & set(expected))
                  if tuple(np.shape(flat[p])) != tuple(expected[p].shape)]
    if missing or unexpected or mismatched:
        raise KeyDiffError(title, missing, unexpected, mismatched, source=source)


def _check_same_tree(tree: dict, expected_tree: dict, what: str) -> None:
    # After the rules this can only fail through a bug in the scanned-layout plumbing.
    _check_flat(flatten(tree), flatten(expected_tree), f"internal error: {what} do not match the model",
                "the converted params")
