"""Review fixes in workloads, init, shapes and synthetic clicks: bad input refused with the parameter's
name, and the hot set's documented size honoured at hit_rate 1 (checked against closed-form counts)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ttrec import TTSpec, init_tt_cores, row_stats
from ttrec.shapes import suggest_tt_shapes
from ttrec.synthetic_clicks import ClickBatch
from ttrec.workloads import Batch, Workload, WorkloadStream, batch_stats, generate_batch, hot_set_size


@pytest.mark.parametrize("field, value", [("permute", "false"), ("weighted", "no"), ("permute", 0),
                                          ("weighted", 1), ("weighted", None)])
def test_bool_fields_refuse_non_bools(field, value):
    # a truthy string such as "false" used to switch the setting on silently
    with pytest.raises(TypeError, match=rf"workload\.{field}: got {value!r}.*expected a bool"):
        Workload("zipf", **{field: value})


def test_bool_fields_accept_numpy_bools_as_bools():
    w = Workload("zipf", permute=np.bool_(False), weighted=np.bool_(True))
    assert w.permute is False and w.weighted is True
    assert w == Workload("zipf", permute=False, weighted=True)


@pytest.mark.parametrize("n_rows", [1, 2, 10, 37])
def test_hot_set_of_the_whole_table_at_hit_rate_1_draws_every_row(n_rows):
    """hot_fraction 1.0 with hit_rate 1: the hot set is round(1.0 * N) = N rows, so lookups are uniform
    over every row (one row used to be left out and never drawn)."""
    w = Workload("hot_set", hit_rate=1.0, hot_fraction=1.0, batch_size=2000 * n_rows, seed=3)
    assert hot_set_size(w, n_rows) == n_rows
    stream = WorkloadStream(w, n_rows)
    assert stream.hot_rows.tolist() == list(range(n_rows))
    counts = torch.bincount(stream.next_batch().indices, minlength=n_rows).double()
    n, p = float(counts.sum()), 1 / n_rows
    assert float((counts / n - p).abs().max()) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12
    # below hit_rate 1 the whole-table hot set stays an error, and the cap at N - 1 stays
    if n_rows > 1:
        with pytest.raises(ValueError, match=r"workload\.hot_fraction"):
            WorkloadStream(Workload("hot_set", hit_rate=0.9, hot_fraction=1.0), n_rows)
    assert hot_set_size(Workload("hot_set", hit_rate=0.9, hot_fraction=1.0), n_rows) == max(1, n_rows - 1)


def test_hot_set_size_at_hit_rate_1_is_the_rounded_fraction():
    for frac, n_rows, expected in [(0.95, 20, 19), (0.99, 20, 20), (0.5, 7, 4), (1e-9, 50, 1)]:
        assert hot_set_size(Workload("hot_set", hit_rate=1.0, hot_fraction=frac), n_rows) == expected


@pytest.mark.parametrize("p_shapes, needle", [((5, 5), r"product 25"), ((10, 0), r"ints >= 1"), ((), r"ints >= 1"),
                                               ((10, 10.0), r"ints >= 1")])
def test_batch_stats_refuses_p_shapes_that_do_not_describe_the_rows(p_shapes, needle):
    # rows up to 99 need prod(p) >= 100: (5, 5) used to give a prefix ratio of rows without digits
    batch = Batch(torch.tensor([0, 42, 99, 7]), torch.tensor([0, 2]), None)
    with pytest.raises(ValueError, match=rf"p_shapes: got .*{needle}"):
        batch_stats(batch, p_shapes)
    assert batch_stats(batch, (10, 10))["unique_prefix_ratio"] == 3 / 4  # prefixes 0, 4, 9, 0


def test_batch_stats_prefixes_against_digit_decomposition():
    batch = generate_batch(Workload("zipf", batch_size=500, pooling_factor=3, seed=2, permute=False), 1000)
    p = (10, 10, 10)
    prefixes = {(i // 100, (i // 10) % 10) for i in batch.indices.tolist()}  # (i1, i2), FBTT's order
    assert batch_stats(batch, p)["unique_prefix_ratio"] == len(prefixes) / batch.num_lookups
    empty = generate_batch(Workload(batch_size=3, pooling_factor=0), 1000)
    assert batch_stats(empty, p) == {"unique_row_ratio": 0.0, "unique_prefix_ratio": 0.0}


@pytest.mark.parametrize("n_rows", [0, -5, 2.5, True])
def test_row_stats_refuses_bad_n_rows(n_rows):
    # -5 used to be read as "all rows but 5" (a slice), 0 and 2.5 crashed deep inside
    spec = TTSpec.suggest(1000, 16, 4)
    cores = init_tt_cores(spec, "calibrated", generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=rf"n_rows: got {n_rows!r}; must be an int >= 1"):
        row_stats(cores, spec, n_rows=n_rows)


def test_row_stats_refuses_cores_of_another_spec():
    spec, other = TTSpec.suggest(1000, 16, 4), TTSpec.suggest(1000, 16, 8)
    cores = init_tt_cores(other, "calibrated", generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"cores: got shapes .* the spec's core shapes are"):
        row_stats(cores, spec)


@pytest.mark.parametrize("args, name", [((0, 16, 8), "num_embeddings"), ((100, 0, 8), "embedding_dim"),
                                        ((100.0, 16, 8), "num_embeddings"), ((100, 16.0, 8), "embedding_dim")])
def test_suggest_names_the_bad_size(args, name):
    # the error used to name suggest_shape's internal argument "n" for either size
    with pytest.raises((ValueError, TypeError), match=rf"^{name} must be"):
        TTSpec.suggest(*args)
    with pytest.raises((ValueError, TypeError), match=rf"^{name} must be"):
        suggest_tt_shapes(*args[:2])


@pytest.mark.parametrize("size", [0, -1, 1.5])
def test_click_batch_split_refuses_bad_sizes(size):
    # -1 used to return no pieces at all (an empty evaluation), 0 a bare range() error
    batch = ClickBatch(torch.zeros(4, 13), torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4))
    with pytest.raises(ValueError, match=rf"size: got {size!r}; must be an int >= 1"):
        batch.split(size)
    assert [len(b) for b in batch.split(3)] == [3, 1]
