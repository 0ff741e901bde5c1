"""mmjax.runtime: the opt-in malloc re-exec of the `mmjax` command (huge pages, memory kept across
executions): MMJAX_HUGEPAGE_MALLOC=1, or `mmjax bench` on a CPU backend."""

import json
import os
import platform
import subprocess
import sys

import pytest

from mmjax import runtime

LINUX = {"system": "Linux", "glibc": (2, 36), "thp": "madvise"}


HUGE = "glibc.malloc.hugetlb=1"
KEEP = ":".join(runtime.KEEP_MEMORY)
KEEPING = {"MMJAX_KEEP_MEMORY": "1"}


@pytest.mark.parametrize("environ, overrides, expected", [
    ({}, {}, HUGE),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, {}, "glibc.malloc.arena_max=2:" + HUGE),
    (KEEPING, {}, KEEP + ":" + HUGE),
    # the user's own value of a tunable stands; the others are added
    ({**KEEPING, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, {},
     "glibc.malloc.arena_max=2:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:" + HUGE),
    ({**KEEPING, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {}, "glibc.malloc.hugetlb=0:" + KEEP),
    (KEEPING, {"thp": "always"}, KEEP),   # huge pages come anyway; keeping the memory still saves the faults
    (KEEPING, {"glibc": (2, 34)}, KEEP),  # before the hugetlb tunable
])
def test_env_adds_the_missing_tunables_and_keeps_the_users(environ, overrides, expected):
    env = runtime.hugepage_malloc_env({"PATH": "/bin", **environ}, **{**LINUX, **overrides})
    assert env["GLIBC_TUNABLES"] == expected
    assert env["PATH"] == "/bin"


@pytest.mark.parametrize("environ, overrides", [
    ({"GLIBC_TUNABLES": HUGE}, {}),                                # already applied: no loop
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {}),            # the user's own choice stands
    ({**KEEPING, "GLIBC_TUNABLES": KEEP + ":" + HUGE}, {}),
    ({"MMJAX_NO_REEXEC": "1"}, {}),
    ({}, {"system": "Darwin"}),
    ({}, {"glibc": None}),                                         # musl or unknown libc
    ({}, {"glibc": (2, 34)}),                                      # before the hugetlb tunable
    ({}, {"thp": "always"}),                                       # huge pages already, no madvise needed
    ({}, {"thp": "never"}),
    ({}, {"thp": None}),
])
def test_env_leaves_the_process_alone(environ, overrides):
    assert runtime.hugepage_malloc_env(environ, **{**LINUX, **overrides}) is None


def _reexecs(monkeypatch, argv, environ):
    """What `entry()` passes to os.execve for `mmjax *argv` under `environ`, on a Linux host where the
    tunables apply (None: it did not re-execute)."""
    import mmjax.cli as cli
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, args, env: calls.append((args, env)))
    monkeypatch.setattr(runtime.platform, "system", lambda: "Linux")
    monkeypatch.setattr(runtime, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(runtime, "thp_mode", lambda path=None: "madvise")
    monkeypatch.setattr(cli, "main", lambda: 0)
    for var in ("GLIBC_TUNABLES", runtime.OPT_OUT, "MMJAX_HUGEPAGE_MALLOC", runtime.KEEP_MEMORY_VAR, "JAX_PLATFORMS",
                "JAX_PLATFORM_NAME"):
        monkeypatch.setenv(var, "")  # so that monkeypatch restores the original (entry() sets some itself)
        monkeypatch.delenv(var)
    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["mmjax", *argv])
    with pytest.raises(SystemExit) as info:
        cli.entry()
    assert info.value.code == 0
    assert len(calls) <= 1
    return calls[0] if calls else None


@pytest.mark.parametrize("command", ["train", "bench-data"])
def test_entry_does_not_reexec_by_default(monkeypatch, command):
    """Only MMJAX_HUGEPAGE_MALLOC=1 (or a CPU benchmark on a CPU) re-executes the command."""
    assert _reexecs(monkeypatch, [command, "--help"], {}) is None
    assert _reexecs(monkeypatch, [command, "--help"], {"JAX_PLATFORMS": "cpu"}) is None


@pytest.mark.parametrize("command", ["train", "bench-decode", "bench"])
def test_entry_reexecs_when_asked(monkeypatch, command):
    args, env = _reexecs(monkeypatch, [command, "--x"], {"MMJAX_HUGEPAGE_MALLOC": "1"})
    assert args[1:] == ["-m", "mmjax.cli", command, "--x"]
    assert runtime.TUNABLE in env["GLIBC_TUNABLES"]
    # `mmjax bench` alone keeps malloc's memory (one big train step at a time)
    assert all(t in env["GLIBC_TUNABLES"] for t in runtime.KEEP_MEMORY) is (command == "bench")
    assert _reexecs(monkeypatch, [command], {"MMJAX_HUGEPAGE_MALLOC": "1", runtime.OPT_OUT: "1"}) is None


def test_the_train_step_benchmark_reexecs_on_a_cpu_backend_and_keeps_the_memory(monkeypatch):
    """`mmjax bench` re-executes with the memory-keeping tunables when the backend would be the CPU."""
    args, env = _reexecs(monkeypatch, ["bench"], {"JAX_PLATFORMS": "cpu"})
    assert env["GLIBC_TUNABLES"] == KEEP + ":" + HUGE and env[runtime.KEEP_MEMORY_VAR] == "1"
    assert _reexecs(monkeypatch, ["bench"], {"JAX_PLATFORMS": "cuda,cpu"}) is None
    assert _reexecs(monkeypatch, ["bench"], {"JAX_PLATFORMS": "cpu", "MMJAX_HUGEPAGE_MALLOC": "0"}) is None
    assert _reexecs(monkeypatch, ["bench"], {"JAX_PLATFORMS": "cpu", runtime.OPT_OUT: "1"}) is None


@pytest.mark.parametrize("command, environ, cpu, expected", [
    ("train", {}, True, False),
    ("bench-decode", {}, True, True),
    ("bench-decode", {}, False, False),
    ("bench", {}, True, True),
    ("bench", {}, False, False),                        # an accelerator: the tunables are for XLA:CPU
    ("train", {"MMJAX_HUGEPAGE_MALLOC": "1"}, False, True),
    ("bench", {"MMJAX_HUGEPAGE_MALLOC": "0"}, True, False),
    (None, {}, True, False),
])
def test_reexec_is_opt_in_except_for_the_cpu_benchmark(command, environ, cpu, expected):
    assert runtime.reexec_requested(command, environ, cpu=cpu) is expected


def test_cpu_backend_is_judged_from_the_environment_without_jax():
    assert runtime.cpu_backend_expected({"JAX_PLATFORMS": "cpu"})
    assert runtime.cpu_backend_expected({"JAX_PLATFORMS": " CPU , cuda"})
    assert not runtime.cpu_backend_expected({"JAX_PLATFORMS": "cuda,cpu"})
    assert not runtime.cpu_backend_expected({"JAX_PLATFORMS": "tpu"})
    assert runtime.cpu_backend_expected({}, plugins=("no_such_plugin_module_xyz",))
    assert not runtime.cpu_backend_expected({}, plugins=("json",))  # an installed plugin: an accelerator


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert runtime.thp_mode(str(f)) == "madvise"
    assert runtime.thp_mode(str(tmp_path / "missing")) is None


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", runtime.OPT_OUT, "MMJAX_HUGEPAGE_MALLOC", runtime.KEEP_MEMORY_VAR)}
    return {**env, **extra}


def test_module_reexecs_exactly_when_the_rule_says():
    """`python -m mmjax.runtime` goes through the same re-exec as the `mmjax` command: only when
    asked (MMJAX_HUGEPAGE_MALLOC=1), and then where the tunables apply."""
    applies = runtime.hugepage_malloc_env_here(_clean_env()) is not None
    for env, want in ((_clean_env(), False), (_clean_env(MMJAX_HUGEPAGE_MALLOC="1"), applies),
                      (_clean_env(MMJAX_HUGEPAGE_MALLOC="1", MMJAX_NO_REEXEC="1"), False)):
        out = subprocess.run([sys.executable, "-m", "mmjax.runtime"], env=env, capture_output=True, text=True,
                             check=True)
        report = json.loads(out.stdout)
        assert (report["GLIBC_TUNABLES"] is not None) is want, report


def test_tunables_flag_prints_the_value_to_start_python_with():
    """The README's `GLIBC_TUNABLES=$(python -m mmjax.runtime --tunables)`: the same tunables the
    `mmjax` command would add, without re-executing."""
    for extra, keep in (({}, False), ({runtime.KEEP_MEMORY_VAR: "1"}, True)):
        out = subprocess.run([sys.executable, "-m", "mmjax.runtime", "--tunables"], env=_clean_env(**extra),
                             capture_output=True, text=True, check=True)
        want = runtime.tunables_for(glibc=runtime.glibc_version(), thp=runtime.thp_mode(), keep_memory=keep)
        assert out.stdout.strip() == (":".join(want) if platform.system() == "Linux" else ""), out.stdout


_FAULTS = """
import resource, jax, jax.numpy as jnp
@jax.jit
def f(x):  # ~200 MB of temporaries, one XLA temp block per execution
    a = jnp.sin(x); b = jnp.cos(x) @ jnp.ones((512, 512)); c = a * b + jnp.tanh(a)
    return c.sum() + a.sum() + b.sum()
x = jnp.ones((32768, 512))
f(x).block_until_ready(); f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) // 3)
"""


@pytest.mark.skipif(not (runtime.thp_mode() == "madvise" and (runtime.glibc_version() or ()) >= (2, 35)),
                    reason="needs glibc >= 2.35 and the kernel's transparent-huge-page mode 'madvise'")
def test_xla_temporaries_fault_in_huge_pages_under_the_tunable_and_not_at_all_when_kept():
    """The reason for the re-exec: without the tunables each execution faults its temp block in
    4 KiB pages again (~50 K faults for 200 MB); with hugetlb, in 2 MiB pages; with the memory kept
    as well, not again."""
    faults = {}
    for name, tunables in (("default", None), ("hugetlb", runtime.TUNABLE),
                           ("kept", ":".join((*runtime.KEEP_MEMORY, runtime.TUNABLE)))):
        env = _clean_env() if tunables is None else _clean_env(GLIBC_TUNABLES=tunables)
        env["JAX_PLATFORMS"] = "cpu"
        for var in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR"):
            env.pop(var, None)
        out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
        faults[name] = int(out.stdout.split()[-1])
    assert faults["default"] > 20_000, faults
    assert faults["hugetlb"] * 20 < faults["default"], faults
    assert faults["kept"] * 4 < faults["hugetlb"], faults
