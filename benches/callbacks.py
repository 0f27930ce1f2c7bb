"""Hydra callback: after a run or sweep, aggregate its results and draw its figure."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from reports.cache_figures import is_cache_experiment, plot_cache_figures
from reports.figures import plot_rank_sweep

from .results import AGGREGATE_FILE, aggregate

log = logging.getLogger("ttrec.bench")


class AggregateResults(Callback):
    """Writes results_all.csv at the run/sweep root and, when the results hold a sweep over two or
    more TT ranks, the time-vs-rank figure (one per mode) into ``figures_dir``; for the cache
    experiments, their figures instead (reports.cache_figures)."""

    def _finish(self, root: str, config: DictConfig) -> None:
        try:
            df = aggregate(root)
        except FileNotFoundError as exc:
            log.warning("nothing to aggregate: %s", exc)
            return
        log.info("results: %s (%d rows)", Path(root) / AGGREGATE_FILE, len(df))
        if is_cache_experiment(df):  # Figures 9, 10, 12 (their rank sweeps are not Figure 11's)
            for path in plot_cache_figures(df, to_absolute_path(config.figures_dir)):
                log.info("figure: %s", path)
            return
        if df["tt_rank"].nunique() >= 2:
            for mode in sorted(df["mode"].unique()):
                png = plot_rank_sweep(df, to_absolute_path(config.figures_dir),
                                      name="fig11_time_vs_rank" + ("" if mode == "forward" else f"_{mode}"), mode=mode)
                log.info("figure: %s", png)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        self._finish(config.hydra.run.dir, config)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._finish(config.hydra.sweep.dir, config)
