"""Tests found by mutation testing the data side: workloads, the LFU cache, the DLRM metrics and the
training loop. Each pins a behaviour a planted mutant changed without any existing test failing,
checked against a closed form, a brute-force count or autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ttrec.workloads import Batch, Workload, WorkloadStream, batch_stats, generate_batch, hot_set_size


def five_sigma(p: float, n: int) -> float:
    return 5 * math.sqrt(p * (1 - p) / n) + 1e-12


def normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def bag_sizes(batch: Batch) -> torch.Tensor:
    return torch.diff(torch.cat([batch.offsets, torch.tensor([batch.num_lookups])]))


# ---- workloads ----

@pytest.mark.parametrize("fraction,rows,expected", [(0.0012, 1000, 1), (0.0017, 1000, 2), (0.034, 100, 3),
                                                    (0.26, 10, 3)])
def test_hot_set_is_round_of_fraction_times_rows_not_its_ceiling(fraction, rows, expected):
    w = Workload("hot_set", hit_rate=0.5, hot_fraction=fraction, batch_size=10)
    assert expected == round(fraction * rows)
    assert hot_set_size(w, rows) == expected
    assert WorkloadStream(w, rows).hot_rows.size == expected


def test_normal_bag_sizes_are_clipped_at_zero_not_reflected():
    """round(N(L, sigma)) clipped at 0: every negative draw is an empty bag, so P(size 0) =
    P(N(L, sigma) <= 0.5) and P(size k) = P(k - 0.5 < N <= k + 0.5) for k >= 1."""
    L, sigma, b = 1, 3.0, 40_000
    batch = generate_batch(Workload(batch_size=b, pooling_factor=L, pooling_sigma=sigma,
                                    pooling_distribution="normal", seed=6), 100)
    sizes = bag_sizes(batch)
    assert int(sizes.min()) == 0
    cdf = lambda x: normal_cdf((x - L) / sigma)  # noqa: E731
    for k in range(0, 6):
        p = cdf(0.5) if k == 0 else cdf(k + 0.5) - cdf(k - 0.5)
        assert abs(float((sizes == k).double().mean()) - p) <= five_sigma(p, b), k
    mean = sum(k * (cdf(k + 0.5) - cdf(k - 0.5)) for k in range(1, 60))
    assert abs(batch.num_lookups / b - mean) < 5 * sigma / math.sqrt(b)


def test_full_reuse_copies_uniformly_chosen_lookups_of_the_previous_batch():
    """reuse_fraction 1: every lookup of batch 1 copies one of batch 0's n lookups, chosen uniformly:
    the copies spread over all of them (expected distinct: n (1 - (1 - 1/n)^n)) and half come from
    the second half of batch 0."""
    n, rows = 8000, 10**9  # batch 0's uniform rows are (almost) all distinct
    stream = WorkloadStream(Workload(batch_size=n, reuse_fraction=1.0, seed=4), rows)
    prev, cur = next(stream), next(stream)
    assert bool(torch.isin(cur.indices, prev.indices).all())
    distinct = torch.unique(prev.indices).numel()
    assert distinct > n - 5
    expected = distinct * (1 - (1 - 1 / distinct) ** n)
    assert abs(torch.unique(cur.indices).numel() - expected) < 5 * math.sqrt(n * 0.25)
    second_half = prev.indices[n // 2:][~torch.isin(prev.indices[n // 2:], prev.indices[: n // 2])]
    share = float(torch.isin(cur.indices, second_half).double().mean())
    assert abs(share - second_half.numel() / n) <= five_sigma(0.5, n)


def test_batch_stats_refuses_a_row_equal_to_the_product_of_p_shapes():
    ok = Batch(torch.tensor([0, 7]), torch.tensor([0]), None)
    assert batch_stats(ok, (2, 4))["unique_prefix_ratio"] == 1.0  # rows 0 and 7: prefixes 0 and 1
    bad = Batch(torch.tensor([0, 8]), torch.tensor([0]), None)
    with pytest.raises(ValueError, match=r"p_shapes: got \(2, 4\) \(product 8\) for rows 0\.\.8"):
        batch_stats(bad, (2, 4))


# ---- DLRM: metrics, initialization, tables ----

def test_a_zero_logit_predicts_no_click_and_one_class_gives_nan_auc():
    """sigmoid(0) = 0.5 is not above the 0.5 threshold (DLRM's round(p) reads it as 0); AUC needs
    both classes: all positives or all negatives have no ranking."""
    from ttrec.dlrm import binary_metrics, roc_auc

    m = binary_metrics(torch.tensor([0.0, 0.0, 1.0, -1.0]), torch.tensor([0.0, 1.0, 1.0, 1.0]))
    assert m["accuracy"] == 50.0  # 0 -> no click: right on the first, wrong on the second
    assert math.isnan(roc_auc(np.array([0.1, 0.5, 0.9]), np.array([1, 1, 1])))
    assert math.isnan(roc_auc(np.array([0.1, 0.5, 0.9]), np.array([0, 0, 0])))


def test_mlp_weights_and_biases_have_the_dlrm_reference_spread():
    """W ~ N(0, 2 / (fan_in + fan_out)), b ~ N(0, 1 / fan_out), per layer (std within 5%)."""
    from ttrec.dlrm import build_dlrm, table_sizes

    m = build_dlrm("kaggle", table_sizes("kaggle", 20000), 0, seed=3)
    layers = [x for x in [*m.bottom, *m.top] if isinstance(x, torch.nn.Linear)]
    assert [(x.in_features, x.out_features) for x in layers] == [(13, 512), (512, 256), (256, 64), (64, 16),
                                                                 (367, 512), (512, 256), (256, 1)]
    for x in layers:
        fan_out, fan_in = x.weight.shape
        w_std = math.sqrt(2 / (fan_in + fan_out))
        assert float(x.weight.detach().double().std()) == pytest.approx(w_std, rel=5 * math.sqrt(0.5 / x.weight.numel()) + 0.01)
        if fan_out >= 256:
            assert float(x.bias.detach().double().std()) == pytest.approx(math.sqrt(1 / fan_out), rel=0.15)


def test_table_sizes_are_ceilings_at_least_one():
    from ttrec.datasets import KAGGLE
    from ttrec.dlrm import table_sizes

    assert table_sizes("kaggle", 1000) == [max(1, math.ceil(n / 1000)) for n in KAGGLE.table_rows]
    assert table_sizes("kaggle", 1000)[0] == 2  # 1460 rows: ceil, not floor
    assert table_sizes(KAGGLE) == list(KAGGLE.table_rows)


def test_tables_of_equal_size_are_seeded_apart_and_unfused_tt_cores_reach_the_optimizer():
    from ttrec.dlrm import DLRM, ARCHS, build_tables

    tables = build_tables([50, 50, 60, 60], 16, tt_features=[2, 3], tt_rank=2, fused=False, seed=7)
    assert not torch.equal(tables[0].weight, tables[1].weight)
    assert not torch.equal(tables[2].full_weight(), tables[3].full_weight())
    again = build_tables([50, 50, 60, 60], 16, tt_features=[2, 3], tt_rank=2, fused=False, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(tables.parameters(), again.parameters()))
    model = DLRM(ARCHS["kaggle"], tables)
    expected = {id(p) for p in tables.parameters()}  # no fused update: every table parameter
    assert {id(p) for p in model.embedding_parameters()} == expected
    fused = DLRM(ARCHS["kaggle"], build_tables([50, 50, 60, 60], 16, tt_features=[2, 3], tt_rank=2, seed=7))
    assert {id(p) for p in fused.embedding_parameters()} == {id(p) for t in list(fused.tables)[:2]
                                                             for p in t.parameters()}


# ---- the training loop's bookkeeping ----

def test_trainer_times_the_embedding_part_as_lookups_plus_their_backward(monkeypatch):
    """With a clock that advances 1, 2, 3, 4, 5 between the step's six readings: total = 15,
    embedding = forward lookups (2) + their backward and SGD step (4)."""
    import types

    import benches.training as training
    from ttrec.dlrm import build_dlrm, table_sizes
    from ttrec.synthetic_clicks import SyntheticClicks

    rows = table_sizes("kaggle", 20000)
    data = SyntheticClicks(rows, 8, 8, seed=0, calibration_samples=256)
    tr = training.Trainer(build_dlrm("kaggle", rows, 0), 0.1)
    ticks = iter([0.0, 1.0, 3.0, 6.0, 10.0, 15.0] * 2)
    monkeypatch.setattr(training, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    tr.step(data.next_batch())
    tr.step(data.next_batch())
    assert tr.total == [15.0, 15.0] and tr.embedding == [6.0, 6.0] and len(tr.losses) == 2


def test_model_rows_skip_the_timing_warm_up_and_average_the_last_tenth_of_losses():
    import types

    from benches.training import _model_rows

    total = [9.0, 9.0] + [0.001 * (i + 1) for i in range(18)]  # s; the first two are the warm-up
    emb = [t / 4 for t in total]
    tr = types.SimpleNamespace(total=total, embedding=emb, losses=[float(i) for i in range(20)])
    metrics = {"accuracy": 80.0, "bce": 0.4, "auc": 0.7, "nan_logits": 0}
    rows = {r["metric"]: r for r in _model_rows(tr, metrics, 2, 400, 0.25)}
    t = rows["time_per_iteration"]
    assert t["n"] == 18 and t["median"] == pytest.approx(1e3 * np.median(total[2:])) and t["unit"] == "ms"
    assert rows["embedding_time"]["median"] == pytest.approx(1e3 * np.median(emb[2:]))
    assert rows["other_time"]["median"] == pytest.approx(1e3 * np.median(total[2:]) * 0.75)
    assert rows["embedding_share"]["median"] == pytest.approx(0.25)
    assert rows["train_time"]["median"] == pytest.approx(sum(total))  # warm-up included
    assert rows["train_loss"]["median"] == 18.5  # mean of the last 2 of 20
    assert rows["hit_ratio"]["median"] == 0.25
    assert "binomial std error 2.00 points" in rows["accuracy"]["note"]  # 100 sqrt(0.8 * 0.2 / 400)


# ---- the break-even hit rate (Figure 12) ----

def _break_even_frame(points: dict[int, list[tuple[float, float]]]):
    """points: pooling factor -> [(hit ratio, TT + cache time)], each timed against nn.EmbeddingBag at 10."""
    import pandas as pd

    rows = []
    for pooling, xs in points.items():
        for job, (x, t) in enumerate(xs):
            common = {"job_dir": f"{job}-{pooling}", "metric": "time_per_lookup", "mode": "train",
                      "pooling_factor": pooling}
            rows.append({**common, "impl": "tt", "cache_enabled": True, "tt_rank": 8, "hit_ratio": x, "median": t})
            rows.append({**common, "impl": "dense", "cache_enabled": False, "tt_rank": None, "hit_ratio": None,
                         "median": 10.0})
    return pd.DataFrame(rows)


def test_break_even_interpolates_an_asymmetric_crossing_and_counts_a_tie_as_reached():
    """Gap to nn.EmbeddingBag +10 at 0.5 and -30 at 1: zero at 0.5 + 0.5 * 10 / 40 = 0.625 (linear
    interpolation from the slower side). Equal time is "as fast": a tie at the highest hit ratio
    breaks even there, and a cache never slower breaks even at the smallest measured hit ratio."""
    from benches.cache_experiments import break_even

    be = break_even(_break_even_frame({1: [(0.0, 30.0), (0.5, 20.0), (1.0, -20.0)],
                                       2: [(0.0, 30.0), (1.0, 10.0)],
                                       3: [(0.2, 10.0), (0.6, 10.0)]})).set_index("pooling_factor")
    assert be.loc[1, "reached"] and be.loc[1, "break_even_hit_ratio"] == pytest.approx(0.625)
    assert be.loc[2, "reached"] and be.loc[2, "break_even_hit_ratio"] == pytest.approx(1.0)
    assert be.loc[3, "reached"] and be.loc[3, "break_even_hit_ratio"] == pytest.approx(0.2)
    assert be.loc[2, "time_ratio_at_max_hit"] == pytest.approx(1.0)


# ---- the LFU cache's counter ----

def test_bounded_counter_default_size_is_four_times_the_capacity_capped_by_the_table():
    from ttrec.cache import make_counter

    assert make_counter("bounded", 10**6, 1000).slots == 4000
    assert make_counter("bounded", 10**6, 10).slots == 1024
    assert make_counter("bounded", 500, 10).slots == 500
    assert make_counter("bounded", 10**6, 1000, counter_slots=1500).slots == 1500
