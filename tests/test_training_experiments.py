"""The end-to-end training experiments: configs, the train_dlrm rows, presets run through the app,
figures and claims from their tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf.errors import ValidationError
from hydra.errors import ConfigCompositionException

from benches.config import register, to_objects
from benches.paper import EXPERIMENTS, TRAINING_EXPERIMENTS
from benches.results import AGGREGATE_FILE
from benches.training import batch_size, train_rows
from reports.claims import claims
from reports.report import draw

from .apprun import run_app

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
SCALES = ("smoke", "default", "paper")
MEASUREMENT = ["metric", "unit", "median", "q1", "q3", "iqr", "n", "note"]

register()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="bench", overrides=list(overrides))


def _tiny(*overrides: str):
    return to_objects(_compose("task=train_dlrm", "dlrm.scale_down=20000", "dlrm.batch_size=32", "dlrm.iterations=4",
                               "dlrm.timing_warmup=1", "dlrm.eval_samples=256", *overrides))


def test_every_training_preset_composes_at_every_scale_and_is_run_by_experiment_training():
    presets = {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")}
    assert set(TRAINING_EXPERIMENTS) <= presets and not set(TRAINING_EXPERIMENTS) & set(EXPERIMENTS)
    assert presets - {"default", "paper", "training"} == set(EXPERIMENTS) | set(TRAINING_EXPERIMENTS)
    for name in TRAINING_EXPERIMENTS:
        for scale in SCALES:
            cfg = to_objects(_compose(f"experiment={name}", f"scale={scale}"))
            assert cfg.task.value == "train_dlrm" and cfg.dlrm.dataset.value == "kaggle"
    paper = to_objects(_compose("experiment=fig7", "scale=paper"))
    assert paper.dlrm.scale_down == 1 and batch_size(paper) == 128  # full tables, MLPerf's Kaggle mini-batch
    assert batch_size(to_objects(_compose("experiment=fig7", "scale=paper", "dlrm.dataset=terabyte"))) == 2048


@pytest.mark.parametrize("override,message", [
    ("dlrm.tt_tables=27", r"dlrm.tt_tables: got 27; must be in \[0, 26\]"),
    ("dlrm.timing_warmup=4", r"dlrm.timing_warmup: got 4; must be in \[0, dlrm.iterations=4\)"),
    ("dlrm.lr=0", "dlrm.lr: got 0.0; must be a finite number > 0"),
    ("dlrm.source=criteo", "dlrm.criteo_path: got None"),
    ("dlrm.compare_to=tt", "dlrm.compare_to: got 'tt' with dlrm.tt_tables=0"),
    ("dlrm.scale_down=0", "dlrm.scale_down: got 0; must be >= 1"),
])
def test_bad_training_config_values_fail_with_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ValueError, match=message):
        _tiny(override)


def test_unknown_dense_init_is_rejected_at_composition():
    with pytest.raises((ConfigCompositionException, ValidationError), match="dlrm.dense_init=xavier"):
        _tiny("dlrm.dense_init=xavier")


def test_train_rows_are_tidy_and_pair_the_reference_model():
    cfg = _tiny("dlrm.tt_tables=3", "tt.rank=4", "dlrm.compare_to=uncompressed")
    df = pd.DataFrame(train_rows(cfg, "fig7"))
    assert set(MEASUREMENT) <= set(df.columns) and {"git_sha", "cpu_model", "threads"} <= set(df.columns)
    assert (df["eval_batch_size"] == cfg.dlrm.eval_batch_size).all() and df["criteo_path"].isna().all()
    main, ref = df[df["model"] == "main"], df[df["model"] == "uncompressed"]
    assert {"time_per_iteration", "embedding_time", "other_time", "accuracy", "bce", "auc", "train_time",
            "time_vs_reference", "accuracy_vs_reference"} <= set(main["metric"])
    assert (main["tt_tables"] == 3).all() and (ref["tt_tables"] == 0).all() and ref["tt_rank"].isna().all()
    assert set(df[df["model"] == "planted"]["metric"]) >= {"bayes_accuracy", "bayes_auc", "bayes_bce"}
    t = main.set_index("metric")["median"]
    assert 0 < t["embedding_time"] < t["time_per_iteration"]
    assert t["other_time"] > 0  # medians of the parts need not add up to the median of the whole: no timing check
    assert (df.set_index("metric").loc["time_per_iteration", "n"] == 3).all()  # 4 iterations - 1 warm-up
    assert main["model_bytes"].iloc[0] < ref["model_bytes"].iloc[0] or main["largest_table_rows"].iloc[0] < 100


def test_cached_model_reports_its_hit_ratio_and_zero_tt_tables_are_trained_once():
    cfg = _tiny("dlrm.tt_tables=2", "tt.rank=4", "cache.enabled=true", "cache.fraction=0.1", "cache.warmup_iters=2",
                "dlrm.compare_to=tt")
    df = pd.DataFrame(train_rows(cfg, "fig10_training"))
    hit = df[(df["metric"] == "hit_ratio") & (df["model"] == "main")]["median"]
    assert len(hit) == 1 and 0 <= hit.iloc[0] <= 1
    assert df[df["model"] == "main"]["cache_enabled"].all() and not df[df["model"] == "tt"]["cache_enabled"].any()
    assert (df[df["model"] == "main"]["cache_refresh_every"] == cfg.cache.refresh_every).all()
    assert df[df["model"] == "tt"]["cache_refresh_every"].isna().all()
    a = train_rows(_tiny("tt.rank=4", "dlrm.eval_samples=300"), "fig6")
    b = train_rows(_tiny("tt.rank=8", "tt.init=uniform", "dlrm.eval_samples=300"), "fig6")
    assert [r["median"] for r in a] == [r["median"] for r in b]
    assert all("reused" in (r["note"] or "") for r in b)
    c = train_rows(_tiny("tt.rank=16", "dlrm.eval_samples=300"), "table1")  # another preset, same process
    assert [r["median"] for r in c] == [r["median"] for r in a] and {r["experiment"] for r in c} == {"table1"}


@pytest.fixture(scope="module")
def training_smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    done = run_app("experiment=training", "scale=smoke", f"results_root={root}", f"figures_dir={root / 'figs'}",
                   timeout=900, env={"OMP_WAIT_POLICY": "PASSIVE"})
    return root / "smoke", done


@pytest.mark.slow
def test_experiment_training_runs_every_preset_and_writes_figures_and_report(training_smoke):
    root, done = training_smoke
    assert done.returncode == 0, done.stderr[-5000:]
    for name in TRAINING_EXPERIMENTS:
        df = pd.read_csv(root / name / AGGREGATE_FILE)
        assert not df.empty and (df["scale"] == "smoke").all() and (df["experiment"] == name).all(), name
    timings = pd.read_csv(root / "timings.csv")
    assert list(timings["experiment"]) == list(TRAINING_EXPERIMENTS) and (timings["status"] == "ok").all()
    report = (root / "report" / "REPORT.md").read_text()
    for name in TRAINING_EXPERIMENTS:
        assert f"![{name}]" in report, f"{name} has no figure in the report"
    assert "Figure not drawn" not in report
    for png in (root / "report" / "figures").glob("*.png"):
        assert png.stat().st_size > 10_000
    assert "[training 4/4] fig10_training: ok" in done.stdout + done.stderr
    assert "[train 6/6]" in done.stdout + done.stderr  # progress lines of the training loop


@pytest.mark.slow
def test_figures_and_claims_come_from_the_tables(training_smoke, tmp_path):
    root, done = training_smoke
    assert done.returncode == 0, done.stderr[-5000:]
    results = {name: pd.read_csv(root / name / AGGREGATE_FILE) for name in TRAINING_EXPERIMENTS}
    for name, df in results.items():
        pngs = draw(name, df, tmp_path)
        assert pngs and all(p.exists() and p.with_suffix(".pdf").exists() for p in pngs)
    table = claims(results)
    assert set(table["experiment"]) == set(TRAINING_EXPERIMENTS)
    t1 = table[table["experiment"] == "table1"]
    assert t1["paper"].astype(str).str.contains("79.263").any()
    with pytest.raises(ValueError, match="accuracy"):
        draw("table1", results["table1"][results["table1"]["metric"] != "accuracy"], tmp_path)


def _criteo_file(path: Path, n: int, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        ints = [str(rng.randint(0, 50)) if rng.random() > 0.1 else "" for _ in range(13)]
        cats = [f"{rng.randint(0, 40 + 10 * j):08x}" for j in range(26)]
        lines.append("\t".join([str(int(rng.random() < 0.3)), *ints, *cats]) + "\n")
    path.write_text("".join(lines))
    return path


def test_criteo_files_hold_out_their_first_samples_and_train(tmp_path):
    from ttrec.dlrm import table_sizes
    from ttrec.synthetic_clicks import CriteoClicks

    path = _criteo_file(tmp_path / "day_0", 300)
    data = CriteoClicks(path, table_sizes("kaggle", 20000), batch_size=32, eval_samples=100)
    assert len(data.eval_set) == 100 and data.bayes_metrics() is None
    first = data.next_batch()  # training starts right after the held-out samples
    line = path.read_text().splitlines()[100].split("\t")
    assert first.labels[0].item() == float(line[0])
    cfg = _tiny("dlrm.source=criteo", f"dlrm.criteo_path={path}", "dlrm.eval_samples=100", "dlrm.tt_tables=2",
                "tt.rank=4")
    df = pd.DataFrame(train_rows(cfg, "table1"))
    assert (df["source"] == "criteo").all() and "planted" not in set(df["model"])
    # the file and its mapping are part of the point (hash and dictionary give different ids)
    assert (df["criteo_path"] == str(path)).all() and (df["criteo_mapping"] == "hash").all()
    assert df["criteo_eval_path"].isna().all() and df["zipf_alpha"].isna().all()
    acc = df[(df["metric"] == "accuracy") & (df["model"] == "main")]["median"].iloc[0]
    assert 0 <= acc <= 100


def test_a_criteo_file_held_out_whole_is_a_clear_error_not_a_hang(tmp_path):
    from ttrec.dlrm import table_sizes
    from ttrec.synthetic_clicks import CriteoClicks

    path = _criteo_file(tmp_path / "day_0", 50)
    data = CriteoClicks(path, table_sizes("kaggle", 20000), batch_size=32, eval_samples=100)
    with pytest.raises(ValueError, match="has 50 samples and eval_samples=50 holds them all out"):
        data.next_batch()


def test_train_dlrm_checks_device_before_any_work(monkeypatch):
    """device is checked with the config, before any data or model is built: on this machine (no
    CUDA) the library's error; with CUDA, training (its timing) is CPU-only, so a clear refusal
    rather than a CPU run labelled cuda."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device: got 'cuda', but CUDA is not available \(torch.cuda.is_available\(\) is False\); allowed: cpu"):
        _tiny("device=cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=r"device: got 'cuda'; task=train_dlrm trains on the CPU only"):
        _tiny("device=cuda")
    with pytest.raises(ValueError, match=r"device: got 'gpu'; allowed: cpu, cuda, cuda:N"):
        _tiny("device=gpu")


def test_topk_stability_checks_device():
    with pytest.raises(ValueError, match=r"device: got 'cuda', but CUDA is not available \(torch.cuda.is_available\(\) is False\); allowed: cpu"):
        to_objects(_compose("task=topk_stability", "table=tiny", "device=cuda", "workload.batch_size=64",
                            "cache.stability_batches=4", "cache.stability_windows=2"))


def test_a_busy_machine_puts_its_note_on_the_training_time_rows(monkeypatch):
    """Training records its threads' wait for a CPU over its iterations in cpu_wait; when it reaches the note's
    bar, the time rows (not accuracy, loss or AUC) lead their note with it."""
    import benches.training as training

    class Busy:
        threads, torch_threads, waited_s = 0.8, 1, 0.8
        note = training.CpuWait.note

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(training, "CpuWait", Busy)
    rows = train_rows(_tiny("dlrm.compare_to=uncompressed"))
    assert {r["cpu_wait"] for r in rows} == {0.8}
    by = {(r["model"], r["metric"]): r["note"] for r in rows}
    assert by[("main", "time_per_iteration")].startswith("busy machine: this process's threads waited for a CPU 0.80")
    assert by[("main", "time_per_iteration")].endswith("; whole training step (perf_counter), batch drawn outside")
    assert by[("main", "time_vs_reference")].startswith("busy machine")
    assert not any(str(by[("main", m)]).startswith("busy machine") for m in ("accuracy", "bce", "auc", "train_loss"))
