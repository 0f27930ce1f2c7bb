"""The native CPU kernel's Python boundary under hostile input: whatever reaches ttrec.cpu.ops
(through TTEmbeddingBag or directly) either gets the reference backend's answer or a clear error
naming the parameter, never a crash in native code or a silently different answer.

Cases that crashed the old code (a read through an index or offset that was never validated) run
in a subprocess, so a crash shows as a failed test with the signal, not a dead test session.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ttrec
from ttrec.bags import make_bags
from ttrec.cpu import ops
from ttrec.cpu.build import unavailable_reason

from .native_reference import reference_with_grads

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=f"native kernel: {unavailable_reason()}")

ROOT = Path(__file__).resolve().parents[1]


def _isolated(code: str) -> str:
    """Run ``code`` in a fresh interpreter; its stdout, once it exited normally (a native crash
    ends it by a signal: the test fails with that signal and what was printed until then)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, f"exit {done.returncode} (negative: killed by that signal)\n{done.stdout}\n{done.stderr[-3000:]}"
    return done.stdout


def _spec(p, q, r):
    return ttrec.TTSpec(math.prod(p), math.prod(q), tuple(p), tuple(q), tuple(r))


def _cores(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ttrec.init_tt_cores(spec, "normal", generator=g)


def _module(backend, d, **kw):
    p, q, r = ((5, 6, 7), (2, 2, 4), (3, 4)) if d == 3 else ((5, 6, 7, 3), (2, 2, 2, 2), (3, 4, 2))
    return ttrec.TTEmbeddingBag(math.prod(p), math.prod(q), r, p, q, backend=backend, seed=0, **kw)


# The backward of the native kernel reads the batch again (d = 3 only through its kept plan, d = 4
# always): a batch changed in place since the forward was read as it was then, out of range included.
@pytest.mark.parametrize("d", [3, 4])
@pytest.mark.parametrize("optimizer", [None, "sgd"])
@pytest.mark.parametrize("change,name", [("inp[1] = 10**12", "input"), ("inp[1] = -5", "input"),
                                         ("off[1] = 10**9", "offsets"), ("off[2] = 10**12", "offsets"),
                                         ("off[1] = 0", "offsets")])
def test_a_batch_changed_in_place_after_the_forward_is_refused_by_the_backward(d, optimizer, change, name):
    out = _isolated(f"""
        import math, torch, ttrec
        p, q, r = {((5, 6, 7), (2, 2, 4), (3, 4)) if d == 3 else ((5, 6, 7, 3), (2, 2, 2, 2), (3, 4, 2))}
        m = ttrec.TTEmbeddingBag(math.prod(p), math.prod(q), r, p, q, backend="cpu", seed=0,
                                 include_last_offset=True, optimizer={optimizer!r})
        inp, off = torch.tensor([1, 2, 3, 100]), torch.tensor([0, 2, 4])
        y = m(inp, off)
        {change}
        try:
            y.sum().backward()
            print("no error")
        except RuntimeError as e:
            print("RuntimeError:", e)
    """)
    assert out.startswith(f"RuntimeError: {name} (version 1, expected 0): modified by an in-place operation"), out


@pytest.mark.parametrize("d", [3, 4])
@pytest.mark.parametrize("what", ["input", "per_sample_weights"])
def test_an_in_range_change_is_refused_as_nn_embedding_bag_and_the_reference_refuse_it(d, what):
    """Before: the backward silently gave the gradients of the changed batch (d = 4) or of a mix
    (the weights, d = 3); nn.EmbeddingBag and the reference backend raise instead."""
    for backend in ("torch", "cpu"):
        m = _module(backend, d)
        inp, w = torch.tensor([1, 2, 3, 100]), torch.rand(4)
        y = m(inp, torch.tensor([0, 2]), w)
        (inp if what == "input" else w)[1] = 7
        if backend == "torch" and what == "input":  # the reference keeps the digits it gathered: right as it is
            y.sum().backward()
            continue
        with pytest.raises(RuntimeError, match="modified by an inplace operation" if backend == "torch"
                           else f"{what} \\(version 1, expected 0\\): modified by an in-place operation"):
            y.sum().backward()


def test_a_batch_changed_in_place_after_make_bags_is_validated_again_before_native_code():
    out = _isolated("""
        import torch, ttrec
        from ttrec.bags import make_bags
        from ttrec.cpu import ops
        spec = ttrec.TTSpec(210, 16, (5, 6, 7), (2, 2, 4), (3, 4))
        cores = ttrec.init_tt_cores(spec, "normal")
        for change in ("b.indices[1] = 10**12", "b.offsets[-1] = 10**9", "b.offsets[1] = 10**6"):
            b = make_bags(torch.tensor([1, 2, 3]), torch.tensor([0, 1]), None, num_embeddings=210, mode="sum")
            exec(change)
            for call in (lambda: ops.forward(cores, spec, b, "sum"),
                         lambda: ops.backward(cores, spec, b, "sum", torch.ones(2, 16))):
                try:
                    call()
                    print("no error")
                except ValueError as e:
                    print("ValueError:", e)
    """).splitlines()
    assert len(out) == 6
    assert all(line.startswith("ValueError: input: got index 1000000000000 at position 1") for line in out[:2]), out
    assert all(line.startswith("ValueError: offsets: got ") for line in out[2:]), out


def test_buffers_off_the_cpu_or_not_dense_floats_are_refused_before_native_code():
    out = _isolated("""
        import torch, ttrec
        from ttrec.bags import make_bags
        from ttrec.cpu import ops
        spec = ttrec.TTSpec(210, 16, (5, 6, 7), (2, 2, 4), (3, 4))
        cores = ttrec.init_tt_cores(spec, "normal")
        b = make_bags(torch.tensor([1, 2, 3]), torch.tensor([0, 1]), None, num_embeddings=210, mode="sum")
        g = torch.ones(2, 16)
        cases = [
            lambda: ops.backward(cores, spec, b, "sum", torch.ones(2, 16, device="meta")),
            lambda: ops.backward(cores, spec, b, "sum", g, touched=[torch.zeros(p, dtype=torch.uint8, device="meta")
                                                                   for p in spec.tt_p_shapes]),
            lambda: ops.backward(cores, spec, b, "sum", g.to_sparse()),
            lambda: ops.backward(cores, spec, b, "sum", torch.ones(2, 16, dtype=torch.complex64)),
            lambda: ops.backward(cores, spec, b, "sum", [[0.0] * 16] * 2),
        ]
        for call in cases:
            try:
                call()
                print("no error")
            except (ValueError, TypeError) as e:
                print(type(e).__name__ + ":", e)
    """).splitlines()
    assert len(out) == 5, out
    assert out[0].startswith("ValueError: grad_out: got a torch.float32 tensor (torch.strided) on meta; expected"), out
    assert out[1].startswith("ValueError: touched[0]: got torch.uint8 (5,) on meta; expected"), out
    assert out[2].startswith("ValueError: grad_out: got a torch.float32 tensor (torch.sparse_coo) on cpu"), out
    assert out[3].startswith("ValueError: grad_out: got a torch.complex64 tensor"), out
    assert out[4].startswith("TypeError: grad_out: got list; expected a torch.Tensor of shape (2, 16)"), out


def _bags(idx, offsets, w=None, rows=210):
    return make_bags(torch.tensor(idx), torch.tensor(offsets), None if w is None else torch.tensor(w),
                     num_embeddings=rows, mode="sum")


def _assert_reference_grads(grads, cores, spec, bags, grad_out):
    for got, want in zip(grads, reference_with_grads(cores, spec, bags, grad_out, "sum")[1]):
        torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("other", ["other indices", "weights added", "cores changed in place", "cores replaced"])
def test_a_kept_plan_is_used_only_for_its_own_batch_and_cores(other):
    """ops.backward(saved=...) with another batch of as many lookups, or after the cores changed,
    used the plan anyway: the gradients of the forward's lookups or core values, silently."""
    spec = _spec((5, 6, 7), (2, 2, 4), (3, 4))
    cores = _cores(spec)
    first = _bags([1, 2, 3, 4], [0, 1, 2, 3])
    _, saved = ops._forward(cores, spec, first, "sum", keep=True)
    assert saved is not None and saved.current()
    bags = first
    if other == "other indices":
        bags = _bags([100, 50, 7, 9], [0, 1, 2, 3])
    elif other == "weights added":
        bags = _bags([1, 2, 3, 4], [0, 1, 2, 3], [2.0, 3.0, 4.0, 5.0])
    elif other == "cores changed in place":
        with torch.no_grad():
            cores[0].mul_(3)
    else:
        cores = _cores(spec, seed=1)
    grad_out = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    try:
        grads = ops.backward(cores, spec, bags, "sum", grad_out, saved=saved)
    finally:
        saved.release()
    _assert_reference_grads(grads, cores, spec, bags, grad_out)


def test_a_kept_plan_is_still_used_by_the_modules_backward(monkeypatch):
    """The checks above must not cost the module its kept plan (d = 3, one chunk): every backward
    of a forward that kept one uses it, with and without the fused update."""
    fits = []
    original = ops.SavedForward.fits
    monkeypatch.setattr(ops.SavedForward, "fits", lambda self, c, b: fits.append(original(self, c, b)) or fits[-1])
    for optimizer in (None, "sgd", "adagrad"):
        m = _module("cpu", 3, optimizer=optimizer)
        for _ in range(2):
            m(torch.tensor([1, 2, 3, 100]), torch.tensor([0, 2])).sum().backward()
    assert fits == [True] * 6


def _neg_view(t):
    """``t``'s values stored negated, with torch's negative bit set: reads as ``t`` in torch."""
    return torch._neg_view(-t)


def test_negative_views_are_read_as_the_values_they_stand_for():
    """A negative view (the imaginary part of a conj view; torch._neg_view) keeps its sign in a
    flag: the kernel read the raw memory, so the weights' or a core's sign was lost."""
    ref, cpu = _module("torch", 3), _module("cpu", 3)
    inp, off = torch.tensor([1, 2, 3, 100]), torch.tensor([0, 2])
    z = torch.tensor([0.5 + 2.0j], dtype=torch.complex64).conj().imag  # the public way to one: -2.0, one element
    assert z.is_neg() and z.is_contiguous()
    torch.testing.assert_close(cpu(inp[:1], off[:1], z), ref(inp[:1], off[:1], z))
    w = _neg_view(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(cpu(inp, off, w), ref(inp, off, w))
    with torch.no_grad():
        cpu.tt_cores[1] = torch.nn.Parameter(_neg_view(cpu.tt_cores[1].detach().clone()))
    assert cpu.tt_cores[1].is_neg()
    y, y_ref = cpu(inp, off), ref(inp, off)
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    for a, b in zip(cpu.tt_cores, ref.tt_cores):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="input: got index -1 at position 0"):  # stands for [-1, -2]
        cpu(torch._neg_view(torch.tensor([1, 2])), torch.tensor([0]))


def test_a_fused_update_refuses_a_negative_view_core_it_would_write_raw():
    m = _module("cpu", 3, optimizer="sgd")
    with torch.no_grad():
        m.tt_cores[1] = torch.nn.Parameter(_neg_view(m.tt_cores[1].detach().clone()))
    y = m(torch.tensor([1, 2, 3, 100]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"cores\[1\]: got a negative view of shape \(3, 6, 2, 4\)"):
        y.sum().backward()


def test_sparse_batches_are_refused_naming_the_parameter():
    m = _module("cpu", 3)
    with pytest.raises(TypeError, match="input: got a torch.sparse_coo tensor; expected a dense"):
        m(torch.tensor([1, 2]).to_sparse(), torch.tensor([0]))
    with pytest.raises(TypeError, match="offsets: got a torch.sparse_coo tensor"):
        m(torch.tensor([1, 2]), torch.tensor([0, 1]).to_sparse())
    with pytest.raises(TypeError, match="per_sample_weights: got a torch.sparse_coo tensor"):
        m(torch.tensor([1, 2]), torch.tensor([0]), torch.ones(2).to_sparse())


def test_a_second_derivative_through_the_kernel_is_an_error_not_a_silently_missing_term():
    """A gradient penalty through the native backend: its core gradients had no graph, so
    torch.autograd.grad of loss + |grad|^2 returned the loss's gradient alone (the reference's
    second-order term silently dropped)."""
    inp, off = torch.tensor([1, 2, 3, 100]), torch.tensor([0, 2])
    grads = {}
    for backend in ("torch", "cpu"):
        m = _module(backend, 3)
        loss = (m(inp, off) ** 2).sum()
        grads[backend] = torch.autograd.grad(loss, list(m.tt_cores), create_graph=True)  # first order: still right
        penalty = sum((g ** 2).sum() for g in grads[backend])
        if backend == "torch":
            torch.autograd.grad(loss + penalty, list(m.tt_cores))  # the reference has second derivatives
        else:
            with pytest.raises(RuntimeError, match="a second derivative through the native CPU kernel"):
                torch.autograd.grad(loss + penalty, list(m.tt_cores))
    for a, b in zip(grads["cpu"], grads["torch"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("q,r", [((1, 2), (2**30,)), ((2**16, 2**15), (2,)), ((2, 2, 2), (2**15, 2**16))])
def test_shapes_past_the_kernels_32_bit_counts_are_refused_before_native_code(q, r):
    """tt_shape_t holds q_k and R_k in 32-bit ints, and the GEMMs take 32-bit sizes: a partial
    product's row width (q_1...q_k R_k+1) or a slice (R_k q_k R_k+1) of 2^31 floats or more would
    wrap (not reproduced: such cores take >= 8 GB); refused by the spec, so 'auto' takes the reference."""
    p = (3,) * len(q)
    spec = ttrec.TTSpec(math.prod(p), math.prod(q), p, q, r)
    widths = [max(math.prod(q[:k + 1]) * spec.ranks[k + 1], spec.ranks[k] * q[k] * spec.ranks[k + 1])
              for k in range(spec.d)]
    assert max(widths) >= 2**31
    assert "32-bit ints" in ops.check_supported([], spec)
    # one below the limit passes the spec check (and reaches the core checks)
    small = ttrec.TTSpec(math.prod(p), math.prod(q[:-1]), p, (*q[:-1], 1), tuple(min(x, 2**14) for x in r))
    assert ops.check_supported([], small) == f"got 0 cores; the spec has d={small.d}"
