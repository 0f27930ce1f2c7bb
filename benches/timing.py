"""The one timing protocol of the suite: warm-up, repetitions sized from a first call, quantiles.

Everything that reports a time calls :func:`measure`; nobody rolls their own loop. CPU timings
use ``time.perf_counter`` around each call; on CUDA tensors the caller passes ``synchronize``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

__all__ = ["Stats", "measure"]


@dataclass(frozen=True)
class Stats:
    """Per-call times in seconds: median, quartiles, n timed calls, and the raw samples."""

    median: float
    q1: float
    q3: float
    n: int
    samples: tuple[float, ...]

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @classmethod
    def of(cls, samples: list[float]) -> "Stats":
        s = sorted(samples)
        if len(s) == 1:
            return cls(s[0], s[0], s[0], 1, tuple(samples))
        q1, med, q3 = statistics.quantiles(s, n=4, method="inclusive")
        return cls(med, q1, q3, len(s), tuple(samples))

    def map(self, f: Callable[[float], float]) -> "Stats":
        """Stats of f(sample) (e.g. seconds -> lookups/s); quantiles recomputed, so order flips are handled."""
        return Stats.of([f(x) for x in self.samples])


def measure(
    fn: Callable[[], object],
    *,
    warmup: int = 2,
    min_repeats: int = 5,
    max_repeats: int = 100,
    target_time_s: float = 1.0,
    synchronize: Callable[[], None] | None = None,
) -> Stats:
    """Time ``fn()``: ``warmup`` untimed calls, then enough timed calls to fill ``target_time_s``
    (estimated from the last warm-up call), clamped to [min_repeats, max_repeats]."""
    if warmup < 1 or min_repeats < 1 or max_repeats < min_repeats:
        raise ValueError(f"timing: need warmup >= 1 and 1 <= min_repeats <= max_repeats, got "
                         f"warmup={warmup}, min_repeats={min_repeats}, max_repeats={max_repeats}")
    sync = synchronize or (lambda: None)
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync()
        first = time.perf_counter() - t0
    repeats = int(min(max_repeats, max(min_repeats, target_time_s / max(first, 1e-9))))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return Stats.of(samples)
