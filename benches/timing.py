"""The one timing protocol of the suite: warm-up, repetitions that fill a target time, quantiles.

Everything that reports a time calls :func:`measure`; nobody rolls their own loop.

- CPU (``device="cpu"``): ``time.perf_counter`` around each call; calls are timed until together
  they take ``target_time_s`` (at least ``min_repeats``, at most ``max_repeats`` calls).
- GPU (``device="cuda"``): a CUDA event pair around each call on the current stream, one
  synchronize after all timed calls, per-call times from ``Event.elapsed_time``; the number of
  calls is fixed beforehand from the last warm-up call, synchronized and timed on its own (the
  first call, cold, overstates the time per call: with ``warmup=1`` the calls fall short of the
  target). With ``flush_l2`` a buffer larger than the L2 cache is overwritten before each call,
  outside the timed events, so every call starts with a cold L2.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable

__all__ = ["Stats", "measure"]


@dataclass(frozen=True)
class Stats:
    """Per-call times in seconds (after :meth:`map`, in its unit): median, quartiles, n timed calls, the raw samples."""

    median: float
    q1: float
    q3: float
    n: int
    samples: tuple[float, ...]

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @classmethod
    def of(cls, samples: Iterable[float]) -> "Stats":
        """Quartiles by linear interpolation between order statistics (numpy's default method)."""
        samples = tuple(samples)  # (an iterator is read once: the samples kept are the ones counted)
        if not samples:
            raise ValueError("samples: got none; Stats needs at least one sample")
        s = sorted(samples)
        if len(s) == 1:
            return cls(s[0], s[0], s[0], 1, samples)
        q1, med, q3 = statistics.quantiles(s, n=4, method="inclusive")
        return cls(med, q1, q3, len(s), samples)

    def map(self, f: Callable[[float], float]) -> "Stats":
        """Stats of f(sample) (e.g. seconds -> lookups/s); quantiles recomputed, so order flips are handled."""
        return Stats.of([f(x) for x in self.samples])


L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2 (H100: 50 MiB)


def measure(
    fn: Callable[[], object],
    *,
    warmup: int = 2,
    min_repeats: int = 5,
    max_repeats: int = 100,
    target_time_s: float = 1.0,
    device: str = "cpu",
    flush_l2: bool = False,
) -> Stats:
    """Time ``fn()``: ``warmup`` untimed calls, then enough timed calls to fill ``target_time_s``
    (CPU: timed until their sum reaches it; GPU: estimated from the last warm-up call), clamped to
    [min_repeats, max_repeats]."""
    if warmup < 1 or min_repeats < 1 or max_repeats < min_repeats:
        raise ValueError(f"timing: need warmup >= 1 and 1 <= min_repeats <= max_repeats, got "
                         f"warmup={warmup}, min_repeats={min_repeats}, max_repeats={max_repeats}")
    if not target_time_s >= 0:  # (NaN too: it would time min_repeats calls, whatever the target)
        raise ValueError(f"target_time_s: got {target_time_s}; must be >= 0 (seconds)")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device: got {device!r}; allowed: 'cpu', 'cuda' or 'cuda:<n>' (another device's "
                         "asynchronous calls would be timed by the CPU clock without a synchronize)")
    cuda = device.startswith("cuda")
    if flush_l2 and not cuda:
        raise ValueError("timing.flush_l2: only meaningful on a GPU (device=cuda); the CPU protocol flushes nothing")
    if not cuda:
        for _ in range(warmup):
            fn()
        samples: list[float] = []
        total = 0.0
        while len(samples) < max_repeats and (len(samples) < min_repeats or total < target_time_s):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
            total += samples[-1]
        return Stats.of(samples)
    import torch

    # events are recorded on the current device's stream and synchronize() waits for the current
    # device: on cuda:N they must be N's (else they time another device's empty stream)
    with torch.cuda.device(device):
        return _measure_cuda(fn, warmup, min_repeats, max_repeats, target_time_s, device, flush_l2)


def _measure_cuda(fn: Callable[[], object], warmup: int, min_repeats: int, max_repeats: int, target_time_s: float,
                  device: str, flush_l2: bool) -> Stats:
    """The GPU protocol of :func:`measure` (``device`` is the current CUDA device)."""
    import torch

    flush_buf = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if flush_l2 else None
    # per-call times are read only after the one synchronize, so the number of calls is fixed
    # beforehand: from the last warm-up call, synchronized and timed on its own
    for _ in range(warmup - 1):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    per_call = time.perf_counter() - t0
    repeats = int(min(max_repeats, max(min_repeats, target_time_s / max(per_call, 1e-9))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        if flush_buf is not None:
            flush_buf.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()  # the one synchronize of the measurement
    return Stats.of([start.elapsed_time(end) / 1e3 for start, end in events])
