"""Input validation shared by every implementation (ttrec.bags.make_bags and the modules)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ttrec
from ttrec import DenseEmbeddingBag, T3nsorEmbeddingBag, TTEmbeddingBag, make_bags

N = 50  # rows of every table here
D = 8


def _tt(mode="sum", include_last_offset=False):
    return TTEmbeddingBag(N, D, 3, tt_p_shapes=(5, 10), tt_q_shapes=(2, 4), mode=mode,
                          include_last_offset=include_last_offset, backend="torch", seed=0)


def _t3(mode="sum", include_last_offset=False):
    return T3nsorEmbeddingBag(N, D, 3, tt_p_shapes=(5, 10), tt_q_shapes=(2, 4), mode=mode,
                              include_last_offset=include_last_offset, seed=0)


def _dense(mode="sum", include_last_offset=False):
    return DenseEmbeddingBag(N, D, mode=mode, include_last_offset=include_last_offset, seed=0)


def _make_bags_fn(mode="sum", include_last_offset=False):
    def call(input, offsets=None, per_sample_weights=None):
        return make_bags(input, offsets, per_sample_weights, num_embeddings=N, mode=mode,
                         include_last_offset=include_last_offset)
    return call


TARGETS = {"make_bags": _make_bags_fn, "tt": _tt, "t3nsor": _t3, "dense": _dense}
targets = pytest.mark.parametrize("target", list(TARGETS))



def _ix(*v, dtype=torch.int64):
    return torch.tensor(v, dtype=dtype)


# (name, build kwargs, args, kwargs, exception, match)
BAD_INPUTS = [
    ("negative index", {}, (_ix(1, 2, -1, 4), _ix(0, 2)), {}, ValueError, r"^input:.*index -1 at position 2.*num_embeddings=50"),
    ("index == N", {}, (_ix(1, 50, 3), _ix(0, 1)), {}, ValueError, r"^input:.*index 50 at position 1.*num_embeddings=50"),
    ("index > N", {}, (_ix(1, 2, 3, 999), _ix(0, 1)), {}, ValueError, r"^input:.*index 999.*num_embeddings"),
    ("index out of range int32", {}, (_ix(1, 50, dtype=torch.int32), _ix(0, dtype=torch.int32)), {}, ValueError, r"^input:.*index 50"),
    ("non-monotonic offsets", {}, (_ix(1, 2, 3, 4), _ix(0, 3, 1)), {}, ValueError, r"^offsets:.*offsets\[1\]=3 > offsets\[2\]=1.*non-decreasing"),
    ("offsets[0] != 0", {}, (_ix(1, 2, 3, 4), _ix(1, 2)), {}, ValueError, r"^offsets:.*offsets\[0\]=1.*start at 0"),
    ("offsets[0] < 0", {}, (_ix(1, 2, 3, 4), _ix(-1, 2)), {}, ValueError, r"^offsets:.*offsets\[0\]=-1"),
    ("offsets past len(input)", {}, (_ix(1, 2, 3, 4), _ix(0, 2, 5)), {}, ValueError, r"^offsets:.*offsets\[-1\]=5.*len\(input\)=4"),
    ("empty offsets", {}, (_ix(1, 2), _ix()), {}, ValueError, r"^offsets:"),
    ("include_last_offset, last < len", {"include_last_offset": True}, (_ix(1, 2, 3, 4), _ix(0, 2, 3)), {}, ValueError,
     r"^offsets:.*last offset 3 with include_last_offset=True.*len\(input\)=4"),
    ("include_last_offset, last > len", {"include_last_offset": True}, (_ix(1, 2, 3, 4), _ix(0, 2, 5)), {}, ValueError,
     r"^offsets:.*(last offset|offsets\[-1\]).*len\(input\)=4"),
    ("per_sample_weights too short", {}, (_ix(1, 2, 3, 4), _ix(0, 2)), {"per_sample_weights": torch.ones(3)}, ValueError,
     r"^per_sample_weights:.*shape \(3,\).*\(4,\)"),
    ("per_sample_weights too long", {}, (_ix(1, 2, 3, 4), _ix(0, 2)), {"per_sample_weights": torch.ones(5)}, ValueError,
     r"^per_sample_weights:.*shape \(5,\)"),
    ("per_sample_weights 2D wrong shape", {}, (_ix(1, 2, 3, 4).reshape(2, 2),), {"per_sample_weights": torch.ones(4)}, ValueError,
     r"^per_sample_weights:.*shape \(4,\).*\(2, 2\)"),
    ("per_sample_weights with mean", {"mode": "mean"}, (_ix(1, 2, 3, 4), _ix(0, 2)), {"per_sample_weights": torch.ones(4)},
     ValueError, r"^per_sample_weights:.*mode='mean'"),
    ("integer per_sample_weights", {}, (_ix(1, 2, 3, 4), _ix(0, 2)), {"per_sample_weights": _ix(1, 1, 1, 1)}, TypeError,
     r"^per_sample_weights:.*floating"),
    ("float indices", {}, (torch.tensor([1.0, 2.0]), _ix(0, 1)), {}, TypeError, r"^input:.*dtype torch.float32"),
    ("bool indices", {}, (torch.tensor([True, False]), _ix(0, 1)), {}, TypeError, r"^input:.*torch.bool"),
    ("list indices", {}, ([1, 2], _ix(0, 1)), {}, TypeError, r"^input:.*list"),
    ("float offsets", {}, (_ix(1, 2, 3), torch.tensor([0.0, 2.0])), {}, (ValueError, TypeError), r"^offsets:.*float32"),
    ("2D offsets", {}, (_ix(1, 2, 3), _ix(0, 2).reshape(1, 2)), {}, (ValueError, TypeError), r"^offsets:.*1D"),
    ("3D input", {}, (_ix(1, 2, 3, 4).reshape(1, 2, 2),), {}, ValueError, r"^input:.*3D.*\(1, 2, 2\)"),
    ("2D input with offsets", {}, (_ix(1, 2, 3, 4).reshape(2, 2), _ix(0, 2)), {}, ValueError, r"^offsets:.*2D"),
    ("1D input without offsets", {}, (_ix(1, 2, 3, 4),), {}, ValueError, r"^offsets:.*1D input needs offsets"),
]


@targets
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(target, case):
    _, build, args, kwargs, exc, match = case
    fn = TARGETS[target](**build)
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


@targets
def test_unknown_mode(target):
    """Unknown pooling mode: ValueError naming 'mode', at construction or (at the latest) first call."""
    for mode in ("max", "bogus"):
        with pytest.raises(ValueError, match=rf"^mode: got '{mode}'"):
            fn = TARGETS[target](mode=mode)
            fn(_ix(1, 2), _ix(0, 1))


@targets
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_2d_input_equals_1d_with_offsets(target, mode, dtype):
    gen = torch.Generator().manual_seed(0)
    b, length = 5, 3
    x2 = torch.randint(0, N, (b, length), generator=gen, dtype=dtype)
    offsets = torch.arange(0, b * length, length, dtype=dtype)
    w2 = torch.rand(b, length, generator=gen) if mode == "sum" else None
    fn = TARGETS[target](mode=mode)
    out2 = fn(x2, None, w2)
    out1 = fn(x2.reshape(-1), offsets, None if w2 is None else w2.reshape(-1))
    if target == "make_bags":
        assert torch.equal(out2.indices, out1.indices)
        assert torch.equal(out2.offsets, out1.offsets)
        assert out2.offsets.tolist() == list(range(0, (b + 1) * length, length))
        if w2 is not None:
            assert torch.equal(out2.per_sample_weights, out1.per_sample_weights)
    else:
        assert out2.shape == (b, D)
        torch.testing.assert_close(out2, out1, rtol=0, atol=0)


@targets
def test_2d_input_with_no_columns_is_empty_bags(target):
    """(B, 0) input: B empty bags (zeros), as a 1D input with B equal offsets gives (nn.EmbeddingBag
    itself fails there, with torch.arange's "step must be nonzero")."""
    fn = TARGETS[target]()
    out = fn(torch.zeros(3, 0, dtype=torch.int64))
    if target == "make_bags":
        assert out.offsets.tolist() == [0, 0, 0, 0] and out.num_bags == 3 and out.num_lookups == 0
    else:
        assert torch.equal(out, torch.zeros(3, D))


@pytest.mark.parametrize("factory", [_tt, _t3, _dense], ids=["tt", "t3nsor", "dense"])
def test_float64_weights_pool_in_the_table_dtype(factory):
    """Weights of another floating dtype than the table's are cast to it by every implementation (the
    TT kernels read float32 weights; the baselines passed float64 ones to F.embedding_bag, which
    refused them): the same output as the float32 weights, in the table's dtype."""
    m = factory()
    x, offs = _ix(3, 7, 7, 49, 0), _ix(0, 1, 1, 4)
    w = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = m(x, offs, w).detach()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, m(x, offs, w.float()).detach(), rtol=0, atol=0)


def test_make_bags_normalizes_to_csr():
    bags = make_bags(_ix(4, 3, 2, 1, 0, dtype=torch.int32), _ix(0, 2, 2, dtype=torch.int32), None,
                     num_embeddings=5, mode="sum")
    assert bags.indices.dtype == torch.int64 and bags.offsets.dtype == torch.int64
    assert bags.indices.tolist() == [4, 3, 2, 1, 0]
    assert bags.offsets.tolist() == [0, 2, 2, 5]  # trailing end appended
    assert bags.num_bags == 3 and bags.num_lookups == 5
    assert bags.bag_sizes().tolist() == [2, 0, 3]
    assert bags.bag_ids().tolist() == [0, 0, 2, 2, 2]
    last = make_bags(_ix(4, 3, 2, 1, 0), _ix(0, 2, 2, 5), None, num_embeddings=5, mode="sum",
                     include_last_offset=True)
    assert last.offsets.tolist() == [0, 2, 2, 5] and last.num_bags == 3


def test_valid_edge_cases_accepted():
    # trailing empty bag (offsets[-1] == len(input)) and an all-empty batch are valid, as in nn.EmbeddingBag
    bags = make_bags(_ix(1, 2), _ix(0, 2), None, num_embeddings=3, mode="mean")
    assert bags.bag_sizes().tolist() == [2, 0]
    empty = make_bags(_ix(), _ix(0, 0, 0), None, num_embeddings=3, mode="sum")
    assert empty.num_bags == 3 and empty.num_lookups == 0
    # index N-1 is the last valid row
    assert make_bags(_ix(0, N - 1), _ix(0), None, num_embeddings=N, mode="sum").indices.tolist() == [0, N - 1]


@pytest.mark.parametrize("factory", [_tt, _t3, _dense], ids=["tt", "t3nsor", "dense"])
def test_modules_agree_with_F_embedding_bag_on_valid_input(factory):
    """A sanity anchor for the error tests: valid input is accepted and pooled like F.embedding_bag."""
    m = factory()
    weight = m.full_weight() if hasattr(m, "full_weight") else m.weight.detach()
    x, offs = _ix(3, 7, 7, 49, 0), _ix(0, 1, 1, 4)
    expected = F.embedding_bag(x, weight, offs, mode="sum")
    torch.testing.assert_close(m(x, offs).detach(), expected)
    assert ttrec.make_bags(x, offs, None, num_embeddings=N, mode="sum").num_bags == 4


SCAN_CASES = [  # (input, offsets, include_last_offset): good and bad batches for both scans
    (torch.tensor([3, 1, 4, 1, 5]), torch.tensor([0, 2, 2, 4]), False),
    (torch.tensor([3, 1, 4, 1, 5]), torch.tensor([0, 2, 2, 5]), True),
    (torch.tensor([3, 1, 4, 1, 5], dtype=torch.int32), torch.tensor([0, 2, 2, 4], dtype=torch.int32), False),
    (torch.tensor([3, 1, -4, 1, -5]), torch.tensor([0, 2, 2, 4]), False),  # first bad index at 2
    (torch.tensor([3, 1, 4, N, N + 7]), torch.tensor([0, 5]), True),  # at 3
    (torch.tensor([3, 1, 4, 1, 5]), torch.tensor([0, 3, 2, 4, 1]), False),  # first decrease at 1
    (torch.tensor([-1, 1, 4, 1, 5]), torch.tensor([0, 3, 2]), False),  # both: the offsets' error first
    # several threads' worth (the native scan splits batches of 32,768 indices and offsets or more)
    (torch.arange(40000) % N, torch.arange(0, 40000, 7), False),
    (torch.cat([torch.arange(39999) % N, torch.tensor([N])]), torch.arange(0, 40000, 7), False),  # at 39,999
    (torch.arange(40000) % N, torch.cat([torch.arange(0, 40000, 7), torch.tensor([3, 39999])]), False),  # at 5,714
    (torch.tensor([], dtype=torch.int64), torch.tensor([0, 0]), False),
    (torch.tensor([[1, 2], [3, 4]]), None, False),
    (torch.tensor([[1, 2], [3, 2**40]]), None, False),
    (torch.arange(10)[::2], torch.tensor([0, 2]), False),  # strided indices: numpy either way
]


@pytest.mark.parametrize("inp,offsets,last", SCAN_CASES)
def test_native_and_numpy_scans_give_the_same_bags_and_errors(inp, offsets, last, monkeypatch):
    """make_bags checks a CPU batch with the kernel's one-pass scan once the kernel is loaded, else
    with numpy: the same Bags, or the same error naming the same first position, either way."""
    torch.set_num_threads(2)  # the native scan's parallel path, whatever the runner's default (restored: conftest)
    from ttrec.cpu import build
    if build.unavailable_reason() is not None:  # (loads the kernel where it can be built)
        pytest.skip(f"native kernel unavailable: {build.unavailable_reason()}")
    assert build.loaded() is not None

    def outcome():
        try:
            b = make_bags(inp, offsets, None, num_embeddings=N, mode="sum", include_last_offset=last)
        except (ValueError, TypeError) as exc:
            return str(exc)
        return b.indices.tolist(), b.offsets.tolist(), b.offsets.dtype
    native = outcome()
    monkeypatch.setattr(build, "loaded", lambda: None)
    assert outcome() == native
