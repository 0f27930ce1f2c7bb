"""Review of the end-to-end training experiments: metrics against independent computations, the
held-out evaluation, seeds, the DLRM's shapes, the synthetic clicks' statistics, the rows' hit ratio,
and bad inputs (ttrec.dlrm, ttrec.synthetic_clicks, benches.training, reports.training_*)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from scipy import integrate

from benches.config import register, to_objects
from benches.training import Trainer, _model_rows, build_data, build_model, learning_rate, train_rows
from ttrec.cache import CachedTTEmbeddingBag
from ttrec.dlrm import ARCHS, DLRM, binary_metrics, build_dlrm, build_tables, roc_auc, table_sizes
from ttrec.synthetic_clicks import CriteoClicks, SyntheticClicks

from .test_training_experiments import CONF, _criteo_file

TINY = 20000  # Kaggle's tables / 20000: the largest has 507 rows

register()


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return to_objects(compose(config_name="bench", overrides=[
            "task=train_dlrm", "dlrm.scale_down=20000", "dlrm.batch_size=32", "dlrm.iterations=6",
            "dlrm.timing_warmup=1", "dlrm.eval_samples=256", *overrides]))


def _row(rows, metric, model="main"):
    return next(r for r in rows if r["metric"] == metric and r["model"] == model)


# ---- metrics ----

def test_metrics_equal_their_definitions_computed_independently():
    rng = np.random.default_rng(3)
    logits = np.round(rng.normal(0, 2, 2000), 1)  # ties, and exact zeros (p = 0.5)
    labels = (rng.random(2000) < 0.3).astype(np.float64)
    m = binary_metrics(torch.tensor(logits), torch.tensor(labels))
    p = 1 / (1 + np.exp(-logits))
    assert m["bce"] == pytest.approx(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)), rel=1e-12)
    assert m["accuracy"] == pytest.approx(100 * np.mean((p > 0.5) == (labels == 1)), abs=1e-12)
    pos, neg = logits[labels == 1], logits[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert m["auc"] == pytest.approx(pairs / (pos.size * neg.size), abs=1e-12)
    assert m["nan_logits"] == 0


def test_nan_logits_give_nan_metrics_not_the_negatives_share():
    """A diverged model (NaN logits) used to score accuracy = share of negatives and AUC 0.5 (or 1.0
    with a few NaNs ranked highest): the committed fig6 run's 7 TT tables, rank 32, sampled Gaussian
    point reads 75.233% / 0.500 with its BCE NaN."""
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0])
    m = binary_metrics(torch.full((4,), math.nan), labels)
    assert math.isnan(m["accuracy"]) and math.isnan(m["auc"]) and math.isnan(m["bce"]) and m["nan_logits"] == 4
    m = binary_metrics(torch.tensor([math.nan, -1.0, -2.0, -3.0]), labels)
    assert math.isnan(m["accuracy"]) and math.isnan(m["auc"]) and m["nan_logits"] == 1
    assert math.isnan(roc_auc(np.array([np.nan, 0.0, 1.0]), np.array([1, 0, 1])))


def test_a_diverged_model_is_recorded_as_nan_with_a_note():
    rows = table_sizes("kaggle", TINY)
    data = SyntheticClicks(rows, 32, 256, seed=0, calibration_samples=1024)
    tr = Trainer(build_dlrm("kaggle", rows, 0), 0.1)
    tr.step(data.next_batch())
    with torch.no_grad():
        tr.model.top[-1].bias.fill_(math.nan)
    metrics = tr.evaluate(data.eval_set, 100)
    out = {r["metric"]: r for r in _model_rows(tr, metrics, 0, len(data.eval_set), None)}
    for name in ("accuracy", "bce", "auc"):
        assert math.isnan(out[name]["median"]) and out[name]["n"] == 0, name
    assert "diverged: 256 held-out logits are NaN" in out["accuracy"]["note"]


def test_labels_other_than_0_or_1_are_an_error():
    with pytest.raises(ValueError, match="labels: got 2.0; each must be 0 or 1"):
        binary_metrics(torch.tensor([1.0, -1.0]), torch.tensor([2.0, 0.0]))
    with pytest.raises(ValueError, match="scores, labels: got 3 and 2 values"):
        roc_auc(np.zeros(3), np.zeros(2))


# ---- held-out evaluation, seeds ----

def test_evaluation_is_in_eval_mode_and_changes_nothing():
    rows = table_sizes("kaggle", TINY)
    data = SyntheticClicks(rows, 32, 300, seed=1, calibration_samples=1024)
    tr = Trainer(build_dlrm("kaggle", rows, 2, tt_rank=4, seed=1, cache_fraction=0.1, cache_warmup_iters=1), 0.1)
    for _ in range(3):
        tr.step(data.next_batch())
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    cached = [t.cached_rows() for t in tr.model.tables if isinstance(t, CachedTTEmbeddingBag)]
    modes = []
    hook = tr.model.top.register_forward_hook(lambda mod, i, o: modes.append(mod.training))
    first = tr.evaluate(data.eval_set, 64)
    hook.remove()
    assert modes and not any(modes) and tr.model.training  # eval mode inside, train mode restored
    after = tr.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(a, t.cached_rows()) for a, t in
               zip(cached, [t for t in tr.model.tables if isinstance(t, CachedTTEmbeddingBag)]))
    assert tr.evaluate(data.eval_set, 300) == first  # chunking does not matter, nothing was updated


def test_synthetic_held_out_set_is_not_in_the_training_stream():
    """The held-out samples are drawn before the training batches: no training sample equals one
    (dense features are continuous, so equal rows would mean a re-served sample)."""
    rows = table_sizes("kaggle", TINY)
    data = SyntheticClicks(rows, 64, 512, seed=2, calibration_samples=1024)
    held = {tuple(x) for x in data.eval_set.dense.tolist()}
    train = [tuple(x) for _ in range(20) for x in data.next_batch().dense.tolist()]
    assert len(held) == 512 and not held & set(train)


def test_criteo_held_out_samples_are_not_trained_on(tmp_path):
    path = _criteo_file(tmp_path / "day_0", 200, seed=4)
    lines = path.read_text().splitlines()
    data = CriteoClicks(path, table_sizes("kaggle", TINY), batch_size=50, eval_samples=60)
    labels = torch.cat([data.next_batch().labels for _ in range(6)])  # 300 samples: 140, then 140, then 20
    expected = [float(line.split("\t")[0]) for line in lines[60:] + lines[60:] + lines[60:80]]
    assert labels.tolist() == expected
    assert data.eval_set.labels.tolist() == [float(line.split("\t")[0]) for line in lines[:60]]


def test_a_fixed_seed_gives_bit_identical_rows_and_another_seed_differs():
    metrics = ("accuracy", "bce", "auc", "train_loss", "hit_ratio")
    over = ("dlrm.tt_tables=2", "tt.rank=4", "cache.enabled=true", "cache.fraction=0.1", "cache.warmup_iters=2")
    a = [_row(train_rows(_cfg(*over)), m)["median"] for m in metrics]
    b = [_row(train_rows(_cfg(*over)), m)["median"] for m in metrics]
    c = [_row(train_rows(_cfg(*over, "seed=1")), m)["median"] for m in metrics]
    assert a == b and all(x != y for x, y in zip(a[:4], c[:4]))


# ---- the recorded hit ratio ----

def test_hit_ratio_row_counts_the_training_lookups_after_warm_up_only():
    """Recomputed here from the training batches and the caches' rows; the held-out lookups of the
    evaluation used to be counted too (here 256 of the 384 counted lookups per table)."""
    cfg = _cfg("dlrm.tt_tables=2", "tt.rank=4", "cache.enabled=true", "cache.fraction=0.1", "cache.warmup_iters=2")
    recorded = _row(train_rows(cfg), "hit_ratio")["median"]
    data, tr = build_data(cfg), Trainer(build_model(cfg), learning_rate(cfg))
    batches = [data.next_batch() for _ in range(cfg.dlrm.iterations)]
    for b in batches:
        tr.step(b)
    ratios = []
    for j, t in enumerate(tr.model.tables):
        if isinstance(t, CachedTTEmbeddingBag):
            ids = torch.cat([b.sparse[:, j] for b in batches[cfg.cache.warmup_iters:]])  # from the filling call on
            ratios.append(float(torch.isin(ids, t.cached_rows()).double().mean()))
    assert len(ratios) == 2 and recorded == pytest.approx(sum(ratios) / 2, abs=1e-12)


# ---- the model ----

@pytest.mark.parametrize("dataset,bottom,top", [("kaggle", [512, 256, 64, 16], [512, 256, 1]),
                                                ("terabyte", [512, 256, 64], [512, 512, 256, 1])])
def test_mlps_are_the_mlperf_reference_scripts(dataset, bottom, top):
    m = build_dlrm(dataset, table_sizes(dataset, 10**6), 0)
    lin = lambda seq: [x for x in seq if isinstance(x, torch.nn.Linear)]  # noqa: E731
    assert [x.out_features for x in lin(m.bottom)] == bottom and lin(m.bottom)[0].in_features == 13
    dim = ARCHS[dataset].embedding_dim
    assert lin(m.top)[0].in_features == dim + 27 * 26 // 2 and [x.out_features for x in lin(m.top)] == top
    assert all(t.embedding_dim == dim for t in m.tables)
    assert isinstance(m.top[-1], torch.nn.Linear)  # the logit: no ReLU after the last layer


# ---- synthetic clicks ----

def test_synthetic_clicks_have_the_documented_statistics():
    rows = table_sizes("kaggle", 1000)
    data = SyntheticClicks(rows, 512, 1024, seed=0, calibration_samples=8192)
    batches = [data.next_batch() for _ in range(40)]
    sparse = torch.cat([b.sparse for b in batches])
    dense = torch.cat([b.dense for b in batches]).double()
    labels = torch.cat([b.labels for b in batches])
    assert sparse.shape == (20480, 26) and sparse.dtype == torch.int64  # one lookup per table (pooling 1)
    assert ((sparse >= 0) & (sparse < torch.tensor(rows))).all()
    assert set(labels.unique().tolist()) == {0.0, 1.0}
    assert float(labels.mean()) == pytest.approx(0.25, abs=0.015)  # ctr, 6 binomial SE
    # dense: log(1 + x), x ~ Exp(mean m), m log-spaced 1..1000: E = int log(1 + x) e^(-x/m) / m dx
    for i, m in enumerate(np.logspace(0, 3, 13)):
        expected = integrate.quad(lambda x, m=m: math.log1p(x) * math.exp(-x / m) / m, 0, math.inf)[0]
        se = float(dense[:, i].std()) / math.sqrt(dense.shape[0])
        assert abs(float(dense[:, i].mean()) - expected) < 6 * se, i
    # Zipf over the largest table: its most frequent id far above the uniform count, ids scattered
    big = int(np.argmax(rows))
    counts = torch.bincount(sparse[:, big], minlength=rows[big])
    assert counts.max() > 50 * sparse.shape[0] / rows[big] and int(counts.argmax()) != 0


# ---- figures ----

def test_table1_figure_shows_its_error_bars_within_the_axes(monkeypatch, tmp_path):
    import reports.training_figures as tf

    figs = []
    monkeypatch.setattr(tf, "save", lambda fig, out_dir, name: figs.append(fig) or tmp_path / f"{name}.png")
    inits = list(tf.TABLE1_PAPER)
    df = pd.DataFrame([{"metric": "accuracy", "model": "main", "median": 72.0 + 0.1 * i, "dense_init": init,
                        "eval_samples": 512, "dataset": "kaggle", "source": "synthetic", "scale_down": 10000,
                        "batch_size": 32, "iterations": 6} for i, init in enumerate(inits)])
    tf.plot_table1(df, tmp_path)
    ax = figs[0].axes[0]
    se = 100 * math.sqrt(0.7225 * 0.2775 / 512)  # binomial std error at the median accuracy, 512 samples
    lo, hi = ax.get_ylim()
    assert lo <= 72.0 - se and hi >= 72.5 + se
    assert ax.get_ylabel() == "held-out accuracy (%) ± std error"


def test_figure6_marks_a_diverged_model_instead_of_leaving_it_out(monkeypatch, tmp_path):
    """A diverged model's accuracy is NaN: its line point and bar would silently be missing."""
    import reports.training_figures as tf

    figs = []
    monkeypatch.setattr(tf, "save", lambda fig, out_dir, name: figs.append(fig) or tmp_path / f"{name}.png")
    common = {"metric": "accuracy", "model": "main", "eval_samples": 512, "dataset": "kaggle", "source": "synthetic",
              "scale_down": 1000, "batch_size": 32, "iterations": 6}
    rows = [{**common, "tt_tables": 0, "tt_rank": np.nan, "tt_init": np.nan, "median": 77.0}]
    for init, acc in (("uniform", 76.5), ("sampled_gaussian", math.nan)):
        rows.append({**common, "tt_tables": 7, "tt_rank": 32, "tt_init": init, "median": acc})
    tf.plot_fig6(pd.DataFrame(rows), tmp_path)
    ax, bx = figs[0].axes[:2]
    assert [t.get_text() for t in ax.texts] == ["diverged: R=32, sampled Gaussian (Alg. 3)"]
    assert [t.get_text() for t in bx.texts] == ["diverged (NaN)"]


# ---- bad inputs ----

@pytest.mark.parametrize("make,message", [
    (lambda m: Trainer(m, 0.0), r"lr: got 0.0; must be a finite number > 0"),
    (lambda m: Trainer(m, -0.1), r"lr: got -0.1; must be a finite number > 0"),
    (lambda m: Trainer(m, math.nan), r"lr: got nan; must be a finite number > 0"),
    (lambda m: Trainer(m, 0.01), r"lr: got 0.01; the model's fused TT tables step with learning_rate \[0.1\]"),
    (lambda m: Trainer(m, 0.1).evaluate(None, 0), r"eval_batch_size: got 0; must be an int >= 1"),
])
def test_bad_trainer_values_fail_clearly(make, message):
    model = build_dlrm("kaggle", table_sizes("kaggle", TINY), 2, tt_rank=4, learning_rate=0.1)
    with pytest.raises(ValueError, match=message):
        make(model)


def test_bad_model_and_data_values_fail_clearly(tmp_path):
    rows = table_sizes("kaggle", TINY)
    with pytest.raises(ValueError, match=r"tables: got embedding dims \[8\]; .* embedding_dim=16"):
        DLRM(ARCHS["kaggle"], build_tables(rows, 8))
    with pytest.raises(ValueError, match=r"table_rows: got 0 rows for table 3; each must be an int >= 1"):
        build_dlrm("kaggle", rows[:3] + [0] + rows[4:])
    with pytest.raises(ValueError, match=r"dataset: got 'avazu'; allowed: \['kaggle', 'terabyte'\]"):
        table_sizes("avazu")
    m = build_dlrm("kaggle", rows, 0)
    sparse = torch.zeros(4, 26, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"dense: got shape \(4, 12\); expected \(4, 13\)"):
        m(torch.zeros(4, 12), sparse)
    with pytest.raises(ValueError, match=r"dense: got shape \(5, 13\); expected \(4, 13\)"):
        m(torch.zeros(5, 13), sparse)
    with pytest.raises(ValueError, match="table_rows: got no tables"):
        SyntheticClicks([], 8, 16)
    with pytest.raises(ValueError, match="dense_std: got inf; must be finite and >= 0"):
        SyntheticClicks(rows, 8, 16, dense_std=math.inf)
    with pytest.raises(ValueError, match="seed: got -1; must be an int >= 0"):
        SyntheticClicks(rows, 8, 16, seed=-1)
    path = _criteo_file(tmp_path / "day_0", 50)
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match=f"eval_samples: got {bad}; must be an int >= 1"):
            CriteoClicks(path, rows, batch_size=8, eval_samples=bad)


def test_figure6_claims_name_a_diverged_model():
    from reports.training_claims import fig6_claims

    base = {"metric": "accuracy", "model": "main", "eval_samples": 65536, "dataset": "kaggle", "source": "synthetic",
            "scale_down": 1000, "batch_size": 128, "iterations": 600}
    points = [(0, None, None, 77.6), (5, 32, "sampled_gaussian", math.nan), (5, 32, "calibrated", 77.1)]
    df = pd.DataFrame([{**base, "tt_tables": k, "tt_rank": r, "tt_init": i, "median": v} for k, r, i, v in points])
    table = pd.DataFrame(fig6_claims(df))
    best = table[table["claim"].str.contains("sampled Gaussian init gives the best")].iloc[0]
    assert "sampled Gaussian (Alg. 3): NaN (diverged)" in best["measured"] and best["agrees"] == "no"
    neutral = table[table["claim"].str.contains("within 0.03%")].iloc[0]
    assert neutral["measured"] == "NaN (diverged) vs uncompressed 77.600%" and neutral["agrees"] == "no"


def test_table1_claims_rank_a_diverged_init_below_every_trained_one():
    from reports.training_claims import table1_claims
    from reports.training_figures import DENSE_INIT_LABELS, TABLE1_PAPER

    base = {"metric": "accuracy", "model": "main", "eval_samples": 65536, "dataset": "kaggle", "source": "synthetic",
            "scale_down": 1000, "batch_size": 128, "iterations": 600}
    acc = {"uniform": 77.6, "gauss_1": math.nan, "gauss_1_2": 77.0, "gauss_1_8": 77.2}
    df = pd.DataFrame([{**base, "dense_init": i, "median": v} for i, v in acc.items()])
    table = pd.DataFrame(table1_claims(df))
    below = table[table["claim"].str.startswith(f"Table 1: tables {DENSE_INIT_LABELS['gauss_1']} score below")].iloc[0]
    assert below["measured"] == "NaN (diverged)" and below["agrees"] == "yes"
    order = table[table["claim"].str.contains("ordering")].iloc[0]["measured"]
    assert order.startswith(" > ".join(DENSE_INIT_LABELS[i] for i in ("uniform", "gauss_1_8", "gauss_1_2", "gauss_1")))
    assert TABLE1_PAPER["gauss_1"] == min(TABLE1_PAPER.values())  # the paper's worst: rho 1 here
    assert "Spearman rho 1.00" in order
