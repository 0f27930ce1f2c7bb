"""The cache experiments in the bench app: configs, cached points, top-k stability, break-even, and
tiny end-to-end runs of the Figure 9/10/12 presets (their figures included)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from benches.app import measure_point
from benches.cache_experiments import break_even, stability_rows
from benches.config import register, to_objects
from benches.results import AGGREGATE_FILE

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
QUICK = ["timing=quick", "timing.target_time_s=0.01", "timing.min_repeats=2", "timing.max_repeats=2", "timing.warmup=1"]
TINY = ["table=tiny", "tt.rank=4", "workload.batch_size=16", "workload.pooling_factor=3", *QUICK]

register()


def _compose(*overrides: str, hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="bench", overrides=list(overrides), return_hydra_config=hydra_cfg)


def test_cache_group_composes_and_is_off_by_default():
    assert to_objects(_compose()).cache.enabled is False
    cfg = to_objects(_compose("cache=lfu"))
    assert cfg.cache.enabled and cfg.cache.fraction == 0.001 and cfg.cache.warmup_iters == 10
    assert sorted(p.stem for p in (ROOT / "conf" / "cache").glob("*.yaml")) == ["lfu", "none"]


@pytest.mark.parametrize("name,params", [
    ("fig12", {"workload.hit_rate", "tt.rank", "workload.pooling_factor"}),
    ("fig10", {"cache.fraction", "cache.warmup_iters"}),
    ("fig9", {"workload.zipf_alpha"}),
])
def test_experiment_presets_set_their_sweeps(name, params):
    cfg = _compose(f"experiment={name}", hydra_cfg=True)
    assert cfg.hydra.mode.name == "MULTIRUN" and set(cfg.hydra.sweeper.params) == params
    obj = to_objects(_compose(f"experiment={name}"))
    assert obj.task.value == ("topk_stability" if name == "fig9" else "time")
    assert obj.cache.enabled == (name != "fig9")


@pytest.mark.parametrize("override,needle", [
    ("cache.fraction=0", "cache.fraction: got 0"),
    ("cache.warmup_iters=-1", "cache.warmup_iters: got -1"),
    ("cache.stability_windows=500", "cache.stability_windows: got 500"),
    ("workload.hit_rate=2", "workload.hit_rate: got 2"),
    ("workload.pooling_sigma=1", "workload.pooling_sigma: got 1"),
    ("workload.distribution=criteo", "workload.criteo_path: got None"),
    ("cache.counter=sketch", "sketch"),
])
def test_bad_cache_and_workload_values_fail_naming_the_key(override, needle):
    with pytest.raises(Exception) as exc:
        to_objects(_compose(override))
    assert needle in str(exc.value) + str(exc.value.__cause__ or "")


def test_cache_needs_impl_tt():
    with pytest.raises(ValueError, match="cache.enabled: true needs impl=tt"):
        measure_point(to_objects(_compose("cache=lfu", "impl=dense", *TINY)))


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_cached_point_rows_with_comparisons(mode):
    cfg = to_objects(_compose(f"mode={mode}", "cache=lfu", "cache.compare=true", "cache.fraction=0.01",
                              "cache.warmup_iters=3", "workload.distribution=hot_set", "workload.hit_rate=1.0",
                              "workload.hot_fraction=0.01", *TINY))
    df = pd.DataFrame(measure_point(cfg, experiment="test"))
    per_lookup = df[df["metric"] == "time_per_lookup"]
    assert [(r.impl, r.cache_enabled) for r in per_lookup.itertuples()] == [("tt", True), ("tt", False),
                                                                          ("dense", False)]
    cached = per_lookup.iloc[0]
    # every lookup goes to the 10-row hot set, which the warm-up found: all served from the cache
    assert cached["hit_ratio"] == 1.0 and cached["held_out_hit_ratio"] == 1.0
    assert cached["cache_rows"] == 10 and cached["cache_bytes"] == 10 * 16 * 4 + 8 * (3 * 10 + 1000)
    assert cached["counter_bytes"] == 8 * 1000 and cached["cache_counter"] == "exact"
    assert cached["hit_rate"] == 1.0 and cached["hot_fraction"] == 0.01 and cached["measured_pooling_factor"] == 3
    assert pd.isna(per_lookup.iloc[1]["hit_ratio"]) and not per_lookup.iloc[2]["cache_enabled"]
    assert "gflops" not in set(df.loc[df["cache_enabled"] == True, "metric"])  # noqa: E712
    # the three were timed on one batch
    assert per_lookup["unique_row_ratio"].nunique() == 1


def test_criteo_file_as_the_workload(tmp_path):
    cats = [format(v, "08x") for v in range(26)]
    lines = ["\t".join(["1"] + ["3"] * 13 + [c if i % 3 else "" for c in cats]) for i in range(40)]
    path = tmp_path / "day_0"
    path.write_text("\n".join(lines) + "\n")
    cfg = to_objects(_compose("cache=lfu", "cache.warmup_iters=2", "cache.fraction=0.01",
                              "workload.distribution=criteo",
                              f"workload.criteo_path={path}", "workload.criteo_feature=5",
                              "workload.criteo_mapping=dictionary",
                              *(o for o in TINY if not o.startswith("workload.pooling_factor="))))  # criteo: not read
    rows = measure_point(cfg)
    r = rows[0]
    assert r["criteo_path"] == str(path) and r["criteo_feature"] == 5 and r["distribution"] == "criteo"
    assert r["hit_ratio"] == 1.0  # two distinct values, both cached after the warm-up


def test_stability_closed_form_on_a_fixed_hot_set():
    """hit_rate 1: every lookup is in a 10-row hot set; once all 10 are seen the top-10 never changes
    and a cache of the previous top-10 serves every lookup."""
    cfg = to_objects(_compose("task=topk_stability", "table=tiny", "workload.distribution=hot_set",
                              "workload.hit_rate=1.0", "workload.hot_fraction=0.01", "cache.fraction=0.01",
                              "workload.batch_size=64", "cache.stability_batches=12", "cache.stability_windows=4"))
    df = pd.DataFrame(stability_rows(cfg, experiment="test"))
    change = df[df["metric"] == "topk_change"]
    assert list(change["window"]) == [1, 2, 3] and (change["median"] == 0).all()
    assert (df.loc[df["metric"] == "topk_window_hit_ratio", "median"] == 1).all()
    assert (df.loc[df["metric"] == "topk_recall_bounded", "median"] == 1).all()
    assert set(df["window_end_batch"]) == {3, 6, 9, 12} and (df["topk_rows"] == 10).all()


def test_break_even_by_linear_interpolation():
    rows = []
    for job, x in enumerate([0.0, 0.5, 1.0]):
        # pooling 1: TT + cache 30, 20, 0 against 10 -> crosses at 0.5 + 0.5 * 10 / 20; pooling 10: never
        for pooling, t_cache in ((1, [30.0, 20.0, 0.0][job]), (10, [300.0, 200.0, 100.0][job])):
            common = {"job_dir": f"{job}-{pooling}", "metric": "time_per_lookup", "mode": "train",
                      "pooling_factor": pooling}
            rows.append({**common, "impl": "tt", "cache_enabled": True, "tt_rank": 8, "hit_ratio": x,
                         "median": t_cache})
            rows.append({**common, "impl": "dense", "cache_enabled": False, "tt_rank": None, "hit_ratio": None,
                         "median": 10.0})
    be = break_even(pd.DataFrame(rows)).set_index("pooling_factor")
    assert be.loc[1, "reached"] and be.loc[1, "break_even_hit_ratio"] == pytest.approx(0.75)
    assert not be.loc[10, "reached"] and pd.isna(be.loc[10, "break_even_hit_ratio"])
    assert be.loc[10, "time_ratio_at_max_hit"] == pytest.approx(10.0)


def test_break_even_is_where_tt_with_cache_stays_ahead():
    """A crossing that a higher hit ratio undoes is not the break-even: TT + cache 30, 5, 20, 0 against
    10 at hit ratios 0, 0.25, 0.5, 1 is faster at 0.25, slower at 0.5, and overtakes for good between
    0.5 and 1 (at 0.5 + 0.5 * 10 / 20); ending slower, it never breaks even."""
    rows = []
    for job, (x, t_cache) in enumerate(zip([0.0, 0.25, 0.5, 1.0], [30.0, 5.0, 20.0, 0.0])):
        for pooling, t in ((1, t_cache), (10, t_cache if x < 1 else 11.0)):
            common = {"job_dir": f"{job}-{pooling}", "metric": "time_per_lookup", "mode": "train",
                      "pooling_factor": pooling}
            rows.append({**common, "impl": "tt", "cache_enabled": True, "tt_rank": 8, "hit_ratio": x, "median": t})
            rows.append({**common, "impl": "dense", "cache_enabled": False, "tt_rank": None, "hit_ratio": None,
                         "median": 10.0})
    be = break_even(pd.DataFrame(rows)).set_index("pooling_factor")
    assert be.loc[1, "reached"] and be.loc[1, "break_even_hit_ratio"] == pytest.approx(0.75)
    assert not be.loc[10, "reached"] and pd.isna(be.loc[10, "break_even_hit_ratio"])


def _run_app(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "benches.app", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("experiment,overrides,figure,n_jobs", [
    ("fig12", ["workload.hit_rate=0,1", "tt.rank=2,4", "workload.pooling_factor=2", "workload.hot_fraction=0.01",
               "cache.fraction=0.01", "cache.warmup_iters=2", *TINY[:1], "workload.batch_size=16", *QUICK],
     "fig12_time_vs_hit_rate", 4),
    ("fig10", ["cache.fraction=0.01,0.1", "cache.warmup_iters=1,2", *TINY], "fig10_cache_size_warmup", 4),
    ("fig9", ["table=tiny", "workload.zipf_alpha=1.05,1.5", "workload.batch_size=64", "cache.fraction=0.01",
              "cache.stability_batches=6", "cache.stability_windows=3"], "fig9_topk_stability", 2),
])
def test_experiment_runs_tiny_end_to_end(tmp_path, experiment, overrides, figure, n_jobs):
    sweep, figs = tmp_path / "sweep", tmp_path / "figs"
    done = _run_app(f"experiment={experiment}", *overrides, f"hydra.sweep.dir={sweep}", f"figures_dir={figs}")
    assert done.returncode == 0, done.stderr[-3000:]
    df = pd.read_csv(sweep / AGGREGATE_FILE)
    assert df["job_dir"].nunique() == n_jobs and (df["experiment"] == experiment).all()
    assert (figs / f"{figure}.png").stat().st_size > 10_000 and (figs / f"{figure}.pdf").exists()
    assert not any(figs.glob("*time_vs_rank*"))  # the rank sweep of fig12 is not Figure 11
    if experiment == "fig12":
        be = pd.read_csv(figs / f"{figure}_break_even.csv")
        assert sorted(be["tt_rank"]) == [2, 4] and set(be.columns) >= {"break_even_hit_ratio", "reached"}
        measured = df.loc[df["cache_enabled"] == True, "hit_ratio"]  # noqa: E712
        assert measured.max() == 1.0 and measured.min() < 0.2
        assert set(df["impl"]) == {"tt", "dense"}
