"""The native CPU kernel's C++ paths that mutation testing found unchecked, against the float64
reference backend (ttrec.reference): each test names the path it reaches and the property that holds."""

from __future__ import annotations


import pytest
import torch

import ttrec
from ttrec.bags import make_bags
from ttrec.cpu import ops
from ttrec.cpu.build import unavailable_reason

from .native_reference import assert_fused_sgd_matches_reference, assert_matches_reference, normal_cores, spec_of

pytestmark = [pytest.mark.skipif(unavailable_reason() is not None, reason=f"native kernel: {unavailable_reason()}"),
              pytest.mark.usefixtures("threads_at_any_size")]


def _rows(p, i1, i2, i3):
    """Row index of digits (i1, i2, i3) for d = 3 (first core most significant)."""
    return (i1 * p[1] + i2) * p[2] + i3


@pytest.mark.parametrize("threads", [1, 2])
def test_last_core_gradient_ignores_segments_that_never_saw_a_digit(threads):
    """d = 3, 4,096 lookups: the backward's bucket phase runs in two fixed segments of the i2 buckets,
    each with its own dG_3 accumulators, made only for the last digits its lookups use. Here the
    segments use disjoint last digits (i3 = 0 for i2 < 8, i3 = 1 for i2 >= 8), right after a uniform
    batch filled the kernel's reused accumulator memory with other values: dG_3 (and everything
    else) still equals the float64 reference, so an accumulator a segment never wrote is never summed."""
    p, q, r = (8, 16, 4), (2, 2, 4), (16, 16)
    spec = spec_of(p, q, r)
    cores = normal_cores(spec, seed=1)
    g = torch.Generator().manual_seed(2)
    n = 4096
    torch.set_num_threads(threads)
    uniform = make_bags(torch.randint(0, spec.num_embeddings, (n,), generator=g), torch.arange(n), None,
                        num_embeddings=spec.num_embeddings, mode="sum")
    ops.backward(cores, spec, uniform, "sum", torch.randn(n, 16, generator=g))  # leaves its sums behind
    i1 = torch.randint(0, p[0], (n,), generator=g)
    i2 = torch.randint(0, p[1], (n,), generator=g)
    split = make_bags(_rows(p, i1, i2, (i2 >= 8).long()), torch.arange(n), None, num_embeddings=spec.num_embeddings,
                      mode="sum")
    assert_matches_reference(cores, spec, split, torch.randn(n, 16, generator=g))


@pytest.mark.parametrize("code", [-1, 3, 7])
def test_the_native_backward_refuses_unknown_optimizer_codes_and_writes_nothing(code):
    """tt_backward's C ABI takes optimizer 0 (none), 1 (SGD) or 2 (Adagrad): any other code returns
    2 (Python turns it into an error, never a crash) with every buffer it was handed (touched masks,
    accumulators, gradient scratch) left as it was and the cores unchanged, even with all of them given."""
    spec = spec_of((6, 7, 8), (2, 2, 4), (4, 4))
    cores = normal_cores(spec)
    before = [c.clone() for c in cores]
    bags = make_bags(torch.tensor([0, 5, 300]), torch.tensor([0, 1]), None, num_embeddings=spec.num_embeddings,
                     mode="sum")
    grad_out = torch.ones(2, 16)
    scratch = [torch.zeros_like(c) for c in cores]
    state = [torch.full_like(c, 0.5) for c in cores]
    touched = [torch.zeros(p, dtype=torch.uint8) for p in spec.tt_p_shapes]
    rc = ops.library().tt_backward(
        ops._shape(spec), ops._ptrs(cores), bags.indices.data_ptr(), bags.offsets.data_ptr(), bags.num_bags, None, 0,
        grad_out.data_ptr(), ops._ptrs(scratch), ops._ptrs(touched), 1, ops.DEFAULT_CHUNK_BYTES, None, None, code,
        0.1, 1e-10, ops._ptrs(state))
    assert rc == 2
    assert all(torch.equal(a, b) for a, b in zip(cores, before))
    assert not any(s.any() for s in scratch) and not any(t.any() for t in touched)
    assert all(bool((s == 0.5).all()) for s in state)


@pytest.mark.parametrize("offsets,needle", [([0, -1, 2], r"offsets\[0\]=0 > offsets\[1\]=-1"),
                                            ([0, -3], r"offsets\[0\]=0 > offsets\[1\]=-3"),
                                            ([0, 1, 0], r"offsets\[1\]=1 > offsets\[2\]=0")])
def test_the_native_batch_scan_finds_a_decrease_at_every_offset_pair(offsets, needle):
    """Once the kernel is loaded, make_bags checks a CPU batch with its native scan (tt_scan_bags):
    a decrease between any two neighbouring offsets, the first pair included (offsets[1] < offsets[0]
    = 0), is refused naming that pair, as numpy's check (the other route) does."""
    ops.library()  # loaded: make_bags takes the native scan
    with pytest.raises(ValueError, match=needle):
        make_bags(torch.tensor([0, 1]), torch.tensor(offsets), None, num_embeddings=10, mode="sum")


@pytest.mark.parametrize("threads", [1, 2])
def test_every_row_of_a_table_whose_first_digit_needs_the_quotient_correction(threads):
    """d = 3 with p_1 = 49: the plan reads i_2 off a prefix key i_2 p_1 + i_1 by a floating-point
    reciprocal of 49, corrected by the remainder; for i_1 = 0 the product i_2 49 (1 / 49.0) falls just
    below i_2 for i_2 = 1, 2, 3, 4, 6, ... Every row of a (49, 16, 2) table, shuffled: the forward
    equals the float64 reference rows, and forward and core gradients equal the reference."""
    spec = spec_of((49, 16, 2), (1, 2, 2), (3, 4))
    cores = normal_cores(spec, seed=3)
    idx = torch.randperm(spec.num_embeddings, generator=torch.Generator().manual_seed(5))
    bags = make_bags(idx, torch.arange(idx.numel()), None, num_embeddings=spec.num_embeddings, mode="sum")
    torch.set_num_threads(threads)
    want = ttrec.tt_rows([c.double() for c in cores], spec, idx)
    torch.testing.assert_close(ops.forward(cores, spec, bags, "sum").double(), want, rtol=1e-5, atol=1e-6)
    grad_out = torch.randn(bags.num_bags, spec.embedding_dim, generator=torch.Generator().manual_seed(6))
    assert_matches_reference(cores, spec, bags, grad_out)


@pytest.mark.parametrize("q", [(2, 1, 8), (1, 2, 8)])
def test_fused_sgd_on_buckets_just_over_one_piece_reads_each_slice_before_its_update(q):
    """d = 3, every prefix of a (200, 2, 5) table looked up: two i_2 buckets of 200 prefixes, each
    cut into a GEMM piece of kPiece (192) prefixes and one of 8. With SGD, R_1 = 16 and q_2 R_2 = 16
    (the shapes of the small-bucket path slice_sgd_dp1), G_2's slice is updated piece by piece in
    place, yet the second piece's dP_1 must still use the slice as the forward saw it: one fused step
    on 1 and 2 threads moves every core by -lr x the float64 reference gradient."""
    p, r = (200, 2, 5), (16, 16 // q[1])
    spec = spec_of(p, q, r)
    cores = normal_cores(spec, seed=7)
    g = torch.Generator().manual_seed(8)
    i1, i2 = torch.arange(200).repeat(2), torch.arange(2).repeat_interleave(200)
    idx = _rows(p, i1, i2, torch.randint(0, p[2], (400,), generator=g))
    bags = make_bags(idx, torch.arange(400), None, num_embeddings=spec.num_embeddings, mode="sum")
    grad_out = torch.randn(bags.num_bags, spec.embedding_dim, generator=g)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        assert_fused_sgd_matches_reference(cores, spec, bags, grad_out, lr=0.5)


@pytest.mark.parametrize("weighted, q", [(False, (2, 4, 4)), (True, (2, 2, 4))])
def test_bags_of_one_lookup_each_equal_the_reference_rows(weighted, q):
    """Bags of one lookup each take the kernel's direct path (each row written straight into its
    bag's output row, 16-float rows as streamed lines) only when unweighted and, for streaming, when
    D = 16: D = 32 rows are written whole, and weighted bags of one lookup are scaled by their
    weights. On 1 and 2 threads the forward equals the float64 reference rows (times the weights)."""
    spec = spec_of((10, 10, 10), q, (4, 4))
    cores = normal_cores(spec, seed=11)
    g = torch.Generator().manual_seed(12)
    idx = torch.randint(0, spec.num_embeddings, (500,), generator=g)
    w = torch.rand(500, generator=g) + 0.5 if weighted else None
    bags = make_bags(idx, torch.arange(500), w, num_embeddings=spec.num_embeddings, mode="sum")
    want = ttrec.tt_rows([c.double() for c in cores], spec, idx)
    if weighted:
        want = want * w.double()[:, None]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        torch.testing.assert_close(ops.forward(cores, spec, bags, "sum").double(), want, rtol=1e-5, atol=1e-6)
