"""Workloads: typed, seedable records of what a batch of lookups looks like, and their generators.

A :class:`Workload` is a value: it can be printed, hashed, stored beside results and regenerated
bit for bit from its seed (numpy's PCG64 generator).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = ["DISTRIBUTIONS", "Workload", "Batch", "generate_batch", "batch_stats"]

DISTRIBUTIONS = ("uniform", "zipf")


@dataclass(frozen=True)
class Workload:
    """One batch's shape and index distribution.

    distribution: "uniform" over rows, or "zipf" (P(rank r) ~ r^-zipf_alpha, r = 1..N).
    permute: scatter Zipf ranks over the table by a random permutation (else rank r is row r-1,
        which puts hot rows on shared TT prefixes and overstates reuse).
    batch_size: bags per batch; pooling_factor: lookups per bag; weighted: draw per-sample weights.
    """

    distribution: str = "uniform"
    zipf_alpha: float = 1.05
    permute: bool = True
    batch_size: int = 2048
    pooling_factor: int = 1
    weighted: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "pooling_factor", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"workload.{name}: got {value!r} ({type(value).__name__}); expected an int")
        if self.seed < 0:
            raise ValueError(f"workload.seed: got {self.seed}; must be >= 0")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"workload.distribution: got {self.distribution!r}; allowed: {DISTRIBUTIONS}")
        if self.batch_size < 1:
            raise ValueError(f"workload.batch_size: got {self.batch_size}; must be >= 1")
        if self.pooling_factor < 0:
            raise ValueError(f"workload.pooling_factor: got {self.pooling_factor}; must be >= 0")
        if self.distribution == "zipf" and self.zipf_alpha <= 0:
            raise ValueError(f"workload.zipf_alpha: got {self.zipf_alpha}; must be > 0")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Batch:
    """indices int64 (n,), offsets int64 (batch_size,) bag starts, per_sample_weights float32 (n,) or None."""

    indices: torch.Tensor
    offsets: torch.Tensor
    per_sample_weights: torch.Tensor | None

    @property
    def num_lookups(self) -> int:
        return self.indices.numel()


def _zipf_rows(rng: np.random.Generator, n_rows: int, alpha: float, size: int, permute: bool) -> np.ndarray:
    cdf = np.cumsum(np.arange(1, n_rows + 1, dtype=np.float64) ** -alpha)
    cdf /= cdf[-1]
    ranks = np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), n_rows - 1)
    return rng.permutation(n_rows)[ranks] if permute else ranks


def generate_batch(workload: Workload, num_embeddings: int, device: str | torch.device = "cpu") -> Batch:
    """Draw one batch of ``workload`` over a table of ``num_embeddings`` rows (deterministic in the seed)."""
    rng = np.random.Generator(np.random.PCG64(workload.seed))
    n = workload.batch_size * workload.pooling_factor
    if workload.distribution == "uniform":
        rows = rng.integers(0, num_embeddings, size=n, dtype=np.int64)
    else:
        rows = _zipf_rows(rng, num_embeddings, workload.zipf_alpha, n, workload.permute)
    offsets = np.arange(workload.batch_size, dtype=np.int64) * workload.pooling_factor
    weights = torch.from_numpy(rng.random(n, dtype=np.float32)).to(device) if workload.weighted else None
    return Batch(torch.from_numpy(rows.astype(np.int64)).to(device), torch.from_numpy(offsets).to(device), weights)


def batch_stats(batch: Batch, p_shapes: tuple[int, ...] | None = None) -> dict[str, float]:
    """Unique-row ratio, and (given TT p-shapes) unique-prefix ratio of a batch (unique / lookups).

    The prefix of a row is its digits i_1..i_{d-1}: lookups sharing it share all but the last core.
    """
    n = max(1, batch.num_lookups)
    out = {"unique_row_ratio": torch.unique(batch.indices).numel() / n}
    if p_shapes is not None:
        out["unique_prefix_ratio"] = torch.unique(batch.indices // p_shapes[-1]).numel() / n
    return out
