"""Tests found by mutation testing the data side, third round: the Criteo datasets' table sizes, the
numpy fallback of make_bags' batch scan (the path taken when the native kernel is not loaded) and
the tensorly-torch peer. Each pins a behaviour a planted mutant changed without any existing test
failing, checked against the published table sizes, a hand-made batch or TTEmbeddingBag's table."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch

from ttrec import TTEmbeddingBag, make_bags
from ttrec.bags import _first_decrease
from ttrec.baselines import TltorchEmbeddingBag, tltorch_unavailable_reason
from ttrec.cpu import build
from ttrec.datasets import DATASETS, KAGGLE, TERABYTE, Dataset
from ttrec.dlrm import build_dlrm

# ---- the datasets ----

# Typed in from the DLRM / MLPerf reference code (the data loaders' ``ln_emb``): rows per categorical
# feature after preprocessing; Terabyte with max_ind_range = 10,000,000.
CRITEO_KAGGLE_ROWS = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
                      5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
MLPERF_TERABYTE_ROWS = [9980333, 36084, 17217, 7378, 20134, 3, 7112, 1442, 61, 9758201, 1333352, 313829, 10, 2208,
                        11156, 122, 4, 970, 14, 9994222, 7267859, 9946608, 415421, 12420, 101, 36]


def test_table_sizes_are_the_published_criteo_preprocessing_counts():
    """Every table's row count (not only the totals the figures test within a tolerance) is the
    reference preprocessing's, in feature order, and the Terabyte ones respect the 10M index cap."""
    assert DATASETS == {"kaggle": KAGGLE, "terabyte": TERABYTE}
    assert list(KAGGLE.table_rows) == CRITEO_KAGGLE_ROWS and KAGGLE.embedding_dim == 16
    assert list(TERABYTE.table_rows) == MLPERF_TERABYTE_ROWS and TERABYTE.embedding_dim == 64
    assert sum(KAGGLE.table_rows) == 33_762_577 and max(TERABYTE.table_rows) <= 10_000_000
    assert KAGGLE.dense_bytes == 33_762_577 * 16 * 4
    assert TERABYTE.dense_bytes == sum(MLPERF_TERABYTE_ROWS) * 64 * 4


def test_largest_accepts_every_table_and_orders_all_by_size():
    """k may be the number of tables (all in TT format): every feature once, sizes non-increasing."""
    for data in (KAGGLE, TERABYTE):
        order = data.largest(len(data.table_rows))
        assert sorted(order) == list(range(26))
        sizes = [data.table_rows[i] for i in order]
        assert sizes == sorted(data.table_rows, reverse=True)
        with pytest.raises(ValueError, match=r"^k: got 27; must be in \[0, 26\]"):
            data.largest(27)


def test_largest_breaks_ties_by_feature_order_as_build_dlrm_picks_its_tt_tables():
    """Equal-sized tables: the earlier feature counts as larger, in Dataset.largest and in the TT
    tables build_dlrm picks on the same sizes (its comment: "Dataset.largest's order")."""
    rows = [7, 9, 7, 9, 3] + [2] * 21
    data = Dataset("ties", tuple(rows), 16)
    assert data.largest(5) == [1, 3, 0, 2, 4]
    m = build_dlrm("kaggle", rows, 3, tt_rank=2, backend="torch", fused=False)
    in_tt = [j for j, t in enumerate(m.tables) if isinstance(t, TTEmbeddingBag)]
    assert in_tt == sorted(data.largest(3)) == [0, 1, 3]


def test_datasets_are_immutable_constants():
    """The module-level datasets are shared by every experiment: no attribute can be reassigned."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        KAGGLE.embedding_dim = 64
    assert hash(KAGGLE) == hash(Dataset("kaggle", tuple(CRITEO_KAGGLE_ROWS), 16))


# ---- make_bags without the native kernel (the numpy scan) ----

@pytest.fixture
def numpy_scan(monkeypatch):
    """make_bags as it runs when the native kernel library is not loaded."""
    monkeypatch.setattr(build, "loaded", lambda: None)


@pytest.fixture(params=["numpy", "native"])
def either_scan(request, monkeypatch):
    """make_bags with the numpy scan, then with the native one (skipped where the kernel is unavailable)."""
    if request.param == "numpy":
        monkeypatch.setattr(build, "loaded", lambda: None)
    elif build.unavailable_reason() is not None:
        pytest.skip(f"native kernel unavailable: {build.unavailable_reason()}")
    else:
        assert build.loaded() is not None


def _bags(inp, offsets, **kw):
    return make_bags(inp, offsets, None, num_embeddings=10, mode="sum", **kw)


@pytest.mark.parametrize("offsets,j", [([0, -1], 0), ([0, 3, 1], 1), ([0, 2, 1, 0], 1), ([0, 1, 2, 1, 4, 0], 2)])
def test_numpy_scan_names_the_first_decrease_of_the_offsets(numpy_scan, offsets, j):
    """Without the kernel, decreasing offsets are refused naming the first decrease, also with only
    two offsets (offsets [0, -1] would otherwise pass as a bag of length -1)."""
    inp = torch.tensor([1, 2, 3, 4])
    a = offsets
    with pytest.raises(ValueError, match=rf"^offsets: got offsets\[{j}\]={a[j]} > offsets\[{j + 1}\]={a[j + 1]}; "):
        _bags(inp, torch.tensor(offsets))


def test_first_decrease_of_a_tensor_is_the_first_like_for_a_numpy_array():
    """The tensor branch (offsets off the CPU) finds the same first decrease as the numpy branch."""
    for offsets, expected in [([0, 3, 1, 5, 2], 1), ([0, 1, 1, 4, 2, 0], 3), ([0, 1, 2], None), ([0], None)]:
        assert _first_decrease(np.array(offsets)) == expected
        assert _first_decrease(torch.tensor(offsets)) == expected


def test_2d_input_out_of_range_is_refused_naming_the_first_position(either_scan):
    """A 2D (B, L) input is range-checked as a 1D one: the first bad index in row-major order."""
    for inp, value, pos in [([[1, 2], [10, 3]], 10, 2), ([[1, -2], [12, 3]], -2, 1)]:
        with pytest.raises(ValueError, match=rf"^input: got index {value} at position {pos}; "):
            _bags(torch.tensor(inp), None)


def test_strided_indices_are_checked_by_their_values_not_their_storage(either_scan):
    """A non-contiguous index view is checked element by element as it reads (numpy handles the
    strides; the one-pass native scan reads raw memory, so it must not be given such a view)."""
    storage = torch.tensor([1, 99, 2, 99, 3, 99, 4, 0, 12, 0])
    good = storage[0:7:2]  # [1, 2, 3, 4]; its first 4 memory entries hold two 99s
    b = _bags(good, torch.tensor([0, 2]))
    assert b.indices.tolist() == [1, 2, 3, 4] and b.offsets.tolist() == [0, 2, 4]
    bad = storage[6::2]  # [4, 12]; its first 2 memory entries are [4, 0]
    with pytest.raises(ValueError, match=r"^input: got index 12 at position 1; "):
        _bags(bad, torch.tensor([0]))


def test_negative_view_offsets_and_weights_read_as_their_values(numpy_scan):
    """Offsets and weights given as negative views (torch._neg_view: values negated in a flag,
    which numpy does not read) make the same Bags as the plain tensors they stand for."""
    inp, offsets, w = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 3]), torch.tensor([0.5, -1.0, 2.0, 3.0])
    neg_offsets, neg_w = torch._neg_view(-offsets), torch._neg_view(-w)
    assert neg_offsets.is_neg() and torch.equal(neg_offsets, offsets)
    got = make_bags(inp, neg_offsets, neg_w, num_embeddings=10, mode="sum")
    assert got.offsets.tolist() == [0, 1, 3, 4]
    assert got.per_sample_weights.tolist() == [0.5, -1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=r"^input: got index -1 at position 0; "):  # stands for [-1, -2]
        _bags(torch._neg_view(torch.tensor([1, 2])), torch.tensor([0]))


# ---- the tensorly-torch peer ----

needs_tltorch = pytest.mark.skipif(tltorch_unavailable_reason() is not None, reason=str(tltorch_unavailable_reason()))


def _rows_of(m, n: int) -> torch.Tensor:
    """The table ``m`` pools from: one bag per row."""
    return m(torch.arange(n), torch.arange(n)).detach().double()


@needs_tltorch
@pytest.mark.parametrize("kwargs", [{"tt_ranks": (2, 3), "tt_p_shapes": (3, 4, 5), "tt_q_shapes": (2, 2, 2)},
                                    {"tt_ranks": 3, "d": 2},
                                    {"tt_ranks": 3, "tt_p_shapes": (3, 4, 5), "tt_q_shapes": (2, 2, 2), "init": "uniform"}],
                         ids=["uneven ranks", "d=2", "uniform init"])
def test_tltorch_starts_from_tt_embedding_bags_table_for_the_same_arguments(kwargs):
    """Whatever the ranks, number of cores or init, the tltorch peer's table is TTEmbeddingBag's
    (torch backend) for the same arguments and seed."""
    n, dim = 57, 8
    peer = TltorchEmbeddingBag(n, dim, seed=4, **kwargs)
    tt = TTEmbeddingBag(n, dim, seed=4, backend="torch", **kwargs)
    assert peer.spec == tt.spec and len(peer.inner.weight.factors) == len(tt.tt_cores)
    torch.testing.assert_close(_rows_of(peer, n), tt.full_weight().detach().double(), rtol=1e-5, atol=1e-6)


@needs_tltorch
def test_tltorch_pools_float64_weights_in_its_table_dtype():
    """Weights of another floating dtype are cast to the table's, as the other implementations do:
    a float32 output equal to the one with float32 weights."""
    m = TltorchEmbeddingBag(57, 8, 3, (3, 4, 5), (2, 2, 2), seed=0)
    x, offs = torch.tensor([3, 7, 7, 49, 0]), torch.tensor([0, 1, 1, 4])
    w = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = m(x, offs, w).detach()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, m(x, offs, w.float()).detach(), rtol=0, atol=0)


def test_tltorch_missing_is_reported_and_refused_naming_the_peers_extra(monkeypatch):
    """Without tensorly-torch: a reason naming the install command, and the constructor raises a
    RuntimeError naming impl 'tltorch' with it (not a bare ImportError)."""
    monkeypatch.setitem(sys.modules, "tltorch", None)  # import tltorch -> ImportError
    reason = tltorch_unavailable_reason()
    assert reason is not None and reason.startswith("tensorly-torch is not importable (")
    assert reason.endswith("install the peers extra: pip install '.[peers]'")
    with pytest.raises(RuntimeError, match=r"^impl 'tltorch': tensorly-torch is not importable"):
        TltorchEmbeddingBag(57, 8, 3, (3, 4, 5), (2, 2, 2))
