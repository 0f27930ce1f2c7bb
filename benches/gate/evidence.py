"""Evidence for the gate: run it again and again, unchanged and with planted slowdowns, and
summarise how often it fails.

    python -m benches.gate.evidence --runs 20 --plant 1.0,1.25,1.5 --out benches/gate/report [-- gate arguments]

Each iteration runs the full gate (``python -m benches.gate``, confirmation re-runs included) once
per plant factor, in that order, so every factor sees the same stretch of machine conditions.
Writes ``runs.csv`` (one row per gate run and benchmark) and ``summary.md`` into ``--out``; the
gate's own artifacts go to ``--artifacts`` (default ``outputs/gate-evidence/<time>``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..results import new_run_dir
from .run import ROOT

GATED = "tt_cpu_train_fused_sgd"  # the metric whose detection rate the evidence reports


def _factors(text: str) -> list[float]:
    """The plant factors of ``--plant``: distinct finite numbers >= 1 (what TTREC_PLANT_SLOWDOWN accepts;
    a repeated factor's runs would share one artifact directory and be counted twice in its row)."""
    try:
        fs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--plant: got {text!r}; expected comma-separated numbers >= 1") from None
    if not fs or any(not (math.isfinite(f) and f >= 1) for f in fs):
        raise argparse.ArgumentTypeError(f"--plant: got {text!r}; every factor must be a finite number >= 1")
    if len(set(fs)) != len(fs):
        raise argparse.ArgumentTypeError(f"--plant: got {text!r}; every factor at most once")
    return fs


def run_gate(factor: float, out: Path, gate_args: list[str]) -> dict:
    """One full gate run with plant ``factor`` writing into ``out``: its exit code, wall seconds and
    artifact (empty when this run wrote none)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("TTREC_PLANT_SLOWDOWN", None)
    if factor != 1.0:
        env["TTREC_PLANT_SLOWDOWN"] = repr(factor)
    (out / "gate.json").unlink(missing_ok=True)  # (a reused --artifacts: never read an earlier session's verdicts)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "benches.gate", "--out", str(out), *gate_args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / "gate.log").parent.mkdir(parents=True, exist_ok=True)
    (out / "gate.log").write_text(done.stdout + done.stderr)
    artifact = json.loads((out / "gate.json").read_text()) if (out / "gate.json").exists() else {}
    return {"exit_code": done.returncode, "wall_s": wall, "artifact": artifact}


def _raw_medians(artifact: dict) -> dict[str, float]:
    run0 = artifact.get("runs", {}).get("run0", {"benchmarks": []})
    return {b["extra_info"]["gate_point"]: statistics.median(b["extra_info"]["round_seconds"])
            for b in run0["benchmarks"]}


def rows_of(iteration: int, factor: float, result: dict) -> list[dict]:
    a = result["artifact"]
    raw = _raw_medians(a)
    base = {"iteration": iteration, "plant": factor, "exit_code": result["exit_code"],
            "wall_s": round(result["wall_s"], 1), "loadavg_before": " ".join(map(str, a.get("loadavg_before", []))),
            "loadavg_after": " ".join(map(str, a.get("loadavg_after", [])))}
    verdicts = a.get("decision", {}).get("verdicts", [])
    if not verdicts:
        return [{**base, "metric": None}]
    return [{**base, "metric": v["metric"], "threshold": v["threshold"], "ratio": v["ratio"],
             "confirmation_ratio": v["confirmation_ratio"],
             "verdict": v["verdict"], "raw_median_ms": round(raw.get(v["metric"], float("nan")) * 1e3, 4)}
            for v in verdicts]


def _threshold(row: dict, default: str) -> float:
    return float(row.get("threshold") or default)


def summary(rows: list[dict], factors: list[float], env: dict, threshold: str, started: str, note: str = "") -> str:
    lines = ["# Gate evidence", "", *([note, ""] if note else []),
             f"Machine: {env.get('cpu_model')} ({env.get('cpu_count')} logical CPUs), torch {env.get('torch')}, "
             f"gate threads {env.get('threads')}, commit {env.get('git_sha', '?')[:10]}"
             f"{' (dirty)' if env.get('git_dirty') == 'True' else ''}; started {started} UTC. Load averages (2 cores) "
             "are in the table; what else ran on the machine is in the note above.", "",
             f"Threshold {threshold} (per-point thresholds in the second table); every run is the full gate (a failing benchmark is re-measured once and fails "
             "only if confirmed). Plant f: every native CPU kernel call takes f times its CPU time "
             "(TTREC_PLANT_SLOWDOWN=f); 'raw slowdown' is how much slower the step really got: the median over "
             "runs of its median CPU time per call, over the unplanted runs' (the Python and torch work around "
             "the native calls is not slowed).", "",
             f"| plant f | gate runs | gate failed (exit 1) | {GATED} caught | first-pass {GATED} > threshold | "
             f"median ratio {GATED} | raw slowdown of {GATED} | other metrics confirmed | wall time s (median / max) | "
             "load avg (1 min) min-max |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    unplanted = [r["raw_median_ms"] for r in rows if r["plant"] == 1.0 and r.get("metric") == GATED]
    ref = statistics.median(unplanted) if unplanted else None
    for f in factors:
        rs = [r for r in rows if r["plant"] == f]
        runs = sorted({r["iteration"] for r in rs})
        per_run = {i: [r for r in rs if r["iteration"] == i] for i in runs}
        failed = sum(1 for i in runs if per_run[i][0]["exit_code"] == 1)
        gated = [r for r in rs if r.get("metric") == GATED]
        caught = sum(1 for r in gated if r["verdict"] == "REGRESSION")
        first = sum(1 for r in gated if r["ratio"] is not None and r["ratio"] > _threshold(r, threshold))
        others = sum(1 for r in rs if r.get("metric") not in (GATED, None) and r["verdict"] == "REGRESSION")
        walls = [per_run[i][0]["wall_s"] for i in runs] or [float("nan")]
        loads = [float(r["loadavg_before"].split()[0]) for r in rs if r["loadavg_before"]]
        ratios = [r["ratio"] for r in gated if r["ratio"] is not None]
        ratio = statistics.median(ratios) if ratios else float("nan")
        raw = (statistics.median(r["raw_median_ms"] for r in gated) / ref) if gated and ref else float("nan")
        lines.append(f"| {f:g} | {len(runs)} | {failed} | {caught}/{len(gated)} | {first}/{len(gated)} | {ratio:.3f} | "
                     f"{raw:.2f}x | {others} | {statistics.median(walls):.0f} / {max(walls):.0f} | "
                     f"{min(loads, default=float('nan')):.2f}-{max(loads, default=float('nan')):.2f} |")
    metrics = sorted({r["metric"] for r in rows if r.get("metric")})
    lines += ["", "Per metric: unplanted runs' ratio to the baseline (min / median / max) and first-pass exceedances:", "",
              "| metric | threshold | min | median | max | first pass > threshold | confirmed |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in metrics:
        rs = [r for r in rows if r["plant"] == 1.0 and r.get("metric") == m and r["ratio"] is not None]
        if rs:
            xs = [r["ratio"] for r in rs]
            lines.append(f"| {m} | {_threshold(rs[0], threshold):.2f} | {min(xs):.3f} | {statistics.median(xs):.3f} | {max(xs):.3f} | "
                         f"{sum(r['ratio'] > _threshold(r, threshold) for r in rs)}/{len(xs)} | "
                         f"{sum(r['verdict'] == 'REGRESSION' for r in rs)}/{len(xs)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    gate_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m benches.gate.evidence", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--plant", type=_factors, default=[1.0, 1.25, 1.5])
    p.add_argument("--out", type=Path, default=ROOT / "benches" / "gate" / "report")
    p.add_argument("--artifacts", type=Path, default=None)
    p.add_argument("--note", default="", help="a line for the summary (e.g. what code was measured)")
    p.add_argument("--resummarise", action="store_true",
                   help="only rewrite <out>/summary.md from <out>/runs.csv and --artifacts (no gate runs)")
    args = p.parse_args(argv)
    if args.resummarise:
        return _resummarise(args)
    if args.runs < 1:
        p.error(f"--runs: got {args.runs}; must be >= 1")
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    try:
        artifacts = args.artifacts or new_run_dir(ROOT / "outputs" / "gate-evidence")
    except OSError as exc:
        p.error(f"--artifacts: got {str(ROOT / 'outputs' / 'gate-evidence')!r} (the default), which cannot be created "
                f"({exc}); give --artifacts DIR, a directory this user can create")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    env, threshold = {}, "?"
    for i in range(args.runs):
        for f in args.plant:
            result = run_gate(f, artifacts / f"plant{f:g}_run{i:02d}", gate_args)
            a = result["artifact"]
            env = a.get("environment", env)
            threshold = str(a.get("decision", {}).get("threshold", threshold))
            new = rows_of(i, f, result)
            rows += new
            gated = next((r for r in new if r.get("metric") == GATED), {})
            print(f"[{i + 1}/{args.runs}] plant {f:g}: exit {result['exit_code']}, {GATED} ratio "
                  f"{gated.get('ratio')} {gated.get('verdict')}, {result['wall_s']:.0f} s, load {new[0]['loadavg_before']}",
                  flush=True)
            _write(rows, args, env, threshold, started)
    return 0


def _write(rows, args, env, threshold, started) -> None:
    fields = ["iteration", "plant", "exit_code", "wall_s", "loadavg_before", "loadavg_after", "metric", "threshold", "ratio",
              "confirmation_ratio", "verdict", "raw_median_ms"]
    with open(args.out / "runs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    (args.out / "summary.md").write_text(summary(rows, args.plant, env, threshold, started, args.note))


def _resummarise(args) -> int:
    """Rebuild summary.md from runs.csv (types restored), the environment and threshold of the gate
    artifacts, and the start of the earliest of them (its file time less its wall time)."""
    if args.artifacts is None:
        raise SystemExit("--resummarise needs --artifacts (the gate artifacts of the runs, for the environment)")
    if not (args.out / "runs.csv").is_file():
        raise SystemExit(f"--resummarise: {args.out / 'runs.csv'} does not exist (--out: the directory of runs.csv)")
    artifacts = [(p, json.loads(p.read_text())) for p in sorted(args.artifacts.glob("*/gate.json"))]
    decided = [(p, a) for p, a in artifacts if "threshold" in a.get("decision", {}) and "environment" in a]
    if not decided:
        raise SystemExit(f"--artifacts: got {str(args.artifacts)!r}; no <run>/gate.json of a gate decision in it")
    with open(args.out / "runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["iteration"], r["plant"], r["exit_code"] = int(r["iteration"]), float(r["plant"]), int(r["exit_code"])
        r["wall_s"] = float(r["wall_s"])
        for key in ("threshold", "ratio", "confirmation_ratio", "raw_median_ms"):
            r[key] = float(r[key]) if r.get(key) not in (None, "") else None
        r["metric"] = r["metric"] or None
    env, threshold = decided[0][1]["environment"], str(decided[0][1]["decision"]["threshold"])
    start = min(p.stat().st_mtime - float(a.get("wall_seconds") or 0.0) for p, a in artifacts)
    started = dt.datetime.fromtimestamp(start, dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    factors = sorted({r["plant"] for r in rows}, key=args.plant.index if set(args.plant) >= {r["plant"] for r in rows}
                     else None)
    (args.out / "summary.md").write_text(summary(rows, factors, env, threshold, started, args.note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
