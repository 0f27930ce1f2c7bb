"""Review of the plan-less d = 3 forward (commits ea4001e, 444d97a, 1bfe1ae): lookups sorted on i2 only
(packed key), i2 buckets found by galloping searches, prefixes per bucket by per-i1 lists (a thread_local
head table), rows by finish_piece shared with the kept-plan path.

Independent references: the float64 reference (ttrec.tt_rows / ttrec.tt_embedding_bag, errors bounded by
the same sums over |terms|), distinct prefix counts from torch.unique, and the grad-mode forward (kept
plan) that the commit says gives the same bits.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import ttrec
from ttrec.bags import make_bags
from ttrec.cpu import ops
from ttrec.cpu.build import unavailable_reason

from .native_reference import normal_cores, spec_of

pytestmark = [pytest.mark.skipif(unavailable_reason() is not None, reason=f"native kernel: {unavailable_reason()}"),
              pytest.mark.usefixtures("threads_at_any_size")]

MAX_FRONT = 1 << 16  # kMaxFront (plan.h): the most p_1 the bucketed forward takes


def _bags(spec, idx, sizes=None, weights=None, mode="sum", index_dtype=torch.int64):
    n = idx.numel()
    if sizes is None:
        sizes = [1] * n if n else [0]
    assert sum(sizes) == n
    offsets = torch.tensor([0, *sizes[:-1]], dtype=torch.int64).cumsum(0)
    return make_bags(idx.to(index_dtype), offsets.to(index_dtype), weights, num_embeddings=spec.num_embeddings,
                     mode=mode)


def _reference(cores, spec, idx, sizes, weights, mode):
    """float64 pooled rows and their error scale (the same sums with |cores| and |weights|)."""
    def pooled(cs, w):
        b = _bags(spec, idx, sizes, w, mode)
        return ttrec.tt_embedding_bag(cs, spec, b, mode)
    want = pooled([c.double() for c in cores], None if weights is None else weights.double())
    bound = pooled([c.double().abs() for c in cores], None if weights is None else weights.double().abs())
    return want, bound


def _assert_close(got, want, bound):
    err = (got.double() - want).abs()
    assert bool((err <= 2e-6 * bound + 1e-30).all()), f"max excess {(err - 2e-6 * bound).max().item()}"


def _prefix_count(idx, p3, chunk=None):
    if chunk is None:
        return torch.unique(idx // p3).numel()
    return sum(torch.unique(idx[a:a + chunk] // p3).numel() for a in range(0, idx.numel(), chunk))


def _forward_on_threads(cores, spec, bags, mode, threads=(1, 2, 3), **kw):
    outs, stats = [], []
    for t in threads:
        torch.set_num_threads(t)
        outs.append(ops.forward(cores, spec, bags, mode, **kw))
        stats.append(ops.last_stats())
    return outs, stats


# --------------------------------------------------------------------------------------------------
# 1. The no-grad forward (bucketed) against the grad-mode forward (kept plan): the commit's claim that
#    both give the same bits. DEFECT: they differ whenever a prefix's G_1 @ G_2 row is computed by a
#    1-row register tile in one path and a multi-row tile in the other (the bucketed path orders a
#    piece's prefixes by first sight, the plan by i1), and the column block is the 8-column one
#    (q_2 R_2 % 16 >= 8): on AVX2, nn_tile<0, 1> is compiled to vmulps + vaddps while nn_tile<0, 2..6>
#    use vfmadd231ps, so the row rounds differently.

def _grad_mode_forward(cores, spec, bags, mode):
    leaves = [c.clone().requires_grad_() for c in cores]
    live = ops.live_saved_forwards()
    out = ops.tt_bag_cpu(leaves, spec, bags, mode)
    assert ops.live_saved_forwards() == live + (1 if bags.num_lookups else 0)  # the kept-plan path ran
    return out.detach()


def test_three_lookups_no_grad_forward_equals_kept_plan_forward_bitwise():
    """Minimal reproducer: p = (3, 2, 1), q = (1, 1, 4), R = (8, 8) (q_2 R_2 = 8: the 8-column block),
    rows 4, 0, 2 (one i2 bucket, i1 = 2, 0, 1 first seen in that order): 3 prefixes, G_1 @ G_2 of M = 3
    rows = a 2-row tile + a 1-row tile. The kept plan puts i1 = 2 in the 1-row tile, the bucketed forward
    i1 = 1. Both are close to the reference; they must be bitwise equal."""
    spec = spec_of((3, 2, 1), (1, 1, 4), (8, 8))
    idx = torch.tensor([4, 0, 2])
    bags = _bags(spec, idx)
    torch.set_num_threads(1)
    for seed in range(5):
        cores = normal_cores(spec, seed)
        no_grad = ops.forward(cores, spec, bags, "sum")
        kept = _grad_mode_forward(cores, spec, bags, "sum")
        want, bound = _reference(cores, spec, idx, None, None, "sum")
        _assert_close(no_grad, want, bound)
        _assert_close(kept, want, bound)
        assert torch.equal(no_grad, kept), (seed, (no_grad - kept).abs().max().item())


@pytest.mark.parametrize("p,q,r", [
    ((9, 9, 9), (3, 5, 7), (3, 3)),    # gemm_nt last core, q_2 R_2 = 15 (8-column block + tail), q_1 = 3
    ((9, 9, 9), (1, 1, 4), (8, 8)),    # q_2 R_2 = 8
    ((9, 9, 9), (3, 5, 4), (16, 8)),   # D = 60: gemm_nt, q_2 R_2 = 40 (32 + the 8-column block)
    ((9, 9, 9), (2, 2, 4), (16, 16)),  # row44, R 16 (no 8-column block)
    ((9, 9, 9), (2, 2, 4), (8, 8)),    # R = 8, D = 16: P zero-padded
    ((9, 9, 9), (2, 2, 4), (32, 32)),
    ((9, 9, 9), (2, 2, 4), (64, 64)),
    ((9, 9, 9), (2, 4, 4), (16, 16)),  # D = 32, last_stage16
])
def test_no_grad_forward_equals_kept_plan_forward_bitwise(p, q, r):
    """1,500 uniform lookups, bags of one: ops.forward (bucketed) == tt_bag_cpu with cores requiring
    grad (the kept plan), bitwise, on 1 and 2 threads."""
    spec = spec_of(p, q, r)
    cores = normal_cores(spec, 0)
    idx = torch.randint(0, spec.num_embeddings, (1500,), generator=torch.Generator().manual_seed(1))
    bags = _bags(spec, idx)
    for t in (1, 2):
        torch.set_num_threads(t)
        no_grad = ops.forward(cores, spec, bags, "sum")
        kept = _grad_mode_forward(cores, spec, bags, "sum")
        assert torch.equal(no_grad, kept), (t, (no_grad - kept).abs().max().item())


# --------------------------------------------------------------------------------------------------
# 2. Results against the float64 reference, bitwise across thread counts, prefix statistics.

# (q, r) per last-core path: row44 with R 16 / 32 / 64; last_stage16 (D % 16 == 0, other q); gemm_nt
# (D % 16 != 0); R = 8 with D = 16 (P zero-padded); rank 1
QR = [((2, 2, 4), (16, 16)), ((2, 2, 4), (32, 32)), ((2, 2, 4), (64, 64)), ((1, 4, 4), (8, 16)),
      ((2, 2, 8), (16, 8)), ((2, 3, 5), (3, 7)), ((1, 1, 16), (5, 8)), ((2, 2, 4), (8, 8)), ((1, 2, 1), (1, 1))]
P_VALUES = [1, 2, 3, 4, 7, 8, 16, 17, 31, 64, 65, 256, 257]


@st.composite
def problems(draw):
    p = tuple(draw(st.lists(st.sampled_from(P_VALUES), min_size=3, max_size=3)))
    q, r = draw(st.sampled_from(QR))
    rows = math.prod(p) - draw(st.integers(0, math.prod(p) // 4))
    n = draw(st.sampled_from([0, 1, 2, 3, 40, 700, 2500]))
    pattern = draw(st.sampled_from(["uniform", "uniform", "one_row", "one_bucket", "repeats"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if pattern == "uniform" or n == 0:
        idx = torch.randint(0, rows, (n,), generator=g)
    elif pattern == "one_row":
        idx = torch.full((n,), int(torch.randint(0, rows, (1,), generator=g)))
    elif pattern == "one_bucket":  # every lookup on one i2
        i2 = int(torch.randint(0, p[1], (1,), generator=g))
        i1, i3 = torch.randint(0, p[0], (n,), generator=g), torch.randint(0, p[2], (n,), generator=g)
        idx = ((i1 * p[1] + i2) * p[2] + i3).clamp(max=rows - 1)
    else:
        base = torch.randint(0, rows, (max(1, n // 8),), generator=g)
        idx = base[torch.randint(0, base.numel(), (n,), generator=g)]
    mode = draw(st.sampled_from(["sum", "mean"]))
    if n and draw(st.booleans()):
        cuts = sorted(draw(st.lists(st.integers(0, n), max_size=12)))
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n])] + [0] * draw(st.integers(0, 2))
    else:
        sizes = None
    weights = torch.randn(n, generator=g) if mode == "sum" and draw(st.booleans()) else None
    chunked = draw(st.booleans())  # chunk_bytes=1: chunks of 1,024 lookups
    index_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    return spec_of(p, q, r, rows=rows), idx, sizes, weights, mode, chunked, index_dtype, seed


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(problems())
def test_plan_less_forward_matches_reference_and_is_bitwise_thread_independent(problem):
    """p_k in {1, powers of 2 and their neighbours}, every last-core path, uniform / one row / one i2
    bucket / heavy repeats, empty bags, sum (weighted) and mean, int32 indices, one chunk or chunks of
    1,024: the reference's rows, the same bits on 1, 2, 3 threads, and unique_prefixes = distinct
    row // p_3 per chunk."""
    spec, idx, sizes, weights, mode, chunked, index_dtype, seed = problem
    cores = normal_cores(spec, seed % 1000)
    bags = _bags(spec, idx, sizes, weights, mode, index_dtype)
    kw = {"chunk_bytes": 1} if chunked else {}
    outs, stats = _forward_on_threads(cores, spec, bags, mode, **kw)
    want, bound = _reference(cores, spec, idx, sizes, weights, mode)
    _assert_close(outs[0], want, bound)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    expect = _prefix_count(idx, spec.tt_p_shapes[2], 1024 if chunked else None)
    for s in stats:
        assert s["unique_prefixes"] == expect
        assert s["chunks"] == (math.ceil(idx.numel() / 1024) if chunked else (1 if idx.numel() else 0))


# bit-field boundaries: p_1 = 65,536 (bucketed) / 65,537 (plan fallback); packed key of 40 bits
# (bucketed) and 41 (plan fallback, unpacked 40); p_2 or p_3 = 1; powers of two
@pytest.mark.parametrize("p", [(MAX_FRONT, 2, 3), (MAX_FRONT + 1, 2, 3), (MAX_FRONT - 1, 3, 2),
                               (MAX_FRONT, 2**8, 2**16), (MAX_FRONT, 2**9, 2**15), (MAX_FRONT + 1, 2**7, 2**16),
                               (1025, 1024, 2**19), (1025, 1025, 2**19), (2**10, 2**10, 2**20),
                               (300, 1, 7), (300, 7, 1), (1, 300, 7), (1, 1, 1), (2, 2, 2)])
def test_bit_field_boundaries(p):
    spec = spec_of(p, (2, 2, 4), (8, 8))
    cores = normal_cores(spec, 2)
    g = torch.Generator().manual_seed(3)
    n = 3000
    idx = torch.randint(0, spec.num_embeddings, (n,), generator=g)
    idx[: n // 4] = idx[torch.randint(0, n, (n // 4,), generator=g)]  # repeats
    idx[:2] = torch.tensor([0, spec.num_embeddings - 1])
    bags = _bags(spec, idx)
    outs, stats = _forward_on_threads(cores, spec, bags, "sum")
    want = ttrec.tt_rows([c.double() for c in cores], spec, idx)
    bound = ttrec.tt_rows([c.double().abs() for c in cores], spec, idx)
    _assert_close(outs[0], want, bound)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert all(s["unique_prefixes"] == _prefix_count(idx, p[2]) for s in stats)


def test_tables_alternating_keep_the_thread_local_heads_clean():
    """Tables of p_1 = 65,536, 50, 3 and 1,000 in turns on 1-3 threads, 1 to 3,000 lookups (the
    per-thread list heads are kept across calls and must be -1 again after every bucket): every call
    gives the reference's rows and the distinct prefix count."""
    specs = [spec_of((MAX_FRONT, 3, 5), (2, 2, 4), (16, 16)), spec_of((50, 7, 5), (2, 2, 4), (8, 8)),
             spec_of((3, 200_000, 2), (4, 1, 4), (2, 2)), spec_of((1000, 1, 3), (2, 2, 4), (32, 32))]
    cores = {s: normal_cores(s, 4) for s in specs}
    g = torch.Generator().manual_seed(5)
    for it in range(48):
        spec = specs[it % 4]
        torch.set_num_threads(1 + it % 3)
        n = [1, 2, 5, 100, 3000][it % 5]
        idx = torch.randint(0, spec.num_embeddings, (n,), generator=g)
        out = ops.forward(cores[spec], spec, _bags(spec, idx), "sum")
        want = ttrec.tt_rows([c.double() for c in cores[spec]], spec, idx)
        bound = ttrec.tt_rows([c.double().abs() for c in cores[spec]], spec, idx)
        _assert_close(out, want, bound)
        assert ops.last_stats()["unique_prefixes"] == _prefix_count(idx, spec.tt_p_shapes[2]), it


# --------------------------------------------------------------------------------------------------
# 3. Work and memory per batch, not per digit value.

def _peak_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return None


def test_huge_middle_digit_with_three_lookups_is_right_and_small():
    """p_2 = 10^7, 3 lookups: right on 1 and 2 threads, and 21 calls raise the peak RSS by less than
    16 MB (a per-digit-value array of int64 would be 80 MB). (No timing: the suite asserts none.)"""
    spec = spec_of((3, 10**7, 5), (4, 1, 4), (1, 1))
    cores = normal_cores(spec, 6)
    idx = torch.tensor([5, spec.num_embeddings - 1, 12_345_678])
    bags = _bags(spec, idx)
    want = ttrec.tt_rows([c.double() for c in cores], spec, idx)
    try:
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS
            f.write("5")
        before = _peak_mb()
    except OSError:
        before = None
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for _ in range(21):
            out = ops.forward(cores, spec, bags, "sum")
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    if before is not None:
        assert _peak_mb() - before < 16


# --------------------------------------------------------------------------------------------------
# 4. Sort tuner: widths of up to 8 bits sort "shared" untimed; forced ways still apply.

@pytest.fixture
def _tuner_reset():
    ops.force_sort_way("timing")
    yield
    ops.force_sort_way("timing")


@pytest.mark.parametrize("p,width", [((7, 1, 3), 1), ((7, 2, 3), 1), ((7, 200, 3), 8), ((7, 256, 3), 8),
                                     ((7, 257, 3), 9), ((1, 1, 1), 1)])
def test_sort_widths_up_to_8_bits_are_shared_untimed_and_forced_ways_apply(_tuner_reset, p, width):
    spec = spec_of(p, (2, 2, 4), (8, 8))
    cores = normal_cores(spec, 7)
    idx = torch.randint(0, spec.num_embeddings, (16384,), generator=torch.Generator().manual_seed(8))
    bags = _bags(spec, idx)
    torch.set_num_threads(2)
    first = ops.forward(cores, spec, bags, "sum")
    if width <= 8:
        assert ops.sort_way() == "shared" and ops.last_sort_way() == "shared"
    else:
        assert ops.sort_way() == "timing"
    for way in ("split", "shared"):
        ops.force_sort_way(way)
        out = ops.forward(cores, spec, bags, "sum")
        assert ops.sort_way() == way and ops.last_sort_way() == way
        assert torch.equal(out, first)  # the same order either way: the same bits
        assert ops.last_stats()["unique_prefixes"] == _prefix_count(idx, p[2])
