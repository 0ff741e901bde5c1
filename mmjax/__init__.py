"""mmjax: multimodal models for JAX as pure functions (encode → align → understand → generate)."""

from mmjax.convert import load_pretrained

__version__ = "0.1.0"
__all__ = ["__version__", "load_pretrained"]
