"""TT shape planning: factor a table's rows and columns into TT shapes and size the result.

A table of ``num_embeddings x embedding_dim`` is stored as ``d`` cores; core ``k`` has shape
``(R_{k-1}, p_k, q_k, R_k)`` with ``R_0 = R_d = 1``. The row count is padded up to ``prod(p)``
(rows past ``num_embeddings`` exist in the cores but are never looked up); the columns are
factored exactly, ``prod(q) == embedding_dim``.

Shape suggestion follows a rule that reproduces every p-shape of the paper's Table 2 (T3nsor's; the
paper states none): round the row
count up to a multiple of a power of ten, split its prime factors into ``d`` groups, keep the most
balanced split (highest entropy of the factor proportions) over all roundings. Shapes are reported
ascending, as in Table 2.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import sympy

__all__ = ["TTSpec", "suggest_shape", "suggest_tt_shapes", "tt_param_count", "check_size", "check_flag"]

BYTES_PER_FP32 = 4


def check_size(name: str, value) -> int:
    """``value`` as an int if it is a whole number >= 1 (a table's rows or width; numpy ints too),
    else a ValueError naming ``name``: every embedding implementation checks its sizes so."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: got {value!r}; must be an int >= 1")
    return int(value)


def check_flag(name: str, value) -> bool:
    """A True/False argument (bool or numpy bool) as a bool, else a TypeError naming ``name``:
    read by its truthiness, include_last_offset="False" or workload.permute="false" meant True."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name}: got {value!r} ({type(value).__name__}); expected a bool (True or False)")


def _entropy(factors: tuple[int, ...]) -> float:
    total = sum(factors)
    return -sum((f / total) * math.log(f / total) for f in factors)


@lru_cache(maxsize=4096)
def _splits(n: int, d: int) -> tuple[tuple[int, ...], ...]:
    """All ways to write n as an ascending product of d factors (each >= 2 when n has >= d primes)."""
    n_primes = sum(sympy.factorint(n).values())
    low = 2 if n_primes >= d else 1
    out: list[tuple[int, ...]] = []

    def rec(rest: int, parts: int, smallest: int, acc: tuple[int, ...]) -> None:
        if parts == 1:
            if rest >= smallest:
                out.append(acc + (rest,))
            return
        for f in sympy.divisors(rest):
            if f < smallest:
                continue
            if f**parts > rest:
                break
            rec(rest // f, parts - 1, f, acc + (f,))

    rec(n, d, low, ())
    return tuple(out)


def _most_balanced(n: int, d: int) -> tuple[int, ...]:
    return max(_splits(n, d), key=_entropy)


def suggest_shape(n: int, d: int = 3, round_up: bool = True) -> tuple[int, ...]:
    """Suggest ``d`` ascending factors whose product is ``n`` (or, with ``round_up``, at least ``n``).

    With ``round_up``, candidates are ``n`` rounded up to a multiple of ``10**i`` for every
    ``i < len(str(n))``; the candidate with the most balanced split wins (the smallest rounding on
    ties). Without it, ``n`` itself is factored (used for the embedding dimension).
    """
    n = _check_int("n", n, minimum=1)
    d = _check_int("d", d, minimum=2)
    if not round_up:
        return _most_balanced(n, d)
    best: tuple[int, ...] | None = None
    for i in range(len(str(n))):
        step = 10**i
        candidate = _most_balanced(-(-n // step) * step, d)
        if best is None or _entropy(candidate) > _entropy(best) + 1e-12:
            best = candidate
    assert best is not None
    return best


def suggest_tt_shapes(
    num_embeddings: int, embedding_dim: int, d: int = 3
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(p-shapes, q-shapes) for a table, e.g. (10131227, 16) -> ((200, 220, 250), (2, 2, 4))."""
    _check_int("num_embeddings", num_embeddings, minimum=1)
    _check_int("embedding_dim", embedding_dim, minimum=1)
    return suggest_shape(num_embeddings, d, round_up=True), suggest_shape(
        embedding_dim, d, round_up=False
    )


def tt_param_count(p: tuple[int, ...], q: tuple[int, ...], ranks: tuple[int, ...]) -> int:
    """Number of TT-core entries: sum_k R_{k-1} * p_k * q_k * R_k, with ``ranks`` the full list R_0..R_d."""
    return sum(ranks[k] * p[k] * q[k] * ranks[k + 1] for k in range(len(p)))


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class TTSpec:
    """A validated TT format for one embedding table.

    ``tt_ranks`` holds the d-1 inner ranks (R_1..R_{d-1}); ``ranks`` adds the boundary ones.
    Sizes are in entries and bytes of fp32.
    """

    num_embeddings: int
    embedding_dim: int
    tt_p_shapes: tuple[int, ...]
    tt_q_shapes: tuple[int, ...]
    tt_ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_int("num_embeddings", self.num_embeddings, 1)
        _check_int("embedding_dim", self.embedding_dim, 1)
        p, q, r = tuple(self.tt_p_shapes), tuple(self.tt_q_shapes), tuple(self.tt_ranks)
        object.__setattr__(self, "tt_p_shapes", p)
        object.__setattr__(self, "tt_q_shapes", q)
        object.__setattr__(self, "tt_ranks", r)
        d = len(p)
        if d < 2:
            raise ValueError(f"tt_p_shapes must have d >= 2 factors (TT needs at least 2 cores), got {p}")
        if len(q) != d:
            raise ValueError(f"tt_q_shapes must have d={d} factors like tt_p_shapes={p}, got {q}")
        if len(r) != d - 1:
            raise ValueError(f"tt_ranks must have d-1={d - 1} inner ranks for d={d} cores, got {r}")
        for name, values in (("tt_p_shapes", p), ("tt_q_shapes", q), ("tt_ranks", r)):
            for v in values:
                _check_int(f"every entry of {name}", v, 1)
        if math.prod(p) < self.num_embeddings:
            raise ValueError(
                f"tt_p_shapes={p} covers prod={math.prod(p)} rows < num_embeddings={self.num_embeddings}; "
                "the product of the p-shapes must be >= the row count"
            )
        if math.prod(q) != self.embedding_dim:
            raise ValueError(
                f"tt_q_shapes={q} has prod={math.prod(q)} != embedding_dim={self.embedding_dim}; "
                "the product of the q-shapes must equal the embedding dimension"
            )

    @classmethod
    def suggest(
        cls, num_embeddings: int, embedding_dim: int, tt_rank: int | tuple[int, ...], d: int = 3
    ) -> "TTSpec":
        """Build a spec with suggested shapes; ``tt_rank`` is one rank for every inner bond or a tuple."""
        if isinstance(tt_rank, bool) or not isinstance(tt_rank, (int, tuple, list)):
            raise TypeError(f"tt_rank: got {tt_rank!r} ({type(tt_rank).__name__}); allowed: an int, or a tuple of "
                            f"d - 1 ints")
        p, q = suggest_tt_shapes(num_embeddings, embedding_dim, d)
        ranks = (tt_rank,) * (d - 1) if isinstance(tt_rank, int) else tuple(tt_rank)
        return cls(num_embeddings, embedding_dim, p, q, ranks)

    @property
    def d(self) -> int:
        return len(self.tt_p_shapes)

    @property
    def ranks(self) -> tuple[int, ...]:
        return (1, *self.tt_ranks, 1)

    def core_shape(self, k: int) -> tuple[int, int, int, int]:
        r = self.ranks
        return (r[k], self.tt_p_shapes[k], self.tt_q_shapes[k], r[k + 1])

    @property
    def core_shapes(self) -> list[tuple[int, int, int, int]]:
        return [self.core_shape(k) for k in range(self.d)]

    @property
    def param_count(self) -> int:
        return tt_param_count(self.tt_p_shapes, self.tt_q_shapes, self.ranks)

    @property
    def param_bytes(self) -> int:
        return self.param_count * BYTES_PER_FP32

    @property
    def dense_param_count(self) -> int:
        return self.num_embeddings * self.embedding_dim

    @property
    def dense_bytes(self) -> int:
        return self.dense_param_count * BYTES_PER_FP32

    @property
    def compression_ratio(self) -> float:
        """Uncompressed entries / TT entries (the paper's "memory reduction")."""
        return self.dense_param_count / self.param_count

    def flops_per_lookup(self) -> int:
        """Multiply-adds x2 of the left-to-right chain for one row (DESIGN.md section 3)."""
        return sum(self.chain_flops())

    def chain_flops(self) -> tuple[int, int]:
        """(FLOPs of the prefix chain through core d-1, FLOPs of the last core's step) for one row.

        Lookups sharing a prefix (i_1..i_{d-1}) can share the first part; the second is per lookup.
        """
        q, r = self.tt_q_shapes, self.ranks
        steps, rows = [], q[0]  # the partial product has prod(q[:k]) rows of width R_k
        for k in range(1, self.d):
            steps.append(2 * rows * r[k] * q[k] * r[k + 1])
            rows *= q[k]
        return sum(steps[:-1]), steps[-1]
