"""The native CPU kernel on shapes and batches the other native tests do not reach, against the float64
reference backend (ttrec.reference) and torch's optimizers.

Covered here and not elsewhere: d = 2 and 4 with q_k = 1, D = 1, 3 and up to 256 (not a multiple of 16),
ranks 1 and odd ranks (3, 7, 33, 65), p_k = 1 for any core, a table of one row; batches with every
bag empty, every lookup on one row, bags of hundreds of lookups, mean pooling with empty bags,
weights with zeros and negative values, int32 indices at the table's end, chunk budgets small enough
for many chunks; results bitwise equal across repeated calls and thread counts (1, 2, 3, also 4-8
threads on 2 cores), also with 8,192+ distinct prefixes (d = 3's plan found by several threads); the
kept forward plan (grad mode) against the no_grad forward and a recomputed backward, with the thread
count changed between them; the fused SGD and Adagrad update one step at a time on all of these
(against the update rule on the kernel's own gradients, SGD also against float64 gradients), and over
several steps through the module against torch.optim with the optimizer's state carried over, for
d = 2, 3, 4, in one chunk and in many; untouched slices and accumulators bitwise unchanged.

Error scale (as in test_native_cpu): the same sums with every term made positive, so fp32
cancellation and long sums (thousands of lookups on one row) are bounded, not flagged.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import ttrec
from ttrec.bags import make_bags
from ttrec.cpu import ops
from ttrec.cpu.build import unavailable_reason
from ttrec.reference import row_digits

from .native_reference import normal_cores, spec_of

pytestmark = [pytest.mark.skipif(unavailable_reason() is not None, reason=f"native kernel: {unavailable_reason()}"),
              pytest.mark.usefixtures("threads_at_any_size")]

ROOT = Path(__file__).resolve().parents[1]
LR, EPS = 0.05, 1e-10


def _batch(spec, sizes, seed, mode="sum", weights=None, pattern="uniform", index_dtype=torch.int64):
    """Bags of the given sizes; weights None, "rand" or "signed" (normal, a fifth of them exactly 0);
    pattern "uniform", "one_row" (every lookup on one row) or "end" (the table's last three rows)."""
    g = torch.Generator().manual_seed(seed)
    n, rows = sum(sizes), spec.num_embeddings
    if pattern == "one_row":
        idx = torch.full((n,), int(torch.randint(0, rows, (1,), generator=g)), dtype=torch.int64)
    elif pattern == "end":
        idx = rows - 1 - torch.randint(0, min(rows, 3), (n,), generator=g)
    else:
        idx = torch.randint(0, rows, (n,), generator=g)
    w = None
    if weights == "rand":
        w = torch.rand(n, generator=g)
    elif weights == "signed":
        w = torch.randn(n, generator=g)
        w[torch.rand(n, generator=g) < 0.2] = 0.0
    offsets = torch.tensor([0, *sizes[:-1]], dtype=torch.int64).cumsum(0)
    return make_bags(idx.to(index_dtype), offsets.to(index_dtype), w, num_embeddings=rows, mode=mode)


def _reference(cores, spec, bags, mode, grad_out):
    """float64 forward and core gradients, and their error scales (positive-term sums)."""
    w = bags.per_sample_weights
    ref_bags = make_bags(bags.indices, bags.offsets[:-1], None if w is None else w.double(),
                         num_embeddings=spec.num_embeddings, mode=mode)
    abs_bags = make_bags(bags.indices, bags.offsets[:-1], None if w is None else w.double().abs(),
                         num_embeddings=spec.num_embeddings, mode=mode)
    ref_cores = [c.double().requires_grad_() for c in cores]
    abs_cores = [c.double().abs().requires_grad_() for c in cores]
    out = ttrec.tt_embedding_bag(ref_cores, spec, ref_bags, mode)
    bound = ttrec.tt_embedding_bag(abs_cores, spec, abs_bags, mode)
    grads = torch.autograd.grad(out, ref_cores, grad_out.double())
    grad_bounds = torch.autograd.grad(bound, abs_cores, grad_out.double().abs())
    return out.detach(), bound.detach().abs().max().item(), grads, [b.abs().max().item() for b in grad_bounds]


def _close(got, want, scale, rtol):
    torch.testing.assert_close(got.double(), want, atol=1e-5 * scale + 1e-30, rtol=rtol)


def _assert_matches_reference(cores, spec, bags, mode, grad_out, chunk_bytes=ops.DEFAULT_CHUNK_BYTES):
    """ops.forward and ops.backward against the float64 reference; returns them."""
    out = ops.forward(cores, spec, bags, mode, chunk_bytes=chunk_bytes)
    grads = ops.backward(cores, spec, bags, mode, grad_out, chunk_bytes=chunk_bytes)
    want, scale, want_grads, scales = _reference(cores, spec, bags, mode, grad_out)
    _close(out, want, scale, 1e-5)
    for g, w, s in zip(grads, want_grads, scales):
        _close(g, w, s, 1e-4)
    return out, grads


def _used_digits(spec, bags):
    """Per core, which digit values the batch's lookups use (bool (p_k,))."""
    used = [torch.zeros(p, dtype=torch.bool) for p in spec.tt_p_shapes]
    if bags.num_lookups:
        for k, dig in enumerate(row_digits(bags.indices.long(), spec.tt_p_shapes)):
            used[k][dig] = True
    return used


@st.composite
def wide_problems(draw):
    """d = 2..4, q_k in 1..16 (D up to 256), ranks 1..65, p_k from 1, tables a few rows short of
    prod(p); bags empty to hundreds of lookups; sum (optionally weighted, signed) or mean."""
    d = draw(st.integers(2, 4))
    while True:
        p = draw(st.lists(st.sampled_from([1, 2, 3, 5, 13, 31]), min_size=d, max_size=d))
        q = draw(st.lists(st.sampled_from([1, 1, 2, 3, 4, 5, 8, 16]), min_size=d, max_size=d))
        r = draw(st.lists(st.sampled_from([1, 2, 3, 7, 8, 16, 33, 48, 65]), min_size=d - 1, max_size=d - 1))
        ranks = (1, *r, 1)
        per_lookup = sum(ranks[k] * q[k] * ranks[k + 1] for k in range(d)) + math.prod(q) * ranks[-2]
        if math.prod(q) <= 256 and per_lookup <= 20000:
            break
    rows = math.prod(p) - draw(st.integers(0, math.prod(p) // 3))
    sizes = draw(st.lists(st.sampled_from([0, 0, 1, 2, 3, 7, 150, 400]), min_size=1, max_size=12))
    mode = draw(st.sampled_from(["sum", "mean"]))
    weights = draw(st.sampled_from([None, "rand", "signed"])) if mode == "sum" else None
    pattern = draw(st.sampled_from(["uniform", "uniform", "one_row", "end"]))
    index_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    threads = draw(st.sampled_from([1, 2, 3]))
    chunk_bytes = draw(st.sampled_from([ops.DEFAULT_CHUNK_BYTES, 1]))  # 1: chunks of 1,024 lookups
    seed = draw(st.integers(0, 2**31 - 1))
    spec = spec_of(p, q, r, rows=max(1, rows))
    return spec, _batch(spec, sizes, seed, mode, weights, pattern, index_dtype), mode, threads, chunk_bytes, seed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wide_problems())
def test_wide_shapes_match_the_reference_and_repeat_bitwise_on_any_thread_count(problem):
    spec, bags, mode, threads, chunk_bytes, seed = problem
    cores = normal_cores(spec, seed)
    grad_out = torch.randn(bags.num_bags, spec.embedding_dim, generator=torch.Generator().manual_seed(seed))
    torch.set_num_threads(threads)
    out, grads = _assert_matches_reference(cores, spec, bags, mode, grad_out, chunk_bytes)
    for t in (threads, 1):  # the same bits again, and on one thread
        torch.set_num_threads(t)
        assert torch.equal(ops.forward(cores, spec, bags, mode, chunk_bytes=chunk_bytes), out), t
        again = ops.backward(cores, spec, bags, mode, grad_out, chunk_bytes=chunk_bytes)
        assert all(torch.equal(a, b) for a, b in zip(again, grads)), t


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wide_problems(), st.sampled_from(["sgd", "adagrad"]))
def test_one_fused_step_is_the_update_rule_on_the_kernels_gradients(problem, optimizer):
    """ops.sparse_update moves exactly the touched slices: SGD by -lr x the float64 gradient; Adagrad
    (accumulators starting nonzero) by its rule on the kernel's own fp32 gradients (the rule divides
    by |g| on a first step, so near-zero float64 gradients are no yardstick). Untouched slices and
    accumulators keep their bits; the touched masks are the digit values used; the scratch is zero."""
    spec, bags, mode, threads, _, seed = problem
    cores = normal_cores(spec, seed)
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(bags.num_bags, spec.embedding_dim, generator=g)
    torch.set_num_threads(threads)
    grads = ops.backward(cores, spec, bags, mode, grad_out)
    new = [c.clone() for c in cores]
    scratch = [torch.zeros_like(c) for c in cores]
    state = [torch.rand(c.shape, generator=g) for c in cores] if optimizer == "adagrad" else None
    state0 = None if state is None else [s.clone() for s in state]
    touched = ops.sparse_update(new, spec, bags, mode, grad_out, optimizer, LR, EPS, scratch, state)
    assert all(not s.any() for s in scratch)
    if optimizer == "sgd":
        _, _, want_grads, scales = _reference(cores, spec, bags, mode, grad_out)
    for k, used in enumerate(_used_digits(spec, bags)):
        assert torch.equal(touched[k].bool(), used), k
        assert torch.equal(new[k][:, ~used], cores[k][:, ~used]), k
        c0 = cores[k].double()
        if optimizer == "sgd":
            step = -LR * want_grads[k]  # (plus the rounding of the new values to fp32)
            torch.testing.assert_close(new[k].double() - c0, step, rtol=1e-4,
                                       atol=1e-5 * LR * scales[k] + 1e-6 * c0.abs().max().item() + 1e-30)
        else:
            gk = grads[k].double()
            h = state0[k].double() + gk * gk
            assert torch.equal(state[k][:, ~used], state0[k][:, ~used]), k
            _close(state[k], h, h.abs().max().item(), 1e-6)
            _close(new[k], c0 - LR * gk / (h.sqrt() + EPS), c0.abs().max().item(), 1e-6)


# (p, q, ranks): d = 2 and 4, q_k = 1, D = 1, 3, 20, 256, odd ranks, p_k = 1, p_k > 1024
FUSED_SHAPES = [((40, 37), (1, 3), (7,)), ((1100, 3), (4, 5), (33,)), ((3, 1500), (16, 16), (3,)),
                ((5, 1, 7, 6), (2, 1, 3, 1), (3, 7, 5)), ((6, 5, 4, 3), (1, 1, 1, 1), (1, 65, 1)),
                ((9, 11, 13), (1, 4, 4), (33, 7)), ((1, 30, 40), (2, 2, 4), (16, 48)),
                ((1025, 2, 3), (5, 1, 4), (65, 3)), ((30, 40, 1), (2, 2, 4), (16, 16))]


@pytest.mark.parametrize("p,q,r", FUSED_SHAPES)
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
@pytest.mark.parametrize("chunked", [False, True])
def test_fused_module_steps_equal_torch_optimizers_step_by_step(p, q, r, optimizer, chunked, monkeypatch):
    """Four steps of TTEmbeddingBag(backend="cpu", optimizer=...) (kept forward plans for d = 3,
    weighted and mean bags, empty bags, threads changed between forward and backward; ``chunked``:
    the update as a pass over the gradient scratch after many chunks) against torch.optim stepping
    on the kernel's gradients (ops.backward over the same chunks: another summation order would be
    rounding that Adagrad's division by |g| amplifies). Each step starts torch from the fused
    module's cores and accumulators; the accumulators must match torch's state_sum, and untouched
    slices and accumulators keep their bits over all steps. (The gradients themselves are checked
    against float64 in the tests above.)"""
    if chunked:
        monkeypatch.setattr(ops, "DEFAULT_CHUNK_BYTES", 1)  # 1,024 lookups per chunk
    spec = spec_of(p, q, r, rows=math.prod(p) - 2)
    kw = dict(backend="cpu", seed=7, init="normal")
    fused = ttrec.TTEmbeddingBag(spec.num_embeddings, spec.embedding_dim, r, p, q, optimizer=optimizer,
                                 learning_rate=LR, eps=EPS, **kw)
    plain = ttrec.TTEmbeddingBag(spec.num_embeddings, spec.embedding_dim, r, p, q, **kw)  # its cores only
    opt = (torch.optim.SGD(plain.parameters(), lr=LR) if optimizer == "sgd"
           else torch.optim.Adagrad(plain.parameters(), lr=LR, eps=EPS))
    cores = list(fused.tt_cores)
    state = [getattr(fused, f"adagrad_state_{k}") for k in range(spec.d)] if optimizer == "adagrad" else None
    before = [c.detach().clone() for c in cores]
    used = [torch.zeros(pk, dtype=torch.bool) for pk in p]
    g = torch.Generator().manual_seed(11)
    n = 2500 if chunked else 300
    for step, (mode, weights, threads) in enumerate([("sum", "signed", (1, 3)), ("mean", None, (2, 2)),
                                                      ("sum", None, (3, 1)), ("sum", "rand", (2, 1))]):
        sizes = [0, 1, 180] + torch.randint(0, 9, ((n - 181) // 4,), generator=g).tolist()
        bags = _batch(spec, sizes, 100 + step, mode, weights)
        grad_out = torch.randn(bags.num_bags, spec.embedding_dim, generator=g)
        with torch.no_grad():  # torch starts from the fused module's values
            for k, (c_plain, c) in enumerate(zip(plain.tt_cores, cores)):
                c_plain.copy_(c)
                if state is not None:
                    opt.state[c_plain]["sum"].copy_(state[k])
        fused.mode = mode
        args = (bags.indices, bags.offsets[:-1], bags.per_sample_weights)
        torch.set_num_threads(threads[0])
        y = fused(*args)
        torch.set_num_threads(threads[1])
        y.backward(grad_out)
        # torch's step on the kernel's gradients at the same cores, summed over the same chunks
        grads = ops.backward(list(plain.tt_cores), spec, bags, mode, grad_out, chunk_bytes=ops.DEFAULT_CHUNK_BYTES)
        for c_plain, gk in zip(plain.tt_cores, grads):
            c_plain.grad = gk
        opt.step()
        for u, d in zip(used, _used_digits(spec, bags)):
            u |= d
        for k, (c, c_plain) in enumerate(zip(cores, plain.tt_cores)):
            assert c.grad is None
            where = lambda m, s=step, k=k: f"step {s}, core {k}: {m}"  # noqa: E731
            torch.testing.assert_close(c.detach(), c_plain.detach(), rtol=1e-5,
                                       atol=1e-6 * c_plain.detach().abs().max().item(), msg=where)
            if state is not None:
                torch.testing.assert_close(state[k], opt.state[c_plain]["sum"], rtol=1e-5, atol=1e-30, msg=where)
    for k, (c, c0) in enumerate(zip(cores, before)):
        assert torch.equal(c.detach()[:, ~used[k]], c0[:, ~used[k]]), k
        assert not torch.equal(c.detach()[:, used[k]], c0[:, used[k]]), k
        if state is not None:
            assert not state[k][:, ~used[k]].any(), k
    assert all(not s.any() for s in fused._scratch)


EDGE_SHAPES = [((1, 1), (2, 4), (3,)), ((1, 1, 1), (1, 1, 1), (2, 3)), ((1, 1, 1, 1), (2, 1, 1, 4), (3, 3, 3)),
               ((7, 8, 9), (2, 2, 4), (16, 16)), ((6, 7, 8, 9), (1, 3, 1, 1), (65, 1, 7)), ((50, 60), (16, 16), (33,))]


@pytest.mark.parametrize("p,q,r", EDGE_SHAPES)
@pytest.mark.parametrize("batch", ["all_empty", "one_row", "long_bags", "mean_with_empty", "int32_at_end",
                                   "zero_weights"])
def test_edge_batches_match_the_reference_and_fused_steps_touch_only_their_slices(p, q, r, batch):
    """Tables of one row, D = 1, d = 2..4; batches where every bag is empty (zeros, zero gradients,
    a fused step changes nothing), every lookup hits one row (6,000 lookups), bags of 300-700
    lookups, mean pooling with empty bags, int32 indices on the table's last rows, all weights zero."""
    spec = spec_of(p, q, r)
    cores = normal_cores(spec, 3)
    torch.set_num_threads(2)
    if batch == "all_empty":
        bags = _batch(spec, [0] * 17, 1)
    elif batch == "one_row":
        bags = _batch(spec, [60] * 100, 1, pattern="one_row")
    elif batch == "long_bags":
        bags = _batch(spec, [300, 0, 700, 450], 1, weights="signed")
    elif batch == "mean_with_empty":
        bags = _batch(spec, [0, 5, 0, 0, 250, 1, 0], 1, mode="mean")
    elif batch == "int32_at_end":
        bags = _batch(spec, [3, 1, 0, 40, 2] * 20, 1, pattern="end", index_dtype=torch.int32)
    else:
        bags = make_bags(torch.randint(0, spec.num_embeddings, (400,), generator=torch.Generator().manual_seed(1)),
                         torch.arange(0, 400, 8), torch.zeros(400), num_embeddings=spec.num_embeddings, mode="sum")
    mode = "mean" if batch == "mean_with_empty" else "sum"
    grad_out = torch.randn(bags.num_bags, spec.embedding_dim, generator=torch.Generator().manual_seed(2))
    out, grads = _assert_matches_reference(cores, spec, bags, mode, grad_out)
    empty = bags.offsets[1:] == bags.offsets[:-1]
    assert not out[empty].any()
    if batch in ("all_empty", "zero_weights"):
        assert not out.any() and all(not g.any() for g in grads)
    for optimizer in ("sgd", "adagrad"):
        new = [c.clone() for c in cores]
        state = [torch.zeros_like(c) for c in cores] if optimizer == "adagrad" else None
        touched = ops.sparse_update(new, spec, bags, mode, grad_out, optimizer, LR, EPS,
                                    [torch.zeros_like(c) for c in cores], state)
        for k, used in enumerate(_used_digits(spec, bags)):
            assert torch.equal(touched[k].bool(), used), (optimizer, k)
            assert torch.equal(new[k][:, ~used], cores[k][:, ~used]), (optimizer, k)
            if batch in ("all_empty", "zero_weights"):  # zero gradients: no value moves
                assert torch.equal(new[k], cores[k]) and (state is None or not state[k].any()), (optimizer, k)


@pytest.mark.parametrize("p,q,r,n", [
    ((300, 300, 5), (2, 2, 4), (16, 16), 40000),  # ~32,000 distinct prefixes: the plan's buckets found by 3 threads
    ((300, 300, 5), (2, 3, 4), (17, 33), 40000),
    ((1, 1, 1), (2, 1, 4), (3, 3), 40000),  # a one-row table: 0 key bits
    ((30, 1, 40), (2, 2, 2), (5, 5), 20000),
    ((7, 9, 11, 1), (2, 2, 2, 2), (5, 5, 5), 20000),
    ((2**20, 2**20 - 3), (2, 2), (2,), 20000),  # 40-bit keys, d = 2
])
def test_large_batches_give_the_same_bits_on_1_to_8_threads(p, q, r, n):
    """The parallel phases (sort slices, run search, bucket starts of d = 3's plan once it has
    more than 8,192 prefixes, segments) at 1, 2, 3 and, oversubscribed on this machine, 4 and 8
    threads: the same bits, and the float64 reference's rows and gradients."""
    spec = spec_of(p, q, r)
    cores = normal_cores(spec, 5)
    g = torch.Generator().manual_seed(6)
    idx = torch.randint(0, spec.num_embeddings, (n,), generator=g)
    idx[:3] = torch.tensor([0, spec.num_embeddings - 1, spec.num_embeddings - 1])
    bags = make_bags(idx, torch.arange(0, n, 4), None, num_embeddings=spec.num_embeddings, mode="sum")
    grad_out = torch.randn(bags.num_bags, spec.embedding_dim, generator=g)
    results = []
    for threads in (1, 2, 3, 4, 8):
        torch.set_num_threads(threads)
        results.append((ops.forward(cores, spec, bags, "sum"), ops.backward(cores, spec, bags, "sum", grad_out)))
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))
    if spec.num_embeddings > 10**9:  # no dense table: rows of the float64 reference
        rows = ttrec.tt_rows([c.double() for c in cores], spec, idx)
        want = torch.zeros(bags.num_bags, spec.embedding_dim, dtype=torch.float64).index_add_(0, bags.bag_ids(), rows)
        _close(results[0][0], want, want.abs().max().item(), 1e-5)
    else:
        _assert_matches_reference(cores, spec, bags, "sum", grad_out)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wide_problems(), st.sampled_from([1, 2, 3]))
def test_kept_plan_forward_and_backward_equal_no_grad_forward_and_recomputation(problem, backward_threads):
    """Grad mode with cores requiring grad (d = 3 keeps the forward's plan when the batch fits one
    chunk): the output equals the no_grad forward bitwise, and the core gradients equal a recomputed
    ops.backward bitwise, with the thread count changed between forward and backward."""
    spec, bags, mode, threads, _, seed = problem
    cores = normal_cores(spec, seed)
    grad_out = torch.randn(bags.num_bags, spec.embedding_dim, generator=torch.Generator().manual_seed(seed))
    torch.set_num_threads(threads)
    leaves = [c.clone().requires_grad_() for c in cores]
    live = ops.live_saved_forwards()
    out = ops.tt_bag_cpu(leaves, spec, bags, mode)
    kept = ops.live_saved_forwards() - live
    assert kept == (1 if spec.d == 3 and bags.num_lookups else 0)
    with torch.no_grad():
        assert torch.equal(out.detach(), ops.tt_bag_cpu(leaves, spec, bags, mode))
    torch.set_num_threads(backward_threads)
    got = torch.autograd.grad(out, leaves, grad_out)
    assert ops.live_saved_forwards() == live
    want = ops.backward(cores, spec, bags, mode, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_gradients_add_into_given_buffers_and_mark_the_touched_digits():
    """ops.backward(grads=..., touched=...) adds into the buffers (d = 2, 3, 4) and marks exactly
    the digit values the batch used."""
    for p, q, r in [((40, 37), (1, 3), (7,)), ((9, 11, 13), (1, 4, 4), (33, 7)), ((5, 1, 7, 6), (2, 1, 3, 1), (3, 7, 5))]:
        spec = spec_of(p, q, r)
        cores = normal_cores(spec, 1)
        bags = _batch(spec, [3, 0, 9, 1, 40], 2, weights="signed")
        grad_out = torch.randn(bags.num_bags, spec.embedding_dim, generator=torch.Generator().manual_seed(3))
        fresh = ops.backward(cores, spec, bags, "sum", grad_out)
        prior = [torch.randn(c.shape, generator=torch.Generator().manual_seed(4)) for c in cores]
        grads = [x.clone() for x in prior]
        touched = [torch.zeros(pk, dtype=torch.uint8) for pk in p]
        ops.backward(cores, spec, bags, "sum", grad_out, grads=grads, touched=touched)
        for k, used in enumerate(_used_digits(spec, bags)):
            torch.testing.assert_close(grads[k], prior[k] + fresh[k], rtol=1e-6, atol=1e-6)
            assert torch.equal(touched[k].bool(), used), (p, k)


def test_a_kept_plan_handed_to_two_direct_backwards_gives_the_same_gradients_twice():
    """ops.backward(saved=...) twice with one kept plan (d = 3): the plan stays 'current' and 'fits'
    after its first use, but that use swapped its table of used last-core digits out (backward_d3),
    so the second call read an empty table: SIGSEGV. Either call must give the recomputed gradients
    (a backward that used the plan now releases it: the second recomputes).
    (Repro: /tmp/s32/fuzz/saved_twice.py.) Run in a subprocess: a crash fails this test only."""
    code = textwrap.dedent("""
        import torch, ttrec
        from ttrec.bags import make_bags
        from ttrec.cpu import ops
        spec = ttrec.TTSpec(210, 16, (5, 6, 7), (2, 2, 4), (3, 4))
        cores = ttrec.init_tt_cores(spec, "normal", generator=torch.Generator().manual_seed(0))
        bags = make_bags(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 3]), None, num_embeddings=210,
                         mode="sum")
        _, saved = ops._forward(cores, spec, bags, "sum", keep=True)
        g = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
        want = ops.backward(cores, spec, bags, "sum", g)
        for _ in range(2):
            got = ops.backward(cores, spec, bags, "sum", g, saved=saved)
            print(all(torch.equal(a, b) for a, b in zip(got, want)), flush=True)
        new = [c.clone() for c in cores]  # and a fused step after the direct backwards
        ops.sparse_update(new, spec, bags, "sum", g, "sgd", 0.1, 0.0, [torch.zeros_like(c) for c in cores], None,
                          saved=saved)
        print(all(torch.allclose(a, c - 0.1 * b, rtol=1e-5, atol=1e-6) for a, b, c in zip(new, want, cores)))
        saved.release()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode} (negative: killed by that signal)\n{done.stdout}\n{done.stderr[-2000:]}"
    assert done.stdout.split() == ["True", "True", "True"], done.stdout
