"""Models: thin modules over mmjax.layers, each built from a frozen config."""

from mmjax.models.vit import ViT, ViTConfig, vit_config

__all__ = ["ViT", "ViTConfig", "vit_config"]
