"""mmjax: multimodal models for JAX as pure functions (encode → align → understand → generate)."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["__version__", "generate", "load_pretrained", "save_pretrained"]

if TYPE_CHECKING:
    from mmjax.convert import load_pretrained, save_pretrained
    from mmjax.decode import generate

# The public entry points load on first use, so that `import mmjax.runtime` (the `mmjax` command's
# re-exec, before anything heavy) does not import JAX.
_LAZY = {"load_pretrained": "mmjax.convert", "save_pretrained": "mmjax.convert", "generate": "mmjax.decode"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmjax' has no attribute {name!r}")
