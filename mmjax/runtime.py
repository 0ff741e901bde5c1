"""Process settings for XLA:CPU: transparent huge pages for glibc's malloc.

Why. XLA:CPU allocates all of one execution's temporaries as a single block (`posix_memalign`
from an XLA worker thread; about 1 GiB for the tiny CLIP train step at batch 128) and frees it
when the execution ends. glibc serves a block that large from a thread arena with `mmap` and
returns it with `munmap` (the `mmap_max` / `mmap_threshold` tunables cannot keep it: thread arenas
always map blocks above their 64 MiB heap size), so every step faults the whole block in again,
4 KiB at a time, and the kernel zeroes each page. Measured on a 2-core AMD EPYC (kernel THP mode
"madvise"): 247 K minor faults and 0.8 s of kernel time per tiny-CLIP step (1.6 s), against 12–28 K
faults for PyTorch's step. With glibc's `glibc.malloc.hugetlb=1` malloc asks for transparent huge
pages (`madvise(MADV_HUGEPAGE)`) on the memory it maps, the block faults in 2 MiB at a time: 1.1 K
faults, 0.13 s of kernel time, and the step takes 1.15–1.4 s (a noisy
machine; single runs).

How. `GLIBC_TUNABLES` is read once, when a process starts, so the `mmjax` command re-executes
itself with `glibc.malloc.hugetlb=1` added (`reexec_with_hugepage_malloc`, called before anything
heavy is imported). It does so only on Linux with glibc ≥ 2.35 when the kernel's THP mode is
"madvise" (with "always" every large mapping gets huge pages already; with "never" the tunable does
nothing), and never when the variable already holds the tunable or MMJAX_NO_REEXEC is set. Child
processes (data workers, benchmark sides) inherit the environment. From your own Python process,
start it as `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python ...` for the same effect.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "MMJAX_NO_REEXEC"
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


def hugepage_malloc_env(environ: Mapping[str, str], *, system: str, glibc: tuple[int, ...] | None,
                        thp: str | None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to do (see the module
    docstring for the conditions). Pure, so the rule is testable without exec."""
    if environ.get(OPT_OUT) or system != "Linux" or glibc is None or glibc < (2, 35) or thp != "madvise":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None  # the user's own setting (or ours, after the re-exec) stands
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
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
    except OSError as e:  # run on without huge pages rather than not at all
        print(f"mmjax: could not re-execute with {TUNABLE} ({e}); continuing without it", file=sys.stderr)


def main() -> None:
    """`python -m mmjax.runtime`: re-executes as the `mmjax` command does, then prints what applies."""
    import json
    reexec_with_hugepage_malloc(sys.argv[1:], "mmjax.runtime")
    print(json.dumps({"system": platform.system(), "glibc": ".".join(map(str, glibc_version() or ())) or None,
                      "thp_mode": thp_mode(), "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
                      "hugepage_malloc": TUNABLE in os.environ.get("GLIBC_TUNABLES", "")}))


if __name__ == "__main__":
    main()
