"""Tests written by mutation testing the TT math and its boundaries (ttrec.shapes, reference, bags,
init, optim, tt, baselines, registry, autograd_guards and the native CPU boundary, ttrec.cpu.ops).

Each test kills a planted mutant that the rest of the suite let through, and checks the property
against an independent reference: brute-force factorizations, dense tables pooled by
F.embedding_bag, closed-form variances, torch's optimizers.
"""

from __future__ import annotations

import itertools
import math
import re
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import ttrec
import ttrec.reference as reference
from ttrec import TTEmbeddingBag, TTSpec, make_bags, suggest_shape, tt_embedding_bag
from ttrec.cpu import ops
from ttrec.cpu.build import unavailable_reason

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)
native = pytest.mark.skipif(unavailable_reason() is not None, reason=f"native kernel: {unavailable_reason()}")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _dense(cores, spec):
    """The table from one einsum over all cores (row digits most significant first), cut to N rows."""
    d = spec.d
    bonds, rows, cols = "ABCDEFG", "ijklmn", "opqrst"
    terms = [f"{bonds[k]}{rows[k]}{cols[k]}{bonds[k + 1]}" for k in range(d)]
    full = torch.einsum(",".join(terms) + "->" + rows[:d] + cols[:d], *cores)
    return full.reshape(math.prod(spec.tt_p_shapes), spec.embedding_dim)[: spec.num_embeddings]


def _random_cores(spec, seed, dtype=F64):
    g = _gen(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in spec.core_shapes]


# --- shapes -------------------------------------------------------------------------------------


def _entropy(fs):
    t = sum(fs)
    return -sum(f / t * math.log(f / t) for f in fs)


@pytest.mark.parametrize("n, d", [(44, 3), (78, 3), (116, 3), (30, 3), (12, 3), (6, 2), (35, 2), (2 * 2 * 3 * 97, 4)])
def test_exact_split_has_no_factor_1_when_n_has_d_primes(n, d):
    """With exactly d prime factors, n splits into factors >= 2 (the docstring's rule): the most
    balanced split of those, not e.g. (1, 4, 11) for 44, which is more balanced than (2, 2, 11)."""
    divisors = [f for f in range(2, n + 1) if n % f == 0]
    splits = [fs for fs in itertools.combinations_with_replacement(divisors, d) if math.prod(fs) == n]
    want = max(splits, key=_entropy)
    assert suggest_shape(n, d, round_up=False) == want
    assert min(want) >= 2
    m = TTEmbeddingBag(10, n, 2, tt_p_shapes=(2,) * (d - 1) + (5,), backend="torch", seed=0)
    assert m.spec.tt_q_shapes == want  # the suggested column factorization


# --- reference ----------------------------------------------------------------------------------


def test_reference_chunks_of_several_lookups_pool_every_lookup():
    """Chunk budgets of 1 to all 11 lookups: forward and core gradients equal the dense table pooled
    by F.embedding_bag (a chunk that dropped its last lookup would show)."""
    spec = TTSpec(60, 12, (3, 4, 5), (2, 3, 2), (3, 4))
    cores = _random_cores(spec, 1)
    idx = torch.randint(0, 60, (11,), generator=_gen(2))
    offsets = torch.tensor([0, 4, 4, 9])
    w = torch.randn(11, generator=_gen(3), dtype=F64)
    g_out = torch.randn(4, 12, generator=_gen(4), dtype=F64)
    leaves = [c.clone().requires_grad_() for c in cores]
    want = F.embedding_bag(idx, _dense(leaves, spec), offsets, mode="sum", per_sample_weights=w)
    want_grads = torch.autograd.grad(want, leaves, g_out)
    bags = make_bags(idx, offsets, w, num_embeddings=60, mode="sum")
    per_lookup = 8 * (sum(a * q * b for a, _, q, b in spec.core_shapes) + 12 * 4)  # slices, widest partial, bytes
    for chunk in (1, 2, 3, 4, 7, 10, 11):
        got_cores = [c.clone().requires_grad_() for c in cores]
        got = tt_embedding_bag(got_cores, spec, bags, "sum", chunk_bytes=chunk * per_lookup)
        torch.testing.assert_close(got, want, **TIGHT)
        for a, b in zip(torch.autograd.grad(got, got_cores, g_out), want_grads):
            torch.testing.assert_close(a, b, **TIGHT)


def test_reference_chunks_fit_their_budget_with_the_partial_products():
    """A chunk's scratch is its lookups' gathered core slices and their partial products (the widest
    is (q_1...q_k, R_k) per lookup): chunk_bytes bounds both together, not the slices alone."""
    spec = TTSpec(60, 12, (3, 4, 5), (2, 3, 2), (3, 4))
    cores = [c.requires_grad_() for c in _random_cores(spec, 1)]
    q, r = spec.tt_q_shapes, spec.ranks
    slices = sum(a * qk * b for a, _, qk, b in spec.core_shapes)
    widest = max(math.prod(q[:k + 1]) * r[k + 1] for k in range(spec.d))
    per_lookup = 8 * (slices + widest)  # float64 bytes
    n = 40
    bags = make_bags(torch.randint(0, 60, (n,), generator=_gen(0)), torch.tensor([0, 7, 7, 20, 33]), None,
                     num_embeddings=60, mode="sum")
    for budget in (per_lookup, 5 * per_lookup, 5 * per_lookup + per_lookup // 2, 13 * per_lookup):
        with mock.patch.object(reference, "checkpoint", wraps=reference.checkpoint) as ckpt:
            tt_embedding_bag(cores, spec, bags, "sum", chunk_bytes=budget)
        largest_chunk = -(-n // ckpt.call_count)
        assert largest_chunk * per_lookup <= budget


# --- bags ---------------------------------------------------------------------------------------


def test_per_sample_weights_on_another_device_are_refused_by_name():
    idx, offsets = torch.tensor([1, 2, 3]), torch.tensor([0, 1])
    w = torch.ones(3, device="meta")
    with pytest.raises(ValueError, match=r"^per_sample_weights: got device meta.*input's device cpu"):
        make_bags(idx, offsets, w, num_embeddings=10, mode="sum")


# --- init ---------------------------------------------------------------------------------------


# Boundary cores of a few hundred entries: the table's mean square over N_SEEDS draws has a relative sd
# of <= 3.7% at d = 3 and <= 7.3% at d = 4 (measured over 20 groups of 8 seeds), so VAR_TOL = 30% is
# >= 4 sd; rank-product mistakes (max(R)^(d-1) for prod(R), say) miss by factors of 3 to 15.
INIT_SHAPES = [((25, 16, 25), (4, 2, 4), (2, 16)), ((25, 16, 25), (4, 2, 4), (9, 3)),
               ((20, 5, 5, 20), (4, 2, 2, 4), (2, 5, 12))]
N_SEEDS, VAR_TOL = 8, 0.3


def _mean_square(spec, scheme):
    """The reconstructed entries' mean square (their variance: zero-mean cores), pooled over seeds."""
    sq = [float(_dense(ttrec.init_tt_cores(spec, scheme, generator=_gen(s), dtype=F64), spec).pow(2).mean())
          for s in range(N_SEEDS)]
    return sum(sq) / len(sq)


@pytest.mark.parametrize("p, q, ranks", INIT_SHAPES, ids=lambda v: "x".join(map(str, v)))
def test_calibrated_init_hits_the_target_variance_with_unequal_ranks(p, q, ranks):
    """'calibrated' draws N(0, s^2) with s^(2d) prod(R) = 1/(3N): the reconstructed entries have
    variance 1/(3N) for any ranks, equal or not (measured on the whole table)."""
    spec = TTSpec(math.prod(p), math.prod(q), p, q, ranks)
    target = 1.0 / (3 * spec.num_embeddings)
    s = (target / math.prod(ranks)) ** (1 / (2 * spec.d))  # the documented per-entry std
    assert ttrec.expected_row_std(spec, "calibrated") == pytest.approx(math.sqrt(target), rel=1e-12)
    entries = torch.cat([c.flatten() for c in ttrec.init_tt_cores(spec, "calibrated", generator=_gen(0), dtype=F64)])
    assert float(entries.std()) == pytest.approx(s, rel=0.07)  # ~2000 entries: sd of the std <= 1.7%
    assert _mean_square(spec, "calibrated") == pytest.approx(target, rel=VAR_TOL)


@pytest.mark.parametrize("p, q, ranks", INIT_SHAPES, ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("scheme", ["uniform", "normal"])
def test_rank_blind_schemes_miss_the_target_by_the_rank_product(p, q, ranks, scheme):
    """Entries of std c = (1/(3N))^(1/(2d)): a reconstructed entry sums prod(R) products of d
    entries, so its variance is prod(R) c^(2d) = prod(R)/(3N), for unequal ranks too (measured)."""
    spec = TTSpec(math.prod(p), math.prod(q), p, q, ranks)
    want = math.prod(ranks) / (3 * spec.num_embeddings)
    assert ttrec.expected_row_std(spec, scheme) ** 2 == pytest.approx(want, rel=1e-12)
    assert _mean_square(spec, scheme) == pytest.approx(want, rel=VAR_TOL)


# --- the native CPU boundary ----------------------------------------------------------------------


@native
def test_native_boundary_validates_bags_checked_for_another_table():
    """Bags that make_bags checked for a larger table are checked again for this one before any
    pointer reaches the kernel: index 47 is a padding row of p = (5, 10) (50 rows), not a row of a
    45-row table."""
    spec = TTSpec(45, 8, (5, 10), (2, 4), (3,))
    cores = [c.float() for c in _random_cores(spec, 0)]
    bags = make_bags(torch.tensor([3, 47]), torch.tensor([0, 1]), None, num_embeddings=50, mode="sum")
    with pytest.raises(ValueError, match=r"^input: got index 47 at position 1.*num_embeddings=45"):
        ops.forward(cores, spec, bags, "sum")
    with pytest.raises(ValueError, match=r"^input: got index 47"):
        ops.backward(cores, spec, bags, "sum", torch.ones(2, 8))
    with pytest.raises(ValueError, match=r"^input: got index 47"):
        ops.sparse_update(cores, spec, bags, "sum", torch.ones(2, 8), "sgd", 0.1, 1e-10,
                          [torch.zeros_like(c) for c in cores], None)


# --- module arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda **kw: TTEmbeddingBag(50, 8, 2, backend="torch", **kw),
    lambda **kw: ttrec.DenseEmbeddingBag(50, 8, **kw),
], ids=["tt", "dense"])
def test_seed_range_is_the_generators_own_both_ends(make):
    """seed in [-2**63, 2**64) (what torch.Generator.manual_seed takes): both ends are accepted and
    reproduce; one past either end is refused by name, not by the generator's bare overflow."""
    for seed in (-(2**63), 2**64 - 1):
        a, b = make(seed=seed), make(seed=seed)
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match=rf"^seed: got {seed}; allowed: None or an int in \[-2\*\*63, 2\*\*64\)"):
            make(seed=seed)


def test_a_fused_optimizer_with_the_torch_backend_is_refused_at_construction():
    """The fused update runs in the native backends only: backend='torch' with an optimizer is a
    constructor error naming both, not a module whose first forward fails."""
    for optimizer in ("sgd", "adagrad"):
        with pytest.raises(ValueError, match=r"^optimizer: .*backend='torch'"):
            TTEmbeddingBag(50, 8, 2, backend="torch", optimizer=optimizer)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
@pytest.mark.parametrize("make", [
    lambda **kw: TTEmbeddingBag(50, 8, 2, **kw),
    lambda **kw: ttrec.T3nsorEmbeddingBag(50, 8, 2, **kw),
    lambda **kw: ttrec.DenseEmbeddingBag(50, 8, **kw),
], ids=["tt", "t3nsor", "dense"])
def test_a_cuda_device_without_cuda_is_refused_by_name(make):
    for device in ("cuda", "cuda:0", torch.device("cuda", 1)):
        with pytest.raises(ValueError, match=r"^device: got 'cuda.*CUDA is not available"):
            make(device=device)
    with pytest.raises(ValueError, match=r"^device: got 'gpu'; allowed"):
        make(device="gpu")


def test_input_on_another_device_than_the_cores_is_refused_by_name():
    """The forward compares the batch's device with the cores' (meta cores stand for a GPU's here)."""
    m = TTEmbeddingBag(50, 8, 2, tt_p_shapes=(5, 10), tt_q_shapes=(2, 4), seed=0, device="meta")
    with pytest.raises(ValueError, match=r"^input: got device cpu; the cores are on meta"):
        m(torch.tensor([1, 2]), torch.tensor([0]))


@native
def test_sort_keys_of_40_bits_run_natively_and_41_bits_are_refused_before_native_code():
    """The kernel's sort keys hold 40 bits: the bits of the largest prefix (i_1..i_{d-1}) plus those
    of the last digit. p = (2^14, 2^14, 2^12) needs 28 + 12 = 40 and runs (its last rows equal the
    reference); p = (2^14, 2^14, 2^13) needs 41 and is refused by name."""
    q, r = (1, 2, 2), (2, 2)
    p40, p41 = (2**14, 2**14, 2**12), (2**14, 2**14, 2**13)
    spec40 = TTSpec(math.prod(p40), 4, p40, q, r)
    cores = [c.float() for c in _random_cores(spec40, 0)]
    assert ops.check_supported(cores, spec40) is None
    idx = torch.tensor([math.prod(p40) - 1, 0, math.prod(p40) // 3, 2**28 + 5])
    bags = make_bags(idx, torch.tensor([0, 1, 2, 3]), None, num_embeddings=spec40.num_embeddings, mode="sum")
    want = tt_embedding_bag([c.double() for c in cores], spec40, bags, "sum")
    torch.testing.assert_close(ops.forward(cores, spec40, bags, "sum").double(), want, rtol=1e-5, atol=1e-6)
    spec41 = TTSpec(math.prod(p41), 4, p41, q, r)
    cores41 = [c.float() for c in _random_cores(spec41, 0)]
    assert "41-bit sort keys" in ops.check_supported(cores41, spec41)
    with pytest.raises(ValueError, match=r"^backend='cpu': tt_p_shapes=.*41-bit sort keys.*up to 40"):
        TTEmbeddingBag(spec41.num_embeddings, 4, r, p41, q, backend="cpu", seed=0)
    auto = TTEmbeddingBag(spec41.num_embeddings, 4, r, p41, q, seed=0)
    assert auto.resolved_backend() == "torch"


@native
@pytest.mark.parametrize("shape", [(16, 2), (1, 32), (2, 16, 1), (32,)])
def test_grad_out_of_the_right_size_but_another_shape_is_refused(shape):
    """ops.backward reads grad_out through its pointer as (num_bags, D): a tensor holding as many
    values in another shape (a transpose, a flat vector) would give wrong gradients silently."""
    spec = TTSpec(210, 16, (5, 6, 7), (2, 2, 4), (3, 4))
    cores = [c.float() for c in _random_cores(spec, 0)]
    bags = make_bags(torch.tensor([1, 2, 3]), torch.tensor([0, 1]), None, num_embeddings=210, mode="sum")
    with pytest.raises(ValueError, match=rf"^grad_out: got shape {re.escape(str(shape))}; expected \(2, 16\)"):
        ops.backward(cores, spec, bags, "sum", torch.ones(shape))
    with pytest.raises(ValueError, match=r"^grad_out: got shape"):
        ops.sparse_update(cores, spec, bags, "sum", torch.ones(shape), "sgd", 0.1, 1e-10,
                          [torch.zeros_like(c) for c in cores], None)


@native
@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.int64])
def test_touched_masks_of_another_dtype_are_refused(dtype):
    """The kernel writes one byte per digit value into the touched masks: wider masks of the right
    length would be written byte-wise and read back wrong, so only uint8 is taken."""
    spec = TTSpec(210, 16, (5, 6, 7), (2, 2, 4), (3, 4))
    cores = [c.float() for c in _random_cores(spec, 0)]
    bags = make_bags(torch.tensor([1, 2, 3]), torch.tensor([0, 1]), None, num_embeddings=210, mode="sum")
    touched = [torch.zeros(p, dtype=torch.uint8) for p in spec.tt_p_shapes]
    touched[1] = torch.zeros(6, dtype=dtype)
    with pytest.raises(ValueError, match=rf"^touched\[1\]: got {dtype} \(6,\) on cpu; expected contiguous uint8"):
        ops.backward(cores, spec, bags, "sum", torch.ones(2, 16), touched=touched)


@native
def test_adagrad_without_accumulators_is_refused_by_name():
    spec = TTSpec(210, 16, (5, 6, 7), (2, 2, 4), (3, 4))
    cores = [c.float() for c in _random_cores(spec, 0)]
    before = [c.clone() for c in cores]
    bags = make_bags(torch.tensor([1, 2, 3]), torch.tensor([0, 1]), None, num_embeddings=210, mode="sum")
    with pytest.raises(ValueError, match=r"^state: Adagrad needs accumulators shaped like the cores"):
        ops.sparse_update(cores, spec, bags, "sum", torch.ones(2, 16), "adagrad", 0.1, 1e-10,
                          [torch.zeros_like(c) for c in cores], None)
    assert all(torch.equal(a, b) for a, b in zip(cores, before))


@native
def test_cores_with_the_right_size_but_another_shape_are_refused_before_native_code():
    """The kernel reads each core as (R_{k-1}, p_k, q_k, R_k) through its pointer: a core holding as
    many values in another layout (p and q swapped) is refused by name."""
    spec = TTSpec(210, 16, (5, 6, 7), (2, 2, 4), (3, 4))
    cores = [c.float() for c in _random_cores(spec, 0)]
    cores[2] = cores[2].reshape(4, 4, 7, 1).contiguous()  # (R2, q3, p3, R3) instead of (R2, p3, q3, R3)
    assert ops.check_supported(cores, spec) == "core 2 has shape (4, 4, 7, 1), expected (4, 7, 4, 1)"
    bags = make_bags(torch.tensor([1, 2, 3]), torch.tensor([0, 1]), None, num_embeddings=210, mode="sum")
    with pytest.raises(ValueError, match=r"^backend='cpu': core 2 has shape \(4, 4, 7, 1\)"):
        ops.forward(cores, spec, bags, "sum")
    with pytest.raises(ValueError, match=r"^backend='cpu': core 2 has shape"):
        ops.backward(cores, spec, bags, "sum", torch.ones(2, 16))


# --- registry -------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["dense", "t3nsor"])
def test_build_embedding_refuses_a_fused_optimizer_for_impls_without_one(impl):
    """Only 'tt' has a fused update: asking another impl for one is an error, not a module that
    silently trains with none (the sweep's 'fused' column would then be wrong)."""
    with pytest.raises(ValueError, match=rf"^optimizer: a fused update exists for impl 'tt' only, got impl='{impl}'"):
        ttrec.build_embedding(impl, 200, 8, tt_ranks=4, tt_p_shapes=(5, 6, 7), tt_q_shapes=(2, 2, 2),
                              optimizer="sgd")


@pytest.mark.parametrize("impl", ["tt", "t3nsor", "dense"])
def test_build_embedding_is_reproducible_without_a_seed(impl):
    """build_embedding's seed defaults to 0 (a config always names one): two builds are equal, and
    equal to seed=0."""
    kw = dict(tt_ranks=4, tt_p_shapes=(5, 6, 7), tt_q_shapes=(2, 2, 2))
    a, b, c = (ttrec.build_embedding(impl, 200, 8, **kw, **extra) for extra in ({}, {}, {"seed": 0}))
    for x, y, z in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)


@pytest.mark.parametrize("impl", ["tt", "t3nsor"])
@pytest.mark.parametrize("init", ["uniform", "normal", "sampled_gaussian"])
def test_build_embedding_passes_the_init_scheme_on(impl, init):
    """The scheme reaches the cores: they are init_tt_cores(spec, init) from the seeded generator."""
    spec = TTSpec(200, 8, (5, 6, 7), (2, 2, 2), (4, 4))
    m = ttrec.build_embedding(impl, 200, 8, tt_ranks=4, tt_p_shapes=(5, 6, 7), tt_q_shapes=(2, 2, 2), init=init, seed=3)
    assert m.init == init
    want = ttrec.init_tt_cores(spec, init, generator=_gen(3))
    assert all(torch.equal(a, b) for a, b in zip(m.tt_cores, want, strict=True))
    if init == "uniform":  # inside the scheme's support +-sqrt(3) c
        c = ttrec.target_row_std(200) ** (1 / 3)
        assert all(bool((x.abs() <= math.sqrt(3) * c).all()) for x in m.tt_cores)


# --- fused optimizers -----------------------------------------------------------------------------


@native
@pytest.mark.parametrize("lr, eps", [(0.3, 0.5), (0.02, 1e-3)])
def test_fused_adagrad_uses_its_eps_and_keeps_torchs_accumulator(lr, eps):
    """h += g^2, w -= lr g / (sqrt(h) + eps), as torch.optim.Adagrad, with an eps large against
    sqrt(h) (small gradients): a kernel that used another eps would differ. The accumulators equal
    torch's state 'sum' after two steps."""
    p, q, r = (5, 6, 7), (2, 2, 4), (3, 4)
    fused = TTEmbeddingBag(210, 16, r, p, q, backend="cpu", seed=0, optimizer="adagrad", learning_rate=lr, eps=eps)
    ref = TTEmbeddingBag(210, 16, r, p, q, backend="torch", seed=0, dtype=F64)
    with torch.no_grad():
        for a, b in zip(ref.tt_cores, fused.tt_cores):
            a.copy_(b.double())
    opt = torch.optim.Adagrad(ref.parameters(), lr=lr, eps=eps)
    g = _gen(1)
    for _ in range(2):
        idx = torch.randint(0, 210, (12,), generator=g)
        offsets = torch.tensor([0, 5, 5, 9])
        grad_out = 1e-3 * torch.randn(4, 16, generator=g, dtype=F64)
        fused(idx, offsets).backward(grad_out.float())
        opt.zero_grad()
        ref(idx, offsets).backward(grad_out)
        opt.step()
    for k, (a, b) in enumerate(zip(fused.tt_cores, ref.tt_cores)):
        torch.testing.assert_close(a.detach().double(), b.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(getattr(fused, f"adagrad_state_{k}").double(), opt.state[b]["sum"],
                                   rtol=1e-4, atol=1e-12)


@native
def test_five_cores_are_refused_by_the_native_kernel_and_auto_takes_the_reference():
    """The kernel's shape record holds at most 4 cores (d = 2..4): d = 5 is refused by name before
    native code, and backend 'auto' computes it with the reference (equal to the dense table)."""
    p, q, r = (2, 3, 2, 2, 3), (1, 2, 1, 2, 1), (2, 3, 2, 2)
    spec = TTSpec(math.prod(p), math.prod(q), p, q, r)
    cores = [c.float() for c in _random_cores(spec, 0)]
    assert ops.check_supported(cores, spec) == "d=5 cores; the native kernel supports 2..4"
    bags = make_bags(torch.tensor([0, 71, 5]), torch.tensor([0, 2]), None, num_embeddings=72, mode="sum")
    with pytest.raises(ValueError, match=r"^backend='cpu': d=5 cores; the native kernel supports 2\.\.4"):
        ops.forward(cores, spec, bags, "sum")
    with pytest.raises(ValueError, match=r"^backend='cpu': d=5 cores"):
        TTEmbeddingBag(72, 4, r, p, q, backend="cpu", seed=0)
    m = TTEmbeddingBag(72, 4, r, p, q, seed=0)  # float32 cores: only d keeps it off the native kernel
    assert m.resolved_backend() == "torch"
    x, offsets = torch.tensor([0, 71, 5]), torch.tensor([0, 2])
    want = F.embedding_bag(x, _dense([c.detach().double() for c in m.tt_cores], spec), offsets, mode="sum")
    torch.testing.assert_close(m(x, offsets).double(), want, rtol=1e-5, atol=1e-7)


@native
@pytest.mark.parametrize("saved", [object(), 12345, "plan"])
def test_a_saved_plan_that_is_not_one_is_refused_by_name(saved):
    spec = TTSpec(210, 16, (5, 6, 7), (2, 2, 4), (3, 4))
    cores = [c.float() for c in _random_cores(spec, 0)]
    bags = make_bags(torch.tensor([1, 2, 3]), torch.tensor([0, 1]), None, num_embeddings=210, mode="sum")
    with pytest.raises(TypeError, match=rf"^saved: got {type(saved).__name__}; expected SavedForward or None"):
        ops.backward(cores, spec, bags, "sum", torch.ones(2, 16), saved=saved)
