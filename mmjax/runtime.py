"""Opt-in glibc malloc tunables for XLA:CPU: huge pages, and optionally memory kept between executions.

What and why. XLA:CPU allocates all temporaries of one execution as one large block, which glibc
maps and unmaps on every call, so each step faults it in again 4 KiB at a time.
`glibc.malloc.hugetlb=1` makes those faults 2 MiB ones, and with MMJAX_KEEP_MEMORY=1 `arena_max=1`,
`mmap_max=0` and a 64 GiB `trim_threshold` keep the block mapped from one execution to the next
(no faults, but one arena for every thread slows multi-threaded input pipelines). The rule, the
measurements and the machines they come from are in docs/cpu.md ("glibc malloc tunables").

How to opt in. `GLIBC_TUNABLES` is read only when a process starts, so the `mmjax` command
re-executes itself with the tunables added, before anything heavy is imported, when asked:
MMJAX_HUGEPAGE_MALLOC=1 for any command; the CPU benchmarks `mmjax bench` (memory kept) and
`mmjax bench-decode` do so by default when the backend would be the CPU, judged without importing
JAX (JAX_PLATFORMS names cpu first, or it is unset and no accelerator plugin is installed). MMJAX_HUGEPAGE_MALLOC=0 or
MMJAX_NO_REEXEC=1 turns it off. In your own process: `GLIBC_TUNABLES=$(python -m mmjax.runtime
--tunables) python ...`; `python -m mmjax.runtime` reports what applies on this machine.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from collections.abc import Mapping, Sequence

TUNABLE = "glibc.malloc.hugetlb=1"
# One arena, no mmap for large blocks, no trimming: freed blocks stay mapped for the next execution.
KEEP_MEMORY = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={64 << 30}")
OPT_OUT = "MMJAX_NO_REEXEC"
OPT_IN = "MMJAX_HUGEPAGE_MALLOC"  # "1": the `mmjax` command re-executes with the tunables; "0": never
KEEP_MEMORY_VAR = "MMJAX_KEEP_MEMORY"  # "1": add KEEP_MEMORY (set by `mmjax bench`)
# Import names whose presence means JAX would pick an accelerator when JAX_PLATFORMS is unset.
ACCELERATOR_PLUGINS = ("jax_plugins", "libtpu")
# `mmjax` subcommands that re-execute without the opt-in, when the backend would be the CPU: the CPU
# benchmarks, whose figures against PyTorch were measured under the tunables (docs/cpu.md).
REEXEC_COMMANDS = ("bench", "bench-decode")
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise" or "never"), None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, ...] | None:
    lib, version = platform.libc_ver()
    if lib != "glibc" or not version:
        return None
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return None


def tunables_for(*, glibc: tuple[int, ...] | None, thp: str | None, keep_memory: bool) -> tuple[str, ...]:
    """The malloc tunables this module wants for a glibc version and THP mode (module docstring)."""
    if glibc is None:
        return ()
    return (KEEP_MEMORY if keep_memory else ()) + ((TUNABLE,) if glibc >= (2, 35) and thp == "madvise" else ())


def cpu_backend_expected(environ: Mapping[str, str], *, plugins: Sequence[str] = ACCELERATOR_PLUGINS) -> bool:
    """Whether JAX would run on the CPU, judged without importing it: JAX_PLATFORMS (or the older
    JAX_PLATFORM_NAME) names cpu first, or neither is set and no accelerator plugin is installed."""
    platforms = environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME")
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not any(importlib.util.find_spec(name) is not None for name in plugins)


def reexec_requested(command: str | None, environ: Mapping[str, str], *,
                     cpu: bool | None = None) -> bool:
    """Whether the `mmjax` command `command` ("train", "bench", ...) should re-execute itself under
    the malloc tunables: MMJAX_HUGEPAGE_MALLOC=1 for any command, and the benchmarks (`mmjax bench`,
    `mmjax bench-decode`) on a CPU backend unless MMJAX_HUGEPAGE_MALLOC=0 (module docstring). `cpu`:
    whether the backend would be the CPU (None: `cpu_backend_expected(environ)`)."""
    choice = environ.get(OPT_IN, "").strip()
    if choice == "1":
        return True
    if choice == "0" or command not in REEXEC_COMMANDS:
        return False
    return cpu_backend_expected(environ) if cpu is None else cpu


def hugepage_malloc_env(environ: Mapping[str, str], *, system: str, glibc: tuple[int, ...] | None,
                        thp: str | None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to do (see the module
    docstring for the conditions). Pure, so the rule is testable without exec."""
    if environ.get(OPT_OUT) or system != "Linux":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    have = {item.split("=", 1)[0] for item in current.split(":") if item}
    keep = environ.get(KEEP_MEMORY_VAR) == "1"
    add = [t for t in tunables_for(glibc=glibc, thp=thp, keep_memory=keep) if t.split("=", 1)[0] not in have]
    if not add:
        return None  # the user's own settings (or ours, after the re-exec) stand
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(([current] if current else []) + add)
    return env


def hugepage_malloc_env_here(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """`hugepage_malloc_env` for this machine (its OS, glibc and THP mode); environ: os.environ."""
    return hugepage_malloc_env(os.environ if environ is None else environ, system=platform.system(),
                               glibc=glibc_version(), thp=thp_mode())


def reexec_with_hugepage_malloc(argv: Sequence[str], module: str) -> None:
    """Replaces this process with `python -m module *argv` under `hugepage_malloc_env`, when that
    applies; returns (doing nothing) otherwise. Call it first thing in a command's entry point."""
    env = hugepage_malloc_env_here()
    if env is None or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
    except OSError as e:  # run on with the default malloc rather than not at all
        print(f"mmjax: could not re-execute with GLIBC_TUNABLES={env['GLIBC_TUNABLES']} ({e}); "
              "continuing without it", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m mmjax.runtime`: prints what applies on this machine, after re-executing as the
    `mmjax` command does when MMJAX_HUGEPAGE_MALLOC=1.
    `python -m mmjax.runtime --tunables`: prints the GLIBC_TUNABLES value to start Python with."""
    import json
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["--tunables"]:
        env = hugepage_malloc_env_here({k: v for k, v in os.environ.items() if k != OPT_OUT})
        print((env or os.environ).get("GLIBC_TUNABLES", ""))
        return
    if reexec_requested(None, os.environ):
        reexec_with_hugepage_malloc(argv, "mmjax.runtime")
    current = os.environ.get("GLIBC_TUNABLES", "")
    print(json.dumps({"system": platform.system(), "glibc": ".".join(map(str, glibc_version() or ())) or None,
                      "thp_mode": thp_mode(), "GLIBC_TUNABLES": current or None,
                      "reexec_opt_in": os.environ.get(OPT_IN) == "1",
                      "hugepage_malloc": TUNABLE in current,
                      "keeps_memory": all(t in current for t in KEEP_MEMORY)}))


if __name__ == "__main__":
    main()
