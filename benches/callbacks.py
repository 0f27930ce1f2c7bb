"""Hydra callbacks: progress of a sweep, and after a run or sweep, its aggregated results and figures."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from reports.cache_figures import is_cache_experiment, plot_cache_figures
from reports.figures import plot_rank_sweep

from .results import AGGREGATE_FILE, FAILED_FILE, aggregate, failures

log = logging.getLogger("ttrec.bench")


def sweep_size(config: DictConfig) -> int:
    """Jobs in the sweep: the product of the sweep lengths of the preset's sweeper params, with the
    command line's overrides taking precedence key by key."""
    params = {str(k): str(v) for k, v in (config.hydra.sweeper.get("params") or {}).items()}
    parser = OverridesParser.create()
    lines = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    by_key = {}
    for o in parser.parse_overrides(lines):
        by_key[o.get_key_element()] = len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1
    return math.prod(by_key.values())


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress(Callback):
    """One line per job of a sweep: jobs started/total, the point (its overrides), elapsed time and
    an estimate of the time left (mean time of the jobs done so far x jobs left)."""

    def __init__(self) -> None:
        self.total, self.start, self.done, self.job_start = 0, None, 0, None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.total, self.start, self.done = sweep_size(config), time.monotonic(), 0
        log.info("sweep of %d jobs -> %s", self.total, config.hydra.sweep.dir)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if self.start is None:  # a single run, or a job in another process (joblib, submitit)
            return
        self.job_start = time.monotonic()
        elapsed = self.job_start - self.start
        eta = "?" if not self.done else _clock(elapsed / self.done * (self.total - self.done))
        num = config.hydra.job.get("num", self.done)
        point = config.hydra.job.get("override_dirname") or "(no overrides)"
        log.info("[job %d/%d] %s | elapsed %s, left ~%s", num + 1, self.total, point, _clock(elapsed), eta)

    def on_job_end(self, config: DictConfig, job_return=None, **kwargs) -> None:
        if self.start is not None:
            self.done += 1


class AggregateResults(Callback):
    """Writes results_all.csv at the run/sweep root and draws its figures into ``figures_dir``: an
    experiment preset's figure (reports.report), else, for a sweep over two or more TT ranks, the
    time-vs-rank figure (one per mode), or the cache experiments' figures. A sweep's failed jobs
    (benches.app records them and goes on) are listed after that, and the sweep exits 1."""

    def __init__(self) -> None:
        self.start = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.start = time.time()  # failures recorded before this belong to earlier sweeps

    def _finish(self, root: str, config: DictConfig) -> None:
        if config.get("task") in ("paper", "training"):  # its experiments aggregated themselves; report built
            return
        try:
            df = aggregate(root)
        except FileNotFoundError as exc:
            log.warning("nothing to aggregate: %s", exc)
            return
        log.info("results: %s (%d rows)", Path(root) / AGGREGATE_FILE, len(df))
        out = to_absolute_path(config.figures_dir)
        experiment = config.hydra.runtime.choices.get("experiment")
        from reports.report import ARTIFACTS, draw

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
        for png in pngs:
            log.info("figure: %s", png)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        self._finish(config.hydra.run.dir, config)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        root = config.hydra.sweep.dir
        self._finish(root, config)
        failed = failures(root, since=self.start)
        if failed:
            log.error("%d job(s) of the sweep failed (the others' results are aggregated above):", len(failed))
            for job, error in failed:
                log.error("  job %s: %s (traceback: %s)", job, error, Path(root) / job / FAILED_FILE)
            raise SystemExit(1)
