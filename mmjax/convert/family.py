"""What a checkpoint family provides to the converter, and the options every family accepts.

A family (HF ViT, later HF CLIP, SigLIP, Llama, LLaVA, ...) knows two things only:
  * how its config.json becomes our typed model config (and back), and
  * its list of `Rule`s (mmjax.convert.rules).
Reading files, applying rules, the key diff and the scanned layout are shared (mmjax.convert.core).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

import flax.linen as nn
import jax

from mmjax.config import config
from mmjax.convert import hf_io
from mmjax.convert.rules import DEFAULT_IGNORE, ConversionError, Rule
from mmjax.layers.transformer import RematPolicy
from mmjax.ops import OpsPolicy


@config
class LoadOptions:
    """Options of `load_pretrained` that change how the model runs, never what it computes."""

    scan_layers: bool = False  # stack the blocks for nn.scan (params get a leading [depth] axis)
    remat: RematPolicy = "none"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # the loaded params are cast to this
    ops: OpsPolicy = OpsPolicy()  # which kernels run (mmjax.ops)


@dataclasses.dataclass(frozen=True)
class ImportPlan:
    """How to build our model from one checkpoint.

    model: the module to return (LoadOptions applied).
    rules: checkpoint key → our param path (unscanned layout).
    example_inputs: ShapeDtypeStructs passed to `model.init` under `jax.eval_shape` to get the
      param tree the model expects.
    description: words for error messages, e.g. "HF ViTForImageClassification".
    ignore: regexes of checkpoint keys that are buffers, not weights.
    """

    model: nn.Module
    rules: tuple[Rule, ...]
    example_inputs: tuple[jax.ShapeDtypeStruct, ...]
    description: str
    ignore: tuple[str, ...] = DEFAULT_IGNORE


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """How to write our model in the family's layout: its config.json dict and the rules;
    example_inputs as in ImportPlan (to check the params against the model's expected tree)."""

    config: dict[str, Any]
    rules: tuple[Rule, ...]
    example_inputs: tuple[jax.ShapeDtypeStruct, ...]
    description: str


class Family:
    """Base class of a checkpoint family. Subclasses set the class attributes and the two plans."""

    name: str = ""
    model_types: tuple[str, ...] = ()  # config.json "model_type" values this family reads
    architectures: tuple[str, ...] = ()  # config.json "architectures" entries it supports
    class_names: tuple[str, ...] = ()  # diffusers: config.json "_class_name" values (no model_type there)
    model_class: type[nn.Module] | None = None  # our module it exports from
    weights_file: str = hf_io.WEIGHTS  # diffusers: diffusion_pytorch_model.safetensors
    index_file: str = hf_io.INDEX

    def plan_import(self, hf_config: dict, keys: Collection[str], options: LoadOptions) -> ImportPlan:
        raise NotImplementedError

    def prepare_tensors(self, hf_config: dict, tensors):
        """Checkpoint tensors before the rules run; a family may re-key them here, e.g. split a
        fused q;k;v tensor that one rule (one key → one param) cannot map. Default: unchanged."""
        return tensors

    def finish_tensors(self, tensors: dict) -> dict:
        """Inverse of `prepare_tensors` on export (e.g. fuse q;k;v again). Default: unchanged."""
        return tensors

    def plan_export(self, model: nn.Module, params: dict) -> ExportPlan:
        """params: our unscanned, flat {path: np.ndarray} (some layouts depend on values, e.g.
        whether all q/k/v biases are zero)."""
        raise NotImplementedError

    def pick_architecture(self, hf_config: dict, default: str) -> str:
        """The one supported entry of config.json's "architectures" (or `default` when absent)."""
        found = hf_config.get("architectures") or []
        ours = [a for a in found if a in self.architectures]
        if found and not ours:
            raise ConversionError(
                f"config.json architectures {found} (model_type {hf_config.get('model_type')!r}) are not "
                f"supported by the {self.name!r} converter; supported: {', '.join(self.architectures)}")
        return ours[0] if ours else default
