"""What every kernel's backward refuses (ttrec.autograd_guards), on each path that has a backward of
its own: the native CPU kernel, the CUDA kernels (run on the CPU by the emulation of
tests/test_cuda_emulated.py) and the LFU cache's fused rows.

- a batch changed in place between the forward and the backward (the backward reads it again);
- a second derivative through a kernel's gradients (they have no graph: the term would be missing);
- a second backward through a fused optimizer's graph (retain_graph=True): the update would run twice.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

import ttrec
from ttrec.bags import make_bags
from ttrec.cache import CachedTTEmbeddingBag
from ttrec.cpu.build import unavailable_reason
from ttrec.cuda import loader

needs_native = pytest.mark.skipif(unavailable_reason() is not None, reason=f"native kernel: {unavailable_reason()}")
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
if shutil.which("g++") is not None:
    from tests.test_cuda_emulated import CASES, EmuLauncher, emu_lib, make_cores  # noqa: F401 (emu_lib: fixture)

P, Q, R = (5, 6, 7), (2, 2, 4), (3, 4)


def _module(backend="cpu", **kw) -> ttrec.TTEmbeddingBag:
    return ttrec.TTEmbeddingBag(math.prod(P), math.prod(Q), R, P, Q, backend=backend, seed=0, **kw)


def _cores(m) -> list[torch.Tensor]:
    return [c.detach().clone() for c in m.tt_cores]


# ---- the CUDA kernels' autograd Function (emulated) ----

@pytest.fixture
def cuda_case(emu_lib):
    spec = CASES["d3-D16-R64-kaggle-q"]
    bags = make_bags(torch.tensor([1, 2, 3, 100, 7]), torch.tensor([0, 2]), None, num_embeddings=spec.num_embeddings,
                     mode="sum")
    return EmuLauncher(emu_lib), spec, [c.requires_grad_() for c in make_cores(spec, 4)], bags


@needs_gxx
@pytest.mark.parametrize("change,name", [("indices", "input"), ("offsets", "offsets")])
def test_cuda_backward_refuses_a_batch_changed_in_place_since_the_forward(cuda_case, change, name):
    """Before: the backward read the changed batch (gradients of other rows, silently; an index
    changed out of range would have been read on the GPU unchecked)."""
    emu, spec, cores, bags = cuda_case
    y = loader.tt_bag_cuda(cores, spec, bags, "sum", launcher=emu)
    getattr(bags, change)[1] = 3  # in range, and offsets still non-decreasing: only the version shows it
    with pytest.raises(RuntimeError, match=f"^{name} \\(version 1, expected 0\\): modified by an in-place operation "
                                           "between the forward and the backward; the CUDA kernel's backward"):
        y.sum().backward()


@needs_gxx
def test_cuda_second_derivative_is_an_error_and_first_order_gradients_stay_right(cuda_case):
    emu, spec, cores, bags = cuda_case
    loss = (loader.tt_bag_cuda(cores, spec, bags, "sum", launcher=emu) ** 2).sum()
    grads = torch.autograd.grad(loss, cores, create_graph=True)
    leaves = [c.detach().clone().requires_grad_() for c in cores]
    expected = torch.autograd.grad((ttrec.tt_embedding_bag(leaves, spec, bags, "sum") ** 2).sum(), leaves)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=2e-5, atol=2e-5)
    with pytest.raises(RuntimeError, match="a second derivative through the CUDA kernel"):
        torch.autograd.grad(loss + sum((g ** 2).sum() for g in grads), cores)


@needs_gxx
def test_cuda_fused_hook_runs_once_per_forward(cuda_case):
    emu, spec, cores, bags = cuda_case
    calls = []
    y = loader.tt_bag_cuda(cores, spec, bags, "sum", fused=lambda *a: calls.append(a), launcher=emu)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="a second backward through the same forward of the CUDA kernel with a "
                                           "fused optimizer"):
        y.sum().backward()
    assert len(calls) == 1


# ---- the native CPU kernel's fused update ----

@needs_native
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_cpu_fused_update_runs_once_per_forward(optimizer):
    """Before: backward(retain_graph=True) twice applied two steps (the second from the forward's
    rows, though the first step had changed the cores since)."""
    inp, off = torch.tensor([1, 2, 3, 100]), torch.tensor([0, 2])
    fused, plain = _module(optimizer=optimizer, learning_rate=0.1), _module()
    y = fused(inp, off)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="a second backward through the same forward of the native CPU kernel"):
        y.sum().backward()
    # the cores hold exactly one step: torch.optim's step on the reference gradients
    opt = (torch.optim.SGD(plain.parameters(), lr=0.1) if optimizer == "sgd"
           else torch.optim.Adagrad(plain.parameters(), lr=0.1, eps=fused.eps))
    plain(inp, off).sum().backward()
    opt.step()
    for a, b in zip(_cores(fused), _cores(plain)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    fused(inp, off).sum().backward()  # a new forward: a new step is allowed


@needs_native
def test_cpu_backward_without_fused_update_may_run_twice_on_a_retained_graph():
    """Ordinary gradients accumulate over two backwards, as autograd's own ops do (2x one backward)."""
    m, inp, off = _module(), torch.tensor([1, 2, 3, 100]), torch.tensor([0, 2])
    y = m(inp, off)
    y.sum().backward(retain_graph=True)
    once = [c.grad.clone() for c in m.tt_cores]
    y.sum().backward()
    for c, g in zip(m.tt_cores, once):
        torch.testing.assert_close(c.grad, 2 * g)


# ---- the LFU cache's fused rows ----

def test_cache_fused_update_runs_once_per_forward():
    """Before: the cached rows took a second SGD step from the same forward."""
    tt = _module(backend="torch")
    m = CachedTTEmbeddingBag(tt, cache_fraction=0.05, warmup_iters=1, refresh_every=0, optimizer="sgd",
                             learning_rate=0.1)
    inp, off = torch.tensor([1, 2, 3, 100, 1, 1]), torch.tensor([0, 2, 4])
    m.train()
    m(inp, off)  # counted (warm-up); the next call populates the cache with the rows seen
    y = m(inp, off)
    assert m._hits > 0, "the fused cached rows are in this forward"
    before = m.cache_weight.detach().clone()
    y.sum().backward(retain_graph=True)
    after_one = m.cache_weight.detach().clone()
    with pytest.raises(RuntimeError, match="a second backward through the same forward of the LFU cache"):
        y.sum().backward()
    assert torch.equal(m.cache_weight.detach(), after_one) and not torch.equal(after_one, before)
