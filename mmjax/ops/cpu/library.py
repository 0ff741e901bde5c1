"""Building and loading mmjax's native CPU kernels (the .cc files beside this module).

The kernels are XLA FFI handlers compiled into one shared library with the machine's C++ compiler
(`$CXX`, else `c++`) against the FFI headers that jaxlib ships. mmjax stays a pure-Python package
(GPU and TPU users never need them), so the library is built here, on demand:

- explicitly: `python -m mmjax.ops.cpu` (or `mmjax.ops.cpu.build()`), or
- on the first lowering of a program for the CPU that calls a kernel (the kernels' primitive has a
  CPU lowering rule that loads the library first). Tracing never builds: `jax.eval_shape` and
  lowering for GPU/TPU leave the compiler alone.

The library lands in a cache directory (`$MMJAX_CACHE_DIR`, else `$XDG_CACHE_HOME/mmjax`, else
`~/.cache/mmjax`) under a name that hashes the sources, the flags (`build_flags`: -mavx512f where the
CPU has it, unless MMJAX_CPU_AVX512=0), the compiler's version and jaxlib's version; later processes
load it from there. Off x86-64, without AVX2 and FMA, or without a compiler the kernels are
unavailable (`machine_limit` says why) and `mmjax.ops` uses XLA's ops with one warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

ROWDOT = "mmjax_rowdot"
TRANSPOSE = "mmjax_transpose"
ATTENTION_FWD, ATTENTION_BWD = "mmjax_attention_fwd", "mmjax_attention_bwd"
CACHE_ATTENTION = "mmjax_cache_attention"
NORM_FWD, NORM_BWD = "mmjax_norm_fwd", "mmjax_norm_bwd"
# FFI target name → the handler's symbol in the library.
TARGETS = {ROWDOT: "MmjaxRowDot", ATTENTION_FWD: "MmjaxAttentionFwd", ATTENTION_BWD: "MmjaxAttentionBwd",
           CACHE_ATTENTION: "MmjaxCacheAttention", TRANSPOSE: "MmjaxTranspose", NORM_FWD: "MmjaxNormFwd",
           NORM_BWD: "MmjaxNormBwd"}
# The sources build into one library: one compile, one cache entry, one reason when unavailable.
SOURCES = tuple(Path(__file__).with_name(n) for n in ("rowdot.cc", "attention.cc", "norm.cc"))
HEADERS = (Path(__file__).with_name("common.h"),)
FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC")
AVX512_SWITCH = "MMJAX_CPU_AVX512"  # "0": build the AVX2 code on an AVX-512 CPU (read when building)


class KernelUnavailable(RuntimeError):
    """The native kernels cannot be built or loaded on this machine (the message says why)."""


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
    """FLAGS, plus -mavx512f where the CPU has AVX-512F (the attention kernel's register blocks are then
    zmm-wide). The flags are part of the library's cache key, so a machine without AVX-512 never
    loads a build that uses it."""
    avx512 = "avx512f" in cpu_flags(cpuinfo) and os.environ.get(AVX512_SWITCH, "1") != "0"
    return FLAGS + (("-mavx512f",) if avx512 else ())


def build(out_dir: Path | None = None, cxx: str | None = None) -> Path:
    """Compiles the sources into one library in out_dir (default: cache_dir()) unless a build of the same
    sources, flags, compiler and jaxlib is there; returns its path. Raises KernelUnavailable."""
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


@functools.cache
def machine_limit() -> str | None:
    """Why this machine cannot have the kernels at all (not x86-64, no AVX2/FMA, no C++ compiler), else
    None. Cheap, and a fact of the machine (cached): `mmjax.ops` reads it while tracing to decide
    whether a program compiled for the CPU may call the kernels, without building anything. A
    failure to build or load despite none of these is a bug, not a limit: the lowering raises it."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernels are written for x86-64 with AVX2, not {platform.machine()}"
    if not os.path.exists("/proc/cpuinfo"):
        return "no /proc/cpuinfo to check the CPU for AVX2 and FMA (the kernels are built on Linux only)"
    if not cpu_has_avx2_fma():
        return "this CPU lacks AVX2 or FMA"
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        return f"no C++ compiler {cxx!r} on PATH (set CXX to one)"
    return None


@functools.cache
def _load() -> str | None:
    """Builds, loads and registers the kernels once per process; None on success, else why not."""
    limit = machine_limit()
    if limit is not None:
        return limit
    try:
        lib = ctypes.CDLL(str(build()))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (KernelUnavailable, OSError, AttributeError) as e:
        return str(e)
    return None


def load() -> None:
    """Builds (if needed), loads and registers the kernels in this process; raises KernelUnavailable."""
    reason = _load()
    if reason is not None:
        raise KernelUnavailable(reason)


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used in this process, without building: the machine's limit, or the
    reason an earlier build or load in this process failed; None when they may be used."""
    limit = machine_limit()
    if limit is not None:
        return limit
    if _load.cache_info().currsize:
        return _load()
    return None
