"""The LFU cache (ttrec.cache) against independent references.

The reference for every forward and gradient is the logical table: the dense reconstruction of the
cores (tt_to_dense) with the cached rows substituted, pooled by F.embedding_bag, differentiated by
autograd. Optimizer steps are checked against torch.optim on that reference; counters against
bincount; the hit ratio against a direct count.
"""

from __future__ import annotations

import functools
import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ttrec import TTEmbeddingBag, backend_status
from ttrec.cache import (BoundedCounter, CachedTTEmbeddingBag, ExactCounter, cache_capacity, make_counter)
from ttrec.reference import tt_to_dense
from ttrec.workloads import Workload, WorkloadStream

N, D = 600, 16
BACKENDS = ["torch"] + (["cpu"] if backend_status("cpu") is None else [])


def make(backend="torch", mode="sum", fraction=0.05, warmup=2, refresh=3, optimizer=None, tt_optimizer=None,
         **kw) -> CachedTTEmbeddingBag:
    tt = TTEmbeddingBag(N, D, 4, tt_p_shapes=(6, 10, 10), backend=backend, mode=mode, seed=1,
                        optimizer=tt_optimizer, learning_rate=0.05)
    return CachedTTEmbeddingBag(tt, cache_fraction=fraction, warmup_iters=warmup, refresh_every=refresh,
                                optimizer=optimizer, learning_rate=0.05, **kw)


def batches(seed=0, hot=None, n_bags=12, weighted=False):
    """Bags of 0..8 lookups (some empty); lookups mostly on ``hot`` rows when given."""
    g = torch.Generator().manual_seed(seed)
    while True:
        sizes = torch.randint(0, 9, (n_bags,), generator=g)
        n = int(sizes.sum())
        idx = torch.randint(0, N, (n,), generator=g)
        if hot is not None:
            pick = torch.rand(n, generator=g) < 0.8
            idx[pick] = hot[torch.randint(0, hot.numel(), (int(pick.sum()),), generator=g)]
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes, 0)[:-1]])
        w = torch.rand(n, generator=g) if weighted else None
        yield idx, offsets, w


def reference(m: CachedTTEmbeddingBag, idx, offsets, w, mode):
    """(output, core leaves, cache leaf) of the logical table, built from the module's current state."""
    cores = [c.detach().clone().requires_grad_(True) for c in m.tt.tt_cores]
    cache = m.cache_weight.detach().clone().requires_grad_(True)
    table = tt_to_dense(cores, m.spec)
    occupied = torch.nonzero(m.slot_rows >= 0).flatten()
    table = table.index_copy(0, m.slot_rows[occupied], cache[occupied])
    return F.embedding_bag(idx, table, offsets, mode=mode, per_sample_weights=w), cores, cache


def close(a, b, what, tol=2e-5):
    assert a.shape == b.shape, what
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= tol * (1 + float(b.abs().max()) if b.numel() else 1), f"{what}: max error {err}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False)])
@pytest.mark.parametrize("slot_map", ["dense", "sorted"])
def test_forward_and_gradients_match_the_logical_table_at_every_stage(backend, mode, weighted, slot_map):
    m = make(backend, mode, slot_map=slot_map)
    hot1, hot2 = torch.arange(0, 60, 2), torch.arange(300, 330)
    stages = []
    gen1, gen2 = batches(0, hot1, weighted=weighted), batches(1, hot2, weighted=weighted)
    for t in range(9):  # warm-up (2), populate at t=2, refresh at t=5 and t=8 on a moved hot set
        idx, offsets, w = next(gen1 if t < 4 else gen2)
        out = m(idx, offsets, w)
        ref, cores, cache = reference(m, idx, offsets, w, mode)
        close(out, ref, f"forward t={t}")
        grad = torch.randn_like(out)
        out.backward(grad)
        ref.backward(grad)
        for k, (c, r) in enumerate(zip(m.tt.tt_cores, cores)):
            close(c.grad if c.grad is not None else torch.zeros_like(r), r.grad, f"core {k} gradient t={t}")
        g = m.cache_weight.grad
        close(torch.zeros_like(cache) if g is None else g.to_dense(), cache.grad, f"cache gradient t={t}")
        m.zero_grad(set_to_none=True)
        stages.append((m.populated, m.refreshes, m.num_cached))
    assert stages[1] == (False, 0, 0) and stages[2][0] and stages[2][1] == 1
    assert stages[-1][1] == 3 and 0 < stages[-1][2] <= m.capacity
    assert set(m.cached_rows().tolist()) & set(hot2.tolist())  # the refresh followed the hot set


def test_2d_input_and_include_last_offset_match_the_reference():
    m = make(warmup=0, refresh=0)
    m.set_cached_rows(torch.tensor([5, 7, 11]))
    x = torch.tensor([[5, 6, 7], [11, 11, 0]])
    ref, _, _ = reference(m, x, None, None, "sum")
    close(m(x), ref, "2D input")
    m2 = CachedTTEmbeddingBag(TTEmbeddingBag(N, D, 4, tt_p_shapes=(6, 10, 10), seed=1, include_last_offset=True),
                              cache_fraction=0.05, warmup_iters=0)
    m2.set_cached_rows(torch.tensor([5, 7, 11]))
    out = m2(torch.tensor([5, 6, 7, 11]), torch.tensor([0, 1, 4]))
    ref, _, _ = reference(m2, torch.tensor([5, 6, 7, 11]), torch.tensor([0, 1]), None, "sum")
    close(out, ref, "include_last_offset")


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_fused_cache_update_matches_torch_optim_on_the_reference(optimizer):
    m = make(mode="mean", warmup=1, refresh=0, optimizer=optimizer)
    opt_cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}[optimizer]
    gen = batches(3, torch.arange(0, 40))
    idx, offsets, _ = next(gen)
    m(idx, offsets).sum().backward()  # warm-up call; populate happens at the next call
    m.tt.zero_grad(set_to_none=True)
    ref_cache = None
    for t in range(4):
        idx, offsets, _ = next(gen)
        if ref_cache is None:
            out = m(idx, offsets)
            ref_cache = torch.nn.Parameter(m.cache_weight.detach().clone())
            ref_opt = opt_cls([ref_cache], lr=0.05)
        else:
            out = m(idx, offsets)
        cores = [c.detach() for c in m.tt.tt_cores]
        table = tt_to_dense(cores, m.spec)
        occupied = torch.nonzero(m.slot_rows >= 0).flatten()
        table = table.index_copy(0, m.slot_rows[occupied], ref_cache[occupied])
        ref = F.embedding_bag(idx, table, offsets, mode="mean")
        close(out, ref, f"forward step {t}")
        grad = torch.randn_like(out)
        out.backward(grad)
        ref_opt.zero_grad()
        ref.backward(grad)
        ref_opt.step()
        assert m.cache_weight.grad is None  # the fused step consumed it
        close(m.cache_weight.detach(), ref_cache.detach(), f"cache rows after step {t}", tol=1e-5)
        m.tt.zero_grad(set_to_none=True)


@pytest.mark.skipif(backend_status("cpu") is not None, reason="native CPU backend unavailable")
def test_fused_tt_cores_and_cache_train_like_sgd_on_the_logical_table():
    m = make("cpu", warmup=1, refresh=0, optimizer="sgd", tt_optimizer="sgd")
    gen = batches(4, torch.arange(100, 140))
    idx, offsets, _ = next(gen)
    m(idx, offsets).sum().backward()
    for t in range(3):
        idx, offsets, _ = next(gen)
        out = m(idx, offsets)
        ref, cores, cache = reference(m, idx, offsets, None, "sum")
        grad = torch.randn_like(out)
        out.backward(grad)
        ref.backward(grad)
        for k, (c, r) in enumerate(zip(m.tt.tt_cores, cores)):
            close(c.detach(), r.detach() - 0.05 * r.grad, f"core {k} after fused SGD, step {t}", tol=1e-5)
        close(m.cache_weight.detach(), cache.detach() - 0.05 * cache.grad, f"cache after fused SGD, step {t}", tol=1e-5)


@pytest.mark.parametrize("slot_map", ["dense", "sorted"])
def test_eviction_and_refresh_never_serve_a_wrong_row(slot_map):
    """Trained cache rows differ from the cores; after every refresh each row is served either from
    its own slot or from the cores, never from a slot another row left behind."""
    m = make(fraction=0.03, warmup=1, refresh=2, optimizer="sgd", slot_map=slot_map)
    every_row = torch.arange(N)
    singles = torch.arange(N)
    for phase, hot in enumerate([torch.arange(0, 18), torch.arange(9, 27), torch.arange(500, 518)]):
        gen = batches(10 + phase, hot)
        for _ in range(4):
            idx, offsets, _ = next(gen)
            (m(idx, offsets) * 10).sum().backward()  # big steps: cached values drift far from the cores
            m.tt.zero_grad(set_to_none=True)
            slot_rows = m.slot_rows
            valid = slot_rows[slot_rows >= 0]
            assert valid.unique().numel() == valid.numel()  # one slot per row
            assert torch.equal(m.cached_rows(), torch.sort(valid).values)
            with torch.no_grad():
                m.eval()
                served = m(every_row, singles)
                m.train()
            cores_table = tt_to_dense([c.detach() for c in m.tt.tt_cores], m.spec)
            expect = cores_table.clone()
            occupied = torch.nonzero(slot_rows >= 0).flatten()
            expect[slot_rows[occupied]] = m.cache_weight.detach()[occupied]
            close(served, expect, f"every row, phase {phase}")
        assert set(m.cached_rows().tolist()) <= set(hot.tolist()) | set(range(0, 27))
    # rows of the first hot set that were evicted are served by the cores again
    evicted = torch.tensor(sorted(set(range(0, 9)) - set(m.cached_rows().tolist())))
    assert evicted.numel()
    with torch.no_grad():
        m.eval()
        cores_table = tt_to_dense([c.detach() for c in m.tt.tt_cores], m.spec)
        close(m(evicted, torch.arange(evicted.numel())), cores_table[evicted], "evicted rows come from the cores")


def test_refresh_keeps_kept_rows_values_and_materializes_new_rows_from_the_cores():
    m = make(fraction=0.02, warmup=0, refresh=0, optimizer="sgd")
    m.set_cached_rows(torch.tensor([1, 2, 3, 4]))
    with torch.no_grad():
        m.cache_weight += 1.0  # pretend training
    before = {int(r): m.cache_weight[s].clone() for s, r in enumerate(m.slot_rows.tolist()) if r >= 0}
    slots_before = {int(r): s for s, r in enumerate(m.slot_rows.tolist()) if r >= 0}
    m.set_cached_rows(torch.tensor([3, 4, 50, 60, 70]))
    table = m.tt.full_weight()
    for s, r in enumerate(m.slot_rows.tolist()):
        if r in (3, 4):
            assert s == slots_before[r] and torch.equal(m.cache_weight[s], before[r])  # kept: same slot, same value
        elif r >= 0:
            close(m.cache_weight[s].detach(), table[r], f"new row {r}")
    assert sorted(r for r in m.slot_rows.tolist() if r >= 0) == [3, 4, 50, 60, 70]


def test_state_dict_round_trip_rebuilds_the_lookup_map():
    m = make(fraction=0.02, warmup=0, refresh=0, optimizer="adagrad")
    m.set_cached_rows(torch.tensor([4, 8, 15]))
    with torch.no_grad():
        m.cache_weight += 1.0
    fresh = make(fraction=0.02, warmup=0, refresh=0, optimizer="adagrad")
    fresh.load_state_dict(m.state_dict())
    x, offsets = torch.tensor([4, 8, 15, 16, 23]), torch.tensor([0, 2])
    assert fresh.populated and torch.equal(fresh.cached_rows(), torch.tensor([4, 8, 15]))
    close(fresh(x, offsets), m(x, offsets), "after load_state_dict")
    ref, _, _ = reference(fresh, x, offsets, None, "sum")
    close(fresh(x, offsets), ref, "loaded module vs reference")


def test_adagrad_state_of_reassigned_slots_is_reset_also_in_a_tracked_torch_optimizer():
    m = make(fraction=0.02, warmup=0, refresh=0)
    m.set_cached_rows(torch.tensor([1, 2, 3]))
    opt = torch.optim.Adagrad(m.parameters(), lr=0.1)
    m.track_optimizer(opt)
    m(torch.tensor([1, 2, 3]), torch.tensor([0])).sum().backward()
    opt.step()
    state = opt.state[m.cache_weight]["sum"]
    slot_of = {r: s for s, r in enumerate(m.slot_rows.tolist())}
    assert float(state[slot_of[1]].abs().sum()) > 0
    m.set_cached_rows(torch.tensor([2, 3, 9]))  # row 1 evicted, row 9 takes a slot
    new_slot = m.slot_rows.tolist().index(9)
    assert float(state[new_slot].abs().sum()) == 0
    assert float(state[slot_of[2]].abs().sum()) > 0  # kept rows keep their sums


def test_hit_ratio_counts_lookups_served_from_the_cache():
    m = make(fraction=0.05, warmup=1, refresh=0)
    gen = batches(5, torch.arange(200, 230))
    idx, offsets, _ = next(gen)
    m(idx, offsets)
    assert m.hit_ratio() != m.hit_ratio()  # NaN: nothing served from a cache yet
    hits = lookups = 0
    for _ in range(3):
        idx, offsets, _ = next(gen)
        m(idx, offsets)
        hits += int(torch.isin(idx, m.cached_rows()).sum())
        lookups += idx.numel()
    assert m.hit_ratio() == pytest.approx(hits / lookups)
    assert torch.equal(m.cached_mask(idx), torch.isin(idx, m.cached_rows()))


def test_hit_rate_of_the_hot_set_workload_with_its_hot_set_cached():
    """A cache holding exactly the hot set serves Binomial(n, h) lookups: within 5 sigma."""
    n_rows = 20_000
    for h in (0.0, 0.5, 0.9, 0.99):
        w = Workload("hot_set", hit_rate=h, hot_fraction=0.005, batch_size=4000, pooling_factor=2, seed=3)
        stream = WorkloadStream(w, n_rows)
        tt = TTEmbeddingBag(n_rows, 8, 2, seed=0, backend="torch")
        m = CachedTTEmbeddingBag(tt, cache_fraction=0.005, warmup_iters=0)
        m.set_cached_rows(torch.from_numpy(stream.hot_rows))
        m.eval()
        n = 0
        with torch.no_grad():
            for _ in range(3):
                b = next(stream)
                m(b.indices, b.offsets)
                n += b.num_lookups
        sigma = (h * (1 - h) / n) ** 0.5
        assert abs(m.hit_ratio() - h) <= 5 * sigma + 1e-12, (h, m.hit_ratio())


def test_lfu_warm_up_learns_the_hot_set():
    n_rows = 20_000
    w = Workload("hot_set", hit_rate=0.9, hot_fraction=0.005, batch_size=2000, seed=4)
    stream = WorkloadStream(w, n_rows)
    m = CachedTTEmbeddingBag(TTEmbeddingBag(n_rows, 8, 2, seed=0, backend="torch"), cache_fraction=0.005,
                             warmup_iters=5)
    with torch.no_grad():
        for _ in range(6):
            b = next(stream)
            m(b.indices, b.offsets)
    assert torch.equal(m.cached_rows(), torch.from_numpy(stream.hot_rows))


def test_write_back_pulls_the_cores_towards_evicted_rows_and_is_off_by_default():
    """The optional write-back reaches the evicted rows' values, and (why it is off by default) moves
    rows that share their core slices."""
    for steps in (0, 100):
        m = make(fraction=0.02, warmup=0, refresh=0, write_back_steps=steps)
        m.set_cached_rows(torch.tensor([10, 20]))
        with torch.no_grad():
            m.cache_weight[:2] += 0.5
        target = m.cache_weight[:2].detach().clone()
        rows = m.slot_rows[:2].clone()
        table_before = m.tt.full_weight()
        m.set_cached_rows(torch.tensor([30]))
        table_after = m.tt.full_weight()
        others = torch.ones(N, dtype=torch.bool)
        others[rows] = False
        gap_before = float((table_before[rows] - target).norm())
        gap_after = float((table_after[rows] - target).norm())
        moved = float((table_after[others] - table_before[others]).norm())
        if steps == 0:
            assert gap_after == gap_before and moved == 0.0
        else:
            assert gap_after < 0.1 * gap_before
            assert moved > 0.1 * float(table_before[others].norm())


def test_memory_report_closed_form():
    m = make(fraction=0.05, optimizer="adagrad", counter="exact", slot_map="dense")
    c = cache_capacity(N, 0.05)
    m.set_cached_rows(torch.arange(c))
    mem = m.memory_bytes()
    assert mem["cache_weight_bytes"] == c * D * 4 and mem["cache_state_bytes"] == c * D * 4
    assert mem["cache_map_bytes"] == 8 * (3 * c + N)
    assert mem["cache_bytes"] == mem["cache_weight_bytes"] + mem["cache_state_bytes"] + mem["cache_map_bytes"]
    assert mem["counter_bytes"] == 8 * N
    m2 = make(fraction=0.05, counter="bounded", counter_slots=100, slot_map="sorted")
    assert m2.memory_bytes()["counter_bytes"] == 1600 and m2.memory_bytes()["cache_map_bytes"] == 8 * c


@pytest.mark.parametrize("fraction,k", [(0.0001, 1), (0.01, 6), (0.1, 60), (1.0, 600), (0.00167, 2)])
def test_capacity_from_fraction(fraction, k):
    assert cache_capacity(N, fraction) == k


def test_exact_counter_and_deterministic_top_k():
    c = ExactCounter(10)
    c.observe(torch.tensor([3, 3, 5, 5, 7, 1, 1, 1]))
    c.observe(torch.tensor([9, 9, 9, 2]))
    assert torch.equal(c.counts, torch.bincount(torch.tensor([3, 3, 5, 5, 7, 1, 1, 1, 9, 9, 9, 2]), minlength=10))
    assert c.top(2).tolist() == [1, 9]
    assert c.top(3).tolist() == [1, 3, 9]  # ties (3 and 5 with 2 each) go to the smaller id
    assert c.top(100).tolist() == [1, 2, 3, 5, 7, 9]  # only rows seen
    assert c.total == 12


@settings(max_examples=25, deadline=None)
@given(slots=st.integers(1, 40), alpha=st.floats(0.3, 2.0), batches_=st.integers(1, 8), seed=st.integers(0, 1000))
def test_bounded_counter_respects_the_misra_gries_bound(slots, alpha, batches_, seed):
    stream = WorkloadStream(Workload("zipf", zipf_alpha=alpha, batch_size=97, pooling_factor=3, seed=seed), 300)
    exact, bounded = ExactCounter(300), BoundedCounter(slots)
    for _ in range(batches_):
        b = next(stream)
        exact.observe(b.indices)
        bounded.observe(b.indices)
    assert bounded.rows.numel() <= slots and bounded.total == exact.total
    est, true = bounded.estimate(torch.arange(300)), exact.counts
    bound = exact.total / (slots + 1)
    assert bool((est <= true).all()) and bool((true - est <= bound + 1e-9).all())
    heavy = torch.nonzero(true > bound).flatten()
    assert bool(torch.isin(heavy, bounded.rows).all())


def test_auto_counter_and_slot_map_choices():
    assert make_counter("auto", 1000, 10).kind == "exact"
    assert make_counter("auto", 10**8, 10).kind == "bounded"
    assert make_counter("bounded", 10**8, 10).slots == 1024
    with pytest.raises(ValueError, match="counter_slots"):
        make_counter("bounded", 1000, 50, counter_slots=10)
    assert make(slot_map="auto").slot_map == "dense"


@pytest.mark.parametrize("kwargs,needle", [
    ({"cache_fraction": 0.0}, "cache_fraction: got 0.0"),
    ({"cache_fraction": 1.5}, "cache_fraction: got 1.5"),
    ({"warmup_iters": -1}, "warmup_iters: got -1"),
    ({"refresh_every": 2.5}, "refresh_every: got 2.5"),
    ({"optimizer": "adam"}, "optimizer: got 'adam'"),
    ({"counter": "sketch"}, "counter: got 'sketch'"),
    ({"slot_map": "hash"}, "slot_map: got 'hash'"),
    ({"learning_rate": 0}, "learning_rate: got 0"),
    ({"optimizer": "adagrad", "eps": 0.0}, "eps: got 0.0"),  # (it made the cached rows not looked up NaN)
    ({"optimizer": "adagrad", "eps": -1.0}, "eps: got -1.0"),
])
def test_constructor_rejects_bad_values_naming_them(kwargs, needle):
    tt = TTEmbeddingBag(N, D, 4, seed=0)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        CachedTTEmbeddingBag(tt, **kwargs)


def test_bad_inputs_are_rejected():
    with pytest.raises(TypeError, match="tt: got Linear"):
        CachedTTEmbeddingBag(torch.nn.Linear(2, 2))
    m = make(fraction=0.01)
    with pytest.raises(ValueError, match="at most 6"):
        m.set_cached_rows(torch.arange(7))
    with pytest.raises(ValueError, match="distinct"):
        m.set_cached_rows(torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="num_embeddings=600"):
        m.set_cached_rows(torch.tensor([600]))
    with pytest.raises(ValueError, match="input: got index 600"):
        m(torch.tensor([600]), torch.tensor([0]))


# ---- the CUDA path, on the emulated kernels (tests/test_cuda_emulated.py) ----

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
if shutil.which("g++") is not None:
    from tests.test_cuda_emulated import emu_lib  # noqa: F401  (the fixture: kernels built with g++)


@needs_gxx
def test_cuda_path_uses_the_cache_kernels_and_matches_the_reference(emu_lib, monkeypatch):
    from tests.test_cuda_emulated import EmuLauncher
    from ttrec import tt as tt_module
    from ttrec.cuda import loader

    emu = EmuLauncher(emu_lib)
    monkeypatch.setitem(tt_module.BACKENDS, "cuda", (functools.partial(loader.tt_bag_cuda, launcher=emu), lambda: None))
    monkeypatch.setattr(loader, "_default_launcher", lambda device: emu)
    m = make("cuda", mode="mean", warmup=2, refresh=2, optimizer="sgd", slot_map="dense")
    gen = batches(7, torch.arange(40, 70))
    seen = []
    for t in range(6):
        idx, offsets, _ = next(gen)
        seen.append(idx)
        out = m(idx, offsets)
        ref, cores, cache = reference(m, idx, offsets, None, "mean")
        close(out, ref, f"forward t={t}")
        grad = torch.randn_like(out)
        out.backward(grad)
        ref.backward(grad)
        for k, (c, r) in enumerate(zip(m.tt.tt_cores, cores)):
            close(c.grad, r.grad, f"core {k} gradient t={t}")
        close(m.cache_weight.detach(), cache.detach() - 0.05 * cache.grad, f"cache after SGD t={t}")
        m.tt.zero_grad(set_to_none=True)
    assert torch.equal(m.counter.counts, torch.bincount(torch.cat(seen), minlength=N))  # counted by tt_count_rows
    for kernel in ("tt_count_rows", "tt_cache_partition", "tt_cache_sgd"):
        assert emu.launched(kernel), kernel
