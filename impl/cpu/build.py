"""Compile the native CPU kernel once per (source, flags, compiler, CPU) and load it with ctypes.

Why ctypes and a plain C ABI instead of a torch C++ extension: the kernel needs no torch headers,
so it builds in 7-20 s with g++ (one translation unit) instead of minutes, and one binary serves
every torch version. The shared library is cached under ``$TTREC_CACHE_DIR`` (default
``~/.cache/ttrec``); a build is announced on stderr with the file it writes. Builds are atomic
(temp file + rename) and one at a time per cache directory (an advisory lock on the directory):
concurrent first uses, e.g. the workers of a parallel sweep, wait for one build and all load its
complete library. A cached file that is not a complete library for this CPU, or does not load, is
rebuilt. ``$CXX`` is a command line (``ccache g++`` works); else g++, else c++.
"""

from __future__ import annotations

import _ctypes
import contextlib
import ctypes
import hashlib
import os
import platform
import secrets
import shlex
import shutil
import struct
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

try:
    import fcntl
except ImportError:  # (Windows: no lock; builds stay atomic)
    fcntl = None

__all__ = ["SOURCES", "FLAGS", "build", "bind", "cache_path", "elf_problem", "library", "loaded", "unavailable_reason",
           "expected_unavailable", "cpu_flags", "cpu_reason", "TTShape", "TTStats"]

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "tt_cpu.cpp", *sorted(HERE.glob("*.h")), HERE.parent / "include" / "tt_row.h")  # [0] is compiled; all are hashed
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fPIC", "-shared", "-std=c++17",
         "-Wall", "-Wextra", "-Werror", "-Wno-psabi")
TT_MAX_D = 4


class TTShape(ctypes.Structure):
    """Mirror of tt_shape_t in impl/include/tt_row.h."""

    _fields_ = [("d", ctypes.c_int32), ("p", ctypes.c_int64 * TT_MAX_D), ("q", ctypes.c_int32 * TT_MAX_D),
                ("r", ctypes.c_int32 * (TT_MAX_D + 1))]


class TTStats(ctypes.Structure):
    _fields_ = [("lookups", ctypes.c_int64), ("unique_prefixes", ctypes.c_int64), ("chunks", ctypes.c_int64),
                ("seconds", ctypes.c_double * 11)]

    # forward: chains and last_core are parts of chains_and_last_core (d = 3 with ops.set_profile(True)
    # only: per thread, the mean over the threads; 0 otherwise), sort_radix is the radix sort within sort
    FORWARD_PHASES = ("sort", "chains_and_last_core", "pool", "chains", "last_core", "sort_radix")
    # d == 3 backward: sort (skipped when the forward kept its plan), chains_and_dP (the prefix chains,
    # skipped likewise), i2_buckets (per-lookup dP and dG_3, dG_2 and dP_1 per bucket) and first_core
    # (the segment sums of dG_1 and dG_3); the other phases are those of d = 2 and 4. Parts of i2_buckets
    # (d = 3 with ops.set_profile(True) only: per thread, the mean over the threads; 0 otherwise):
    # buckets_gather (the upstream gradient rows, 16-float rows only), buckets_rows (the per-row products,
    # dP and dG_3) and buckets_gemms (dG_2 and dP_1, per piece of a bucket).
    BACKWARD_PHASES = ("setup", "sort", "gather_grad", "chains_and_dP", "last_core", "middle_cores", "first_core",
                       "i2_buckets", "buckets_gather", "buckets_rows", "buckets_gemms")

    def as_dict(self, phases: tuple[str, ...]) -> dict:
        out = {"lookups": self.lookups, "unique_prefixes": self.unique_prefixes, "chunks": self.chunks}
        out.update({f"seconds_{name}": self.seconds[i] for i, name in enumerate(phases)})
        return out


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _command(cxx: str) -> list[str]:
    """The compiler's argv: ``cxx`` split like a shell word list (``CXX="ccache g++"``), unless it
    names an existing file as a whole (a path with spaces)."""
    return [cxx] if Path(cxx).is_file() else shlex.split(cxx)


def _run(cxx: str, *args: str) -> subprocess.CompletedProcess:
    """``cxx *args``; a compiler that cannot be started is a RuntimeError naming it and $CXX."""
    try:
        return subprocess.run([*_command(cxx), *args], capture_output=True, text=True)
    except (OSError, ValueError) as exc:  # not found, not executable; ValueError: unbalanced quotes
        source = "$CXX" if os.environ.get("CXX") == cxx else "the C++ compiler"
        raise RuntimeError(f"{source} = {cxx!r} cannot be run ({exc}); set CXX to a working C++ compiler "
                           f"or install g++") from None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where unknown)."""
    line = _cpu_flags()
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


def _cache_dir() -> Path:
    return Path(os.environ.get("TTREC_CACHE_DIR") or Path.home() / ".cache" / "ttrec")


def _flags(march: str) -> tuple[str, ...]:
    return tuple(f"-march={march}" if f == "-march=native" else f for f in FLAGS)


def cache_path(cxx: str, march: str = "native") -> Path:
    """Where the kernel built by ``cxx`` for ``-march=march`` is cached: named by a hash of every
    source and header, the flags, the compiler's ``--version``, the CPU's flags and the compiler's
    predefined macros under those flags (the ISA that ``-march`` selects, also where /proc/cpuinfo
    cannot be read), so a cache directory shared by machines of different ISAs holds one file each."""
    flags = _flags(march)
    macros = _run(cxx, *flags, "-E", "-dM", "-x", "c++", os.devnull)
    h = hashlib.sha256()
    for part in [*(p.read_bytes() for p in SOURCES), " ".join(flags), _run(cxx, "--version").stdout,
                 _cpu_flags(), macros.stdout, str(macros.returncode)]:
        h.update(part.encode() if isinstance(part, str) else part)
    return _cache_dir() / f"tt_cpu_{h.hexdigest()[:16]}.so"


_ELF_MACHINES = {"x86_64": 62, "amd64": 62, "aarch64": 183}  # e_machine of this CPU's code


def elf_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete 64-bit shared library for this CPU (None if it is one).

    A cached file that is truncated (a copy cut short, a full disk), not ELF, or for another
    architecture is caught here, before ``dlopen``, which can crash on a truncated file (SIGBUS)."""
    try:
        data = path.read_bytes()
    except OSError as exc:  # e.g. another user's file without read permission
        return f"unreadable ({exc.strerror})"
    if len(data) < 64 or data[:4] != b"\x7fELF":
        return "not an ELF file"
    if data[4:6] != b"\x02\x01":
        return "not a 64-bit little-endian ELF file"
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    want = _ELF_MACHINES.get(platform.machine().lower())
    if e_type != 3:
        return f"not a shared library (ELF type {e_type})"
    if want is not None and e_machine != want:
        return f"code for another architecture (ELF machine {e_machine}, this CPU's is {want})"
    phoff, shoff = struct.unpack_from("<QQ", data, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54)
    ends = [phoff + phentsize * phnum, shoff + shentsize * shnum]
    if ends[0] <= len(data):  # each segment's bytes (p_offset, p_filesz of Elf64_Phdr)
        for at in range(phoff, phoff + phnum * phentsize, phentsize):
            offset, _vaddr, _paddr, filesz = struct.unpack_from("<QQQQ", data, at + 8)
            ends.append(offset + filesz)
    if max(ends) > len(data):
        return f"truncated ({len(data)} bytes; its headers need {max(ends)})"
    return None


STALE_TMP_S = 3600  # a build's temp file older than this was left by a killed build (a build takes ~20 s)


def _remove_stale_tmp(directory: Path) -> None:
    """Remove temp files of builds killed before their rename (a compiler outlives a killed Python)."""
    for tmp in directory.glob("*.so.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
        except OSError:
            pass  # another process removed or renamed it


def _writable_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"TTREC_CACHE_DIR: the native kernel's cache directory {str(directory)!r} cannot be "
                           f"created ({exc.strerror}); set TTREC_CACHE_DIR to a writable directory") from None


@contextlib.contextmanager
def _build_lock(directory: Path, target: Path):
    """Hold the cache directory's build lock (flock on the directory itself: no lock file to
    leave behind), announcing a wait on another process's build. The operating system drops the lock when its
    holder exits, killed or not; the compiler, started with close_fds, never holds it."""
    try:
        fd = os.open(directory, os.O_RDONLY) if fcntl is not None else None
    except OSError:  # a directory this user may write but not read: no lock (builds stay atomic)
        fd = None
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[ttrec] waiting for another process's build of the native CPU kernel in {directory} (for {target.name})",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (closing the last descriptor releases the lock)


def build(cxx: str | None = None, march: str = "native", rebuild: str = "") -> Path:
    """The kernel compiled for ``-march=march`` (cached; see :func:`cache_path`). The source picks
    its vector code by what the target has (AVX-512, else AVX2/generic), so tests build the other
    variant with e.g. ``march="x86-64-v3"`` to run both paths on one AVX-512 machine. A cached file
    that is not a complete library (:func:`elf_problem`) is rebuilt, as is any when ``rebuild`` says
    why (e.g. it did not load)."""
    cxx = cxx or _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    target = cache_path(cxx, march)
    why = rebuild
    if target.exists() and not rebuild:
        if (damage := elf_problem(target)) is None:
            return target
        why = f"the cached file is {damage}"
    _writable_dir(target.parent)
    with _build_lock(target.parent, target):
        if not rebuild and target.exists() and elf_problem(target) is None:
            return target  # another process built it while this one waited
        _compile(cxx, march, target, why)
    return target


def _compile(cxx: str, march: str, target: Path, why: str) -> None:
    """Compile the kernel into ``target`` (announced; temp file + rename), under the build lock."""
    _remove_stale_tmp(target.parent)
    print(f"[ttrec] compiling the native CPU kernel ({cxx}, -march={march}) -> {target}" + (f" ({why})" if why else ""),
          file=sys.stderr, flush=True)
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.{secrets.token_hex(4)}.so.tmp")
    try:  # created with 0o755 less the umask (mkstemp's 0o600 kept other users of a shared cache out)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755))
    except OSError as exc:
        raise RuntimeError(f"TTREC_CACHE_DIR: the native kernel's cache directory {str(target.parent)!r} is not "
                           f"writable ({exc.strerror}); set TTREC_CACHE_DIR to a writable directory") from None
    try:
        done = _run(cxx, *_flags(march), str(SOURCES[0]), "-o", str(tmp))
        if done.returncode != 0:
            raise RuntimeError(f"building the native CPU kernel failed ({cxx} -march={march}, exit {done.returncode}):\n"
                               f"{done.stderr[-4000:]}")
        if (damage := elf_problem(tmp)) is not None:
            raise RuntimeError(f"building the native CPU kernel with {cxx} -march={march} gave a file that is {damage}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def bind(path: Path) -> ctypes.CDLL:
    """Load a built kernel and declare its C ABI; raises RuntimeError if ``path`` is not a complete
    library for this CPU or not this source's kernel (a missing symbol, another ABI version)."""
    if (damage := elf_problem(path)) is not None:
        raise RuntimeError(f"{path} is {damage}")
    lib = ctypes.CDLL(str(path))
    try:
        _declare(lib)
    except (AttributeError, RuntimeError) as exc:
        _ctypes.dlclose(lib._handle)  # else dlopen of this path after a rebuild returns this library again
        raise RuntimeError(f"{path} is not the native kernel of this source: {exc}") from None
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    shape_p = ctypes.POINTER(TTShape)
    lib.tt_forward.argtypes = [shape_p, P, P, P, I64, P, I32, P, I32, I64, I32, ctypes.POINTER(TTStats),
                               ctypes.POINTER(ctypes.c_void_p)]
    lib.tt_backward.argtypes = [shape_p, P, P, P, I64, P, I32, P, P, P, I32, I64, ctypes.POINTER(TTStats), P,
                                I32, F32, F32, P]
    lib.tt_state_free.argtypes = [P]
    lib.tt_state_free.restype = None
    lib.tt_state_bytes.argtypes = [P]
    lib.tt_state_bytes.restype = I64
    lib.tt_states_live.argtypes = []
    lib.tt_states_live.restype = I64
    lib.tt_scan_bags.argtypes = [P, I64, I64, P, I64, P, I32, ctypes.POINTER(I64), ctypes.POINTER(I64)]
    lib.tt_scan_bags.restype = None
    lib.tt_sort_way.argtypes = []
    lib.tt_sort_way.restype = ctypes.c_int
    lib.tt_last_sort_way.argtypes = []
    lib.tt_last_sort_way.restype = ctypes.c_int
    lib.tt_force_sort_way.argtypes = [ctypes.c_int]
    lib.tt_force_sort_way.restype = None
    lib.tt_set_profile.argtypes = [ctypes.c_int]
    lib.tt_set_profile.restype = None
    lib.tt_thread_round_trip_ns.argtypes = [I64, ctypes.c_double]
    lib.tt_thread_round_trip_ns.restype = ctypes.c_double
    lib.tt_fma_peak_gflops.argtypes = [I32, I64, ctypes.c_double, F32, F32, ctypes.POINTER(ctypes.c_double),
                                       ctypes.POINTER(ctypes.c_double)]
    lib.tt_fma_peak_gflops.restype = ctypes.c_double
    for f in (lib.tt_forward, lib.tt_backward):
        f.restype = ctypes.c_int
    if lib.tt_abi_version() != 10:
        raise RuntimeError("native library ABI mismatch")


NEEDED_CPU_FLAGS = ("avx2", "fma")  # the kernel's vector code: AVX-512, else pairs of AVX2 registers


def cpu_reason(flags: set[str], machine: str) -> str | None:
    """Why this CPU cannot run the kernel (None if it can). ``flags``: from /proc/cpuinfo, empty
    where unknown (then the build decides)."""
    if machine.lower() not in ("x86_64", "amd64"):
        return f"the native CPU kernel is x86-64 code (AVX2 + FMA or AVX-512); this machine is {machine}"
    missing = [f for f in NEEDED_CPU_FLAGS if flags and f not in flags]
    if missing:
        return f"the native CPU kernel needs AVX2 and FMA; this CPU lacks {', '.join(missing)}"
    return None


@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("TTREC_DISABLE_NATIVE"):
        return None, "disabled by TTREC_DISABLE_NATIVE"
    if (reason := cpu_reason(cpu_flags(), platform.machine())) is not None:
        return None, reason
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found (set CXX or install g++)"
    try:
        path = build(cxx)
        try:
            return bind(path), None
        except (OSError, RuntimeError) as exc:  # a cached file that does not load: rebuilt once, then it must
            return bind(build(cxx, rebuild=f"the cached file did not load: {exc}")), None
    except (OSError, RuntimeError) as exc:
        return None, str(exc)


def loaded() -> ctypes.CDLL | None:
    """The kernel library if an earlier call has already loaded it, else None (never builds it:
    for callers that only use it to go faster, e.g. ttrec.bags)."""
    return _load()[0] if _load.cache_info().currsize else None


def unavailable_reason() -> str | None:
    """None if the native kernel is built and loaded, else why not."""
    return _load()[1]


def expected_unavailable() -> bool:
    """True when the kernel is off by choice, for want of a compiler or on a CPU it does not
    support (see cpu_reason); a failed build is not expected."""
    return (bool(os.environ.get("TTREC_DISABLE_NATIVE")) or _compiler() is None
            or cpu_reason(cpu_flags(), platform.machine()) is not None)


def library() -> ctypes.CDLL:
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(f"the native CPU kernel is unavailable: {reason}")
    return lib
