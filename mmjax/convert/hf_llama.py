"""HF transformers `LlamaForCausalLM` ↔ our `LM` (mmjax/models/lm.py).

Both are the same network:

    ids → embed_tokens → depth × (x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))) → norm → lm_head
    Attn: q/k/v/o without bias, GQA (num_key_value_heads), RoPE in the rotate-half layout on q, k
          (pairs (i, i + Dh/2) rotated by pos · θ^(−2i/Dh), as our `apply_rope`), scale Dh^−½
    SwiGLU: down(silu(gate(x)) · up(x))            ours: fc2(silu(gate(x)) · fc1(x))

Checkpoint keys (relative to "model."; ours under "encoder/"):

    embed_tokens.weight [V, D]                        → token_embedding [V, D] (top level)
    layers.{i}.self_attn.{q,k,v}_proj.weight [H·Dh, D] → block_{i}/attn/{query,key,value}/kernel [D, H, Dh]
    layers.{i}.self_attn.o_proj.weight [D, H·Dh]       → block_{i}/attn/out/kernel [H, Dh, D]
    layers.{i}.mlp.{gate,up,down}_proj.weight          → block_{i}/mlp/{gate,fc1,fc2}/kernel
    layers.{i}.{input,post_attention}_layernorm.weight → block_{i}/norm1, norm2 scale
    norm.weight                                        → final_norm/scale
    lm_head.weight [V, D] (no "model." prefix)         → head/kernel [D, V]; absent when
                                                         tie_word_embeddings (we then have no head)

Config: rope_theta (transformers ≥ 5 writes it inside `rope_parameters`), rms_norm_eps, head_dim,
num_key_value_heads, max_position_embeddings and tie_word_embeddings carry over. What our LM does
not compute is refused with a ConversionError naming the field: RoPE scaling of any kind
(linear, dynamic, yarn, llama3, ...) or a partial rotary factor, attention or MLP biases, an
activation other than silu.
"""

from __future__ import annotations

from collections.abc import Collection

import jax
import jax.numpy as jnp

from mmjax.convert.family import ExportPlan, Family, ImportPlan, LoadOptions
from mmjax.convert.rules import DEFAULT_IGNORE, IDENTITY, ConversionError, Linear, Rule
from mmjax.layers.transformer import TransformerConfig
from mmjax.models.lm import LM, LMConfig

# transformers' LlamaConfig defaults, for keys a config.json leaves out (as transformers does).
HF_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "rope_theta": 10_000.0,
}

# Buffers older checkpoints saved beside the weights (RoPE's inverse frequencies).
_IGNORE = DEFAULT_IGNORE + (r"\.rotary_emb\.inv_freq$",)

# One block: (HF module relative to "model.layers.{i}.", our path relative to "encoder/block_{i}/",
# transform of the weight). Norms hold only a scale; every Linear is bias-free.
_BLOCK = (
    ("input_layernorm", "norm1/scale", IDENTITY),
    ("self_attn.q_proj", "attn/query/kernel", Linear(1)),
    ("self_attn.k_proj", "attn/key/kernel", Linear(1)),
    ("self_attn.v_proj", "attn/value/kernel", Linear(1)),
    ("self_attn.o_proj", "attn/out/kernel", Linear(2)),
    ("post_attention_layernorm", "norm2/scale", IDENTITY),
    ("mlp.gate_proj", "mlp/gate/kernel", Linear(1)),
    ("mlp.up_proj", "mlp/fc1/kernel", Linear(1)),
    ("mlp.down_proj", "mlp/fc2/kernel", Linear(1)),
)


def llama_rules(tied: bool) -> tuple[Rule, ...]:
    """Rules for LlamaForCausalLM's keys (tied: no lm_head)."""
    rules = [Rule("token_embedding", "model.embed_tokens.weight", "token_embedding"),
             Rule("final_norm", "model.norm.weight", "encoder/final_norm/scale")]
    for theirs, ours, tf in _BLOCK:
        rules.append(Rule(f"block.{ours.replace('/', '.')}", f"model.layers.{{i}}.{theirs}.weight",
                          f"encoder/block_{{i}}/{ours}", tf))
    if not tied:
        rules.append(Rule("head", "lm_head.weight", "head/kernel", Linear(1)))
    return tuple(rules)


def _rope(hf: dict) -> float:
    """rope_theta, after refusing every RoPE variant other than the plain one."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    for where, d in (("rope_parameters", params), ("rope_scaling", scaling or {})):
        if not isinstance(d, dict):
            raise ConversionError(f"config.json {where}={d!r} is not a dict")
        kind = d.get("rope_type", d.get("type", "default"))
        if kind != "default":
            raise ConversionError(
                f"config.json {where} has rope_type {kind!r} ({d}): mmjax's LM implements plain RoPE only; "
                "scaled RoPE (linear, dynamic, yarn, llama3, longrope, ...) would give different logits")
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConversionError(f"config.json {where} partial_rotary_factor={d['partial_rotary_factor']}: "
                                  "mmjax rotates every head channel")
    if hf.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ConversionError(f"config.json partial_rotary_factor={hf['partial_rotary_factor']}: mmjax rotates "
                              "every head channel")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    return float(theta if theta is not None else HF_DEFAULTS["rope_theta"])


def lm_config_from_hf(hf: dict, options: LoadOptions) -> LMConfig:
    get = lambda k: hf[k] if hf.get(k) is not None else HF_DEFAULTS[k]
    problems = [msg for bad, msg in (
        (get("hidden_act") not in ("silu", "swish"), f"hidden_act={get('hidden_act')!r} (only silu, i.e. SwiGLU)"),
        (bool(get("attention_bias")), "attention_bias=true (our Llama attention has no biases)"),
        (bool(get("mlp_bias")), "mlp_bias=true (our Llama MLP has no biases)"),
    ) if bad]
    if problems:
        raise ConversionError("config.json describes a Llama that mmjax's LM does not compute: " + "; ".join(problems))
    theta = _rope(hf)
    width, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ConversionError(f"config.json num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}")
    head_dim = int(hf.get("head_dim") or width // heads)
    if hf.get("head_dim") is None and width % heads:
        raise ConversionError(f"config.json hidden_size={width} is not divisible by num_attention_heads={heads} "
                              "and there is no head_dim")
    encoder = TransformerConfig(
        width=width, depth=int(get("num_hidden_layers")), num_heads=heads,
        num_kv_heads=None if kv_heads == heads else kv_heads,
        head_dim=None if head_dim * heads == width else head_dim, mlp_dim=int(get("intermediate_size")),
        activation="swiglu", norm="rmsnorm", norm_eps=float(get("rms_norm_eps")), use_bias=False,
        rope_base=theta, final_norm=True, scan_layers=options.scan_layers, remat=options.remat,
        dtype=options.dtype, param_dtype=options.param_dtype, ops=options.ops)
    return LMConfig(vocab_size=int(get("vocab_size")), max_len=int(get("max_position_embeddings")),
                    encoder=encoder, tie_embeddings=bool(get("tie_word_embeddings")))


def _example_inputs() -> tuple[jax.ShapeDtypeStruct]:
    return (jax.ShapeDtypeStruct((1, 1), jnp.int32),)


class HFLlama(Family):
    name = "llama"
    model_types = ("llama",)
    architectures = ("LlamaForCausalLM",)
    model_class = LM

    def plan_import(self, hf: dict, keys: Collection[str], options: LoadOptions) -> ImportPlan:
        arch = self.pick_architecture(hf, default="LlamaForCausalLM")
        cfg = lm_config_from_hf(hf, options)
        ignore = _IGNORE
        if cfg.tie_embeddings:
            # Older saves write the tied head too; HF then uses embed_tokens for it, and so do we.
            ignore = ignore + (r"^lm_head\.weight$",)
        return ImportPlan(LM(cfg), llama_rules(cfg.tie_embeddings), _example_inputs(), f"HF {arch}", ignore)

    def plan_export(self, model: LM, params: dict) -> ExportPlan:
        c, e = model.cfg, model.cfg.encoder
        hd = e.head_dim or e.width // e.num_heads
        problems = [msg for bad, msg in (
            (e.norm != "rmsnorm", f"norm={e.norm!r} (Llama uses RMSNorm)"),
            (e.activation != "swiglu", f"activation={e.activation!r} (Llama uses SwiGLU)"),
            (e.use_bias, "use_bias=True (Llama's layers have no biases)"),
            (e.rope_base is None, "no RoPE (rope_base=None)"),
            (e.qk_norm is not None, f"qk_norm={e.qk_norm!r}"),
            (not e.final_norm, "final_norm=False"),
            (c.rope_2d, "rope_2d=True (HF Llama has 1D RoPE)"),
            (c.embed_scale != 1.0, f"embed_scale={c.embed_scale} (Llama does not scale its embeddings)"),
            (e.head_dim is None and e.width % e.num_heads != 0, "width not divisible by num_heads"),
        ) if bad]
        if problems:
            raise ConversionError("this LM cannot be written as an HF LlamaForCausalLM: " + "; ".join(problems))
        hf = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": c.vocab_size, "hidden_size": e.width, "intermediate_size": e.mlp_dim or 4 * e.width,
            "num_hidden_layers": e.depth, "num_attention_heads": e.num_heads,
            "num_key_value_heads": e.num_kv_heads or e.num_heads, "head_dim": hd, "hidden_act": "silu",
            "max_position_embeddings": c.max_len, "rms_norm_eps": e.norm_eps,
            "tie_word_embeddings": c.tie_embeddings, "attention_bias": False, "mlp_bias": False,
            "attention_dropout": 0.0, "initializer_range": 0.02, "pretraining_tp": 1,
            # transformers ≥ 5 reads rope_parameters; older versions read rope_theta.
            "rope_theta": e.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": e.rope_base},
        }
        return ExportPlan(hf, llama_rules(c.tie_embeddings), _example_inputs(), "HF LlamaForCausalLM")


FAMILY = HFLlama()
