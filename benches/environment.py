"""Environment capture: what a reader needs to trust a number (commit, versions, CPU, GPU, threads)."""

from __future__ import annotations

import functools
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

import torch

__all__ = ["OtherLoad", "capture", "thread_round_trip_ns", "usable_cpus"]

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
    """Environment columns for a result row; ``threads`` is torch's intra-op thread count now, and
    ``omp_wait_policy`` the OpenMP setting (PASSIVE matters on a shared machine: README, Configuration)."""
    return {**_static(), "threads": str(torch.get_num_threads()), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


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


# CPUs' worth of other work during a measurement above which its rows carry a note (benches.app): on
# the 2-core VM a quiet machine reads below 0.05; one other busy process about 1
BUSY_OTHER_CPUS = 0.25
_MIN_WINDOW_S = 0.2  # /proc/stat counts in clock ticks (10 ms): shorter windows are not read


def _busy_seconds() -> float | None:
    """CPU seconds all CPUs have spent busy since boot (/proc/stat: user, nice, system, irq, softirq
    and steal, the time the hypervisor gave to other guests), or None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return r.ru_utime + r.ru_stime


class OtherLoad:
    """How many CPUs' worth of work other processes (and the hypervisor's steal) did while the
    ``with`` block ran: the machine's busy time (/proc/stat) less this process's CPU time, over the
    block's wall time. ``cpus`` is None where it cannot be read (no /proc/stat) or the block was too
    short to tell (under 0.2 s: the counters tick every 10 ms). A timing taken while it is high is
    not the kernel's alone: with spin-waiting OpenMP threads (the default wait policy) a descheduled
    thread stalls every barrier, so times grow far beyond the share of CPU the others took."""

    def __init__(self) -> None:
        self.cpus: float | None = None

    def __enter__(self) -> "OtherLoad":
        self._start = (time.monotonic(), _busy_seconds(), _own_seconds())
        return self

    def __exit__(self, *exc) -> None:
        t0, busy0, own0 = self._start
        wall, busy1 = time.monotonic() - t0, _busy_seconds()
        if busy0 is None or busy1 is None or wall < _MIN_WINDOW_S:
            return
        self.cpus = max(0.0, ((busy1 - busy0) - (_own_seconds() - own0)) / wall)

    def note(self) -> str | None:
        """The rows' note when the others' share reaches BUSY_OTHER_CPUS, else None."""
        if self.cpus is None or self.cpus < BUSY_OTHER_CPUS:
            return None
        return (f"busy machine: other processes used {self.cpus:.2f} of {os.cpu_count()} CPUs during the timed calls; "
                f"times are inflated (run on a quiet machine, or with OMP_WAIT_POLICY=PASSIVE / timing.threads=1)")
