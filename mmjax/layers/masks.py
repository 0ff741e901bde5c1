"""The attention mask helper (defined in `mmjax.ops.mask`, where the attention implementations read it)."""

from mmjax.ops.mask import AttentionMask, make_attention_mask

__all__ = ["AttentionMask", "make_attention_mask"]
