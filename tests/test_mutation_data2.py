"""Tests found by mutation testing the data side, second round: the LFU cache's write-back step and
per-sample weights in the fused update, the synthetic click stream's planted model, and the Criteo
reader and click source. Each pins a behaviour a planted mutant changed without any existing test
failing, checked against a closed form, autograd on a dense table or a file written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import optimize

import ttrec.cache as cache_module
from ttrec import TTEmbeddingBag
from ttrec.cache import CachedTTEmbeddingBag
from ttrec.criteo import CriteoReader, feature_batches
from ttrec.reference import tt_to_dense
from ttrec.synthetic_clicks import CriteoClicks, SyntheticClicks, _bias_for_rate

N, D, LR = 600, 16, 0.05


def cached_module(optimizer=None, write_back_steps=0) -> CachedTTEmbeddingBag:
    tt = TTEmbeddingBag(N, D, 4, tt_p_shapes=(6, 10, 10), backend="torch", seed=3)
    return CachedTTEmbeddingBag(tt, cache_fraction=0.05, warmup_iters=0, refresh_every=0, optimizer=optimizer,
                                learning_rate=LR, write_back_steps=write_back_steps)


def logical_table(m: CachedTTEmbeddingBag, cache: torch.Tensor) -> torch.Tensor:
    """The cores' dense table (float64) with the cached rows replaced by ``cache``."""
    table = tt_to_dense([c.detach().double() for c in m.tt.tt_cores], m.spec)
    occupied = torch.nonzero(m.slot_rows >= 0).flatten()
    return table.index_copy(0, m.slot_rows[occupied], cache[occupied])


# ---- the LFU cache ----

@pytest.mark.parametrize("steps", [1, 2])
def test_write_back_takes_plain_gradient_steps_of_the_learning_rate(steps):
    """write_back_steps gradient steps of size learning_rate on 0.5 * sum ||row(cores) - value||^2,
    recomputed here on the dense reconstruction in float64 (100 steps of half the size also converge,
    so the existing convergence test could not tell the step size)."""
    m = cached_module(write_back_steps=steps)
    m.set_cached_rows(torch.tensor([10, 20, 555]))
    with torch.no_grad():
        m.cache_weight[:3] += 0.3
    rows, target = m.slot_rows[:3].clone(), m.cache_weight[:3].detach().double().clone()
    cores = [c.detach().double().clone() for c in m.tt.tt_cores]
    for _ in range(steps):
        leaves = [c.clone().requires_grad_(True) for c in cores]
        loss = 0.5 * (tt_to_dense(leaves, m.spec)[rows] - target).pow(2).sum()
        grads = torch.autograd.grad(loss, leaves)
        cores = [c - LR * g for c, g in zip(cores, grads)]
    m.set_cached_rows(torch.tensor([30]))  # evicts the three rows
    for k, (got, want) in enumerate(zip(m.tt.tt_cores, cores)):
        assert torch.allclose(got.detach().double(), want, rtol=1e-4, atol=1e-6), f"core {k}"


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
@pytest.mark.parametrize("dense_grad", [True, False])
def test_fused_cache_step_and_weight_gradient_with_per_sample_weights(monkeypatch, optimizer, dense_grad):
    """Weighted bags with repeated cached rows: the fused step equals SGD/Adagrad on the logical
    table's gradient, and per_sample_weights get d out / d w = the row read. dense_grad=False forces
    the path a cache of more than _DENSE_GRAD_MAX entries takes (it had dropped the weights)."""
    if not dense_grad:
        monkeypatch.setattr(cache_module, "_DENSE_GRAD_MAX", 0)
    m = cached_module(optimizer=optimizer)
    m.set_cached_rows(torch.tensor([4, 7, 100, 599]))
    with torch.no_grad():
        m.cache_weight.normal_(generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    idx = torch.tensor([4, 7, 4, 3, 100, 599, 599, 4, 50, 7])
    offsets = torch.tensor([0, 3, 3, 6])
    w = torch.rand(idx.numel(), generator=g).requires_grad_(True)
    grad_out = torch.randn(offsets.numel(), D, generator=g)

    cache0 = m.cache_weight.detach().double().clone().requires_grad_(True)
    w_ref = w.detach().double().clone().requires_grad_(True)
    ref = F.embedding_bag(idx, logical_table(m, cache0), offsets, mode="sum", per_sample_weights=w_ref)
    ref.backward(grad_out.double())
    if optimizer == "sgd":
        expected = cache0.detach() - LR * cache0.grad
    else:  # torch.optim.Adagrad's first step: h = g^2; w -= lr g / (sqrt(h) + eps)
        expected = cache0.detach() - LR * cache0.grad / (cache0.grad.abs() + m.eps)

    out = m(idx, offsets, per_sample_weights=w)
    assert torch.allclose(out.double(), ref.detach(), atol=1e-5)
    out.backward(grad_out)
    assert torch.allclose(m.cache_weight.detach().double(), expected, atol=1e-5)
    assert torch.allclose(w.grad.double(), w_ref.grad, atol=1e-5)



# ---- the synthetic click stream ----

def test_planted_model_is_the_documented_logit():
    """logit = bias + w . standardize(dense) + sum_j a_j[r_j] + sum_{j<k} <v_j[r_j], v_k[r_k]>,
    the pairs summed one by one here (the model uses the square-of-sum identity)."""
    data = SyntheticClicks([50, 3000, 1, 700], 64, 256, seed=5, calibration_samples=2048)
    p, b = data.planted, data.next_batch()
    sparse = b.sparse
    want = p.bias + ((b.dense.double() - p.dense_mean) / p.dense_std) @ p.dense_weight
    for j in range(4):
        want = want + p.first_order[j][sparse[:, j]]
        for k in range(j + 1, 4):
            want = want + (p.vectors[j][sparse[:, j]] * p.vectors[k][sparse[:, k]]).sum(1)
    assert torch.allclose(p(b.dense, sparse).double(), want, rtol=1e-5, atol=1e-5)


def test_planted_parts_have_the_documented_spreads_and_click_rate():
    """On tables of many rows, over uniformly drawn rows (the parts' values are i.i.d. per row), the
    dense, first-order and interaction parts have standard deviations dense_std, first_order_std and
    interaction_std; the dense features are standardized; the mean click probability is ctr."""
    t, n, k, ctr = 6, 20000, 4, 0.1
    data = SyntheticClicks([n] * t, 8, 20000, seed=1, planted_dim=k, ctr=ctr, dense_std=0.7, first_order_std=1.5,
                           interaction_std=2.5, calibration_samples=20000)
    p, e = data.planted, data.eval_set
    assert float(p.dense_weight.norm()) == pytest.approx(0.7, rel=1e-9)
    # per table: a ~ N(0, first_order_std^2 / T); v ~ N(0, s^2) with pairs * k * s^4 = interaction_std^2
    assert float(torch.cat(p.first_order).std()) == pytest.approx(1.5 / math.sqrt(t), rel=0.02)
    s = (2.5 ** 2 / (t * (t - 1) / 2 * k)) ** 0.25
    assert float(torch.cat(p.vectors).std()) == pytest.approx(s, rel=0.02)
    z = (e.dense.double() - p.dense_mean) / p.dense_std  # a fresh sample: mean 0, std 1 per feature
    assert float(z.mean(0).abs().max()) < 0.05 and float((z.std(0) - 1).abs().max()) < 0.05
    uniform = torch.randint(0, n, (len(e), t), generator=torch.Generator().manual_seed(0))
    dense_part, first, inter = p.parts(e.dense, uniform)
    assert float(dense_part.std()) == pytest.approx(0.7, rel=0.05)
    assert float(first.std()) == pytest.approx(1.5, rel=0.05)
    assert float(inter.std()) == pytest.approx(2.5, rel=0.08)
    # the click rate: the mean probability of the held-out set (drawn after the calibration sample)
    assert float(torch.sigmoid(p(e.dense, e.sparse).double()).mean()) == pytest.approx(ctr, abs=0.01)


def test_bias_for_rate_solves_for_the_mean_probability():
    assert _bias_for_rate(torch.zeros(5, dtype=torch.float64), 0.25) == pytest.approx(math.log(1 / 3), abs=1e-9)
    logits = torch.tensor([-3.0, 0.5, 4.0, 4.5], dtype=torch.float64)
    want = optimize.brentq(lambda b: float(torch.sigmoid(logits + b).mean()) - 0.3, -50, 50, xtol=1e-13)
    assert _bias_for_rate(logits, 0.3) == pytest.approx(want, abs=1e-9)


def test_each_table_has_its_own_zipf_stream_with_the_given_exponent():
    """Ranks 1 and 2 of Zipf(alpha) over n rows have frequencies r^-alpha / H(n, alpha); tables of
    the same size draw from independently seeded (and permuted) streams."""
    alpha, n, m = 2.0, 500, 16384
    data = SyntheticClicks([n] * 3, 8, m, seed=3, zipf_alpha=alpha, calibration_samples=1024)
    ids = data.eval_set.sparse
    h = sum(r ** -alpha for r in range(1, n + 1))
    for j in range(3):
        freq = torch.bincount(ids[:, j], minlength=n).double().sort(descending=True).values / m
        for rank in (1, 2):
            q = rank ** -alpha / h
            assert abs(float(freq[rank - 1]) - q) < 5 * math.sqrt(q * (1 - q) / m), (j, rank)
    for j, k in ((0, 1), (0, 2), (1, 2)):
        assert float((ids[:, j] == ids[:, k]).double().mean()) < 0.2


def test_row_ids_do_not_depend_on_the_batch_size():
    """Per table, ids are drawn in chunks and consumed in order: the same stream whatever the batch
    size, across a chunk boundary (8192 ids)."""
    a = SyntheticClicks([300, 40], 500, 50, seed=4, calibration_samples=100)
    b = SyntheticClicks([300, 40], 333, 50, seed=4, calibration_samples=100)
    ids_a = torch.cat([a.next_batch().sparse for _ in range(20)])
    ids_b = torch.cat([b.next_batch().sparse for _ in range(31)])[: len(ids_a)]
    assert torch.equal(ids_a, ids_b)


@pytest.mark.parametrize("kwargs,needle", [
    ({"ctr": 0.0}, r"^ctr: got 0.0; must be in \(0, 1\)"),
    ({"ctr": 1.0}, r"^ctr: got 1.0; must be in \(0, 1\)"),
    ({"zipf_alpha": 0.0}, r"^zipf_alpha: got 0.0; must be > 0"),
    ({"first_order_std": -0.1}, r"^first_order_std: got -0.1; must be finite and >= 0"),
])
def test_synthetic_clicks_refuse_bad_values(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SyntheticClicks([10, 20], 8, 16, calibration_samples=64, **kwargs)


@pytest.mark.parametrize("rows,needle", [
    ([10, 2.7], r"table_rows: got 2.7 rows for table 1; each must be an int >= 1"),
    ([10, "5"], r"table_rows: got '5' rows for table 1; each must be an int >= 1"),
    ([True, 10], r"table_rows: got True rows for table 0; each must be an int >= 1"),
    ([10, 0], r"table_rows: got 0 rows for table 1; each must be an int >= 1"),
    (12, r"table_rows: got 12; need a sequence of row counts"),
])
def test_table_rows_must_be_whole_counts(tmp_path, rows, needle):
    """A float was truncated (2.7 -> 2 rows), a string or a bool read as a count, and 0 failed inside
    the id sampler naming num_embeddings."""
    with pytest.raises(ValueError, match=needle):
        SyntheticClicks(rows, 8, 16, calibration_samples=64)
    path = tmp_path / "day_0"
    path.write_text(criteo_line("1", "a"))
    with pytest.raises(ValueError, match=needle):
        CriteoClicks(path, rows + [100] * 24 if isinstance(rows, list) else rows, batch_size=2, eval_samples=1)
    with pytest.raises(ValueError, match=r"table_rows: got 25 row counts; need 26"):
        CriteoClicks(path, [100] * 25, batch_size=2, eval_samples=1)
    assert SyntheticClicks(np.array([10, 20]), 8, 16, calibration_samples=64).table_rows == [10, 20]


def test_zero_spreads_are_allowed_and_switch_their_part_off():
    data = SyntheticClicks([30, 40, 50], 8, 256, seed=0, dense_std=0.0, interaction_std=0.0, calibration_samples=256)
    e = data.eval_set
    dense_part, first, inter = data.planted.parts(e.dense, e.sparse)
    assert float(dense_part.abs().max()) == 0.0 and float(inter.abs().max()) == 0.0 and float(first.std()) > 0


# ---- Criteo files ----

def criteo_line(label: str, cat0: str, sep: str = "\n") -> str:
    fields = [label] + [str(i) for i in range(13)] + [cat0] + ["%x" % (9 + i) for i in range(25)]
    return "\t".join(fields) + sep


def test_crlf_line_endings_read_like_lf(tmp_path):
    lf, crlf = tmp_path / "lf.txt", tmp_path / "crlf.txt"
    lines = [("1", "ff"), ("0", "10"), ("1", "")]
    lf.write_text("".join(criteo_line(y, c) for y, c in lines))
    crlf.write_bytes("".join(criteo_line(y, c, "\r\n") for y, c in lines).encode("ascii"))
    for mapping in ("hash", "dictionary"):
        (a,) = CriteoReader(lf, 1000, mapping=mapping)
        (b,) = CriteoReader(crlf, 1000, mapping=mapping)
        assert torch.equal(a.labels, b.labels) and torch.equal(a.dense, b.dense) and torch.equal(a.sparse, b.sparse)
        assert b.sparse[:, 25].tolist() == [0x21 if mapping == "hash" else 0] * 3  # "21", the 26th value


def test_a_line_of_empty_fields_is_a_sample_of_zeros_and_non_ascii_is_refused(tmp_path):
    """Every field may be empty (40 empty fields: label 0, features 0, categorical value 0); a
    non-ASCII byte inside a value is an error, not dropped (which would read "a\xe9b" as 0xab)."""
    path = tmp_path / "day_0"
    path.write_text(criteo_line("1", "ab") + "\t" * 39 + "\n")
    (b,) = CriteoReader(path, 1000)
    assert b.labels.tolist() == [1.0, 0.0] and b.dense[1].tolist() == [0.0] * 13 and b.sparse[1].tolist() == [0] * 26
    path.write_bytes(criteo_line("1", "a\xe9b").encode("latin-1"))
    with pytest.raises(ValueError, match=r"day_0:1: categorical feature 0: got 'a.b'"):
        list(CriteoReader(path, 1000))


def test_feature_batches_serve_the_requested_column(tmp_path):
    """Feature j's bags are column j's rows (hash: value % rows), one lookup per sample, every j."""
    path = tmp_path / "day_0"
    path.write_text(criteo_line("1", "ab") + criteo_line("0", "cd"))
    for j in range(26):
        (b,) = feature_batches(path, j, 1000, batch_size=4, repeat=False)
        value = [0xab, 0xcd] if j == 0 else [9 + j - 1] * 2
        assert b.indices.tolist() == [v % 1000 for v in value] and b.offsets.tolist() == [0, 1], j


def test_dictionaries_must_be_one_per_feature(tmp_path):
    path = tmp_path / "day_0"
    path.write_text(criteo_line("1", "a"))
    with pytest.raises(ValueError, match=r"dictionaries: got 25; need 26"):
        CriteoReader(path, 10, mapping="dictionary", dictionaries=[{} for _ in range(25)])


def test_empty_files_are_errors_not_empty_streams(tmp_path):
    empty, one = tmp_path / "empty.txt", tmp_path / "one.txt"
    empty.write_text("")
    one.write_text(criteo_line("1", "a"))
    with pytest.raises(ValueError, match=r"empty.txt: no samples"):
        next(feature_batches(empty, 0, 10))
    with pytest.raises(ValueError, match=r"empty.txt has no samples"):
        CriteoClicks(empty, [10] * 26, batch_size=2, eval_samples=2)
    for mapping in ("hash", "dictionary"):
        with pytest.raises(ValueError, match=r"empty.txt has no samples"):
            CriteoClicks(empty, [10] * 26, batch_size=2, eval_samples=2, eval_path=one, mapping=mapping)


def test_the_whole_training_file_is_numbered_before_the_held_out_file(tmp_path):
    """With dictionary mapping and a training file longer than one reader batch, a held-out value that
    appears late in training keeps its training id (the training file is read to its end first)."""
    train, held_out = tmp_path / "train.txt", tmp_path / "eval.txt"
    train.write_text("".join(criteo_line("1", c) for c in ("a", "b", "c", "d", "e")))
    held_out.write_text("".join(criteo_line("0", c) for c in ("e", "f", "a")))
    data = CriteoClicks(train, [100] * 26, batch_size=2, eval_samples=3, eval_path=held_out, mapping="dictionary")
    assert data.eval_set.sparse[:, 0].tolist() == [4, 5, 0]
    got = [int(x) for _ in range(3) for x in data.next_batch().sparse[:, 0]]
    assert got == [0, 1, 2, 3, 4, 0]
