"""Review of the bench app (second pass): sweeps into a directory of an earlier sweep, settings a
timed point would not act on, learning rates."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from benches.app import build_point
from benches.cache_experiments import comparison_configs
from benches.config import register, to_objects
from benches.results import AGGREGATE_FILE, RESULTS_FILE

from .apprun import run_app

CONF = str(Path(__file__).resolve().parents[1] / "conf")
QUICK = ["table=tiny", "workload.batch_size=16", "timing=quick", "timing.target_time_s=0.01", "timing.min_repeats=2",
         "timing.max_repeats=2", "timing.warmup=1"]

register()


def _objects(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return to_objects(compose(config_name="bench", overrides=list(overrides)))


@pytest.mark.slow
def test_a_sweep_does_not_aggregate_another_points_results_left_in_a_twin_jobs_directory(tmp_path):
    """nn.EmbeddingBag at a second TT rank is not measured again (its twin at the first rank is), but
    its job directory held an earlier sweep's impl=tt results: they are not this sweep's point, so
    they must be refused (as any other job's would be), not aggregated as this sweep's: the table at the
    root stays the first sweep's, whole (a refused run does not replace it with a part)."""
    sweep, figs = tmp_path / "sweep", tmp_path / "figs"
    first = run_app("-m", "impl=dense,tt", "tt.rank=4", *QUICK, f"hydra.sweep.dir={sweep}", f"figures_dir={figs}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert pd.read_csv(sweep / "1" / RESULTS_FILE)["impl"].eq("tt").all()  # job 1: impl=tt, rank 4
    table = (sweep / AGGREGATE_FILE).read_text()
    second = run_app("-m", "impl=dense", "tt.rank=4,8", *QUICK, f"hydra.sweep.dir={sweep}", f"figures_dir={figs}")
    assert (sweep / AGGREGATE_FILE).read_text() == table  # not this sweep's table with job 1's tt rows in it
    assert "kept as it was: this run was refused 1 of its job directories (1)" in second.stdout
    assert second.returncode == 1 and "job 1: PointRefused" in second.stdout, second.stdout[-3000:]
    assert pd.read_csv(sweep / "1" / RESULTS_FILE)["impl"].eq("tt").all()  # the earlier results are kept


def test_a_timed_point_without_a_cache_refuses_a_reuse_fraction_it_would_not_act_on():
    """The timed batch is batch 0 of the stream, which reuses nothing: the same batch for any
    reuse_fraction, so a point recorded with reuse_fraction=0.5 would be the reuse 0 point."""
    base = ["tt.rank=4", *QUICK]
    batches = [build_point(_objects(*base, f"workload.reuse_fraction={r}", "cache=lfu"))[1].indices for r in (0, 1)]
    assert torch.equal(*batches)  # what the check rests on (with the cache only its warm-up batches differ)
    with pytest.raises(ValueError, match=r"workload\.reuse_fraction: got 0\.5 with cache\.enabled=false"):
        _objects(*base, "workload.reuse_fraction=0.5")
    _objects(*base, "workload.reuse_fraction=0.0")
    cached = _objects(*base, "cache=lfu", "cache.compare=true", "workload.reuse_fraction=0.5")  # the warm-up reuses
    assert [c.cache.enabled for c in comparison_configs(cached)] == [False, False]  # its comparison points keep it
    assert _objects("experiment=fig9", "scale=smoke", "workload.reuse_fraction=0.5").workload.reuse_fraction == 0.5


@pytest.mark.parametrize("override", ["mode.lr=inf", "dlrm.lr=inf"])
def test_learning_rates_must_be_finite(override):
    """lr=inf was accepted: torch.optim's first step writes inf/NaN into the parameters it times."""
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"{key}: got inf; must be a finite number > 0"):
        _objects("mode=train", override)


@pytest.mark.slow
def test_a_sweep_whose_jobs_all_fail_leaves_the_earlier_table_and_figure_alone(tmp_path):
    """The same sweep again with a bad setting: every job fails, and the callback
    aggregated the job directories' earlier results.csv anyway, rewriting results_all.csv and the
    figure from the run before as if this sweep had measured them. A failed job's directory is not
    aggregated; with none left nothing is written, and the sweep exits 1 listing the failures."""
    sweep, figs = tmp_path / "sweep", tmp_path / "figs"
    first = run_app("-m", "impl=dense", "tt.rank=4", *QUICK, f"hydra.sweep.dir={sweep}", f"figures_dir={figs}")
    assert first.returncode == 0, first.stderr[-3000:]
    table, written = (sweep / AGGREGATE_FILE).read_bytes(), (sweep / AGGREGATE_FILE).stat().st_mtime_ns
    # (scale= without an experiment: refused by each job; a quoted value the check before Hydra cannot read
    # back as plain text leaves the command line to the jobs, as for a launcher's jobs)
    second = run_app("-m", "impl=dense", "tt.rank=4", *QUICK, "scale=smoke", "table.name='small table'",
                     f"hydra.sweep.dir={sweep}", f"figures_dir={figs}")
    assert second.returncode == 1 and "job 0: ValueError: scale: got 'smoke' without an experiment" in second.stdout, \
        second.stdout[-3000:]
    assert f"{AGGREGATE_FILE} not written" in second.stdout
    assert (sweep / AGGREGATE_FILE).read_bytes() == table
    assert (sweep / AGGREGATE_FILE).stat().st_mtime_ns == written  # not even rewritten with the same rows
