"""The gate's benchmark points: the key paths, each a :class:`BenchConfig` built by the bench app.

A point's identity is its name (``<impl>_<backend>_<mode>``); its sizes are fixed per scale, so a
baseline stays comparable until someone changes a point here (then refresh the baselines).
Scales: ``default`` (the CI gate, 25-45 s on the 2-core VMs here; README) and ``smoke`` (tiny sizes, the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import (Backend, BenchConfig, CacheConfig, Distribution, Impl, ImplConfig, Mode, ModeConfig,
                      TableConfig, TimingConfig, TTConfig, WorkloadConfig)

__all__ = ["Point", "SCALES", "points", "cuda_present"]


@dataclass(frozen=True)
class Scale:
    """Sizes of one gate scale: table rows, lookups per batch, TT rank, and the reference path's batch."""

    num_embeddings: int
    batch_size: int
    tt_rank: int
    reference_batch_size: int
    cache_batch_size: int


SCALES = {
    "default": Scale(num_embeddings=200_000, batch_size=16_384, tt_rank=32, reference_batch_size=512,
                     cache_batch_size=8192),
    "smoke": Scale(num_embeddings=20_000, batch_size=2048, tt_rank=16, reference_batch_size=32, cache_batch_size=256),
}


@dataclass(frozen=True)
class Point:
    """One gated benchmark: its name, the bench app config that builds it, and its own threshold
    (None: the gate's ``--threshold``) where its measured run-to-run noise needs a wider one.
    Reference points (``gated=False``) run torch's kernels behind our thin modules; on a shared
    machine their calibrated CPU time drifted 0.5-2.3x between unchanged runs (README, gate section),
    so they are measured and reported against their threshold, for context, but never fail the gate."""

    name: str
    cfg: BenchConfig
    threshold: float | None = None
    optional: bool = False  # run only when asked for by name (--points)
    gated: bool = True  # False: a reference point, reported against its threshold but never failing the gate

    @property
    def device(self) -> str:
        return self.cfg.device


def cuda_present() -> bool:
    """A GPU for torch and the TT CUDA backend's requirements (CuPy): the CUDA points can run."""
    if not torch.cuda.is_available():
        return False
    from ttrec.cuda.loader import unavailable_reason

    return unavailable_reason() is None


def _cfg(scale: Scale, impl: ImplConfig, mode: str, *, threads: int, device: str = "cpu", fused: bool = False,
         batch_size: int | None = None, distribution: str = "zipf", cache: bool = False) -> BenchConfig:
    return BenchConfig(
        impl=impl,
        table=TableConfig("gate", scale.num_embeddings, 16),
        tt=TTConfig(rank=scale.tt_rank),
        workload=WorkloadConfig(distribution=Distribution(distribution), batch_size=batch_size or scale.batch_size,
                                pooling_factor=1),
        timing=TimingConfig(threads=threads),
        mode=ModeConfig(name=Mode(mode), fused=fused, lr=0.01),
        cache=CacheConfig(enabled=True, fraction=0.01, warmup_iters=4, eval_batches=1) if cache else CacheConfig(),
        device=device,
    )


def points(scale: str = "default", threads: int = 2) -> list[Point]:
    """The gate's points on this machine: the native CPU backend, the LFU cache, T3nsor-style and
    nn.EmbeddingBag, the reference ``torch`` backend (optional); CUDA when present."""
    if scale not in SCALES:
        raise ValueError(f"scale: got {scale!r}; allowed: {sorted(SCALES)}")
    s = SCALES[scale]
    tt_cpu, tt_torch = ImplConfig(Impl.tt, Backend.cpu), ImplConfig(Impl.tt, Backend.torch)
    out = [
        Point("tt_cpu_forward", _cfg(s, tt_cpu, "forward", threads=threads)),
        Point("tt_cpu_train_fused_sgd", _cfg(s, tt_cpu, "train", threads=threads, fused=True)),
        Point("cached_tt_cpu_train_fused_sgd", _cfg(s, tt_cpu, "train", threads=threads, fused=True,
                                                    batch_size=s.cache_batch_size, cache=True), threshold=1.25),
        Point("t3nsor_torch_forward", _cfg(s, ImplConfig(Impl.t3nsor), "forward", threads=threads,
                                           batch_size=s.reference_batch_size), threshold=1.4, gated=False),
        Point("dense_aten_forward", _cfg(s, ImplConfig(Impl.dense, sparse=True), "forward", threads=threads),
              threshold=1.6, gated=False),
        # sparse gradients allocate and free megabytes per step: the noisiest point here
        Point("dense_aten_train_sgd", _cfg(s, ImplConfig(Impl.dense, sparse=True), "train", threads=threads),
              threshold=1.6, gated=False),
        # the pure-PyTorch reference backend: many small ops, 1.5x apart between unchanged runs; opt-in
        Point("tt_torch_forward", _cfg(s, tt_torch, "forward", threads=threads, batch_size=s.reference_batch_size),
              threshold=1.6, optional=True, gated=False),
    ]
    if cuda_present():
        tt_cuda = ImplConfig(Impl.tt, Backend.cuda)
        out += [
            Point("tt_cuda_forward", _cfg(s, tt_cuda, "forward", threads=threads, device="cuda")),
            Point("tt_cuda_train_fused_sgd", _cfg(s, tt_cuda, "train", threads=threads, device="cuda", fused=True)),
            Point("dense_cuda_forward", _cfg(s, ImplConfig(Impl.dense, sparse=True), "forward", threads=threads,
                                             device="cuda"), threshold=1.6, gated=False),
        ]
    return out

