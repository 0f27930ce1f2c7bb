"""Environment capture: what a reader needs to trust a number (commit, versions, CPU, GPU, threads)."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

__all__ = ["CpuWait", "capture", "fma_peak", "steady_heap", "thread_round_trip_ns", "usable_cpus"]

_ROOT = Path(__file__).resolve().parents[1]
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")  # platform.machine() of the CPUs that have "flags" to read


def _git(*args: str) -> str | None:
    """git's output, or None where git cannot tell (no git, not a repository, refused: "dubious ownership")."""
    try:
        done = subprocess.run(["git", *args], cwd=_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpuinfo() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo ("model name", "cpu family", ...); empty where absent."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor's block ends here
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or "unknown"


def _cpu_family_model() -> str:
    """x86 ``cpu family`` and ``model``, e.g. "family 25 model 1" (Zen 3): the microarchitecture,
    which neither the model name nor the vector ISA gives on these VMs (Zen 2 and Zen 3 are both AVX2
    "AMD EPYC"); on Zen 3 the gate's training point read 0.82 of a Zen 2 baseline. "unknown" elsewhere."""
    info = _cpuinfo()
    if "cpu family" in info and "model" in info:
        return f"family {info['cpu family']} model {info['model']}"
    return "unknown"


def _cpu_isa() -> str:
    """The widest x86 vector ISA the CPU has (the native kernel compiles to it: ``-march=native``).
    The model name alone does not tell: virtual machines report Zen 2 and an AVX-512 EPYC both as "AMD EPYC"."""
    from ttrec.cpu.build import cpu_flags

    flags, machine = cpu_flags(), platform.machine().lower()
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    if not flags and machine in _X86:  # no /proc/cpuinfo flags (not Linux, or hidden): not known to lack AVX2
        return "unknown"
    return machine or "unknown"


def _gpu() -> dict[str, str]:
    if not torch.cuda.is_available():
        return {"gpu_name": "not available: torch.cuda.is_available() is False", "gpu_driver": "not available"}
    out = {"gpu_name": torch.cuda.get_device_name(), "gpu_driver": "not available: nvidia-ml-py not installed"}
    try:
        import pynvml

        pynvml.nvmlInit()
        out["gpu_driver"] = str(pynvml.nvmlSystemGetDriverVersion())
    except Exception as exc:  # NVML missing or failing must not lose the measurement
        out["gpu_driver"] = f"not available: {exc}"
    return out


@functools.lru_cache(maxsize=1)
def _static() -> dict[str, str]:
    import hydra
    import numpy

    sha = _git("rev-parse", "HEAD") or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")  # None: unknown, not clean
    try:
        import cupy

        cupy_version = cupy.__version__
    except Exception:
        cupy_version = "not installed"
    return {
        "git_sha": sha,
        "git_dirty": "unknown" if status is None else str(bool(status)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": str(torch.version.cuda),
        "cupy": cupy_version,
        "numpy": numpy.__version__,
        "hydra": hydra.__version__,
        "cpu_model": _cpu_model(),
        "cpu_isa": _cpu_isa(),
        "cpu_family_model": _cpu_family_model(),
        "cpu_count": str(os.cpu_count()),
        "hostname": platform.node(),
        **_gpu(),
    }


def capture() -> dict[str, str]:
    """Environment columns for a result row; ``threads`` is torch's intra-op thread count now,
    ``omp_wait_policy`` the OpenMP setting (PASSIVE matters on a shared machine: README, Configuration)
    and ``malloc`` the heap's setting in this process (see steady_heap)."""
    return {**_static(), "threads": str(torch.get_num_threads()), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "malloc": _heap_setting}


# glibc's malloc, fixed by steady_heap: blocks up to MMAP_THRESHOLD bytes come from the heap (32 MiB, the
# ceiling of glibc's own moving threshold), and the heap keeps up to TRIM_THRESHOLD bytes free at its top
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_heap_setting = "default"


def steady_heap() -> str:
    """Fix glibc malloc's thresholds in this process (once; later calls return the same), so that
    the memory a step frees is what its next step gets back, whatever the process allocated before.

    With glibc's moving thresholds (its default) that depends on the process's history: in 10 of 66
    processes the native fused training step's 4 MiB output was handed fresh pages every step, 1,024
    page faults and 0.4-1.5 ms more per step of about 6.6 ms (Kaggle's largest table, 65,536 lookups,
    Zen 2 VM: the heap's top given back to the system and taken again each step); with the thresholds
    fixed, in none of 22. Every measuring process calls this before its first timed point (benches.app.build_point,
    benches.cpu_kernel, DLRM training, the gate), for every implementation alike; rows record it in ``malloc``. Returns that
    setting: "glibc mmap_threshold=... trim_threshold=..." or why it left the heap alone (another
    libc, or mallopt refused)."""
    global _heap_setting
    if _heap_setting != "default":
        return _heap_setting
    if platform.libc_ver()[0] != "glibc":
        _heap_setting = f"default: not glibc ({platform.libc_ver()[0] or 'unknown libc'})"
        return _heap_setting
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        _heap_setting = "default: glibc's mallopt refused the thresholds"
        return _heap_setting
    _heap_setting = f"glibc mmap_threshold={MMAP_THRESHOLD} trim_threshold={TRIM_THRESHOLD}"
    return _heap_setting


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS tells it, else the CPU count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def thread_round_trip_ns(trips: int = 20_000, budget_s: float = 0.005) -> float | None:
    """The round trip of a cache line between two threads right now, in ns (the native kernel's
    probe: at most ``trips`` trips and about ``budget_s`` seconds), or None where it cannot run
    (fewer than two usable CPUs, no native kernel). On a VM it tells where the hypervisor has put
    the vCPUs at this moment: on the Zen 4 VM 50-100 ns near, 300-1,400 ns far apart (benches.cpu_kernel
    counts a round near at most NEAR_NS, 150 ns), and the step times of the native kernel and of
    nn.EmbeddingBag change with it."""
    if usable_cpus() < 2:
        return None
    from ttrec.cpu.build import library, unavailable_reason

    if unavailable_reason() is not None:
        return None
    ns = library().tt_thread_round_trip_ns(trips, budget_s)
    return ns if ns > 0 else None


def fma_peak(threads: int, iterations: int = 1 << 21) -> tuple[Callable[[], float], float] | None:
    """The cores' peak FP32 rate as a timed step: a callable that runs the native kernel's loop of
    fused multiply-adds on its own 16-float vectors, in registers only (tt_fma_peak_gflops: independent
    accumulators per thread, ``threads`` threads together, ``iterations`` each: 2^21 take about 7 ms on
    the Zen 4 VM), and the FLOPs one call does (time it, e.g. interleaved with the sgemm: FLOPs / seconds
    is the peak in that state). No GEMM can pass it; the sgemm's rate is not such a ceiling (the
    kernel's chain GEMMs have run above it). ``threads``: 1 to the CPUs this process may run on (more
    would time their contention, not a peak); ``iterations``: 1 to 2^32 (about 15 s). None without the
    native kernel, or when OpenMP grants fewer threads; a later call that is granted fewer raises
    RuntimeError (its FLOPs per call would no longer hold)."""
    cpus = usable_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cpus:
        raise ValueError(f"threads: got {threads!r}; allowed: an int in [1, {cpus}], the CPUs this process may run on")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or not 1 <= iterations <= 1 << 32:
        raise ValueError(f"iterations: got {iterations!r}; allowed: an int in [1, 2**32]")
    from ttrec.cpu.build import library, unavailable_reason

    if unavailable_reason() is not None:
        return None
    lib = library()
    flops, checksum = ctypes.c_double(), ctypes.c_double()

    def call() -> float:
        return lib.tt_fma_peak_gflops(threads, iterations, 1e9, 1.0, 1.0, ctypes.byref(flops), ctypes.byref(checksum))

    def run() -> float:
        rate = call()
        if rate < 0:
            raise RuntimeError(f"fma_peak: OpenMP granted fewer than the {threads} threads asked for")
        return rate

    if call() < 0:
        return None
    return run, flops.value


# threads of this process waiting for a CPU, on average over a measurement, from which its rows carry
# a note (benches.app): on the quiet 2-core VM a 2-thread point reads below 0.02; one other busy
# process about 0.5-1
BUSY_CPU_WAIT = 0.25
# and only when the waits add up to two scheduler slices (10 ms each here) or more: one preempted slice
# in a short measurement is not contention (and leaves its median alone)
BUSY_WAITED_S = 0.02
_MIN_WINDOW_S = 0.05  # shorter measurements: not recorded


def _run_delays_ns() -> dict[str, int] | None:
    """Per thread of this process (by id), the nanoseconds it has spent ready to run but waiting for a
    CPU (its run delay, /proc/self/task/<id>/schedstat), or None where the kernel does not say."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    delays = {}
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/schedstat") as f:
                delays[task] = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):  # a thread that ended meanwhile, or no schedstat
            continue
    return delays or None


class CpuWait:
    """How many of this process's threads were, on average, ready to run but waiting for a CPU while
    the ``with`` block ran: the growth of their scheduler run delay (ns counters; per thread, so one
    that ends takes only its own share along) over the block's wall time. Only work on the CPUs this
    process runs on counts (a job pinned to its own cores is not disturbed by the rest of the host);
    the hypervisor's steal on a VM is not seen (the CPU kernel experiment probes that:
    thread_round_trip_ns). ``threads`` is None where the kernel keeps no schedstat, or for a block
    under 0.05 s; ``waited_s`` is the total. The wait is other work's, unless the process
    runs more threads than it has CPUs (``torch.get_num_threads()`` at entry): then its own threads
    queue for each other. A timing taken while it is high is not the kernel's alone: with
    spin-waiting OpenMP threads (the default wait policy) a thread kept off its CPU stalls every
    barrier, so times grow far beyond the share of CPU the others took."""

    def __init__(self) -> None:
        self.threads: float | None = None
        self.waited_s = 0.0
        self.torch_threads = torch.get_num_threads()

    def __enter__(self) -> "CpuWait":
        self.torch_threads = torch.get_num_threads()
        self._start = (time.monotonic(), _run_delays_ns())
        return self

    def __exit__(self, *exc) -> None:
        t0, before = self._start
        wall, after = time.monotonic() - t0, _run_delays_ns()
        if before is None or after is None or wall < _MIN_WINDOW_S:
            return
        self.waited_s = sum(max(0, d - before.get(task, 0)) for task, d in after.items()) / 1e9
        self.threads = round(self.waited_s / wall, 3)

    def note(self) -> str | None:
        """The rows' note when the wait reaches BUSY_CPU_WAIT and BUSY_WAITED_S, else None."""
        if self.threads is None or self.threads < BUSY_CPU_WAIT or self.waited_s < BUSY_WAITED_S:
            return None
        cpus = usable_cpus()
        if self.torch_threads > cpus:
            return (f"oversubscribed: {self.torch_threads} torch threads on {cpus} CPUs; its threads waited for a CPU "
                    f"{self.threads:.2f} threads' worth of the measurement's wall time, for each other (set "
                    f"timing.threads to at most {cpus})")
        return (f"busy machine: this process's threads waited for a CPU {self.threads:.2f} threads' worth of the "
                f"measurement's wall time (other work on its {cpus} CPUs); times are inflated (run on a quiet "
                f"machine, or with OMP_WAIT_POLICY=PASSIVE / timing.threads=1)")
