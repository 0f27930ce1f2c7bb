"""Review of the CUDA backend on the CPU emulation: inputs the loader must refuse before a kernel
walks them, and the kernels against a float64 dense reconstruction of the table.

The kernels run as in tests/test_cuda_emulated.py (g++ with impl/cuda/emulation.h, launched through
``EmuLauncher``). The reference here is independent of ttrec.reference: the full table is rebuilt
from the cores in float64, rows are pooled by plain indexing, gradients come from float64 autograd
of that reconstruction, and the optimizer step is written out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from ttrec.bags import Bags, make_bags
from ttrec.cuda import loader
from ttrec.shapes import TTSpec

from .test_cuda_emulated import EmuLauncher, emu_lib, make_cores  # noqa: F401  (emu_lib: fixture)


@pytest.fixture
def emu(emu_lib):  # noqa: F811
    return EmuLauncher(emu_lib)


D2 = TTSpec(140, 16, (13, 11), (4, 4), (8,))


def _cache_case(spec: TTSpec = D2):
    cache = torch.randn(4, spec.embedding_dim, generator=torch.Generator().manual_seed(0))
    slot = torch.tensor([0, 1, -1])
    return cache, slot


# ---- cache_sgd: the kernel walks offsets[b]..offsets[b + 1] and the weights of every bag ----

@pytest.mark.parametrize("bags, what", [
    (Bags(torch.tensor([1, 2, 3]), torch.tensor([0, 1]), None), "offsets"),           # ends before len(indices)
    (Bags(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1, 3]), None), "offsets"),     # decreasing
    (Bags(torch.tensor([1, 2, 3]), torch.tensor([0, 3], dtype=torch.int32), None), "offsets"),
    (Bags(torch.tensor([1, 2, 3]), torch.tensor([0, 3]), torch.ones(2)), "per_sample_weights"),
])
def test_cache_sgd_refuses_bags_the_kernel_cannot_walk(emu, bags, what):
    cache, slot = _cache_case()
    before = cache.clone()
    with pytest.raises(ValueError, match=what):
        loader.cache_sgd(cache, slot, bags, "sum", torch.ones(bags.num_bags, 16), 0.1, launcher=emu)
    assert emu.log == [] and torch.equal(cache, before)


def test_cache_sgd_refuses_weights_with_mean(emu):
    cache, slot = _cache_case()
    bags = Bags(torch.tensor([1, 2, 3]), torch.tensor([0, 3]), torch.ones(3))
    with pytest.raises(ValueError, match="per_sample_weights"):
        loader.cache_sgd(cache, slot, bags, "mean", torch.ones(1, 16), 0.1, launcher=emu)
    assert emu.log == []


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -0.1, 0.0])
def test_cache_sgd_refuses_a_bad_learning_rate(emu, lr):
    cache, slot = _cache_case()
    before = cache.clone()
    bags = make_bags(torch.tensor([1, 2, 3]), torch.tensor([0, 2]), None, num_embeddings=140, mode="sum")
    with pytest.raises(ValueError, match="lr: got"):
        loader.cache_sgd(cache, slot, bags, "sum", torch.ones(2, 16), lr, launcher=emu)
    assert emu.log == [] and torch.equal(cache, before)


def test_cached_forward_checks_the_cache_before_any_launch(emu):
    cores = make_cores(D2, 0)
    bags = make_bags(torch.tensor([1, 2, 3]), torch.tensor([0, 2]), None, num_embeddings=140, mode="sum")
    row_slot = torch.full((140,), -1, dtype=torch.int64)
    for cache, what in ((torch.zeros(4, 8), "embedding_dim"), (torch.zeros(4, 16, dtype=torch.float64), "cache: got")):
        with pytest.raises(ValueError, match=what):
            loader.cached_forward(cores, D2, bags, "sum", cache, row_slot, launcher=emu)
    assert emu.log == []


# ---- backward: one gradient and one touched mask per core ----

D3 = TTSpec(11 * 13 * 7, 30, (11, 13, 7), (2, 5, 3), (13, 37))


@pytest.mark.parametrize("algo", ["fused", "prefix"])
def test_backward_refuses_lists_of_the_wrong_length_before_any_launch(emu, algo):
    cores = make_cores(D3, 1)
    bags = make_bags(torch.tensor([1, 500, 900]), torch.tensor([0, 1]), None, num_embeddings=D3.num_embeddings,
                     mode="sum")
    grads = [torch.zeros_like(c) for c in cores]
    touched = [torch.zeros(p, dtype=torch.uint8) for p in D3.tt_p_shapes]
    for kw, what in ((dict(grads=grads[:2]), "grads: got 2"), (dict(grads=grads, touched=touched[:1]), "touched: got 1"),
                     (dict(grads=[*grads, grads[0]]), "grads: got 4")):
        with pytest.raises(ValueError, match=what):
            loader.backward(cores, D3, bags, "sum", torch.ones(2, 30), launcher=emu, algo=algo, **kw)
    assert emu.log == [] and not any(g.any() for g in grads)


# ---- the kernels against a float64 dense reconstruction ----

def dense_table(cores: list[torch.Tensor], spec: TTSpec) -> torch.Tensor:
    """The (num_embeddings, D) table of the cores: row digits and column digits first-most-significant."""
    t = cores[0][0]  # (p_0, q_0, R_1)
    for core in cores[1:]:
        t = torch.einsum("...r,rpqs->...pqs", t, core)
    t = t[..., 0]  # axes p_0 q_0 p_1 q_1 ... (R_d = 1)
    d = spec.d
    t = t.permute([2 * k for k in range(d)] + [2 * k + 1 for k in range(d)])
    return t.reshape(math.prod(spec.tt_p_shapes), spec.embedding_dim)[:spec.num_embeddings]


def pooled(table: torch.Tensor, bags: Bags, weights: torch.Tensor | None, mode: str) -> torch.Tensor:
    bounds = bags.offsets.tolist()
    out = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        rows = table[bags.indices[s:e]]
        if weights is not None:
            rows = rows * weights[s:e, None].to(table.dtype)
        out.append(rows.sum(0) / (e - s if mode == "mean" and e > s else 1))
    return torch.stack(out)


# ranks 7, 13, 37, 3, 11, 5: no convenient multiples; p_0 = 1500 and p_1 = 1100 (> 1024); d = 2, 3, 4;
# num_embeddings below prod(p) for d = 4
DENSE_CASES = {
    "d2-p1500-R7": TTSpec(1500 * 3, 12, (1500, 3), (3, 4), (7,)),
    "d3-R13x37": TTSpec(11 * 13 * 7, 30, (11, 13, 7), (2, 5, 3), (13, 37)),
    "d3-p1100-R5x9": TTSpec(2 * 1100 * 3, 8, (2, 1100, 3), (2, 2, 2), (5, 9)),
    "d4-R3x11x5": TTSpec(5 * 4 * 3 * 6 - 5, 24, (5, 4, 3, 6), (2, 3, 2, 2), (3, 11, 5)),
}
SIZES = [0, 5, 0, 40, 1, 0]  # empty bags first, in the middle and last


@pytest.mark.parametrize("case", list(DENSE_CASES))
@pytest.mark.parametrize("mode, weighted, index_dtype", [("sum", False, torch.int32), ("sum", True, torch.int64),
                                                         ("mean", False, torch.int64)])
def test_kernels_match_a_float64_dense_reconstruction(emu_lib, case, mode, weighted, index_dtype):  # noqa: F811
    spec = DENSE_CASES[case]
    ln = EmuLauncher(emu_lib, block=37, max_blocks=3)
    g = torch.Generator().manual_seed(len(case))
    cores = make_cores(spec, len(case))
    n = sum(SIZES)
    idx = torch.randint(0, spec.num_embeddings, (n,), generator=g)
    idx[-3:] = idx[:3]  # repeated rows
    w = torch.rand(n, generator=g) + 0.5 if weighted else None
    starts = torch.tensor([0, *SIZES[:-1]]).cumsum(0)
    bags = make_bags(idx.to(index_dtype), starts.to(index_dtype), w, num_embeddings=spec.num_embeddings, mode=mode)
    leaves = [c.double().requires_grad_() for c in cores]
    ref = pooled(dense_table(leaves, spec), bags, w, mode)
    grad_out = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (ref * grad_out).sum().backward()
    lr = 0.3
    for algo in ("fused", "prefix"):
        out = loader.forward(cores, spec, bags, mode, launcher=ln, algo=algo, chunk_bytes=20000)
        torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
        assert not out[torch.tensor(SIZES) == 0].any()
        grads = loader.backward(cores, spec, bags, mode, grad_out.float(), launcher=ln, algo=algo, chunk_bytes=20000)
        for gk, leaf in zip(grads, leaves):
            torch.testing.assert_close(gk.double(), leaf.grad, rtol=1e-5, atol=1e-5)
        # one fused step from zero state: SGD w - lr g; Adagrad h = g^2, w - lr g / (sqrt(h) + eps)
        # (eps = 0.1 keeps g / (|g| + eps) well conditioned where g is near 0)
        for optimizer, eps in (("sgd", 1e-10), ("adagrad", 0.1)):
            stepped = [c.clone() for c in cores]
            scratch = [torch.zeros_like(c) for c in cores]
            state = [torch.zeros_like(c) for c in cores] if optimizer == "adagrad" else None
            loader.sparse_update(stepped, spec, bags, mode, grad_out.float(), optimizer, lr, eps, scratch, state,
                                 launcher=ln, algo=algo)
            for k, (c, leaf) in enumerate(zip(stepped, leaves)):
                step = leaf.grad if state is None else leaf.grad / (leaf.grad.abs() + eps)
                torch.testing.assert_close(c.double(), leaf.detach() - lr * step, rtol=1e-5, atol=1e-5)
                if state is not None:  # g^2 doubles g's float32 rounding: tolerance on the largest entry
                    h = leaf.grad ** 2
                    torch.testing.assert_close(state[k].double(), h, rtol=1e-5, atol=2e-5 * max(1.0, float(h.max())))
            assert not any(s.any() for s in scratch)


# ---- the prefix path's scratch budget ----

@pytest.mark.parametrize("chunk_bytes", [1e6, 10, True, "64M"])
def test_prefix_path_names_a_bad_chunk_budget(emu, chunk_bytes):
    cores = make_cores(D3, 2)
    bags = make_bags(torch.tensor([1, 500, 900]), torch.tensor([0, 1]), None, num_embeddings=D3.num_embeddings,
                     mode="sum")
    with pytest.raises(ValueError, match=f"chunk_bytes: got {chunk_bytes!r}"):
        loader.forward(cores, D3, bags, "sum", launcher=emu, algo="prefix", chunk_bytes=chunk_bytes)
    with pytest.raises(ValueError, match=f"chunk_bytes: got {chunk_bytes!r}"):
        loader.backward(cores, D3, bags, "sum", torch.ones(2, 30), launcher=emu, algo="prefix", chunk_bytes=chunk_bytes)
