"""Second review of the LFU cache (ttrec.cache) against independent references.

References: a step-by-step simulation of the documented life cycle on the dense table (tt_to_dense)
in float64, with the cached rows kept by row id (kept rows keep their trained values, new rows come
from the cores, evicted rows are dropped) and SGD/Adagrad written out by hand; plain-Python counts
(collections.Counter); F.embedding_bag with autograd for every gradient, the per-sample weights' included.
"""

from __future__ import annotations

import io
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from tests.test_review_cache import simulate_lfu
from ttrec import TTEmbeddingBag, backend_status
from ttrec.cache import CachedTTEmbeddingBag
from ttrec.reference import tt_to_dense

N, D, LR, EPS = 600, 8, 0.05, 1e-10
CPU = backend_status("cpu") is None


def make_tt(backend="torch", mode="sum", include_last_offset=False, tt_optimizer=None, seed=1) -> TTEmbeddingBag:
    return TTEmbeddingBag(N, D, 3, tt_p_shapes=(6, 10, 10), backend=backend, mode=mode, seed=seed,
                          include_last_offset=include_last_offset, optimizer=tt_optimizer, learning_rate=LR)


def random_batch(rng: random.Random, hot: list[int], include_last_offset: bool):
    """Bags of 0, 1, 2 or 5 lookups (empty ones too), 70% on ``hot``; offsets as the module takes them."""
    sizes = [rng.choice([0, 1, 2, 5]) for _ in range(rng.randint(1, 6))]
    rows = [rng.choice(hot) if rng.random() < 0.7 else rng.randrange(N) for _ in range(sum(sizes))]
    starts = [sum(sizes[:i]) for i in range(len(sizes))] + ([sum(sizes)] if include_last_offset else [])
    return rows, torch.tensor(rows, dtype=torch.int64), torch.tensor(starts, dtype=torch.int64)


def top_k(counts: Counter, k: int) -> list[int]:
    return sorted(row for _, row in sorted((-c, row) for row, c in counts.items() if c > 0)[:k])


# ---- the whole life cycle against a dense float64 simulation ----

CASES = [  # mode, weighted, include_last_offset, counter, slot_map, cache optimizer, sparse, (backend, core optimizer)
    (mode, weighted, ilo, counter, slot_map, opt, sparse, tt)
    for mode, weighted in (("sum", False), ("sum", True), ("mean", False))
    for ilo, counter, slot_map in ((False, "exact", "dense"), (True, "bounded", "sorted"))
    for opt, sparse in ((None, True), (None, False), ("sgd", False), ("adagrad", False))
    for tt in ((("cpu", "adagrad"),) if CPU and opt == "adagrad" else (("torch", None),))
]


@pytest.mark.parametrize("mode,weighted,ilo,counter,slot_map,opt,sparse,tt_backend", CASES)
def test_training_with_warm_up_and_refresh_follows_the_dense_simulation(mode, weighted, ilo, counter, slot_map, opt,
                                                                         sparse, tt_backend):
    backend, tt_opt = tt_backend
    rng, g = random.Random(3), torch.Generator().manual_seed(3)
    tt = make_tt(backend, mode, ilo, tt_opt)
    warm, refresh = 2, 2
    m = CachedTTEmbeddingBag(tt, cache_fraction=0.02, warmup_iters=warm, refresh_every=refresh, optimizer=opt,
                             learning_rate=LR, sparse=sparse, counter=counter, slot_map=slot_map,
                             **({"counter_slots": 40} if counter == "bounded" else {}))
    cache_kind = opt or ("sgd" if sparse else "adagrad")  # a torch optimizer when the module has none
    torch_opts = []
    if opt is None:
        torch_opts.append({"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}[cache_kind]([m.cache_weight], lr=LR))
        m.track_optimizer(torch_opts[0])
    if tt_opt is None:
        torch_opts.append(torch.optim.SGD(list(tt.tt_cores), lr=LR))
    cores = [c.detach().double() for c in tt.tt_cores]
    core_sums = [torch.zeros_like(c) for c in cores]
    cache, sums, counts = {}, {}, Counter()  # row -> value, row -> Adagrad sum; lookups counted
    t, populated, hits, lookups = 0, False, 0, 0
    hot = rng.sample(range(N), 20)
    for step in range(10):
        rows, idx, offsets = random_batch(rng, hot, ilo)
        train = step != 6  # one eval call in the middle: neither counted nor advancing
        m.train(train)
        w = torch.rand(idx.numel(), generator=g) if weighted else None
        if w is not None and backend == "torch":  # (the native kernel refuses weights requiring grad)
            w.requires_grad_(True)
        changes = False
        if train:
            t += 1
            changes = (not populated and t > warm) or (populated and t > warm + 1 and (t - warm - 1) % refresh == 0)
        out = m(idx, offsets, w)
        if changes:
            new = m.cached_rows().tolist()
            if counter == "exact":
                assert new == top_k(counts, m.capacity), f"step {step}"
            else:  # the bounded summary picks among the counted rows (and all of them while they fit)
                assert set(new) <= set(counts) and (len(counts) > 40 or new == top_k(counts, m.capacity))
            dense = tt_to_dense(cores, tt.spec)
            cache = {r: cache[r] if r in cache else dense[r] for r in new}
            sums = {r: sums.get(r, torch.zeros(D, dtype=torch.float64)) for r in new}
            populated = True
        if train and (refresh or not populated):
            counts.update(rows)
        if populated:
            hits += sum(r in cache for r in rows)
            lookups += len(rows)
        assert m.cached_rows().tolist() == sorted(cache)
        # the reference step: the logical table, pooled and differentiated in float64
        ref_cores = [c.clone().requires_grad_(True) for c in cores]
        cached = sorted(cache)
        values = torch.stack([cache[r] for r in cached]).requires_grad_(True) if cached else None
        table = tt_to_dense(ref_cores, tt.spec)
        if cached:
            table = table.index_copy(0, torch.tensor(cached), values)
        ref_w = None if w is None else w.detach().double().requires_grad_(True)
        ref = F.embedding_bag(idx, table, offsets, mode=mode, per_sample_weights=ref_w, include_last_offset=ilo)
        torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-5)
        grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
        out.backward(grad.float())
        ref.backward(grad)
        if w is not None and w.requires_grad and rows:
            torch.testing.assert_close(w.grad.double(), ref_w.grad, rtol=1e-4, atol=1e-5)
        for opt_ in torch_opts:
            opt_.step()
            opt_.zero_grad(set_to_none=True)
        with torch.no_grad():
            for k, c in enumerate(ref_cores):
                if tt_opt == "adagrad":
                    core_sums[k] += c.grad * c.grad
                    cores[k] = cores[k] - LR * c.grad / (core_sums[k].sqrt() + EPS)
                else:
                    cores[k] = cores[k] - LR * c.grad
            for j, r in enumerate(cached):
                gr = values.grad[j]
                if cache_kind == "sgd":
                    cache[r] = cache[r] - LR * gr
                else:
                    sums[r] = sums[r] + gr * gr
                    cache[r] = cache[r] - LR * gr / (sums[r].sqrt() + EPS)
        for k, c in enumerate(tt.tt_cores):
            torch.testing.assert_close(c.detach().double(), cores[k], rtol=1e-4, atol=1e-5)
        for s, r in enumerate(m.slot_rows.tolist()):
            if r >= 0:
                torch.testing.assert_close(m.cache_weight.detach()[s].double(), cache[r], rtol=1e-4, atol=1e-5)
    assert m.refreshes == 4 and lookups and m.hit_ratio() == pytest.approx(hits / lookups)


# ---- per-sample weights through the fused cache update ----

@pytest.mark.parametrize("optimizer", [None, "sgd", "adagrad"])
def test_per_sample_weights_get_their_gradient_from_cached_rows_too(optimizer):
    """With a fused cache optimizer the cached lookups' weights got a zero gradient (silently: the
    torch backend's TT part gave the right one, the cached part None)."""
    tt = make_tt()
    m = CachedTTEmbeddingBag(tt, cache_fraction=0.01, warmup_iters=0, optimizer=optimizer, learning_rate=LR)
    m.set_cached_rows(torch.tensor([1, 2, 3]))
    idx, offsets = torch.tensor([1, 2, 5, 3, 7, 1]), torch.tensor([0, 2, 2])
    w = torch.rand(6, requires_grad=True)
    table = tt_to_dense([c.detach().double() for c in tt.tt_cores], tt.spec)  # before the step
    ref_w = w.detach().double().requires_grad_(True)
    grad = torch.randn(3, D, dtype=torch.float64)
    F.embedding_bag(idx, table, offsets, mode="sum", per_sample_weights=ref_w).backward(grad)
    m(idx, offsets, w).backward(grad.float())
    torch.testing.assert_close(w.grad.double(), ref_w.grad, rtol=1e-5, atol=1e-6)


# ---- state_dict, pickle, devices ----

@pytest.mark.parametrize("counter", ["exact", "bounded"])
@pytest.mark.parametrize("split", [1, 3, 5])  # during the warm-up, right after populating, between refreshes
def test_state_dict_round_trip_continues_the_life_cycle(counter, split):
    """The counts, iteration and refresh count were not saved: a loaded module restarted its warm-up
    count and refreshed from counts begun at the load, evicting the hot rows of the run before it."""
    def build():
        return CachedTTEmbeddingBag(make_tt(), cache_fraction=0.01, warmup_iters=2, refresh_every=3,
                                    optimizer="adagrad", learning_rate=LR, counter=counter,
                                    **({"counter_slots": 50} if counter == "bounded" else {}))

    rng = random.Random(split)
    batches = [[rng.randrange(30 if i < 6 else N) for _ in range(40)] for i in range(12)]
    a = build()
    for rows in batches[:split]:
        a(torch.tensor(rows), torch.tensor([0, 20])).sum().backward()
    b = build()
    b.load_state_dict(a.state_dict())
    for i, rows in enumerate(batches[split:], split):
        b(torch.tensor(rows), torch.tensor([0, 20])).sum().backward()
        if counter == "exact":  # the cached rows of an uninterrupted run, by plain-Python counting
            expected = simulate_lfu(batches[: i + 1], [True] * (i + 1), b.capacity, 2, 3)[-1]
            assert b.populated == (expected is not None) and b.cached_rows().tolist() == (expected or [])
    assert b.iteration == 12 and b.refreshes == 4
    assert set(b.cached_rows().tolist()) <= set(range(30))  # the rows counted most over the whole stream
    counts = Counter(r for rows in batches for r in rows)
    if counter == "exact":
        assert b.counter.counts.tolist() == [counts[r] for r in range(N)]
    assert b.counter.total == sum(counts.values())


def test_state_dict_refuses_a_counter_of_another_kind():
    a = CachedTTEmbeddingBag(make_tt(), cache_fraction=0.01, counter="exact")
    b = CachedTTEmbeddingBag(make_tt(), cache_fraction=0.01, counter="bounded")
    with pytest.raises(ValueError, match="saved with counter='exact'; this module has counter='bounded'"):
        b.load_state_dict(a.state_dict())


def test_torch_save_of_a_module_with_a_tracked_optimizer():
    """track_optimizer keeps a weakref, which pickle refused: torch.save(module) raised TypeError."""
    m = CachedTTEmbeddingBag(make_tt(), cache_fraction=0.01, warmup_iters=0)
    m.set_cached_rows(torch.tensor([4, 8]))
    m.track_optimizer(torch.optim.SGD(m.parameters(), lr=LR))
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x, offsets = torch.tensor([4, 8, 9]), torch.tensor([0, 1])
    table = tt_to_dense([c.detach() for c in m.tt.tt_cores], m.spec)
    torch.testing.assert_close(loaded(x, offsets), F.embedding_bag(x, table, offsets, mode="sum"))
    assert loaded.cached_rows().tolist() == [4, 8] and loaded._tracked == [] and len(m._tracked) == 1


@pytest.mark.parametrize("counter", ["exact", "bounded"])
def test_the_counter_moves_with_the_module(counter):
    """.to()/.cuda() moved the module's parameters and buffers but not the counter's tensors (a
    module built on the CPU and moved to a GPU failed in its first training forward)."""
    m = CachedTTEmbeddingBag(make_tt(), cache_fraction=0.01, warmup_iters=5, counter=counter)
    m(torch.tensor([1, 2, 2]), torch.tensor([0]))
    m.double()
    assert m.cache_weight.dtype == torch.float64 and m.counter.counts.dtype == torch.int64
    m.to("meta")
    tensors = [m.counter.counts] + ([m.counter.rows] if counter == "bounded" else [])
    assert all(t.device.type == "meta" for t in tensors) and m.slot_rows.device.type == "meta"


# ---- bad input ----

def test_row_ids_of_public_methods_are_checked_by_name():
    """Float row ids were truncated (set_cached_rows([1.7]) cached row 1); observe() with the bounded
    counter kept rows outside the table (the next refresh then failed inside a forward), int32 ids
    crashed the exact counter."""
    m = CachedTTEmbeddingBag(make_tt(), cache_fraction=0.01, warmup_iters=0)
    with pytest.raises(TypeError, match="rows: got dtype torch.float32; row ids must be int32 or int64"):
        m.set_cached_rows(torch.tensor([1.7]))
    with pytest.raises(TypeError, match="indices: got dtype torch.float32"):
        m.cached_mask(torch.tensor([1.5]))
    m.set_cached_rows([1, 2])  # a list of ints is fine
    assert m.cached_rows().tolist() == [1, 2]
    for counter in ("exact", "bounded"):
        m = CachedTTEmbeddingBag(make_tt(), cache_fraction=0.01, warmup_iters=0, counter=counter)
        for bad in (-5, N):
            with pytest.raises(ValueError, match=f"indices: got row {bad}; rows must be in \\[0, num_embeddings=600\\)"):
                m.observe(torch.tensor([3, bad]))
        with pytest.raises(TypeError, match="indices: got dtype torch.bool"):
            m.observe(torch.tensor([True]))
        m.observe(torch.tensor([3, 3, 9], dtype=torch.int32))
        assert m.counter.total == 3 and m.counter.estimate(torch.tensor([3, 9, 4])).tolist() == [2, 1, 0]
        assert m.refresh().tolist() == [3, 9]


@pytest.mark.parametrize("sparse", ["False", 0, None])
def test_sparse_is_a_flag(sparse):
    """sparse='False' was accepted and failed in F.embedding_bag at the first forward after the warm-up."""
    with pytest.raises(TypeError, match=f"sparse: got {sparse!r}"):
        CachedTTEmbeddingBag(make_tt(), sparse=sparse)
