"""Committed baselines of the gate, one JSON file per machine class.

A machine class is what makes normalised times comparable: CPU model, vector ISA, CPU family and
model (the microarchitecture: VMs name Zen 2, Zen 3 and AVX-512 EPYCs all "AMD EPYC"), logical CPU count, torch
version, the gate's thread count and scale, and the GPU name when CUDA is used. Its slug names the
file: ``benches/gate/baselines/<slug>.json``. A file holds, per benchmark, the normalised median
(see :mod:`benches.gate.decision`) with the calibration it was normalised by, and the environment
of the run that produced it.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from pathlib import Path

__all__ = ["DEFAULT_DIR", "machine_class", "slug", "path_for", "load", "merged", "save", "pooled"]

DEFAULT_DIR = Path(__file__).resolve().parent / "baselines"
FORMAT = 1
UNKNOWN_FAMILY_MODEL = "unknown"


def machine_class(env: dict, threads: int, scale: str, cuda: bool) -> dict:
    """The fields that key a baseline (from :func:`benches.environment.capture`)."""
    cls = {"cpu_model": env["cpu_model"], "cpu_isa": env["cpu_isa"], "cpu_family_model": env["cpu_family_model"],
           "cpu_count": env["cpu_count"], "torch": env["torch"], "threads": str(threads), "scale": scale}
    if cuda:
        cls["gpu_name"] = env["gpu_name"]
    return cls


def slug(cls: dict) -> str:
    fm = re.fullmatch(r"family (\d+) model (\d+)", cls["cpu_family_model"])
    parts = [cls["cpu_model"], cls["cpu_isa"], f"f{fm[1]}m{fm[2]}" if fm else cls["cpu_family_model"],
             f"{cls['cpu_count']}cpu", f"torch{cls['torch']}", f"{cls['threads']}t"]
    if "gpu_name" in cls:
        parts.append(cls["gpu_name"])
    if cls["scale"] != "default":
        parts.append(cls["scale"])
    return "-".join(re.sub(r"[^a-z0-9.]+", "_", p.lower()).strip("_") for p in parts)


def path_for(cls: dict, directory: Path = DEFAULT_DIR) -> Path:
    return Path(directory) / f"{slug(cls)}.json"


def _stored_path(cls: dict, directory: Path) -> tuple[Path, dict]:
    """This class's baseline file and the class it must hold; failing that, a baseline of the same
    class recorded before the microarchitecture was part of it (``cpu_family_model`` "unknown"),
    when one exists."""
    path = path_for(cls, directory)
    if not path.exists():
        legacy = {**cls, "cpu_family_model": UNKNOWN_FAMILY_MODEL}
        if (legacy_path := path_for(legacy, directory)).exists():
            return legacy_path, legacy
    return path, cls


def load(cls: dict, calibration: str, directory: Path = DEFAULT_DIR) -> tuple[dict[str, float] | None, str]:
    """Normalised medians by benchmark name, or None, and a message saying what was found."""
    path, cls = _stored_path(cls, directory)
    if not path.exists():
        known = sorted(p.name for p in Path(directory).glob("*.json")) if Path(directory).is_dir() else []
        return None, (f"no baseline for this machine class ({slug(cls)}): {path} does not exist "
                      f"(baselines present: {known or 'none'}). Record one on this machine with "
                      "`nox -s gate -- --update-baseline` and commit it.")
    data = _read(path, cls)
    values, stale = {}, []
    for name, entry in data["benchmarks"].items():
        (values.__setitem__(name, entry["normalised_median"]) if entry.get("calibration") == calibration
         else stale.append(name))
    if stale:  # not comparable: were they dropped, those points would pass ungated, the build green
        theirs = sorted({str(data["benchmarks"][n].get("calibration")) for n in stale})
        raise ValueError(f"{path}: {stale} were normalised by another calibration ({theirs}; this gate's: "
                         f"{calibration!r}); record them again with `nox -s gate -- --update-baseline`")
    msg = f"baseline {path}"
    if cls["cpu_family_model"] == UNKNOWN_FAMILY_MODEL:
        msg += (" - recorded before the CPU family and model were part of the machine class, so possibly on another "
                "microarchitecture of this ISA; record this machine's with `nox -s gate -- --update-baseline`")
    return values, msg


def _read(path: Path, cls: dict) -> dict:
    """A stored baseline file, checked: JSON of this format and machine class, every entry a
    normalised median > 0. Anything else is a ValueError naming the file (never a silent "no baseline")."""
    fix = "; refresh it with `nox -s gate -- --update-baseline`"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable baseline ({exc}){fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), dict):
        raise ValueError(f"{path}: not a baseline (a JSON object with a 'benchmarks' object expected){fix}")
    if data.get("format") != FORMAT or data.get("machine_class") != cls:
        raise ValueError(f"{path}: format {data.get('format')!r} / machine class {data.get('machine_class')!r} do not "
                         f"match this run's ({FORMAT}, {cls}){fix}")
    for name, entry in data["benchmarks"].items():
        v = entry.get("normalised_median") if isinstance(entry, dict) else entry
        if not isinstance(entry, dict) or not _positive_number(v):
            raise ValueError(f"{path}: benchmarks.{name}.normalised_median: got {v!r}; must be a finite number > 0"
                             + fix.replace(";", " (") + ")")
        runs = entry.get("runs", [])  # pooled by --add-to-baseline: junk there was a traceback after measuring
        if not isinstance(runs, list) or not all(_positive_number(x) for x in runs):
            raise ValueError(f"{path}: benchmarks.{name}.runs: got {runs!r}; must be a list of finite numbers > 0 "
                             "(the normalised medians of the recorded runs)" + fix)
    return data


def _positive_number(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def merged(cls: dict, entries: dict[str, dict], directory: Path = DEFAULT_DIR) -> tuple[dict[str, dict], list[str]]:
    """``entries`` over the stored baseline's other benchmarks (a recording of some points keeps
    the others' baselines), and the names kept from the stored file."""
    path = path_for(cls, directory)
    stored = _read(path, cls)["benchmarks"] if path.exists() else {}
    kept = sorted(set(stored) - set(entries))
    return {**{n: stored[n] for n in kept}, **entries}, kept


def save(cls: dict, entries: dict[str, dict], env: dict, directory: Path = DEFAULT_DIR) -> Path:
    """Write the baseline atomically (temp file + rename)."""
    path = path_for(cls, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "machine_class": cls, "benchmarks": entries, "environment": env},
                              indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def pooled(cls: dict, new: dict[str, list[float]], calibration: str,
           directory: Path = DEFAULT_DIR) -> dict[str, dict]:
    """Entries whose runs are the stored baseline's runs (same machine class and calibration) plus
    ``new``, each with the median of them all. A baseline pooled over recordings made hours apart
    covers the machine's slow drift (the calibration cancels most of it, not all), where one
    recording fixes whatever state the machine was in then. Benchmarks absent from the stored file
    start from their new runs."""
    path = path_for(cls, directory)
    stored = _read(path, cls)["benchmarks"] if path.exists() else {}
    out = {}
    for name, runs in new.items():
        old = stored.get(name, {})
        prior = list(old.get("runs", [])) if old.get("calibration") == calibration else []
        everything = prior + list(runs)
        out[name] = {"normalised_median": statistics.median(everything), "runs": everything,
                     "calibration": calibration}
    return out
