"""``experiment=paper``: every kernel-level paper experiment in turn, then the report.

Each experiment runs as its own ``python -m benches.app experiment=NAME`` (its own sweep, launcher
and callbacks) into ``<results_root>/<scale>/<NAME>``; points finished by an earlier run are
skipped. A failing experiment does not stop the others; the run exits non-zero at the end if any
failed. Wall time per experiment goes to ``<results_root>/<scale>/timings.csv`` (the status says
when an experiment resumed, and how many points it kept from before: the time is then the
resume's); the report (:mod:`reports.report`) to ``<results_root>/<scale>/report``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from hydra.utils import get_original_cwd, to_absolute_path

from .callbacks import _clock
from .config import BenchConfig
from .results import RESULTS_FILE, write_rows

log = logging.getLogger("ttrec.bench")

EXPERIMENTS = ("table2", "fig5", "fig3", "fig8", "fig11", "fig12", "fig10", "fig9")
# ``experiment=training``: the end-to-end DLRM training experiments (benches.training), run the same way
TRAINING_EXPERIMENTS = ("table1", "fig7", "fig6", "fig10_training")
TIMINGS_FILE = "timings.csv"
_ROOT = Path(__file__).resolve().parents[1]


CHILD_ENV = "TTREC_PRESET_CHILD"  # set in the environment of run_all's experiment processes


def _passthrough(hc) -> list[str]:
    """The command line's overrides for every experiment: all but ``experiment=`` and ``task=``
    (each preset sets its own task; a ``task=paper`` passed on made every experiment run the whole
    preset again, without end), plus the launcher choice and its settings (other hydra.* keys name
    this run's own directories)."""
    task = [o for o in hc.overrides.task if not o.lstrip("~+").startswith(("experiment=", "task="))]
    launcher = [o for o in hc.overrides.hydra if o.startswith(("hydra/launcher=", "hydra.launcher."))]
    return task + launcher


def run_all(cfg: BenchConfig, hc, experiments: tuple[str, ...] = EXPERIMENTS, label: str = "paper") -> Path:
    """Run ``experiments`` in turn (each its own ``benches.app`` process), then the report of every
    experiment found under ``<results_root>/<scale>``. ``label`` (the preset: paper, training) names
    the log lines and the report's command; timings.csv keeps the other presets' experiments."""
    if os.environ.get(CHILD_ENV):
        raise RuntimeError(f"task={label} inside an experiment of experiment={os.environ[CHILD_ENV]}: one preset "
                           "of presets cannot run another (it would start processes without end)")
    root = Path(to_absolute_path(cfg.results_root)) / cfg.scale.name
    root.mkdir(parents=True, exist_ok=True)
    extra = [o for o in _passthrough(hc) if not o.startswith("results_root=")]
    extra.append(f"results_root={root.parent}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")])),
           CHILD_ENV: label}
    cwd = get_original_cwd()  # where this run started: relative paths (figures_dir=, criteo_path=) as in a direct run
    start, timings = time.monotonic(), []
    earlier = read_timings(root)  # other presets' experiments in this root stay in the table
    kept = [] if earlier is None else earlier[~earlier["experiment"].isin(experiments)].to_dict("records")
    log.info("%s: %d experiments at scale=%s -> %s", label, len(experiments), cfg.scale.name, root)
    for i, name in enumerate(experiments):
        log.info("[%s %d/%d] %s: starting | elapsed %s", label, i + 1, len(experiments), name,
                 _clock(time.monotonic() - start))
        kept_points = sum(1 for _ in (root / name).rglob(RESULTS_FILE))  # measured by an earlier run: skipped
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "benches.app", f"experiment={name}", *extra], cwd=cwd, env=env)
        seconds = time.monotonic() - t0
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        if kept_points:
            status += f", resumed (finished points kept: {kept_points})"
        timings.append({"experiment": name, "scale": cfg.scale.name, "seconds": round(seconds, 1), "status": status})
        write_rows(kept + timings, root / TIMINGS_FILE)  # after every experiment: an interrupt keeps what finished
        log.info("[%s %d/%d] %s: %s in %s | elapsed %s, left: %s", label, i + 1, len(experiments), name, status,
                 _clock(seconds), _clock(time.monotonic() - start), ", ".join(experiments[i + 1:]) or "nothing")
    from reports.report import build

    failed = [t["experiment"] for t in timings if not t["status"].startswith("ok")]
    try:
        report = build(root, root / "report",
                       command=f"python -m benches.app experiment={label} scale={cfg.scale.name}")
    except Exception as exc:  # (e.g. every experiment failed: no table to report on) the failures come first
        if failed:
            raise RuntimeError(f"experiments failed: {failed} (their logs are above); no report: {exc}") from exc
        raise
    log.info("%s: all experiments in %s; report: %s", label, _clock(time.monotonic() - start), report)
    if failed:
        raise RuntimeError(f"experiments failed: {failed} (their logs are above; the others' results are in {root})")
    return report


def read_timings(root: str | Path) -> pd.DataFrame | None:
    path = Path(root) / TIMINGS_FILE
    return pd.read_csv(path) if path.exists() else None
