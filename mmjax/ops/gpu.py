"""cuDNN flash attention (through `jax.nn.dot_product_attention(implementation="cudnn")`), where its
constraints hold; `unsupported` names the first one that does not.

Sequence lengths that are not a multiple of PAD_TO (a ViT's 197 tokens) are padded to one, and the
real lengths passed as cuDNN's padding mask (query_seq_lengths / key_value_seq_lengths): cuDNN then
skips the padded keys, and the padded query rows are cut off afterwards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mmjax.ops.lowering import only_on_vjp
from mmjax.ops.mask import AttentionMask

PAD_TO = 64
MAX_HEAD_DIM = 128


@functools.cache
def cuda_backend() -> bool:
    """Whether this process has a CUDA backend (cuDNN's version and the GPU can then be checked)."""
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:
        return False


def unsupported(q: jax.Array, k: jax.Array, mask) -> str | None:
    """Why cuDNN flash attention cannot take q [B, T, H, Dh], k [B, S, Hkv, Dh] and this mask, or None."""
    if not cuda_backend():
        return "no CUDA backend in this process, so cuDNN cannot be checked"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention takes bf16/fp16, got {q.dtype}"
    dh = q.shape[-1]
    if dh > MAX_HEAD_DIM or dh % 8:
        return f"head dim {dh}: cuDNN flash attention needs ≤ {MAX_HEAD_DIM} and a multiple of 8"
    if mask is not None and not (isinstance(mask, AttentionMask) and (mask.is_full or mask.is_plain_causal)):
        return "a mask other than none or causal from position 0"
    return None


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None) -> jax.Array:
    """q [B, T, H, Dh], k, v [B, S, Hkv, Dh] → [B, T, H, Dh] with cuDNN (call `unsupported` first)."""
    causal = mask is not None and mask.causal
    # cuDNN's custom call lowers for CUDA only: keep it out of a multi-platform export's other branches.
    return only_on_vjp("cuda", functools.partial(_cudnn, causal=causal), 3)(q, k, v)


def _cudnn(q, k, v, *, causal: bool):
    b, t = q.shape[:2]
    s = k.shape[1]
    tp, sp = _round_up(t, PAD_TO), _round_up(s, PAD_TO)
    if (tp, sp) == (t, s):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
    out = jax.nn.dot_product_attention(
        pad(q, tp), pad(k, sp), pad(v, sp), is_causal=causal, implementation="cudnn",
        query_seq_lengths=jnp.full((b,), t, jnp.int32), key_value_seq_lengths=jnp.full((b,), s, jnp.int32))
    return out[:, :t]
