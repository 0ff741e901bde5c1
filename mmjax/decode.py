"""On-device generation for the decoder LM: samplers, classifier-free guidance, prefill + KV-cache extend.

Samplers are pure functions of logits [B, V] (and an explicit `jax.random` key). They compose in the
order of HF's logits processors:

    constraint mask (token range [lo, hi), disallowed ids → −inf) → temperature (logits / τ)
      → top-k (keep the k largest) → top-p (keep the smallest set of most likely tokens whose
      probability mass ≥ p) → sample ~ softmax(logits)         (greedy: argmax after the mask)

Classifier-free guidance runs the conditional and the null-conditioned prompts as one doubled batch
[cond rows; uncond rows] and samples from

    logits = uncond + s · (cond − uncond)        (s = 1: the conditional model; s = 0: the unconditional)

feeding the one sampled token to both rows of a pair.

`generate` left-pads the prompts to a common length T0 (so every row writes the same KV-cache slot,
as HF does), fills the cache with the whole prompt in one call (prefill), then extends it one token
at a time inside a `lax.while_loop`, all under one `jax.jit` per (batch, T0, max_new_tokens,
sampler structure); the loop stops when every row has emitted EOS. See `mmjax/models/lm.py` for the
model's cache protocol (positions = cumsum(valid) − 1, kv_valid over every slot).

    out = mmjax.generate(model, params, [[5, 17, 99], [11, 2]], max_new_tokens=32, eos_id=2)
    out.sequences[i]   prompt + generated ids of row i (through EOS), numpy int32
    out.tokens         [B, 32] generated ids, pad_id after EOS;  out.lengths [B]

On the CPU (with the model's OpsPolicy cpu_kernels, one device, fp32, unscanned layers), generation
decodes with output-major copies of the dense kernels, made once per call
before the prefill: a few rows stream the weights faster that way, through mmjax's native small-rows
matmul (`mmjax.ops.dense_output_major`). The layers are not told: `nn.intercept_methods` routes each
DenseGeneral call to the copy of its kernel, from outside the model. It costs a second copy of the
kernels for the duration of the call; on other platforms nothing of this happens.

`prepare_generate` does the checks and set-up without running and returns a `GenerationPlan`
(plan() runs it; plan.lower() for ahead-of-time compilation, as `mmjax.bench_decode` does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax import ops
from mmjax.data.tokenizers import Tokenizer, check_vocab
from mmjax.layers.linear import DenseGeneral
from mmjax.models.lm import cache_shardings, init_cache
from mmjax.sharding import current_rules, logical_rules, tree_shardings

NEG_INF = -jnp.inf
# On the CPU, batches of at least this many rows (prompts, doubled with CFG) decode with output-major
# kernel copies (module docstring). Since q, k and v are three products, one row gains from them too
# (batch 1, alternated in one process: 1177 → 1129 ms per 128-token call; docs/cpu.md).
WEIGHT_MAJOR_ROWS = 1


# ----------------------------------------------------------------------------------------------
# Samplers: logits [B, V] → logits [B, V] (filters) or ids [B] (samplers)
# ----------------------------------------------------------------------------------------------
def check_sampling(*, temperature=0.0, top_k=None, top_p=None, token_range=None, disallowed_ids=None,
                   vocab_size: int | None = None) -> None:
    """Raises a ValueError/TypeError naming the first bad sampler setting (host-side, Python values)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
            raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.integer, np.floating)):
            raise TypeError(f"top_p must be a number or None, got {type(top_p).__name__}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if token_range is not None:
        if len(token_range) != 2 or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool)
                                            for x in token_range):
            raise TypeError(f"token_range must be a pair of ints (lo, hi), got {token_range!r}")
        lo, hi = token_range
        if not 0 <= lo < hi or (vocab_size is not None and hi > vocab_size):
            bound = f" <= vocab_size {vocab_size}" if vocab_size is not None else ""
            raise ValueError(f"token_range [lo, hi) must satisfy 0 <= lo < hi{bound}, got {tuple(token_range)}")
    if disallowed_ids is not None:
        ids = np.asarray(disallowed_ids)
        if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 1):
            raise TypeError(f"disallowed_ids must be a sequence of ints, got {disallowed_ids!r}")
        if ids.size and (ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size)):
            raise ValueError(f"disallowed_ids must lie in [0, {vocab_size}), got min {ids.min()}, max {ids.max()}")
        allowed = np.ones(vocab_size or (int(ids.max()) + 1 if ids.size else 1), bool)
        allowed[ids] = False
        if token_range is not None:
            allowed[: token_range[0]] = False
            allowed[token_range[1]:] = False
        if vocab_size is not None and not allowed.any():
            raise ValueError("token_range and disallowed_ids together forbid every token")


def constrain_logits(logits: jax.Array, *, token_range: tuple[int, int] | None = None,
                     disallowed_ids: Sequence[int] | None = None) -> jax.Array:
    """logits [B, V] with every id outside [lo, hi) and every disallowed id set to −inf."""
    v = logits.shape[-1]
    ids = jnp.arange(v)
    allowed = jnp.ones((v,), bool)
    if token_range is not None:
        lo, hi = token_range
        allowed = (ids >= lo) & (ids < hi)
    if disallowed_ids is not None and len(disallowed_ids):
        allowed = allowed.at[jnp.asarray(disallowed_ids, jnp.int32)].set(False)
    return jnp.where(allowed, logits, NEG_INF)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits per row ([B, V]; ties with the k-th are kept, as in HF), −inf elsewhere."""
    k = min(int(k), logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits: jax.Array, p) -> jax.Array:
    """Nucleus filter on logits [B, V]: keeps the smallest set of most likely tokens whose probability
    mass is ≥ p (always the most likely one), −inf elsewhere.

    Sorted descending with probabilities q_1 ≥ q_2 ≥ ..., token j is kept iff the mass before it,
    Σ_{i<j} q_i, is still < p. Ties with the last kept logit are kept too.
    """
    sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_desc.astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.maximum(jnp.sum(mass_before < p, axis=-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
    return jnp.where(logits < cutoff, NEG_INF, logits)


def process_logits(logits: jax.Array, *, temperature=1.0, top_k: int | None = None, top_p=None,
                   token_range: tuple[int, int] | None = None,
                   disallowed_ids: Sequence[int] | None = None) -> jax.Array:
    """The composed filter: constraint mask → temperature → top-k → top-p. logits [B, V] → [B, V]
    (float32); sampling from softmax of the result is the sampler. temperature must be > 0 here
    (greedy decoding does not divide)."""
    x = constrain_logits(logits.astype(jnp.float32), token_range=token_range, disallowed_ids=disallowed_ids)
    x = x / jnp.asarray(temperature, jnp.float32)
    if top_k is not None:
        x = top_k_filter(x, top_k)
    if top_p is not None and not (isinstance(top_p, (int, float)) and top_p >= 1.0):
        x = top_p_filter(x, top_p)
    return x


def first_argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` as int32 (the first maximum; the first NaN if a row has one), computed
    as a max and a min over the indices that reach it.

    Why not `jnp.argmax`: XLA:CPU lowers it to one variadic (value, index) reduce that it does not
    vectorise: 0.60 ms for [8, 32000] against 0.17 ms for these two plain reductions, on every
    decoding step (measured on the 2-core CPU).
    """
    m = jnp.max(x, axis=-1, keepdims=True)                       # NaN if the row has a NaN
    hit = (x == m) | jnp.isnan(x)
    v = x.shape[-1]
    return jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def greedy(logits: jax.Array, *, token_range=None, disallowed_ids=None) -> jax.Array:
    """The most likely allowed id per row: logits [B, V] → int32 [B]."""
    x = constrain_logits(logits.astype(jnp.float32), token_range=token_range, disallowed_ids=disallowed_ids)
    return first_argmax(x)


def sample(key: jax.Array, logits: jax.Array, *, temperature=1.0, top_k: int | None = None, top_p=None,
           token_range: tuple[int, int] | None = None, disallowed_ids: Sequence[int] | None = None) -> jax.Array:
    """One id per row drawn from the processed distribution: logits [B, V] → int32 [B].

    temperature == 0 (a Python number) is greedy; otherwise it may be a traced scalar.
    """
    if isinstance(temperature, (int, float)) and temperature == 0:
        return greedy(logits, token_range=token_range, disallowed_ids=disallowed_ids)
    x = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, token_range=token_range,
                       disallowed_ids=disallowed_ids)
    # The Gumbel-max draw of `jax.random.categorical(key, x)` (the same noise, so the same ids), with
    # the faster argmax.
    return first_argmax(x + jax.random.gumbel(key, x.shape, x.dtype))


def guide_logits(cond: jax.Array, uncond: jax.Array, scale) -> jax.Array:
    """Classifier-free guidance: uncond + scale · (cond − uncond); both [B, V] → [B, V] (float32)."""
    cond, uncond = cond.astype(jnp.float32), uncond.astype(jnp.float32)
    return uncond + jnp.asarray(scale, jnp.float32) * (cond - uncond)


def split_guided(logits: jax.Array, scale) -> jax.Array:
    """Logits of a doubled batch [2B, V] = [cond rows; uncond rows] → guided logits [B, V]."""
    if logits.shape[0] % 2:
        raise ValueError(f"a guided batch has cond and uncond halves; got an odd batch of {logits.shape[0]}")
    cond, uncond = jnp.split(logits, 2, axis=0)
    return guide_logits(cond, uncond, scale)


# ----------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------
class Generation(NamedTuple):
    """What `generate` returns (numpy, on the host).

    sequences: per row, a 1-D int32 array: the prompt ids followed by the generated ids up to and
      including EOS (no padding). For embedding prompts, the generated ids only.
    tokens: int32 [B, max_new_tokens], the generated ids; pad_id after a row's EOS.
    lengths: int32 [B], generated ids per row (EOS counted).
    """

    sequences: list[np.ndarray]
    tokens: np.ndarray
    lengths: np.ndarray


@functools.cache
def _default_mesh() -> Mesh:
    """A (data, fsdp, tensor) = (1, 1, 1) mesh on the default device."""
    from mmjax.sharding import MeshConfig, make_mesh
    return make_mesh(MeshConfig(shape=(1, 1, 1)), jax.devices()[:1])


def _platform(mesh: Mesh | None) -> str:
    """The platform the generation runs on: the mesh's devices, else the default device (where jit puts it)."""
    return (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform


def _weight_major(model: nn.Module, rows: int, max_new: int, mesh: Mesh | None) -> bool:
    """Whether a generation call decodes with output-major kernel copies (module docstring)."""
    e = model.cfg.encoder
    return (rows >= WEIGHT_MAJOR_ROWS and max_new > 1 and e.ops.cpu_kernels and not e.scan_layers
            and e.dtype == "float32" and _platform(mesh) == "cpu" and (mesh is None or mesh.size == 1))


@functools.lru_cache(maxsize=16)
def _dense_layers(model: nn.Module) -> tuple[tuple[tuple[str, ...], int], ...]:
    """(module path, in_rank) of every DenseGeneral the model calls, recorded from an abstract init."""
    found = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, DenseGeneral) and context.method_name == "__call__":
            found[tuple(context.module.path)] = context.module.in_rank
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1), jnp.int32))
    return tuple(found.items())


def _at(tree, path):
    for name in path:
        tree = tree[name]
    return tree


def _weight_major_interceptor(model: nn.Module, params):
    """An `nn.intercept_methods` interceptor computing every DenseGeneral of the model as x · W_tᵀ with an
    output-major copy W_t of its kernel, made now (before the decode loop, so once per call)."""
    policy = model.cfg.encoder.ops
    copies = {path: ops.output_major(_at(params, path)["kernel"], in_rank, policy=policy)
              for path, in_rank in _dense_layers(model)}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        path = tuple(module.path) if isinstance(module, DenseGeneral) else None
        if context.method_name != "__call__" or path not in copies:
            return next_fun(*args, **kwargs)
        x = args[0].astype(module.dtype)
        lead = x.shape[:x.ndim - module.in_rank]
        features = module.features if isinstance(module.features, tuple) else (module.features,)
        y = ops.dense_output_major(x.reshape(lead + (-1,)), copies[path].astype(module.dtype), policy=policy)
        y = y.reshape(lead + tuple(features))
        if module.use_bias:
            y = y + _at(params, path)["bias"].astype(module.dtype)
        return y

    return interceptor


@functools.lru_cache(maxsize=64)
def _compiled_generate(model: nn.Module, *, rows: int, prompt_len: int, max_new: int, cache_len: int,
                       embeds: bool, greedy_: bool, top_k: int | None, use_top_p: bool, guided: bool,
                       cache_dtype: str, weight_major: bool, mesh: Mesh | None, rules, prefix_lm: bool = False):
    """The jitted generation loop for one set of static shapes and sampler structure.

    f(params, inputs [R, T0] ids or [R, T0, D] embeddings (right-padded), lengths [R], key,
      temperature, top_p, cfg_scale, allowed [V] bool, eos_id (−1: none), pad_id, prefix [R] int32,
      positions [R, T0 + N] or [R, T0 + N, 2] int32 in the prompts' right-padded layout)
      → (tokens [B, N], n_generated [B]); R = 2B when guided. With prefix_lm, the prefill lets every
      prompt token see the first prefix[r] prompt tokens of its row (a prefix-LM mask); the steps
      after it are causal anyway (their queries come after the prefix).
    Values that only change numbers (not shapes or the sampler's structure) are runtime inputs, so
    changing them does not recompile.
    """
    cfg = model.cfg
    b = rows // 2 if guided else rows
    t0, n, s = prompt_len, max_new, cache_len
    has_logits_method = hasattr(model, "logits")

    def last_logits(variables, x, **kw):
        logits, aux = model.apply(variables, x, **kw)
        if has_logits_method and logits.shape[1] > 1:
            # Only the last position's logits are needed; computing them from the hidden state lets XLA
            # drop the unused [R, T0, V] head matmul of the prefill.
            last = model.apply(variables, aux["hidden"][:, -1:], method="logits")[:, 0]
        else:
            last = logits[:, -1]
        return last, aux["cache"]

    def pick(key, logits, temperature, top_p, cfg_scale, allowed):
        if guided:
            logits = split_guided(logits, cfg_scale)
        logits = jnp.where(allowed, logits.astype(jnp.float32), NEG_INF)  # the constraint mask comes first
        if greedy_:
            return greedy(logits)
        return sample(key, logits, temperature=temperature, top_k=top_k, top_p=top_p if use_top_p else None)

    def run(params, *args):
        if not weight_major:
            return loop(params, *args)
        with nn.intercept_methods(_weight_major_interceptor(model, params)):
            return loop(params, *args)

    def loop(params, inputs, lengths, key, temperature, top_p, cfg_scale, allowed, eos_id, pad_id, prefix, pos_in):
        # Left-align every row: slot j of row r holds prompt token j − pad_r (pads first).
        pad = t0 - lengths                                                    # [R]
        src = jnp.arange(t0)[None, :] - pad[:, None]                          # [R, T0]
        in_prompt = src >= 0
        src = jnp.maximum(src, 0)
        if embeds:
            x = jnp.take_along_axis(inputs, src[:, :, None], axis=1)
            x = jnp.where(in_prompt[:, :, None], x, 0).astype(inputs.dtype)
        else:
            x = jnp.where(in_prompt, jnp.take_along_axis(inputs, src, axis=1), pad_id)
        kv_valid = jnp.arange(s)[None, :] >= pad[:, None]                     # [R, S]: pads never attended

        def at(idx):  # slot indices [R, K] of the right-padded layout → positions [R, K] or [R, K, 2]
            return jnp.take_along_axis(pos_in, idx if pos_in.ndim == 2 else idx[:, :, None], axis=1)

        positions = jnp.where(in_prompt if pos_in.ndim == 2 else in_prompt[:, :, None], at(src), 0)

        variables = {"params": params}

        cache = init_cache(cfg, rows, s, cache_dtype)
        if mesh is not None:
            cache = jax.lax.with_sharding_constraint(cache, cache_shardings(cfg, mesh, rows, s, rules))
        # The prefix in slot space: after the row's left pads (which kv_valid hides anyway).
        extra = {"prefix_len": (pad + prefix).astype(jnp.int32)} if prefix_lm else {}
        logits, cache = last_logits(variables, x, positions=positions, kv_valid=kv_valid, cache=cache, cache_index=0,
                                    **extra)
        tok = pick(jax.random.fold_in(key, 0), logits, temperature, top_p, cfg_scale, allowed)  # [B]
        done = tok == eos_id                                                  # eos_id −1 never matches
        out = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok)
        n_gen = jnp.ones((b,), jnp.int32)

        def cond_fn(state):
            i, _, _, done, _, _ = state
            return (i < n) & ~jnp.all(done)

        def body_fn(state):
            i, cache, tok, done, out, n_gen = state
            feed = jnp.concatenate([tok, tok]) if guided else tok                               # [R]
            pos = at((lengths + i - 1).astype(jnp.int32)[:, None])                              # [R, 1(, 2)]
            logits, cache = last_logits(variables, feed[:, None], positions=pos, kv_valid=kv_valid, cache=cache,
                                        cache_index=t0 + i - 1)
            new = pick(jax.random.fold_in(key, i), logits, temperature, top_p, cfg_scale, allowed)
            new = jnp.where(done, pad_id, new)                   # a finished row emits (and is fed) pad
            out = jax.lax.dynamic_update_slice(out, new[:, None], (0, i))
            n_gen = n_gen + (~done).astype(jnp.int32)
            done = done | (new == eos_id)
            return i + 1, cache, new, done, out, n_gen

        state = (jnp.int32(1), cache, tok, done, out, n_gen)
        _, _, _, _, out, n_gen = jax.lax.while_loop(cond_fn, body_fn, state)
        return out, n_gen

    if mesh is None:
        return jax.jit(run)
    replicated = NamedSharding(mesh, P())
    return jax.jit(run, out_shardings=(replicated, replicated))


@functools.lru_cache(maxsize=16)
def _param_shardings(model: nn.Module, mesh: Mesh, rules):
    """NamedShardings of the model's params from their logical names (traced once per model and mesh)."""
    abstract = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1), jnp.int32))
    return tree_shardings(abstract["params"], mesh, rules)


def _as_prompt_arrays(prompts, lengths, tokenizer, what: str):
    """Prompts (list of id lists / strings, or an array [B, T] / [B, T, D] + lengths) → (right-padded
    numpy array, lengths int32 [B], embeds?)."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError(f"{what} must be a batch (a list of prompts), got a single {type(prompts).__name__}")
    if isinstance(prompts, (list, tuple)):
        if lengths is not None:
            raise ValueError(f"lengths is only for array {what}; a list gives each prompt's length itself")
        if not prompts:
            raise ValueError(f"{what} is empty: give at least one prompt")
        rows = []
        for i, p in enumerate(prompts):
            if isinstance(p, (str, bytes)):
                if tokenizer is None:
                    raise TypeError(f"{what}[{i}] is text; pass tokenizer= to encode it, or give token ids")
                p = tokenizer.encode(p)
            p = np.asarray(p)
            if p.ndim != 1:
                raise ValueError(f"{what}[{i}] must be a flat list of token ids, got shape {p.shape}")
            if p.size == 0:
                raise ValueError(f"{what}[{i}] is an empty prompt; every prompt needs at least one token")
            if not np.issubdtype(p.dtype, np.integer):
                raise TypeError(f"{what}[{i}] must hold integer token ids, got {p.dtype}")
            rows.append(p)
        t = max(len(p) for p in rows)
        arr = np.zeros((len(rows), t), np.int32)
        for i, p in enumerate(rows):
            arr[i, : len(p)] = p
        return arr, np.array([len(p) for p in rows], np.int32), False
    arr = prompts if isinstance(prompts, jax.Array) else np.asarray(prompts)
    embeds = jnp.issubdtype(arr.dtype, jnp.floating)
    if not embeds and not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"{what} must be int token ids [B, T] or float embeddings [B, T, D], got {arr.dtype}")
    if arr.ndim != (3 if embeds else 2):
        kind = "embeddings [B, T, D]" if embeds else "token ids [B, T]"
        raise ValueError(f"{what} as {kind} must have rank {3 if embeds else 2}, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {arr.shape}): every prompt needs at least one token")
    if lengths is None:
        lengths = np.full((arr.shape[0],), arr.shape[1], np.int32)
    lengths = np.asarray(lengths)
    if lengths.shape != (arr.shape[0],) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be ints [B={arr.shape[0]}], got {lengths.dtype} {lengths.shape}")
    if lengths.min() < 1:
        raise ValueError(f"{what} row {int(np.argmin(lengths))} is an empty prompt (length {lengths.min()})")
    if lengths.max() > arr.shape[1]:
        raise ValueError(f"lengths up to {lengths.max()} exceed the {what} array's length {arr.shape[1]}")
    if not embeds:
        arr = np.asarray(arr).astype(np.int32)
    return arr, lengths.astype(np.int32), embeds


def _as_positions(positions, lens: np.ndarray, t: int, n: int, cfg, what: str) -> np.ndarray:
    """positions (None, or ints [B or 1, ≥ max(lens) + N] / [.., .., 2]) → int32 [B, T + N(, 2)],
    checked: every row's used slots (its prompt and its N generated tokens) lie in [0, max_len)."""
    b = lens.shape[0]
    if positions is None:
        return np.broadcast_to(np.arange(t + n, dtype=np.int32), (b, t + n)).copy()
    p = np.asarray(positions)
    two_d = bool(getattr(cfg, "rope_2d", False))
    if not np.issubdtype(p.dtype, np.integer):
        raise TypeError(f"{what} must be integers, got {p.dtype}")
    if p.ndim not in (2, 3) or (p.ndim == 3 and (p.shape[2] != 2 or not two_d)):
        raise ValueError(f"{what} must be [B, T + N]" + (" or [B, T + N, 2]" if two_d else "")
                         + f", got shape {p.shape}")
    if p.shape[0] not in (b, 1) or p.shape[1] < int(lens.max()) + n:
        raise ValueError(f"{what} must have B={b} rows (or one) and at least max(lengths) + max_new_tokens = "
                         f"{int(lens.max()) + n} columns (the prompt, then the generated tokens), got {p.shape}")
    p = np.broadcast_to(p, (b,) + p.shape[1:])
    used = p[np.arange(p.shape[1])[None, :] < (lens + n)[:, None]]
    if used.min() < 0 or used.max() >= cfg.max_len:
        raise ValueError(f"{what} must lie in [0, max_len={cfg.max_len}) on every prompt and generated slot, "
                         f"got values from {int(used.min())} to {int(used.max())}")
    return _pad_to(p[:, :t + n].astype(np.int32), t + n)


def _pad_to(arr, t: int):
    """Right-pads axis 1 of a prompt array to t (zeros: beyond `lengths`, never read)."""
    if arr.shape[1] == t:
        return arr
    widths = [(0, 0), (0, t - arr.shape[1])] + [(0, 0)] * (arr.ndim - 2)
    return (jnp if isinstance(arr, jax.Array) else np).pad(arr, widths)


def generate(model: nn.Module, params, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, rng: jax.Array | None = None,
             eos_id: int | None = None, pad_id: int = 0, token_range: tuple[int, int] | None = None,
             disallowed_ids: Sequence[int] | None = None, cfg_scale: float | None = None, null_prompts=None,
             lengths=None, null_lengths=None, cache_len: int | None = None, cache_dtype: str | None = None,
             tokenizer: Tokenizer | None = None, mesh: Mesh | None = None, rules=None,
             prefix_len=None, positions=None, null_positions=None) -> Generation:
    """Generates up to `max_new_tokens` per prompt with a KV cache, the whole loop on device.

    Args:
      model, params: an `mmjax.models.lm.LM` and its params (a plain or logically boxed tree, as from
        `mmjax.load_pretrained` or `model.init(...)["params"]`).
      prompts: a list of token-id lists (any lengths ≥ 1; strings too when `tokenizer` is given), or
        an int array [B, T] or float embeddings [B, T, D] (e.g. a VLM's image features spliced among
        text embeddings) with `lengths` [B]: row i's prompt is its first lengths[i] entries.
      max_new_tokens: N ≥ 1; every row may generate up to N ids (prefill gives the first).
      temperature: 0 → greedy (argmax; top_k / top_p are then irrelevant); > 0 → sampling with
        top_k / top_p (applied in the order mask → temperature → top-k → top-p).
      rng: a `jax.random` key for sampling (default key 0); step i draws with fold_in(rng, i).
      eos_id: a row stops after emitting it (later positions hold pad_id); None: never stop early.
      pad_id: id that fills the pads (fed to the model after EOS and returned there).
      token_range: (lo, hi): only ids in [lo, hi) may be generated (e.g. image-code tokens).
      disallowed_ids: ids never generated.
      cfg_scale, null_prompts: classifier-free guidance with scale s over [prompts; null_prompts] as
        one doubled batch; null_prompts: same kind as prompts, B of them or one shared by every row.
      cache_len: KV-cache slots S (default T0 + N, T0 = the longest prompt); T0 + N ≤ S ≤ model max_len.
      cache_dtype: the cache's dtype (default the model's compute dtype).
      tokenizer: checked against the model's vocabulary (`check_vocab`) and used for text prompts.
      mesh, rules: run on a (data, fsdp, tensor) mesh: params are placed with their logical shardings
        (`mmjax.sharding.tree_shardings`), the cache shards like the activations.
      prefix_len: prefix-LM prompts (PaliGemma): an int or ints [B], 1 ≤ prefix_len ≤ the row's prompt
        length; during the prefill every prompt token attends to the row's first prefix_len prompt
        tokens (bidirectional prefix, causal after it). None: causal. Not with cfg_scale.
      positions: the RoPE positions of the prompt and of the generated tokens, int [B, T + N] (or
        [B, T + N, 2] for a `rope_2d` LM) in the right-padded prompts' layout: row b's prompt token j
        is at positions[b, j], its generated token i at positions[b, lengths[b] + i] (T: the padded
        prompt length, N = max_new_tokens). None: 0, 1, 2, ... along each row.
      null_positions: the same for null_prompts (with cfg_scale; required when positions is given).

    Returns:
      `Generation(sequences, tokens [B, N], lengths [B])`, numpy; see its docstring.

    One compile per (B, T0, N, S, sampler structure: greedy or not, top_k, top_p on/off, guided; mesh).
    temperature, top_p, cfg_scale, token_range, disallowed_ids, eos_id and pad_id are runtime inputs:
    changing them does not recompile.
    """
    return prepare_generate(model, params, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, rng=rng, eos_id=eos_id, pad_id=pad_id, token_range=token_range,
                            disallowed_ids=disallowed_ids, cfg_scale=cfg_scale, null_prompts=null_prompts,
                            lengths=lengths, null_lengths=null_lengths, cache_len=cache_len, cache_dtype=cache_dtype,
                            tokenizer=tokenizer, mesh=mesh, rules=rules, prefix_len=prefix_len,
                            positions=positions, null_positions=null_positions)()


def prepare_generate(model: nn.Module, params, prompts, *, max_new_tokens: int, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, rng: jax.Array | None = None,
                     eos_id: int | None = None, pad_id: int = 0, token_range: tuple[int, int] | None = None,
                     disallowed_ids: Sequence[int] | None = None, cfg_scale: float | None = None,
                     null_prompts=None, lengths=None, null_lengths=None, cache_len: int | None = None,
                     cache_dtype: str | None = None, tokenizer: Tokenizer | None = None, mesh: Mesh | None = None,
                     rules=None, prefix_len=None, positions=None, null_positions=None) -> GenerationPlan:
    """`generate`'s checks and set-up without running: returns a `GenerationPlan` (same arguments)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not all(hasattr(cfg, a) for a in ("vocab_size", "max_len", "encoder")):
        raise TypeError(f"generate needs a decoder LM (mmjax.models.lm.LM) with cfg.vocab_size / max_len / "
                        f"encoder, got {type(model).__name__}")
    vocab = cfg.vocab_size
    if tokenizer is not None:
        check_vocab(tokenizer, vocab)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, token_range=token_range,
                   disallowed_ids=disallowed_ids, vocab_size=vocab)
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and not (isinstance(value, (int, np.integer)) and 0 <= value < vocab):
            raise ValueError(f"{name} must be a token id in [0, {vocab}), got {value!r}")

    arr, lens, embeds = _as_prompt_arrays(prompts, lengths, tokenizer, "prompts")
    b = arr.shape[0]
    guided = cfg_scale is not None
    if guided and (positions is None) != (null_positions is None):
        raise ValueError("with cfg_scale give positions and null_positions together (the null rows need theirs)")
    if null_positions is not None and not guided:
        raise ValueError("null_positions is only used with cfg_scale (classifier-free guidance)")
    pos = _as_positions(positions, lens, arr.shape[1], max_new_tokens, cfg, "positions")
    if guided:
        if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float, np.integer, np.floating)) \
                or not np.isfinite(cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
        if null_prompts is None:
            raise ValueError("cfg_scale needs null_prompts (the null-condition prompts of the doubled batch)")
        null_arr, null_lens, null_embeds = _as_prompt_arrays(null_prompts, null_lengths, tokenizer, "null_prompts")
        if null_embeds != embeds or (embeds and null_arr.shape[2] != arr.shape[2]):
            raise ValueError("null_prompts must be the same kind as prompts (both ids, or embeddings of one width)")
        if null_arr.shape[0] == 1 and b > 1:
            null_arr = (jnp if isinstance(null_arr, jax.Array) else np).repeat(null_arr, b, axis=0)
            null_lens = np.repeat(null_lens, b)
        if null_arr.shape[0] != b:
            raise ValueError(f"null_prompts has {null_arr.shape[0]} rows; give one or B={b}")
        null_pos = _as_positions(null_positions, null_lens, null_arr.shape[1], max_new_tokens, cfg, "null_positions")
        if null_pos.ndim != pos.ndim:
            raise ValueError(f"null_positions {null_pos.shape} and positions {pos.shape} must have the same rank")
        t = max(arr.shape[1], null_arr.shape[1])
        cat = jnp.concatenate if embeds else np.concatenate
        arr, lens = cat([_pad_to(arr, t), _pad_to(null_arr, t)]), np.concatenate([lens, null_lens])
        pos = np.concatenate([_pad_to(pos, t + max_new_tokens), _pad_to(null_pos, t + max_new_tokens)])
    elif null_prompts is not None:
        raise ValueError("null_prompts is only used with cfg_scale (classifier-free guidance)")

    prefix = np.zeros((arr.shape[0],), np.int32)
    if prefix_len is not None:
        if guided:
            raise ValueError("prefix_len (prefix-LM prompts) is not supported with cfg_scale")
        p = np.broadcast_to(np.asarray(prefix_len), (b,))
        if not np.issubdtype(p.dtype, np.integer):
            raise TypeError(f"prefix_len must be an int or ints [B={b}], got {np.asarray(prefix_len).dtype}")
        bad = (p < 1) | (p > lens)
        if bad.any():
            r = int(np.argmax(bad))
            raise ValueError(f"prefix_len must lie in [1, the prompt's length]: row {r} has prefix_len {int(p[r])} "
                             f"and a prompt of {int(lens[r])} tokens")
        prefix = p.astype(np.int32)

    t0 = int(lens.max())
    arr = arr[:, :t0]
    pos = pos[:, :t0 + max_new_tokens]  # every row's prompt and generated slots (lengths + N ≤ T0 + N)
    if embeds:
        if arr.shape[2] != cfg.encoder.width:
            raise ValueError(f"prompt embeddings must be [B, T, D={cfg.encoder.width}], got {arr.shape}")
    else:
        in_prompt = np.arange(t0)[None, :] < lens[:, None]
        bad = in_prompt & ((arr < 0) | (arr >= vocab))
        if bad.any():
            r, j = np.argwhere(bad)[0]
            raise ValueError(f"prompt token ids must lie in [0, {vocab}); row {r % b} has {int(arr[r, j])} at {j}"
                             " (the tokenizer and the model's vocabulary do not match)")
    need = t0 + max_new_tokens
    if cache_len is None:
        cache_len = need
    if need > cache_len or cache_len > cfg.max_len:
        raise ValueError(f"the longest prompt ({t0} tokens) + max_new_tokens ({max_new_tokens}) = {need} needs a "
                         f"KV cache of ≥ {need} slots; cache_len={cache_len}, model max_len={cfg.max_len}")

    params = params.get("params", params) if set(params) == {"params"} else params
    params = nn.meta.unbox(params)
    if mesh is not None:
        params = jax.device_put(params, _param_shardings(model, mesh, None if rules is None else tuple(rules)))
    if cache_dtype is None:
        cache_dtype = str(jnp.dtype(cfg.encoder.dtype))
    fn = _compiled_generate(
        model, rows=int(arr.shape[0]), prompt_len=t0, max_new=int(max_new_tokens), cache_len=int(cache_len),
        embeds=bool(embeds), greedy_=temperature == 0, top_k=None if top_k is None else int(top_k),
        use_top_p=top_p is not None and top_p < 1.0, guided=guided, cache_dtype=cache_dtype,
        weight_major=_weight_major(model, int(arr.shape[0]), int(max_new_tokens), mesh), mesh=mesh,
        rules=None if rules is None else tuple(rules), prefix_lm=prefix_len is not None)
    key = jax.random.key(0) if rng is None else rng
    allowed = np.ones((vocab,), bool)
    if token_range is not None:
        allowed[: token_range[0]] = allowed[token_range[1]:] = False
    if disallowed_ids is not None:
        allowed[np.asarray(disallowed_ids, np.int64)] = False
    runtime = (jnp.float32(temperature or 1.0), jnp.float32(1.0 if top_p is None else top_p),
               jnp.float32(0.0 if cfg_scale is None else cfg_scale), allowed,
               jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id), prefix, pos)
    return GenerationPlan(fn, (params, arr, lens, key, *runtime), b, embeds, mesh, rules)


@dataclasses.dataclass(frozen=True)
class GenerationPlan:
    """A checked, ready-to-run generation: the jitted loop and its arguments (see `prepare_generate`).

    plan() runs it and returns a `Generation`; plan.lower() gives the `jax.stages.Lowered` for
    ahead-of-time compilation (plan.run(compiled) then runs a compiled executable instead).
    """

    fn: Callable
    args: tuple
    batch: int
    embeds: bool
    mesh: Mesh | None
    rules: Any

    def _context(self):
        # Traced and run under a mesh, so that mmjax.ops picks the implementations of the mesh's platform
        # while tracing; without one, the default device's own one-device mesh (where jit runs it).
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh if self.mesh is not None else _default_mesh()))
        stack.enter_context(logical_rules(self.rules if self.rules is not None else current_rules()))
        return stack

    def lower(self):
        with self._context():
            return self.fn.lower(*self.args)

    def run(self, compiled=None) -> tuple[jax.Array, jax.Array]:
        """(tokens [B, N], n_generated [B]) as device arrays (asynchronous: block on them to time)."""
        with self._context():
            return (compiled or self.fn)(*self.args)

    def result(self, out) -> Generation:
        tokens, n_gen = np.asarray(out[0]), np.asarray(out[1])
        if self.embeds:
            return Generation([tokens[i, : n_gen[i]].copy() for i in range(self.batch)], tokens, n_gen)
        arr, lens = self.args[1], self.args[2]
        sequences = [np.concatenate([arr[i, : lens[i]], tokens[i, : n_gen[i]]]).astype(np.int32)
                     for i in range(self.batch)]
        return Generation(sequences, tokens, n_gen)

    def __call__(self) -> Generation:
        return self.result(self.run())


__all__ = ["Generation", "GenerationPlan", "check_sampling", "constrain_logits", "generate", "greedy", "guide_logits",
           "prepare_generate", "process_logits", "sample", "split_guided", "top_k_filter", "top_p_filter"]
