"""mmjax: multimodal models for JAX as pure functions (encode → align → understand → generate)."""

from mmjax.convert import load_pretrained
from mmjax.decode import generate

__version__ = "0.1.0"
__all__ = ["__version__", "generate", "load_pretrained"]
