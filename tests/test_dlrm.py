"""The DLRM (ttrec.dlrm) and the synthetic click data (ttrec.synthetic_clicks), against independent references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ttrec
from ttrec.dlrm import (ARCHS, DENSE_INITS, binary_metrics, build_dlrm, init_dense_table, roc_auc,
                        table_sizes)
from ttrec.synthetic_clicks import SyntheticClicks
from ttrec.tt import TTEmbeddingBag

TINY = 20000  # Kaggle's tables / 20000: the largest has 507 rows


def _batch(rows, b=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(b, 13, generator=g) * 3
    sparse = torch.stack([torch.randint(0, n, (b,), generator=g) for n in rows], 1)
    labels = (torch.rand(b, generator=g) < 0.3).float()
    return dense, sparse, labels


def test_forward_and_backward_shapes_and_structure():
    rows = table_sizes("kaggle", TINY)
    m = build_dlrm("kaggle", rows, 3, tt_rank=4, backend="torch", fused=False)
    dense, sparse, labels = _batch(rows)
    out = m(dense, sparse)
    assert out.shape == (64,) and out.dtype == torch.float32
    F.binary_cross_entropy_with_logits(out, labels).backward()
    assert all(p.grad is not None for p in m.mlp_parameters())
    tt = [t for t in m.tables if isinstance(t, TTEmbeddingBag)]
    assert len(tt) == 3 and all(c.grad is not None for t in tt for c in t.tt_cores)
    # the 3 TT tables are the 3 largest; the MLPs are MLPerf's Kaggle shapes
    assert sorted(rows.index(t.num_embeddings) for t in tt) == sorted(ttrec.datasets.KAGGLE.largest(3))
    assert [l.out_features for l in m.bottom if isinstance(l, torch.nn.Linear)] == [512, 256, 64, 16]
    top = [l for l in m.top if isinstance(l, torch.nn.Linear)]
    assert top[0].in_features == 16 + 27 * 26 // 2 and [l.out_features for l in top] == [512, 256, 1]
    assert ARCHS["terabyte"].describe() == ("13-512-256-64", "415-512-512-256-1")


def test_interaction_is_the_pairwise_dot_products_of_bottom_output_and_embeddings():
    rows = table_sizes("kaggle", TINY)
    m = build_dlrm("kaggle", rows, 0)
    dense, sparse, _ = _batch(rows, b=5)
    emb = m.embed(sparse)
    x = m.bottom(dense)
    feats = [x] + [emb[:, j] for j in range(26)]
    pairs = [(feats[i] * feats[j]).sum(1) for i, j in itertools.combinations(range(27), 2)]
    expected = m.top(torch.cat([x, torch.stack(pairs, 1)], 1)).squeeze(1)
    torch.testing.assert_close(m.interact(dense, emb), expected, rtol=1e-5, atol=1e-5)


def test_tt_model_equals_a_dense_model_holding_the_reconstructed_tables():
    """Outputs, MLP gradients and table gradients of a TT model (reference backend, autograd) against
    the dense model whose TT tables are replaced by tt_to_dense(cores)."""
    rows = table_sizes("kaggle", TINY)
    tt_model = build_dlrm("kaggle", rows, 5, tt_rank=6, tt_init="calibrated", backend="torch", fused=False, seed=3)
    dense_model = build_dlrm("kaggle", rows, 0, seed=3)
    tt_pos = [j for j, t in enumerate(tt_model.tables) if isinstance(t, TTEmbeddingBag)]
    with torch.no_grad():
        for j in tt_pos:
            t = tt_model.tables[j]
            dense_model.tables[j].weight.copy_(ttrec.tt_to_dense(list(t.tt_cores), t.spec))
    for a, b in zip(tt_model.mlp_parameters(), dense_model.mlp_parameters()):  # same seed: same MLPs
        assert torch.equal(a, b)
    dense, sparse, labels = _batch(rows, b=200, seed=1)
    out_tt, out_dense = tt_model(dense, sparse), dense_model(dense, sparse)
    torch.testing.assert_close(out_tt, out_dense, rtol=1e-5, atol=1e-6)
    F.binary_cross_entropy_with_logits(out_tt, labels).backward()
    F.binary_cross_entropy_with_logits(out_dense, labels).backward()
    for a, b in zip(tt_model.mlp_parameters(), dense_model.mlp_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    for j in tt_pos:
        t = tt_model.tables[j]
        grad_w = dense_model.tables[j].weight.grad.to_dense()  # dL/dW of the reconstructed table
        cores = [c.detach().clone().requires_grad_(True) for c in t.tt_cores]
        expected = torch.autograd.grad(ttrec.tt_to_dense(cores, t.spec), cores, grad_outputs=grad_w)
        for c, e in zip(t.tt_cores, expected):
            torch.testing.assert_close(c.grad, e, rtol=1e-4, atol=1e-6)


def test_roc_auc_equals_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 300).astype(float)  # many ties
    labels = rng.random(300) < 0.4
    pos, neg = scores[labels], scores[~labels]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (pos.size * neg.size)
    assert roc_auc(scores, labels) == pytest.approx(brute, abs=1e-12)
    assert math.isnan(roc_auc(scores, np.zeros(300)))
    m = binary_metrics(torch.tensor([2.0, -1.0, 0.5, -3.0]), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert m["accuracy"] == pytest.approx(75.0) and m["auc"] == pytest.approx(1.0)
    assert m["bce"] == pytest.approx(float(F.binary_cross_entropy_with_logits(
        torch.tensor([2.0, -1.0, 0.5, -3.0]), torch.tensor([1.0, 0.0, 0.0, 0.0]))))


@pytest.mark.parametrize("scheme", list(DENSE_INITS))
def test_dense_inits_have_the_table1_spread(scheme):
    n = 5000
    w = torch.empty(n, 16)
    init_dense_table(w, scheme, torch.Generator().manual_seed(0))
    target = math.sqrt(1 / (3 * n)) if scheme == "uniform" else DENSE_INITS[scheme][1](n)
    assert float(w.std()) == pytest.approx(target, rel=0.03)
    if scheme == "uniform":
        assert float(w.abs().max()) <= n ** -0.5


def test_bad_values_fail_clearly():
    with pytest.raises(ValueError, match="dataset: got 'avazu'"):
        build_dlrm("avazu")
    with pytest.raises(ValueError, match=r"tt_tables: got 27; must be an int in \[0, 26\]"):
        build_dlrm("kaggle", table_sizes("kaggle", TINY), 27)
    with pytest.raises(ValueError, match="dense_init: got 'xavier'"):
        build_dlrm("kaggle", table_sizes("kaggle", TINY), 0, dense_init="xavier")
    with pytest.raises(ValueError, match="scale_down: got 0"):
        table_sizes("kaggle", 0)
    with pytest.raises(ValueError, match="table_rows: got 3 sizes"):
        build_dlrm("kaggle", [10, 10, 10])
    with pytest.raises(ValueError, match="batch_size: got 0"):
        SyntheticClicks([10] * 26, 0)
    with pytest.raises(ValueError, match="ctr: got 1.5"):
        SyntheticClicks([10] * 26, 8, ctr=1.5)


def test_synthetic_clicks_are_seeded_and_have_the_planted_rate():
    rows = table_sizes("kaggle", TINY)
    a = SyntheticClicks(rows, 256, 4096, seed=7, calibration_samples=4096)
    b = SyntheticClicks(rows, 256, 4096, seed=7, calibration_samples=4096)
    assert torch.equal(a.eval_set.sparse, b.eval_set.sparse) and torch.equal(a.eval_set.labels, b.eval_set.labels)
    x, y = a.next_batch(), b.next_batch()
    assert torch.equal(x.sparse, y.sparse) and torch.equal(x.dense, y.dense) and torch.equal(x.labels, y.labels)
    c = SyntheticClicks(rows, 256, 4096, seed=8, calibration_samples=4096)
    assert not torch.equal(a.eval_set.sparse, c.eval_set.sparse)
    assert float(a.eval_set.labels.mean()) == pytest.approx(0.25, abs=0.03)
    assert (a.eval_set.sparse < torch.tensor(rows)).all() and (a.eval_set.sparse >= 0).all()
    # Zipf-skewed ids: the most frequent row of the largest table is far above uniform
    big = int(np.argmax(rows))
    counts = torch.bincount(a.eval_set.sparse[:, big], minlength=rows[big])
    assert counts.max() > 20 * 4096 / rows[big]


def test_the_planted_model_scores_the_reported_bayes_accuracy_and_training_approaches_it():
    rows = table_sizes("kaggle", TINY)
    data = SyntheticClicks(rows, 256, 16384, seed=0, calibration_samples=16384)
    bayes = data.bayes_metrics()
    e = data.eval_set
    logits = data.planted(e.dense, e.sparse).double()  # the planted weights, scored here by the definitions
    accuracy = 100 * float(((logits > 0).double() == e.labels.double()).double().mean())
    bce = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, e.labels.double()))
    assert bayes["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert bayes["bce"] == pytest.approx(bce, rel=1e-4)
    majority = 100 * max(float(e.labels.mean()), 1 - float(e.labels.mean()))
    assert bayes["accuracy"] > majority + 3 and abs(bayes["accuracy"] - bayes["accuracy_expected"]) < 1.5
    # a slightly perturbed planted model scores worse: the Bayes ceiling is a ceiling
    noisy = data.planted(e.dense, e.sparse) + torch.randn(len(e), generator=torch.Generator().manual_seed(0))
    assert binary_metrics(noisy, e.labels)["bce"] > bayes["bce"]
    # a small DLRM trained on the stream (300 x 256 samples) closes a good part of the AUC gap to the ceiling
    torch.manual_seed(0)
    from benches.training import Trainer

    tr = Trainer(build_dlrm("kaggle", rows, 0, seed=0), lr=0.1)
    before = tr.evaluate(e, 8192)
    for _ in range(300):
        tr.step(data.next_batch())
    after = tr.evaluate(e, 8192)
    assert after["auc"] > before["auc"] + 0.3 * (bayes["auc"] - before["auc"])
    assert after["bce"] < before["bce"] and after["accuracy"] > majority
