"""Workloads (ttrec.workloads): determinism, ranges, layout, the Zipf law, and batch statistics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ttrec.workloads import DISTRIBUTIONS, Batch, Workload, batch_stats, generate_batch


def _same(a: Batch, b: Batch) -> bool:
    same_w = (a.per_sample_weights is None and b.per_sample_weights is None) or (
        a.per_sample_weights is not None and b.per_sample_weights is not None
        and torch.equal(a.per_sample_weights, b.per_sample_weights))
    return torch.equal(a.indices, b.indices) and torch.equal(a.offsets, b.offsets) and same_w


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("permute", [True, False])
def test_deterministic_in_seed_and_differs_across_seeds(distribution, permute):
    w = Workload(distribution=distribution, permute=permute, batch_size=64, pooling_factor=3, weighted=True, seed=7)
    a, b = generate_batch(w, 1000), generate_batch(w, 1000)
    assert _same(a, b)
    c = generate_batch(Workload(**{**w.as_dict(), "seed": 8}), 1000)
    assert not torch.equal(a.indices, c.indices)
    assert not torch.equal(a.per_sample_weights, c.per_sample_weights)
    assert torch.equal(a.offsets, c.offsets)  # the layout does not depend on the seed


@settings(max_examples=30, deadline=None)
@given(
    distribution=st.sampled_from(DISTRIBUTIONS),
    permute=st.booleans(),
    alpha=st.floats(0.1, 3.0),
    batch_size=st.integers(1, 50),
    pooling=st.integers(0, 6),
    weighted=st.booleans(),
    n_rows=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_batch_layout_and_ranges(distribution, permute, alpha, batch_size, pooling, weighted, n_rows, seed):
    w = Workload(distribution, alpha, permute, batch_size, pooling, weighted, seed)
    batch = generate_batch(w, n_rows)
    n = batch_size * pooling
    assert batch.indices.dtype == torch.int64 and batch.indices.shape == (n,)
    assert batch.num_lookups == n
    if n:
        assert int(batch.indices.min()) >= 0 and int(batch.indices.max()) < n_rows
    assert batch.offsets.dtype == torch.int64
    assert torch.equal(batch.offsets, torch.arange(batch_size, dtype=torch.int64) * pooling)
    if weighted:
        assert batch.per_sample_weights.dtype == torch.float32 and batch.per_sample_weights.shape == (n,)
        if n:
            assert float(batch.per_sample_weights.min()) >= 0 and float(batch.per_sample_weights.max()) < 1
    else:
        assert batch.per_sample_weights is None
    # a batch is valid nn.EmbeddingBag input
    ref = torch.nn.functional.embedding_bag(batch.indices, torch.ones(n_rows, 2), batch.offsets, mode="sum",
                                            per_sample_weights=batch.per_sample_weights)
    assert ref.shape == (batch_size, 2)


def _zipf_p(n_rows, alpha, rank):
    h = sum(r ** -alpha for r in range(1, n_rows + 1))
    return rank ** -alpha / h


@pytest.mark.parametrize("alpha", [1.05, 0.8, 1.5])
def test_zipf_unpermuted_frequencies_match_closed_form(alpha):
    n_rows, n = 1000, 50_000
    batch = generate_batch(Workload("zipf", alpha, permute=False, batch_size=n, seed=3), n_rows)
    counts = torch.bincount(batch.indices, minlength=n_rows)
    assert int(counts.argmax()) == 0  # rank 1 is row 0
    for rank in (1, 2, 3, 10):
        p = _zipf_p(n_rows, alpha, rank)
        freq = float(counts[rank - 1]) / n
        assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / n), (rank, freq, p)
    # unpermuted: frequency is non-increasing in the row id over the head (counts far apart there)
    head = counts[:5].tolist()
    assert head == sorted(head, reverse=True)


def test_zipf_permuted_moves_hot_row_but_keeps_its_frequency():
    n_rows, n, alpha = 1000, 50_000, 1.05
    p1 = _zipf_p(n_rows, alpha, 1)
    hot_rows = set()
    for seed in range(4):
        batch = generate_batch(Workload("zipf", alpha, permute=True, batch_size=n, seed=seed), n_rows)
        counts = torch.bincount(batch.indices, minlength=n_rows)
        assert abs(float(counts.max()) / n - p1) < 5 * math.sqrt(p1 * (1 - p1) / n)
        hot_rows.add(int(counts.argmax()))
    assert len(hot_rows) > 1  # the permutation scatters the hot rank


def test_uniform_is_roughly_uniform():
    n_rows, n = 50, 100_000
    batch = generate_batch(Workload("uniform", batch_size=n, seed=1), n_rows)
    counts = torch.bincount(batch.indices, minlength=n_rows).double()
    p = 1 / n_rows
    assert float((counts / n - p).abs().max()) < 5 * math.sqrt(p * (1 - p) / n)


def test_batch_stats_closed_form():
    batch = Batch(torch.tensor([0, 0, 1, 5, 5, 5, 7, 11]), torch.tensor([0, 4]), None)
    stats = batch_stats(batch)
    assert stats == {"unique_row_ratio": 5 / 8}  # {0, 1, 5, 7, 11}
    # p-shapes (3, 4): the prefix of row i is i // 4: 0,0,0,1,1,1,1,2 -> 3 unique
    stats = batch_stats(batch, p_shapes=(3, 4))
    assert stats["unique_row_ratio"] == 5 / 8
    assert stats["unique_prefix_ratio"] == 3 / 8
    # d = 3, p = (2, 3, 2): prefix (i1, i2) = i // 2: 0,0,0,2,2,2,3,5 -> 4 unique
    assert batch_stats(batch, p_shapes=(2, 3, 2))["unique_prefix_ratio"] == 4 / 8


def test_batch_stats_all_distinct_and_all_same():
    distinct = Batch(torch.arange(10), torch.tensor([0]), None)
    assert batch_stats(distinct, (5, 2)) == {"unique_row_ratio": 1.0, "unique_prefix_ratio": 5 / 10}
    same = Batch(torch.full((10,), 3), torch.tensor([0]), None)
    assert batch_stats(same, (5, 2)) == {"unique_row_ratio": 0.1, "unique_prefix_ratio": 0.1}


@pytest.mark.parametrize("field, kwargs", [
    ("distribution", {"distribution": "pareto"}),
    ("batch_size", {"batch_size": 0}),
    ("batch_size", {"batch_size": -5}),
    ("pooling_factor", {"pooling_factor": -1}),
    ("zipf_alpha", {"distribution": "zipf", "zipf_alpha": 0.0}),
    ("zipf_alpha", {"distribution": "zipf", "zipf_alpha": -1.0}),
])
def test_workload_rejects_bad_values(field, kwargs):
    with pytest.raises(ValueError, match=rf"^workload\.{field}: got"):
        Workload(**kwargs)


def test_workload_is_a_hashable_value():
    a, b = Workload("zipf", seed=3), Workload("zipf", seed=3)
    assert a == b and hash(a) == hash(b)
    assert a.as_dict() == {"distribution": "zipf", "zipf_alpha": 1.05, "permute": True, "batch_size": 2048,
                           "pooling_factor": 1, "weighted": False, "seed": 3}
    assert Workload(**a.as_dict()) == a


@pytest.mark.parametrize("field, value", [("batch_size", 2.5), ("pooling_factor", 1.5), ("seed", -1)])
def test_workload_rejects_non_integer_sizes_and_negative_seed(field, value):
    with pytest.raises((ValueError, TypeError), match=rf"^workload\.{field}: got"):
        Workload(**{field: value})
