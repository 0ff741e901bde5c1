"""Models: thin modules over mmjax.layers, each built from a frozen config."""

from mmjax.models.autoencoder import Autoencoder, AutoencoderConfig, detokenize, forward_flops, tokenize
from mmjax.models.quantizer import QuantizerConfig, VectorQuantizer
from mmjax.models.vit import ViT, ViTConfig, vit_config
from mmjax.models.vlm import VLM, VLMConfig

__all__ = ["VLM", "Autoencoder", "AutoencoderConfig", "QuantizerConfig", "VLMConfig", "VectorQuantizer", "ViT",
           "ViTConfig", "detokenize", "forward_flops", "tokenize", "vit_config"]
