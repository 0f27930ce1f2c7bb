"""The native CPU kernel against the reference backend (ttrec.reference) and torch optimizers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import ttrec
from ttrec.bags import Bags, make_bags
from ttrec.cpu import ops
from ttrec.cpu.build import unavailable_reason

from .native_reference import (assert_few_prefix_update_has_gemm_bits, assert_fused_module_steps_match_torch,
                               assert_fused_sgd_matches_reference, assert_matches_reference)

pytestmark = [pytest.mark.skipif(unavailable_reason() is not None, reason=f"native kernel: {unavailable_reason()}"),
              pytest.mark.usefixtures("threads_at_any_size")]


def _spec(p, q, r, rows_short=0):
    return ttrec.TTSpec(math.prod(p) - rows_short, math.prod(q), tuple(p), tuple(q), tuple(r))


def _cores(spec, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [c.to(dtype) for c in ttrec.init_tt_cores(spec, "normal", generator=g)]


@st.composite
def problems(draw):
    d = draw(st.integers(2, 4))
    p = draw(st.lists(st.integers(1, 7), min_size=d, max_size=d))
    q = draw(st.lists(st.integers(1, 4), min_size=d, max_size=d))
    r = draw(st.lists(st.sampled_from([1, 2, 3, 5, 8, 16, 17]), min_size=d - 1, max_size=d - 1))
    spec = _spec(p, q, r, rows_short=draw(st.integers(0, max(0, math.prod(p) - 1))))
    sizes = draw(st.lists(st.integers(0, 6), min_size=1, max_size=8))
    seed = draw(st.integers(0, 2**31 - 1))
    mode = draw(st.sampled_from(["sum", "mean"]))
    weighted = mode == "sum" and draw(st.booleans())
    threads = draw(st.sampled_from([1, 2, 3]))
    return spec, sizes, seed, mode, weighted, threads


def _bags(spec, sizes, seed, mode, weighted, dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    idx = torch.randint(0, spec.num_embeddings, (n,), generator=g).to(dtype)
    offsets = torch.tensor([0, *sizes[:-1]]).cumsum(0).to(dtype)
    w = torch.rand(n, generator=g) if weighted else None
    return make_bags(idx, offsets, w, num_embeddings=spec.num_embeddings, mode=mode)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_forward_and_core_gradients_equal_reference(problem):
    spec, sizes, seed, mode, weighted, threads = problem
    torch.set_num_threads(threads)
    cores = [c.requires_grad_() for c in _cores(spec, seed)]
    ref_cores = [c.detach().double().requires_grad_() for c in cores]
    bags = _bags(spec, sizes, seed, mode, weighted)
    ref_bags = make_bags(bags.indices, bags.offsets[:-1], None if bags.per_sample_weights is None else
                         bags.per_sample_weights.double(), num_embeddings=spec.num_embeddings, mode=mode)
    out = ops.tt_bag_cpu(cores, spec, bags, mode)
    ref = ttrec.tt_embedding_bag(ref_cores, spec, ref_bags, mode)
    # error scale: the same sums with every term made positive (bounds fp32 cancellation)
    abs_cores = [c.detach().abs().requires_grad_() for c in ref_cores]
    out_bound = ttrec.tt_embedding_bag(abs_cores, spec, ref_bags, mode)
    torch.testing.assert_close(out.double(), ref, atol=1e-5 * (out_bound.abs().max().item() + 1e-30), rtol=1e-5)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = torch.autograd.grad(out, cores, grad_out.float())
    want = torch.autograd.grad(ref, ref_cores, grad_out)
    bound = torch.autograd.grad(out_bound, abs_cores, grad_out.abs())
    for g_native, g_ref, b in zip(got, want, bound):
        torch.testing.assert_close(g_native.double(), g_ref, atol=1e-5 * (b.abs().max().item() + 1e-30), rtol=1e-4)


@pytest.mark.parametrize("p,q,r", [((200, 220, 250), (2, 2, 4), (32, 32)), ((20, 21, 22), (4, 4, 4), (64, 64)),
                                   ((30, 30, 30), (4, 4, 8), (8, 8)), ((5, 6, 7, 8), (2, 2, 2, 2), (4, 8, 4))])
def test_paper_like_shapes_dims_16_64_128(p, q, r):
    spec = _spec(p, q, r, rows_short=7)
    cores = _cores(spec)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, spec.num_embeddings, (3000,), generator=g)
    offsets = torch.arange(0, 3000, 30)  # pooling 30
    bags = make_bags(idx, offsets, None, num_embeddings=spec.num_embeddings, mode="sum")
    want = ttrec.tt_embedding_bag([c.double() for c in cores], spec, bags)
    got = ops.forward(cores, spec, bags, "sum")
    torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("p,q,r", [((200, 220, 250), (2, 2, 4), (32, 32)), ((5, 6, 7), (1, 3, 2), (3, 5)),
                                   ((6, 7, 8, 9), (2, 2, 2, 2), (4, 8, 4)), ((30, 40), (4, 4), (16,))])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_pooling_one_bags_take_shortcuts_with_the_pooled_paths_results(p, q, r, mode):
    """Bags of one lookup each (unweighted) skip the pooling pass (the rows go straight to the
    output) and, in the backward, the per-lookup bag numbers and weights. Same values as the
    reference and, bitwise, as the general path (weights of 1.0)."""
    spec = _spec(p, q, r, rows_short=3)
    cores = _cores(spec)
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, spec.num_embeddings, (4000,), generator=g)
    idx[1000:1400] = idx[:400]  # repeated rows: copies of their first row
    direct = make_bags(idx, torch.arange(4000), None, num_embeddings=spec.num_embeddings, mode=mode)
    pooled = make_bags(idx, torch.arange(4000), torch.ones(4000), num_embeddings=spec.num_embeddings, mode="sum")
    got = ops.forward(cores, spec, direct, mode)
    assert torch.equal(got, ops.forward(cores, spec, pooled, "sum"))
    want = ttrec.tt_embedding_bag([c.double() for c in cores], spec, direct, mode)
    torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    # the backward's own shortcut for such bags (no bag numbers or weights): the same core gradients
    grad_out = torch.randn(4000, spec.embedding_dim, generator=g)
    grads = ops.backward(cores, spec, direct, mode, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, ops.backward(cores, spec, pooled, "sum", grad_out)))
    ref_cores = [c.double().requires_grad_() for c in cores]
    want_grads = torch.autograd.grad(ttrec.tt_embedding_bag(ref_cores, spec, direct, mode), ref_cores, grad_out.double())
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a.double(), b, atol=1e-5 * b.abs().max().item(), rtol=1e-4)
    one_empty = make_bags(idx[1:], torch.cat([torch.zeros(1, dtype=torch.int64), torch.arange(3999)]), None,
                          num_embeddings=spec.num_embeddings, mode=mode)  # not all bags of one lookup
    out = ops.forward(cores, spec, one_empty, mode)
    assert torch.equal(out[0], torch.zeros(spec.embedding_dim)) and torch.equal(out[1:], got[1:])
    # as many lookups as bags but not one each (an empty bag, then one of two): the pooled path,
    # though the offsets end where those of bags of one lookup each would
    shifted = make_bags(idx, torch.cat([torch.zeros(2, dtype=torch.int64), torch.arange(2, 4000)]), None,
                        num_embeddings=spec.num_embeddings, mode=mode)
    assert shifted.num_bags == shifted.num_lookups
    out = ops.forward(cores, spec, shifted, mode)
    want_shifted = ttrec.tt_embedding_bag([c.double() for c in cores], spec, shifted, mode)
    torch.testing.assert_close(out.double(), want_shifted, atol=1e-5 * want_shifted.abs().max().item(), rtol=1e-5)
    assert torch.equal(out[0], torch.zeros(spec.embedding_dim)) and torch.equal(out[2:], got[2:])
    grads = ops.backward(cores, spec, shifted, mode, grad_out)
    want_grads = torch.autograd.grad(ttrec.tt_embedding_bag(ref_cores, spec, shifted, mode), ref_cores, grad_out.double())
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a.double(), b, atol=1e-5 * b.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("q,r", [((4, 4, 1), (8, 16)), ((2, 4, 2), (8, 64)), ((1, 4, 4), (16, 32)),
                                 ((1, 2, 8), (4, 16)), ((1, 1, 16), (8, 32)), ((2, 2, 4), (8, 48)),
                                 ((2, 2, 4), (8, 8)), ((2, 2, 4), (4, 17)), ((2, 2, 4), (8, 64)),
                                 ((4, 4, 1), (16, 8)), ((1, 2, 8), (4, 8)), ((2, 4, 2), (3, 8)),
                                 ((1, 1, 16), (8, 8))])
def test_embedding_dim_16_paths(q, r):
    """D = 16: with q_1 q_2 = q_3 = 4 the forward's last step takes the block-broadcast path (R_2 padded
    to 16, 32 or 64), else the dot-product one; with R_2 in {8, 16, 32, 64} the backward takes the
    register path (one per q_d; R_2 = 8 in half vectors), else the general one. Weighted bags of
    repeated rows, against the reference and its autograd."""
    spec = _spec((6, 7, 8), q, r)
    cores = _cores(spec)
    bags = _bags(spec, [1, 4, 0, 2, 3] * 300, 5, "sum", True)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(bags.num_bags, 16, generator=g)
    torch.set_num_threads(2)
    assert_matches_reference(cores, spec, bags, grad_out)


@pytest.mark.parametrize("q2", [1, 2, 3, 4])
def test_fused_sgd_on_buckets_of_few_prefixes_matches_the_reference(q2):
    """300 lookups over p_2 = 60 values of i_2: most buckets hold at most kFewPrefixes (8) prefixes,
    where SGD computes dP_1 and updates G_2's slice in one pass over it (slice_sgd_dp1), R_1 = 16;
    q_2 R_2 = 16, 32, 48, 64 takes each of its vector widths. One fused step on 1 and 2 threads
    moves the cores by -lr x the float64 reference gradient."""
    p, q, r = (30, 60, 10), (2, q2, 2), (16, 16)
    spec = _spec(p, q, r)
    cores = _cores(spec, seed=q2)
    bags = _bags(spec, [1] * 300, q2, "sum", False)
    i2 = torch.unique(bags.indices // p[2]) % p[1]  # (row = (i1 p_2 + i2) p_3 + i3) the bucket of each prefix
    assert (torch.bincount(i2, minlength=p[1]) <= 8).float().mean() > 0.9
    grad_out = torch.randn(bags.num_bags, spec.embedding_dim, generator=torch.Generator().manual_seed(q2))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        assert_fused_sgd_matches_reference(cores, spec, bags, grad_out)


@pytest.mark.parametrize("r", [(16, 8), (32, 16), (32, 32)])
def test_few_prefix_slice_update_has_the_gemm_paths_bits(r):
    """SGD updates the G_2 slice of a bucket of at most kFewPrefixes prefixes in one pass over it and a
    bigger bucket's by the GEMM: the same bits (see assert_few_prefix_update_has_gemm_bits; each vector
    variant: test_native_build)."""
    assert_few_prefix_update_has_gemm_bits(r)


@pytest.mark.parametrize("optimizer", ["adagrad", "sgd"])
def test_buckets_of_more_prefixes_than_a_piece_match_the_reference(optimizer):
    """p_1 = 500, 3 values of i_2 and 12,000 uniform lookups: each i_2 bucket holds about 490
    prefixes, more than a GEMM piece takes (kPiece, 192), so buckets are cut into pieces: forward
    and backward on 1 and 2 threads, then two fused steps through the module (its forward keeps
    the plan; R_2 = 16 takes the backward's 16-float row path). Adagrad is not linear in the
    gradient: a bucket ended early would update its G_2 slice twice per step and differ. SGD adds
    each piece's -lr dG_2 straight into G_2's slice: a later piece's dP_1 read from the updated
    slice instead of the bucket's copy would differ."""
    p, q, r = (500, 3, 5), (2, 2, 4), (16, 16)
    spec = _spec(p, q, r)
    cores = _cores(spec)
    bags = _bags(spec, [1] * 12000, 4, "sum", False)
    g = torch.Generator().manual_seed(2)
    grad_out = torch.randn(bags.num_bags, 16, generator=g)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        assert ops.forward(cores, spec, bags, "sum").shape == (12000, 16)
        assert ops.last_stats()["unique_prefixes"] == torch.unique(bags.indices // 5).numel() > 3 * 192
        assert_matches_reference(cores, spec, bags, grad_out)
    lr = 0.05
    fused = ttrec.TTEmbeddingBag(spec.num_embeddings, 16, r, p, q, backend="cpu", seed=3, optimizer=optimizer,
                                 learning_rate=lr)
    ref = ttrec.TTEmbeddingBag(spec.num_embeddings, 16, r, p, q, backend="torch", seed=3, dtype=torch.float64)
    with torch.no_grad():
        for c_ref, c in zip(ref.tt_cores, fused.tt_cores):
            c_ref.copy_(c.double())
    opt = (torch.optim.Adagrad(ref.parameters(), lr=lr, eps=1e-10) if optimizer == "adagrad"
           else torch.optim.SGD(ref.parameters(), lr=lr))
    for _ in range(2):
        fused(bags.indices, bags.offsets[:-1]).backward(grad_out)
        opt.zero_grad()
        ref(bags.indices, bags.offsets[:-1]).backward(grad_out.double())
        opt.step()
    for c_fused, c_ref in zip(fused.tt_cores, ref.tt_cores):
        torch.testing.assert_close(c_fused.detach().double(), c_ref.detach(), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("p,q,r", [((13, 17, 19), (2, 2, 4), (16, 16)), ((30, 40), (4, 4), (8,)),
                                   ((6, 7, 8, 9), (2, 2, 2, 2), (4, 8, 4))])
def test_results_do_not_depend_on_thread_count_or_chunking(p, q, r):
    """36,000 lookups: the sort, the run search and the pieces are split between threads (slices
    of at least 8,192 lookups), and the results match the reference and each other bitwise."""
    spec = _spec(p, q, r)
    cores = _cores(spec)
    bags = _bags(spec, [3, 0, 50, 7] * 600, 3, "sum", True)
    grad_out = torch.randn(bags.num_bags, spec.embedding_dim)
    outs, grads = [], []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        outs.append(ops.forward(cores, spec, bags, "sum"))
        grads.append(ops.backward(cores, spec, bags, "sum", grad_out))
    want = ttrec.tt_embedding_bag([c.double() for c in cores], spec, bags, "sum")
    torch.testing.assert_close(outs[0].double(), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    outs.append(ops.forward(cores, spec, bags, "sum", chunk_bytes=1))  # the smallest chunk: 1024 lookups
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    for g in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(g, grads[0]))
    chunked = ops.backward(cores, spec, bags, "sum", grad_out, chunk_bytes=1)
    for a, b in zip(chunked, grads[0]):  # chunks change the summation order only
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
    ref_cores = [c.double().requires_grad_() for c in cores]
    want_grads = torch.autograd.grad(ttrec.tt_embedding_bag(ref_cores, spec, bags, "sum"), ref_cores,
                                     grad_out.double())
    for a, b in zip(grads[0], want_grads):
        torch.testing.assert_close(a.double(), b, atol=1e-5 * b.abs().max().item(), rtol=1e-4)


@pytest.fixture
def _sort_way_timing_again():
    yield
    ops.force_sort_way("timing")


# whole keys of 13, 17, 11, 7 and 13 bits (the backward; the split way makes 1 + 2, 1 + 3, 1 + 2,
# 1 + 1 and 1 + 2 passes); the forwards sort on i_2 alone for d = 3 (5 and 6 bits: 1 + 1) and on the
# prefix otherwise (5, 3 and 9 bits: 1 + 1, 1 + 1, 1 + 2)
@pytest.mark.parametrize("p,q,r", [((13, 17, 19), (2, 2, 4), (16, 16)), ((40, 50, 60), (2, 2, 4), (32, 32)),
                                   ((30, 40), (4, 4), (8,)), ((8, 16), (4, 4), (8,)),
                                   ((6, 7, 8, 9), (2, 2, 2, 2), (4, 8, 4))])
@pytest.mark.parametrize("batch", ["uniform", "skewed", "one_row"])
def test_both_sort_ways_give_the_same_bits_as_one_thread(p, q, r, batch, _sort_way_timing_again):
    """With 2 or 3 threads the kernel sorts either over the whole batch ("shared") or in one part per
    thread ("split", parts cut at top-digit boundaries). 20,000 lookups, uniform, skewed (a third on
    one row, so one part's top digit holds far more than its share) or all on one row (every part but
    one empty): forward, core gradients and prefix counts equal one thread's bitwise, and the
    reference."""
    spec = _spec(p, q, r)
    cores = _cores(spec)
    g = torch.Generator().manual_seed(5)
    n = 20000
    idx = torch.randint(0, spec.num_embeddings, (n,), generator=g)
    if batch == "skewed":
        idx[torch.randperm(n, generator=g)[: n // 3]] = spec.num_embeddings // 2
    elif batch == "one_row":
        idx.fill_(spec.num_embeddings - 1)
    bags = make_bags(idx, torch.arange(0, n, 2), None, num_embeddings=spec.num_embeddings, mode="sum")
    grad_out = torch.randn(bags.num_bags, spec.embedding_dim, generator=g)
    torch.set_num_threads(1)
    want_out = ops.forward(cores, spec, bags, "sum")
    want_prefixes = ops.last_stats()["unique_prefixes"]
    want_grads = ops.backward(cores, spec, bags, "sum", grad_out)
    ref = ttrec.tt_embedding_bag([c.double() for c in cores], spec, bags, "sum")
    torch.testing.assert_close(want_out.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)
    for way in ("shared", "split"):
        ops.force_sort_way(way)
        for threads in (2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(ops.forward(cores, spec, bags, "sum"), want_out), (way, threads)
            assert ops.last_sort_way() == way and ops.last_stats()["unique_prefixes"] == want_prefixes
            got = ops.backward(cores, spec, bags, "sum", grad_out)
            assert ops.last_sort_way() == way and ops.last_stats("backward")["unique_prefixes"] == want_prefixes
            assert all(torch.equal(a, b) for a, b in zip(got, want_grads)), (way, threads)


@pytest.mark.parametrize("n", [2048, 20000, 40000])  # 2, 4 and 8 backward segments (bucket_segments)
def test_bucket_shares_and_segments_give_the_same_bits_for_any_thread_count(n):
    """Each thread takes a fixed share of the i2 buckets (bucket_share) in the forward and the backward,
    and the backward's segments, whose count follows the batch alone, fix the order of the dG_1 and
    dG_3 sums: forward, core gradients and one fused SGD step equal one thread's bitwise with 2 and 3
    threads (3 threads' shares do not fall on segment cuts); at 40,000 lookups the gradients also match
    the float64 reference."""
    spec = _spec((40, 50, 60), (2, 2, 4), (32, 32))
    cores = _cores(spec)
    g = torch.Generator().manual_seed(11)
    idx = torch.randint(0, spec.num_embeddings, (n,), generator=g)
    bags = make_bags(idx, torch.arange(n), None, num_embeddings=spec.num_embeddings, mode="sum")
    grad_out = torch.randn(bags.num_bags, spec.embedding_dim, generator=g)

    def run():
        out = ops.forward(cores, spec, bags, "sum")
        grads = ops.backward(cores, spec, bags, "sum", grad_out)
        new = [c.clone() for c in cores]
        ops.sparse_update(new, spec, bags, "sum", grad_out, "sgd", 0.1, 0.0, [torch.zeros_like(c) for c in cores], None)
        return out, grads, new

    torch.set_num_threads(1)
    want = run()
    if n == 40000:
        assert_matches_reference(cores, spec, bags, grad_out)
    for threads in (2, 3):
        torch.set_num_threads(threads)
        got = run()
        assert torch.equal(got[0], want[0]), threads
        assert all(torch.equal(a, b) for a, b in zip(got[1], want[1])), threads
        assert all(torch.equal(a, b) for a, b in zip(got[2], want[2])), threads


def test_the_sort_way_is_timed_per_key_width_then_kept(_sort_way_timing_again):
    """The first 4 sorts of a key width of more than 8 bits with 2+ threads and 16,384+ lookups run
    both ways; smaller or one-thread sorts run "shared" and do not count, and widths of up to 8 bits
    (one shared pass over at most 256 buckets) are sorted "shared" untimed."""
    wide, narrow = _spec((40, 500, 60), (2, 2, 4), (8, 8)), _spec((600, 40), (4, 4), (8,))  # forwards: 9 (i_2) and 10 bits
    one_pass = _spec((40, 50, 60), (2, 2, 4), (8, 8))  # 6 bits of i_2
    batches = {}
    for spec in (wide, narrow, one_pass):
        for n in (16384, 16000):
            idx = torch.randint(0, spec.num_embeddings, (n,))
            batches[spec, n] = make_bags(idx, torch.arange(n), None, num_embeddings=spec.num_embeddings, mode="sum")
    cores = {spec: _cores(spec) for spec in (wide, narrow, one_pass)}

    def sort(spec, n):
        ops.forward(cores[spec], spec, batches[spec, n], "sum")

    ops.force_sort_way("timing")
    torch.set_num_threads(2)
    sort(one_pass, 16384)
    assert ops.sort_way() == "shared" and ops.last_sort_way() == "shared"
    sort(wide, 16384)
    assert ops.sort_way() == "timing"
    ops.force_sort_way("timing")
    torch.set_num_threads(1)
    for _ in range(6):
        sort(wide, 16384)
        assert ops.last_sort_way() == "shared"
    torch.set_num_threads(2)
    for _ in range(3):
        sort(wide, 16384)
        sort(wide, 16000)  # too small: not timed, "shared"
        assert ops.last_sort_way() == "shared"
    assert ops.sort_way() == "timing"  # 3 timed sorts of the wide width
    sort(narrow, 16384)  # another width: timed on its own
    assert ops.sort_way() == "timing"
    sort(wide, 16384)  # the wide width's 4th timed sort decides it
    decided = ops.sort_way()
    assert decided in ("shared", "split")
    sort(wide, 16384)
    assert ops.last_sort_way() == decided
    with pytest.raises(ValueError, match="way: got 'fast'; allowed"):
        ops.force_sort_way("fast")


@pytest.mark.parametrize("p,d3", [((40, 50, 60), True), ((30, 40, 5, 6), False)])
def test_forward_phase_timers_nest(p, d3):
    """The profile's parts lie within their phases: the radix sort within the sort phase, the chains'
    and the last core's per-thread means within the chains-and-last-core phase (d = 3, profile on)."""
    q = (2, 2, 4) if len(p) == 3 else (2, 2, 2, 2)
    spec = _spec(p, q, (8,) * (len(p) - 1))
    idx = torch.randint(0, spec.num_embeddings, (20000,), generator=torch.Generator().manual_seed(1))
    bags = make_bags(idx, torch.arange(20000), None, num_embeddings=spec.num_embeddings, mode="sum")
    torch.set_num_threads(2)
    ops.forward(_cores(spec), spec, bags, "sum")
    assert ops.last_stats()["seconds_chains"] == 0 == ops.last_stats()["seconds_last_core"]  # profile off
    ops.set_profile(True)
    try:
        ops.forward(_cores(spec), spec, bags, "sum")
    finally:
        ops.set_profile(False)
    st = ops.last_stats()
    assert 0 < st["seconds_sort_radix"] <= st["seconds_sort"]
    if d3:
        assert st["seconds_chains"] > 0 and st["seconds_last_core"] > 0
        assert st["seconds_chains"] + st["seconds_last_core"] <= st["seconds_chains_and_last_core"]
    else:
        assert st["seconds_chains"] == 0 and st["seconds_last_core"] == 0


@pytest.mark.parametrize("q,threads", [((2, 2, 4), 1), ((2, 2, 4), 2), ((2, 2, 2), 2)])
def test_backward_bucket_parts_nest_in_their_phase(q, threads):
    """d = 3 backward with the profile on: its three timed parts of the i2 buckets (the upstream gradient
    rows' gather, the per-row products, the chain GEMMs; per thread, the mean over the threads) each read
    time and together lie within the buckets' phase; the gather only for 16-float rows (the only rows it
    runs for); with the profile off they read 0 and the phase still runs."""
    spec = _spec((40, 50, 60), q, (8, 16))
    cores = _cores(spec)
    idx = torch.randint(0, spec.num_embeddings, (20000,), generator=torch.Generator().manual_seed(2))
    bags = make_bags(idx, torch.arange(20000), None, num_embeddings=spec.num_embeddings, mode="sum")
    grad = torch.randn(20000, spec.embedding_dim, generator=torch.Generator().manual_seed(3))
    torch.set_num_threads(threads)
    parts = ("seconds_buckets_gather", "seconds_buckets_rows", "seconds_buckets_gemms")
    ops.backward(cores, spec, bags, "sum", grad)
    st = ops.last_stats("backward")
    assert st["seconds_i2_buckets"] > 0 and all(st[k] == 0 for k in parts)  # profile off
    ops.set_profile(True)
    try:
        ops.backward(cores, spec, bags, "sum", grad)
    finally:
        ops.set_profile(False)
    st = ops.last_stats("backward")
    assert st["seconds_buckets_rows"] > 0 and st["seconds_buckets_gemms"] > 0
    assert (st["seconds_buckets_gather"] > 0) == (spec.embedding_dim == 16)
    assert sum(st[k] for k in parts) <= st["seconds_i2_buckets"]


def test_unique_prefix_count_is_the_closed_form_count_and_the_runs_are_right():
    spec = _spec((40, 50, 60), (2, 2, 4), (8, 8))
    cores = _cores(spec)
    idx = torch.randint(0, spec.num_embeddings, (40000,))  # runs found by several threads
    bags = make_bags(idx, torch.arange(40000), None, num_embeddings=spec.num_embeddings, mode="sum")
    torch.set_num_threads(3)
    out = ops.forward(cores, spec, bags, "sum")
    stats = ops.last_stats()
    assert stats["chunks"] == 1 and stats["lookups"] == 40000
    assert stats["unique_prefixes"] == torch.unique(idx // 60).numel()
    # and the runs' starts, found in slices by several threads (8 at a time with AVX-512), are right
    want = ttrec.tt_embedding_bag([c.double() for c in cores], spec, bags, "sum")
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


# d = 3 without a kept plan: lookups bucketed by i_2, prefixes found per bucket (the bucketed forward),
# except where the packed key would pass 40 bits or p_1 passes 65,536 (kMaxFront): there the plan's sort
# on the prefix bits and its runs. Shapes: 11 + 11 + 19 packed bits (41; unpacked 21 + 19 = 40); p_1 =
# 70,000; p_2 = 1 (one bucket, no i_2 bits); R = 8 with D = 16 (P zero-padded to 16 lanes per prefix);
# p_1 = 65,536 (the most the bucketed forward takes); p_2 = 400,000 (most i_2 buckets empty).
@pytest.mark.parametrize("p,q,r", [((1025, 1025, 2**19), (1, 2, 2), (2, 2)), ((70_000, 3, 5), (2, 2, 4), (8, 8)),
                                   ((7, 1, 9), (2, 2, 4), (8, 16)), ((300, 2, 7), (2, 2, 4), (8, 8)),
                                   ((300, 40, 7), (2, 2, 4), (32, 32)), ((65_536, 2, 3), (2, 2, 4), (8, 8)),
                                   ((3, 400_000, 5), (4, 1, 4), (2, 2))])
def test_forwards_without_a_plan_match_the_reference_on_either_path(p, q, r):
    """20,000 lookups (uniform, a quarter of them repeats of earlier ones) on 1, 2 and 3 threads:
    the forward equals the float64 reference per row, bitwise across thread counts, and its prefix
    count is the number of distinct prefixes."""
    spec = _spec(p, q, r)
    cores = _cores(spec)
    g = torch.Generator().manual_seed(4)
    n = 20000
    idx = torch.randint(0, spec.num_embeddings, (n,), generator=g)
    idx[torch.randperm(n, generator=g)[: n // 4]] = idx[torch.randint(0, n, (n // 4,), generator=g)]
    bags = make_bags(idx, torch.arange(n), None, num_embeddings=spec.num_embeddings, mode="sum")
    want = ttrec.tt_rows([c.double() for c in cores], spec, idx)
    outs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        outs.append(ops.forward(cores, spec, bags, "sum"))
        assert ops.last_stats()["unique_prefixes"] == torch.unique(idx // p[2]).numel(), threads
    torch.testing.assert_close(outs[0].double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


# The D = 16, M = q_d = 4 last step (row44) of a d = 3 forward. Without a kept plan, q_1 <= 2 and
# R % 4 == 0 it runs flat: P from a chain on a column-permuted G_2 slice (q_1 = 1: one row per
# prefix, q_1 = 2: two), rows in one loop per bucket, the bucket's lookups grouped by piece when it
# holds more than kPiece = 192 prefixes (p_1 = 900 and 20,000 lookups in 5 buckets); otherwise (q_1 =
# 4, R % 4 != 0) each row gathers its vectors from P's four rows, as a forward that keeps its plan
# does. R = 8, 16, 32, 64 run unrolled, 20 and 36 at run time, 6 from P zero-padded to 16. 600 lookups
# stay in cache, 20,000 are streamed out.
@pytest.mark.parametrize("q", [(1, 4, 4), (2, 2, 4), (4, 1, 4)])
@pytest.mark.parametrize("R", [6, 8, 16, 20, 32, 36, 64])
def test_row44_forwards_equal_bitwise_with_and_without_a_kept_plan(q, R):
    spec = _spec((900, 5, 11), q, (12, R))
    cores = _cores(spec, seed=R)
    g = torch.Generator().manual_seed(R)
    torch.set_num_threads(2)
    for n in (600, 20000):
        idx = torch.randint(0, spec.num_embeddings, (n,), generator=g)
        idx[torch.randperm(n, generator=g)[: n // 4]] = idx[torch.randint(0, n, (n // 4,), generator=g)]
        bags = make_bags(idx, torch.arange(n), None, num_embeddings=spec.num_embeddings, mode="sum")
        leaves = [c.clone().requires_grad_() for c in cores]
        live = ops.live_saved_forwards()
        kept = ops.tt_bag_cpu(leaves, spec, bags, "sum")
        assert ops.live_saved_forwards() == live + 1  # this one kept its plan
        out = ops.forward(cores, spec, bags, "sum")
        assert torch.equal(out, kept.detach()), (n, q, R)
        assert ops.last_stats()["unique_prefixes"] == torch.unique(idx // 11).numel()
        want = ttrec.tt_rows([c.double() for c in cores], spec, idx)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
        del kept  # (its plan)


def test_every_row_of_a_table_whose_digits_need_the_quotient_correction():
    """Row -> digits divides by p_3 and p_2 through a floating-point reciprocal (4 lanes at a time
    on AVX2), then corrects the quotient by its remainder: for p = 49, floor(k * 49 * (1 / 49.0))
    is k - 1 for about half of all k. Every row of a (5, 49, 49) table, shuffled, each against its
    float64 reference row."""
    spec = _spec((5, 49, 49), (1, 2, 2), (3, 4))
    cores = _cores(spec)
    idx = torch.randperm(spec.num_embeddings, generator=torch.Generator().manual_seed(4))
    bags = make_bags(idx, torch.arange(idx.numel()), None, num_embeddings=spec.num_embeddings, mode="sum")
    torch.set_num_threads(2)
    want = ttrec.tt_rows([c.double() for c in cores], spec, idx)
    torch.testing.assert_close(ops.forward(cores, spec, bags, "sum").double(), want, rtol=1e-5, atol=1e-6)


def test_int32_indices_and_2d_input_through_the_module():
    m = ttrec.TTEmbeddingBag(1000, 16, 8, backend="cpu", seed=0)
    ref = ttrec.TTEmbeddingBag(1000, 16, 8, backend="torch", seed=0)
    x = torch.randint(0, 1000, (6, 5), dtype=torch.int32)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-7)
    assert m.resolved_backend() == "cpu" and ttrec.TTEmbeddingBag(1000, 16, 8).resolved_backend() == "cpu"


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
@pytest.mark.parametrize("p", [(12, 9, 11), (1100, 3), (3, 1500)])
def test_fused_update_equals_torch_optimizer_and_touches_only_looked_up_slices(optimizer, p):
    q = (2, 2, 4)[: len(p)] if len(p) == 3 else (4, 4)
    r = (6,) * (len(p) - 1)
    spec = _spec(p, q, r)
    lr = 0.05
    fused = ttrec.TTEmbeddingBag(spec.num_embeddings, spec.embedding_dim, r, p, q, backend="cpu", seed=0,
                                 optimizer=optimizer, learning_rate=lr)
    ref = ttrec.TTEmbeddingBag(spec.num_embeddings, spec.embedding_dim, r, p, q, backend="torch", seed=0,
                               dtype=torch.float64)
    with torch.no_grad():  # the same starting values, exactly
        for c_ref, c in zip(ref.tt_cores, fused.tt_cores):
            c_ref.copy_(c.double())
    opt = (torch.optim.SGD(ref.parameters(), lr=lr) if optimizer == "sgd"
           else torch.optim.Adagrad(ref.parameters(), lr=lr, eps=1e-10))
    before = [c.detach().clone() for c in fused.tt_cores]
    g = torch.Generator().manual_seed(5)
    for _ in range(2):  # two steps: Adagrad's state must carry over
        # rows with the high digits of p_k (> 1024) included, so a launch that skips rows would show
        idx = torch.cat([torch.randint(0, spec.num_embeddings, (40,), generator=g),
                         torch.tensor([spec.num_embeddings - 1, spec.num_embeddings - 2])])
        offsets = torch.tensor([0, 10, 10, 30])
        grad_out = torch.randn(4, spec.embedding_dim, generator=g, dtype=torch.float64)
        fused(idx, offsets).backward(grad_out.float())
        opt.zero_grad()
        ref(idx, offsets).backward(grad_out)
        opt.step()
        assert all(c.grad is None for c in fused.tt_cores)
    for k, (c_fused, c_ref, c0) in enumerate(zip(fused.tt_cores, ref.tt_cores, before)):
        torch.testing.assert_close(c_fused.detach().double(), c_ref.detach(), rtol=2e-4, atol=1e-6)
        changed = (c_fused.detach() != c0).flatten(2).any(-1).any(0)  # per digit value of core k
        # a digit's slice changes iff some lookup used it (exact set, computed from the reference)
        used = (c_ref.detach() != c0.double()).flatten(2).any(-1).any(0)
        assert torch.equal(changed, used), f"core {k}: touched slices differ"
        assert changed.any()
        assert changed[-1] or p[k] < 3  # the last digit value of a large p_k is updated too


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
@pytest.mark.parametrize("chunked", [False, True])
def test_fused_update_in_the_backward_and_as_a_scratch_pass_match_torch(optimizer, chunked, monkeypatch):
    """d = 3: a batch in one chunk is updated inside the backward (no gradient scratch written); a
    batch split into chunks (tiny chunk budget) gets its gradients in the scratch and a separate
    update pass. Both must equal torch's optimizer on float64 and leave the scratch zero."""
    if chunked:
        monkeypatch.setattr(ops, "DEFAULT_CHUNK_BYTES", 1)  # the backward's chunks: 1,024 lookups
    g = torch.Generator().manual_seed(9)
    idx = torch.randint(0, 15000, (2600,), generator=g)  # > 2 chunks of 1,024 when chunked
    offsets = torch.arange(0, 2600, 2)
    grad_out = torch.randn(1300, 16, generator=g, dtype=torch.float64)
    fused = assert_fused_module_steps_match_torch(optimizer, idx, offsets, grad_out)
    assert ops.last_stats("backward")["chunks"] == (3 if chunked else 1)
    assert all(not s.any() for s in fused._scratch)


def test_kernel_refuses_an_optimizer_step_without_its_masks_or_state():
    """The native backward's own guard (ops.sparse_update always passes them): a code, not a crash."""
    spec = _spec((6, 7, 8), (2, 2, 4), (4, 4))
    cores = _cores(spec)
    bags = make_bags(torch.tensor([0, 5, 300]), torch.tensor([0, 1]), None, num_embeddings=spec.num_embeddings,
                     mode="sum")
    scratch = [torch.zeros_like(c) for c in cores]
    before = [c.clone() for c in cores]
    with pytest.raises(RuntimeError, match="code 2"):  # SGD without touched masks
        ops._backward(cores, spec, bags, "sum", torch.ones(2, 16), scratch, None, ops.DEFAULT_CHUNK_BYTES, None,
                      "sgd", 0.1)
    touched = [torch.zeros(p, dtype=torch.uint8) for p in spec.tt_p_shapes]
    with pytest.raises(RuntimeError, match="code 2"):  # Adagrad without accumulators
        ops._backward(cores, spec, bags, "sum", torch.ones(2, 16), scratch, touched, ops.DEFAULT_CHUNK_BYTES, None,
                      "adagrad", 0.1, 1e-10)
    assert all(torch.equal(a, b) for a, b in zip(cores, before)) and not any(s.any() for s in scratch)


def test_fused_update_leaves_untouched_slices_bitwise_unchanged():
    p, q, r = (1200, 5), (4, 4), (8,)
    m = ttrec.TTEmbeddingBag(6000, 16, r, p, q, backend="cpu", seed=0, optimizer="adagrad", learning_rate=0.1)
    before = [c.detach().clone() for c in m.tt_cores]
    idx = torch.tensor([0, 5, 5999, 3000])  # digits i1 in {0, 1, 1199, 600}; i2 in {0, 4}
    m(idx, torch.tensor([0, 2])).sum().backward()
    c0, c1 = m.tt_cores[0].detach(), m.tt_cores[1].detach()
    changed0 = (c0 != before[0]).flatten(2).any(-1).any(0).nonzero().flatten().tolist()
    changed1 = (c1 != before[1]).flatten(2).any(-1).any(0).nonzero().flatten().tolist()
    assert changed0 == [0, 1, 600, 1199]
    assert changed1 == [0, 4]


BAD_INPUTS = [
    (torch.tensor([0, -1]), torch.tensor([0]), None, "index -1"),
    (torch.tensor([0, 1000]), torch.tensor([0]), None, "index 1000"),
    (torch.tensor([0, 1, 2]), torch.tensor([0, 2, 1]), None, "non-decreasing"),
    (torch.tensor([0, 1]), torch.tensor([0]), torch.ones(3), "shape"),
    (torch.tensor([0.0, 1.0]), torch.tensor([0]), None, "dtype"),
]


@pytest.mark.parametrize("inp,offsets,weights,needle", BAD_INPUTS)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_bad_inputs_raise_the_same_clear_errors_as_the_reference(backend, inp, offsets, weights, needle):
    m = ttrec.TTEmbeddingBag(1000, 16, 4, backend=backend, seed=0)
    with pytest.raises((ValueError, TypeError), match=needle):
        m(inp, offsets, weights)


def test_unsupported_cores_are_refused_before_native_code():
    with pytest.raises(ValueError, match="float64"):  # refused when the module is built
        ttrec.TTEmbeddingBag(1000, 16, 4, backend="cpu", dtype=torch.float64)
    spec = _spec((10, 10, 10), (2, 2, 4), (4, 4))
    bags = make_bags(torch.tensor([1, 2]), torch.tensor([0]), None, num_embeddings=1000, mode="sum")
    with pytest.raises(ValueError, match="float64"):  # and by the op itself
        ops.forward(_cores(spec, dtype=torch.float64), spec, bags, "sum")
    with pytest.raises(ValueError, match="got 2 cores; the spec has d=3"):  # a missing core pointer
        ops.forward(_cores(spec)[:2], spec, bags, "sum")
    cores = _cores(spec)
    cores[1] = cores[1].transpose(0, 3).contiguous().transpose(0, 3)  # right shape, not contiguous
    with pytest.raises(ValueError, match=r"cores\[1\]: got a non-contiguous"):  # written in place by the update
        ops.sparse_update(cores, spec, bags, "sum", torch.ones(1, 16), "sgd", 0.1, 0.0,
                          [torch.zeros_like(c) for c in _cores(spec)], None)
    scratch, state = [torch.zeros_like(c) for c in _cores(spec)], [torch.zeros_like(c) for c in _cores(spec)]
    for lr, eps, needle in ((0.1, 0.0, "eps: got 0.0"), (0.1, 1e-50, "eps: got 1e-50"), (0.0, 1e-10, "lr: got 0.0")):
        with pytest.raises(ValueError, match=needle):  # checked before the kernel: eps 0 wrote NaN into the cores
            ops.sparse_update(_cores(spec), spec, bags, "sum", torch.ones(1, 16), "adagrad", lr, eps, scratch, state)
    assert ttrec.TTEmbeddingBag(1000, 16, 4, dtype=torch.float64).resolved_backend() == "torch"
    m = ttrec.TTEmbeddingBag(1000, 16, 4, backend="cpu")
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(NotImplementedError, match="per_sample_weights"):
        m(torch.tensor([1, 2]), torch.tensor([0]), w)
    with pytest.raises(ValueError, match="optimizer"):
        ttrec.TTEmbeddingBag(1000, 16, 4, backend="torch", optimizer="sgd")


def test_int64_indices_above_2_to_the_31():
    spec = ttrec.TTSpec(2048 * 2048 * 1024, 4, (2048, 2048, 1024), (1, 2, 2), (2, 2))
    cores = _cores(spec)
    idx = torch.tensor([2**31 + 5, 2**32 - 12345, spec.num_embeddings - 1, 7, 2**31 - 1])
    bags = make_bags(idx, torch.tensor([0, 2, 2]), None, num_embeddings=spec.num_embeddings, mode="sum")
    rows = ttrec.tt_rows([c.double() for c in cores], spec, idx)  # per-row float64 reference, no dense table
    want = torch.stack([rows[0:2].sum(0), torch.zeros(4, dtype=torch.float64), rows[2:].sum(0)])
    got = ops.forward(cores, spec, bags, "sum")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    grads = ops.backward(cores, spec, bags, "sum", torch.ones(3, 4))
    ref_cores = [c.double().requires_grad_() for c in cores]
    ref = ttrec.tt_embedding_bag(ref_cores, spec, bags)
    want_grads = torch.autograd.grad(ref, ref_cores, torch.ones(3, 4, dtype=torch.float64))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("p", [(200, 220, 250), (6007, 7919, 9973), (8192, 8192, 16384), (3, 5, 7),
                               (786433, 700001), (1024, 1 << 20), (509, 521, 523, 1021), (61, 67, 71, 73)])
def test_sort_keys_at_digit_boundaries(p):
    """The sort keys are computed 4 (AVX2) or 8 (AVX-512) lookups at a time with floating-point
    quotients (by the reciprocal rounded up, exact without a correction): lookups on both sides of many
    digit boundaries (multiples of each trailing product p_k ... p_d), with d = 2, 3 and 4 and keys of
    up to 40 bits, give the rows of a per-row float64 reference. (The reciprocal rounded to nearest
    instead crashes the d = 2 case, with AVX2 and with AVX-512: a digit one past its range.)"""
    d = len(p)
    spec = ttrec.TTSpec(math.prod(p), 4, p, (1,) * (d - 2) + (2, 2), (2,) * (d - 1))
    cores = _cores(spec)
    n = spec.num_embeddings
    g = torch.Generator().manual_seed(3)
    trailing = [math.prod(p[k:]) for k in range(1, d)]
    multiples = [m * k for m in trailing for k in torch.randint(1, n // m, (300,), generator=g).tolist()]
    idx = torch.tensor([0, n - 1] + [x + dx for x in multiples for dx in (-1, 0, 1) if 0 <= x + dx < n])
    bags = make_bags(idx, torch.arange(idx.numel()), None, num_embeddings=n, mode="sum")
    want = ttrec.tt_rows([c.double() for c in cores], spec, idx)
    torch.testing.assert_close(ops.forward(cores, spec, bags, "sum").double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bags,mode,needle", [
    (lambda: Bags(torch.tensor([0, 10**12]), torch.tensor([0, 2]), None), "sum", "index 1000000000000"),
    (lambda: Bags(torch.tensor([0, 1, 2]), torch.tensor([0, 5]), None), "sum", "last offset 5"),
    (lambda: Bags(torch.tensor([0, 1]), torch.tensor([0, 2]), torch.ones(3)), "sum", "per_sample_weights"),
    (lambda: Bags(torch.tensor([0, 1]), torch.tensor([0, 2]), None), "max", "mode"),
])
def test_hand_made_bags_are_validated_before_native_code(bags, mode, needle):
    spec = _spec((10, 10, 10), (2, 2, 4), (4, 4))
    with pytest.raises(ValueError, match=needle):
        ops.forward(_cores(spec), spec, bags(), mode)


def test_gradient_buffers_are_checked_before_native_code():
    spec = _spec((10, 10, 10), (2, 2, 4), (4, 4))
    bags = make_bags(torch.tensor([1, 2]), torch.tensor([0]), None, num_embeddings=spec.num_embeddings, mode="sum")
    with pytest.raises(ValueError, match=r"grads\[0\]"):
        ops.backward(_cores(spec), spec, bags, "sum", torch.ones(1, 16), grads=[torch.zeros(1)] * 3)
    with pytest.raises(ValueError, match=r"touched\[1\]"):
        ops.backward(_cores(spec), spec, bags, "sum", torch.ones(1, 16),
                     touched=[torch.zeros(10, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8),
                              torch.zeros(10, dtype=torch.uint8)])


def test_scratch_memory_follows_the_batch_not_p_k():
    """A last core with 200,000 slices and a batch touching a handful: correct, and no per-call copy
    of whole cores (that took seconds and gigabytes before)."""
    spec = _spec((3, 200_000), (4, 4), (8,))
    cores = [c.requires_grad_() for c in _cores(spec)]
    idx = torch.tensor([5, 199_999, 400_123, 599_999, 5])
    bags = make_bags(idx, torch.tensor([0, 2, 2]), None, num_embeddings=spec.num_embeddings, mode="sum")
    ref_cores = [c.detach().double().requires_grad_() for c in cores]
    want = ttrec.tt_embedding_bag(ref_cores, spec, bags)
    got = ops.tt_bag_cpu(cores, spec, bags)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-9)
    g = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # (atol on the gradient's scale, as in native_reference: an element summed to near zero in
    # fp32 cannot meet a relative bound; with atol=1e-9 an unseeded g failed 1 call in about 50)
    for a, b in zip(torch.autograd.grad(got, cores, g.float()), torch.autograd.grad(want, ref_cores, g)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_planted_slowdown_repeats_the_same_work_and_checks_its_value(monkeypatch):
    """TTREC_PLANT_SLOWDOWN=N (for testing a performance gate) repeats the forward N times: the
    result must not change, and a bad value is a clear error, not a silent default."""
    spec = _spec((10, 10, 10), (2, 2, 4), (4, 4))
    cores = _cores(spec)
    bags = _bags(spec, [3, 0, 5], 7, "sum", True)
    plain = ops.forward(cores, spec, bags, "sum")
    monkeypatch.setenv("TTREC_PLANT_SLOWDOWN", "3")
    assert torch.equal(ops.forward(cores, spec, bags, "sum"), plain)
    for bad in ("0", "x"):
        monkeypatch.setenv("TTREC_PLANT_SLOWDOWN", bad)
        with pytest.raises(ValueError, match="TTREC_PLANT_SLOWDOWN"):
            ops.forward(cores, spec, bags, "sum")


def test_small_batches_run_on_one_thread(monkeypatch):
    """In use (MIN_LOOKUPS_PER_THREAD as shipped, not this module's fixture's 1) a native call takes one
    thread per 4,096 lookups at most, and never more than torch allows."""
    monkeypatch.setattr(ops, "MIN_LOOKUPS_PER_THREAD", 4096)
    torch.set_num_threads(2)
    assert [ops.threads_for(n) for n in (0, 64, 4095, 4096, 65536)] == [1, 1, 1, 2, 2]
    torch.set_num_threads(1)
    assert ops.threads_for(65536) == 1


# A plan's whole-key sort (a forward that keeps its plan, a backward without one) runs in two levels from
# kTwoLevelFrom = 32,768 lookups (plan.h): one pass on i2, then each i2 bucket sorted on i1 and i3 where it
# is (insertion sort up to 32 entries, else LSD passes of up to 8 bits); i2 over 12 bits keeps one level.
@pytest.mark.parametrize("p", [(40, 50, 60), (7, 300, 13), (300, 5, 200), (3, 4000, 5), (2, 5000, 3)])
@pytest.mark.parametrize("batch", ["uniform", "hot"])
def test_plans_of_32768_lookups_and_more_find_every_prefix_once(p, batch):
    """40,000 lookups: the forward that keeps its plan and the backward without one count exactly the
    distinct prefixes (a prefix split over two runs would be counted twice, and its gradient still sum
    right), give the same bits on 1, 2 and 3 threads and through autograd, and match the float64
    reference. "hot": half the lookups on 20 rows (long buckets, long runs of repeats). Uniform, the
    buckets hold about 800, 130, 8,000, 10 (insertion sort) and 8 lookups; (300, 5, 200): 17 low bits,
    three local passes; (2, 5000, 3): 13 bits of i2, one level."""
    spec = _spec(p, (2, 2, 4), (8, 8))
    cores = _cores(spec)
    g = torch.Generator().manual_seed(8)
    n = 40000
    idx = torch.randint(0, spec.num_embeddings, (n,), generator=g)
    if batch == "hot":
        hot = torch.randint(0, spec.num_embeddings, (20,), generator=g)
        idx[torch.randperm(n, generator=g)[: n // 2]] = hot[torch.randint(0, 20, (n // 2,), generator=g)]
    bags = make_bags(idx, torch.arange(0, n, 2), None, num_embeddings=spec.num_embeddings, mode="sum")
    grad_out = torch.randn(bags.num_bags, spec.embedding_dim, generator=g)
    distinct = torch.unique(idx // p[2]).numel()
    runs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        out, saved = ops._forward(cores, spec, bags, "sum", keep=True)
        assert saved is not None and ops.last_stats()["unique_prefixes"] == distinct, threads
        saved.release()
        grads = ops.backward(cores, spec, bags, "sum", grad_out)
        assert ops.last_stats("backward")["unique_prefixes"] == distinct, threads
        leaves = [c.clone().requires_grad_() for c in cores]
        ops.tt_bag_cpu(leaves, spec, bags, "sum").backward(grad_out)
        assert all(torch.equal(a.grad, b) for a, b in zip(leaves, grads)), threads
        runs.append((out, grads))
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0]) and all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))
    assert_matches_reference(cores, spec, bags, grad_out)


def _forward_in_forked_child(module, idx, off, conn):
    torch.set_num_threads(1)  # (as DataLoader workers do: GNU OpenMP's 2-thread teams hang after a fork)
    with torch.no_grad():
        conn.send(module(idx, off).numpy().tobytes())  # (bytes: no shared-memory handles across the fork)
    conn.close()


def test_a_forked_child_on_one_thread_gets_the_parents_bits():
    """After the parent ran the kernel with 2 threads, a forked child that sets 1 thread (as DataLoader
    workers do) computes the same forward, bitwise; it must finish, not hang (30 s bound)."""
    import multiprocessing as mp
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork start method on this platform")
    module = ttrec.TTEmbeddingBag(1_000_000, 16, tt_ranks=16, backend="cpu", seed=0)
    idx = torch.randint(0, 1_000_000, (20_000,), generator=torch.Generator().manual_seed(1))
    off = torch.arange(20_000)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            want = module(idx, off)  # 2 threads: the child's OpenMP state comes from here
    finally:
        torch.set_num_threads(threads)
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_forward_in_forked_child, args=(module, idx, off, child))
    proc.start()
    got = parent.recv() if parent.poll(30) else None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
    assert got is not None, "the forked child did not answer within 30 s"
    assert got == want.numpy().tobytes()
