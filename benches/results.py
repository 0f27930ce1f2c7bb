"""Result storage: each job writes its tidy rows atomically; aggregation only reads.

A results file is a CSV with one row per (measured point, metric). Columns: the config values that
define the point, ``metric``, ``unit``, ``median``, ``q1``, ``q3``, ``iqr``, ``n``, then environment.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

__all__ = ["RESULTS_FILE", "AGGREGATE_FILE", "POINT_FILE", "FAILED_FILE", "IGNORED_SECTIONS", "write_rows",
           "claim_point", "measured_twin", "collect", "aggregate", "record_failure", "clear_failure", "failures"]

RESULTS_FILE = "results.csv"
AGGREGATE_FILE = "results_all.csv"
POINT_FILE = "point.yaml"  # the resolved config of the point whose results sit beside it
FAILED_FILE = "failed.txt"  # a job that raised: its error and traceback (in a sweep, the others go on)
# config keys that say where results go or whether to redo them, not what is measured
_NOT_THE_POINT = ("redo", "figures_dir", "results_root", "scale")
# config sections a timed point's measurement never reads, by implementation: nn.EmbeddingBag has no
# TT cores, so a sweep over tt.* (Figure 11's ranks) times it once per point of the other keys
IGNORED_SECTIONS = {"dense": ("tt",)}


def _point_yaml(cfg: DictConfig) -> str:
    point = OmegaConf.to_container(cfg, resolve=True)
    for key in _NOT_THE_POINT:
        point.pop(key, None)
    point.pop("hydra", None)
    return OmegaConf.to_yaml(OmegaConf.create(point), sort_keys=True)


def claim_point(out_dir: str | Path, cfg: DictConfig, redo: bool = False) -> bool:
    """Decide whether a job measures its point in ``out_dir``; True means go ahead.

    A directory that already holds results of the same point (same resolved config, by
    ``point.yaml``) is finished: False, unless ``redo``. A directory holding results of a different
    point is an error (a sweep changed under a fixed directory), unless ``redo``. With ``redo``, the
    old results and point files are kept, renamed with their modification time: never overwritten.
    """
    out_dir = Path(out_dir)
    results, point_file, point = out_dir / RESULTS_FILE, out_dir / POINT_FILE, _point_yaml(cfg)
    if results.exists():
        old = point_file.read_text() if point_file.exists() else None
        if not redo:
            if old == point:
                return False
            diff = _differing_keys(old, point)
            raise ValueError(
                f"{out_dir} already holds results of a different point (differs in: {diff}); nothing was "
                f"overwritten. Pass redo=true to measure this point there (the old files are kept, renamed), "
                f"or choose another directory (hydra.sweep.dir=... / hydra.run.dir=... / results_root=...)")
        stamp = dt.datetime.fromtimestamp(results.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
        results.rename(out_dir / f"results.replaced-{stamp}.csv")
        if point_file.exists():
            point_file.rename(out_dir / f"point.replaced-{stamp}.yaml")
    out_dir.mkdir(parents=True, exist_ok=True)
    point_file.write_text(point)
    return True


def _measured_part(point_yaml: str) -> dict:
    """A point (a point.yaml's text) without the sections its implementation never reads."""
    point = OmegaConf.to_container(OmegaConf.create(point_yaml))
    for key in IGNORED_SECTIONS.get((point.get("impl") or {}).get("name"), ()):
        point.pop(key, None)
    return point


def measured_twin(out_dir: str | Path, cfg: DictConfig) -> Path | None:
    """Another job directory of ``out_dir``'s sweep (a sibling) holding finished results of a point
    that differs from ``cfg``'s only in sections its implementation never reads
    (:data:`IGNORED_SECTIONS`), or None. The first such job in job order; never ``out_dir`` itself."""
    impl = cfg.impl.name
    if getattr(impl, "value", impl) not in IGNORED_SECTIONS:  # the implementation reads every section
        return None
    mine = _measured_part(_point_yaml(cfg))
    out_dir = Path(out_dir).resolve()
    if not out_dir.parent.is_dir():
        return None
    for sibling in sorted((p for p in out_dir.parent.iterdir() if p.is_dir() and p != out_dir),
                          key=lambda p: _job_order(Path(p.name))):
        results, point_file = sibling / RESULTS_FILE, sibling / POINT_FILE
        if not (results.exists() and point_file.exists()):
            continue
        try:
            theirs = _measured_part(point_file.read_text())
        except Exception:  # not a point file of ours (unreadable or not YAML): no twin, this job measures
            continue
        if theirs == mine:
            return sibling
    return None


def _differing_keys(old: str | None, new: str) -> str:
    if old is None:
        return f"unknown: no {POINT_FILE}"

    def flat(node, prefix=""):
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: node}

    a = flat(OmegaConf.to_container(OmegaConf.create(old)))
    b = flat(OmegaConf.to_container(OmegaConf.create(new)))
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:6]) + (" ..." if len(keys) > 6 else "")


def write_rows(rows: list[dict], path: str | Path) -> Path:
    """Write ``rows`` to ``path`` atomically (temp file + rename): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            pd.DataFrame(rows).to_csv(f, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _job_order(path: Path) -> tuple:
    """Sort key of a job directory: numbered parts by number (2 before 10), others by name."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts)


def collect(root: str | Path) -> pd.DataFrame:
    """All job results under ``root`` (a run or sweep directory) as one table, sorted by job."""
    root = Path(root)
    files = sorted(root.rglob(RESULTS_FILE), key=lambda p: _job_order(p.parent.relative_to(root)))
    if not files:
        raise FileNotFoundError(f"no {RESULTS_FILE} under {root}: did any job finish?")
    frames = []
    for f in files:
        df = pd.read_csv(f)
        df.insert(0, "job_dir", str(f.parent.relative_to(root)))
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def aggregate(root: str | Path) -> pd.DataFrame:
    """Collect ``root`` into ``root/results_all.csv`` and return the table."""
    df = collect(root)
    write_rows(df.to_dict("records"), Path(root) / AGGREGATE_FILE)
    return df


def record_failure(out_dir: str | Path, exc: BaseException) -> Path:
    """Write a failed job's error and traceback to ``out_dir/failed.txt``; the first line is the error."""
    import traceback

    path = Path(out_dir) / FAILED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{type(exc).__name__}: {exc}\n\n" + "".join(traceback.format_exception(exc)))
    return path


def clear_failure(out_dir: str | Path) -> None:
    """Forget an earlier failure of the job in ``out_dir`` (it is being run again)."""
    (Path(out_dir) / FAILED_FILE).unlink(missing_ok=True)


def failures(root: str | Path, since: float = 0.0) -> list[tuple[str, str]]:
    """(job directory relative to ``root``, error line) of every job under ``root`` that failed at or
    after time ``since`` (seconds since the epoch), in job order."""
    root = Path(root)
    found = [p for p in root.rglob(FAILED_FILE) if p.stat().st_mtime >= since]
    found.sort(key=lambda p: _job_order(p.parent.relative_to(root)))
    return [(str(p.parent.relative_to(root)), p.read_text().split("\n", 1)[0]) for p in found]
