"""Result storage: each job writes its tidy rows atomically; aggregation only reads.

A results file is a CSV with one row per (measured point, metric). Columns: the config values that
define the point, ``metric``, ``unit``, ``median``, ``q1``, ``q3``, ``iqr``, ``n``, then environment.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

__all__ = ["RESULTS_FILE", "AGGREGATE_FILE", "write_rows", "collect", "aggregate"]

RESULTS_FILE = "results.csv"
AGGREGATE_FILE = "results_all.csv"


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


def collect(root: str | Path) -> pd.DataFrame:
    """All job results under ``root`` (a run or sweep directory) as one table, sorted by job."""
    root = Path(root)
    files = sorted(p for p in root.rglob(RESULTS_FILE))
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
