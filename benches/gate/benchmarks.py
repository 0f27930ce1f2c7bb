"""The gate's pytest-benchmark benchmarks (run by :mod:`benches.gate.run`, not by the test suite).

Each point (see :mod:`benches.gate.points`) is built by the bench app (:func:`benches.app.build_point`)
and timed with ``benchmark.pedantic``: a round is ``calls`` back-to-back calls of the point's step
(about ``round_s`` seconds), and before every round (pedantic's untimed ``setup``) one sample of
the calibration kernels lasting about as long, plus one after the last round, so every round sits
between two calibration samples. On the CPU both are timed in CPU seconds of the process
(``--benchmark-timer time.process_time``, set by the runner): time the process spends descheduled
because a neighbour holds the core is not counted. Seconds per call of each round and seconds per
unit of each calibration sample go into the benchmark's ``extra_info``; the decision reads them from
pytest-benchmark's JSON.

Options come from ``$TTREC_GATE_OPTIONS`` (JSON, written by the runner): scale, threads,
budget_s (seconds of rounds and calibration per point), round_s, min_rounds, max_rounds, warmup.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from benches.app import build_point
from benches.gate.calibration import IDENTITY, Calibration, time_call
from benches.gate.points import points

OPTIONS = {"scale": "default", "threads": 1, "budget_s": 1.5, "round_s": 0.01, "min_rounds": 30, "max_rounds": 400,
           "warmup": 3,
           **json.loads(os.environ.get("TTREC_GATE_OPTIONS", "{}"))}
POINTS = points(OPTIONS["scale"], OPTIONS["threads"])


@pytest.mark.parametrize("point", POINTS, ids=[p.name for p in POINTS])
def test_gate(benchmark, point):
    if benchmark.disabled:  # (--benchmark-disable, or pytest-benchmark's own refusal under xdist)
        pytest.fail("pytest-benchmark is disabled in this run, so the gate cannot time its rounds; run the gate "
                    "through `nox -s gate` / `python -m benches.gate` (one pytest process, no xdist)")
    module, batch, step = build_point(point.cfg)
    device = point.device
    cal = Calibration(device)
    for _ in range(OPTIONS["warmup"]):
        time_call(step, device)
    step_seconds = sorted(time_call(step, device) for _ in range(3))[1]
    calls = max(1, round(OPTIONS["round_s"] / step_seconds))  # calls of the step per round
    cal.fit(calls * step_seconds)  # a calibration sample lasts about as long as a round
    rounds = int(min(OPTIONS["max_rounds"], max(OPTIONS["min_rounds"], OPTIONS["budget_s"] / (2 * calls * step_seconds))))

    def round_of_calls():
        for _ in range(calls):
            step()

    calibration: list[float] = []
    device_times: list[float] = []
    target = round_of_calls if device == "cpu" else (lambda: device_times.append(time_call(round_of_calls, device)))
    benchmark.pedantic(target, setup=lambda: calibration.append(cal.sample()), rounds=rounds, iterations=1)
    calibration.append(cal.sample())
    # CPU: pytest-benchmark's own per-round times; GPU: CUDA-event times (its wall clock includes syncs)
    round_seconds = [t / calls for t in (benchmark.stats.stats.data if device == "cpu" else device_times)]
    benchmark.extra_info.update({
        "gate_point": point.name,
        "device": device,
        "threads": torch.get_num_threads(),
        "scale": OPTIONS["scale"],
        "lookups_per_round": int(batch.num_lookups),
        "calibration": IDENTITY,
        "calibration_repeats": cal.repeats,
        "calls_per_round": calls,
        "round_seconds": round_seconds,
        "calibration_seconds": calibration,
        "timer": "process_time" if device == "cpu" else "cuda_event",
    })
