"""Process settings for XLA:CPU: glibc's malloc keeps its memory, in transparent huge pages.

Why. XLA:CPU allocates all of one execution's temporaries as a single block (`posix_memalign`
from an XLA worker thread; about 1 GiB for the tiny CLIP train step at batch 128, 3.3 GiB for
S/16) and frees it when the execution ends. glibc serves a block that large from a thread arena
with `mmap` and returns it with `munmap` (thread arenas always map blocks above their 64 MiB heap
size), so every step faults the whole block in again and the kernel zeroes each page. Measured on
a 2-core AMD EPYC (kernel THP mode "madvise"):

    default malloc                      247 K minor faults, 0.8 s of kernel time per tiny-CLIP step (1.6 s)
    + glibc.malloc.hugetlb=1            ~1 K faults (2 MiB each), 0.13–0.18 s of kernel time
    + arena_max=1, mmap_max=0,
      trim_threshold=64 GiB             0 faults, 0.01 s: the block is reused from one step to the next

`hugetlb=1` makes malloc ask for transparent huge pages (`madvise(MADV_HUGEPAGE)`). The other three
keep the memory: one arena (the main one, grown with `brk`), no `mmap` for large blocks, and no
trimming of the heap's top, so a freed temp block stays mapped and the next execution gets it back
without faults. Huge-page faults alone were cheap on a fresh machine but grew with its uptime (the
kernel must find, and sometimes compact, free 2 MiB pages): in one later run the tiny CLIP step
took 2.40 s with `hugetlb=1` alone against 1.47 s with all four (PyTorch's: 1.39 s), alternated in
one benchmark. But one arena serves every thread, and the main job (a 0.13 M-param ViT, 10 ms
steps fed by grain's threads) took 195–199 s with all four against 164 s with `hugetlb=1` alone
(back-to-back runs), and greedy decoding at batch 8 took 27.7 against 24.2 ms per token (small
temp blocks; PyTorch's went the other way, 50.8 against 58.1 ms). So keeping the memory is
opt-in, MMJAX_KEEP_MEMORY=1, and `mmjax bench` sets it for its train steps (both sides of a
comparison inherit it); the process then keeps its high-water mark of malloc'd memory until it
exits.

How. `GLIBC_TUNABLES` is read once, when a process starts, so the `mmjax` command re-executes
itself with the tunables added (`reexec_with_hugepage_malloc`, called before anything heavy is
imported). On Linux with glibc: the three that keep memory when MMJAX_KEEP_MEMORY=1, `hugetlb=1`
with glibc ≥ 2.35 when the kernel's THP mode is "madvise" (with "always" every large mapping gets huge pages
already; with "never" the tunable does nothing). A tunable the user has set stands as set; nothing
happens when MMJAX_NO_REEXEC is set or every tunable is already there. Child processes (data
workers, benchmark sides) inherit the environment. From your own Python process, start it as
`GLIBC_TUNABLES=$(python -m mmjax.runtime --tunables) python ...` for the same effect (with
MMJAX_KEEP_MEMORY=1 in front of both for all four).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence

TUNABLE = "glibc.malloc.hugetlb=1"
# One arena, no mmap for large blocks, no trimming: freed blocks stay mapped for the next execution.
KEEP_MEMORY = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={64 << 30}")
OPT_OUT = "MMJAX_NO_REEXEC"
KEEP_MEMORY_VAR = "MMJAX_KEEP_MEMORY"  # "1": add KEEP_MEMORY (set by `mmjax bench`)
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
    """`python -m mmjax.runtime`: re-executes as the `mmjax` command does, then prints what applies.
    `python -m mmjax.runtime --tunables`: prints the GLIBC_TUNABLES value to start Python with."""
    import json
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["--tunables"]:
        env = hugepage_malloc_env_here({k: v for k, v in os.environ.items() if k != OPT_OUT})
        print((env or os.environ).get("GLIBC_TUNABLES", ""))
        return
    reexec_with_hugepage_malloc(argv, "mmjax.runtime")
    current = os.environ.get("GLIBC_TUNABLES", "")
    print(json.dumps({"system": platform.system(), "glibc": ".".join(map(str, glibc_version() or ())) or None,
                      "thp_mode": thp_mode(), "GLIBC_TUNABLES": current or None,
                      "hugepage_malloc": TUNABLE in current,
                      "keeps_memory": all(t in current for t in KEEP_MEMORY)}))


if __name__ == "__main__":
    main()
