"""mmjax's native CPU kernels (XLA FFI handlers in the .cc files here): training attention and norms,
attention over a KV cache, and the decode path's small-rows matmul and transpose, plus the XLA:CPU
layout of dense layers. Only `mmjax.ops` calls them, in the CPU branch of its platform choice.

Build: `python -m mmjax.ops.cpu` builds (or finds) the library and prints where; otherwise the first
lowering for the CPU of a program that calls a kernel builds it (`library.py`). Figures: docs/cpu.md.
"""

from mmjax.ops.cpu.attention import attention, attention_usable, cache_attention, cache_attention_usable
from mmjax.ops.cpu.library import KernelUnavailable, build, load, machine_limit, unavailable_reason
from mmjax.ops.cpu.matmul import dense_rows, rowdot, rowdot_usable, rows_dot, transpose
from mmjax.ops.cpu.norm import norm, norm_usable

__all__ = ["KernelUnavailable", "attention", "attention_usable", "build", "cache_attention", "cache_attention_usable",
           "dense_rows", "load", "machine_limit", "norm", "norm_usable", "rowdot", "rowdot_usable", "rows_dot",
           "transpose", "unavailable_reason"]
