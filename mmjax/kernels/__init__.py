"""Native CPU kernels, built on first use: for decoding a small-rows matmul (`rowdot`), the transpose that
makes its output-major weights (`transpose`) and attention over the KV cache
(`mmjax.kernels.attention.cache_attention`); for training
softmax attention (`mmjax.kernels.attention`, used by `mmjax.layers.attention`) and LayerNorm/RMSNorm
(`mmjax.kernels.norm`, used by `mmjax.layers.norms`); each .cc file says what it computes and why.

Why a hand-written kernel. A decode step multiplies the batch's few rows by every weight of the
model once, so it can go no faster than the weights stream from memory. XLA:CPU's dot (YNNPACK)
runs an 8-row product at 4–5 GB/s of weights on a 2-core AMD EPYC (AVX2), OpenBLAS through numpy
at 5 GB/s, while the machine reads 16–23 GB/s on two threads (a plain sum). `rowdot.cc` reads each
weight once and reaches 11–13 GB/s on a chain of a decoder's matmuls (width 512, depth 8, vocab
32k; 8 rows: 30.5 → 13–15 ms). In a whole decode step the gain is about 15% at batch 8 (23.5–24.6
→ 17.6–22.5 ms per token), since there XLA runs its slower dots two at a time. It is an XLA FFI
handler, so it runs inside the jitted decode loop like any other op. Only
`mmjax.layers.linear.weight_major_dot` uses it, for the decode path.

Why kernels for training too. On the CPU, XLA ran attention as batched dots with the softmax, the
transposes to head-major order and the backward's elementwise terms as separate passes over
[B, H, T, S] arrays, and LayerNorm's backward as several fusions over [rows, D] arrays; PyTorch's
fused CPU attention and LayerNorm were faster on both machines measured (see attention.cc and
norm.cc, and the README's Running on CPU).

Why built here and not at install. mmjax stays a pure-Python package (TPU and GPU users never need
the kernels). The first call compiles the .cc files into one library with the machine's C++ compiler
(`$CXX`, else `c++`; about 10 s) against the FFI headers that jaxlib ships, into a cache directory
(`$MMJAX_CACHE_DIR`, else `$XDG_CACHE_HOME/mmjax`, else `~/.cache/mmjax`), under a name that hashes
the sources, the flags (`build_flags`: -mavx512f where the CPU has it), the compiler's version and
jaxlib's version; later processes load it from there. Without a compiler, off x86-64, or on a CPU
without AVX2 and FMA, the kernels are unavailable: one warning says why and XLA's ops are used, with
the same results to rounding.

Switches: `ROWDOT`, `attention.ENABLED`, `norm.ENABLED` (None: use the kernel where it is available;
False: never), the environment variable MMJAX_CPU_KERNELS=0 (none of them, for the whole process) and
MMJAX_CPU_AVX512=0 (the AVX2 code on an AVX-512 CPU).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

ROWDOT: bool | None = None
# Products with more rows than this use XLA's dot: the kernel re-reads each tile of weights from L1
# once per 4 rows, so its edge shrinks with the rows (a decoder's matmul chain on the 2-core EPYC:
# 8 rows 15.0 against 30.5 ms, 32 rows 34 against 43 ms, 64 rows 66 against 64 ms).
ROWDOT_MAX_ROWS = 64
TARGET = "mmjax_rowdot"
ATTENTION_FWD, ATTENTION_BWD = "mmjax_attention_fwd", "mmjax_attention_bwd"
CACHE_ATTENTION = "mmjax_cache_attention"
TRANSPOSE = "mmjax_transpose"
NORM_FWD, NORM_BWD = "mmjax_norm_fwd", "mmjax_norm_bwd"
# The sources build into one library: one compile, one cache entry, one reason when unavailable.
SOURCES = tuple(Path(__file__).with_name(n) for n in ("rowdot.cc", "attention.cc", "norm.cc"))
HEADERS = (Path(__file__).with_name("common.h"),)
TARGETS = {TARGET: "MmjaxRowDot", ATTENTION_FWD: "MmjaxAttentionFwd", ATTENTION_BWD: "MmjaxAttentionBwd",
           CACHE_ATTENTION: "MmjaxCacheAttention", TRANSPOSE: "MmjaxTranspose", NORM_FWD: "MmjaxNormFwd",
           NORM_BWD: "MmjaxNormBwd"}
FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC")
ENV_SWITCH = "MMJAX_CPU_KERNELS"
AVX512_SWITCH = "MMJAX_CPU_AVX512"

_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("mmjax_cpu_kernels_allowed", default=True)


class KernelUnavailable(RuntimeError):
    """The native kernel cannot be built or loaded on this machine (the message says why)."""


@contextlib.contextmanager
def cpu_kernels_disabled():
    """Within this block, functions traced do not use the native kernels (e.g. a decode loop whose
    params are sharded over several devices: a custom call would gather them onto each device)."""
    token = _ALLOWED.set(False)
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def cache_dir() -> Path:
    """Where built kernels are kept: $MMJAX_CACHE_DIR, else $XDG_CACHE_HOME/mmjax, else ~/.cache/mmjax."""
    if os.environ.get("MMJAX_CACHE_DIR"):
        return Path(os.environ["MMJAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mmjax"


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_avx2_fma(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this x86-64 CPU has AVX2 and FMA (read from /proc/cpuinfo's flags)."""
    return {"avx2", "fma"} <= cpu_flags(cpuinfo)


def build_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """FLAGS, plus -mavx512f where the CPU has AVX-512F: the attention kernel's register blocks are then
    zmm-wide (attention.cc); MMJAX_CPU_AVX512=0 builds the AVX2 blocks anyway. The flags are part of the
    library's cache key, so a machine without AVX-512 never loads a build that uses it."""
    avx512 = "avx512f" in cpu_flags(cpuinfo) and os.environ.get(AVX512_SWITCH, "1") != "0"
    return FLAGS + (("-mavx512f",) if avx512 else ())


def build(out_dir: Path | None = None, cxx: str | None = None) -> Path:
    """Compiles the kernels' sources into one library in out_dir (default: cache_dir()) unless a build of
    the same sources, flags, compiler and jaxlib is there; returns its path. Raises KernelUnavailable."""
    cxx = cxx or os.environ.get("CXX") or "c++"
    exe = shutil.which(cxx)
    if exe is None:
        raise KernelUnavailable(f"no C++ compiler {cxx!r} on PATH (set CXX to one)")
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"C++ compiler {exe} does not run: {e}") from e
    flags = build_flags()
    key = hashlib.sha256(b"\0".join([*(src.read_bytes() for src in SOURCES + HEADERS), " ".join(flags).encode(),
                                     version.encode(), jaxlib.__version__.encode()])).hexdigest()[:16]
    out_dir = Path(out_dir) if out_dir is not None else cache_dir()
    lib = out_dir / f"mmjax_cpu-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: concurrent processes (pytest workers) each build and
    # the last rename wins with identical bytes; a reader never sees a half-written library.
    fd, tmp = tempfile.mkstemp(prefix=".mmjax_cpu-", suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [exe, *flags, "-isystem", jax.ffi.include_dir(), *map(str, SOURCES), "-o", tmp]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            names = ", ".join(src.name for src in SOURCES)
            raise KernelUnavailable(f"compiling {names} failed ({' '.join(cmd)}):\n{res.stderr[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return lib


def machine_limit() -> str | None:
    """Why this machine or process cannot have the kernel at all (switched off, not x86-64, no AVX2/FMA,
    no C++ compiler), else None. A failure to build or load despite none of these is a bug, not a limit:
    `rowdot_unavailable_reason` then names it, and the tests fail on it."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"{ENV_SWITCH}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernel is written for x86-64 with AVX2, not {platform.machine()}"
    if not os.path.exists("/proc/cpuinfo"):
        return "no /proc/cpuinfo to check the CPU for AVX2 and FMA (the kernel is built on Linux only)"
    if not cpu_has_avx2_fma():
        return "this CPU lacks AVX2 or FMA"
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        return f"no C++ compiler {cxx!r} on PATH (set CXX to one)"
    return None


@functools.cache
def _load() -> str | None:
    """Builds, loads and registers the kernel once per process; None on success, else why not."""
    limit = machine_limit()
    if limit is not None:
        return limit
    try:
        import ctypes

        lib = ctypes.CDLL(str(build()))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (KernelUnavailable, OSError, AttributeError) as e:
        return str(e)
    return None


def rowdot_unavailable_reason() -> str | None:
    """None when the kernel is built and registered in this process, else the reason it is not."""
    return _load()


def use_rowdot(w_t: jax.Array, rows: int) -> bool:
    """Whether `weight_major_dot` should multiply `rows` rows by w_t with the kernel (at trace time)."""
    return 1 <= rows <= ROWDOT_MAX_ROWS and use_transpose(w_t)


def use_transpose(w: jax.Array) -> bool:
    """Whether the decode path's kernels (rowdot, transpose) may take the fp32 weight w, at trace time:
    ROWDOT not False, not switched off, the CPU backend, and the library available (else one warning)."""
    if ROWDOT is False or not _ALLOWED.get():
        return False
    if os.environ.get(ENV_SWITCH, "1") == "0":  # switched off by the user: no warning
        return False
    if w.dtype != jnp.float32 or jax.default_backend() != "cpu":
        return False
    reason = _load()
    if reason is not None:
        _warn_once(reason)
        return False
    return True


def training_kernel_usable(*arrays: jax.Array, what: str) -> bool:
    """Whether a training kernel (attention, norm) may take these operands, at trace time: the CPU
    backend, fp32 operands, not switched off (MMJAX_CPU_KERNELS=0, `cpu_kernels_disabled`), at most one
    device in the mesh being traced for (a custom call cannot be partitioned: XLA would gather its
    operands onto every device), and the library available (else one warning naming the reason)."""
    if not _ALLOWED.get() or os.environ.get(ENV_SWITCH, "1") == "0" or jax.default_backend() != "cpu":
        return False
    if any(a.dtype != jnp.float32 for a in arrays):
        return False
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty and mesh.size > 1:
        return False
    reason = _load()
    if reason is not None:
        _warn_kernel_once(what, reason)
        return False
    return True


@functools.cache
def _warn_kernel_once(what: str, reason: str) -> None:
    warnings.warn(f"mmjax: the CPU {what} kernel is unavailable ({reason}); {what} uses XLA's ops", stacklevel=4)


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"mmjax: the CPU decode kernel is unavailable ({reason}); decoding uses XLA's dot", stacklevel=3)


def rowdot(w_t: jax.Array, x: jax.Array) -> jax.Array:
    """y [M, N] = x [M, K] · w_t [N, K]ᵀ in fp32 with the native kernel (raises KernelUnavailable)."""
    reason = _load()
    if reason is not None:
        raise KernelUnavailable(reason)
    if w_t.ndim != 2 or x.ndim != 2 or w_t.shape[1] != x.shape[1]:
        raise ValueError(f"rowdot: expects w_t [N, K] and x [M, K], got {w_t.shape} and {x.shape}")
    if w_t.dtype != jnp.float32 or x.dtype != jnp.float32:
        raise TypeError(f"rowdot: fp32 only, got {w_t.dtype} and {x.dtype}")
    out = jax.ShapeDtypeStruct((x.shape[0], w_t.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(w_t, x)


def transpose(x: jax.Array) -> jax.Array:
    """xᵀ [N, K] of x [K, N] in fp32 with the native kernel (raises KernelUnavailable): the output-major
    kernel copies of the decode path, 1.4-1.7× as fast as XLA:CPU's transpose (rowdot.cc)."""
    reason = _load()
    if reason is not None:
        raise KernelUnavailable(reason)
    if x.ndim != 2:
        raise ValueError(f"transpose: expects a matrix [K, N], got shape {x.shape}")
    if x.dtype != jnp.float32:
        raise TypeError(f"transpose: fp32 only, got {x.dtype}")
    out = jax.ShapeDtypeStruct((x.shape[1], x.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(TRANSPOSE, out, vmap_method="sequential")(x)
