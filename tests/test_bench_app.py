"""The Hydra harness: configs compose, bad configs fail clearly, the app runs end to end."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from benches.app import measure_point
from benches.config import BenchConfig, check_override_keys, register, to_objects
from benches.results import AGGREGATE_FILE, FAILED_FILE, collect

from .apprun import run_app

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
QUICK = ["timing=quick", "timing.target_time_s=0.01", "timing.min_repeats=2", "timing.max_repeats=2", "timing.warmup=1"]

register()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="bench", overrides=list(overrides))


@pytest.mark.parametrize("group,options", [
    ("impl", ["tt", "tt_reference", "tt_cpu", "t3nsor", "dense", "tltorch"]),
    ("table", ["small", "tiny", "kaggle_largest", "terabyte_largest", "scaled"]),
    ("workload", ["uniform", "zipf"]),
    ("timing", ["default", "quick", "scaled"]),
    ("mode", ["forward", "train"]),
])
def test_every_group_option_composes_to_the_schema(group, options):
    for option in options:
        cfg = to_objects(_compose(f"{group}={option}"))
        assert isinstance(cfg, BenchConfig)
    listed = sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
    assert listed == sorted(options), "a config file exists that this test does not compose"


def test_experiment_default_sets_a_sweep():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="bench", overrides=["experiment=default"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert set(cfg.hydra.sweeper.params) == {"impl", "tt.rank", "workload.pooling_factor"}
    assert cfg.workload.batch_size == 4096


def test_table_kaggle_largest_is_the_papers_table():
    cfg = to_objects(_compose("table=kaggle_largest"))
    assert (cfg.table.num_embeddings, cfg.table.embedding_dim) == (10131227, 16)


@pytest.mark.parametrize("override,needle", [
    ("impl.foo=1", "foo"),                       # unknown key
    ("+tt.rankk=3", "rankk"),                    # unknown key added
    ("tt.init=gaussian", "calibrated"),          # enum lists what is allowed
    ("impl.name=faiss", "t3nsor"),
    ("tt.rank=abc", "rank"),                     # wrong type
    ("table=huge", "huge"),                      # unknown group option
])
def test_bad_config_fails_at_composition_naming_key_and_value(override, needle):
    with pytest.raises((ConfigCompositionException, ValidationError, ValueError)) as exc:
        to_objects(_compose(override))
    text = str(exc.value) + str(exc.value.__cause__ or "")
    assert needle in text


@pytest.mark.parametrize("args,needle", [
    (["tt.rnak=16"], "'rnak' is not a key of 'tt' (TTConfig); allowed: d, init, p_shapes, q_shapes, rank; "
                     "did you mean 'tt.rank'?"),
    (["-m", "timing.thread=1,2"], "did you mean 'timing.threads'?"),
    (["seeed=3"], "'seeed' is not a key of the config (BenchConfig)"),
    (["scale.rowz=3"], "did you mean 'scale.rows'?"),
    (["tt.rank=8", "workload.nonsense=1"], "workload.nonsense=1: 'nonsense' is not a key of 'workload'"),
    (["scale=smokee"], "scale=smokee: 'smokee' is not an option of 'scale'; allowed: default, paper, smoke; "
                       "did you mean 'scale=smoke'?"),
    (["-m", "impl=tt,ttt"], "'ttt' is not an option of 'impl'; allowed: dense, t3nsor, tltorch, tt, tt_cpu, "
                            "tt_reference; did you mean 'impl=tt'?"),
    (["experiment=fig99"], "did you mean 'experiment=fig9'?"),
])
def test_misspelt_keys_name_the_allowed_ones(args, needle):
    assert needle in check_override_keys(args)


@pytest.mark.parametrize("args", [["tt.rank=8", "table=small", "hydra/launcher=cpu_pool", "hydra.run.dir=x"],
                                  ["+tt.rnak=1"], ["experiment=fig3", "scale=smoke", "tt.p_shapes=[10,10,10]"],
                                  ["-m", "tt.rank=8,16", "impl=tt,dense"], ["-m", "impl=glob(*)"],
                                  ["hydra.searchpath=[file:///elsewhere]", "table=my_own"]])
def test_known_keys_groups_and_additions_pass_the_key_check(args):
    assert check_override_keys(args) is None


def test_app_refuses_a_misspelt_key_before_hydra():
    r = run_app("tt.rnak=16", timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: tt.rnak=16: 'rnak' is not a key of 'tt'")
    assert "did you mean 'tt.rank'?" in r.stderr and "+tt.rnak" not in r.stderr


@pytest.mark.parametrize("override,needle", [
    ("tt.rank=0", "tt.rank"), ("tt.d=1", "tt.d"), ("timing.threads=0", "timing.threads"), ("mode.lr=-1", "mode.lr"),
    ("timing.target_time_s=-5", "timing.target_time_s"), ("tt.p_shapes=[10,100]", "tt.p_shapes"),
    ("workload.batch_size=0", "workload.batch_size"), ("timing.max_repeats=1", "timing.max_repeats"),
])
def test_out_of_range_values_fail_with_the_key(override, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        to_objects(_compose(override))


@pytest.mark.parametrize("impl", ["tt", "t3nsor", "dense", "tltorch"])
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_measure_point_rows(impl, mode):
    cfg = to_objects(_compose(f"impl={impl}", f"mode={mode}", "table=tiny", "tt.rank=4",
                              "workload.batch_size=16", "workload.pooling_factor=3", *QUICK))
    rows = measure_point(cfg, experiment="test")
    df = pd.DataFrame(rows)
    expected = {"time_per_batch", "time_per_lookup", "throughput"} | (
        {"gflops"} if impl in ("tt", "tltorch") and mode == "forward" else set())
    assert set(df["metric"]) == expected
    assert (df["median"] > 0).all() and (df["n"] == 2).all()
    r = rows[0]
    assert r["impl"] == impl and r["mode"] == mode and r["pooling_factor"] == 3 and r["threads"] == "2"
    assert r["num_embeddings"] == 1000 and r["experiment"] == "test"
    if impl == "dense":
        assert r["tt_rank"] is None and r["param_bytes"] == 1000 * 16 * 4
    else:
        assert r["tt_rank"] == 4 and r["tt_p_shapes"] == "10x10x10"
        assert r["param_bytes"] == 4 * (1 * 10 * 2 * 4 + 4 * 10 * 2 * 4 + 4 * 10 * 4 * 1)
    # time per lookup is time per batch spread over batch_size * pooling lookups
    per_batch = df.set_index("metric").loc["time_per_batch", "median"]
    per_lookup = df.set_index("metric").loc["time_per_lookup", "median"]
    assert per_lookup == pytest.approx(per_batch * 1e6 / 48, rel=1e-9)


@pytest.mark.parametrize("fused", [False, True])
def test_train_mode_changes_parameters(fused):
    cfg = to_objects(_compose("impl=tt", "mode=train", f"mode.fused={fused}", "table=tiny", "tt.rank=4", *QUICK))
    from benches.app import build_module, build_step
    from ttrec.workloads import Workload, generate_batch

    import ttrec

    module = build_module(cfg)
    before = [p.detach().clone() for p in module.tt_cores]
    batch = generate_batch(Workload(batch_size=8, pooling_factor=3), 1000)
    build_step(module, batch, cfg)()
    assert (module.optimizer is not None) == fused
    # one SGD step: cores - lr * gradient, the gradient by autograd through the reference backend for
    # the upstream gradient the step uses (randn seeded with cfg.seed)
    grad_out = torch.randn(batch.offsets.numel(), 16, generator=torch.Generator().manual_seed(cfg.seed))
    ref = [c.double().requires_grad_() for c in before]
    bags = ttrec.make_bags(batch.indices, batch.offsets, None, num_embeddings=1000, mode="sum")
    grads = torch.autograd.grad(ttrec.tt_embedding_bag(ref, module.spec, bags), ref, grad_out.double())
    for c, c0, g in zip(module.tt_cores, before, grads):
        torch.testing.assert_close(c.detach().double(), c0.double() - cfg.mode.lr * g, rtol=1e-5, atol=1e-7)
    assert any((c.detach() != c0).any() for c, c0 in zip(module.tt_cores, before))


def test_fused_mode_applies_to_tt_only_and_the_rows_say_what_ran():
    rows = {}
    for impl in ("tt", "dense"):
        cfg = to_objects(_compose(f"impl={impl}", "mode=train", "mode.fused=true", "table=tiny", *QUICK))
        rows[impl] = measure_point(cfg)
    assert all(r["fused"] is True for r in rows["tt"])
    assert all(r["fused"] is False and r["optimizer"] == "sgd" for r in rows["dense"])


def _run_app(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_app(*overrides, timeout=300)


@pytest.mark.slow
def test_app_sweep_end_to_end_in_a_subprocess(tmp_path):
    sweep = tmp_path / "sweep"
    figs = tmp_path / "figs"
    done = _run_app(tmp_path, "-m", "impl=tt,t3nsor,dense", "tt.rank=2,4", "workload.pooling_factor=1,5",
                    "table=tiny", "workload.batch_size=8", *QUICK,
                    f"hydra.sweep.dir={sweep}", f"figures_dir={figs}")
    assert done.returncode == 0, done.stderr[-3000:]
    df = pd.read_csv(sweep / AGGREGATE_FILE)
    # 12 jobs; nn.EmbeddingBag reads no tt.* setting, so its tt.rank=4 jobs find the tt.rank=2 ones
    # and are not measured again: 10 jobs x 3 metrics, + gflops for the 4 tt jobs
    assert len(df) == 10 * 3 + 4
    assert len(collect(sweep)) == len(df) and df['job_dir'].nunique() == 10
    assert done.stdout.count("not measured again: impl=dense reads no tt.* setting") == 2
    points = df[df["metric"] == "time_per_lookup"]
    assert sorted(points.groupby(["impl"]).size().items()) == [("dense", 2), ("t3nsor", 4), ("tt", 4)]
    assert set(points["pooling_factor"]) == {1, 5}
    assert set(points.loc[points["impl"] != "dense", "tt_rank"]) == {2, 4}
    for col in ("git_sha", "torch", "cpu_model", "threads", "median", "iqr", "unit"):
        assert col in df.columns
    assert (figs / "time_vs_rank.png").stat().st_size > 10_000
    assert (figs / "time_vs_rank.pdf").exists()
    assert not (figs / "fig11_time_vs_rank.png").exists()  # the fig11 preset's name: a sweep of one's own keeps off it


@pytest.mark.slow
def test_app_bad_override_exits_nonzero_with_message(tmp_path):
    """A value the config's checks refuse is a usage error (exit 2) before Hydra makes any directory
    (it was a failed job: exit 1 and a run directory holding failed.txt)."""
    done = _run_app(tmp_path, "tt.rank=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: ValueError: tt.rank: got 0; must be >= 1"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_failed_job_does_not_cost_the_sweep_the_other_jobs_results(tmp_path):
    sweep = tmp_path / "sweep"
    # (scale= without an experiment fails in the job: a quoted value the check before Hydra cannot read back as
    # plain text leaves the whole command line to the jobs, as for a launcher's jobs, which run the same check)
    done = _run_app(tmp_path, "-m", "scale=smoke,default", "tt.rank=2,4", "table=tiny", "table.name='tiny table'",
                    "workload.batch_size=8", *QUICK, f"hydra.sweep.dir={sweep}", f"figures_dir={tmp_path / 'figs'}")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    df = pd.read_csv(sweep / AGGREGATE_FILE)  # jobs 2 and 3 finished after jobs 0 and 1 failed
    assert sorted(df["job_dir"].astype(str).unique()) == ["2", "3"] and set(df["tt_rank"]) == {2, 4}
    assert "scale: got 'smoke' without an experiment" in (sweep / "0" / FAILED_FILE).read_text()
    assert "2 job(s) of the sweep failed" in done.stdout
    assert "job 1: ValueError: scale: got 'smoke' without an experiment" in done.stdout


@pytest.mark.slow
def test_scale_without_an_experiment_is_a_clear_error(tmp_path):
    """Refused before Hydra makes any directory (exit 2), as the job would refuse it."""
    done = _run_app(tmp_path, "scale=smoke", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 2
    assert "scale: got 'smoke' without an experiment" in done.stderr
    assert not (tmp_path / "run").exists()


def test_results_are_collected_in_job_order(tmp_path):
    for job in ("10", "2", "0", "1"):
        (tmp_path / job).mkdir()
        pd.DataFrame([{"job": int(job)}]).to_csv(tmp_path / job / "results.csv", index=False)
    assert list(collect(tmp_path)["job_dir"]) == ["0", "1", "2", "10"]


def test_runs_started_in_the_same_second_get_directories_of_their_own(monkeypatch):
    import datetime as dt

    import hydra.core.utils

    ticks = iter(range(1, 100))

    class SameSecond(dt.datetime):  # Hydra's ${now:...} clock: one second, the microseconds going on
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2026, 1, 31, 14, 5, 9, next(ticks))

    monkeypatch.setattr(hydra.core.utils, "datetime", SameSecond)
    dirs = []
    for _ in range(2):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose(config_name="bench", overrides=["results_root=/r"], return_hydra_config=True)
        dirs.append((cfg.hydra.run.dir, cfg.hydra.sweep.dir))
    (run_a, sweep_a), (run_b, sweep_b) = dirs
    assert run_a != run_b and sweep_a != sweep_b
    assert run_a.startswith("/r/runs/2026-01-31_14-05-09") and sweep_b.startswith("/r/sweeps/2026-01-31_14-05-09")


@pytest.mark.slow
def test_a_point_is_claimed_by_one_process_and_a_refused_run_leaves_no_failure_in_its_directory(tmp_path):
    import os
    import sys
    import time

    run = tmp_path / "run"
    args = ["table=tiny", "workload.batch_size=64", "timing.threads=1", "timing.warmup=1", "timing.min_repeats=2",
            "timing.max_repeats=100000000", f"hydra.run.dir={run}", f"figures_dir={tmp_path / 'figs'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # the first run measures this long, so the other two (each a fresh Python importing torch and
    # Hydra: seconds, more on a loaded machine) reach its point while it is still held; at 12 s a
    # run under load 7-12 started after it had finished
    hold = "timing.target_time_s=30"
    first = subprocess.Popen([sys.executable, "-m", "benches.app", *args, hold, "tt.rank=8"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "point.yaml").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # while the first run measures its point: the same point, and another point, in its directory
    same = subprocess.Popen([sys.executable, "-m", "benches.app", *args, hold, "tt.rank=8"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    other = subprocess.Popen([sys.executable, "-m", "benches.app", *args, hold, "tt.rank=16"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (_, same_err), (_, other_err) = same.communicate(timeout=300), other.communicate(timeout=300)
    first_out, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-3000:]
    assert same.returncode == 1 and "this point is claimed by process" in same_err, same_err[-3000:]
    assert "not measured twice at once" in same_err
    assert other.returncode == 1, other_err[-3000:]
    assert "for a different point (differs in: tt.rank: 8 -> 16); nothing was overwritten" in other_err
    df = pd.read_csv(run / "results.csv")  # the first run's result, whole
    assert set(df["tt_rank"]) == {8} and df.loc[df["metric"] == "time_per_lookup", "n"].item() > 2
    assert set(pd.read_csv(run / AGGREGATE_FILE)["tt_rank"]) == {8}
    assert not (run / FAILED_FILE).exists()  # the refused runs' errors are theirs, not this directory's job's
    refusals = sorted(run.glob("refused-*.txt"))
    assert len(refusals) == 2 and all(p.read_text().startswith("PointRefused: ") for p in refusals)
    # once the first run has ended: the same point is finished (skipped), another one still refused
    again = run_app(*args, hold, "tt.rank=8", timeout=300)
    assert again.returncode == 0 and "already measured, skipped" in again.stdout, again.stderr[-3000:]
    later = run_app(*args, hold, "tt.rank=16", timeout=300)
    assert later.returncode == 1 and "already holds results of a different point" in later.stderr
    assert not (run / FAILED_FILE).exists() and set(pd.read_csv(run / "results.csv")["tt_rank"]) == {8}
    # Hydra's record of the run in .hydra/ is the measuring run's: the refused ones did not replace it
    assert "tt.rank=8" in (run / ".hydra" / "overrides.yaml").read_text()
    assert OmegaConf.load(run / ".hydra" / "config.yaml").tt.rank == 8
    assert OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra.runtime.output_dir == str(run)


@pytest.mark.slow
def test_a_run_or_sweep_aggregates_only_its_own_jobs(tmp_path):
    args = ["experiment=fig5", "scale=smoke", f"results_root={tmp_path}", f"figures_dir={tmp_path / 'figs'}"]
    root = tmp_path / "smoke" / "fig5"
    single = run_app(*args, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    rows = len(pd.read_csv(root / AGGREGATE_FILE))
    sweep = run_app("-m", *args, "tt.rank=16,32", timeout=300)  # into the single run's directory
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    df = pd.read_csv(root / AGGREGATE_FILE)
    assert sorted(df["job_dir"].astype(str).unique()) == ["0", "1"] and len(df) == 2 * rows
    assert sorted(df["tt_rank"].unique()) == [16, 32]
    assert f"left out: 1 results.csv under {root} not of this sweep" in sweep.stdout
    again = run_app(*args, timeout=300)  # the single run again: its own directory's results only
    assert again.returncode == 0, again.stderr[-3000:]
    df = pd.read_csv(root / AGGREGATE_FILE)
    assert set(df["job_dir"].astype(str)) == {"."} and len(df) == rows and set(df["tt_rank"]) == {32}
    assert f"left out: 2 results.csv under {root} not of this run" in again.stdout


def test_a_sweep_finds_measured_twins_only_among_its_own_jobs(tmp_path):
    from benches.results import RESULTS_FILE, begin_sweep, claim_point, end_sweep, mark_run, measured_twin

    def finished(name: str, *overrides: str) -> Path:
        assert claim_point(tmp_path / name, _compose("table=tiny", *overrides))  # writes point.yaml
        (tmp_path / name / RESULTS_FILE).write_text("metric,median\nx,1\n")
        mark_run(tmp_path / name)
        return (tmp_path / name).resolve()

    old = finished("5", "impl=dense", "tt.rank=8")  # a job of an earlier, larger sweep in the same directory
    dense16 = _compose("table=tiny", "impl=dense", "tt.rank=16")
    assert measured_twin(tmp_path / "1", dense16) == old  # no sweep known: any sibling
    begin_sweep(3)  # this sweep: jobs 0, 1, 2, the ones it aggregates
    try:
        assert measured_twin(tmp_path / "1", dense16) is None  # job 5 is not aggregated: measure it
        mine = finished("0", "impl=dense", "tt.rank=8")
        assert measured_twin(tmp_path / "1", dense16) == mine
    finally:
        end_sweep()


def test_a_sweep_takes_twins_only_from_jobs_it_has_finished(tmp_path):
    """A job directory holding an earlier run's results of this point is no twin until this run has
    finished its job there (a later job of a sequential sweep, or one running beside it under a
    parallel launcher, may yet be refused for its own point); once it has (measured, or found
    measured: mark_run), it is."""
    from benches.results import RESULTS_FILE, begin_sweep, claim_point, end_sweep, mark_run, measured_twin

    dense16 = _compose("table=tiny", "impl=dense", "tt.rank=16")
    assert claim_point(tmp_path / "2", _compose("table=tiny", "impl=dense", "tt.rank=8"))
    (tmp_path / "2" / RESULTS_FILE).write_text("metric,median\nx,1\n")
    begin_sweep(4)
    try:
        assert measured_twin(tmp_path / "1", dense16) is None and measured_twin(tmp_path / "3", dense16) is None
        mark_run(tmp_path / "2")
        assert measured_twin(tmp_path / "3", dense16) == (tmp_path / "2").resolve()
    finally:
        end_sweep()


def test_a_twin_mark_holds_its_point_like_results(tmp_path):
    """A job not measured again (record_twin) keeps its directory's point: a different point is refused
    there, with the sibling named and nothing written; redo=true measures there; the same point,
    reached when no sibling measured it, is measured there and the mark goes."""
    from benches.results import POINT_FILE, TWIN_FILE, PointRefused, claim_point, record_twin

    dense16 = _compose("table=tiny", "impl=dense", "tt.rank=16")
    twin = (tmp_path / "0").resolve()
    record_twin(tmp_path / "1", dense16, twin)
    assert (tmp_path / "1" / TWIN_FILE).read_text().strip() == str(twin)
    point = (tmp_path / "1" / POINT_FILE).read_text()
    other = _compose("table=tiny", "impl=dense", "tt.rank=16", "workload.batch_size=32")
    with pytest.raises(PointRefused, match=r"twin of another job's point .*differs in: workload.batch_size.*"
                                           r"redo=true to measure this point there \(its mark is replaced"):
        claim_point(tmp_path / "1", other)
    with pytest.raises(PointRefused, match="differs in: workload.batch_size"):
        record_twin(tmp_path / "1", other, twin)
    assert (tmp_path / "1" / POINT_FILE).read_text() == point and (tmp_path / "1" / TWIN_FILE).exists()
    assert claim_point(tmp_path / "1", dense16)  # same point, no sibling found this time: measure it here
    assert not (tmp_path / "1" / TWIN_FILE).exists()
    record_twin(tmp_path / "2", dense16, twin)
    assert claim_point(tmp_path / "2", other, redo=True)  # redo: measured there, the mark gone
    assert not (tmp_path / "2" / TWIN_FILE).exists() and "batch_size: 32" in (tmp_path / "2" / POINT_FILE).read_text()


@pytest.mark.slow
def test_a_rerun_with_other_overrides_leaves_the_sweep_and_its_table_alone(tmp_path):
    """A preset's sweep run again with another batch size is refused at every job, the twins not
    measured again included (they were measured into the sweep before), and results_all.csv stays
    whole; the first command then resumes cleanly."""
    sweep = tmp_path / "sweep"
    args = ["-m", "impl=tt,dense", "tt.rank=2,4", "table=tiny", *QUICK, f"hydra.sweep.dir={sweep}",
            f"figures_dir={tmp_path / 'figs'}"]
    first = _run_app(tmp_path, *args, "workload.batch_size=8")
    assert first.returncode == 0, first.stderr[-3000:]
    table = (sweep / AGGREGATE_FILE).read_text()
    assert first.stdout.count("not measured again") == 1 and not (sweep / "3" / "results.csv").exists()
    other = _run_app(tmp_path, *args, "workload.batch_size=16")
    assert other.returncode == 1
    assert "4 job(s) of the sweep failed" in other.stdout and "job 3: PointRefused" in other.stdout
    assert not (sweep / "3" / "results.csv").exists() and (sweep / AGGREGATE_FILE).read_text() == table
    assert "kept as it was: this run was refused 4 of its job directories" in other.stdout
    again = _run_app(tmp_path, *args, "workload.batch_size=8")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("already measured, skipped") == 3 and again.stdout.count("not measured again") == 1
    assert len(pd.read_csv(sweep / AGGREGATE_FILE)) == len(pd.read_csv(io.StringIO(table)))


def test_integer_columns_stay_integers_in_job_files_and_results_all(tmp_path):
    from benches.results import RESULTS_FILE, aggregate, write_rows

    tt = {"impl": "tt", "tt_rank": 4, "tt_d": 3, "median": 2.0, "fused": True}
    dense = {"impl": "dense", "tt_rank": None, "tt_d": None, "median": 1.5, "fused": False}
    write_rows([tt], tmp_path / "0" / RESULTS_FILE)
    write_rows([dense], tmp_path / "1" / RESULTS_FILE)
    write_rows([tt, dense], tmp_path / "2" / RESULTS_FILE)  # one job's rows of both (as cache.compare writes)
    aggregate(tmp_path)
    for path in (tmp_path / "2" / RESULTS_FILE, tmp_path / AGGREGATE_FILE):
        text = pd.read_csv(path, dtype=str, keep_default_na=False)
        assert set(text["tt_rank"]) == {"4", ""} and set(text["tt_d"]) == {"3", ""}, path
        assert set(text["median"]) == {"2.0", "1.5"} and set(text["fused"]) == {"True", "False"}  # as they were
    df = collect(tmp_path)
    assert str(df["tt_rank"].dtype) == "Int64" and list(df["tt_rank"].isna()) == [False, True, False, True]
    assert df["median"].dtype == float


def test_a_glob_sweep_is_counted_and_progress_falls_back_to_a_question_mark(caplog):
    import logging

    from benches.callbacks import Progress, sweep_size

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="bench", overrides=["table=tiny"], return_hydra_config=True)
        cfg.hydra.overrides.task = ["impl=glob(tt*)", "tt.rank=4,8"]  # as `-m 'impl=glob(tt*)' tt.rank=4,8` records it
        assert sweep_size(cfg) == 3 * 2  # tt, tt_cpu, tt_reference
        cfg.hydra.job.num, cfg.hydra.job.override_dirname = 0, "impl=tt,tt.rank=4"
    assert sweep_size(cfg) is None  # without Hydra's config loader a glob cannot be counted
    progress = Progress()
    with caplog.at_level(logging.INFO, logger="ttrec.bench"):
        progress.on_multirun_start(cfg)
        progress.on_job_start(cfg)
    assert "[job 1/?] impl=tt,tt.rank=4 | elapsed" in caplog.text


@pytest.mark.slow
def test_a_glob_sweep_logs_its_progress(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_app("-m", "impl=glob(tt*)", "table=tiny", "workload.batch_size=8", *QUICK, f"hydra.sweep.dir={sweep}",
                   f"figures_dir={tmp_path / 'figs'}", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ConfigLoader is not set" not in done.stderr
    for k in (1, 2, 3):
        assert f"[job {k}/3] impl=" in done.stdout
    assert sorted(pd.read_csv(sweep / AGGREGATE_FILE)["job_dir"].astype(str).unique()) == ["0", "1", "2"]


def test_a_job_refused_its_directory_or_skipping_its_point_leaves_the_directorys_log_alone(tmp_path):
    """The job log (<job dir>/app.log) is the measuring run's: a later sweep refused that directory
    (another point) wrote its progress line and 'job 0 failed: PointRefused' there, which read as if
    that directory's job had run the other point and failed; a re-run skipping the finished point
    appended its lines too."""
    sweep = tmp_path / "sweep"
    args = ["-m", "table=tiny", "workload.batch_size=64", "timing.threads=1", "timing.warmup=1", "timing.min_repeats=2",
            "timing.max_repeats=3", "timing.target_time_s=0.01", f"hydra.sweep.dir={sweep}",
            f"figures_dir={tmp_path / 'figs'}"]
    first = run_app(*args, "tt.rank=8", timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    log_file = sweep / "0" / "app.log"
    measured = log_file.read_text()
    assert "tt.rank=8" in measured and "ns/lookup" in measured  # the measuring job's own lines are there
    refused = run_app(*args, "tt.rank=16", timeout=300)
    assert refused.returncode == 1 and "already holds results of a different point" in refused.stderr + refused.stdout
    skipped = run_app(*args, "tt.rank=8", timeout=300)
    assert skipped.returncode == 0 and "already measured, skipped" in skipped.stdout + skipped.stderr
    assert log_file.read_text() == measured
    # a job that owns its directory still logs there, its lines from before the claim included
    redo = run_app(*args, "tt.rank=16", "redo=true", timeout=300)
    assert redo.returncode == 0, redo.stderr[-3000:]
    after = log_file.read_text()
    assert after.startswith(measured) and "[job 1/1]" in after[len(measured):] and "tt.rank=16" in after[len(measured):]


def test_a_tt_point_that_falls_back_to_the_reference_says_why(caplog):
    """impl=tt with backend auto on CPU: a table the native kernel does not take (d = 7) runs the
    reference backend, and the bench logs why; a table it takes, or backend=torch asked for, logs nothing."""
    from benches.app import build_module
    from ttrec.cpu.build import unavailable_reason

    with caplog.at_level("WARNING", logger="ttrec.bench"):
        module = build_module(to_objects(_compose("tt.d=7", "table=tiny")))
    assert module.resolved_backend() == "torch"
    assert "runs the reference backend" in caplog.text and "d=7 cores; the native kernel supports 2..4" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ttrec.bench"):
        asked = build_module(to_objects(_compose("tt.d=7", "table=tiny", "impl.backend=torch")))
        if unavailable_reason() is None:
            build_module(to_objects(_compose("table=tiny")))
    assert asked.fallback_reason() is None and caplog.text == ""


@pytest.mark.slow
def test_a_figures_dir_that_cannot_be_written_fails_the_run(tmp_path):
    """A sweep whose figure cannot be written exits 1 with an error naming figures_dir (Hydra had turned the
    callback's exception into a warning, and the run exited 0 without its figure); its results are kept."""
    unwritable = Path("/proc/ttrec-no-such-dir/figs")  # (no directory can be made under /proc, even by root)
    if not Path("/proc").is_dir():
        pytest.skip("no /proc")
    sweep = tmp_path / "sweep"
    r = run_app("-m", "tt.rank=4,8", "table=tiny", "workload.batch_size=8", *QUICK, f"hydra.sweep.dir={sweep}",
                f"figures_dir={unwritable}", timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"figures_dir: got '{unwritable}'; a figure could not be written there" in r.stdout + r.stderr
    assert (sweep / AGGREGATE_FILE).exists() and not unwritable.exists()
