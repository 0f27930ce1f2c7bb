"""Initialization schemes for TT cores, and the statistics of the rows they reconstruct.

The paper (section 3.2) wants reconstructed rows to look like the uncompressed model's
Uniform(-1/sqrt(N), 1/sqrt(N)) init, i.e. roughly N(0, 1/(3N)) with N = num_embeddings.
A reconstructed entry is a sum over prod(R_1..R_{d-1}) rank paths of products of d core entries,
so with zero-mean i.i.d. core entries of std s_k its variance is prod(R) * prod(s_k^2).

Schemes (entries of every core i.i.d.; ``c = (1/sqrt(3N))**(1/d)`` is the rank-blind scale):

- ``uniform``: U(-sqrt(3) c, sqrt(3) c), so each core entry has std c;
- ``normal``: N(0, c^2);
- ``sampled_gaussian``: the paper's Algorithm 3 as the reference code reads it: N(0, 1) draws,
  entries with |x| < 2 redrawn (keeping the tails), then scaled by c. Drawn here directly from
  that conditional distribution by inverse CDF (same distribution, no rejection rounds). Its per-entry variance is
  ``c^2 * (1 + 2*phi(2)/(1-Phi(2)))``, about 5.75 c^2;
- ``calibrated`` (ours): N(0, s^2) with ``s^(2d) * prod(R) = 1/(3N)``, so reconstructed rows have
  exactly the target variance whatever the ranks.

Only ``calibrated`` hits the target; the others miss it by a factor that grows with the ranks.
``expected_row_std`` gives each scheme's closed-form reconstructed std, which tests check against
measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .shapes import TTSpec

__all__ = ["INIT_SCHEMES", "init_tt_cores", "check_memory", "expected_row_std", "target_row_std", "RowStats", "row_stats"]

INIT_SCHEMES = ("uniform", "normal", "sampled_gaussian", "calibrated")
_TAIL = 2.0  # Algorithm 3 redraws entries with |x| < 2


def _tail_variance(a: float = _TAIL) -> float:
    """Var of N(0,1) conditioned on |x| >= a: 1 + a*phi(a) / (1 - Phi(a))."""
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    sf = 0.5 * math.erfc(a / math.sqrt(2))
    return 1 + a * phi / sf


def target_row_std(num_embeddings: int) -> float:
    """Std of Uniform(-1/sqrt(N), 1/sqrt(N)), the uncompressed DLRM init: sqrt(1/(3N))."""
    return math.sqrt(1.0 / (3 * num_embeddings))


def _core_std(spec: TTSpec, scheme: str) -> float:
    """Std of one core entry under ``scheme`` (the same for every core)."""
    target = target_row_std(spec.num_embeddings)
    c = target ** (1.0 / spec.d)
    if scheme in ("uniform", "normal"):
        return c
    if scheme == "sampled_gaussian":
        return c * math.sqrt(_tail_variance())
    if scheme == "calibrated":
        return (target / math.sqrt(math.prod(spec.tt_ranks))) ** (1.0 / spec.d)
    raise ValueError(f"init scheme must be one of {INIT_SCHEMES}, got {scheme!r}")


def expected_row_std(spec: TTSpec, scheme: str) -> float:
    """Closed-form std of reconstructed table entries under ``scheme``."""
    return math.sqrt(math.prod(spec.tt_ranks)) * _core_std(spec, scheme) ** spec.d


def _available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(spec: TTSpec, itemsize: int = 4) -> None:
    """A ValueError naming the ranks and shapes when the cores cannot fit in the memory available
    (MemAvailable: swap and cgroup limits not counted): drawn in float64 and cast, they need their own bytes
    plus about three float64 temporaries of the largest core at once (a rank of 100,000 had reached the
    allocator, whose error names neither)."""
    largest = max(math.prod(shape) for shape in spec.core_shapes)
    need = spec.param_count * itemsize + largest * 8 * 3
    available = _available_bytes()
    if available is not None and need > available:
        raise ValueError(f"tt_ranks: got {list(spec.tt_ranks)} with tt_p_shapes={list(spec.tt_p_shapes)}, "
                         f"tt_q_shapes={list(spec.tt_q_shapes)}: the cores hold {spec.param_count:,} parameters and "
                         f"need {need / 2**30:.1f} GiB to be made, but {available / 2**30:.1f} GiB of memory is "
                         "available; lower the ranks (or the shapes)")


def init_tt_cores(
    spec: TTSpec, scheme: str = "calibrated", generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """New cores for ``spec``: a list of d tensors, core k of shape (R_{k-1}, p_k, q_k, R_k)."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init scheme must be one of {INIT_SCHEMES}, got {scheme!r}")
    check_memory(spec, torch.empty((), dtype=dtype).element_size())
    c = target_row_std(spec.num_embeddings) ** (1.0 / spec.d)
    cores = []
    for shape in spec.core_shapes:
        if scheme == "uniform":
            bound = math.sqrt(3.0) * c
            core = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        elif scheme == "normal":
            core = torch.randn(shape, generator=generator, dtype=torch.float64) * c
        elif scheme == "sampled_gaussian":
            # N(0,1) conditioned on |x| >= 2, drawn by inverse CDF: the same distribution as
            # redrawing until |x| >= 2, without ~ln(n)/0.046 rounds of rejection
            tail = 0.5 * math.erfc(_TAIL / math.sqrt(2))  # P(x >= 2)
            u = 1.0 - torch.rand(shape, generator=generator, dtype=torch.float64)  # (0, 1]
            sign = torch.where(torch.rand(shape, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
            core = sign * (-torch.special.ndtri(u * tail)).clamp(min=_TAIL) * c  # lower tail: no 1 - tiny
        else:
            core = torch.randn(shape, generator=generator, dtype=torch.float64) * _core_std(spec, scheme)
        cores.append(core.to(dtype))
    return cores


@dataclass(frozen=True)
class RowStats:
    """Statistics of reconstructed entries against the target N(0, 1/(3N)).

    ``ks_distance`` is the Kolmogorov-Smirnov statistic (sup |F_empirical - F_target|, 0..1).
    """

    mean: float
    std: float
    target_std: float
    std_ratio: float
    ks_distance: float
    n_entries: int


def row_stats(
    cores: list[torch.Tensor], spec: TTSpec, n_rows: int = 2048, generator: torch.Generator | None = None
) -> RowStats:
    """Reconstruct ``n_rows`` random rows (at most N) and compare their entries with N(0, 1/(3N)).

    ``cores`` must have ``spec.core_shapes``; ``n_rows`` is an int >= 1."""
    from .reference import tt_rows  # local: reference imports nothing from here, keep it one-way

    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 1:
        raise ValueError(f"n_rows: got {n_rows!r}; must be an int >= 1 (rows to reconstruct)")
    shapes = [tuple(c.shape) for c in cores]
    if shapes != spec.core_shapes:
        raise ValueError(f"cores: got shapes {shapes}; the spec's core shapes are {spec.core_shapes}")
    n_rows = min(n_rows, spec.num_embeddings)
    idx = torch.randperm(spec.num_embeddings, generator=generator)[:n_rows]
    with torch.no_grad():
        values = tt_rows([c.double() for c in cores], spec, idx).flatten()
    target = target_row_std(spec.num_embeddings)
    sorted_vals, _ = torch.sort(values)
    n = sorted_vals.numel()
    cdf = torch.special.ndtr(sorted_vals / target)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum(upper - cdf, cdf - (upper - 1.0 / n)).max()
    std = float(values.std())
    return RowStats(float(values.mean()), std, target, std / target, float(ks), n)
