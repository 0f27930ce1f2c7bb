"""The native forward keeps its plan (sorted lookups, prefix runs, prefix partial products) for the
backward (d = 3): the gradients must equal those recomputed from scratch, nothing may be kept
without a backward to come, and a plan must never be used after the cores changed."""

from __future__ import annotations

import gc
import math

import pytest
import torch

import ttrec
from ttrec.bags import make_bags
from ttrec.cpu import ops
from ttrec.cpu.build import unavailable_reason

pytestmark = [pytest.mark.skipif(unavailable_reason() is not None, reason=f"native kernel: {unavailable_reason()}"),
              pytest.mark.usefixtures("threads_at_any_size")]


def _spec(p, q, r):
    return ttrec.TTSpec(math.prod(p) - 3, math.prod(q), tuple(p), tuple(q), tuple(r))


def _cores(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [c.requires_grad_() for c in ttrec.init_tt_cores(spec, "normal", generator=g)]


def _bags(spec, n, seed, mode="sum", weighted=False, pooling=3):
    g = torch.Generator().manual_seed(seed)
    # skewed: many repeats of a few rows, and rows sharing prefixes
    hot = torch.randint(0, spec.num_embeddings, (7,), generator=g)
    idx = torch.where(torch.rand(n, generator=g) < 0.5, hot[torch.randint(0, 7, (n,), generator=g)],
                      torch.randint(0, spec.num_embeddings, (n,), generator=g))
    offsets = torch.arange(0, n, pooling)
    offsets[1] = offsets[2]  # an empty bag
    w = torch.rand(n, generator=g) if weighted else None
    return make_bags(idx, offsets, w, num_embeddings=spec.num_embeddings, mode=mode)


SHAPES = [((11, 13, 17), (2, 2, 4), (16, 16)), ((5, 40, 7), (2, 3, 2), (5, 17)), ((30, 2, 9), (4, 4, 1), (32, 8)),
          ((200, 220, 250), (2, 2, 4), (32, 32))]


def _grads_recomputed(cores, spec, bags, mode, grad_out):
    return ops.backward([c.detach() for c in cores], spec, bags, mode, grad_out)


@pytest.mark.parametrize("p,q,r", SHAPES)
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kept_plan_gives_the_gradients_of_recomputation(p, q, r, mode, weighted, threads):
    torch.set_num_threads(threads)
    spec = _spec(p, q, r)
    cores = _cores(spec, seed=1)
    bags = _bags(spec, 900, 2, mode, weighted)
    grad_out = torch.randn(bags.num_bags, spec.embedding_dim, generator=torch.Generator().manual_seed(3))
    live = ops.live_saved_forwards()
    out = ops.tt_bag_cpu(cores, spec, bags, mode)
    assert ops.live_saved_forwards() == live + 1  # kept for the backward to come
    torch.testing.assert_close(out, ops.forward([c.detach() for c in cores], spec, bags, mode), rtol=0, atol=0)
    got = torch.autograd.grad(out, cores, grad_out)
    assert ops.live_saved_forwards() == live  # released by the backward
    assert ops.last_stats("backward")["seconds_sort"] < 1.0
    want = _grads_recomputed(cores, spec, bags, mode, grad_out)
    for a, b in zip(got, want):  # the same arithmetic: bitwise equal
        assert torch.equal(a, b)
    # and both equal the reference (float64), within fp32 rounding of the positive-term sums
    ref_cores = [c.detach().double().requires_grad_() for c in cores]
    abs_cores = [c.detach().double().abs().requires_grad_() for c in cores]
    w = bags.per_sample_weights
    ref_bags = make_bags(bags.indices, bags.offsets[:-1], None if w is None else w.double(),
                         num_embeddings=spec.num_embeddings, mode=mode)
    ref = torch.autograd.grad(ttrec.tt_embedding_bag(ref_cores, spec, ref_bags, mode), ref_cores, grad_out.double())
    bound = torch.autograd.grad(ttrec.tt_embedding_bag(abs_cores, spec, ref_bags, mode), abs_cores,
                                grad_out.double().abs())
    for a, b, e in zip(got, ref, bound):
        torch.testing.assert_close(a.double(), b, atol=1e-5 * e.abs().max().item(), rtol=1e-4)


def test_forward_without_grad_keeps_nothing():
    spec = _spec((11, 13, 17), (2, 2, 4), (16, 16))
    cores = _cores(spec)
    bags = _bags(spec, 500, 0)
    gc.collect()
    live = ops.live_saved_forwards()
    with torch.no_grad():
        ops.tt_bag_cpu(cores, spec, bags)
    with torch.inference_mode():
        ops.tt_bag_cpu(cores, spec, bags)
    ops.tt_bag_cpu([c.detach() for c in cores], spec, bags)  # no core requires grad
    ops.forward(cores, spec, bags, "sum")
    m = ttrec.TTEmbeddingBag(spec.num_embeddings, 16, (16, 16), (11, 13, 17), (2, 2, 4), backend="cpu", seed=0)
    with torch.no_grad():
        m(bags.indices, bags.offsets[:-1])
    assert ops.live_saved_forwards() == live


def test_dropped_graph_releases_its_plan():
    spec = _spec((11, 13, 17), (2, 2, 4), (16, 16))
    cores = _cores(spec)
    bags = _bags(spec, 500, 0)
    gc.collect()
    live = ops.live_saved_forwards()
    out = ops.tt_bag_cpu(cores, spec, bags)
    assert ops.live_saved_forwards() == live + 1
    del out
    gc.collect()
    assert ops.live_saved_forwards() == live


@pytest.mark.parametrize("order", ["first_then_second", "second_then_first"])
def test_two_forwards_then_backwards_in_either_order(order):
    spec = _spec((11, 13, 17), (2, 2, 4), (16, 16))
    cores = _cores(spec)
    b1, b2 = _bags(spec, 400, 1), _bags(spec, 700, 2, mode="sum", weighted=True)
    g1 = torch.randn(b1.num_bags, 16, generator=torch.Generator().manual_seed(4))
    g2 = torch.randn(b2.num_bags, 16, generator=torch.Generator().manual_seed(5))
    o1, o2 = ops.tt_bag_cpu(cores, spec, b1), ops.tt_bag_cpu(cores, spec, b2)
    pairs = [(o1, g1, b1), (o2, g2, b2)]
    if order == "second_then_first":
        pairs.reverse()
    for out, g, bags in pairs:
        got = torch.autograd.grad(out, cores, g)
        want = _grads_recomputed(cores, spec, bags, "sum", g)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_retained_graph_backward_twice_is_right():
    spec = _spec((11, 13, 17), (2, 2, 4), (16, 16))
    cores = _cores(spec)
    bags = _bags(spec, 400, 1)
    g = torch.randn(bags.num_bags, 16)
    out = ops.tt_bag_cpu(cores, spec, bags)
    first = torch.autograd.grad(out, cores, g, retain_graph=True)
    second = torch.autograd.grad(out, cores, g)  # the plan was used once: recomputed now
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cores_changed_in_place_after_forward_are_refused_by_autograd():
    spec = _spec((11, 13, 17), (2, 2, 4), (16, 16))
    cores = _cores(spec)
    bags = _bags(spec, 400, 1)
    out = ops.tt_bag_cpu(cores, spec, bags)
    with torch.no_grad():
        cores[1].mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward(torch.ones_like(out))


def test_cores_changed_in_place_before_a_fused_update_are_refused():
    """The fused path hands autograd an anchor instead of the cores, and keeps its check by hand:
    an update at cores changed since the forward would apply gradients taken at other cores."""
    fused, _ = _fused_pair("sgd")
    bags = _bags(fused.spec, 400, 1)
    out = fused(bags.indices, bags.offsets[:-1])
    with torch.no_grad():
        fused.tt_cores[1].mul_(2.0)
    before = [c.detach().clone() for c in fused.tt_cores]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward(torch.ones_like(out))
    assert all(torch.equal(a, b) for a, b in zip(fused.tt_cores, before))  # no update happened


def _fused_pair(optimizer):
    p, q, r = (11, 13, 17), (2, 2, 4), (16, 16)
    n = math.prod(p) - 3
    fused = ttrec.TTEmbeddingBag(n, 16, r, p, q, backend="cpu", seed=0, optimizer=optimizer, learning_rate=0.1)
    plain = ttrec.TTEmbeddingBag(n, 16, r, p, q, backend="cpu", seed=0)
    return fused, plain


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_fused_steps_with_kept_plans_equal_steps_from_recomputed_gradients(optimizer):
    """Two forwards, then their backwards: the second forward's plan is stale once the first
    backward has updated the cores, and must not be used (it would mix old and new cores)."""
    fused, plain = _fused_pair(optimizer)
    spec = fused.spec
    bags = [_bags(spec, 300, s) for s in (7, 8, 9)]
    grads = [torch.randn(b.num_bags, 16, generator=torch.Generator().manual_seed(s)) for s, b in enumerate(bags)]
    state = [torch.zeros_like(c) for c in plain.tt_cores]
    cores = [c.detach().clone() for c in plain.tt_cores]

    def manual_step(b, g):  # recomputed gradients at the current cores, then the update
        gr = ops.backward(cores, spec, b, "sum", g)
        for c, dc, h in zip(cores, gr, state):
            if optimizer == "sgd":
                c -= 0.1 * dc
            else:
                h += dc * dc
                c -= 0.1 * dc / (h.sqrt() + 1e-10)

    # step 0 alone; then two forwards before their backwards
    fused(bags[0].indices, bags[0].offsets[:-1]).backward(grads[0])
    manual_step(bags[0], grads[0])
    o1 = fused(bags[1].indices, bags[1].offsets[:-1])
    o2 = fused(bags[2].indices, bags[2].offsets[:-1])
    o1.backward(grads[1])
    manual_step(bags[1], grads[1])
    o2.backward(grads[2])  # recomputed at the updated cores, as without kept plans
    manual_step(bags[2], grads[2])
    for a, b in zip(fused.tt_cores, cores):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)


def test_chunked_batches_keep_nothing_and_stay_right():
    spec = _spec((11, 13, 17), (2, 2, 4), (16, 16))
    cores = _cores(spec)
    bags = _bags(spec, 3000, 3)
    g = torch.randn(bags.num_bags, 16)
    out, saved = ops._forward(cores, spec, bags, "sum", chunk_bytes=1, keep=True)  # 1024-lookup chunks
    assert saved is None
    got = ops.backward([c.detach() for c in cores], spec, bags, "sum", g, chunk_bytes=1)
    want = ops.backward([c.detach() for c in cores], spec, bags, "sum", g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("p,q,r", SHAPES)
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_native_calls_step_makes_the_modules_fused_sgd_steps(p, q, r, mode, weighted):
    """ops.native_calls_step (the fused step's two native calls, prepared once; benches.cpu_kernel times it
    beside the module's step) computes the module's forward output and leaves the cores bitwise equal to the
    module's fused SGD steps on the same batch, step after step (the same calls on the same values)."""
    spec = _spec(p, q, r)
    kw = dict(tt_ranks=r, tt_p_shapes=p, tt_q_shapes=q, backend="cpu", seed=3, mode=mode, optimizer="sgd",
              learning_rate=0.05)
    module, twin = (ttrec.TTEmbeddingBag(spec.num_embeddings, spec.embedding_dim, **kw) for _ in range(2))
    bags = _bags(spec, 4100, 5, mode, weighted)  # (two threads at two or more: ops.MIN_LOOKUPS_PER_THREAD)
    grad_out = torch.randn(bags.num_bags, spec.embedding_dim, generator=torch.Generator().manual_seed(1))
    step = ops.native_calls_step(twin._core_list(), spec, bags, mode, grad_out, 0.05)
    for _ in range(3):
        out = module(bags.indices, bags.offsets[:-1], bags.per_sample_weights)
        out.backward(grad_out)
        step()
        assert torch.equal(step.keep[2], out.detach())  # the forward's output, before this step's update
        for a, b in zip(module.tt_cores, twin.tt_cores):
            assert torch.equal(a.detach(), b.detach())
    assert not torch.equal(module.tt_cores[1].detach(), ttrec.TTEmbeddingBag(spec.num_embeddings, spec.embedding_dim,
                                                                             **kw).tt_cores[1].detach())  # (it moved)
    assert ops.live_saved_forwards() == 0


def test_native_calls_step_makes_kept_plans_stale_and_checks_its_arguments():
    """Its update changes the cores in place: a forward plan kept before it is stale afterwards (the
    backward recomputes), as after any fused update. Bad arguments are refused by name, before any native call."""
    fused, _ = _fused_pair("sgd")
    spec = fused.spec
    bags = _bags(spec, 300, 2)
    grad_out = torch.randn(bags.num_bags, 16, generator=torch.Generator().manual_seed(0))
    step = ops.native_calls_step(fused._core_list(), spec, bags, "sum", grad_out, 0.1)
    out = fused(bags.indices, bags.offsets[:-1])
    assert out.grad_fn.saved_plan.current()
    step()
    assert not out.grad_fn.saved_plan.current()
    with pytest.raises(ValueError, match=r"grad_out: got shape \(3, 16\); expected \(100, 16\)"):
        ops.native_calls_step(fused._core_list(), spec, bags, "sum", grad_out[:3], 0.1)
    with pytest.raises(ValueError, match="lr: got 0"):
        ops.native_calls_step(fused._core_list(), spec, bags, "sum", grad_out, 0)
    cores = [c.detach().transpose(0, 3) for c in fused._core_list()]
    with pytest.raises(ValueError, match="backend='cpu': core 0 has shape"):
        ops.native_calls_step(cores, spec, bags, "sum", grad_out, 0.1)
    cores = fused._core_list()
    cores[1] = torch.zeros(tuple(cores[1].shape)[::-1]).permute(3, 2, 1, 0)  # the right shape, not contiguous
    with pytest.raises(ValueError, match=r"cores\[1\]: got a non-contiguous tensor"):
        ops.native_calls_step(cores, spec, bags, "sum", grad_out, 0.1)
    with pytest.raises(ValueError, match="mode: got 'max'"):
        ops.native_calls_step(fused._core_list(), spec, bags, "max", grad_out, 0.1)
