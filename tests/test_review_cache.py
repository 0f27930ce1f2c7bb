"""Review of the LFU cache (ttrec.cache) and its figures against independent references.

References: a plain-Python simulation of the documented life cycle (warm-up, populate, refresh from
cumulative counts, ties to the smaller row id, eval calls neither counted nor advancing), a plain
count of hits, the dense table reconstructed from the cores (tt_to_dense) with the cached rows
substituted, torch.optim on that table, and the uncached TTEmbeddingBag itself.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

import reports.cache_figures as cache_figures
import ttrec.cache as cache_module
from benches.cache_experiments import stability_rows
from benches.config import register, to_objects
from ttrec import TTEmbeddingBag, backend_status
from ttrec.cache import CachedTTEmbeddingBag, make_counter
from ttrec.reference import tt_to_dense

N, D = 600, 16
CONF = str(Path(__file__).resolve().parents[1] / "conf")

register()


def make_tt(backend="torch", mode="sum", tt_optimizer=None) -> TTEmbeddingBag:
    return TTEmbeddingBag(N, D, 4, tt_p_shapes=(6, 10, 10), backend=backend, mode=mode, seed=1,
                          optimizer=tt_optimizer, learning_rate=0.05)


def digits(row: int, p=(6, 10, 10)) -> tuple[int, ...]:
    """Row -> (i_1, i_2, i_3), i_1 most significant (tt_to_dense's row order)."""
    return (row // (p[1] * p[2]), row // p[2] % p[1], row % p[2])


def logical_table(m: CachedTTEmbeddingBag, cores, cache) -> torch.Tensor:
    table = tt_to_dense(cores, m.spec)
    occupied = torch.nonzero(m.slot_rows >= 0).flatten()
    return table.index_copy(0, m.slot_rows[occupied], cache[occupied])


# ---- which rows are cached: the documented policy, simulated in plain Python ----

def simulate_lfu(batches, train_flags, k, warmup, refresh):
    """The cached rows (sorted, None before populating) after each call."""
    counts, cached, t, out = Counter(), None, 0, []
    for rows, train in zip(batches, train_flags):
        if train:
            t += 1
            if cached is None and t > warmup:
                cached = top_k(counts, k)
            elif cached is not None and refresh and t > warmup + 1 and (t - warmup - 1) % refresh == 0:
                cached = top_k(counts, k)
            if cached is None or refresh:
                counts.update(rows)
        out.append(None if cached is None else sorted(cached))
    return out


def top_k(counts: Counter, k: int) -> list[int]:
    return [row for _, row in sorted((-c, row) for row, c in counts.items() if c > 0)[:k]]


@pytest.mark.parametrize("trial", range(12))
def test_cached_rows_follow_a_plain_python_lfu_simulation(trial):
    rng = random.Random(trial)
    warmup, refresh = rng.randint(0, 3), rng.choice([0, 1, 2, 3])
    fraction = rng.choice([1 / N, 0.01, 0.05, 1.0])  # capacity 1, 6, 30 and the whole table
    m = CachedTTEmbeddingBag(make_tt(), cache_fraction=fraction, warmup_iters=warmup, refresh_every=refresh,
                             counter="exact", slot_map=rng.choice(["dense", "sorted"]))
    hot = rng.sample(range(N), 25)
    batches, flags, got = [], [], []
    for _ in range(12):
        rows = [rng.choice(hot) if rng.random() < 0.7 else rng.randrange(N) for _ in range(rng.randint(0, 20))]
        train = rng.random() < 0.8
        m.train(train)
        dtype = torch.int32 if rng.random() < 0.5 else torch.int64
        with torch.no_grad():
            m(torch.tensor(rows, dtype=dtype), torch.tensor([0], dtype=dtype))
        batches.append(rows)
        flags.append(train)
        got.append(m.cached_rows().tolist() if m.populated else None)
    assert got == simulate_lfu(batches, flags, m.capacity, warmup, refresh)


def test_hit_ratio_is_a_plain_count_over_the_calls_with_a_populated_cache():
    m = CachedTTEmbeddingBag(make_tt(), cache_fraction=0.02, warmup_iters=2, refresh_every=2)
    rng = random.Random(5)
    hits = lookups = 0
    for step in range(9):
        rows = [rng.randrange(40) if rng.random() < 0.8 else rng.randrange(N) for _ in range(rng.randint(0, 15))]
        m.train(step % 3 != 2)
        was_populated = m.populated or (m.training and m.iteration + 1 > m.warmup_iters)
        with torch.no_grad():
            m(torch.tensor(rows, dtype=torch.int64), torch.tensor([0]))
        if was_populated:
            cached = set(m.cached_rows().tolist())
            hits += sum(r in cached for r in rows)
            lookups += len(rows)
    assert lookups and m.hit_ratio() == pytest.approx(hits / lookups)


# ---- forward and training against the uncached module and the dense table ----

@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_forward_equals_the_uncached_tt_module_until_cached_rows_are_trained(mode, weighted):
    tt = make_tt(mode=mode)
    m = CachedTTEmbeddingBag(tt, cache_fraction=0.05, warmup_iters=0)
    m.set_cached_rows(torch.arange(0, 60, 2))  # materialized from the cores: the same logical table
    g = torch.Generator().manual_seed(1)
    idx = torch.cat([torch.randint(0, 60, (40,), generator=g), torch.tensor([4, 4, 4, 7])]).to(torch.int32)
    offsets = torch.tensor([0, 0, 10, 30, 44, 44], dtype=torch.int32)  # empty bags first, middle and last
    w = torch.rand(idx.numel(), generator=g) if weighted else None
    with torch.no_grad():
        torch.testing.assert_close(m(idx, offsets, w), tt(idx, offsets, w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cache_optimizer", [None, "sgd", "adagrad"])
@pytest.mark.parametrize("backend,tt_optimizer", [("torch", None), ("cpu", "sgd"), ("cpu", "adagrad")])
def test_a_batch_of_only_empty_bags_trains_like_the_uncached_module(cache_optimizer, backend, tt_optimizer):
    """Bags with no lookups (a Criteo feature missing in every sample of a batch): the populated cache
    returned zeros outside the autograd graph, so backward raised where TTEmbeddingBag does not."""
    if backend == "cpu" and backend_status("cpu") is not None:
        pytest.skip("native CPU backend unavailable")
    tt = make_tt(backend, tt_optimizer=tt_optimizer)
    m = CachedTTEmbeddingBag(tt, cache_fraction=0.05, warmup_iters=0, optimizer=cache_optimizer)
    m.set_cached_rows(torch.tensor([1, 2, 3]))
    empty, offsets = torch.tensor([], dtype=torch.int64), torch.tensor([0, 0, 0])
    cores = [c.detach().clone() for c in tt.tt_cores]
    cache = m.cache_weight.detach().clone()
    out = m(empty, offsets)
    assert out.shape == (3, D) and not out.detach().any()
    out.backward(torch.randn_like(out))  # raised "element 0 of tensors does not require grad"
    for c, before in zip(tt.tt_cores, cores):
        assert torch.equal(c.detach(), before) and (c.grad is None or not c.grad.any())
    assert torch.equal(m.cache_weight.detach(), cache)
    grad = m.cache_weight.grad
    assert grad is None or not grad.to_dense().any()


@pytest.mark.parametrize("big", [False, True])  # the (capacity, D) sparse-product step and the index_add step
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
@pytest.mark.parametrize("mode,weighted", [("sum", True), ("mean", False)])
def test_fused_updates_match_torch_optim_and_touch_exactly_the_looked_up_rows(monkeypatch, big, optimizer, mode,
                                                                               weighted):
    monkeypatch.setattr(cache_module, "_DENSE_GRAD_MAX", 0 if big else 1 << 20)
    cpu = backend_status("cpu") is None
    tt = make_tt("cpu" if cpu else "torch", mode, tt_optimizer=optimizer if cpu else None)
    m = CachedTTEmbeddingBag(tt, cache_fraction=0.05, warmup_iters=0, optimizer=optimizer, learning_rate=0.05)
    m.set_cached_rows(torch.arange(0, 60, 2))
    opt_cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}[optimizer]
    ref_cache = torch.nn.Parameter(m.cache_weight.detach().clone())
    ref_cores = [torch.nn.Parameter(c.detach().clone()) for c in tt.tt_cores]
    ref_opt = opt_cls([ref_cache, *ref_cores], lr=0.05)
    g = torch.Generator().manual_seed(2)
    for step in range(3):
        idx = torch.cat([torch.randint(0, 60, (30,), generator=g), torch.randint(0, N, (10,), generator=g),
                         torch.tensor([4, 4, 4, 5, 5])])  # 5 is not cached: a repeated TT row
        offsets = torch.tensor([0, 5, 5, 20, 33])
        w = torch.rand(idx.numel(), generator=g) if weighted else None
        cache_before = m.cache_weight.detach().clone()
        cores_before = [c.detach().clone() for c in tt.tt_cores]
        out = m(idx, offsets, w)
        ref = F.embedding_bag(idx, logical_table(m, ref_cores, ref_cache), offsets, mode=mode, per_sample_weights=w)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        grad = torch.randn(out.shape, generator=g)
        out.backward(grad)
        ref_opt.zero_grad()
        ref.backward(grad)
        ref_opt.step()
        if not cpu:  # the torch backend's cores train through autograd: step them like the reference
            with torch.no_grad():
                for c, r in zip(tt.tt_cores, ref_cores):
                    c.copy_(r)
        torch.testing.assert_close(m.cache_weight.detach(), ref_cache.detach(), rtol=1e-5, atol=1e-6)
        for c, r in zip(tt.tt_cores, ref_cores):
            torch.testing.assert_close(c.detach(), r.detach(), rtol=1e-5, atol=1e-6)
        slots = m._partition(idx)[1][m.cached_mask(idx)]
        touched = torch.zeros(m.capacity, dtype=torch.bool)
        touched[slots] = True
        assert not (m.cache_weight.detach() != cache_before)[~touched].any(), f"untouched cache row moved, step {step}"
        tt_rows = idx[~m.cached_mask(idx)].tolist()
        for k, (c, before) in enumerate(zip(tt.tt_cores, cores_before)):  # core k's slices of the TT rows only
            moved = set(torch.nonzero((c.detach() != before).transpose(0, 1).flatten(1).any(1)).flatten().tolist())
            assert moved and moved <= {digits(r)[k] for r in tt_rows}, f"core {k}, step {step}"


def test_fused_adagrad_state_of_a_reassigned_slot_starts_afresh():
    m = CachedTTEmbeddingBag(make_tt(), cache_fraction=0.01, warmup_iters=0, optimizer="adagrad",
                             learning_rate=0.05)
    m.set_cached_rows(torch.tensor([1, 2, 3]))
    m(torch.tensor([1, 2, 3, 1]), torch.tensor([0, 2])).sum().backward()
    slot_of = {r: s for s, r in enumerate(m.slot_rows.tolist())}
    assert m.adagrad_state[slot_of[1]].abs().sum() > 0
    m.set_cached_rows(torch.tensor([2, 3, 9]))  # row 1 evicted, row 9 takes its slot
    new = m.slot_rows.tolist().index(9)
    assert not m.adagrad_state[new].any() and m.adagrad_state[slot_of[2]].abs().sum() > 0
    # row 9's first step is a first Adagrad step: w - lr * g / (|g| + eps)
    before = m.cache_weight.detach()[new].clone()
    grad = torch.randn(1, D)
    m(torch.tensor([9]), torch.tensor([0])).backward(grad)
    torch.testing.assert_close(m.cache_weight.detach()[new], before - 0.05 * grad[0] / (grad[0].abs() + 1e-10))


# ---- bad input ----

@pytest.mark.parametrize("kwargs,needle", [
    ({"counter": "exact", "counter_slots": 50}, "counter_slots: got 50; only counter='bounded'"),
    ({"counter": "bounded", "counter_slots": 2.5}, "counter_slots: got 2.5; must be None or an int >= 1"),
    ({"counter": "bounded", "counter_slots": True}, "counter_slots: got True"),
    ({"counter": "auto", "counter_slots": 0}, "counter_slots: got 0"),
])
def test_counter_slots_is_checked_and_never_silently_ignored(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        CachedTTEmbeddingBag(make_tt(), **kwargs)
    assert make_counter("auto", N, 6, counter_slots=50).kind == "exact"  # auto chose the exact counter: unread
    assert make_counter("bounded", N, 6, counter_slots=50).slots == 50


def test_cached_mask_refuses_rows_outside_the_table():
    m = CachedTTEmbeddingBag(make_tt(), cache_fraction=0.01, warmup_iters=0)
    m.set_cached_rows(torch.tensor([N - 1]))
    assert m.cached_mask(torch.tensor([N - 1, 0], dtype=torch.int32)).tolist() == [True, False]
    for bad in (-1, N):  # -1 read row N - 1's slot: "cached"
        with pytest.raises(ValueError, match=f"indices: got row {bad}; rows must be in \\[0, num_embeddings=600\\)"):
            m.cached_mask(torch.tensor([3, bad]))


# ---- the figures ----

def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return to_objects(compose(config_name="bench", overrides=list(overrides)))


def _captured_figure(monkeypatch):
    figs = []

    def save(fig, out_dir, name):
        figs.append(fig)
        return Path(out_dir) / f"{name}.png"

    monkeypatch.setattr(cache_figures, "save", save)
    return figs


def _inside(ax, xs, ys) -> bool:
    """Every (x, y) lands at a finite point inside the axes."""
    pts = ax.transData.transform(np.column_stack([xs, ys]).astype(float))
    box = ax.get_window_extent()
    return bool(np.isfinite(pts).all() and (pts[:, 0] >= box.x0 - 1).all() and (pts[:, 0] <= box.x1 + 1).all()
                and (pts[:, 1] >= box.y0 - 1).all() and (pts[:, 1] <= box.y1 + 1).all())


def test_figure_9_shows_a_top_k_set_that_did_not_change(monkeypatch, tmp_path):
    """hit_rate 1 on a 10-row hot set: the top-10 never changes, topk_change is 0 in every window;
    on a log axis those points were not drawn (the panel was empty)."""
    figs = _captured_figure(monkeypatch)
    cfg = _compose("task=topk_stability", "table=tiny", "workload.distribution=hot_set", "workload.hit_rate=1.0",
                   "workload.hot_fraction=0.01", "cache.fraction=0.01", "workload.batch_size=64",
                   "cache.stability_batches=6", "cache.stability_windows=3")
    df = pd.DataFrame(stability_rows(cfg, experiment="test"))
    cache_figures.plot_topk_stability(df, tmp_path)
    ax = figs[0].axes[0]
    change = df[df["metric"] == "topk_change"]
    assert (change["median"] == 0).all() and len(change) == 2
    assert _inside(ax, 100 * change["progress"], change["median"])
    assert "fraction" in ax.get_ylabel()


def test_figure_9_of_a_criteo_feature_has_no_pooling_factor_and_plots(monkeypatch, tmp_path):
    """The README's Criteo command for Figure 9: pooling_factor is empty for criteo; the title's
    int(pooling_factor) raised ValueError (NaN)."""
    figs = _captured_figure(monkeypatch)
    lines = ["\t".join(["1"] + ["3"] * 13 + [format((i * 7 + j) % 11, "08x") if i % 3 else "" for j in range(26)])
             for i in range(120)]
    path = tmp_path / "day_0"
    path.write_text("\n".join(lines) + "\n")
    cfg = _compose("task=topk_stability", "table=tiny", "workload.distribution=criteo", f"workload.criteo_path={path}",
                   "workload.criteo_feature=5", "workload.criteo_mapping=dictionary", "cache.fraction=0.005",
                   "workload.batch_size=16", "cache.stability_batches=6", "cache.stability_windows=3")
    df = pd.DataFrame(stability_rows(cfg, experiment="test"))
    df.to_csv(tmp_path / "r.csv", index=False)  # as the callback reads it back: None -> NaN
    df = pd.read_csv(tmp_path / "r.csv")
    assert df["pooling_factor"].isna().all()
    cache_figures.plot_cache_figures(df, tmp_path)
    title = figs[0]._suptitle.get_text()
    assert "batch 16" in title and "pooling" not in title


def _fig10_rows(warmups, distribution="zipf") -> pd.DataFrame:
    rows = []
    for job, (fraction, warmup) in enumerate((f, w) for f in (0.01, 0.1) for w in warmups):
        common = {"job_dir": str(job), "metric": "time_per_batch", "unit": "ms", "mode": "train", "table": "tiny",
                  "num_embeddings": 1000, "embedding_dim": 16, "tt_rank": 4, "distribution": distribution,
                  "zipf_alpha": 1.05 if distribution == "zipf" else None, "permute": True,
                  "criteo_feature": 5 if distribution == "criteo" else None, "batch_size": 16,
                  "pooling_factor": 3 if distribution != "criteo" else None, "cpu_model": "cpu", "threads": 1}
        t = 10.0 + job
        rows.append({**common, "impl": "tt", "cache_enabled": True, "cache_fraction": fraction,
                     "cache_warmup_iters": warmup, "held_out_hit_ratio": 0.1 * (job + 1), "median": t,
                     "q1": t - 1, "q3": t + 1})
        for impl, t0 in (("tt", 3.0), ("dense", 1.0)):
            rows.append({**common, "impl": impl, "cache_enabled": False, "cache_fraction": None,
                         "cache_warmup_iters": None, "held_out_hit_ratio": None, "median": t0, "q1": t0, "q3": t0})
    return pd.DataFrame(rows)


def _apart(ax, xs) -> bool:
    """Distinct x values land in order, each at least 5% of the axes' width from the next."""
    xs = sorted(set(xs))
    pos = ax.transData.transform(np.column_stack([xs, np.full(len(xs), 0.5)]).astype(float))[:, 0]
    return bool(np.isfinite(pos).all() and (np.diff(pos) > 0.05 * ax.get_window_extent().width).all())


def test_figure_10_draws_a_warm_up_of_zero_iterations(monkeypatch, tmp_path):
    """cache.warmup_iters=0 is allowed; on the log x axis (limits 0 to 4.3) 0 went to the left edge
    and warm-ups 1 and 4 to within a pixel of each other at the right edge."""
    figs = _captured_figure(monkeypatch)
    df = _fig10_rows([0, 1, 4])
    cache_figures.plot_cache_size_warmup(df, tmp_path)
    axes = figs[0].axes
    cached = df[df["cache_enabled"]]
    figs[0].canvas.draw()
    for row, y in ((0, "held_out_hit_ratio"), (1, "median")):
        ax = axes[2 * row + 1]  # the warm-up column
        assert _inside(ax, cached["cache_warmup_iters"], cached[y]), (row, y)
        assert _apart(ax, cached["cache_warmup_iters"]), (row, y)
    assert _apart(axes[0], 100 * cached["cache_fraction"])  # the cache-size column: 1% and 10%
    assert "ms" in axes[2].get_ylabel() and "%" in axes[0].get_xlabel()


def test_figure_10_of_a_criteo_feature_plots(monkeypatch, tmp_path):
    figs = _captured_figure(monkeypatch)
    cache_figures.plot_cache_size_warmup(_fig10_rows([1, 4], distribution="criteo"), tmp_path)
    title = figs[0]._suptitle.get_text()
    assert "Criteo feature 5" in title and "batch 16" in title and "pooling" not in title


# ---- the bench's cached point ----

_TRAIN_CACHED = ["mode=train", "mode.fused=true", "cache=lfu", "cache.fraction=0.01", "cache.warmup_iters=3",
                 "workload.distribution=hot_set", "workload.hit_rate=1.0", "workload.hot_fraction=0.01", "table=tiny",
                 "tt.rank=4", "workload.batch_size=16", "workload.pooling_factor=3"]


def test_a_fused_training_point_refuses_cache_rows_it_would_never_step():
    """mode.fused=true times module(...).backward() with no torch optimizer: with cache.update=autograd
    the cached rows never changed and their sparse gradient grew with every timed call."""
    from benches.app import build_point

    with pytest.raises(ValueError, match="cache.update: got autograd with mode.fused=true"):
        build_point(_compose(*_TRAIN_CACHED, "cache.update=autograd"))
    module, _, step = build_point(_compose(*_TRAIN_CACHED, "cache.update=fused"))  # the rows train
    before = module.cache_weight.detach().clone()
    step()
    assert module.cache_optimizer == "sgd" and (module.cache_weight.detach() != before).any()
    module, _, step = build_point(_compose(*_TRAIN_CACHED[:1], "mode.fused=false", *_TRAIN_CACHED[2:],
                                           "cache.update=autograd"))  # a torch optimizer steps them
    before = module.cache_weight.detach().clone()
    step()
    assert module.cache_optimizer is None and (module.cache_weight.detach() != before).any()


def test_a_timed_training_point_refuses_a_cache_that_would_learn_the_timed_batch():
    """The timed steps repeat batch 0; with refresh_every > 0 each was counted and the refreshes cached
    its rows: on a uniform workload the recorded hit_ratio read 1.0 with 0.05 held out."""
    from benches.app import build_point

    uniform = [o for o in _TRAIN_CACHED if not o.startswith("workload.h")]
    uniform[uniform.index("workload.distribution=hot_set")] = "workload.distribution=uniform"
    with pytest.raises(ValueError, match="cache.refresh_every: got 1; .* allowed with task=time: 0"):
        build_point(_compose(*uniform, "cache.refresh_every=1"))
    module, batch, step = build_point(_compose(*uniform))
    for _ in range(5):
        step()
    held_out = module.bench_columns["held_out_hit_ratio"]
    timed = float(module.cached_mask(batch.indices).float().mean())
    assert held_out < 0.3 and timed < 0.3  # 1% of the rows cached, uniform lookups
