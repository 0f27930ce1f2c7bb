"""Review: a plan's whole-key sort in two levels (SortKey kTwoLevel in sort.h, plan_chunk's `two` from
kTwoLevelFrom = 32,768 lookups in plan.h) and the flat forward's row loop (flat_rows in tt_cpu.cpp).

The two-level sort must give exactly the order of the previous whole-key sort: equal prefixes (i1, i2) in
one run, runs of one i2 adjacent, equal rows adjacent, and equal keys in lookup order (stable). Counting
the runs (unique_prefixes) checks the first three. Stability is checked through the sums themselves: rows
looked up several times get, on their first two lookups, upstream gradients B v and -B v (B = 2^26), so
summed in lookup order their repeats give exactly the sum of the others (B v - B v = 0, then the rest),
while any other order (e.g. equal keys reversed) loses the others' sum to rounding at B's scale and the
gradients leave the float64 reference's tolerance. Repeats split over several places in the sorted order
are caught the same way (each piece computed apart at B's scale).
"""

from __future__ import annotations


import pytest
import torch

import ttrec
from ttrec.bags import make_bags
from ttrec.cpu import ops
from ttrec.cpu.build import unavailable_reason

from .native_reference import assert_fused_module_steps_match_torch, normal_cores, reference_with_grads, spec_of

pytestmark = [pytest.mark.skipif(unavailable_reason() is not None, reason=f"native kernel: {unavailable_reason()}"),
              pytest.mark.usefixtures("threads_at_any_size")]

B = 2.0**26  # cancelling upstream gradients: exact only when summed in lookup order
TWO_LEVEL_FROM = 32768  # kTwoLevelFrom (plan.h)


def _spec(p, q=(2, 2, 4), r=(8, 8)):
    return spec_of(p, q, r)


def _row(p, i1, i2, i3):
    return (i1 * p[1] + i2) * p[2] + i3


def _plant_repeats(idx, g, count, copies=3):
    """``count`` rows each looked up ``copies`` times more, at random positions (in place); their rows."""
    n = idx.numel()
    src = torch.randint(0, n, (count,), generator=g)
    for _ in range(copies - 1):
        idx[torch.randint(0, n, (count,), generator=g)] = idx[src]
    return torch.unique(idx[src])


def _cancelling_grad(idx, rows, D, g):
    """Upstream gradients per lookup (bags of one lookup each): random, except that each row in ``rows``
    gets B v and -B v on its first two lookups (in lookup order)."""
    grad = torch.randn(idx.numel(), D, generator=g)
    for r in rows.tolist():
        pos = torch.nonzero(idx == r).flatten()
        if pos.numel() >= 2:
            v = torch.randn(D, generator=g)
            grad[pos[0]] = B * v
            grad[pos[1]] = -B * v
    return grad


def _one_per_bag(spec, idx):
    return make_bags(idx, torch.arange(idx.numel()), None, num_embeddings=spec.num_embeddings, mode="sum")


def _assert_close_to(got, want, rtol=1e-5):
    torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=rtol)


def _check_plans(spec, cores, bags, grad_out, mode="sum", threads=(1, 2, 3), plan_less=True):
    """For each thread count: the forward that keeps its plan, the backward without one and the backward
    through autograd (the kept plan) count exactly the distinct prefixes and give the same bits on every
    thread count; the plan-less forward gives the kept one's bits; all match the float64 reference."""
    p3 = spec.tt_p_shapes[2]
    distinct = torch.unique(bags.indices // p3).numel()
    runs = []
    for t in threads:
        torch.set_num_threads(t)
        out, saved = ops._forward(cores, spec, bags, mode, keep=True)
        assert saved is not None, "a plan was expected to be kept"
        assert ops.last_stats()["unique_prefixes"] == distinct, ("forward, kept plan", t)
        saved.release()
        grads = ops.backward(cores, spec, bags, mode, grad_out)
        assert ops.last_stats("backward")["unique_prefixes"] == distinct, ("backward", t)
        leaves = [c.clone().requires_grad_() for c in cores]
        ops.tt_bag_cpu(leaves, spec, bags, mode).backward(grad_out)
        assert all(torch.equal(a.grad, b) for a, b in zip(leaves, grads)), ("backward from the kept plan", t)
        if plan_less:
            assert torch.equal(ops.forward(cores, spec, bags, mode), out), ("plan-less forward", t)
            assert ops.last_stats()["unique_prefixes"] == distinct, ("plan-less forward", t)
        runs.append((out, grads))
    for k, (out, grads) in enumerate(runs[1:], 1):
        assert torch.equal(out, runs[0][0]), ("forward bits", threads[k])
        assert all(torch.equal(a, b) for a, b in zip(grads, runs[0][1])), ("gradient bits", threads[k])
    want, want_grads = reference_with_grads(cores, spec, bags, grad_out, mode)
    _assert_close_to(runs[0][0], want)
    for a, b in zip(runs[0][1], want_grads):
        _assert_close_to(a, b, rtol=1e-4)
    return runs[0]


@pytest.fixture
def _sort_way_timing_again():
    yield
    ops.force_sort_way("timing")


# ---- the threshold ----

@pytest.mark.parametrize("n", [32767, 32768, 32769, 65536])
@pytest.mark.parametrize("p", [(40, 50, 60), (2, 5000, 3)])
def test_the_two_level_sort_starts_at_32768_lookups_and_i2_of_at_most_12_bits(n, p, _sort_way_timing_again):
    """The two-level sort always runs its one pass "shared" (sort_lookups); a one-level whole-key sort
    follows the forced way. With "split" forced on 2 threads the way the kernel reports tells the two
    apart: "shared" from 32,768 lookups where i2 takes at most 12 bits ((40, 50, 60): 6), "split"
    below and where i2 takes 13 bits ((2, 5000, 3)). The results equal one thread's bitwise, count the
    distinct prefixes and match the reference (cancelling repeats: stable order)."""
    spec = _spec(p)
    cores = normal_cores(spec)
    g = torch.Generator().manual_seed(n)
    idx = torch.randint(0, spec.num_embeddings, (n,), generator=g)
    rows = _plant_repeats(idx, g, 300)
    bags = _one_per_bag(spec, idx)
    grad_out = _cancelling_grad(idx, rows, spec.embedding_dim, g)
    want_out, want_grads = _check_plans(spec, cores, bags, grad_out, threads=(1, 2))
    two = n >= TWO_LEVEL_FROM and p[1] <= 4096
    ops.force_sort_way("split")
    torch.set_num_threads(2)
    out, saved = ops._forward(cores, spec, bags, "sum", keep=True)
    assert saved is not None
    assert ops.last_sort_way() == ("shared" if two else "split"), "forward with a kept plan"
    saved.release()
    grads = ops.backward(cores, spec, bags, "sum", grad_out)
    assert ops.last_sort_way() == ("shared" if two else "split"), "backward"
    assert torch.equal(out, want_out) and all(torch.equal(a, b) for a, b in zip(grads, want_grads))


# ---- shapes: bit fields of i2 and of the low bits (local passes) ----

# (p, what it takes): low bits = bits(p1) + bits(p3) (bits(p1) + bits(p3) - 1 with p2 = 1, whose top "field" is
# then the top key bit); local passes of up to 8 bits: ceil(low / 8)
SHAPES = [
    ((40, 2, 60), "i2 1 bit, low 12: 2 passes of 6, buckets of 20,000"),
    ((3, 3000, 5), "i2 12 bits (two levels), low 5: buckets of ~13, insertion sort"),
    ((3, 4096, 5), "i2 12 bits, every value"),
    ((2, 300, 1), "p3 = 1, low 1: one pass of 1 bit"),
    ((1, 300, 2), "p1 = 1, low 1"),
    ((16, 50, 16), "low 8: one pass of 8"),
    ((32, 50, 16), "low 9: 2 passes of 5"),
    ((300, 5, 200), "low 17: 3 passes of 6"),
    ((4096, 3, 4096), "low 24: 3 passes of 8"),
    ((1, 300, 200), "p1 = 1, low 8"),
    ((300, 50, 1), "p3 = 1, low 9"),
    ((300, 1, 200), "p2 = 1: the top pass on i1's top bit, then 16 low bits"),
    ((1, 1, 5000), "p1 = p2 = 1: one prefix, the top pass on i3's top bit"),
    ((1, 3000, 1), "p1 = p3 = 1: no low bits, the one pass sorts the whole key"),
    ((2, 5000, 3), "i2 13 bits: one level"),
]


@pytest.mark.parametrize("p,what", SHAPES, ids=[str(s[0]) for s in SHAPES])
@pytest.mark.parametrize("batch", ["uniform", "hot"])
def test_two_level_plans_on_every_field_layout(p, what, batch):
    """40,000 lookups with cancelling repeats (and "hot": half of them on 20 rows: long runs of equal
    keys, buckets far over 32): prefix counts, bits on 1, 2 and 3 threads, the kept plan's backward, the
    plan-less forward and the float64 reference."""
    spec = _spec(p)
    cores = normal_cores(spec, seed=1)
    g = torch.Generator().manual_seed(sum(p))
    n = 40000
    idx = torch.randint(0, spec.num_embeddings, (n,), generator=g)
    if batch == "hot":
        hot = torch.randint(0, spec.num_embeddings, (20,), generator=g)
        idx[torch.randperm(n, generator=g)[: n // 2]] = hot[torch.randint(0, 20, (n // 2,), generator=g)]
    rows = _plant_repeats(idx, g, 400)
    if batch == "hot":
        rows = torch.cat([rows, torch.unique(idx)[:50]])
    bags = _one_per_bag(spec, idx)
    _check_plans(spec, cores, bags, _cancelling_grad(idx, rows, spec.embedding_dim, g))


# ---- bucket sizes ----

def _sized_buckets(p, sizes, g, repeat_every=1):
    """Lookups whose i2 bucket k (i2 = k) holds sizes[k] entries of random (i1, i3), each bucket (of 3+) with
    one row three times, all positions shuffled; and the repeated rows."""
    idx, rows = [], []
    for k, m in enumerate(sizes):
        i1 = torch.randint(0, p[0], (m,), generator=g)
        i3 = torch.randint(0, p[2], (m,), generator=g)
        r = _row(p, i1, k, i3)
        if m >= 3 and k % repeat_every == 0:
            r[1] = r[0]
            r[m - 1] = r[0]
            rows.append(int(r[0]))
        idx.append(r)
    idx = torch.cat(idx)
    return idx[torch.randperm(idx.numel(), generator=g)], torch.tensor(rows, dtype=torch.int64)


def _sizes_32_33(n, cuts):
    """Bucket sizes 32, 33, 32, ... summing to n, a bucket starting exactly at each cut."""
    sizes, total, k = [], 0, 0
    while total < n:
        m = min(32 + k % 2, n - total)
        nxt = [c for c in cuts if total < c < total + m]
        if nxt:
            m = nxt[0] - total
        sizes.append(m)
        total += m
        k += 1
    return sizes


def test_buckets_of_32_and_33_entries_and_buckets_starting_at_the_threads_slice_bounds():
    """Buckets alternate 32 entries (insertion sort) and 33 (one LSD pass, low 12 bits: 2 passes), and a
    bucket starts exactly at n/3, n/2 and 2n/3: the bounds of the threads' slices of the sorted entries
    for 2 and 3 threads (each thread sorts the buckets starting in its slice)."""
    p = (40, 2000, 60)
    spec = _spec(p)
    cores = normal_cores(spec, seed=2)
    g = torch.Generator().manual_seed(3)
    n = 32832  # divisible by 6
    sizes = _sizes_32_33(n, [n // 3, n // 2, 2 * n // 3])
    assert sum(sizes) == n and len(sizes) <= p[1]
    starts = torch.tensor([0, *sizes]).cumsum(0)
    assert all(c in starts.tolist() for c in (n // 3, n // 2, 2 * n // 3))
    assert sizes.count(32) > 400 and sizes.count(33) > 400
    idx, rows = _sized_buckets(p, sizes, g)
    bags = _one_per_bag(spec, idx)
    _check_plans(spec, cores, bags, _cancelling_grad(idx, rows, spec.embedding_dim, g))


@pytest.mark.parametrize("m", [8, 31, 32, 33, 34, 300])
def test_every_bucket_of_one_size(m):
    """Every i2 bucket holds m entries (insertion sort up to 32, LSD passes above; low 12 bits: 2 passes),
    at least 32,768 lookups (m = 8: all 4,096 values of i2, exactly 32,768)."""
    p = (64, 4096, 64)
    spec = _spec(p)
    cores = normal_cores(spec, seed=m)
    g = torch.Generator().manual_seed(m)
    idx, rows = _sized_buckets(p, [m] * -(-TWO_LEVEL_FROM // m), g)
    assert TWO_LEVEL_FROM <= idx.numel() < TWO_LEVEL_FROM + m
    bags = _one_per_bag(spec, idx)
    _check_plans(spec, cores, bags, _cancelling_grad(idx, rows, spec.embedding_dim, g), threads=(1, 2))


@pytest.mark.parametrize("layout", ["one_bucket", "one_row", "two_rows_interleaved"])
def test_all_lookups_in_one_bucket(layout):
    """40,000 lookups of one i2 value (one bucket: thread 0 sorts it, the others nothing); all on one row
    (one run of equal keys, which must stay in lookup order); two rows alternating."""
    p = (300, 50, 200)
    spec = _spec(p)
    cores = normal_cores(spec, seed=4)
    g = torch.Generator().manual_seed(4)
    n = 40000
    if layout == "one_bucket":
        idx = _row(p, torch.randint(0, p[0], (n,), generator=g), 17, torch.randint(0, p[2], (n,), generator=g))
        rows = _plant_repeats(idx, g, 300)
    elif layout == "one_row":
        idx = torch.full((n,), _row(p, 123, 45, 67))
        rows = idx[:1]
    else:
        idx = torch.tensor([_row(p, 299, 49, 199), _row(p, 0, 0, 0)]).repeat(n // 2)
        rows = idx[:2]
    bags = _one_per_bag(spec, idx)
    _check_plans(spec, cores, bags, _cancelling_grad(idx, rows, spec.embedding_dim, g))


@pytest.mark.parametrize("n", [80000, 72000])
def test_backward_in_chunks_of_two_level_plans(n):
    """A backward in chunks of 40,000 lookups (chunk_bytes: 2 M R_2 floats + 48 bytes per lookup): 80,000
    lookups make two two-level chunks, 72,000 one and one of 32,000 (one level) through the same static
    plan. Prefixes counted per chunk, the same bits on 1, 2 and 3 threads, the float64 reference."""
    p = (300, 5, 200)
    spec = _spec(p)
    cores = normal_cores(spec, seed=7)
    g = torch.Generator().manual_seed(n)
    # each row in one chunk only (even rows in the first, odd in the second): the cancelling pair of a row
    # is summed within its chunk
    idx = 2 * torch.randint(0, spec.num_embeddings // 2, (n,), generator=g) + (torch.arange(n) >= 40000)
    rows = torch.cat([_plant_repeats(idx[c:c + 40000], g, 250) for c in range(0, n, 40000)])
    grad_out = _cancelling_grad(idx, rows, spec.embedding_dim, g)
    bags = _one_per_bag(spec, idx)
    chunk_bytes = (4 * 2 * 4 * 8 + 48) * 40000
    want = sum(torch.unique(idx[c:c + 40000] // p[2]).numel() for c in range(0, n, 40000))
    grads = []
    for t in (1, 2, 3):
        torch.set_num_threads(t)
        grads.append(ops.backward(cores, spec, bags, "sum", grad_out, chunk_bytes=chunk_bytes))
        stats = ops.last_stats("backward")
        assert stats["chunks"] == 2 and stats["unique_prefixes"] == want, t
    for gr in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(gr, grads[0]))
    for a, b in zip(grads[0], reference_with_grads(cores, spec, bags, grad_out, "sum")[1]):
        _assert_close_to(a, b, rtol=1e-4)


# ---- bags, weights, mean, int32 ----

@pytest.mark.parametrize("kind", ["sum_pooled", "mean", "weighted_cancelling", "int32"])
def test_bags_of_several_lookups(kind):
    """40,000 lookups in bags of 0 to ~20 (mean: scaled), per-sample weights (bags holding one row three times
    with weights B, -B and 1: exact only in lookup order), int32 indices and offsets."""
    p = (300, 5, 200)
    spec = _spec(p)
    cores = normal_cores(spec, seed=5)
    g = torch.Generator().manual_seed(5)
    n = 40000
    idx = torch.randint(0, spec.num_embeddings, (n,), generator=g)
    _plant_repeats(idx, g, 500)
    mode = "mean" if kind == "mean" else "sum"
    weights = None
    if kind == "weighted_cancelling":
        offsets = torch.arange(0, n, 4)  # bags of 4
        weights = torch.rand(n, generator=g)
        bags_with_triple = torch.randperm(n // 4, generator=g)[:2000]
        # rows looked up nowhere else (a lookup of the row before B's would be lost to rounding)
        free = torch.randperm(spec.num_embeddings, generator=g)
        free = free[~torch.isin(free, idx)][:2000]
        for b, r in zip(bags_with_triple.tolist(), free.tolist()):
            idx[4 * b: 4 * b + 3] = r  # (first in the bag: nothing summed before B in the forward either)
            weights[4 * b: 4 * b + 3] = torch.tensor([B, -B, 1.0])
    else:
        # bags of 0 to ~20 lookups, 3 on average
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.randint(0, n, (n // 3,), generator=g).sort()[0]])
    if kind == "int32":
        idx, offsets = idx.to(torch.int32), offsets.to(torch.int32)
    bags = make_bags(idx, offsets, weights, num_embeddings=spec.num_embeddings, mode=mode)
    grad_out = torch.randn(bags.num_bags, spec.embedding_dim, generator=g)
    _check_plans(spec, cores, bags, grad_out, mode=mode)


# ---- fused updates ----

@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
@pytest.mark.parametrize("p", [(300, 5, 200), (3, 3000, 5)])
def test_fused_updates_at_two_level_sizes_match_the_reference(optimizer, p):
    """One fused step (ops.sparse_update: the backward's own two-level plan) at 40,000 lookups with
    cancelling repeats moves the cores as the float64 reference gradient says (SGD: -lr g; Adagrad from
    zero state, eps 1e-3: -lr g / (|g| + eps), nonlinear, so a bucket handled twice would differ), on 1,
    2 and 3 threads with the same bits, leaving the scratch zero."""
    spec = _spec(p, r=(16, 16))
    cores = normal_cores(spec, seed=6)
    g = torch.Generator().manual_seed(6)
    n = 40000
    idx = torch.randint(0, spec.num_embeddings, (n,), generator=g)
    rows = _plant_repeats(idx, g, 400)
    bags = _one_per_bag(spec, idx)
    grad_out = _cancelling_grad(idx, rows, spec.embedding_dim, g)
    ref_grads = reference_with_grads(cores, spec, bags, grad_out, "sum")[1]
    lr, eps = 0.05, 1e-3
    results = []
    for t in (1, 2, 3):
        torch.set_num_threads(t)
        new = [c.clone() for c in cores]
        scratch = [torch.zeros_like(c) for c in cores]
        state = [torch.zeros_like(c) for c in cores] if optimizer == "adagrad" else None
        touched = ops.sparse_update(new, spec, bags, "sum", grad_out, optimizer, lr, eps, scratch, state)
        assert ops.last_stats("backward")["unique_prefixes"] == torch.unique(idx // p[2]).numel()
        assert all(not s.any() for s in scratch)
        results.append((new, state, touched))
    for new, state, touched in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(new, results[0][0]))
        assert all(torch.equal(a, b) for a, b in zip(touched, results[0][2]))
        if state is not None:
            assert all(torch.equal(a, b) for a, b in zip(state, results[0][1]))
    for k, (c_new, c_old, gr) in enumerate(zip(results[0][0], cores, ref_grads)):
        if optimizer == "sgd":
            step = -lr * gr
            torch.testing.assert_close(c_new.double() - c_old.double(), step, rtol=1e-3,
                                       atol=1e-5 * step.abs().max().item() + 1e-6 * c_old.abs().max().item())
            continue
        # Adagrad: the state is g^2 (a bucket updated in two parts would leave g_a^2 + g_b^2); the step
        # -lr g / (|g| + eps) within its first-order error bound for fp32 gradients (tol_g)
        tol_g = 1e-5 * gr.abs().max().item() + 1e-4 * gr.abs()
        h = results[0][1][k].double()
        assert ((h - gr * gr).abs() <= 2 * gr.abs() * tol_g + tol_g * tol_g + 1e-30).all(), f"Adagrad state of core {k}"
        step = -lr * gr / (gr.abs() + eps)
        allowed = 2 * lr * tol_g / (gr.abs() + eps) + 1e-6 * c_old.abs().max().item()
        assert ((c_new.double() - c_old.double() - step).abs() <= allowed).all(), f"Adagrad step of core {k}"


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_module_steps_with_the_forwards_kept_two_level_plan_match_torch(optimizer):
    """Two fused steps through the module at 36,000 lookups (the forward keeps its two-level plan, the
    backward's update uses it) equal torch's optimizer on float64."""
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(9)
    n = 36000
    idx = torch.randint(0, 15000, (n,), generator=g)
    offsets = torch.arange(0, n, 2)
    grad_out = torch.randn(n // 2, 16, generator=g, dtype=torch.float64)
    distinct = torch.unique(idx // 25).numel()  # p_3 = 25

    def counted():
        assert ops.last_stats("backward")["unique_prefixes"] == distinct

    assert_fused_module_steps_match_torch(optimizer, idx, offsets, grad_out, counted)


# ---- the flat forward's row loop ----

# q_1 = 1 and 2 (q_1 q_2 = q_3 = 4, D = 16), R = 4, 8, 12 (slices padded to 16 floats: 256 bytes), 32 (512
# bytes), 64 (1 KiB); p_3 chosen so the last-core slices in use take 25, 40, 50 or 64 KiB: the prefetch
# starts above 48 KiB (last_in_l1).
FLAT = [(4, 100), (8, 100), (8, 200), (12, 100), (32, 80), (32, 128), (64, 40), (64, 64)]


@pytest.mark.parametrize("q1", [1, 2])
@pytest.mark.parametrize("R,p3", FLAT)
def test_flat_forward_rows(q1, R, p3):
    """The plan-less d = 3 forward on the flat path: 600 lookups (in cache) and 20,000 (streamed; p_1 =
    900 in 5 buckets: grouped by piece of 192 prefixes) with repeats adjacent in lookup order (copied)
    and far apart (computed again), in bags of one and of several lookups: the float64 reference, the
    same bits on 1, 2 and 3 threads and as the forward that keeps its plan."""
    q = (1, 4, 4) if q1 == 1 else (2, 2, 4)
    p = (900, 5, p3)
    spec = _spec(p, q=q, r=(12, R))
    cores = normal_cores(spec, seed=R + q1)
    g = torch.Generator().manual_seed(R * p3 + q1)
    for n in (600, 20000):
        idx = torch.randint(0, spec.num_embeddings, (n,), generator=g)
        k = torch.randperm(n - 1, generator=g)[: n // 8]
        idx[k + 1] = idx[k]  # adjacent repeats
        far = torch.randperm(n, generator=g)[: n // 8]
        idx[far] = idx[torch.randint(0, n, (n // 8,), generator=g)]  # repeats anywhere
        for pooled in (False, True):
            offsets = torch.arange(0, n, 3) if pooled else torch.arange(n)
            bags = make_bags(idx, offsets, None, num_embeddings=spec.num_embeddings, mode="sum")
            outs = []
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                outs.append(ops.forward(cores, spec, bags, "sum"))
                assert ops.last_stats()["unique_prefixes"] == torch.unique(idx // p3).numel()
            kept, saved = ops._forward(cores, spec, bags, "sum", keep=True)
            assert saved is not None
            saved.release()
            assert all(torch.equal(o, outs[0]) for o in outs[1:]), (n, pooled)
            assert torch.equal(kept, outs[0]), (n, pooled)
            rows = ttrec.tt_rows([c.double() for c in cores], spec, idx)
            want = rows if not pooled else torch.zeros(bags.num_bags, 16, dtype=torch.float64).index_add_(
                0, torch.arange(n) // 3, rows)
            torch.testing.assert_close(outs[0].double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
