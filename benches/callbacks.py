"""Hydra callbacks: progress of a sweep, and after a run or sweep, its aggregated results and figures."""

from __future__ import annotations

import logging
import math
import statistics
import time
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from reports.cache_figures import is_cache_experiment, plot_cache_figures
from reports.figures import plot_rank_sweep

from .results import (AGGREGATE_FILE, RESULTS_FILE, aggregate, begin_sweep, end_sweep, failures, refused_jobs,
                      sweep_jobs)

log = logging.getLogger("ttrec.bench")


class JobLogFile(logging.FileHandler):
    """Hydra's job log file (``<job dir>/<job name>.log``; conf/bench.yaml puts this class in
    hydra.job_logging), written only by a job that owns its directory. Records wait in memory until
    the job claims its point or fails on its own (:func:`own_job_log`); a job refused the directory
    (another run measures there) or skipping a finished point drops them (:func:`drop_job_log`):
    they were on the console, and the directory's log stays that of the run that measured there
    (a refused run's progress line and error read as that run's)."""

    MAX_HELD = 10_000  # records held before the claim (a job logs a few): beyond, the oldest go

    def __init__(self, filename, mode: str = "a", encoding: str | None = None, delay: bool = True,
                 errors: str | None = None) -> None:
        super().__init__(filename, mode, encoding, delay=True, errors=errors)  # opened on the first write
        self.held: list[logging.LogRecord] | None = []  # None once owned or dropped
        self.owned = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.owned:
            super().emit(record)
        elif self.held is not None:
            self.held.append(record)
            del self.held[:-self.MAX_HELD]

    def own(self) -> None:
        if self.held is None:  # owned already, or dropped: a dropped job's log stays dropped
            return
        held, self.held, self.owned = self.held, None, True
        for record in held:
            super().emit(record)

    def drop(self) -> None:
        self.held = None


def _job_log_files() -> list[JobLogFile]:
    return [h for h in logging.getLogger().handlers if isinstance(h, JobLogFile)]


def own_job_log() -> None:
    """This job owns its directory: its log lines so far, and from now on, go to its log file."""
    for h in _job_log_files():
        h.own()


def drop_job_log() -> None:
    """This job does not own its directory: none of its log lines go to the log file there."""
    for h in _job_log_files():
        h.drop()


def sweep_size(config: DictConfig) -> int | None:
    """Jobs in the sweep: the product of the sweep lengths of the preset's sweeper params, with the
    command line's overrides taking precedence key by key. A glob over a config group
    (``impl=glob(tt*)``) counts the group's options while Hydra runs; None if it cannot be counted."""
    params = {str(k): str(v) for k, v in (config.hydra.sweeper.get("params") or {}).items()}
    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    parser = OverridesParser.create(config_loader=loader)
    lines = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    by_key = {}
    try:
        for o in parser.parse_overrides(lines):
            by_key[o.get_key_element()] = len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1
    except HydraException:  # a glob without Hydra's config loader
        return None
    return math.prod(by_key.values())


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# a job's return value when it measured nothing (its point finished already, or a twin's): benches.app
NOT_MEASURED = "not measured"


class Progress(Callback):
    """One line per job of a sweep: jobs started/total, the point (its overrides), elapsed time and
    an estimate of the time left: the mean time of the jobs measured so far, less the first once
    there are others (it carries the one-time costs: the native kernel's first compile, about 20 s,
    made a 47 s sweep's estimate 9 minutes), x jobs left. Jobs that measured nothing (a resumed
    sweep's finished points) are left out of the mean: they take no time, and made a resumed sweep's
    estimate a fraction of the time left."""

    def __init__(self) -> None:
        self.total, self.start, self.done, self.job_start = None, None, 0, None
        self.seconds: list[float] = []  # each finished job's, in this process

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.total, self.start, self.done = sweep_size(config), time.monotonic(), 0
        log.info("sweep of %s jobs -> %s", "?" if self.total is None else self.total, config.hydra.sweep.dir)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if self.start is None:  # a single run, or a job in another process (joblib, submitit)
            return
        self.job_start = time.monotonic()
        elapsed = self.job_start - self.start
        per_job = statistics.mean(self.seconds[1:] or self.seconds) if self.seconds else None
        eta = "?" if per_job is None or self.total is None else _clock(per_job * (self.total - self.done))
        num = config.hydra.job.get("num", self.done)
        point = config.hydra.job.get("override_dirname") or "(no overrides)"
        log.info("[job %d/%s] %s | elapsed %s, left ~%s", num + 1, "?" if self.total is None else self.total, point,
                 _clock(elapsed), eta)

    def on_job_end(self, config: DictConfig, job_return=None, **kwargs) -> None:
        if self.start is not None:
            self.done += 1
            if self.job_start is not None and not _measured_nothing(job_return):
                self.seconds.append(time.monotonic() - self.job_start)


def _measured_nothing(job_return) -> bool:
    """Whether a finished job returned NOT_MEASURED (a failed job's return value raises its error: no)."""
    return (job_return is not None and job_return.status == JobStatus.COMPLETED
            and job_return.return_value == NOT_MEASURED)


class AggregateResults(Callback):
    """Writes results_all.csv at the run/sweep root and draws its figures into ``figures_dir``: an
    experiment preset's figure (reports.report), else, for a sweep over two or more TT ranks, the
    time-vs-rank figure (one per mode), or the cache experiments' figures. Only this run's jobs are
    aggregated (a single run: its directory; a sweep: its job directories 0 .. N-1), whatever else
    lies under the root; not over an existing results_all.csv when the run was refused some of its job
    directories (they hold other points, or another process holds them): its table would be a part.
    A sweep's failed jobs (benches.app records them and goes on) are listed after that, and the sweep
    exits 1."""

    def __init__(self) -> None:
        self.start = 0.0
        self.figure_error: str | None = None  # why the figures could not be written (the run then exits 1)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.start = time.time()  # failures recorded before this belong to earlier sweeps
        # job directories are job numbers (conf/bench.yaml) unless hydra.sweep.subdir says otherwise
        numbered = OmegaConf.to_container(config.hydra.sweep).get("subdir") == "${hydra.job.num}"
        begin_sweep(sweep_size(config) if numbered else None)

    def _finish(self, root: str, config: DictConfig, jobs: list[str] | None, failed: tuple[str, ...] = ()) -> bool:
        """Aggregate and draw; False if results_all.csv was not written (nothing to aggregate, or kept).
        The jobs in ``failed`` (this sweep's failures) are left out: a results file in their directory
        is an earlier run's, perhaps of another point (a sweep whose every job failed its config check
        rewrote the table and its figure from the run before)."""
        if config.get("task") in ("paper", "training"):  # its experiments aggregated themselves; report built
            return True
        if jobs is None:
            log.warning("this sweep's job directories are not known (hydra.sweep.subdir or the sweep size): "
                        "every %s under %s is aggregated", RESULTS_FILE, root)
        refused = refused_jobs(root, jobs)
        if refused and (Path(root) / AGGREGATE_FILE).exists():  # its jobs' results: a part of the table there
            log.warning("%s kept as it was: this run was refused %d of its job directories (%s), so its own "
                        "results would replace that table with a part of it; any job it measured has its %s",
                        Path(root) / AGGREGATE_FILE, len(refused), ", ".join(refused[:5]) + (" ..." if len(refused) > 5
                                                                                           else ""), RESULTS_FILE)
            return False
        try:
            df, others = aggregate(root, [j for j in jobs if j not in failed] if jobs is not None else None)
        except FileNotFoundError as exc:
            log.warning("nothing to aggregate: %s", exc)
            return False
        log.info("results: %s (%d rows)", Path(root) / AGGREGATE_FILE, len(df))
        if others:
            log.info("left out: %d %s under %s not of this %s (e.g. %s)", len(others), RESULTS_FILE, root,
                     "run" if jobs == ["."] else "sweep", others[0])
        out = to_absolute_path(config.figures_dir)
        experiment = config.hydra.runtime.choices.get("experiment")
        from reports.report import ARTIFACTS, draw

        try:
            if experiment in ARTIFACTS:
                pngs = draw(experiment, df, out)
            elif is_cache_experiment(df):  # Figures 9, 10, 12 (their rank sweeps are not Figure 11's)
                pngs = plot_cache_figures(df, out)
            elif "tt_rank" in df.columns and df["tt_rank"].nunique() >= 2:
                # (not named fig11_*: that name is the fig11 preset's, which would overwrite it in figures_dir)
                pngs = [plot_rank_sweep(df, out, name="time_vs_rank" + ("" if mode == "forward" else f"_{mode}"),
                                        mode=mode) for mode in sorted(df["mode"].unique())]
            else:
                pngs = []
        except OSError as exc:  # (Hydra turns a callback's exception into a warning, and the run exited 0)
            self.figure_error = (f"figures_dir: got {config.figures_dir!r}; a figure could not be written there ({exc}): "
                                 f"figures_dir must be a directory this user can create and write. The results are in "
                                 f"{Path(root) / AGGREGATE_FILE}")
            log.error("%s", self.figure_error)
            return True
        for png in pngs:
            log.info("figure: %s", png)
        return True

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        self._finish(config.hydra.run.dir, config, ["."])
        if self.figure_error is not None:
            raise SystemExit(1)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        root, jobs = config.hydra.sweep.dir, sweep_jobs()
        try:
            failed = failures(root, since=self.start, jobs=jobs)
            aggregated = self._finish(root, config, jobs, tuple(job for job, _, _ in failed))
        finally:
            end_sweep()
        if failed:
            log.error("%d job(s) of the sweep failed (%s):", len(failed), "the others' results are aggregated above"
                      if aggregated else f"{AGGREGATE_FILE} not written: see above")
            for job, error, path in failed:
                log.error("  job %s: %s (traceback: %s)", job, error, path)
        if failed or self.figure_error is not None:
            raise SystemExit(1)
