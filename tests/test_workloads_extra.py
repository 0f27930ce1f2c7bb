"""The workload axes added for the cache experiments: streams, the hot set (controlled hit rate),
spread pooling factors, reuse between batches. Checked against closed forms and binomial tolerances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ttrec.workloads import Batch, Workload, WorkloadStream, batch_stats, generate_batch, hot_set_size


def five_sigma(p: float, n: int) -> float:
    return 5 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_stream_is_deterministic_and_starts_with_generate_batch():
    w = Workload("hot_set", hit_rate=0.7, batch_size=50, pooling_factor=3, weighted=True, seed=9, reuse_fraction=0.3)
    a, b = WorkloadStream(w, 5000), WorkloadStream(w, 5000)
    for _ in range(4):
        x, y = next(a), next(b)
        assert torch.equal(x.indices, y.indices) and torch.equal(x.per_sample_weights, y.per_sample_weights)
    first = generate_batch(w, 5000)
    assert torch.equal(first.indices, next(WorkloadStream(w, 5000)).indices)
    assert not torch.equal(next(a).indices, first.indices)  # later batches are new draws


@pytest.mark.parametrize("h", [0.0, 0.3, 0.9, 1.0])
def test_hot_set_fraction_matches_hit_rate(h):
    n_rows = 10_000
    w = Workload("hot_set", hit_rate=h, hot_fraction=0.01, batch_size=5000, pooling_factor=2, seed=2)
    stream = WorkloadStream(w, n_rows)
    hot = torch.from_numpy(stream.hot_rows)
    assert hot.numel() == hot_set_size(w, n_rows) == 100
    assert torch.equal(hot, torch.sort(hot).values) and hot.unique().numel() == 100
    n = in_hot = 0
    for _ in range(3):
        b = next(stream)
        assert torch.equal(torch.from_numpy(stream.hot_rows), hot)  # one hot set per stream
        in_hot += int(torch.isin(b.indices, hot).sum())
        n += b.num_lookups
    assert abs(in_hot / n - h) <= five_sigma(h, n)
    if h in (0.0, 1.0):
        assert in_hot == h * n  # outside draws never land in the hot set


def test_hot_set_draws_are_uniform_inside_and_outside():
    n_rows = 200
    w = Workload("hot_set", hit_rate=0.5, hot_fraction=0.1, batch_size=200_000, seed=5)
    stream = WorkloadStream(w, n_rows)
    counts = torch.bincount(next(stream).indices, minlength=n_rows).double() / 200_000
    hot = torch.from_numpy(stream.hot_rows)
    is_hot = torch.zeros(n_rows, dtype=torch.bool)
    is_hot[hot] = True
    p_in, p_out = 0.5 / 20, 0.5 / 180
    assert float((counts[is_hot] - p_in).abs().max()) <= five_sigma(p_in, 200_000)
    assert float((counts[~is_hot] - p_out).abs().max()) <= five_sigma(p_out, 200_000)


def test_hot_set_edge_sizes():
    assert hot_set_size(Workload("hot_set", hot_fraction=1.0), 10) == 9  # leaves rows outside
    assert hot_set_size(Workload("hot_set", hot_fraction=1e-6), 10) == 1
    b = generate_batch(Workload("hot_set", hit_rate=0.2, batch_size=30), 1)  # one row: all hot
    assert torch.equal(b.indices, torch.zeros(30, dtype=torch.int64))


def test_zipf_stream_keeps_one_permutation():
    w = Workload("zipf", zipf_alpha=1.5, batch_size=20_000, seed=4)
    stream = WorkloadStream(w, 5000)
    hottest = {int(torch.bincount(next(stream).indices, minlength=5000).argmax()) for _ in range(3)}
    assert len(hottest) == 1  # the same rank-1 row in every batch of the stream


@pytest.mark.parametrize("dist,sigma", [("normal", 2.0), ("uniform", 2.0), ("normal", 0.0)])
def test_spread_pooling_factor(dist, sigma):
    L, b = 10, 20_000
    batch = generate_batch(Workload(batch_size=b, pooling_factor=L, pooling_sigma=sigma, pooling_distribution=dist,
                                    weighted=True, seed=1), 1000)
    sizes = torch.diff(torch.cat([batch.offsets, torch.tensor([batch.num_lookups])]))
    assert batch.offsets[0] == 0 and bool((sizes >= 0).all()) and batch.per_sample_weights.numel() == batch.num_lookups
    assert abs(float(sizes.double().mean()) - L) < 5 * max(sigma, 0.01) / math.sqrt(b)
    if dist == "uniform":
        s = round(math.sqrt(3) * sigma)
        assert int(sizes.min()) == L - s and int(sizes.max()) == L + s
        assert abs(float(sizes.double().std()) - math.sqrt(((2 * s + 1) ** 2 - 1) / 12)) < 0.05
    else:
        assert abs(float(sizes.double().std()) - sigma) < 0.05 + 0.05 * sigma
    # a valid nn.EmbeddingBag input
    out = torch.nn.functional.embedding_bag(batch.indices, torch.ones(1000, 2), batch.offsets, mode="sum")
    assert torch.equal(out[:, 0], sizes.float())


def test_reuse_fraction_between_consecutive_batches():
    n_rows, r = 10**7, 0.4  # fresh uniform draws almost never repeat the previous batch's rows
    w = Workload(batch_size=20_000, reuse_fraction=r, seed=3)
    stream = WorkloadStream(w, n_rows)
    first = next(stream)
    assert torch.equal(first.indices, generate_batch(Workload(batch_size=20_000, seed=3), n_rows).indices)
    prev = first
    for _ in range(2):
        b = next(stream)
        ratio = batch_stats(b, previous=prev)["reuse_ratio"]
        fresh_hits = 20_000 / n_rows  # chance a fresh draw hits the previous batch
        assert abs(ratio - (r + (1 - r) * fresh_hits)) <= five_sigma(r, 20_000)
        prev = b


def test_reuse_ratio_closed_form():
    prev = Batch(torch.tensor([1, 2, 3]), torch.tensor([0]), None)
    cur = Batch(torch.tensor([3, 3, 4, 5]), torch.tensor([0]), None)
    assert batch_stats(cur, previous=prev) == {"unique_row_ratio": 0.75, "reuse_ratio": 0.5}


def test_record_round_trips_and_lists_added_axes_only_when_set():
    w = Workload("hot_set", hit_rate=0.5, reuse_fraction=0.1, seed=2)
    d = w.as_dict()
    assert d["hit_rate"] == 0.5 and d["reuse_fraction"] == 0.1 and "pooling_sigma" not in d
    assert Workload(**d) == w and hash(Workload(**d)) == hash(w)
    assert set(w.columns()) == set(d) | {"hot_fraction", "pooling_sigma", "pooling_distribution"}


@pytest.mark.parametrize("field,kwargs", [
    ("hit_rate", {"hit_rate": 1.5}),
    ("hit_rate", {"hit_rate": -0.1}),
    ("hot_fraction", {"hot_fraction": 0.0}),
    ("pooling_distribution", {"pooling_distribution": "poisson"}),
    ("pooling_sigma", {"pooling_sigma": -1.0, "pooling_distribution": "normal"}),
    ("pooling_sigma", {"pooling_sigma": 2.0}),  # a spread needs a distribution
    ("reuse_fraction", {"reuse_fraction": 1.1}),
])
def test_added_fields_reject_bad_values(field, kwargs):
    with pytest.raises(ValueError, match=rf"^workload\.{field}: got"):
        Workload(**kwargs)


def test_stream_rejects_bad_table_size():
    with pytest.raises(ValueError, match="num_embeddings: got 0"):
        WorkloadStream(Workload(), 0)
    with pytest.raises(TypeError, match=r"workload\.hit_rate"):
        Workload(hit_rate=float("nan"))
    assert np.isfinite(Workload().hit_rate)


@pytest.mark.parametrize("distribution", ["uniform", "zipf", "hot_set", "criteo"])
def test_a_workload_column_is_empty_exactly_when_its_key_leaves_the_batches_unchanged(distribution, tmp_path):
    """Each ``workload.*`` key against the result row of a timed point: changing a key whose column is
    filled changes the stream's batches, and a key whose column is empty is one the distribution does
    not read (a filled column for an unread key claims a setting that did not act). ``pooling`` (read
    by the module, not the stream) and ``distribution`` itself are left out; a change the config
    refuses (another distribution's keys; workload.weighted with criteo) cannot be silently ignored
    and is skipped: exactly those are refused."""
    import dataclasses

    from benches.app import build_module, point_columns
    from benches.cache_experiments import workload_stream
    from benches.config import (BenchConfig, CriteoMapping, Distribution, Impl, ImplConfig, PoolingDistribution,
                                TableConfig, WorkloadConfig)

    from tests.test_training_experiments import _criteo_file

    a, b = (str(_criteo_file(tmp_path / name, 100, seed)) for seed, name in enumerate("ab"))
    criteo = distribution == "criteo"  # its bags come from the file: the synthetic pooling keys are refused
    pooling = {} if criteo else {"pooling_factor": 2, "pooling_sigma": 0.5,
                                 "pooling_distribution": PoolingDistribution.normal}
    base = BenchConfig(impl=ImplConfig(name=Impl.dense), table=TableConfig("tiny", 1000, 16),
                       workload=WorkloadConfig(distribution=Distribution(distribution), batch_size=64,
                                               criteo_path=a if criteo else None, **pooling))
    changes = {"zipf_alpha": 1.5, "permute": False, "batch_size": 32, "pooling_factor": 3, "weighted": True,
               "seed": 7, "pooling_sigma": 1.5, "pooling_distribution": PoolingDistribution.uniform, "hit_rate": 0.5,
               "hot_fraction": 0.01, "reuse_fraction": 0.5, "criteo_path": b, "criteo_feature": 5,
               "criteo_mapping": CriteoMapping.dictionary}
    column = {"seed": "workload_seed"}
    assert set(changes) | {"pooling", "distribution"} == {f.name for f in dataclasses.fields(WorkloadConfig)}

    def batches(cfg):
        stream = workload_stream(cfg)
        return [next(stream) for _ in range(2)]

    def same(x, y):
        return all(torch.equal(p.indices, q.indices) and torch.equal(p.offsets, q.offsets)
                   and (p.per_sample_weights is None) == (q.per_sample_weights is None) for p, q in zip(x, y))

    reference = batches(base)
    refused = set()
    for key, value in changes.items():
        try:
            cfg = dataclasses.replace(base, workload=dataclasses.replace(base.workload, **{key: value}))
        except ValueError as exc:
            assert str(exc).startswith(f"workload.{key}: got "), exc
            refused.add(key)
            continue
        got = batches(cfg)
        row = point_columns(cfg, build_module(cfg), got[0], "test")
        unread = same(got, reference)
        assert (row[column.get(key, key)] is None) == unread, (key, row[column.get(key, key)], unread)
    # refused (a config error, never silently ignored): another distribution's keys; with criteo also
    # weighted and the four synthetic pooling keys
    others = {"zipf": {"zipf_alpha", "permute"}, "hot_set": {"hit_rate", "hot_fraction"},
              "criteo": {"criteo_path", "criteo_feature", "criteo_mapping"}}
    expected = set().union(*(keys for dist, keys in others.items() if dist != distribution))
    if criteo:
        expected |= {"weighted", "pooling_factor", "pooling_sigma", "pooling_distribution", "reuse_fraction"}
    assert refused == expected


@pytest.mark.parametrize("sigma", [0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0, 10.0])
def test_uniform_pooling_spread_has_sd_about_sigma(sigma):
    """Integers on [L - s, L + s] have sd sqrt(s (s + 1) / 3); s is chosen so that it is the achievable
    sd nearest sigma: within half the gap to the neighbouring achievable values, and measured so."""
    b = 100_000
    batch = generate_batch(Workload(batch_size=b, pooling_factor=30, pooling_sigma=sigma,
                                    pooling_distribution="uniform", seed=2), 100)
    sizes = torch.diff(torch.cat([batch.offsets, torch.tensor([batch.num_lookups])])).double()
    sd = float(sizes.std())
    s = (int(sizes.max()) - int(sizes.min())) // 2
    achievable = [math.sqrt(k * (k + 1) / 3) for k in range(40)]
    nearest = min(achievable, key=lambda a: abs(a - sigma))
    assert abs(math.sqrt(s * (s + 1) / 3) - nearest) < 1e-9, (sigma, s)
    assert abs(sd - nearest) < 0.02 * nearest  # measured over many bags
    assert abs(sd - sigma) < 0.35  # about sigma: achievable sds are at most ~0.6 apart above 0.816


@pytest.mark.parametrize("sigma", [0.1, 0.2, 0.4])
def test_uniform_pooling_sigma_too_small_for_any_spread_is_an_error(sigma):
    with pytest.raises(ValueError, match=rf"workload.pooling_sigma: got {sigma} with pooling_distribution='uniform'"
                                         r".*sd 0.816 \(s = 1\).*>= 0.409"):
        Workload(pooling_factor=5, pooling_sigma=sigma, pooling_distribution="uniform")


@pytest.mark.parametrize("hot_fraction,n_rows", [(1.0, 10_000), (0.99996, 10_000), (0.95, 10)])
def test_hot_set_leaving_no_cold_rows_is_an_error_below_hit_rate_1(hot_fraction, n_rows):
    with pytest.raises(ValueError, match=rf"workload.hot_fraction: got {hot_fraction} on a table of {n_rows} rows: "
                                         r"the hot set would be the whole table.*hit_rate=0.9"):
        WorkloadStream(Workload("hot_set", hit_rate=0.9, hot_fraction=hot_fraction), n_rows)
    # hit_rate 1 reads no row outside the hot set: fine
    WorkloadStream(Workload("hot_set", hit_rate=1.0, hot_fraction=hot_fraction), n_rows)
