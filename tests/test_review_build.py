"""How the native CPU kernel is built, cached and loaded (ttrec.cpu.build), with a temporary
TTREC_CACHE_DIR in every test: a damaged cached library is rebuilt (never loaded, never a crash),
the cache key separates ISAs, a compiler or cache directory that cannot be used gets a reason that
names it (and backend='auto' falls back), and concurrent first uses load one complete library.

The kernel is compiled for real once (``real_so``); the other builds go through a stand-in
compiler (``fake_cxx``) that writes that library slowly, so each case costs a copy, not a build.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ttrec.cpu import build

FAKE = '''#!{python}
"""A stand-in C++ compiler: --version; -E -dM prints the macros of the ISA in $FAKE_ISA for
-march=native; a compile writes $FAKE_SO to -o in two halves (a reader of a half-written file
would load a truncated library) and logs one line to $FAKE_LOG."""
import os, sys, time
args = sys.argv[1:]
if args == ["--version"]:
    print("fake-c++ 1.0")
elif "-E" in args:
    native = "-march=native" in args
    print("#define __x86_64__ 1")
    print("#define __AVX512F__ 1" if native and os.environ.get("FAKE_ISA") == "avx512" else "#define __AVX2__ 1")
else:
    data = open(os.environ["FAKE_SO"], "rb").read()
    with open(args[args.index("-o") + 1], "wb") as out:
        out.write(data[: len(data) // 2])
        out.flush()
        time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
        out.write(data[len(data) // 2:])
    with open(os.environ["FAKE_LOG"], "a") as log:
        log.write("compiled\\n")
'''

# a process's first use: the kernel against the reference backend (torch) on one batch
USE = textwrap.dedent("""
    import torch, ttrec
    from ttrec.cpu import build
    assert build.unavailable_reason() is None, build.unavailable_reason()
    kw = dict(tt_p_shapes=(10, 10, 10), tt_q_shapes=(2, 2, 4), tt_ranks=(8, 8))
    torch.manual_seed(0)
    cpu = ttrec.TTEmbeddingBag(1000, 16, backend="cpu", **kw)
    ref = ttrec.TTEmbeddingBag(1000, 16, backend="torch", **kw)
    ref.load_state_dict(cpu.state_dict())
    idx, off = torch.tensor([1, 2, 999, 500, 7]), torch.tensor([0, 2])
    torch.testing.assert_close(cpu(idx, off), ref(idx, off))
    print("OK")
""")


@pytest.fixture(scope="module")
def real_so(tmp_path_factory) -> Path:
    """The kernel compiled by the real compiler into an empty cache (umask 022), in a child process."""
    if build.expected_unavailable():
        pytest.skip("native kernel switched off or no compiler")
    cache = tmp_path_factory.mktemp("real_cache")
    env = {**os.environ, "TTREC_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", "from ttrec.cpu import build; print(build.build())"], env=env,
                          capture_output=True, text=True, preexec_fn=lambda: os.umask(0o022))
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


@pytest.fixture
def fake(tmp_path, real_so, monkeypatch):
    """Environment of the stand-in compiler: CXX, FAKE_SO, FAKE_LOG and an empty TTREC_CACHE_DIR."""
    cxx = tmp_path / "fake-c++"
    cxx.write_text(FAKE.format(python=sys.executable))
    cxx.chmod(0o755)
    env = {"CXX": str(cxx), "FAKE_SO": str(real_so), "FAKE_LOG": str(tmp_path / "log"),
           "TTREC_CACHE_DIR": str(tmp_path / "cache"), "FAKE_ISA": "avx512"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    build._load.cache_clear()
    yield env
    monkeypatch.undo()
    build._load.cache_clear()


def _compiles(env) -> int:
    log = Path(env["FAKE_LOG"])
    return len(log.read_text().splitlines()) if log.exists() else 0


def _use(env) -> subprocess.CompletedProcess:
    """USE in a child process (a crash there is a failed test, not a dead test run)."""
    return subprocess.run([sys.executable, "-c", USE], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)


def _cached(env) -> list[Path]:
    return sorted(Path(env["TTREC_CACHE_DIR"]).iterdir())


def _damage(kind: str, path: Path, tmp_path: Path) -> None:
    data = path.read_bytes()
    if kind == "truncated":  # headers intact, segments cut: dlopen maps past the end (SIGBUS)
        path.write_bytes(data[:1000])
    elif kind == "garbage":
        path.write_bytes(b"not a library\n")
    elif kind == "other_architecture":  # e_machine = 183 (AArch64)
        path.write_bytes(data[:18] + (183).to_bytes(2, "little") + data[20:])
    elif kind == "other_library":  # a complete library without the kernel's symbols
        src = tmp_path / "other.c"
        src.write_text("int tt_abi_version(void) { return 10; }\n")
        subprocess.run(["gcc", "-shared", "-fPIC", str(src), "-o", str(path)], check=True)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "other_architecture", "other_library"])
def test_a_damaged_cached_library_is_rebuilt_never_loaded(fake, tmp_path, kind):
    if kind == "other_library" and shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    first = _use(fake)
    assert first.returncode == 0 and "OK" in first.stdout, first.stderr
    (so,) = _cached(fake)
    _damage(kind, so, tmp_path)
    again = _use(fake)
    assert again.returncode == 0 and "OK" in again.stdout, (again.returncode, again.stderr[-3000:])
    assert _compiles(fake) == 2  # rebuilt once
    assert _cached(fake) == [so] and so.read_bytes() == Path(fake["FAKE_SO"]).read_bytes()  # no temp files left
    assert "compiling the native CPU kernel" in again.stderr and str(so) in again.stderr  # says where, and why
    assert build.elf_problem(so) is None


def test_elf_problem_names_what_is_wrong(real_so, tmp_path):
    assert build.elf_problem(real_so) is None
    path = tmp_path / "x.so"
    for kind, said in [("truncated", "truncated (1000 bytes"), ("garbage", "not an ELF file"),
                       ("other_architecture", "another architecture (ELF machine 183")]:
        shutil.copy(real_so, path)
        _damage(kind, path, tmp_path)
        assert said in build.elf_problem(path)
        with pytest.raises(RuntimeError, match=said.split(" (")[0]):
            build.bind(path)  # refused before dlopen


def test_the_cached_library_is_readable_as_the_umask_allows(real_so):
    """Built under umask 022: rwxr-xr-x, so other users of a shared cache directory can load it
    (a temp file from mkstemp made it rwx--x--x, unreadable to them, and never rebuilt)."""
    assert stat.S_IMODE(real_so.stat().st_mode) == 0o755


def test_concurrent_first_uses_load_one_complete_library(fake):
    """Four processes on an empty cache at once, the compile writing slowly: one compiles (the
    build lock), the others wait for it, and all load that complete library; the cache holds
    exactly that library and no temp files."""
    env = {**os.environ, **fake, "FAKE_SLEEP": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", USE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "OK" in out, err[-3000:]
    (so,) = _cached(fake)
    assert so.name.startswith("tt_cpu_") and so.read_bytes() == Path(fake["FAKE_SO"]).read_bytes()
    assert _compiles(fake) == 1
    assert sum("[ttrec] compiling" in err for _, err in outs) == 1


def test_a_killed_builds_temp_file_is_removed_by_the_next_build(fake):
    """A build killed before its rename leaves its temp file (the compiler outlives Python); the next
    build removes such files once they are older than any build, and leaves a running build's alone."""
    cache = Path(fake["TTREC_CACHE_DIR"])
    cache.mkdir()
    stale, running = cache / "tmpk1ll3d.so.tmp", cache / "tt_cpu_0123456789abcdef.77.abcd.so.tmp"
    for f in (stale, running):
        f.write_bytes(b"\x7fELF partial")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    path = build.build()
    assert not stale.exists() and running.exists()
    assert sorted(cache.iterdir()) == sorted([path, running])


def test_the_cache_key_follows_the_isa_that_march_native_selects(fake, monkeypatch):
    """Where /proc/cpuinfo cannot be read, two machines of different ISAs sharing a cache directory
    (same compiler) must not load each other's -march=native build: the compiler's own macros for
    -march=native are in the key."""
    monkeypatch.setattr(build, "_cpu_flags", lambda: "")
    on_avx512 = build.build()
    monkeypatch.setenv("FAKE_ISA", "avx2")
    on_avx2 = build.build()
    assert on_avx2 != on_avx512 and _compiles(fake) == 2
    assert build.build(march="x86-64-v3") == build.build(march="x86-64-v3")  # a fixed -march: one key


def _fallback(reason_has: list[str]):
    import torch

    import ttrec

    reason = build.unavailable_reason()
    assert reason is not None and all(s in reason for s in reason_has), reason
    assert not build.expected_unavailable()  # asked for, so a failure the build test reports
    kw = dict(tt_p_shapes=(10, 10, 10), tt_q_shapes=(2, 2, 4), tt_ranks=(8, 8))
    assert ttrec.TTEmbeddingBag(1000, 16, **kw).resolved_backend() == "torch"
    with pytest.raises(RuntimeError, match="backend='cpu' is unavailable"):
        ttrec.TTEmbeddingBag(1000, 16, backend="cpu", **kw)(torch.tensor([1, 2]), torch.tensor([0]))


@pytest.mark.parametrize("problem", ["missing", "not_executable"])
def test_a_compiler_that_cannot_be_run_is_named_and_auto_falls_back(fake, tmp_path, monkeypatch, problem):
    cxx = tmp_path / "bin" / "g++"
    if problem == "not_executable":
        cxx.parent.mkdir()
        cxx.write_text("#!/bin/sh\n")
        cxx.chmod(0o644)
    monkeypatch.setenv("CXX", str(cxx))
    _fallback(["$CXX", str(cxx), "cannot be run", "set CXX"])


def test_a_failing_compiler_says_what_it_printed(fake, tmp_path, monkeypatch):
    cxx = tmp_path / "failing-c++"
    cxx.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo x 1; exit 0; }\necho "fatal: no space" >&2\nexit 3\n')
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    _fallback(["building the native CPU kernel failed", "exit 3", "fatal: no space"])
    assert _cached(fake) == []  # its temp file removed


def test_cxx_may_name_a_launcher_and_a_compiler(fake, monkeypatch):
    """CXX="env /path/c++" (like "ccache g++"): a command line, as make reads it."""
    monkeypatch.setenv("CXX", f"env {fake['CXX']}")
    path = build.build()
    assert path.read_bytes() == Path(fake["FAKE_SO"]).read_bytes() and _compiles(fake) == 1


def test_an_unusable_cache_directory_is_named_and_auto_falls_back(fake, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("TTREC_CACHE_DIR", str(blocker / "ttrec"))
    _fallback(["TTREC_CACHE_DIR", str(blocker / "ttrec"), "cannot be created"])


@pytest.mark.parametrize("archs", [[], (), "sm_80"])
def test_nvcc_command_refuses_no_architecture_or_a_bare_string(archs):
    """No architecture gave a command for nvcc's default target only (a compile test of 'every
    requested architecture' then checked none); a bare string was read letter by letter."""
    from ttrec.cuda import launch as plan

    with pytest.raises(ValueError, match=r"archs: got .*non-empty list of architectures"):
        plan.nvcc_command(plan.SOURCES[0], archs, "x.o")
    assert plan.nvcc_command(plan.SOURCES[0], ["sm_80"], "x.o").count("-gencode") == 1
