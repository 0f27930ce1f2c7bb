"""Compile the native CPU kernel once per (source, flags, compiler, CPU) and load it with ctypes.

Why ctypes and a plain C ABI instead of a torch C++ extension: the kernel needs no torch headers,
so it builds in about 2 s with g++ instead of a minute, and one binary serves every torch version.
The shared library is cached under ``$TTREC_CACHE_DIR`` (default ``~/.cache/ttrec``); the first
build is announced on stderr. Builds are atomic (temp file + rename), so concurrent first uses are safe.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

__all__ = ["SOURCES", "FLAGS", "build", "bind", "library", "unavailable_reason", "expected_unavailable", "cpu_flags",
           "cpu_reason", "TTShape",
           "TTStats"]

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
                ("seconds", ctypes.c_double * 8)]

    # forward: chains and last_core are parts of chains_and_last_core (d = 3 with ops.set_profile(True)
    # only: per thread, the mean over the threads; 0 otherwise), sort_radix is the radix sort within sort
    FORWARD_PHASES = ("sort", "chains_and_last_core", "pool", "chains", "last_core", "sort_radix")
    # d == 3 backward: sort (skipped when the forward kept its plan), chains_and_dP (the prefix chains,
    # skipped likewise), i2_buckets (per-lookup dP and dG_3, dG_2 and dP_1 per bucket) and first_core
    # (the segment sums of dG_1 and dG_3); the other phases are those of d = 2 and 4.
    BACKWARD_PHASES = ("setup", "sort", "gather_grad", "chains_and_dP", "last_core", "middle_cores", "first_core",
                       "i2_buckets")

    def as_dict(self, phases: tuple[str, ...]) -> dict:
        out = {"lookups": self.lookups, "unique_prefixes": self.unique_prefixes, "chunks": self.chunks}
        out.update({f"seconds_{name}": self.seconds[i] for i, name in enumerate(phases)})
        return out


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


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


def build(cxx: str | None = None, march: str = "native") -> Path:
    """The kernel compiled for ``-march=march`` (cached). The source picks its vector code by what
    the target has (AVX-512, else AVX2/generic), so tests build the other variant with e.g.
    ``march="x86-64-v3"`` to run both paths on one AVX-512 machine."""
    cxx = cxx or _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    flags = _flags(march)
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256()
    for part in [*(p.read_bytes() for p in SOURCES), " ".join(flags).encode(), version.encode(), _cpu_flags().encode()]:
        h.update(part)
    target = _cache_dir() / f"tt_cpu_{h.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"[ttrec] compiling the native CPU kernel ({cxx}, -march={march}) -> {target}", file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([cxx, *flags, str(SOURCES[0]), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the native CPU kernel failed ({cxx} -march={march}, exit {done.returncode}):\n"
                               f"{done.stderr[-4000:]}")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def bind(path: Path) -> ctypes.CDLL:
    """Load a built kernel and declare its C ABI; raises RuntimeError on an ABI mismatch."""
    lib = ctypes.CDLL(str(path))
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
    for f in (lib.tt_forward, lib.tt_backward):
        f.restype = ctypes.c_int
    if lib.tt_abi_version() != 8:
        raise RuntimeError("native library ABI mismatch")
    return lib


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
        return bind(build(cxx)), None
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
