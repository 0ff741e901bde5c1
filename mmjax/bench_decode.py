"""Batched greedy decoding speed: `mmjax.generate` against HF `LlamaForCausalLM.generate`, same weights.

    python -m mmjax.bench_decode [--batch-sizes 8,1] [--prompt-len 16] [--new-tokens 128] [--repeats 3]
                                 [--model small|1b|micro] [--width 512 --depth 8 --heads 8 --mlp 1376
                                 --vocab 32000] [--dtype float32|bfloat16] [--out F.json]

A randomly initialised HF `LlamaForCausalLM` is saved with `save_pretrained` and loaded on our side
with `mmjax.load_pretrained`, so both decoders are one model; --dtype (default float32) is the dtype
of both sides' weights and compute (bfloat16: HF's model `.to(torch.bfloat16)`, ours loaded with
dtype = param_dtype = bfloat16). --model picks a size from MODELS ("small", the default; "1b", a
TinyLlama-1.1B shape, what `mmjax bench --suite gpu` decodes on an accelerator; "micro" for tests);
--width etc. override it. Our side runs on jax.devices()[0]; HF on CUDA when
`torch.cuda.is_available()`, synchronised before each call returns, else on the CPU (sharing a GPU,
JAX runs with XLA_PYTHON_CLIENT_PREALLOCATE=false unless it is set). Both decode the
same random prompts (all of length --prompt-len) greedily for exactly --new-tokens tokens (no EOS),
HF with `do_sample=False` and its default KV cache and attention, `torch.set_num_threads(os.cpu_count())`
(--torch-threads 2,1 adds HF at 1 thread: on a loaded machine PyTorch's thread pool can be several
times slower with all cores than with one, which would flatter the ratio). Each timed call comes
after a --settle-s sleep (0.5 s): the sides alternate, and each runtime's worker threads spin for a
while after its call, taking the 2 cores from the other side's next call.

Figures per side and batch size (seconds; the best of --repeats runs, ours and HF interleaved so that
load from other processes hits both alike; "median" repeats them with medians, and every run's time
is kept in *_all):

    compile_s        ours: lower + compile of the whole generation loop (prefill + while_loop) for N
                     new tokens; compile_first_s the same for N = 1 (prefill only). HF: none (eager);
                     first_call_s is each side's first, untimed-warmup call.
    first_token_s    latency of the first token: generate with max_new_tokens = 1 (prefill + pick)
    per_token_s      (total_s − first_token_s) / (N − 1): one KV-cache extend step
    total_s          generate with max_new_tokens = N, end to end (host prompts in, host tokens out)
    tokens_per_s     B · N / total_s
    ratio            ours tokens_per_s / HF tokens_per_s (> 1: we are faster)
    tokens_match     fraction of generated tokens equal to HF's (greedy, same weights; a near-tie
                     that rounding flips, far more often in bf16, changes the rest of that row)
    weight_gb_per_s  weight bytes a step reads / per_token_s: every weight once, but of an untied input
                     embedding only the fed rows (not counted); a lower bound on the bandwidth the step
                     achieves, as the KV cache it also reads is not counted
    of_read_roof     weight_gb_per_s / the machine's read bandwidth, measured in the same run before the
                     cases (`read_bandwidth`: the best of 10 jitted sums over a 256 MiB fp32 array; 2 GiB
                     on an accelerator)
    achieved_flops_per_s  model.flops_per_token × tokens_per_s, with flops_per_token = 2 × the params a
                     step multiplies with (every weight of 2+ dimensions but the input embedding;
                     attention over the KV cache not counted); `mmjax bench --suite gpu` divides it by
                     its matmul peaks for MFU

The JSON also says whether our side multiplied with mmjax's CPU decode kernel (`cpu_kernel`; see
mmjax/ops/cpu) and from how many rows (`weight_major_rows`, mmjax.decode.WEIGHT_MAJOR_ROWS).

The machine may be shared: the JSON records the load average before and after; timings are noisy then.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from mmjax.decode import prepare_generate

# Seconds of sleep before each timed call. The sides alternate, and a runtime's worker threads keep
# spinning for a while after its call (PyTorch's OpenMP pool, XLA's); on 2 cores that spinning took the
# cores from the next side's call.
SETTLE_S = 0.5

# Model sizes (LlamaConfig): "small" is the CPU default; "1b" has TinyLlama-1.1B's shape (GQA, 4 kv
# heads); "micro" is for tests.
MODELS: dict[str, dict[str, int | None]] = {
    "small": {"width": 512, "depth": 8, "heads": 8, "kv_heads": None, "mlp": 1376, "vocab": 32_000},
    "1b": {"width": 2048, "depth": 22, "heads": 32, "kv_heads": 4, "mlp": 5632, "vocab": 32_000},
    "micro": {"width": 32, "depth": 2, "heads": 4, "kv_heads": None, "mlp": 64, "vocab": 128},
}
DTYPES = ("float32", "bfloat16")


def _hf_config(width: int, depth: int, heads: int, kv_heads: int, mlp: int, vocab: int, max_len: int):
    import transformers as T
    return T.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=mlp, num_hidden_layers=depth,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_len,
                         rope_theta=10_000.0, tie_word_embeddings=False, pad_token_id=0, bos_token_id=None,
                         eos_token_id=None)


def torch_device(torch):
    """"cuda" when PyTorch sees a GPU, else "cpu"."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_models(hf_config, directory: str | Path, seed: int = 0, dtype: str = "float32"):
    """(hf_model, our_model, our_params) for one random HF Llama, through save_pretrained/load_pretrained;
    HF's model on `torch_device` (initialised there), both in `dtype`."""
    import torch
    import transformers as T

    import mmjax
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    T.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    with torch.device(torch_device(torch)):
        hf = T.LlamaForCausalLM(hf_config)
    hf = hf.to(torch.bfloat16 if dtype == "bfloat16" else torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf.save_pretrained(directory)
    model, params = mmjax.load_pretrained(directory, dtype=dtype, param_dtype=dtype)
    return hf, model, params


def measure_read_bandwidth(nbytes: int | None = None, repeats: int = 10) -> float:
    """Bytes/s of XLA reading an fp32 array once (a jitted sum; best of `repeats`): the roof for a
    decode step, which must read every weight once. nbytes None: 256 MiB on a CPU, 2 GiB elsewhere
    (a smaller read takes a few µs there, and the dispatch around it would count)."""
    nbytes = nbytes or _read_bytes()
    x = jax.numpy.ones((nbytes // 4,), jax.numpy.float32)
    total = jax.jit(jax.numpy.sum)
    total(x).block_until_ready()
    best = min(_timed(lambda: total(x).block_until_ready())[0] for _ in range(repeats))
    return x.nbytes / best


def _read_bytes() -> int:
    return 256 << 20 if jax.default_backend() == "cpu" else 2 << 30


def _median(xs):
    return float(np.median(np.asarray(xs, np.float64)))


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


class _Ours:
    """Our side for one batch: AOT-compiled loops for N and for 1 new token."""

    def __init__(self, model, params, prompts: np.ndarray, new: int):
        self.plans, self.compiled, self.compile_s = {}, {}, {}
        for n in (new, 1):
            plan = prepare_generate(model, params, prompts, max_new_tokens=n)
            t = time.perf_counter()
            compiled = plan.lower().compile()
            self.compile_s[n] = time.perf_counter() - t
            self.plans[n], self.compiled[n] = plan, compiled

    def __call__(self, n: int) -> np.ndarray:
        out = self.plans[n].run(self.compiled[n])
        return np.asarray(jax.block_until_ready(out)[0])  # host tokens, like HF's output


class _HF:
    def __init__(self, hf, prompts: np.ndarray, threads: int):
        import torch
        self.torch, self.hf, self.threads = torch, hf, threads
        self.device = next(hf.parameters()).device
        self.ids = torch.from_numpy(prompts.astype(np.int64)).to(self.device)
        self.mask = torch.ones_like(self.ids)

    def __call__(self, n: int) -> np.ndarray:
        self.torch.set_num_threads(self.threads)
        with self.torch.inference_mode():
            out = self.hf.generate(input_ids=self.ids, attention_mask=self.mask, do_sample=False, max_new_tokens=n,
                                   min_new_tokens=n, num_beams=1, top_k=None, top_p=None, temperature=None,
                                   pad_token_id=0, eos_token_id=None)
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
        return out[:, self.ids.shape[1]:].cpu().numpy()  # host tokens, like ours


def bench_batch(hf, model, params, *, batch_size: int, prompt_len: int, new: int, repeats: int, seed: int = 0,
                torch_threads: tuple[int, ...] = (), read_bytes_per_s: float | None = None,
                settle_s: float = SETTLE_S) -> dict:
    """Both sides on one batch of random prompts; see the module docstring for the figures.

    HF runs once per entry of torch_threads (default: os.cpu_count()): the first is "hf", the others
    "hf_threads{t}", each with its own ratio."""
    vocab = model.cfg.vocab_size
    prompts = np.random.default_rng(seed).integers(1, vocab, size=(batch_size, prompt_len)).astype(np.int32)
    torch_threads = tuple(torch_threads) or (os.cpu_count() or 1,)
    ours = _Ours(model, params, prompts, new)
    sides = {"ours": ours}
    for i, t in enumerate(torch_threads):
        sides["hf" if i == 0 else f"hf_threads{t}"] = _HF(hf, prompts, t)
    first_call = {name: _timed(lambda s=side: s(new)) for name, side in sides.items()}
    times = {name: {"total": [], "first": []} for name in sides}
    for _ in range(repeats):
        for n, key in ((new, "total"), (1, "first")):
            for name, side in sides.items():
                time.sleep(settle_s)  # let the other side's worker threads stop spinning (docstring)
                times[name][key].append(_timed(lambda s=side, n=n: s(n))[0])
    ours_tokens, hf_tokens = first_call["ours"][1], first_call["hf"][1]
    hf_names = [name for name in sides if name != "ours"]
    step_weight_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
    if not model.cfg.tie_embeddings:  # the input embedding is gathered (B rows a step), not streamed
        step_weight_bytes -= int(np.prod(params["token_embedding"].shape)) * params["token_embedding"].dtype.itemsize
    flops_per_token = 2 * matmul_params(model, params)
    result = {"batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new, "repeats": repeats,
              "tokens_match": float(np.mean(ours_tokens == hf_tokens)),
              "rows_identical": int(np.sum(np.all(ours_tokens == hf_tokens, axis=1)))}
    for name in sides:
        total, first = min(times[name]["total"]), min(times[name]["first"])
        per_token = (total - first) / max(new - 1, 1)
        med_total, med_first = _median(times[name]["total"]), _median(times[name]["first"])
        side = {"first_call_s": first_call[name][0], "first_token_s": first, "per_token_s": per_token,
                "total_s": total, "tokens_per_s": batch_size * new / total,
                "achieved_flops_per_s": flops_per_token * batch_size * new / total,
                "weight_gb_per_s": step_weight_bytes / per_token / 1e9 if per_token > 0 else None,
                "of_read_roof": step_weight_bytes / per_token / read_bytes_per_s if per_token > 0 and read_bytes_per_s
                else None,
                "median": {"first_token_s": med_first, "per_token_s": (med_total - med_first) / max(new - 1, 1),
                           "total_s": med_total, "tokens_per_s": batch_size * new / med_total},
                "total_s_all": times[name]["total"], "first_token_s_all": times[name]["first"]}
        if name == "ours":
            side["compile_s"], side["compile_first_s"] = ours.compile_s[new], ours.compile_s[1]
        else:
            side["torch_threads"] = sides[name].threads
        result[name] = side
    for name in hf_names:
        suffix = name[2:]  # "" for "hf", "_threads1" for "hf_threads1"
        o, h = result["ours"], result[name]
        result["ratio_tokens_per_s" + suffix] = o["tokens_per_s"] / h["tokens_per_s"]
        result["ratio_tokens_per_s_median" + suffix] = o["median"]["tokens_per_s"] / h["median"]["tokens_per_s"]
        result["ratio_per_token" + suffix] = h["per_token_s"] / o["per_token_s"]
        result["ratio_first_token" + suffix] = h["first_token_s"] / o["first_token_s"]
    return result


def matmul_params(model, params) -> int:
    """Params a decoding step multiplies with: every weight of 2+ dimensions, but the untied input
    embedding (gathered, not multiplied)."""
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params) if x.ndim >= 2)
    if not model.cfg.tie_embeddings:
        n -= int(np.prod(params["token_embedding"].shape))
    return n


def run(**kwargs) -> dict:
    """The benchmark (see the module docstring and `_run`'s arguments), with
    XLA_PYTHON_CLIENT_PREALLOCATE=false unless set: JAX and PyTorch share the GPU in this process."""
    from mmjax.bench import shared_device_env
    with shared_device_env():
        return _run(**kwargs)


def _run(*, batch_sizes=(8, 1), prompt_len: int = 16, new_tokens: int = 128, repeats: int = 3, width: int = 512,
         depth: int = 8, heads: int = 8, kv_heads: int | None = None, mlp: int = 1376, vocab: int = 32_000,
         torch_threads: tuple[int, ...] = (), seed: int = 0, out: str | Path | None = None,
         verbose: bool = True, settle_s: float = SETTLE_S, dtype: str = "float32") -> dict:
    import torch

    from mmjax import decode
    from mmjax.bench import machine_info
    from mmjax.ops import cpu as ops_cpu
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to separate the first token from the rest, got {new_tokens}")
    if repeats < 1 or prompt_len < 1 or any(b < 1 for b in batch_sizes):
        raise ValueError("repeats, prompt_len and every batch size must be >= 1")
    torch_threads = tuple(torch_threads) or (os.cpu_count() or 1,)
    if any(t < 1 for t in torch_threads):
        raise ValueError(f"torch threads must be >= 1, got {torch_threads}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    cfg = _hf_config(width, depth, heads, kv_heads or heads, mlp, vocab, max_len=prompt_len + new_tokens)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        hf, model, params = build_models(cfg, d, seed, dtype)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    hf_device = next(hf.parameters()).device
    read_bytes = _read_bytes()
    read_bw = measure_read_bandwidth(read_bytes)
    if verbose:
        print(f"read bandwidth (jitted sum over {read_bytes >> 20} MiB): {read_bw / 1e9:.1f} GB/s", flush=True)
    cases = []
    for b in batch_sizes:
        cases.append(bench_batch(hf, model, params, batch_size=b, prompt_len=prompt_len, new=new_tokens,
                                 repeats=repeats, seed=seed, torch_threads=torch_threads,
                                 read_bytes_per_s=read_bw, settle_s=settle_s))
        if verbose:
            print(_line(cases[-1]), flush=True)
    results = {
        "what": "greedy decoding, mmjax.generate (jit, lax.while_loop over the KV cache) vs HF "
                f"LlamaForCausalLM.generate (PyTorch eager, do_sample=False), same {dtype} weights",
        "model": {"width": width, "depth": depth, "heads": heads, "kv_heads": kv_heads or heads, "mlp": mlp,
                  "vocab": vocab, "params": n_params, "dtype": dtype, "matmul_params": matmul_params(model, params),
                  "flops_per_token": 2 * matmul_params(model, params),
                  "flops_formula": "2 × matmul_params per generated token (attention over the cache not counted)"},
        "machine": machine_info(), "torch_threads": list(torch_threads), "torch_version": torch.__version__,
        "our_device": str(jax.devices()[0]), "hf_device": str(hf_device),
        "hf_device_name": torch.cuda.get_device_name(hf_device) if hf_device.type == "cuda" else "cpu",
        "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
        "read_bandwidth": {"what": f"best of 10 jitted jnp.sum over a {read_bytes >> 20} MiB fp32 array",
                           "bytes_per_s": read_bw},
        "cpu_kernel": ops_cpu.unavailable_reason() or "mmjax.ops.cpu.rowdot",
        "weight_major_rows": decode.WEIGHT_MAJOR_ROWS, "settle_s": settle_s,
        "note": "shared machine: timings include other processes' load (see load averages)",
        "cases": cases,
    }
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
        if verbose:
            print(f"wrote {out}", flush=True)
    return results


def _line(c: dict) -> str:
    o = c["ours"]
    parts = [f"batch {c['batch_size']:2d}: ours {o['tokens_per_s']:8.1f} tok/s (compile {o['compile_s']:.2f}s, "
             f"first {o['first_token_s'] * 1e3:.1f} ms, per token {o['per_token_s'] * 1e3:.2f} ms, "
             + (f"weights {o['weight_gb_per_s']:.1f} GB/s = {o['of_read_roof']:.2f} of read)"
                if o["weight_gb_per_s"] is not None else "weights - (per token ≤ 0: too few tokens to tell))")]
    for name in (n for n in c if n == "hf" or n.startswith("hf_threads")):
        h, suffix = c[name], name[2:]
        parts.append(f"HF {h['torch_threads']} thr {h['tokens_per_s']:8.1f} tok/s (first {h['first_token_s'] * 1e3:.1f}"
                     f" ms, per token {h['per_token_s'] * 1e3:.2f} ms) ratio {c['ratio_tokens_per_s' + suffix]:.2f}x")
    parts.append(f"tokens match {c['tokens_match']:.3f}")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmjax.bench_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="8,1", help="comma-separated, e.g. 8,1")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", choices=tuple(MODELS), default="small",
                   help="a size from MODELS (small: the default; 1b: TinyLlama-1.1B's shape); the flags below "
                        "override it")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and compute, both sides")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--mlp", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--torch-threads", default=None,
                   help="comma-separated torch thread counts for HF (default: os.cpu_count()); e.g. 2,1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settle-s", type=float, default=SETTLE_S,
                   help="seconds of sleep before each timed call, so the other side's threads stop spinning")
    p.add_argument("--out", default=None, help="JSON file to write")
    a = p.parse_args(argv)
    try:
        sizes = tuple(int(s) for s in a.batch_sizes.split(",") if s.strip())
        threads = tuple(int(s) for s in (a.torch_threads or "").split(",") if s.strip())
    except ValueError:
        p.error(f"--batch-sizes and --torch-threads must be comma-separated ints, got {a.batch_sizes!r}, "
                f"{a.torch_threads!r}")
    sizes_kw = {k: v if getattr(a, k) is None else getattr(a, k) for k, v in MODELS[a.model].items()}
    run(batch_sizes=sizes, prompt_len=a.prompt_len, new_tokens=a.new_tokens, repeats=a.repeats, **sizes_kw,
        torch_threads=threads, seed=a.seed, out=a.out, settle_s=a.settle_s, dtype=a.dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
