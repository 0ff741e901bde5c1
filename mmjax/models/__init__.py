"""Models: thin modules over mmjax.layers, each built from a frozen config."""

from mmjax.models.autoencoder import Autoencoder, AutoencoderConfig, detokenize, forward_flops, tokenize
from mmjax.models.quantizer import QuantizerConfig, VectorQuantizer
from mmjax.models.vit import ViT, ViTConfig, vit_config

__all__ = ["Autoencoder", "AutoencoderConfig", "QuantizerConfig", "VectorQuantizer", "ViT", "ViTConfig",
           "detokenize", "forward_flops", "tokenize", "vit_config"]
