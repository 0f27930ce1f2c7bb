"""Calibration kernels: fixed work measured in the same process, interleaved with the gated
benchmark's rounds, so that a machine that is slower right now (shared cores, clocks) slows the
calibration too and the ratio benchmark / calibration stays put.

Two kernels of fixed size, one compute-bound and one memory-bound, because the gated paths are
a mix of both (TT chains are small GEMMs, nn.EmbeddingBag and the cache are gathers):

- ``sgemm``: C = A @ B with A, B fp32 (SGEMM_N x SGEMM_N);
- ``gather``: ``index_select`` of GATHER_ROWS random rows (16 fp32 each) from a table of
  GATHER_TABLE_ROWS rows (64 MiB: larger than the last-level cache), summed into a small output.
  Successive units cycle through GATHER_SETS different row sets (64 MiB of rows in all), so a unit
  finds the same (cold) cache whatever the number of units per sample.

One calibration unit is one call of each; a sample times ``repeats`` units back to back and
reports seconds per unit. :meth:`Calibration.fit` picks ``repeats`` so that a sample lasts about as
long as one round of the benchmark it brackets: both then see the same share of a neighbour's time
slices. Sizes are part of the baseline's identity (:data:`IDENTITY`): changing them makes old
baselines incomparable (``repeats`` is not: results are per unit).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

__all__ = ["Calibration", "IDENTITY"]

SGEMM_N = 192
GATHER_TABLE_ROWS = 1 << 20
GATHER_ROWS = 32_768
GATHER_SETS = 32
IDENTITY = f"sgemm{SGEMM_N}+gather{GATHER_ROWS}of{GATHER_TABLE_ROWS}x16"


class Calibration:
    """The calibration kernels on one device; :meth:`sample` times one call of each (seconds)."""

    def __init__(self, device: str = "cpu", seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.device = device
        self.a = torch.randn(SGEMM_N, SGEMM_N, generator=g).to(device)
        self.b = torch.randn(SGEMM_N, SGEMM_N, generator=g).to(device)
        self.table = torch.randn(GATHER_TABLE_ROWS, 16, generator=g).to(device)
        self.rows = [torch.randint(0, GATHER_TABLE_ROWS, (GATHER_ROWS,), generator=g).to(device)
                     for _ in range(GATHER_SETS)]
        self._next = 0
        self.repeats = 1
        self.sample()  # first touch: allocations and lazy init out of the measurements

    def _work(self) -> None:
        for _ in range(self.repeats):
            torch.mm(self.a, self.b)
            self.table.index_select(0, self.rows[self._next]).sum(0)
            self._next = (self._next + 1) % GATHER_SETS

    def fit(self, round_seconds: float, max_repeats: int = 64) -> int:
        """Choose ``repeats`` so that one sample takes about ``round_seconds``; returns it."""
        self.repeats = 1
        unit = sorted(self.sample() for _ in range(5))[2]
        self.repeats = int(min(max_repeats, max(1, round(round_seconds / unit))))
        return self.repeats

    def sample(self) -> float:
        """Seconds per calibration unit, from one timed run of ``repeats`` units."""
        return time_call(self._work, self.device) / self.repeats


CPU_TIMER = time.process_time  # the gate's CPU clock: CPU seconds of this process (see the README)


def time_call(fn: Callable[[], object], device: str) -> float:
    """Seconds of one ``fn()``: :data:`CPU_TIMER` on the CPU; on a GPU the CUDA-event path of
    :func:`benches.timing.measure` (one warm-up call, one timed call)."""
    if device == "cpu":
        t0 = CPU_TIMER()
        fn()
        return CPU_TIMER() - t0
    from ..timing import measure

    return measure(fn, warmup=1, min_repeats=1, max_repeats=1, target_time_s=0.0, device=device).median
