"""Result storage: each job claims its directory, writes its tidy rows atomically; aggregation only reads.

A results file is a CSV with one row per (measured point, metric). Columns: the config values that
define the point, ``metric``, ``unit``, ``median``, ``q1``, ``q3``, ``iqr``, ``n``, then environment.
A run or sweep aggregates the results of its own jobs only (:func:`aggregate`), whatever else lies
under its directory.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import io
import math
import os
import secrets
import socket
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

__all__ = ["RESULTS_FILE", "AGGREGATE_FILE", "POINT_FILE", "TWIN_FILE", "RUN_FILE", "FAILED_FILE", "LOCK_FILE",
           "IGNORED_SECTIONS", "PointRefused", "write_rows", "claim_point", "measured_twin", "record_twin", "mark_run",
           "refused_jobs", "collect", "aggregate", "record_failure", "clear_failure", "failures", "begin_sweep",
           "end_sweep", "sweep_jobs", "run_id", "refusal_file", "new_run_dir"]

RESULTS_FILE = "results.csv"
AGGREGATE_FILE = "results_all.csv"
POINT_FILE = "point.yaml"  # the resolved config of the point whose results sit beside it
# a sweep's job not measured again (its implementation reads no setting it differs in from a sibling's
# finished point: measured_twin): it names that sibling, beside the job's own point.yaml
TWIN_FILE = "twin.txt"
# the run (run_id: a sweep's name) that last measured the point of its directory or found it finished
# there: a sweep takes a twin only from the job directories it has finished itself (mark_run)
RUN_FILE = "run.txt"
FAILED_FILE = "failed.txt"  # a job that raised: its error and traceback (in a sweep, the others go on)
# locked (flock) by the process that claimed the point of its directory, while it measures it (until it
# exits if the job failed there); the lock, not the file, is the claim, so the file stays
LOCK_FILE = "point.lock"
# config keys that say where results go or whether to redo them, not what is measured
_NOT_THE_POINT = ("redo", "figures_dir", "results_root", "scale")
# config sections a timed point's measurement never reads, by implementation: nn.EmbeddingBag has no
# TT cores, so a sweep over tt.* (Figure 11's ranks) times it once per point of the other keys
IGNORED_SECTIONS = {"dense": ("tt",)}
# set by benches.callbacks for a sweep's jobs (which may run in other processes: they inherit it):
# the sweep's name on its refusal records, and its number of jobs (directories 0 .. N-1)
_RUN_ENV, _JOBS_ENV = "TTREC_RUN", "TTREC_SWEEP_JOBS"
_THIS_PROCESS = f"{socket.gethostname()}-{os.getpid()}-{int(dt.datetime.now().timestamp())}"


class PointRefused(ValueError):
    """A job's directory is taken: it holds results of a different point, or another process holds
    it (measuring its point, or failed on it and still running). Nothing of that point is changed;
    the refused job's error goes to :func:`refusal_file`, not ``failed.txt`` (which would say that
    the job of that directory failed)."""


def run_id() -> str:
    """The name of this run (a sweep's, in each of its jobs): host, process id, start time."""
    return os.environ.get(_RUN_ENV) or _THIS_PROCESS


def refusal_file(out_dir: str | Path) -> Path:
    """Where this run records that it refused ``out_dir`` (see :class:`PointRefused`)."""
    return Path(out_dir) / f"refused-{run_id()}.txt"


def begin_sweep(jobs: int | None) -> None:
    """Name this process's sweep for its jobs, and give its number of jobs (None: unknown, or job
    directories not named by job number): :func:`sweep_jobs` then lists its job directories."""
    os.environ[_RUN_ENV] = _THIS_PROCESS
    if jobs is None:
        os.environ.pop(_JOBS_ENV, None)
    else:
        os.environ[_JOBS_ENV] = str(jobs)


def end_sweep() -> None:
    os.environ.pop(_RUN_ENV, None)
    os.environ.pop(_JOBS_ENV, None)


def sweep_jobs() -> list[str] | None:
    """The job directories (relative to the sweep directory) of the sweep this process runs or runs
    a job of, or None (no sweep, or its jobs are not known)."""
    jobs = os.environ.get(_JOBS_ENV)
    return None if jobs is None else [str(k) for k in range(int(jobs))]


def _point_yaml(cfg: DictConfig) -> str:
    point = OmegaConf.to_container(cfg, resolve=True)
    for key in _NOT_THE_POINT:
        point.pop(key, None)
    point.pop("hydra", None)
    return OmegaConf.to_yaml(OmegaConf.create(point), sort_keys=True)


_claims: dict[Path, int] = {}  # directory -> open lock file: the points this process has claimed
_failed: set[Path] = set()  # claimed directories whose job failed: held until the process exits


def _lock(out_dir: Path) -> bool:
    """Take ``out_dir``'s lock (never waiting); False if another process holds it."""
    fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    except OSError as exc:
        os.close(fd)
        raise OSError(f"{out_dir / LOCK_FILE}: cannot lock it ({exc}); a job claims its point with a file lock "
                      f"(flock), so the results directory must be on a file system that has them "
                      f"(results_root=... / hydra.run.dir=... / hydra.sweep.dir=...)") from exc
    os.ftruncate(fd, 0)  # who holds it, for the other processes' error messages
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()} since {dt.datetime.now():%Y-%m-%d %H:%M:%S}\n"
             .encode())
    _claims[out_dir] = fd
    return True


def _unlock(out_dir: Path) -> None:
    _failed.discard(out_dir)
    if (fd := _claims.pop(out_dir, None)) is not None:
        os.close(fd)  # closing the file releases the lock


def _held_by_another(out_dir: Path) -> bool:
    if out_dir in _claims or not (out_dir / LOCK_FILE).exists():
        return False
    fd = os.open(out_dir / LOCK_FILE, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # no file locks here: the claim says so
        return False
    finally:
        os.close(fd)  # and with it the lock, if taken


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def claim_point(out_dir: str | Path, cfg: DictConfig, redo: bool = False) -> bool:
    """Decide whether a job measures its point in ``out_dir``; True means go ahead.

    A directory that already holds results of the same point (same resolved config, by
    ``point.yaml``) is finished: False, unless ``redo``. A directory holding results of a different
    point is an error (a sweep changed under a fixed directory), unless ``redo``. With ``redo``, the
    old results and point files are kept, renamed with their modification time: never overwritten.

    The claim is exclusive: this process locks ``point.lock`` in ``out_dir`` and holds it while it
    measures there (until its next claim; until it exits if the job failed, so that no other run
    clears the failure before this one reports it). While another process holds it, a finished
    point of the same config is still skipped (False); anything else is refused (PointRefused): the
    same point is not measured twice at once, and a different point never replaces one.

    A directory marked as a twin (:func:`record_twin`) holds its point as surely as one with results:
    a different point is refused there too. The same point is measured there (the mark removed) when
    this run reaches it, since the run found no sibling that measured it (else it would not ask).
    """
    out_dir = Path(out_dir).resolve()
    results, point_file, point = out_dir / RESULTS_FILE, out_dir / POINT_FILE, _point_yaml(cfg)
    twin = out_dir / TWIN_FILE
    if not _lock_point(out_dir):
        old = _read(point_file)
        if results.exists() and old == point and not redo:
            return False
        holder = (_read(out_dir / LOCK_FILE) or "").strip() or "another process"
        if old == point:
            raise PointRefused(
                f"{out_dir}: this point is claimed by {holder}, which is measuring it (or failed on it) and has "
                f"not ended; it is not measured twice at once. Run again when that process has ended (a finished "
                f"point is skipped), or choose another directory (hydra.sweep.dir=... / hydra.run.dir=... / "
                f"results_root=...)")
        raise PointRefused(
            f"{out_dir} is claimed by {holder} for a different point (differs in: {_differing_keys(old, point)}); "
            f"nothing was overwritten. Choose another directory (hydra.sweep.dir=... / hydra.run.dir=... / "
            f"results_root=...)")
    try:
        if results.exists() or twin.exists():
            old = _read(point_file)
            if not redo and old != point:
                raise PointRefused(_taken_message(out_dir, old, point, twin.exists() and not results.exists()))
            if not redo and results.exists():
                _unlock(out_dir)
                return False
            if results.exists():
                stamp = dt.datetime.fromtimestamp(results.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
                results.rename(out_dir / f"results.replaced-{stamp}.csv")
                if point_file.exists():
                    point_file.rename(out_dir / f"point.replaced-{stamp}.yaml")
            twin.unlink(missing_ok=True)  # a twin's mark: no results of its own to keep
        point_file.write_text(point)
    except BaseException:
        _unlock(out_dir)
        raise
    return True


def _lock_point(out_dir: Path) -> bool:
    """Release this process's ended claims, then take ``out_dir``'s lock (False: another process holds it)."""
    for held in [d for d in _claims if d not in _failed or d == out_dir]:
        _unlock(held)  # those jobs have ended
    out_dir.mkdir(parents=True, exist_ok=True)
    return _lock(out_dir)


def _taken_message(out_dir: Path, old: str | None, point: str, twin: bool) -> str:
    what = (f"is marked as a twin of another job's point ({_read(out_dir / TWIN_FILE).strip()}: not measured "
            f"again there)" if twin else "already holds results") + " of a different point"
    redo = "its mark is replaced: it holds no results" if twin else "the old files are kept, renamed"
    return (f"{out_dir} {what} (differs in: {_differing_keys(old, point)}); nothing was overwritten. Pass "
            f"redo=true to measure this point there ({redo}), or choose another "
            f"directory (hydra.sweep.dir=... / hydra.run.dir=... / results_root=...)")


def mark_run(out_dir: str | Path) -> None:
    """Record that this run finished the job of ``out_dir`` (measured its point, or found it measured)."""
    (Path(out_dir) / RUN_FILE).write_text(f"{run_id()}\n")


def record_twin(out_dir: str | Path, cfg: DictConfig, twin: Path) -> None:
    """Mark ``out_dir`` as the job of ``cfg``'s point that was not measured again, its sibling ``twin``
    having measured it (:func:`measured_twin`): its ``point.yaml`` and ``twin.txt``. So a later run of
    a different point is refused there (:func:`claim_point`) as at a directory with results, instead
    of measuring into the sweep's directory. Refused (PointRefused) if the directory holds another
    point's results or twin mark, or another process holds it."""
    out_dir = Path(out_dir).resolve()
    point, point_file = _point_yaml(cfg), out_dir / POINT_FILE
    if not _lock_point(out_dir):
        holder = (_read(out_dir / LOCK_FILE) or "").strip() or "another process"
        raise PointRefused(f"{out_dir} is claimed by {holder}, which has not ended; choose another directory "
                           f"(hydra.sweep.dir=... / hydra.run.dir=... / results_root=...)")
    try:
        old = _read(point_file)
        if ((out_dir / RESULTS_FILE).exists() or (out_dir / TWIN_FILE).exists()) and old != point:
            raise PointRefused(_taken_message(out_dir, old, point, not (out_dir / RESULTS_FILE).exists()))
        point_file.write_text(point)
        (out_dir / TWIN_FILE).write_text(f"{twin}\n")
    finally:
        _unlock(out_dir)


def refused_jobs(root: str | Path, jobs: Iterable[str] | None = None) -> list[str]:
    """The job directories of ``jobs`` (relative to ``root``; None: every one under ``root``) that this
    run refused (:class:`PointRefused`), in job order."""
    root = Path(root)
    return [str(p.parent.relative_to(root)) for p in _job_files(root, jobs, refusal_file(".").name)]


def _measured_part(point_yaml: str) -> dict:
    """A point (a point.yaml's text) without the sections its implementation never reads."""
    point = OmegaConf.to_container(OmegaConf.create(point_yaml))
    for key in IGNORED_SECTIONS.get((point.get("impl") or {}).get("name"), ()):
        point.pop(key, None)
    return point


def measured_twin(out_dir: str | Path, cfg: DictConfig) -> Path | None:
    """Another job directory of ``out_dir``'s sweep (a sibling) holding finished results of a point
    that differs from ``cfg``'s only in sections its implementation never reads
    (:data:`IGNORED_SECTIONS`), or None. The first such job in job order; never ``out_dir`` itself.
    Only this sweep's job directories (:func:`sweep_jobs`, when known) count, and of them only those
    whose job this run has finished (:func:`mark_run`: measured, or found measured), less those it
    refused: a job not yet run may hold an earlier run's results of this point and be refused for its
    own (later in a sequential sweep, at the same time under a parallel launcher), and the sweep
    aggregates only its finished jobs."""
    impl = cfg.impl.name
    if getattr(impl, "value", impl) not in IGNORED_SECTIONS:  # the implementation reads every section
        return None
    mine = _measured_part(_point_yaml(cfg))
    out_dir = Path(out_dir).resolve()
    if not out_dir.parent.is_dir():
        return None
    jobs = sweep_jobs()
    for sibling in sorted((p for p in out_dir.parent.iterdir() if p.is_dir() and p != out_dir),
                          key=lambda p: _job_order(Path(p.name))):
        results, point_file = sibling / RESULTS_FILE, sibling / POINT_FILE
        if not (results.exists() and point_file.exists()) or (jobs is not None and sibling.name not in jobs):
            continue
        if (_read(sibling / RUN_FILE) or "").strip() != run_id():
            continue  # not (yet) finished by this run
        if refusal_file(sibling).exists():
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


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _table(rows: list[dict]) -> pd.DataFrame:
    """``rows`` as a table; a column of integers some rows lack is Int64 (not float: 4, not 4.0)."""
    df = pd.DataFrame(rows)
    for col in df.columns[df.dtypes == float]:
        values = [r.get(col) for r in rows]
        given = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if given and all(_is_int(v) for v in given):
            df[col] = pd.array(values, dtype="Int64")
    return df


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new file beside ``path`` for writing, with the permissions of any new file (the umask's):
    tempfile.mkstemp's are 0600, and the rename would leave the results unreadable to other users."""
    while True:
        tmp = path.parent / f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:
            continue


def write_rows(rows: list[dict] | pd.DataFrame, path: str | Path) -> Path:
    """Write ``rows`` (dicts, or a table) to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    df = rows if isinstance(rows, pd.DataFrame) else _table(rows)
    if len(df.columns) == 0:  # the file would hold no header: unreadable, and collect() would fail on it
        raise ValueError(f"rows: got {len(df)} rows without a column for {path}; a results file needs at least "
                         f"one row with its columns")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            df.to_csv(f, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _job_order(path: Path) -> tuple:
    """Sort key of a job directory: numbered parts by number (2 before 10), others by name."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts)


def _job_files(root: Path, jobs: Iterable[str] | None, name: str) -> list[Path]:
    """The files called ``name`` of the job directories ``jobs`` (relative to ``root``; None: every
    directory under ``root``), in job order."""
    found = root.rglob(name) if jobs is None else (p for j in jobs if (p := root / j / name).is_file())
    return sorted(found, key=lambda p: _job_order(p.parent.relative_to(root)))


def _read_results(path: Path) -> tuple[pd.DataFrame, set[str]]:
    """A results file, and its columns written as integers (some cells may be empty)."""
    text = path.read_text()
    df = pd.read_csv(io.StringIO(text))
    typed = pd.read_csv(io.StringIO(text), dtype_backend="numpy_nullable")  # tells 4 from 4.0 (numpy: both floats)
    ints = {c for c in typed.columns if isinstance(typed[c].dtype, pd.Int64Dtype) and typed[c].notna().any()}
    return df.assign(**{c: typed[c] for c in ints}), ints


def _results_of(root: Path, jobs: Iterable[str] | None) -> list[Path]:
    """The results files of the jobs ``jobs``, in job order, less those of directories this run
    refused (:class:`PointRefused`): they hold another point's results."""
    return [f for f in _job_files(root, jobs, RESULTS_FILE) if not refusal_file(f.parent).exists()]


def collect(root: str | Path, jobs: Iterable[str] | None = None) -> pd.DataFrame:
    """The results of the jobs ``jobs`` (their directories relative to ``root``, a run or sweep
    directory; None: every results file under ``root``) as one table, sorted by job, with their
    directory in ``job_dir``. A column written as integers in every file that has a value for it
    stays integer (Int64: rows without a value, such as nn.EmbeddingBag's TT rank, are empty)."""
    return _concat(Path(root), _results_of(Path(root), jobs))


def _concat(root: Path, files: list[Path]) -> pd.DataFrame:
    if not files:
        raise FileNotFoundError(f"no {RESULTS_FILE} of the run's jobs in {root}: did any job finish?")
    tables = [(f, *_read_results(f)) for f in files]
    ints = set().union(*(written for _, _, written in tables))
    for _, df, written in tables:  # written otherwise somewhere (4.0, or text): not an integer column
        ints -= {c for c in df.columns if c not in written and df[c].notna().any()}
    frames = []
    for f, df, _ in tables:
        df = df.astype({c: "Int64" for c in ints if c in df.columns})
        df.insert(0, "job_dir", str(f.parent.relative_to(root)))
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def aggregate(root: str | Path, jobs: Iterable[str] | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """Collect the jobs ``jobs`` of ``root`` (see :func:`collect`) into ``root/results_all.csv``;
    return the table and the results files under ``root`` left out (not of these jobs)."""
    root = Path(root)
    mine = _results_of(root, jobs)
    others = sorted(set(_job_files(root, None, RESULTS_FILE)) - set(mine))
    df = _concat(root, mine)
    write_rows(df, root / AGGREGATE_FILE)
    return df, others


def record_failure(out_dir: str | Path, exc: BaseException) -> Path:
    """Write a failed job's error and traceback to ``out_dir/failed.txt``; the first line is the error.
    A job refused its directory (:class:`PointRefused`: taken by another point or process) writes
    them to :func:`refusal_file` instead: ``failed.txt`` would say that the job there failed."""
    import traceback

    out_dir = Path(out_dir).resolve()
    if isinstance(exc, PointRefused):
        path = refusal_file(out_dir)
    else:
        path = out_dir / FAILED_FILE
        if out_dir in _claims:
            _failed.add(out_dir)  # keep the claim: no other run clears this failure before this one reports it
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{type(exc).__name__}: {exc}\n\n" + "".join(traceback.format_exception(exc)))
    return path


def clear_failure(out_dir: str | Path) -> None:
    """Forget an earlier failure of the job in ``out_dir`` (it is being run again), unless another
    process still holds the directory: that failure is its to report."""
    out_dir = Path(out_dir).resolve()
    if not _held_by_another(out_dir):
        (out_dir / FAILED_FILE).unlink(missing_ok=True)


def failures(root: str | Path, since: float = 0.0, jobs: Iterable[str] | None = None) -> list[tuple[str, str, Path]]:
    """(job directory relative to ``root``, error line, error file) of every job of ``jobs`` (None:
    every job directory under ``root``) that failed at or after time ``since`` (seconds since the
    epoch), or that this run refused its directory, in job order."""
    root = Path(root)
    found = [p for p in _job_files(root, jobs, FAILED_FILE) if p.stat().st_mtime >= since]
    found += [p for p in _job_files(root, jobs, refusal_file(".").name) if p.stat().st_mtime >= since]
    found.sort(key=lambda p: _job_order(p.parent.relative_to(root)))
    return [(str(p.parent.relative_to(root)), p.read_text().split("\n", 1)[0], p) for p in found]


def new_run_dir(parent: Path) -> Path:
    """A directory of its own under ``parent`` for one run (made here, with its parents): named by the
    local time to the microsecond (``20261207-122210-734935``), with ``-2``, ``-3`` ... when another run
    made that name first. Runs started in the same second had shared one directory, the later one's
    files replacing the earlier one's."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        path = parent / (stamp if k == 1 else f"{stamp}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: no free directory name for {stamp} after 999 tries")
