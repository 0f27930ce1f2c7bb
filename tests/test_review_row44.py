"""Review of the native forward's row44 last-core step and the flat plan-less d = 3 forward (commits
9160f40, bc9bd7b, af9f1f5): row44 (explicit FMAs over ceil(R / 4) vectors from P44Rows<1>, <2> or <4>)
replaced Last44 on every path (d = 2, 3, 4; with and without a kept plan), and a d = 3 forward that keeps
no plan with q_1 ... q_{d-1} = q_d = 4, R % 4 == 0 and q_1 <= 2 runs "flat" (per-lookup prefix numbers
from the thread_local head table, a column-permuted G_2 slice (permute44), one loop per bucket, the
bucket's lookups grouped by piece of 192 prefixes by a counting sort).

Independent references: the float64 reference (ttrec.tt_rows / ttrec.tt_embedding_bag, errors bounded
by the same sums over |terms|), distinct prefix counts from torch.unique, and the grad-mode forward (it
keeps its plan: d = 3, one chunk), which the commits say gives the same bits for every shape.
"""

from __future__ import annotations

import ctypes
import math
import mmap

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

MAX_FRONT = 1 << 16  # kMaxFront (plan.h)
PIECE = 192  # kPiece (plan.h)
STREAM_LOOKUPS = (512 << 10) // 64  # rows of 16 floats streamed from this many lookups in a chunk
QUADS3 = [(1, 4, 4), (2, 2, 4), (4, 1, 4)]  # d = 3, M = q_d = 4: flat for q_1 <= 2 and R % 4 == 0
RANKS = [1, 2, 3, 4, 5, 7, 8, 12, 16, 20, 28, 32, 36, 60, 64, 68, 100]
FIRST_RANKS = [3, 16, 5, 1, 24, 13, 8, 7, 2, 33, 4, 11, 64, 9, 17, 6, 12]  # R_1 per R (mostly != R)


def _bags(spec, idx, sizes=None, weights=None, mode="sum"):
    n = idx.numel()
    if sizes is None:
        sizes = [1] * n if n else [0]
    assert sum(sizes) == n
    offsets = torch.tensor([0, *sizes[:-1]], dtype=torch.int64).cumsum(0)
    return make_bags(idx, offsets, weights, num_embeddings=spec.num_embeddings, mode=mode)


def _reference(cores, spec, idx, sizes=None, weights=None, mode="sum"):
    """float64 pooled rows and their error scale (the same sums with |cores| and |weights|)."""
    def pooled(cs, w):
        return ttrec.tt_embedding_bag(cs, spec, _bags(spec, idx, sizes, w, mode), mode)
    want = pooled([c.double() for c in cores], None if weights is None else weights.double())
    bound = pooled([c.double().abs() for c in cores], None if weights is None else weights.double().abs())
    return want, bound


def _assert_close(got, want, bound, longest_bag=1):
    """Within float32 rounding: a row's chain (2e-6 of the sum of |terms|) and the bag's pooling, a
    sequential float32 sum whose error grows with its length (at most about length x 2^-24 of it)."""
    assert got.shape == want.shape
    err = (got.double() - want).abs()
    tol = (2e-6 + longest_bag * 6e-8) * bound + 1e-30
    ok = err <= tol
    assert bool(ok.all()), (f"{int((~ok).sum())} entries off; max excess {(err - tol).max().item()}, "
                            f"first bad at {tuple(int(i) for i in (~ok).nonzero()[0])}")


def _grad_mode_forward(cores, spec, bags, mode="sum"):
    """The forward that keeps its plan (checked), detached."""
    leaves = [c.clone().requires_grad_() for c in cores]
    live = ops.live_saved_forwards()
    out = ops.tt_bag_cpu(leaves, spec, bags, mode)
    assert ops.live_saved_forwards() == live + (1 if bags.num_lookups else 0)  # the kept-plan path ran
    return out.detach()


def _on_threads(cores, spec, bags, mode="sum", threads=(1, 2, 3), **kw):
    outs, stats = [], []
    for t in threads:
        torch.set_num_threads(t)
        outs.append(ops.forward(cores, spec, bags, mode, **kw))
        stats.append(ops.last_stats()["unique_prefixes"])
    return outs, stats


def _prefixes(idx, p_last, chunk=None):
    if chunk is None:
        return torch.unique(idx // p_last).numel()
    return sum(torch.unique(idx[a:a + chunk] // p_last).numel() for a in range(0, idx.numel(), chunk))


def _with_repeats(idx, g):
    """idx with repeats of its rows: a quarter at random places (mostly non-adjacent) and each of a
    few rows doubled in place (adjacent)."""
    n = idx.numel()
    if n < 4:
        return idx
    idx = idx.clone()
    idx[torch.randperm(n, generator=g)[: n // 4]] = idx[torch.randint(0, n, (n // 4,), generator=g)]
    at = torch.randint(0, n - 1, (max(1, n // 16),), generator=g)
    idx[at + 1] = idx[at]
    return idx


def _check_all(spec, cores, idx, sizes=None, weights=None, mode="sum", threads=(1, 2, 3), **kw):
    """The plan-less forward on each thread count: the reference's values, the same bits on every
    thread count (and, d = 3, as the grad-mode forward), and unique_prefixes = distinct idx // p_d."""
    bags = _bags(spec, idx, sizes, weights, mode)
    outs, stats = _on_threads(cores, spec, bags, mode, threads, **kw)
    want, bound = _reference(cores, spec, idx, sizes, weights, mode)
    _assert_close(outs[0], want, bound, max(sizes) if sizes else 1)
    for t, o in zip(threads[1:], outs[1:]):
        assert torch.equal(o, outs[0]), (t, (o - outs[0]).abs().max().item())
    chunk = 1024 if kw.get("chunk_bytes") == 1 else None
    expect = _prefixes(idx, spec.tt_p_shapes[-1], chunk)
    assert stats == [expect] * len(threads), (stats, expect)
    if spec.d == 3 and not kw:
        kept = _grad_mode_forward(cores, spec, bags, mode)
        assert torch.equal(outs[0], kept), (outs[0] - kept).abs().max().item()
    return outs[0]


# --------------------------------------------------------------------------------------------------
# 1. Every R (runtime K4 and the unrolled K4 = 2, 4, 8, 16; zero-padded P at R % 4 != 0) on the three
#    d = 3 quad shapes, R_1 != R: reference, thread counts, prefix counts, and the same bits as the
#    forward that keeps its plan (flat for q_1 <= 2 and R % 4 == 0, the list path otherwise).

@pytest.mark.parametrize("q", QUADS3)
@pytest.mark.parametrize("ri", range(len(RANKS)))
def test_d3_quad_every_rank_matches_reference_threads_and_kept_plan(q, ri):
    R, R1 = RANKS[ri], FIRST_RANKS[ri]
    spec = spec_of((37, 6, 7), q, (R1, R))
    cores = normal_cores(spec, 10 + ri)
    g = torch.Generator().manual_seed(ri)
    idx = _with_repeats(torch.randint(0, spec.num_embeddings, (900,), generator=g), g)
    idx[:3] = torch.tensor([0, spec.num_embeddings - 1, 7 * 6 * 36])  # the first and last rows, i1 = 36
    _check_all(spec, cores, idx)


# d = 2 (P = G_1's slice, read in place or zero-padded) and d = 4 quad shapes
@pytest.mark.parametrize("q", [(4, 4), (1, 2, 2, 4), (2, 1, 2, 4), (1, 1, 4, 4), (4, 1, 1, 4)])
@pytest.mark.parametrize("R", [1, 3, 4, 5, 8, 12, 16, 20, 32, 36, 64, 68])
def test_d2_d4_quad_matches_reference_and_threads(q, R):
    if len(q) == 2:
        spec = spec_of((53, 29), q, (R,))
    else:
        spec = spec_of((7, 5, 3, 6), q, (5, 3 if R != 3 else 4, R))
    cores = normal_cores(spec, R)
    g = torch.Generator().manual_seed(R + 100)
    idx = _with_repeats(torch.randint(0, spec.num_embeddings, (700,), generator=g), g)
    idx[:2] = torch.tensor([0, spec.num_embeddings - 1])
    _check_all(spec, cores, idx)


# --------------------------------------------------------------------------------------------------
# 2. Buckets at the piece boundaries (192, 193, 384, 385 prefixes; one prefix; one lookup), all lookups
#    in one bucket (p_2 = 1) or one of several, rows repeated in and across pieces.

def _bucket_lookups(p, i2, n_prefixes, per_prefix, g):
    """Lookups of i2's bucket with exactly n_prefixes distinct i1 (interleaved: first sights in a random
    order, later lookups of early prefixes after those of late ones), each prefix per_prefix times with
    random i3, then repeats: every 5th lookup repeated right after it, a few rows far apart."""
    i1 = torch.randperm(p[0], generator=g)[:n_prefixes]
    rows = []
    order = i1.repeat(per_prefix)
    order = torch.cat([i1, order[torch.randperm(order.numel(), generator=g)]])
    for a in order.tolist():
        rows.append((a * p[1] + i2) * p[2] + int(torch.randint(0, p[2], (1,), generator=g)))
    idx = torch.tensor(rows)
    idx = torch.repeat_interleave(idx, torch.tensor([2 if k % 5 == 0 else 1 for k in range(idx.numel())]))
    far = torch.randint(0, idx.numel(), (8,), generator=g)
    return torch.cat([idx, idx[far]])


@pytest.mark.parametrize("q,R", [((1, 4, 4), 8), ((2, 2, 4), 12), ((2, 2, 4), 32), ((1, 4, 4), 36), ((4, 1, 4), 16)])
@pytest.mark.parametrize("n_prefixes", [1, 191, 192, 193, 384, 385])
def test_bucket_prefix_counts_at_piece_boundaries_one_bucket(q, R, n_prefixes):
    p = (400, 1, 9)  # p_2 = 1: every lookup in one bucket
    spec = spec_of(p, q, (6, R))
    cores = normal_cores(spec, n_prefixes)
    g = torch.Generator().manual_seed(n_prefixes * 7 + R)
    idx = _bucket_lookups(p, 0, n_prefixes, 2, g)
    assert torch.unique(idx // p[2]).numel() == n_prefixes
    _check_all(spec, cores, idx)
    # the same lookups in bags of three, weighted (rows through the row buffer, then pooled)
    n = idx.numel()
    sizes = [3] * (n // 3) + ([n % 3] if n % 3 else [])
    _check_all(spec, cores, idx, sizes, torch.randn(n, generator=g), threads=(1, 2))


@pytest.mark.parametrize("q,R", [((1, 4, 4), 16), ((2, 2, 4), 8), ((2, 2, 4), 20)])
def test_several_buckets_of_boundary_sizes_and_single_lookups(q, R):
    """Buckets of 385, 192, 1 (one lookup), 193, 384 prefixes and one bucket with one prefix looked up
    many times, interleaved in lookup order: each bucket's prefixes and rows right, on 1-3 threads."""
    p = (420, 8, 5)
    spec = spec_of(p, q, (R + 4, R))
    cores = normal_cores(spec, R)
    g = torch.Generator().manual_seed(R)
    parts = [_bucket_lookups(p, 0, 385, 1, g), _bucket_lookups(p, 2, 192, 2, g), torch.tensor([(5 * 8 + 3) * 5 + 4]),
             _bucket_lookups(p, 4, 193, 1, g), _bucket_lookups(p, 7, 384, 1, g),
             torch.full((50,), (419 * 8 + 6) * 5 + 2)]
    idx = torch.cat(parts)
    idx = idx[torch.randperm(idx.numel(), generator=g)]
    _check_all(spec, cores, idx)


def test_repeats_adjacent_non_adjacent_and_across_pieces():
    """One bucket of 400 prefixes (three pieces): a row of the last piece looked up first, then between
    lookups of first-piece rows, then right after itself; all rows equal their reference row (a copy
    taken from the wrong lead row would not)."""
    p = (500, 1, 4)
    for q, R in [((1, 4, 4), 8), ((2, 2, 4), 16), ((2, 2, 4), 4)]:
        spec = spec_of(p, q, (3, R))
        cores = normal_cores(spec, R)
        first = torch.arange(400) * 4 + torch.arange(400) % 4  # i1 = 0..399, first seen in this order
        late, early = int(first[399]), int(first[3])
        idx = torch.cat([first, torch.tensor([late, early, late, late, early, early, late, int(first[200]), late]),
                         first.flip(0), first])
        _check_all(spec, cores, idx)


# --------------------------------------------------------------------------------------------------
# 3. Batches just below and above the streaming threshold: bags of one (rows straight into the
#    64-byte aligned output, streamed), bags of two and weighted bags of one (rows in the row buffer,
#    streamed from 8,192 lookups), mean mode.

@pytest.mark.parametrize("n", [STREAM_LOOKUPS - 1, STREAM_LOOKUPS])
@pytest.mark.parametrize("q,R", [((1, 4, 4), 8), ((2, 2, 4), 28), ((4, 1, 4), 12)])
def test_streaming_threshold(n, q, R):
    spec = spec_of((600, 13, 9), q, (9, R))
    cores = normal_cores(spec, n)
    g = torch.Generator().manual_seed(n + R)
    idx = _with_repeats(torch.randint(0, spec.num_embeddings, (n,), generator=g), g)
    _check_all(spec, cores, idx, threads=(1, 2))
    _check_all(spec, cores, idx, weights=torch.randn(n, generator=g), threads=(2,))
    sizes = [2] * (n // 2) + [n % 2] if n % 2 else [2] * (n // 2)
    _check_all(spec, cores, idx, sizes, mode="mean", threads=(1, 2))


class _MisalignedEmpty:
    """ops' view of torch with torch.empty giving 16 bytes past a 64-byte line (the output of bags of
    one is then written by ordinary stores, not streamed)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*size, dtype=None):
        n = math.prod(size)
        buf = torch.empty(n + 32, dtype=dtype)
        skip = (-buf.data_ptr() % 64) // buf.element_size() + 4
        out = buf[skip:skip + n].view(size)
        assert out.data_ptr() % 64 == 16
        return out


@pytest.mark.parametrize("n", [100, STREAM_LOOKUPS])
@pytest.mark.parametrize("q,R", [((1, 4, 4), 8), ((2, 2, 4), 12), ((4, 1, 4), 16)])
def test_bags_of_one_into_an_unaligned_output(monkeypatch, n, q, R):
    spec = spec_of((250, 9, 5), q, (6, R))
    cores = normal_cores(spec, R)
    g = torch.Generator().manual_seed(n + R)
    idx = _with_repeats(torch.randint(0, spec.num_embeddings, (n,), generator=g), g)
    bags = _bags(spec, idx)
    torch.set_num_threads(2)
    aligned = ops.forward(cores, spec, bags, "sum")
    with monkeypatch.context() as m:
        m.setattr(ops, "torch", _MisalignedEmpty())
        outs, stats = _on_threads(cores, spec, bags, "sum", (1, 2))
    assert all(o.data_ptr() % 64 == 16 for o in outs)
    want, bound = _reference(cores, spec, idx)
    _assert_close(outs[0], want, bound)
    assert torch.equal(outs[0], aligned) and torch.equal(outs[1], aligned)
    assert stats == [_prefixes(idx, 5)] * 2


@pytest.mark.parametrize("q,R", [((2, 2, 4), 16), ((1, 4, 4), 12)])
def test_chunks_streamed_and_not_with_bags_across_chunks(q, R):
    """Chunks of exactly 8,192 lookups (chunk_bytes = 8,192 x (4 D + 24)): the first chunk's rows are
    streamed, the last one's (100 lookups) are not; bags of three span the chunk boundaries."""
    spec = spec_of((300, 11, 7), q, (5, R))
    cores = normal_cores(spec, R)
    g = torch.Generator().manual_seed(R)
    n = STREAM_LOOKUPS + 100
    idx = _with_repeats(torch.randint(0, spec.num_embeddings, (n,), generator=g), g)
    sizes = [3] * (n // 3) + ([n % 3] if n % 3 else [])
    chunk_bytes = STREAM_LOOKUPS * (4 * 16 + 24)
    bags = _bags(spec, idx, sizes)
    outs, stats = _on_threads(cores, spec, bags, "sum", (1, 2), chunk_bytes=chunk_bytes)
    want, bound = _reference(cores, spec, idx, sizes)
    _assert_close(outs[0], want, bound)
    assert torch.equal(outs[1], outs[0])
    expect = _prefixes(idx[:STREAM_LOOKUPS], 7) + _prefixes(idx[STREAM_LOOKUPS:], 7)
    assert stats == [expect, expect]
    assert ops.last_stats()["chunks"] == 2


# --------------------------------------------------------------------------------------------------
# 4. Bags, weights, mean, empty bags, chunks, alternating shapes (hypothesis).

QUAD_SPECS = [((9, 7, 11), (1, 4, 4)), ((9, 7, 11), (2, 2, 4)), ((9, 7, 11), (4, 1, 4)), ((300, 1, 3), (2, 2, 4)),
              ((1, 40, 6), (1, 4, 4)), ((13, 5, 1), (2, 2, 4)), ((17, 23), (4, 4)), ((3, 4, 5, 6), (1, 2, 2, 4))]


@st.composite
def problems(draw):
    p, q = draw(st.sampled_from(QUAD_SPECS))
    R = draw(st.sampled_from(RANKS))
    r = (R,) if len(q) == 2 else (draw(st.sampled_from([1, 4, 7, 16])), R) if len(q) == 3 else (3, 5, R)
    rows = math.prod(p) - draw(st.integers(0, math.prod(p) // 5))
    n = draw(st.sampled_from([0, 1, 2, 5, 64, 400, 1500]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    pattern = draw(st.sampled_from(["uniform", "one_row", "one_bucket", "repeats"]))
    if pattern == "one_row" and n:
        idx = torch.full((n,), int(torch.randint(0, rows, (1,), generator=g)))
    elif pattern == "one_bucket" and n and len(p) == 3:
        i2 = int(torch.randint(0, p[1], (1,), generator=g))
        i1, i3 = torch.randint(0, p[0], (n,), generator=g), torch.randint(0, p[2], (n,), generator=g)
        idx = ((i1 * p[1] + i2) * p[2] + i3).clamp(max=rows - 1)
    elif pattern == "repeats" and n:
        base = torch.randint(0, rows, (max(1, n // 8),), generator=g)
        idx = base[torch.randint(0, base.numel(), (n,), generator=g)]
    else:
        idx = torch.randint(0, rows, (n,), generator=g)
    mode = draw(st.sampled_from(["sum", "mean"]))
    if n and draw(st.booleans()):
        cuts = sorted(draw(st.lists(st.integers(0, n), max_size=10)))
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n])] + [0] * draw(st.integers(0, 2))
    else:
        sizes = None
    weights = torch.randn(n, generator=g) if mode == "sum" and n and draw(st.booleans()) else None
    chunked = n > 1024 and draw(st.booleans())
    return spec_of(p, q, r, rows=rows), idx, sizes, weights, mode, chunked, seed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(problems())
def test_quad_shapes_bags_weights_mean_empty_bags(problem):
    spec, idx, sizes, weights, mode, chunked, seed = problem
    cores = normal_cores(spec, seed % 997)
    kw = {"chunk_bytes": 1} if chunked else {}
    _check_all(spec, cores, idx, sizes, weights, mode, **kw)


def test_alternating_tables_keep_the_head_table_clean():
    """Flat and list-path tables in turns, p_1 from 3 to 65,536 with 1 to 2,000 lookups, on 1-3
    threads: the thread_local head table holds u during a flat bucket, y during a list bucket, and must
    be -1 again after every bucket."""
    specs = [spec_of((MAX_FRONT, 3, 5), (1, 4, 4), (8, 8)), spec_of((MAX_FRONT, 2, 3), (2, 2, 4), (5, 12)),
             spec_of((50, 7, 5), (2, 2, 4), (8, 6)), spec_of((3, 2000, 2), (4, 1, 4), (4, 4)),
             spec_of((1000, 1, 3), (2, 2, 4), (16, 32)), spec_of((MAX_FRONT - 1, 2, 2), (2, 2, 4), (3, 4))]
    cores = {s: normal_cores(s, 4) for s in specs}
    g = torch.Generator().manual_seed(5)
    for it in range(36):
        spec = specs[it % len(specs)]
        torch.set_num_threads(1 + it % 3)
        n = [1, 2, 7, 100, 2000][it % 5]
        idx = torch.randint(0, spec.num_embeddings, (n,), generator=g)
        if it % 4 == 0:
            idx[0] = spec.num_embeddings - 1
        out = ops.forward(cores[spec], spec, _bags(spec, idx), "sum")
        want, bound = _reference(cores[spec], spec, idx)
        _assert_close(out, want, bound)
        assert ops.last_stats()["unique_prefixes"] == _prefixes(idx, spec.tt_p_shapes[2]), it


@pytest.mark.parametrize("front", [MAX_FRONT, MAX_FRONT + 1])
@pytest.mark.parametrize("q,R", [((1, 4, 4), 8), ((2, 2, 4), 32), ((2, 2, 4), 12), ((4, 1, 4), 7)])
def test_largest_front_with_few_lookups(front, q, R):
    """p_1 = 65,536 (kMaxFront, still bucketed) and 65,537 (the plan's path without keeping it) with 3
    and 40 lookups, i1 = 0 and p_1 - 1 included."""
    p = (front, 3, 4)
    spec = spec_of(p, q, (7, R))
    cores = normal_cores(spec, R)
    g = torch.Generator().manual_seed(R)
    for n in (3, 40):
        idx = torch.randint(0, spec.num_embeddings, (n,), generator=g)
        idx[:3] = torch.tensor([spec.num_embeddings - 1, 3, (front - 1) * 12 + 4])
        _check_all(spec, cores, idx)


# --------------------------------------------------------------------------------------------------
# 5. No out-of-bounds reads: cores placed right against inaccessible pages (a read past either end
#    faults) and inside NaN (a read past either end that reaches a result makes it NaN).

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = mmap.PAGESIZE


class _Guarded:
    """A float32 tensor of `shape` whose first (at="start") or last (at="end") element touches a
    PROT_NONE page."""

    def __init__(self, src, at):
        nbytes = src.numel() * 4
        pages = -(-nbytes // PAGE)
        self.map = mmap.mmap(-1, (pages + 2) * PAGE)
        self._addr = ctypes.c_char.from_buffer(self.map)  # keeps the map's buffer exported (alive)
        addr = ctypes.addressof(self._addr)
        offset = PAGE if at == "start" else PAGE + pages * PAGE - nbytes
        self.tensor = torch.frombuffer(self.map, dtype=torch.float32, count=src.numel(), offset=offset).view(src.shape)
        self.tensor.copy_(src)
        for page in (addr, addr + (pages + 1) * PAGE):
            assert _libc.mprotect(page, PAGE, 0) == 0, ctypes.get_errno()


def _in_nan(src):
    buf = torch.full((src.numel() + 64,), float("nan"))
    t = buf[32:32 + src.numel()].view(src.shape)
    t.copy_(src)
    assert t.is_contiguous()
    return t


@pytest.mark.parametrize("p,q,r", [((5, 3, 4), (1, 4, 4), (3, 4)), ((5, 3, 4), (2, 2, 4), (5, 8)),
                                   ((5, 3, 4), (2, 2, 4), (1, 12)), ((5, 3, 4), (4, 1, 4), (2, 5)),
                                   ((5, 3, 4), (2, 2, 4), (3, 7)), ((7, 6), (4, 4), (4,)), ((7, 6), (4, 4), (5,)),
                                   ((7, 6), (4, 4), (12,)), ((3, 2, 2, 3), (1, 2, 2, 4), (2, 3, 4))])
def test_no_reads_past_the_cores(p, q, r):
    spec = spec_of(p, q, r)
    cores = normal_cores(spec, 3)
    n = spec.num_embeddings
    idx = torch.cat([torch.arange(n), torch.tensor([n - 1, 0, n - 1])])
    want, bound = _reference(cores, spec, idx)
    for at in ("start", "end"):
        guarded = [_Guarded(c, at) for c in cores]
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = ops.forward([gc.tensor for gc in guarded], spec, _bags(spec, idx), "sum")
            _assert_close(out, want, bound)
    out = ops.forward([_in_nan(c) for c in cores], spec, _bags(spec, idx), "sum")
    assert not out.isnan().any()
    _assert_close(out, want, bound)
