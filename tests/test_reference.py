"""The reference TT-EmbeddingBag against dense reconstructions pooled by F.embedding_bag.

Two dense references are used: ttrec.tt_to_dense, and reconstructions written here from the
documented convention (core k is (R_{k-1}, p_k, q_k, R_k); row i = sum_k i_k * prod(p_{k+1:}),
first core's digit most significant; likewise the column over q).
"""

from __future__ import annotations

import math
import re
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import ttrec
import ttrec.reference as reference
from ttrec import (
    DenseEmbeddingBag, T3nsorEmbeddingBag, TTEmbeddingBag, TTSpec, build_embedding, make_bags,
    tt_embedding_bag, tt_rows, tt_to_dense,
)

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)

# --- independent reconstructions ----------------------------------------------------------------


def einsum_dense(cores, spec):
    """One einsum over all cores: (p_1..p_d, q_1..q_d) -> (prod p, prod q), truncated to num_embeddings."""
    d = spec.d
    bonds, rows, cols = "ABCDEFG", "ijklmn", "opqrst"
    terms = [f"{bonds[k]}{rows[k]}{cols[k]}{bonds[k + 1]}" for k in range(d)]
    out = rows[:d] + cols[:d]
    full = torch.einsum(",".join(terms) + "->" + out, *cores)
    return full.reshape(math.prod(spec.tt_p_shapes), math.prod(spec.tt_q_shapes))[: spec.num_embeddings]


def loop_dense(cores, spec):
    """Entry by entry: W[i, j] = G_1[:, i_1, j_1, :] @ ... @ G_d[:, i_d, j_d, :] (a 1x1 matrix)."""
    p, q = spec.tt_p_shapes, spec.tt_q_shapes
    out = torch.empty(spec.num_embeddings, spec.embedding_dim, dtype=cores[0].dtype)

    def digits(x, shape):
        ds = []
        for s in reversed(shape):
            ds.append(x % s)
            x //= s
        return ds[::-1]

    for i in range(spec.num_embeddings):
        di = digits(i, p)
        for j in range(spec.embedding_dim):
            dj = digits(j, q)
            m = cores[0][:, di[0], dj[0], :]
            for k in range(1, spec.d):
                m = m @ cores[k][:, di[k], dj[k], :]
            out[i, j] = m[0, 0]
    return out


def random_cores(spec, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in spec.core_shapes]


def set_cores(module, cores):
    with torch.no_grad():
        for param, c in zip(module.tt_cores, cores):
            param.copy_(c)


def grads(loss, tensors):
    """d loss / d tensors, zeros where a tensor is unused. The loss must be in the graph (even for a
    batch without lookups, as with nn.EmbeddingBag: see test_all_empty_batch_stays_in_autograd_graph)."""
    gs = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, tensors)]


def offsets_from_sizes(sizes, include_last_offset, dtype=torch.int64):
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    return torch.tensor(starts if include_last_offset else starts[:-1], dtype=dtype)


# --- the reconstructions themselves ---------------------------------------------------------------

TINY_SPECS = [
    TTSpec(12, 6, (3, 4), (2, 3), (3,)),
    TTSpec(11, 6, (3, 4), (3, 2), (2,)),  # padded: prod(p) = 12 > 11
    TTSpec(20, 8, (2, 3, 4), (2, 2, 2), (2, 3)),
    TTSpec(23, 12, (2, 3, 4), (3, 1, 4), (4, 1)),
    TTSpec(36, 16, (2, 3, 2, 3), (2, 2, 2, 2), (2, 3, 2)),
]


@pytest.mark.parametrize("spec", TINY_SPECS, ids=lambda s: f"p{s.tt_p_shapes}q{s.tt_q_shapes}r{s.tt_ranks}")
def test_tt_to_dense_matches_loop_and_einsum(spec):
    cores = random_cores(spec, 0)
    dense = tt_to_dense(cores, spec)
    assert dense.shape == (spec.num_embeddings, spec.embedding_dim)
    torch.testing.assert_close(dense, loop_dense(cores, spec), **TIGHT)
    torch.testing.assert_close(einsum_dense(cores, spec), loop_dense(cores, spec), **TIGHT)
    idx = torch.tensor([spec.num_embeddings - 1, 0, 3, 3, spec.num_embeddings // 2])
    torch.testing.assert_close(tt_rows(cores, spec, idx), dense[idx], **TIGHT)
    assert ttrec.reference.row_digits(idx, spec.tt_p_shapes).shape == (spec.d, idx.numel())


def test_rank_one_table_is_outer_product():
    # R = 1, d = 2: W[i1*p2 + i2, j1*q2 + j2] = a[i1, j1] * b[i2, j2] (a Kronecker product).
    spec = TTSpec(12, 6, (3, 4), (2, 3), (1,))
    a, b = torch.randn(3, 2, dtype=F64), torch.randn(4, 3, dtype=F64)
    cores = [a.reshape(1, 3, 2, 1), b.reshape(1, 4, 3, 1)]
    torch.testing.assert_close(tt_to_dense(cores, spec), torch.kron(a, b), **TIGHT)


# --- hypothesis: module forward / backward against the dense path ----------------------------------


@st.composite
def tt_cases(draw):
    d = draw(st.sampled_from([2, 3, 4]))
    p = tuple(draw(st.lists(st.integers(1, 4), min_size=d, max_size=d)))
    q = tuple(draw(st.lists(st.integers(1, 3), min_size=d, max_size=d)))
    ranks = tuple(draw(st.lists(st.integers(1, 5), min_size=d - 1, max_size=d - 1)))
    n_rows = draw(st.integers(1, math.prod(p)))
    sizes = draw(st.lists(st.integers(0, 4), min_size=1, max_size=6))
    indices = draw(st.lists(st.integers(0, n_rows - 1), min_size=sum(sizes), max_size=sum(sizes)))
    mode = draw(st.sampled_from(["sum", "mean"]))
    weighted = mode == "sum" and draw(st.booleans())
    weights = draw(st.lists(st.floats(-2, 2, allow_nan=False), min_size=len(indices), max_size=len(indices))) \
        if weighted else None
    return dict(
        spec=TTSpec(n_rows, math.prod(q), p, q, ranks), sizes=sizes, indices=indices, mode=mode, weights=weights,
        include_last_offset=draw(st.booleans()), index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        seed=draw(st.integers(0, 2**16)),
    )


def _module_and_inputs(case, cls=TTEmbeddingBag, randomize=True, **extra):
    """The module for ``case`` (float64), its cores replaced by N(0, 1) draws unless ``randomize`` is
    False (then they are the module's own seeded init), and the forward arguments."""
    spec = case["spec"]
    m = cls(spec.num_embeddings, spec.embedding_dim, spec.tt_ranks, tt_p_shapes=spec.tt_p_shapes,
            tt_q_shapes=spec.tt_q_shapes, mode=case["mode"], include_last_offset=case["include_last_offset"],
            dtype=F64, seed=case["seed"], **extra)
    assert m.spec == spec
    assert all(c.dtype == F64 for c in m.tt_cores)
    if randomize:
        set_cores(m, random_cores(spec, case["seed"]))
    x = torch.tensor(case["indices"], dtype=case["index_dtype"])
    offs = offsets_from_sizes(case["sizes"], case["include_last_offset"], dtype=case["index_dtype"])
    w = None if case["weights"] is None else torch.tensor(case["weights"], dtype=F64, requires_grad=True)
    return m, x, offs, w


def _dense_bag(weight, x, offs, w, case):
    return F.embedding_bag(x.long(), weight, offs.long(), mode=case["mode"], per_sample_weights=w,
                           include_last_offset=case["include_last_offset"])


@settings(max_examples=40, deadline=None)
@given(case=tt_cases())
def test_forward_matches_dense_references(case):
    m, x, offs, w = _module_and_inputs(case, backend="torch")
    spec = m.spec
    out = m(x, offs, w)
    assert out.shape == (len(case["sizes"]), spec.embedding_dim) and out.dtype == F64
    cores = [c.detach() for c in m.tt_cores]
    dense = tt_to_dense(cores, spec)
    own = einsum_dense(cores, spec)
    torch.testing.assert_close(dense, own, **TIGHT)
    torch.testing.assert_close(m.full_weight(), own, **TIGHT)
    torch.testing.assert_close(out, _dense_bag(dense, x, offs, w, case), **TIGHT)
    torch.testing.assert_close(out, _dense_bag(own, x, offs, w, case), **TIGHT)
    empty = torch.tensor(case["sizes"]) == 0
    assert bool((out.detach()[empty] == 0).all())


@settings(max_examples=30, deadline=None)
@given(case=tt_cases())
def test_core_gradients_match_dense_path(case):
    m, x, offs, w = _module_and_inputs(case, backend="torch")
    spec = m.spec
    out = m(x, offs, w)
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(case["seed"]), dtype=F64)
    params = list(m.tt_cores) + ([w] if w is not None else [])
    got = grads((out * g_out).sum(), params)

    leaves = [c.detach().clone().requires_grad_() for c in m.tt_cores]
    w_ref = None if w is None else w.detach().clone().requires_grad_()
    ref_params = leaves + ([w_ref] if w_ref is not None else [])
    ref = _dense_bag(tt_to_dense(leaves, spec), x, offs, w_ref, case)
    want = grads((ref * g_out).sum(), ref_params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TIGHT)

    leaves2 = [c.detach().clone().requires_grad_() for c in m.tt_cores]
    ref2 = _dense_bag(einsum_dense(leaves2, spec), x, offs, None if w is None else w.detach(), case)
    for a, b in zip(got[:len(leaves2)], grads((ref2 * g_out).sum(), leaves2), strict=True):  # the cores' (w's: above)
        torch.testing.assert_close(a, b, **TIGHT)


@settings(max_examples=25, deadline=None)
@given(case=tt_cases(), chunk_bytes=st.sampled_from([1, 64, 300, 2000]))
def test_chunked_path_matches_single_chunk(case, chunk_bytes):
    spec = case["spec"]
    m, x, offs, w = _module_and_inputs(case, backend="torch")
    bags = make_bags(x, offs, w, num_embeddings=spec.num_embeddings, mode=case["mode"],
                     include_last_offset=case["include_last_offset"])
    g_out = torch.randn(bags.num_bags, spec.embedding_dim, generator=torch.Generator().manual_seed(1), dtype=F64)
    big = 1 << 40

    def run(chunk, grad):
        cores = [c.detach().clone().requires_grad_(grad) for c in m.tt_cores]
        wt = None if w is None else w.detach().clone().requires_grad_(grad)
        b = ttrec.Bags(bags.indices, bags.offsets, wt)
        with mock.patch.object(reference, "checkpoint", wraps=reference.checkpoint) as ckpt:
            out = tt_embedding_bag(cores, spec, b, case["mode"], chunk_bytes=chunk)
        if not (grad and torch.is_grad_enabled()):
            return out, None, ckpt.call_count
        params = cores + ([wt] if wt is not None else [])
        return out, grads((out * g_out).sum(), params), ckpt.call_count

    single, single_grads, single_calls = run(big, True)
    assert single_calls == 0  # one chunk: no checkpointing needed
    chunked, chunked_grads, calls = run(chunk_bytes, True)
    if chunk_bytes == 1 and bags.num_lookups >= 2:
        assert calls == bags.num_lookups  # one lookup per chunk, each checkpointed
    torch.testing.assert_close(chunked, single, **TIGHT)
    for a, b in zip(chunked_grads, single_grads):
        torch.testing.assert_close(a, b, **TIGHT)
    nograd, _, nograd_calls = run(chunk_bytes, False)
    assert nograd_calls == 0
    torch.testing.assert_close(nograd, single.detach(), **TIGHT)
    with torch.no_grad():  # cores that require grad, but autograd off: no checkpointing either
        out_ng, _, calls_ng = run(chunk_bytes, True)
    assert calls_ng == 0 and not out_ng.requires_grad
    torch.testing.assert_close(out_ng, single.detach(), **TIGHT)
    # and all of it equals the dense path
    torch.testing.assert_close(single, _dense_bag(einsum_dense([c.detach() for c in m.tt_cores], spec), x, offs,
                                                  None if w is None else w.detach(), case), **TIGHT)


def test_chunked_checkpoint_path_is_exercised_under_autograd():
    spec = TTSpec(60, 12, (3, 4, 5), (2, 3, 2), (3, 4))
    cores = [c.requires_grad_() for c in random_cores(spec, 5)]
    idx = torch.randint(0, 60, (40,), generator=torch.Generator().manual_seed(0))
    bags = make_bags(idx, torch.tensor([0, 7, 7, 20, 33]), None, num_embeddings=60, mode="sum")
    with mock.patch.object(reference, "checkpoint", wraps=reference.checkpoint) as ckpt:
        out = tt_embedding_bag(cores, spec, bags, "sum", chunk_bytes=1000)
    assert ckpt.call_count >= 3
    ref_cores = [c.detach().clone().requires_grad_() for c in cores]
    ref = F.embedding_bag(idx, einsum_dense(ref_cores, spec), torch.tensor([0, 7, 7, 20, 33]), mode="sum")
    torch.testing.assert_close(out, ref, **TIGHT)
    g = torch.randn(out.shape, dtype=F64)
    for a, b in zip(grads((out * g).sum(), cores), grads((ref * g).sum(), ref_cores)):
        torch.testing.assert_close(a, b, **TIGHT)


# --- explicit layouts ------------------------------------------------------------------------------


@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_empty_bags_including_trailing(include_last_offset, mode, index_dtype):
    spec = TTSpec(30, 6, (2, 3, 5), (1, 2, 3), (2, 2))
    sizes = [0, 3, 0, 0, 2, 1, 0]  # leading, consecutive and trailing empty bags
    case = dict(spec=spec, sizes=sizes, indices=[29, 0, 7, 7, 13, 29], mode=mode, weights=None,
                include_last_offset=include_last_offset, index_dtype=index_dtype, seed=3)
    m, x, offs, _ = _module_and_inputs(case, backend="torch")
    out = m(x, offs)
    dense = einsum_dense([c.detach() for c in m.tt_cores], spec)
    torch.testing.assert_close(out, _dense_bag(dense, x, offs, None, case), **TIGHT)
    assert out.shape == (7, 6)
    assert bool((out.detach()[[0, 2, 3, 6]] == 0).all())
    if mode == "mean":
        torch.testing.assert_close(out[1], dense[[29, 0, 7]].mean(0), **TIGHT)


def test_zero_bags_and_zero_lookups():
    m = TTEmbeddingBag(30, 6, 2, tt_p_shapes=(5, 6), tt_q_shapes=(2, 3), include_last_offset=True,
                       backend="torch", seed=0)
    out = m(torch.tensor([], dtype=torch.int64), torch.tensor([0]))
    assert out.shape == (0, 6)
    m2 = TTEmbeddingBag(30, 6, 2, tt_p_shapes=(5, 6), tt_q_shapes=(2, 3), backend="torch", seed=0)
    out2 = m2(torch.tensor([], dtype=torch.int64), torch.tensor([0, 0, 0]))
    assert out2.shape == (3, 6) and bool((out2 == 0).all())


def test_all_empty_batch_stays_in_autograd_graph():
    """A batch of empty bags: the output is still attached to the cores (zero gradients), so a training
    step's backward works, as with nn.EmbeddingBag and the baselines."""
    x, offs = torch.tensor([], dtype=torch.int64), torch.tensor([0, 0])
    for m in (nn.EmbeddingBag(10, 4), DenseEmbeddingBag(10, 4),
              T3nsorEmbeddingBag(10, 4, 2, tt_p_shapes=(2, 5), tt_q_shapes=(2, 2))):
        assert m(x, offs).requires_grad
    tt = TTEmbeddingBag(10, 4, 2, tt_p_shapes=(2, 5), tt_q_shapes=(2, 2), backend="torch", seed=0)
    out = tt(x, offs)
    out.sum().backward()  # a training step on a batch of empty bags
    assert all(c.grad is not None and bool((c.grad == 0).all()) for c in tt.tt_cores)


def test_float32_module_matches_dense():
    m = TTEmbeddingBag(1000, 16, 8, backend="torch", seed=0)
    assert m.spec.tt_p_shapes == (10, 10, 10) and m.spec.tt_q_shapes == (2, 2, 4)
    x = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(0))
    offs = torch.arange(0, 64, 4)
    dense = einsum_dense([c.detach().double() for c in m.tt_cores], m.spec)
    torch.testing.assert_close(m(x, offs).double(), F.embedding_bag(x, dense, offs, mode="sum"), rtol=1e-5, atol=1e-7)


# --- baselines ------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(case=tt_cases())
def test_t3nsor_equals_tt_forward_and_gradients(case):
    tt, x, offs, w = _module_and_inputs(case, randomize=False, backend="torch")
    t3, _, _, _ = _module_and_inputs(case, cls=T3nsorEmbeddingBag, randomize=False)
    for a, b in zip(tt.tt_cores, t3.tt_cores):
        assert torch.equal(a, b)
    out_tt, out_t3 = tt(x, offs, w), t3(x, offs, w)
    torch.testing.assert_close(out_t3, out_tt, **TIGHT)
    g = torch.randn(out_tt.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    for a, b in zip(grads((out_t3 * g).sum(), list(t3.tt_cores)), grads((out_tt * g).sum(), list(tt.tt_cores))):
        torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("seed", [0, 1])
def test_same_seed_gives_same_init_for_tt_and_t3nsor(seed):
    tt = TTEmbeddingBag(5000, 16, 4, seed=seed, backend="torch")
    t3 = T3nsorEmbeddingBag(5000, 16, 4, seed=seed)
    assert all(torch.equal(a, b) for a, b in zip(tt.tt_cores, t3.tt_cores))
    x, offs = torch.tensor([4999, 0, 17, 17]), torch.tensor([0, 1, 1])
    torch.testing.assert_close(t3(x, offs), tt(x, offs), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_dense_baseline_equals_nn_embeddingbag(mode, include_last_offset):
    n, dim = 40, 5
    ours = DenseEmbeddingBag(n, dim, mode=mode, include_last_offset=include_last_offset, seed=3, dtype=F64)
    theirs = nn.EmbeddingBag(n, dim, mode=mode, include_last_offset=include_last_offset, dtype=F64)
    with torch.no_grad():
        theirs.weight.copy_(ours.weight)
    x = torch.tensor([1, 39, 0, 5, 5, 22, 8])
    offs = torch.tensor([0, 2, 2, 6, 7] if include_last_offset else [0, 2, 2, 6])
    w = torch.rand(7, dtype=F64) if mode == "sum" else None
    a, b = ours(x, offs, w), theirs(x, offs, w)
    torch.testing.assert_close(a, b, **TIGHT)
    g = torch.randn(a.shape, dtype=F64)
    torch.testing.assert_close(grads((a * g).sum(), [ours.weight])[0], grads((b * g).sum(), [theirs.weight])[0], **TIGHT)


def test_dense_baseline_init_is_dlrm_uniform():
    n = 20000
    m = DenseEmbeddingBag(n, 16, seed=0)
    w = m.weight.detach().double()
    assert float(w.abs().max()) <= n ** -0.5
    assert float(w.std()) == pytest.approx(ttrec.target_row_std(n), rel=0.01)
    assert torch.equal(DenseEmbeddingBag(n, 16, seed=0).weight, m.weight)
    assert not torch.equal(DenseEmbeddingBag(n, 16, seed=1).weight, m.weight)


# --- registry -------------------------------------------------------------------------------------


def test_build_embedding_each_impl():
    kw = dict(tt_ranks=4, tt_p_shapes=(5, 6, 7), tt_q_shapes=(2, 2, 2), seed=5, mode="mean")
    tt = build_embedding("tt", 200, 8, backend="torch", **kw)
    t3 = build_embedding("t3nsor", 200, 8, **kw)
    dense = build_embedding("dense", 200, 8, seed=5, mode="mean")
    assert type(tt) is TTEmbeddingBag and type(t3) is T3nsorEmbeddingBag and type(dense) is DenseEmbeddingBag
    assert tt.spec == t3.spec == TTSpec(200, 8, (5, 6, 7), (2, 2, 2), (4, 4))
    assert tt.mode == t3.mode == dense.mode == "mean"
    assert dense.weight.shape == (200, 8)
    assert all(torch.equal(a, b) for a, b in zip(tt.tt_cores, t3.tt_cores))
    x, offs = torch.tensor([0, 199, 3, 50]), torch.tensor([0, 3])
    torch.testing.assert_close(tt(x, offs), t3(x, offs), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(dense(x, offs), F.embedding_bag(x, dense.weight, offs, mode="mean"))
    # suggested shapes when none are given
    default = build_embedding("tt", 10131227 // 1000, 16, tt_ranks=8, backend="torch")
    assert default.spec.tt_q_shapes == (2, 2, 4)
    assert math.prod(default.spec.tt_p_shapes) >= 10131


@pytest.mark.parametrize("name", ["TT", "embedding", "", "hash"])
def test_build_embedding_rejects_unknown(name):
    with pytest.raises(ValueError, match=rf"^impl: got '{name}'; allowed: .*'tt'.*'t3nsor'.*'dense'"):
        build_embedding(name, 100, 8)


def test_q_shapes_alone_set_the_number_of_cores():
    """tt_q_shapes without tt_p_shapes: the suggested p shapes have as many factors (as tt_p_shapes
    alone fixes the q shapes' count), not the default d's 3."""
    m = TTEmbeddingBag(1000, 16, 8, tt_q_shapes=[4, 4], backend="torch", seed=0)
    assert m.spec.tt_q_shapes == (4, 4) and len(m.spec.tt_p_shapes) == 2
    assert math.prod(m.spec.tt_p_shapes) >= 1000
    m4 = TTEmbeddingBag(1000, 16, 8, tt_q_shapes=[2, 2, 2, 2], backend="torch", seed=0)
    assert len(m4.spec.tt_p_shapes) == 4


@pytest.mark.parametrize("kwargs,needle", [
    ({"optimizer": "adam"}, "optimizer: got 'adam'"),
    ({"learning_rate": 0}, "learning_rate: got 0;"),
    ({"learning_rate": float("inf")}, "learning_rate: got inf;"),
    ({"learning_rate": float("nan")}, "learning_rate: got nan;"),
    ({"eps": 0.0}, "eps: got 0.0;"),  # Adagrad's 0 / (sqrt(0) + 0) on a slice whose gradient is 0
    ({"eps": -1.0}, "eps: got -1.0;"),
    ({"eps": 1e-50}, "eps: got 1e-50;"),  # 0 in float32, the kernels' precision
    ({"eps": 1e39}, "eps: got 1e+39;"),  # inf in float32
    ({"learning_rate": 1e39}, "learning_rate: got 1e+39;"),  # inf in float32: the step wrote inf and NaN
    ({"learning_rate": 1e-50}, "learning_rate: got 1e-50;"),  # 0 in float32: no update at all
])
def test_fused_optimizer_settings_rejected_naming_them(kwargs, needle):
    with pytest.raises(ValueError, match="^" + re.escape(needle)):
        TTEmbeddingBag(100, 8, 2, **{"optimizer": "adagrad", **kwargs})


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match=r"^backend: got 'gpu'"):
        TTEmbeddingBag(100, 8, 2, backend="gpu")


def test_tt_rows_of_no_indices_is_an_empty_table_slice():
    """tt_rows of zero indices raised 'cannot reshape tensor of 0 elements' (a -1 it could not infer)."""
    import ttrec
    from ttrec.reference import tt_rows

    for p, q, r in (((5, 6, 7), (2, 2, 4), (3, 4)), ((3, 4), (4, 4), (5,)), ((2, 3, 2, 3), (2, 1, 3, 2), (2, 3, 2))):
        spec = ttrec.TTSpec(math.prod(p), math.prod(q), p, q, r)
        cores = [c.requires_grad_() for c in ttrec.init_tt_cores(spec, "normal", generator=torch.Generator().manual_seed(0))]
        out = tt_rows(cores, spec, torch.tensor([], dtype=torch.int64))
        assert out.shape == (0, spec.embedding_dim)
        out.sum().backward()
        assert all(c.grad is not None and not c.grad.any() for c in cores)
        torch.testing.assert_close(tt_rows(cores, spec, torch.tensor([3, 1])), ttrec.tt_to_dense(cores, spec)[[3, 1]])
