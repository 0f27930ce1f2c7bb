"""Pure-PyTorch TT math: row digits, dense reconstruction, and the paper's lookup algorithm.

Conventions (DESIGN.md section 3): core k has shape (R_{k-1}, p_k, q_k, R_k); row index
``i = sum_k i_k * prod(p_{k+1:})`` (the first core's digit is most significant), and likewise the
column ``j`` over q. Everything here is differentiable with autograd; nothing here validates
inputs (that happens once, in :mod:`ttrec.bags`).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .bags import Bags
from .shapes import TTSpec

__all__ = ["row_digits", "tt_rows", "tt_to_dense", "tt_embedding_bag", "DEFAULT_CHUNK_BYTES"]

# Bound on the gathered-core scratch of one chunk of lookups (bytes).
DEFAULT_CHUNK_BYTES = 64 << 20


def row_digits(indices: torch.Tensor, p_shapes: tuple[int, ...]) -> torch.Tensor:
    """int64 (n,) row ids -> int64 (d, n) TT digits, first core's digit first."""
    digits = []
    rest = indices
    for p in reversed(p_shapes[1:]):
        digits.append(rest % p)
        rest = rest // p
    digits.append(rest)
    return torch.stack(digits[::-1])


def tt_rows(cores: list[torch.Tensor], spec: TTSpec, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` (int64 (n,)) of the table as (n, embedding_dim), by gather + batched GEMMs.

    Per lookup, core slices G_k[:, i_k] are gathered, (n, R_{k-1}, q_k, R_k), and multiplied left
    to right: the partial product is (n, q_1...q_k, R_k).
    """
    digits = row_digits(indices, spec.tt_p_shapes)
    n = indices.numel()
    part = cores[0][0, digits[0]]  # (n, q1, R1)
    cols = spec.tt_q_shapes[0]  # Q = q_1...q_k (named, not -1: a reshape of 0 rows cannot infer it)
    for k in range(1, spec.d):
        r_prev, _, q, r = cores[k].shape
        sl = cores[k].permute(1, 0, 2, 3)[digits[k]].reshape(n, r_prev, q * r)  # (n, R_{k-1}, q_k R_k)
        cols *= q
        part = torch.bmm(part, sl).reshape(n, cols, r)  # (n, Q q_k, R_k)
    return part.reshape(n, spec.embedding_dim)


def tt_to_dense(cores: list[torch.Tensor], spec: TTSpec) -> torch.Tensor:
    """The full table (num_embeddings, embedding_dim), contracted core by core over all rows."""
    full = cores[0].reshape(spec.tt_p_shapes[0], spec.tt_q_shapes[0], spec.ranks[1])  # (P, Q, R)
    for k in range(1, spec.d):
        full = torch.einsum("aqr,rbsz->abqsz", full, cores[k])
        a, b, q, s, z = full.shape
        full = full.reshape(a * b, q * s, z)
    return full.reshape(-1, spec.embedding_dim)[: spec.num_embeddings]


def _weighted_rows(cores, spec, indices, weights):
    rows = tt_rows(cores, spec, indices)
    return rows if weights is None else rows * weights.unsqueeze(1).to(rows.dtype)


def tt_embedding_bag(
    cores: list[torch.Tensor], spec: TTSpec, bags: Bags, mode: str = "sum",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Pooled lookups (num_bags, embedding_dim): the reference TT-EmbeddingBag.

    Lookups are processed in chunks whose gathered cores fit in ``chunk_bytes``; under autograd
    each chunk is checkpointed (its chain is recomputed in backward, as in the paper's Algorithm
    2), so memory stays bounded for large batches in training too.
    """
    dtype = cores[0].dtype
    out = torch.zeros(bags.num_bags, spec.embedding_dim, dtype=dtype, device=cores[0].device)
    n = bags.num_lookups
    if n:
        per_lookup = sum(r0 * q * r1 for (r0, _, q, r1) in spec.core_shapes) * cores[0].element_size()
        per_lookup += spec.embedding_dim * spec.ranks[-2] * cores[0].element_size()
        chunk = max(1, chunk_bytes // per_lookup)
        bag_ids = bags.bag_ids()
        w = bags.per_sample_weights
        grad = torch.is_grad_enabled() and any(c.requires_grad for c in cores)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            args = (spec, bags.indices[s:e], None if w is None else w[s:e])
            if grad and n > chunk:
                rows = checkpoint(lambda *cs, a=args: _weighted_rows(list(cs), *a), *cores, use_reentrant=False)
            else:
                rows = _weighted_rows(cores, *args)
            out.index_add_(0, bag_ids[s:e], rows)
    elif torch.is_grad_enabled() and any(c.requires_grad for c in cores):
        # no lookups: still part of the graph (zero grads), through empty slices that read no value
        # (c.sum() * 0 made every bag NaN once any core entry was inf or NaN)
        out = out + sum(c.reshape(-1)[:0].sum() for c in cores)
    if mode == "mean":
        out = out / bags.bag_sizes().clamp(min=1).unsqueeze(1).to(out.dtype)
    return out
