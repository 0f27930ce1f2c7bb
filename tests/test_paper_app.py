"""The paper experiments as Hydra presets: scales, resumable sweeps, launchers, the one-command run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from benches.callbacks import sweep_size
from benches.config import output_dir, register, to_objects
from benches.paper import EXPERIMENTS, TRAINING_EXPERIMENTS
from benches.results import AGGREGATE_FILE, POINT_FILE, RESULTS_FILE, claim_point, mark_run, measured_twin

from .apprun import run_app

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
SCALES = ("smoke", "default", "paper")

register()


def _compose(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="bench", overrides=list(overrides), return_hydra_config=hydra)


_run_app = run_app


def test_every_preset_is_listed_and_composes_at_every_scale():
    presets = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    assert sorted(set(presets) - {"default", "paper", "training"}) == sorted(EXPERIMENTS + TRAINING_EXPERIMENTS)
    assert sorted(p.stem for p in (ROOT / "conf" / "scale").glob("*.yaml")) == sorted(SCALES)
    for name in presets:
        for scale in SCALES:
            cfg = to_objects(_compose(f"experiment={name}", f"scale={scale}"))
            assert cfg.scale.name == scale


def test_scales_size_the_sweeps():
    sizes = {}
    for scale in SCALES:
        cfg = _compose("experiment=fig11", f"scale={scale}", hydra=True)
        sizes[scale] = sweep_size(cfg)
        bench = to_objects(_compose("experiment=fig11", f"scale={scale}"))
        assert bench.workload.batch_size == {"smoke": 64, "default": 4096, "paper": 65536}[scale]
    assert sizes == {"smoke": 2 * 2 * 2, "default": 2 * 4 * 3, "paper": 2 * 4 * 3}
    paper = to_objects(_compose("experiment=fig11", "scale=paper"))
    assert paper.table.num_embeddings == 10_131_227  # Kaggle's largest table at the paper's scale
    # the command line wins over the preset's sweep, key by key
    assert sweep_size(_compose("experiment=fig11", "scale=default", "tt.rank=8", hydra=True)) == 2 * 3
    fig8 = _compose("experiment=fig8", "scale=default", hydra=True)
    fig8.hydra.overrides.task = ["experiment=fig8", "impl=tt,dense"]  # as `-m impl=tt,dense` records it
    assert sweep_size(fig8) == 2 * 3


def test_presets_write_to_a_fixed_directory_per_scale_and_others_to_a_new_one():
    assert output_dir("out", "sweeps", "fig11", "smoke", "2026-01-01") == "out/smoke/fig11"
    assert output_dir("out", "sweeps", None, "smoke", "2026-01-01") == "out/sweeps/2026-01-01"
    cfg = _compose("experiment=fig8", "scale=smoke", "results_root=/tmp/x", hydra=True)
    assert cfg.hydra.sweep.dir == "/tmp/x/smoke/fig8"


def test_a_sweep_finds_the_measured_twin_of_a_point_only_where_the_impl_ignores_the_difference(tmp_path):
    def job(name: str, *overrides: str, finished: bool = True):
        d = tmp_path / name
        assert claim_point(d, _compose("table=tiny", *overrides))  # writes point.yaml
        if finished:
            (d / RESULTS_FILE).write_text("metric,median\nx,1\n")
            mark_run(d)  # this run finished the job (a twin is taken only from such)
        return d

    dense8 = job("0", "impl=dense", "tt.rank=8")
    job("1", "impl=tt", "tt.rank=8")
    job("2", "impl=dense", "tt.rank=8", "workload.pooling_factor=10", finished=False)  # claimed, not finished
    # nn.EmbeddingBag reads no tt.* setting: the rank-16 and re-initialised points are the rank-8 one
    assert measured_twin(tmp_path / "9", _compose("table=tiny", "impl=dense", "tt.rank=16")) == dense8.resolve()
    assert measured_twin(tmp_path / "9", _compose("table=tiny", "impl=dense", "tt.init=normal")) == dense8.resolve()
    assert measured_twin(tmp_path / "0", _compose("table=tiny", "impl=dense", "tt.rank=16")) is None  # not itself
    # anything else it reads makes another point; unfinished jobs are no twins
    assert measured_twin(tmp_path / "9", _compose("table=tiny", "impl=dense", "workload.batch_size=8")) is None
    assert measured_twin(tmp_path / "9", _compose("table=tiny", "impl=dense", "workload.pooling_factor=10")) is None
    bad = tmp_path / "3"  # a sibling whose point file is not YAML: skipped, not an error
    bad.mkdir()
    (bad / POINT_FILE).write_text("impl: [unclosed\n")
    (bad / RESULTS_FILE).write_text("metric,median\nx,1\n")
    mark_run(bad)
    assert measured_twin(tmp_path / "9", _compose("table=tiny", "impl=dense", "workload.batch_size=16")) is None
    # TT implementations read tt.*: never a twin across ranks
    assert measured_twin(tmp_path / "9", _compose("table=tiny", "impl=tt", "tt.rank=16")) is None
    assert measured_twin(tmp_path / "9", _compose("table=tiny", "impl=t3nsor", "tt.rank=8")) is None


def test_claim_point_skips_finished_points_refuses_others_and_keeps_old_files_on_redo(tmp_path):
    a = _compose("table=tiny", "tt.rank=4")
    b = _compose("table=tiny", "tt.rank=8")
    assert claim_point(tmp_path, a)  # fresh directory: measure
    (tmp_path / RESULTS_FILE).write_text("metric,median\nx,1\n")
    assert not claim_point(tmp_path, a)  # same point, finished: skip
    assert not claim_point(tmp_path, _compose("table=tiny", "tt.rank=4", "results_root=elsewhere", "redo=false"))
    with pytest.raises(ValueError, match=r"different point \(differs in: tt.rank: 4 -> 8\); nothing was overwritten"):
        claim_point(tmp_path, b)
    assert claim_point(tmp_path, b, redo=True)
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.startswith("results.replaced-") for n in kept) and any(n.startswith("point.replaced-") for n in kept)
    assert not (tmp_path / RESULTS_FILE).exists()
    assert OmegaConf.create((tmp_path / POINT_FILE).read_text()).tt.rank == 8


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_duplicates_or_losses(tmp_path):
    args = ["experiment=fig11", "scale=smoke", f"results_root={tmp_path}", f"figures_dir={tmp_path / 'figs'}",
            "scale.min_repeats=30", "scale.max_repeats=30"]  # slow enough to interrupt mid-sweep
    sweep = tmp_path / "smoke" / "fig11"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # SIGINT's default action restored in the child: a test run started in the background of a
    # non-interactive shell inherits SIGINT ignored, and the interrupt would then do nothing
    proc = subprocess.Popen([sys.executable, "-m", "benches.app", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while len(list(sweep.glob(f"*/{RESULTS_FILE}"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    finished = {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob(f"*/{RESULTS_FILE}")}
    # 8 jobs, 6 measured: nn.EmbeddingBag reads no tt.* setting, so it is timed at one rank only
    assert 2 <= len(finished) < 6, f"interrupt landed outside the sweep: {sorted(finished)}"
    assert not (sweep / AGGREGATE_FILE).exists()

    done = _run_app(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout + done.stderr).count("already measured, skipped") == len(finished)
    for job, mtime in finished.items():  # finished points were not measured again
        assert (sweep / job / RESULTS_FILE).stat().st_mtime_ns == mtime
    assert done.stdout.count("not measured again: impl=dense reads no tt.* setting") == 2
    df = pd.read_csv(sweep / AGGREGATE_FILE)
    assert df["job_dir"].nunique() == 6
    points = df[df["metric"] == "time_per_lookup"]
    tt, dense = points[points["impl"] == "tt"], points[points["impl"] == "dense"]  # dense has no rank column
    assert len(tt) == 4 and not tt.duplicated(["tt_rank", "pooling_factor"]).any()
    assert len(dense) == 2 and not dense.duplicated(["pooling_factor"]).any() and len(points) == 6


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local", "cpu_pool"])  # submitit's local executor; joblib
def test_sweeps_run_through_the_cluster_and_pool_launchers(tmp_path, launcher):
    done = _run_app("experiment=fig8", "scale=smoke", "impl=dense,t3nsor", "timing.memory=false",
                    f"results_root={tmp_path}", f"figures_dir={tmp_path / 'figs'}", f"hydra/launcher={launcher}")
    assert done.returncode == 0, done.stderr[-3000:]
    df = pd.read_csv(tmp_path / "smoke" / "fig8" / AGGREGATE_FILE)
    points = df[df["metric"] == "time_per_lookup"]
    assert sorted(zip(points["impl"], points["num_embeddings"])) == [
        ("dense", 1000), ("dense", 4000), ("t3nsor", 1000), ("t3nsor", 4000)]
    if launcher == "local":
        assert (tmp_path / "smoke" / "fig8" / ".submitit").is_dir()  # submitit ran the jobs


@pytest.fixture(scope="module")
def paper_smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    done = _run_app("experiment=paper", "scale=smoke", f"results_root={root}", f"figures_dir={root / 'figs'}")
    return root / "smoke", done


@pytest.mark.slow
def test_experiment_paper_runs_every_preset_and_writes_the_report(paper_smoke):
    root, done = paper_smoke
    assert done.returncode == 0, done.stderr[-5000:]
    for name in EXPERIMENTS:
        df = pd.read_csv(root / name / AGGREGATE_FILE)
        assert not df.empty and (df["scale"] == "smoke").all(), name
    timings = pd.read_csv(root / "timings.csv")
    assert list(timings["experiment"]) == list(EXPERIMENTS) and (timings["status"] == "ok").all()
    report = (root / "report" / "REPORT.md").read_text()
    for png in (root / "report" / "figures").glob("*.png"):
        assert f"figures/{png.name}" in report
        assert png.stat().st_size > 10_000
    for name in ("table2", "fig5", "fig3", "fig8", "fig11", "fig12", "fig10", "fig9"):
        assert f"![{name}]" in report, f"{name} has no figure in the report"
    assert "Figure not drawn" not in report
    assert "[paper 8/8] fig9: ok" in done.stdout + done.stderr


@pytest.mark.slow
def test_the_report_regenerates_from_stored_results_without_measuring(paper_smoke, tmp_path):
    root, done = paper_smoke
    assert done.returncode == 0, done.stderr[-5000:]
    out = tmp_path / "again"
    regen = subprocess.run([sys.executable, "-m", "reports.report", "--results", str(root / "report" / "results"),
                            "--out", str(out)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                           capture_output=True, text=True, timeout=300)
    assert regen.returncode == 0, regen.stderr[-3000:]
    first = (root / "report" / "REPORT.md").read_text().split("\n", 3)[3]  # past the generation stamp
    again = (out / "REPORT.md").read_text().split("\n", 3)[3]
    assert again == first
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(p.name for p in (root / "report" / "figures").iterdir())


def test_report_without_results_is_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "reports.report", "--results", str(tmp_path), "--out", str(tmp_path)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert done.returncode != 0
    assert "no experiment tables" in done.stderr


def test_run_all_passes_on_no_task_and_runs_experiments_where_it_started(tmp_path, monkeypatch):
    """experiment=paper's experiment processes: no ``task=`` passed on (``task=paper`` on the command
    line made each experiment run the whole preset again, processes without end), the start directory
    as their working directory (relative paths as in a direct run), and a resumed experiment marked so
    in timings.csv; an experiment process that is asked to run a preset of presets refuses."""
    from types import SimpleNamespace

    import benches.paper as paper
    import reports.report

    calls = []
    monkeypatch.setattr(paper.subprocess, "run", lambda args, cwd, env: calls.append((args, cwd, env))
                        or subprocess.CompletedProcess(args, 0))
    monkeypatch.setattr(reports.report, "build", lambda *a, **k: tmp_path / "REPORT.md")
    start = tmp_path / "start"
    monkeypatch.setattr(paper, "get_original_cwd", lambda: str(start))
    monkeypatch.delenv(paper.CHILD_ENV, raising=False)
    hc = SimpleNamespace(overrides=SimpleNamespace(
        task=["task=paper", "experiment=paper", "tt.rank=8", "figures_dir=rel"],
        hydra=["hydra/launcher=cpu_pool", "hydra.run.dir=elsewhere"]))
    cfg = to_objects(_compose("experiment=paper", "scale=smoke", f"results_root={tmp_path}"))
    (tmp_path / "smoke" / "fig5" / "0").mkdir(parents=True)
    (tmp_path / "smoke" / "fig5" / "0" / RESULTS_FILE).write_text("measured before\n")
    paper.run_all(cfg, hc)
    assert [args[3] for args, _, _ in calls] == [f"experiment={name}" for name in EXPERIMENTS]
    for args, cwd, env in calls:
        assert args[4:] == ["tt.rank=8", "figures_dir=rel", "hydra/launcher=cpu_pool", f"results_root={tmp_path}"]
        assert cwd == str(start) and env[paper.CHILD_ENV] == "paper"
    status = dict(zip(*pd.read_csv(tmp_path / "smoke" / "timings.csv")[["experiment", "status"]].T.values))
    assert status == {name: "ok, resumed (finished points kept: 1)" if name == "fig5" else "ok" for name in EXPERIMENTS}
    monkeypatch.setenv(paper.CHILD_ENV, "paper")
    with pytest.raises(RuntimeError, match="task=paper inside an experiment of experiment=paper"):
        paper.run_all(cfg, hc)


def test_run_all_names_the_failed_experiments_when_no_report_can_be_built(tmp_path, monkeypatch):
    """Every experiment failing left no table: the error was the report's 'run experiment=paper
    first' (FileNotFoundError), which points the wrong way; the failures come first now."""
    from types import SimpleNamespace

    import benches.paper as paper

    monkeypatch.setattr(paper.subprocess, "run", lambda args, cwd, env: subprocess.CompletedProcess(args, 1))
    monkeypatch.setattr(paper, "get_original_cwd", lambda: str(tmp_path))
    monkeypatch.delenv(paper.CHILD_ENV, raising=False)
    hc = SimpleNamespace(overrides=SimpleNamespace(task=["experiment=paper"], hydra=[]))
    cfg = to_objects(_compose("experiment=paper", "scale=smoke", f"results_root={tmp_path}"))
    with pytest.raises(RuntimeError, match=r"experiments failed: \['table2', .*'fig9'\] \(their logs are above\); no report: .*no experiment tables"):
        paper.run_all(cfg, hc)


def test_fig12_without_nn_embedding_bag_is_drawn_and_says_there_is_no_break_even(tmp_path):
    """A Figure 12 sweep without cache.compare (no nn.EmbeddingBag timed in its jobs): the figure
    failed on break_even's empty frame (KeyError 'pooling_factor'); now it draws the TT lines and says why
    there is no break-even, and the break-even table is empty with its columns."""
    from benches.cache_experiments import BREAK_EVEN_COLUMNS, break_even
    from reports.cache_figures import plot_hit_rate_sweep

    df = pd.read_csv(ROOT / "reports" / "results" / "fig12.csv")
    tt_only = df[df["impl"] != "dense"]
    be = break_even(tt_only)
    assert be.empty and list(be.columns) == BREAK_EVEN_COLUMNS
    assert not break_even(df).empty  # (with nn.EmbeddingBag: one row per mode, rank and pooling factor)
    paths = plot_hit_rate_sweep(tt_only, tmp_path)
    assert [p.suffix for p in paths] == [".png", ".csv"]
    assert list(pd.read_csv(paths[1]).columns) == BREAK_EVEN_COLUMNS


@pytest.mark.slow
def test_ctrl_c_is_reported_once_by_a_preset_not_again_by_its_experiment_process(tmp_path):
    """Ctrl-C during experiment=paper printed "interrupted: ..." twice: the experiment's process (it
    gets the terminal's SIGINT too) and the preset's. The experiment's process now leaves it to the
    preset; a run of its own still says it."""
    from benches import paper

    def interrupted(child: bool) -> str:
        run = tmp_path / ("child" if child else "own")
        env = {**os.environ, "PYTHONPATH": str(ROOT), **({paper.CHILD_ENV: "paper"} if child else {})}
        proc = subprocess.Popen([sys.executable, "-m", "benches.app", "table=tiny", "impl=dense", "timing=quick",
                                 "timing.target_time_s=60", "timing.min_repeats=100000", "timing.max_repeats=100000",
                                 f"hydra.run.dir={run}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 120
        while not run.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(1.0)  # (in the job: building the point or timing it)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err[-3000:]
        return err

    assert interrupted(child=False).count("interrupted: finished points keep their results.csv") == 1
    assert "interrupted" not in interrupted(child=True)
