"""Shared layers: every tower in mmjax is composed from these."""

from mmjax.layers.attention import Attention
from mmjax.layers.linear import DenseGeneral
from mmjax.layers.masks import make_attention_mask
from mmjax.layers.mlp import Mlp, get_activation, quick_gelu
from mmjax.layers.multicrop import AttentionPool2x2, MultiCropLayout, multicrop_layout
from mmjax.layers.norms import Norm
from mmjax.layers.patch import ConvStem, PatchEmbed, patchify, stem_stride
from mmjax.layers.posemb import LearnedPosEmb, apply_rope, resize_posemb, sincos_2d
from mmjax.layers.transformer import (
                                      Block,
                                      Transformer,
                                      TransformerConfig,
                                      stack_block_params,
                                      unstack_block_params,
)

__all__ = [
    "Attention", "AttentionPool2x2", "Block", "ConvStem", "DenseGeneral", "LearnedPosEmb", "Mlp", "MultiCropLayout",
    "Norm", "PatchEmbed", "Transformer", "TransformerConfig", "apply_rope", "get_activation", "make_attention_mask",
    "multicrop_layout", "patchify", "quick_gelu", "resize_posemb", "sincos_2d", "stack_block_params", "stem_stride",
    "unstack_block_params",
]
