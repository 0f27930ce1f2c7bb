"""The performance-regression gate: run the benchmarks, decide, print the table, write the artifact.

    python -m benches.gate [--update-baseline] [--threshold 1.2] [--threads 1] [--scale default|smoke] ...
    nox -s gate [-- arguments]

Exit status: 0 pass (also when there is no baseline for this machine class: a warning, see
``--require-baseline``), 1 regression, 2 bad arguments, a bad ``TTREC_PLANT_SLOWDOWN`` or an unusable
baseline file (checked before measuring), 3 no baseline with ``--require-baseline``,
4 the benchmarks themselves failed or wrote output the decision cannot use (the artifact keeps the
first pass's verdicts when it was the confirmation run). The artifact (``<out>/gate.json``) holds
pytest-benchmark's own JSON of every run, the decision and the environment.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ttrec.cpu import plant

from ..environment import capture, steady_heap
from ..results import new_run_dir
from . import baselines
from .calibration import IDENTITY
from .decision import (DEFAULT_THRESHOLD, FASTER, NO_BASELINE, Measurement, confirm, confirmation_bar, decide,
                       exit_code, suspects, table)
from .points import SCALES, cuda_present, points

ROOT = Path(__file__).resolve().parents[2]
BENCH_FILE = "benches/gate/benchmarks.py"
EXIT_PASS, EXIT_REGRESSION, EXIT_NO_BASELINE, EXIT_BENCH_FAILED = 0, 1, 3, 4
METHOD = ("normalised median: per round, round time / mean of the calibration samples either side "
          f"({IDENTITY}); median over rounds; ratio = current / baseline; a ratio above the threshold is "
          "re-measured once in a fresh process and fails only if the re-run exceeds the confirmation bar "
          "(halfway from 1 to the threshold)")


class BenchmarksFailed(RuntimeError):
    pass


def _positive_float(minimum: float = 0.0, exclusive: bool = True):
    """An argparse type; argparse names the option ("argument --threshold: got '0.5'; ...")."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}; expected a number") from None
        if not (v > minimum if exclusive else v >= minimum) or not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"got {text!r}; must be a finite number "
                                             f"{'>' if exclusive else '>='} {minimum}")
        return v
    return parse


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: got {text!r}; expected a whole number >= 1") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name}: got {v}; must be >= 1")
        return v
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benches.gate", description=__doc__.split("\n\n")[0])
    record = p.add_mutually_exclusive_group()
    record.add_argument("--update-baseline", action="store_true",
                        help="measure --baseline-runs times and write this machine class's baseline (no decision)")
    record.add_argument("--add-to-baseline", action="store_true",
                        help="like --update-baseline, but pool the new runs with the stored baseline's runs "
                             "(median of all): a baseline that spans hours of the machine's drift")
    p.add_argument("--baseline-runs", type=_positive_int("--baseline-runs"), default=3,
                   help="runs whose per-benchmark median makes a new baseline (default 3)")
    p.add_argument("--threshold", type=_positive_float(1.0), default=DEFAULT_THRESHOLD,
                   help=f"ratio (normalised current / baseline) above which a point is suspect (default "
                        f"{DEFAULT_THRESHOLD}); a point's own higher threshold (README's table) is kept. A suspect "
                        "gated point is measured again and fails only if the re-run's ratio also exceeds the "
                        "confirmation bar, halfway from 1 to its threshold "
                        f"({confirmation_bar(DEFAULT_THRESHOLD):.2f} for {DEFAULT_THRESHOLD}; --no-confirm: it "
                        "fails at once); reference points never fail")
    p.add_argument("--threads", type=_positive_int("--threads"), default=1,
                   help="intra-op threads of every benchmark and calibration (default 1, see README)")
    p.add_argument("--scale", choices=sorted(SCALES), default="default", help="benchmark sizes (smoke: tests)")
    p.add_argument("--points", default=None,
                   help="comma-separated benchmark names (default: all available here but the optional ones)")
    p.add_argument("--budget-s", type=_positive_float(), default=1.5,
                   help="CPU seconds of rounds and calibration per benchmark (default 1.5)")
    p.add_argument("--round-s", type=_positive_float(), default=0.01,
                   help="seconds per round: back-to-back calls of the step (default 0.01)")
    p.add_argument("--min-rounds", type=_positive_int("--min-rounds"), default=30)
    p.add_argument("--max-rounds", type=_positive_int("--max-rounds"), default=400)
    p.add_argument("--no-confirm", action="store_true", help="fail on the first pass (no confirmation re-run)")
    p.add_argument("--require-baseline", action="store_true",
                   help=f"exit {EXIT_NO_BASELINE} (not 0) when this machine class has no baseline")
    p.add_argument("--baseline-dir", type=Path, default=baselines.DEFAULT_DIR)
    p.add_argument("--out", type=Path, default=None, help="artifact directory (default outputs/gate/<time>)")
    return p


def run_benchmarks(json_path: Path, options: dict, names: list[str]) -> dict:
    """One pytest-benchmark run of the named points in a fresh process; its JSON."""
    nodes = [f"{BENCH_FILE}::test_gate[{n}]" for n in names]
    # (xdist off, and none of an xdist worker's variables inherited: pytest-benchmark disables itself
    # under xdist, and the gate must time its rounds alone)
    cmd = [sys.executable, "-m", "pytest", *nodes, "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=",
           "--rootdir", str(ROOT), "--benchmark-json", str(json_path), "--benchmark-disable-gc",
           "--benchmark-timer", "time.process_time",
           "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"]
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env = {**inherited, "TTREC_GATE_OPTIONS": json.dumps(options),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run(cmd, cwd=ROOT, env=env)
    if done.returncode != 0 or not json_path.exists():
        raise BenchmarksFailed(f"the gate's benchmarks failed (pytest exit {done.returncode}); see the output above")
    return json.loads(json_path.read_text())


def measurements(bench_json: dict) -> dict[str, Measurement]:
    """The gate's measurements in one pytest-benchmark JSON, by point name. Output the decision cannot
    use (missing fields, an empty or non-positive time) is :class:`BenchmarksFailed` (exit 4), never a
    traceback (whose exit 1 reads as a regression)."""
    out = {}
    try:
        for b in bench_json["benchmarks"]:
            e = b["extra_info"]
            out[e["gate_point"]] = Measurement(e["gate_point"], tuple(e["round_seconds"]),
                                               tuple(e["calibration_seconds"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchmarksFailed(f"the benchmarks' output cannot be used ({type(exc).__name__}: {exc})") from None
    return out


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    started = time.perf_counter()
    known = points(args.scale, args.threads)
    available = [p.name for p in known]
    if args.points is not None:
        names = [n.strip() for n in args.points.split(",") if n.strip()]
        unknown = [n for n in names if n not in available]
        if unknown or not names:
            parser().error(f"--points: got {unknown or repr(args.points)}; allowed (on this machine, comma-separated, "
                           f"at least one): {available}")
    else:
        names = [p.name for p in known if not p.optional]
    if args.max_rounds < args.min_rounds:
        parser().error(f"--max-rounds: got {args.max_rounds}; must be >= --min-rounds ({args.min_rounds})")
    recording = args.update_baseline or args.add_to_baseline
    try:  # a bad value fails every benchmark (exit 4 after the runs) or, recording, was a traceback (exit 1)
        planted = plant.factor()
    except ValueError as exc:
        parser().error(str(exc))
    if recording and planted != 1.0:
        parser().error(f"{plant.ENV}={os.environ[plant.ENV]} is set: a baseline recorded with a planted slowdown "
                       "would make this machine class's gate that much more lenient; unset it to record")
    own_dir = args.baseline_dir.resolve() != baselines.DEFAULT_DIR.resolve()
    if not recording and not args.baseline_dir.is_dir():  # (a typo'd path read as "no baseline" passed the gate)
        parser().error(f"--baseline-dir: got {str(args.baseline_dir)!r}, which is not a directory; allowed: a "
                       f"directory of baselines (record one into it with `nox -s gate -- --update-baseline "
                       f"--baseline-dir {args.baseline_dir}`)")
    again_with = f" --baseline-dir {args.baseline_dir}" if own_dir else ""  # (the hints below name the user's directory)
    try:  # (a run of its own: runs started in the same second had shared one directory)
        out = args.out or new_run_dir(ROOT / "outputs" / "gate")
    except OSError as exc:
        parser().error(f"--out: got {str(ROOT / 'outputs' / 'gate')!r} (the default), which cannot be created ({exc}); "
                       "give --out DIR, a directory this user can create")
    for flag, directory in (("--out", out), *((("--baseline-dir", args.baseline_dir),) if recording else ())):
        try:  # before any benchmark runs: a directory that cannot be written is a usage error
            directory.mkdir(parents=True, exist_ok=True)
            if not os.access(directory, os.W_OK):
                raise PermissionError("not writable")
        except OSError as exc:
            parser().error(f"{flag}: got {str(directory)!r}, which cannot be created or written ({exc})")
    options = {"scale": args.scale, "threads": args.threads, "budget_s": args.budget_s, "round_s": args.round_s,
               "min_rounds": args.min_rounds, "max_rounds": args.max_rounds}
    torch.set_num_threads(args.threads)
    steady_heap()  # as in the pytest process that times the points (benches.app.build_point): env records it
    env = capture()
    cls = baselines.machine_class(env, args.threads, args.scale, cuda_present())
    artifact = {"method": METHOD, "machine_class": cls, "environment": env, "options": options,
                "plant_slowdown": os.environ.get("TTREC_PLANT_SLOWDOWN"), "loadavg_before": _load(), "runs": {}}
    base, message, first_pass = None, "", []
    try:  # read before measuring: a corrupt or unusable baseline is a usage error (exit 2), never a verdict
        if args.add_to_baseline:
            baselines.merged(cls, {}, args.baseline_dir)  # (checks the stored file that the new runs join)
        elif not recording:
            base, message = baselines.load(cls, IDENTITY, args.baseline_dir)
    except ValueError as exc:
        parser().error(str(exc))
    try:
        runs = args.baseline_runs if recording else 1
        found = []
        for i in range(runs):
            tag = f"run{i}"
            artifact["runs"][tag] = run_benchmarks(out / f"benchmark_{tag}.json", options, names)
            found.append({k: m.summary() for k, m in measurements(artifact["runs"][tag]).items()})
        lost = sorted({n for f in found for n in names if n not in f})
        if lost:
            raise BenchmarksFailed(f"pytest-benchmark wrote no result for {lost} (skipped or deselected?)")
        current = {n: found[0][n] for n in names}
        if recording:
            if args.add_to_baseline:
                entries = baselines.pooled(cls, {n: [f[n] for f in found] for n in names}, IDENTITY, args.baseline_dir)
            else:
                entries = {n: {"normalised_median": statistics.median(f[n] for f in found),
                               "runs": [f[n] for f in found], "calibration": IDENTITY} for n in names}
            try:
                entries, kept = baselines.merged(cls, entries, args.baseline_dir)  # the points not run keep theirs
            except ValueError as exc:  # --update-baseline replaces an unusable file (--add-to-baseline checked it)
                print(f"gate: the stored baseline is replaced, not kept: {exc}")
                kept = []
            path = baselines.save(cls, entries, env, args.baseline_dir)
            print(f"\ngate: wrote baseline {path} ({runs} new runs of {names}; median of the normalised medians):")
            for n, e in entries.items():
                print(f"  {n}: {e['normalised_median']:.4g}  (runs: {', '.join(f'{x:.4g}' for x in e['runs'])})"
                      + ("  [kept: not run now]" if n in kept else ""))
            artifact["decision"] = {"baseline_written": str(path), "entries": entries, "exit_code": EXIT_PASS}
            return _finish(artifact, out, started, EXIT_PASS)

        own = {p.name: p.threshold for p in known if p.threshold is not None and p.threshold > args.threshold}
        verdicts = decide(current, base, args.threshold, own, report_only={p.name for p in known if not p.gated})
        again = [] if args.no_confirm else suspects(verdicts)
        first_pass = [v.as_dict() for v in verdicts]  # kept in the artifact should the re-run fail
        if again:
            print(f"\ngate: {again} above the threshold; measuring them once more to confirm")
            artifact["runs"]["confirmation"] = run_benchmarks(out / "benchmark_confirmation.json", options, again)
            verdicts = confirm(verdicts, {k: m.summary() for k, m in measurements(artifact["runs"]["confirmation"]).items()})
        code = exit_code(verdicts)
        missing = [v.metric for v in verdicts if v.verdict == NO_BASELINE]
        if missing and code == EXIT_PASS and args.require_baseline:
            code = EXIT_NO_BASELINE
        print(f"\n## Performance-regression gate ({slug_line(cls)})\n")
        print(table(verdicts))
        print("(baseline, current: normalised medians, no unit: a round's CPU time per call over the calibration "
              "workload's; ratio = current / baseline)")
        print(f"\n{message}")
        if missing:
            print(f"WARNING: no baseline for {missing}: not gated. " + (
                f"Exit {EXIT_NO_BASELINE} (--require-baseline)." if args.require_baseline else
                f"Record one with `nox -s gate -- --update-baseline{again_with}` and commit it."))
        gated = {p.name for p in known if p.gated}
        if any(v.verdict == FASTER and v.metric in gated for v in verdicts):  # (reference points drift with torch)
            print("Faster than the baseline: if that is the code's doing, refresh the baseline "
                  f"(`nox -s gate -- --add-to-baseline{again_with}`) so that a later slowdown is measured from the new speed.")
        compared = f" ({len(verdicts) - len(missing)} of {len(verdicts)} points compared)" if missing else ""
        print("gate: " + {EXIT_PASS: "PASS", EXIT_REGRESSION: "FAIL (regression)",
                          EXIT_NO_BASELINE: "FAIL (no baseline)"}[code] + compared)
        artifact["decision"] = {"threshold": args.threshold, "baseline": message, "exit_code": code,
                                "verdicts": [v.as_dict() for v in verdicts]}
        return _finish(artifact, out, started, code)
    except BenchmarksFailed as exc:
        print(f"gate: {exc}", file=sys.stderr)
        artifact["decision"] = {"error": str(exc), "exit_code": EXIT_BENCH_FAILED,
                                **({"first_pass_verdicts": first_pass} if first_pass else {})}
        return _finish(artifact, out, started, EXIT_BENCH_FAILED)


def slug_line(cls: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in cls.items())


def _finish(artifact: dict, out: Path, started: float, code: int) -> int:
    artifact["loadavg_after"] = _load()
    artifact["wall_seconds"] = round(time.perf_counter() - started, 1)
    path = out / "gate.json"
    path.write_text(json.dumps(artifact, indent=1) + "\n")
    print(f"gate: artifact {path} (wall time {artifact['wall_seconds']:.0f} s)")
    return code
