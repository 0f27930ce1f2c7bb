"""Checks shared by the native-kernel tests: forward, core gradients and a fused SGD step against the reference;
and the small TT specs and seeded cores they are run on."""

from __future__ import annotations

import ctypes
import math
import re

import torch

import ttrec
from ttrec.cpu import build, ops


def spec_of(p, q, r, rows=None) -> ttrec.TTSpec:
    """The TT spec of row factors p, column factors q and inner ranks r (all rows of prod(p) unless ``rows``)."""
    return ttrec.TTSpec(math.prod(p) if rows is None else rows, math.prod(q), tuple(p), tuple(q), tuple(r))


def normal_cores(spec, seed: int = 0) -> list[torch.Tensor]:
    """Cores of ``spec`` by the "normal" init, seeded."""
    return ttrec.init_tt_cores(spec, "normal", generator=torch.Generator().manual_seed(seed))


def reference_with_grads(cores, spec, bags, grad_out, mode: str):
    """The float64 reference forward and its core gradients for grad_out (autograd)."""
    ref_cores = [c.double().requires_grad_() for c in cores]
    want = ttrec.tt_embedding_bag(ref_cores, spec, bags, mode)
    return want.detach(), torch.autograd.grad(want, ref_cores, grad_out.double())


def assert_matches_reference(cores, spec, bags, grad_out, mode: str = "sum") -> None:
    """ops.forward and ops.backward equal the float64 reference and its autograd (fp32 tolerances
    scaled by the largest reference value)."""
    want, want_grads = reference_with_grads(cores, spec, bags, grad_out, mode)
    got = ops.forward(cores, spec, bags, mode)
    torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    grads = ops.backward(cores, spec, bags, mode, grad_out)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a.double(), b, atol=1e-5 * b.abs().max().item(), rtol=1e-4)


def assert_fused_sgd_matches_reference(cores, spec, bags, grad_out, lr: float = 0.1, mode: str = "sum") -> None:
    """One fused SGD step (ops.sparse_update) moves every core by -lr x the float64 reference
    gradient, and leaves its gradient scratch zero."""
    ref_grads = reference_with_grads(cores, spec, bags, grad_out, mode)[1]
    new = [c.clone() for c in cores]
    scratch = [torch.zeros_like(c) for c in cores]
    ops.sparse_update(new, spec, bags, mode, grad_out, "sgd", lr, 0.0, scratch, None)
    for c_new, c_old, g in zip(new, cores, ref_grads):
        step = -lr * g
        torch.testing.assert_close((c_new.double() - c_old.double()), step,
                                   atol=1e-5 * step.abs().max().item() + 1e-6 * c_old.abs().max().item(), rtol=1e-4)
    assert all(not s.any() for s in scratch)


def assert_few_prefix_update_has_gemm_bits(r) -> None:
    """With SGD a bucket of at most kFewPrefixes (plan.h; 8) prefixes updates G_2's slice in one pass over
    it (slice_sgd_dp1), a bigger one by the GEMM (gemm_tn_acc): both add the same fused multiply-adds in
    the same order, whatever the compiler contracts. One fused step on kFewPrefixes lookups of one i_2
    bucket (i_1 = 0, 1, ...), then on the same and one more (the next i_1, the same i_2) whose upstream
    gradient row is zero: its terms add nothing, so G_2 after the step is bitwise the same. (G_1 may
    differ: the one-pass path sums dP_1 in another order.) r = (R_1, R_2): R_1 a multiple of 16,
    2 R_2 <= 64."""
    few = int(re.search(r"constexpr int64_t kFewPrefixes = (\d+);", (build.HERE / "plan.h").read_text()).group(1))
    p, q = (few + 4, 5, 7), (2, 2, 4)
    g = torch.Generator().manual_seed(sum(r))
    i1, i2, i3 = torch.arange(few + 1), 2, torch.randint(0, p[2], (few + 1,), generator=g)
    idx = (i1 * p[1] + i2) * p[2] + i3
    grad_out = torch.randn(few + 1, 16, generator=g)
    grad_out[few] = 0
    slices = []
    for n in (few, few + 1):  # kFewPrefixes prefixes: the one-pass path; one more: the GEMM
        m = ttrec.TTEmbeddingBag(math.prod(p), 16, r, p, q, backend="cpu", seed=5, optimizer="sgd", learning_rate=0.5)
        before = m.tt_cores[1].detach()[:, i2].clone()
        m(idx[:n], torch.arange(n)).backward(grad_out[:n])
        slices.append(m.tt_cores[1].detach()[:, i2].clone())
        assert not torch.equal(slices[-1], before)
    assert torch.equal(slices[0], slices[1]), "G_2's slice: the one-pass SGD path's bits differ from the GEMM's"


def assert_fused_module_steps_match_torch(optimizer: str, idx, offsets, grad_out, each_step=None):
    """Two fused steps of a native TTEmbeddingBag (15,000 x 16, p = (30, 20, 25), q = (2, 2, 4), R = 16,
    lr 0.05) equal the same steps of torch's SGD / Adagrad on a float64 reference module with the same
    cores; ``each_step()`` runs after each fused step. Returns the fused module."""
    p, q, r = (30, 20, 25), (2, 2, 4), (16, 16)
    lr = 0.05
    fused = ttrec.TTEmbeddingBag(15000, 16, r, p, q, backend="cpu", seed=1, optimizer=optimizer, learning_rate=lr)
    ref = ttrec.TTEmbeddingBag(15000, 16, r, p, q, backend="torch", seed=1, dtype=torch.float64)
    with torch.no_grad():
        for c_ref, c in zip(ref.tt_cores, fused.tt_cores):
            c_ref.copy_(c.double())
    opt = (torch.optim.SGD(ref.parameters(), lr=lr) if optimizer == "sgd"
           else torch.optim.Adagrad(ref.parameters(), lr=lr, eps=1e-10))
    for _ in range(2):
        fused(idx, offsets).backward(grad_out.float())
        if each_step is not None:
            each_step()
        opt.zero_grad()
        ref(idx, offsets).backward(grad_out)
        opt.step()
    for c_fused, c_ref in zip(fused.tt_cores, ref.tt_cores):
        torch.testing.assert_close(c_fused.detach().double(), c_ref.detach(), rtol=2e-4, atol=1e-6)
    return fused


def assert_fma_loop_does_what_it_counts(lib, threads: int, chains: int) -> None:
    """The FMA-peak loop's FLOP count is the work it did: every accumulator of every thread starts at
    its chain number k and gains x * a + y - a = 1 per iteration (x = y = 1, exact below 2^24), so after
    n iterations the lanes sum to threads * 16 * sum(k + n), and the FLOPs are threads * n * 2 * 16 *
    chains. A loop that skipped iterations, ran fewer chains than its build's, or counted more than it
    ran, breaks one of them."""
    for n in (1, 1000, 5000):  # (5000 crosses the loop's blocks of 4,096)
        flops, checksum = ctypes.c_double(), ctypes.c_double()
        rate = lib.tt_fma_peak_gflops(threads, n, 1e9, 1.0, 1.0, ctypes.byref(flops), ctypes.byref(checksum))
        assert rate > 0 and flops.value == threads * n * 2 * 16 * chains
        assert checksum.value == threads * 16 * sum(k + n for k in range(chains))
