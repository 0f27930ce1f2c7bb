"""Workloads: typed, seedable records of what a stream of lookup batches looks like, and their generators.

A :class:`Workload` is a value: it can be printed, hashed, stored beside results and regenerated
bit for bit from its seed (numpy's PCG64 generator). :class:`WorkloadStream` draws the batches
``t = 0, 1, 2, ...`` of one workload over one table; :func:`generate_batch` is its first batch.

Index distributions (``distribution``):

- ``uniform``: every row equally likely;
- ``zipf``: P(rank r) ~ r^-zipf_alpha, r = 1..N, ranks mapped to rows by a random permutation of
  the table (``permute``, FBGEMM's generator) or onto rows 0, 1, 2, ... (then hot rows share TT
  prefixes, which overstates prefix reuse);
- ``hot_set``: a controlled hit rate (paper Figure 12): each lookup is drawn, with probability
  ``hit_rate``, uniformly from a fixed hot set of ``hot_fraction`` of the rows, else uniformly from
  the rows outside it. A cache that holds exactly the hot set then serves ``hit_rate`` of the
  lookups (in expectation; a batch's count is Binomial(lookups, hit_rate)). With ``hit_rate < 1``
  rows outside the hot set must exist: a ``hot_fraction`` whose hot set, round(hot_fraction * N),
  is the whole table (e.g. 1.0) is an error; only a one-row table is all hot (every lookup is its
  one row). With ``hit_rate = 1`` the hot set is round(hot_fraction * N) rows, the whole table
  included (hot_fraction 1.0 is then uniform over every row).

The table mapping (Zipf permutation, hot set) is drawn once per stream from its own seed, so every
batch of a stream shares the same hot rows; the draws come from a second generator.

Bag sizes (``pooling_distribution``): ``fixed`` (every bag has ``pooling_factor`` lookups),
``normal`` (round(N(L, sigma)) clipped at 0) or ``uniform`` (integers on [L - s, L + s], whose
standard deviation is sqrt(s (s + 1) / 3): s is the integer that brings it nearest to sigma
(:func:`uniform_half_width`; sigma 2 gives s = 3, exactly sd 2). The smallest spread is s = 1,
sd 0.816: a sigma up to half of that, 0.408, would give no spread and is an error; the lower end
is clipped at 0).
Clipping at 0 raises the mean above L when sigma is comparable to L; the measured mean is the
batch's lookups / bags (``Batch.num_lookups / Batch.num_bags``), the bench's result column
``measured_pooling_factor``.

``reuse_fraction``: in batch t >= 1 each lookup is, with this probability, a copy of a uniformly
chosen lookup of batch t - 1 (the same row), else a fresh draw. Copies have the marginal law of
the fresh draws, so the index distribution (and a hot set's hit rate) is unchanged; only the
overlap between consecutive batches grows. Batch 0 has no predecessor.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Iterator

import numpy as np
import torch

from .shapes import check_flag, check_size

__all__ = ["DISTRIBUTIONS", "POOLING_DISTRIBUTIONS", "Workload", "Batch", "WorkloadStream", "generate_batch",
           "hot_set_size", "uniform_half_width", "batch_stats"]

DISTRIBUTIONS = ("uniform", "zipf", "hot_set")
POOLING_DISTRIBUTIONS = ("fixed", "normal", "uniform")

# The first seven fields are the original record; the rest are the axes added for the cache
# experiments. as_dict() omits those when they hold their defaults, so a record stored before the
# axes existed still reads back as the same value.
_BASE_FIELDS = ("distribution", "zipf_alpha", "permute", "batch_size", "pooling_factor", "weighted", "seed")


@dataclass(frozen=True)
class Workload:
    """A stream of batches: its shape, index distribution and seed.

    distribution: one of ``DISTRIBUTIONS`` (see the module docstring).
    zipf_alpha, permute: the Zipf exponent, and whether ranks are scattered over the table.
    batch_size: bags per batch; pooling_factor: mean lookups per bag (L);
    pooling_sigma, pooling_distribution: the spread of bag sizes (sigma 0 with ``fixed``).
    weighted: draw per-sample weights, uniform on [0, 1).
    hit_rate: ``hot_set`` only, the fraction of lookups drawn from the hot set, in [0, 1].
    hot_fraction: ``hot_set`` only, the hot set's share of the table's rows, in (0, 1].
    reuse_fraction: probability that a lookup repeats one of the previous batch, in [0, 1].
    """

    distribution: str = "uniform"
    zipf_alpha: float = 1.05
    permute: bool = True
    batch_size: int = 2048
    pooling_factor: int = 1
    weighted: bool = False
    seed: int = 0
    hit_rate: float = 0.9
    hot_fraction: float = 0.001
    pooling_sigma: float = 0.0
    pooling_distribution: str = "fixed"
    reuse_fraction: float = 0.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "pooling_factor", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"workload.{name}: got {value!r} ({type(value).__name__}); expected an int")
        for name in ("permute", "weighted"):
            object.__setattr__(self, name, check_flag(f"workload.{name}", getattr(self, name)))
        for name in ("zipf_alpha", "hit_rate", "hot_fraction", "pooling_sigma", "reuse_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"workload.{name}: got {value!r}; expected a finite number")
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
        if not 0 <= self.hit_rate <= 1:
            raise ValueError(f"workload.hit_rate: got {self.hit_rate}; must be in [0, 1]")
        if not 0 < self.hot_fraction <= 1:
            raise ValueError(f"workload.hot_fraction: got {self.hot_fraction}; must be in (0, 1]")
        if self.pooling_distribution not in POOLING_DISTRIBUTIONS:
            raise ValueError(f"workload.pooling_distribution: got {self.pooling_distribution!r}; "
                             f"allowed: {POOLING_DISTRIBUTIONS}")
        if self.pooling_sigma < 0:
            raise ValueError(f"workload.pooling_sigma: got {self.pooling_sigma}; must be >= 0")
        if self.pooling_distribution == "fixed" and self.pooling_sigma != 0:
            raise ValueError(f"workload.pooling_sigma: got {self.pooling_sigma} with pooling_distribution='fixed'; "
                             "a spread needs pooling_distribution 'normal' or 'uniform'")
        if self.pooling_distribution == "uniform" and self.pooling_sigma != 0 and uniform_half_width(
                self.pooling_sigma) == 0:
            raise ValueError(f"workload.pooling_sigma: got {self.pooling_sigma} with pooling_distribution='uniform'; "
                             f"the smallest spread of integers on [L - s, L + s] is sd {_uniform_sd(1):.3f} (s = 1): "
                             f"use pooling_sigma >= {math.ceil(_uniform_sd(1) / 2 * 1000) / 1000}, or 0 for no spread")
        if not 0 <= self.reuse_fraction <= 1:
            raise ValueError(f"workload.reuse_fraction: got {self.reuse_fraction}; must be in [0, 1]")

    def as_dict(self) -> dict:
        """The record: the base fields, plus every added axis that differs from its default."""
        defaults = {f.name: f.default for f in fields(self)}
        return {k: v for k, v in asdict(self).items() if k in _BASE_FIELDS or v != defaults[k]}

    def columns(self) -> dict:
        """Every field (result-table columns)."""
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

    @property
    def num_bags(self) -> int:
        return self.offsets.numel()


def _uniform_sd(s: int) -> float:
    """Standard deviation of the integers on [L - s, L + s], uniformly."""
    return math.sqrt(s * (s + 1) / 3)


def uniform_half_width(sigma: float) -> int:
    """The half-width s >= 0 whose uniform integers on [L - s, L + s] have the standard deviation
    nearest to ``sigma`` (sqrt(s (s + 1) / 3); 0: no spread)."""
    s = int((math.sqrt(1 + 12 * sigma * sigma) - 1) / 2)  # the largest s with sd(s) <= sigma
    return min((s, s + 1), key=lambda k: abs(_uniform_sd(k) - sigma))


def hot_set_size(workload: Workload, num_embeddings: int) -> int:
    """Rows in the hot set: round(hot_fraction * N), at least 1; with ``hit_rate < 1`` at most N - 1,
    so that rows outside it exist (a one-row table is all hot). With ``hit_rate == 1`` no lookup is
    drawn outside it, so it may be the whole table (hot_fraction 1.0: every row)."""
    h = min(max(1, round(workload.hot_fraction * num_embeddings)), num_embeddings)
    return h if workload.hit_rate == 1 else min(h, max(1, num_embeddings - 1))


class WorkloadStream:
    """The batches t = 0, 1, 2, ... of ``workload`` over a table of ``num_embeddings`` rows.

    Deterministic in ``workload.seed``: two streams of one workload yield the same batches.
    ``hot_rows`` (sorted int64 array) is the hot set of a ``hot_set`` workload, else None.
    """

    def __init__(self, workload: Workload, num_embeddings: int, device: str | torch.device = "cpu") -> None:
        num_embeddings = check_size("num_embeddings", num_embeddings)
        self.workload, self.num_embeddings, self.device = workload, num_embeddings, device
        table_seed, draw_seed = np.random.SeedSequence(workload.seed).spawn(2)
        table_rng = np.random.Generator(np.random.PCG64(table_seed))
        self._rng = np.random.Generator(np.random.PCG64(draw_seed))
        self._cdf = self._perm = None
        self.hot_rows: np.ndarray | None = None
        if workload.distribution == "zipf":
            cdf = np.cumsum(np.arange(1, num_embeddings + 1, dtype=np.float64) ** -workload.zipf_alpha)
            self._cdf = cdf / cdf[-1]
            if workload.permute:
                self._perm = table_rng.permutation(num_embeddings)
        elif workload.distribution == "hot_set":
            h = hot_set_size(workload, num_embeddings)
            if (workload.hit_rate < 1 and num_embeddings > 1
                    and max(1, round(workload.hot_fraction * num_embeddings)) >= num_embeddings):
                raise ValueError(
                    f"workload.hot_fraction: got {workload.hot_fraction} on a table of {num_embeddings} rows: the hot "
                    f"set would be the whole table, leaving no rows for the {1 - workload.hit_rate:.3g} of lookups "
                    f"drawn outside it (workload.hit_rate={workload.hit_rate}); use a hot_fraction whose "
                    f"round(hot_fraction * N) is at most N - 1 = {num_embeddings - 1}, or hit_rate=1")
            self.hot_rows = np.sort(table_rng.choice(num_embeddings, size=h, replace=False)).astype(np.int64)
            # the j-th row outside the hot set is j + #{hot rows h_i with h_i - i <= j}
            self._gaps = self.hot_rows - np.arange(h, dtype=np.int64)
        self._prev: np.ndarray | None = None
        self.batches_drawn = 0

    def _bag_sizes(self) -> np.ndarray:
        w, b = self.workload, self.workload.batch_size
        if w.pooling_distribution == "fixed" or w.pooling_sigma == 0:
            return np.full(b, w.pooling_factor, dtype=np.int64)
        if w.pooling_distribution == "normal":
            return np.maximum(0, np.rint(self._rng.normal(w.pooling_factor, w.pooling_sigma, b))).astype(np.int64)
        s = uniform_half_width(w.pooling_sigma)
        return self._rng.integers(max(0, w.pooling_factor - s), w.pooling_factor + s + 1, size=b, dtype=np.int64)

    def _rows(self, n: int) -> np.ndarray:
        w, rng, big_n = self.workload, self._rng, self.num_embeddings
        if w.distribution == "uniform":
            return rng.integers(0, big_n, size=n, dtype=np.int64)
        if w.distribution == "zipf":
            ranks = np.minimum(np.searchsorted(self._cdf, rng.random(n), side="right"), big_n - 1)
            return self._perm[ranks] if self._perm is not None else ranks.astype(np.int64)
        hot = self.hot_rows
        in_hot = rng.random(n) < w.hit_rate
        if big_n == hot.size:  # a one-row table: nothing outside the hot set
            in_hot[:] = True
        rows = np.empty(n, dtype=np.int64)
        n_hot = int(in_hot.sum())
        rows[in_hot] = hot[rng.integers(0, hot.size, size=n_hot)]
        j = rng.integers(0, big_n - hot.size, size=n - n_hot) if n > n_hot else np.empty(0, dtype=np.int64)
        rows[~in_hot] = j + np.searchsorted(self._gaps, j, side="right")
        return rows

    def next_batch(self) -> Batch:
        sizes = self._bag_sizes()
        n = int(sizes.sum())
        rows = self._rows(n)
        w = self.workload
        if w.reuse_fraction > 0 and self._prev is not None and self._prev.size and n:
            reuse = self._rng.random(n) < w.reuse_fraction
            rows[reuse] = self._prev[self._rng.integers(0, self._prev.size, size=int(reuse.sum()))]
        offsets = np.zeros(w.batch_size, dtype=np.int64)
        np.cumsum(sizes[:-1], out=offsets[1:])
        weights = torch.from_numpy(self._rng.random(n, dtype=np.float32)).to(self.device) if w.weighted else None
        self._prev = rows
        self.batches_drawn += 1
        return Batch(torch.from_numpy(rows).to(self.device), torch.from_numpy(offsets).to(self.device), weights)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()


def generate_batch(workload: Workload, num_embeddings: int, device: str | torch.device = "cpu") -> Batch:
    """Draw one batch of ``workload`` over a table of ``num_embeddings`` rows: the first batch of its
    stream (deterministic in the seed)."""
    return WorkloadStream(workload, num_embeddings, device).next_batch()


def batch_stats(batch: Batch, p_shapes: tuple[int, ...] | None = None, *,
                previous: Batch | None = None) -> dict[str, float]:
    """Unique-row ratio, and (given TT p-shapes) unique-prefix ratio of a batch (unique / lookups).

    The prefix of a row is its digits i_1..i_{d-1}: lookups sharing it share all but the last core.
    With ``previous`` (the batch before it), also ``reuse_ratio``: the fraction of this batch's
    lookups whose row occurs in ``previous``.
    """
    n = max(1, batch.num_lookups)
    out = {"unique_row_ratio": torch.unique(batch.indices).numel() / n}
    if p_shapes is not None:
        _check_p_shapes(p_shapes, batch.indices)
        out["unique_prefix_ratio"] = torch.unique(batch.indices // p_shapes[-1]).numel() / n
    if previous is not None:
        out["reuse_ratio"] = float(torch.isin(batch.indices, previous.indices).sum()) / n
    return out


def _check_p_shapes(p_shapes, indices: torch.Tensor) -> None:
    """``p_shapes`` must be ints >= 1 whose product covers every row of ``indices`` (else the
    digits of a row, and so its prefix, are not defined)."""
    if (not isinstance(p_shapes, (tuple, list)) or not p_shapes
            or any(isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 1 for p in p_shapes)):
        raise ValueError(f"p_shapes: got {p_shapes!r}; expected a tuple of ints >= 1 (the TT row factors)")
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= math.prod(p_shapes):
            raise ValueError(f"p_shapes: got {tuple(p_shapes)} (product {math.prod(p_shapes)}) for rows {lo}..{hi}; "
                             f"the product must exceed every row index (rows are 0..prod(p_shapes) - 1)")
