"""The performance-regression gate (benches.gate): its decision on synthetic measurements, its
baselines, the planted slowdown (ttrec.cpu.plant), and the whole gate end to end in smoke mode."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ttrec
from benches.gate import baselines, run
from benches.gate.decision import (FASTER, NO_BASELINE, NOT_CONFIRMED, PASS, REGRESSION, SLOWER_NOT_GATED,
                                   Measurement, confirm,
                                   confirmation_bar, decide, exit_code, table)
from ttrec.cpu import plant
from ttrec.cpu.build import unavailable_reason

ROOT = Path(__file__).resolve().parents[1]
native = pytest.mark.skipif(unavailable_reason() is not None, reason=f"native kernel: {unavailable_reason()}")


# ---- decision on synthetic measurements ----

def _measure(name: str, kernel_s: float, calib_s: float = 1e-3, rounds: int = 60, contention=None, seed=0,
             speed: float = 1.0) -> Measurement:
    """Rounds of a kernel taking ``kernel_s`` on a machine of relative ``speed`` (time multiplier);
    ``contention(rng) -> factor`` slows each round and each calibration sample independently."""
    rng = random.Random(seed)
    slow = (lambda: contention(rng)) if contention else (lambda: 1.0)
    return Measurement(name, tuple(kernel_s * speed * slow() for _ in range(rounds)),
                       tuple(calib_s * speed * slow() for _ in range(rounds + 1)))


def _summaries(*ms: Measurement) -> dict[str, float]:
    return {m.name: m.summary() for m in ms}


BASE = _summaries(_measure("fwd", 2e-3), _measure("step", 5e-3))


def test_unchanged_passes_and_the_table_has_every_column():
    verdicts = decide(_summaries(_measure("fwd", 2e-3), _measure("step", 5e-3)), BASE, threshold=1.2)
    assert [v.verdict for v in verdicts] == [PASS, PASS]
    assert [v.ratio for v in verdicts] == pytest.approx([1.0, 1.0])
    assert exit_code(verdicts) == 0
    assert table(verdicts).splitlines()[0] == "| metric | baseline | current | ratio | threshold | verdict |"


def test_a_slower_kernel_is_a_regression_and_fails():
    verdicts = decide(_summaries(_measure("fwd", 2e-3), _measure("step", 7.5e-3)), BASE, threshold=1.2)
    assert [v.verdict for v in verdicts] == [PASS, REGRESSION]
    assert verdicts[1].ratio == pytest.approx(1.5)
    assert exit_code(verdicts) == 1


def test_a_faster_kernel_passes_as_faster():
    verdicts = decide(_summaries(_measure("fwd", 1e-3), _measure("step", 5e-3)), BASE, threshold=1.2)
    assert [v.verdict for v in verdicts] == [FASTER, PASS]
    assert exit_code(verdicts) == 0


def test_a_slower_reference_point_is_reported_not_failed():
    verdicts = decide({"fwd": 2.0 * BASE["fwd"], "step": 2.0 * BASE["step"]}, BASE, threshold=1.2,
                      thresholds={"fwd": 1.6}, report_only={"fwd"})
    assert [(v.verdict, v.threshold) for v in verdicts] == [(SLOWER_NOT_GATED, 1.6), (REGRESSION, 1.2)]
    assert exit_code(verdicts[:1]) == 0


def test_missing_baseline_is_reported_not_failed():
    current = _summaries(_measure("fwd", 2e-3), _measure("new_point", 1e-3))
    for base in (None, {"step": 1.0}):
        verdicts = decide(current, base, threshold=1.2)
        assert all(v.verdict == NO_BASELINE and v.ratio is None for v in verdicts)
        assert exit_code(verdicts) == 0
    partial = decide(current, BASE, threshold=1.2)
    assert [v.verdict for v in partial] == [PASS, NO_BASELINE]


def test_a_uniformly_slower_machine_passes():
    """Everything (kernels and calibration) 1.7x slower: the normalised medians do not move."""
    slow = _summaries(_measure("fwd", 2e-3, speed=1.7), _measure("step", 5e-3, speed=1.7))
    assert slow["fwd"] == pytest.approx(BASE["fwd"])
    verdicts = decide(slow, BASE, threshold=1.2)
    assert [v.verdict for v in verdicts] == [PASS, PASS]


def test_noisy_but_unchanged_passes_and_a_real_slowdown_under_the_same_noise_fails():
    """A third of all rounds and calibration samples land on a shared core (2-3x slower), at random:
    the median of calibrated rounds stays within the threshold; a 1.5x slower kernel still fails."""
    def contention(rng):
        return rng.uniform(2.0, 3.0) if rng.random() < 0.33 else rng.uniform(1.0, 1.05)

    for seed in range(10):
        noisy = _summaries(_measure("fwd", 2e-3, contention=contention, seed=seed),
                           _measure("step", 5e-3, contention=contention, seed=100 + seed))
        assert exit_code(decide(noisy, BASE, threshold=1.2)) == 0, seed
        slower = _summaries(_measure("step", 7.5e-3, contention=contention, seed=200 + seed))
        assert [v.verdict for v in decide(slower, BASE, threshold=1.2)] == [REGRESSION], seed


def test_a_regression_must_be_confirmed_by_the_rerun():
    """First pass above 1.2; the re-run must clear the bar halfway (1.1): a burst of contention
    that made one run slow does not fail the build, a slowdown that stays does."""
    assert confirmation_bar(1.2) == pytest.approx(1.1) and confirmation_bar(1.6) == pytest.approx(1.3)
    first = decide({"fwd": 1.5 * BASE["fwd"], "step": BASE["step"]}, BASE, threshold=1.2)
    unconfirmed = confirm(first, {"fwd": 1.05 * BASE["fwd"]})
    assert [v.verdict for v in unconfirmed] == [NOT_CONFIRMED, PASS]
    assert unconfirmed[0].confirmation_ratio == pytest.approx(1.05)
    assert exit_code(unconfirmed) == 0
    confirmed = confirm(first, {"fwd": 1.15 * BASE["fwd"]})
    assert [v.verdict for v in confirmed] == [REGRESSION, PASS]
    assert exit_code(confirmed) == 1
    assert exit_code(confirm(first, {})) == 1  # no re-run measurement: fails closed


def test_bad_measurements_and_thresholds_are_clear_errors():
    with pytest.raises(ValueError, match="fwd: got 2 calibration samples for 2 rounds; expected 3"):
        Measurement("fwd", (1.0, 1.0), (1.0, 1.0))
    with pytest.raises(ValueError, match="fwd: round_seconds holds 0.0"):
        Measurement("fwd", (0.0,), (1.0, 1.0))
    with pytest.raises(ValueError, match="fwd: round_seconds is empty"):
        Measurement("fwd", (), (1.0,))
    for bad in (1.0, 0.5, float("nan"), "1.2"):
        with pytest.raises(ValueError, match="threshold: got"):
            decide({"fwd": 1.0}, {"fwd": 1.0}, threshold=bad)


# ---- baselines ----

def _cls(**kw):
    env = {"cpu_model": "AMD EPYC 7B13", "cpu_isa": "avx2", "cpu_family_model": "family 25 model 1", "cpu_count": "2",
           "torch": "2.13.0+cpu", "gpu_name": "n/a"}
    return baselines.machine_class({**env, **kw}, threads=1, scale="default", cuda=False)


def test_baseline_round_trip_and_keys(tmp_path):
    cls = _cls()
    assert baselines.slug(cls) == "amd_epyc_7b13-avx2-f25m1-2cpu-torch2.13.0_cpu-1t"
    assert baselines.slug(_cls(torch="2.14.0")) != baselines.slug(cls)
    assert baselines.slug(_cls(cpu_isa="avx512")) != baselines.slug(cls)  # one model name, two kernels
    assert baselines.slug(_cls(cpu_family_model="family 23 model 49")) != baselines.slug(cls)  # Zen 2 vs Zen 3
    path = baselines.save(cls, {"fwd": {"normalised_median": 1.5, "calibration": "cal-A"},
                                "old": {"normalised_median": 2.0, "calibration": "cal-B"}}, {"note": "test"}, tmp_path)
    assert path == tmp_path / "amd_epyc_7b13-avx2-f25m1-2cpu-torch2.13.0_cpu-1t.json"
    # measured with another calibration: not comparable, and left out it would pass ungated: an error
    with pytest.raises(ValueError, match=r"\['old'\] were normalised by another calibration \(\['cal-B'\]; this gate's: 'cal-A'\)"):
        baselines.load(cls, "cal-A", tmp_path)
    baselines.save(cls, {"fwd": {"normalised_median": 1.5, "calibration": "cal-A"}}, {}, tmp_path)
    values, message = baselines.load(cls, "cal-A", tmp_path)
    assert values == {"fwd": 1.5} and message == f"baseline {path}"


def test_a_baseline_of_another_microarchitecture_is_not_used_and_a_legacy_one_is_used_with_a_warning(tmp_path):
    zen2, zen3 = _cls(cpu_family_model="family 23 model 49"), _cls()
    baselines.save(zen2, {"fwd": {"normalised_median": 1.5, "calibration": "cal-A"}}, {}, tmp_path)
    values, message = baselines.load(zen3, "cal-A", tmp_path)
    assert values is None and "no baseline for this machine class" in message and "f23m49" in message
    legacy = _cls(cpu_family_model=baselines.UNKNOWN_FAMILY_MODEL)  # recorded before the field existed
    baselines.save(legacy, {"fwd": {"normalised_median": 2.5, "calibration": "cal-A"}}, {}, tmp_path)
    values, message = baselines.load(zen3, "cal-A", tmp_path)
    assert values == {"fwd": 2.5} and "possibly on another microarchitecture" in message
    assert baselines.load(zen2, "cal-A", tmp_path)[0] == {"fwd": 1.5}  # its own class first
    for name in ("amd_epyc-avx2-f23m49-2cpu-torch2.13.0_cpu-1t.json", "amd_epyc-avx512-unknown-2cpu-torch2.13.0_cpu-1t.json"):
        stored = json.loads((baselines.DEFAULT_DIR / name).read_text())["machine_class"]
        assert baselines.path_for(stored).name == name  # committed files are found under their class


def test_pooled_baseline_adds_runs_of_the_same_calibration_and_takes_the_median(tmp_path):
    cls = _cls()
    baselines.save(cls, {"fwd": {"normalised_median": 2.0, "runs": [1.0, 2.0, 3.0], "calibration": "cal-A"},
                         "old": {"normalised_median": 5.0, "runs": [5.0], "calibration": "cal-B"}}, {}, tmp_path)
    entries = baselines.pooled(cls, {"fwd": [10.0, 11.0], "old": [7.0], "new": [4.0]}, "cal-A", tmp_path)
    assert entries["fwd"] == {"normalised_median": 3.0, "runs": [1.0, 2.0, 3.0, 10.0, 11.0], "calibration": "cal-A"}
    assert entries["old"]["runs"] == [7.0]  # stored with another calibration: not comparable, not pooled
    assert entries["new"]["normalised_median"] == 4.0
    assert baselines.pooled(_cls(cpu_isa="avx512"), {"fwd": [9.0]}, "cal-A", tmp_path)["fwd"]["runs"] == [9.0]


def test_update_and_add_to_baseline_exclude_each_other(capsys):
    from benches.gate.run import parser

    with pytest.raises(SystemExit):
        parser().parse_args(["--update-baseline", "--add-to-baseline"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_missing_baseline_message_names_the_file_and_the_fix(tmp_path):
    values, message = baselines.load(_cls(), "cal-A", tmp_path)
    assert values is None
    assert str(tmp_path / "amd_epyc_7b13-avx2-f25m1-2cpu-torch2.13.0_cpu-1t.json") in message
    assert "--update-baseline" in message


# ---- the planted slowdown ----

def test_plant_is_off_by_default_and_parses_whole_and_fractional_factors(monkeypatch):
    monkeypatch.delenv(plant.ENV, raising=False)
    assert plant.factor() == 1.0
    calls = []
    assert plant.call(lambda *a: calls.append(a) or 7, 1, 2) == 7
    assert calls == [(1, 2)]
    for raw, want in (("1", 1.0), ("3", 3.0), ("1.25", 1.25), (" 1.5 ", 1.5)):
        monkeypatch.setenv(plant.ENV, raw)
        assert plant.factor() == want


@pytest.mark.parametrize("bad", ["0", "0.99", "-2", "x", "", "nan", "inf"])
def test_plant_rejects_bad_values_naming_the_variable(monkeypatch, bad):
    monkeypatch.setenv(plant.ENV, bad)
    with pytest.raises(ValueError, match=r"TTREC_PLANT_SLOWDOWN: got .*; expected .*>= 1"):
        plant.factor()


def test_plant_pads_a_call_by_f_minus_one_times_its_duration(monkeypatch):
    """With a fake thread CPU clock: a call of 2 s under f = 1.5 spins until 1 s more has passed, no longer."""
    clock = {"now": 100.0}

    def thread_time():
        clock["now"] += 0.01  # every look at the clock costs 10 ms of fake time
        return clock["now"]

    def native_call():
        clock["now"] += 2.0
        return 0

    monkeypatch.setattr(plant.time, "thread_time", thread_time)
    monkeypatch.setenv(plant.ENV, "1.5")
    start = clock["now"]
    assert plant.call(native_call) == 0
    elapsed = clock["now"] - start
    assert 3.0 <= elapsed <= 3.05  # 2 s call + 1 s padding (+ the fake clock's own ticks)


@native
def test_plant_leaves_a_fused_training_step_bit_identical(monkeypatch):
    """Forward, backward and the fused SGD update under f = 2.5 give exactly the plain results."""
    def trained(f):
        monkeypatch.setenv(plant.ENV, f)
        emb = ttrec.TTEmbeddingBag(1000, 16, tt_ranks=8, backend="cpu", optimizer="sgd", learning_rate=0.1, seed=0)
        idx, offsets = torch.tensor([1, 5, 999, 5, 42]), torch.tensor([0, 2])
        for _ in range(3):
            emb(idx, offsets).sum().backward()
        return [c.detach().clone() for c in emb.parameters()]

    for a, b in zip(trained("1"), trained("2.5")):
        assert torch.equal(a, b)


# ---- end to end (subprocess, smoke sizes) ----

def _gate(tmp_path: Path, *args: str, plant_factor: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != plant.ENV}
    env["PYTHONPATH"] = str(ROOT)
    if plant_factor is not None:
        env[plant.ENV] = plant_factor
    return subprocess.run([sys.executable, "-m", "benches.gate", "--scale", "smoke", "--budget-s", "0.3",
                           "--min-rounds", "10", "--baseline-dir", str(tmp_path / "baselines"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@native
@pytest.mark.slow
def test_gate_end_to_end_baseline_then_a_large_plant_fails(tmp_path):
    points = "--points=tt_cpu_forward,tt_cpu_train_fused_sgd"
    update = _gate(tmp_path, points, "--update-baseline", "--baseline-runs", "1", "--out", str(tmp_path / "base"))
    assert update.returncode == 0, update.stdout + update.stderr
    written = list((tmp_path / "baselines").glob("*-smoke.json"))
    assert len(written) == 1
    assert set(json.loads(written[0].read_text())["benchmarks"]) == {"tt_cpu_forward", "tt_cpu_train_fused_sgd"}

    planted = _gate(tmp_path, points, "--out", str(tmp_path / "planted"), plant_factor="4")
    assert planted.returncode == 1, planted.stdout + planted.stderr
    assert "| metric | baseline | current | ratio | threshold | verdict |" in planted.stdout
    artifact = json.loads((tmp_path / "planted" / "gate.json").read_text())
    assert artifact["plant_slowdown"] == "4"
    assert artifact["decision"]["exit_code"] == 1
    assert {v["metric"]: v["verdict"] for v in artifact["decision"]["verdicts"]} == {
        "tt_cpu_forward": REGRESSION, "tt_cpu_train_fused_sgd": REGRESSION}
    run0 = artifact["runs"]["run0"]  # pytest-benchmark's own JSON, with the rounds in extra_info
    assert {b["extra_info"]["gate_point"] for b in run0["benchmarks"]} == {"tt_cpu_forward", "tt_cpu_train_fused_sgd"}
    assert "confirmation" in artifact["runs"]


def test_missing_baseline_warns_and_passes_or_exits_3_when_required(tmp_path, monkeypatch, capsys):
    """The runner's own code path, with the benchmarks replaced by a canned pytest-benchmark JSON."""
    canned = {"benchmarks": [{"extra_info": {"gate_point": "tt_cpu_forward", "round_seconds": [1e-3, 1e-3],
                                             "calibration_seconds": [1e-3, 1e-3, 1e-3]}}]}
    monkeypatch.setattr(run, "run_benchmarks", lambda path, options, names: canned)
    common = ["--points=tt_cpu_forward", "--baseline-dir", str(tmp_path)]
    code = run.main([*common, "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert code == 0
    assert "no baseline for this machine class" in out and "WARNING: no baseline for ['tt_cpu_forward']" in out
    assert json.loads((tmp_path / "o" / "gate.json").read_text())["decision"]["exit_code"] == 0
    assert run.main([*common, "--require-baseline", "--out", str(tmp_path / "strict")]) == 3
    assert "gate: FAIL (no baseline)" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--threshold", "0.9"], "--threshold: got '0.9'; must be a finite number > 1.0"),
    (["--points=nope"], "--points: got ['nope']; allowed"),
    (["--threads", "0"], "--threads: got 0; must be >= 1"),
])
def test_gate_rejects_bad_arguments_clearly(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        run.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_a_corrupt_baseline_is_a_clear_error(tmp_path):
    import json

    from benches.gate import baselines

    cls = {"cpu_model": "x", "cpu_isa": "avx2", "cpu_family_model": "family 25 model 1", "cpu_count": "2",
           "torch": "2.13.0", "threads": 1, "scale": "default"}
    path = baselines.save(cls, {"tt_cpu_forward": {"normalised_median": 0.0, "runs": [0.0], "calibration": "c"}},
                          {}, tmp_path)
    assert json.loads(path.read_text())["benchmarks"]["tt_cpu_forward"]["normalised_median"] == 0.0
    with pytest.raises(ValueError, match=r"tt_cpu_forward.normalised_median: got 0.0; must be a finite number > 0"):
        baselines.load(cls, "c", tmp_path)


def _canned(*names: str, seconds: float = 1e-3) -> dict:
    return {"benchmarks": [{"extra_info": {"gate_point": n, "round_seconds": [seconds] * 3,
                                           "calibration_seconds": [1e-3] * 4}} for n in names]}


def test_recording_some_points_keeps_the_other_points_baselines(tmp_path, monkeypatch, capsys):
    """--update-baseline / --add-to-baseline with --points: the points not run keep their stored
    entries (the whole file was rewritten with the run points only: the others went ungated)."""
    monkeypatch.delenv(plant.ENV, raising=False)
    monkeypatch.setattr(run, "run_benchmarks", lambda path, options, names: _canned(*names))
    common = ["--baseline-dir", str(tmp_path), "--baseline-runs", "1"]
    assert run.main([*common, "--update-baseline", "--points=tt_cpu_forward,tt_cpu_train_fused_sgd",
                     "--out", str(tmp_path / "a")]) == 0
    path = next(tmp_path.glob("*.json"))
    before = json.loads(path.read_text())["benchmarks"]
    for flag in ("--update-baseline", "--add-to-baseline"):
        assert run.main([*common, flag, "--points=tt_cpu_forward", "--out", str(tmp_path / flag)]) == 0
        after = json.loads(path.read_text())["benchmarks"]
        assert set(after) == {"tt_cpu_forward", "tt_cpu_train_fused_sgd"}, flag
        assert after["tt_cpu_train_fused_sgd"] == before["tt_cpu_train_fused_sgd"], flag
    assert len(after["tt_cpu_forward"]["runs"]) == 2  # the update's run, then the one pooled with it
    assert "[kept: not run now]" in capsys.readouterr().out


@pytest.mark.parametrize("content, needle", [
    ('{"format": 1, "machine_class": ', "not a readable baseline"),
    ("[]", "not a baseline"),
    ('{"format": 1}', "not a baseline"),
    (None, "machine class"),  # a hand-edited class
    ("stale", "were normalised by another calibration"),
    ("number", "benchmarks.tt_cpu_forward.normalised_median: got 0.5; must be"),
])
def test_an_unusable_baseline_fails_before_measuring_naming_the_file(tmp_path, monkeypatch, capsys, content, needle):
    """A baseline file that exists but cannot be used is exit 2 naming the file, before any
    benchmark runs (it was a traceback with exit 1, the regression code, after the runs, or, for a
    hand-edited class or another calibration, "no baseline" and PASS whatever the slowdown)."""
    monkeypatch.delenv(plant.ENV, raising=False)
    ran = []
    monkeypatch.setattr(run, "run_benchmarks", lambda path, options, names: ran.append(names) or _canned(*names))
    common = ["--baseline-dir", str(tmp_path), "--points=tt_cpu_forward"]
    assert run.main([*common, "--update-baseline", "--baseline-runs", "1", "--out", str(tmp_path / "a")]) == 0
    path, ran[:] = next(tmp_path.glob("*.json")), []
    data = json.loads(path.read_text())
    if content is None:
        data["machine_class"]["torch"] = "2.13.0"
    elif content == "stale":
        data["benchmarks"]["tt_cpu_forward"]["calibration"] = "another"
    elif content == "number":
        data["benchmarks"]["tt_cpu_forward"] = 0.5
    path.write_text(content if content not in (None, "stale", "number") else json.dumps(data))
    with pytest.raises(SystemExit) as exc:
        run.main([*common, "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and str(path) in err and needle in err, err
    assert ran == []  # nothing measured


def test_bad_gate_arguments_fail_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(plant.ENV, raising=False)
    monkeypatch.setattr(run, "run_benchmarks", lambda *a: pytest.fail("measured"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    for args, message in (
            (["--threshold", "inf"], "--threshold: got 'inf'; must be a finite number > 1.0"),
            (["--points", ","], "--points: got ','"),
            (["--points", " "], "--points: got ' '"),
            (["--out", str(blocker / "gate")], "--out: got"),
            (["--update-baseline", "--baseline-dir", str(blocker / "b"), "--out", str(tmp_path / "o")],
             "--baseline-dir: got")):
        with pytest.raises(SystemExit) as exc:
            run.main(args)
        assert exc.value.code == 2 and message in capsys.readouterr().err, args
    monkeypatch.setenv(plant.ENV, "2")
    with pytest.raises(SystemExit) as exc:
        run.main(["--update-baseline", "--baseline-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "TTREC_PLANT_SLOWDOWN=2 is set" in capsys.readouterr().err


def test_a_faster_gated_point_prints_the_refresh_hint_and_a_reference_point_does_not(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(plant.ENV, raising=False)
    speed = {}
    monkeypatch.setattr(run, "run_benchmarks", lambda path, options, names: {"benchmarks": [
        {"extra_info": {"gate_point": n, "round_seconds": [speed.get(n, 1e-3)] * 3, "calibration_seconds": [1e-3] * 4}}
        for n in names]})
    common = ["--baseline-dir", str(tmp_path), "--points=tt_cpu_forward,t3nsor_torch_forward", "--no-confirm"]
    assert run.main([*common, "--update-baseline", "--baseline-runs", "1", "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    speed["t3nsor_torch_forward"] = 1e-4  # a reference point 10x faster: no hint (not gated)
    assert run.main([*common, "--out", str(tmp_path / "b")]) == 0
    assert "refresh the baseline" not in capsys.readouterr().out
    speed["tt_cpu_forward"] = 1e-4
    assert run.main([*common, "--out", str(tmp_path / "c")]) == 0
    assert "Faster than the baseline" in capsys.readouterr().out


def test_the_gates_pytest_run_is_its_own_top_level_run_not_an_xdist_worker(tmp_path, monkeypatch):
    """Run from an xdist worker (as under `nox -s tests`), the gate's benchmark process inherited
    PYTEST_XDIST_WORKER, so pytest-benchmark disabled itself and the gate failed with an
    AttributeError: the child gets none of xdist's variables and no xdist plugin."""
    seen = {}

    def fake_run(cmd, cwd, env):
        seen.update(cmd=cmd, env=env)
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    monkeypatch.setenv("PYTEST_XDIST_TESTRUNUID", "abc")
    monkeypatch.setattr(run.subprocess, "run", fake_run)
    with pytest.raises(run.BenchmarksFailed):
        run.run_benchmarks(tmp_path / "b.json", {"scale": "smoke"}, ["tt_cpu_forward"])
    assert not [k for k in seen["env"] if k.startswith("PYTEST_XDIST")]
    assert seen["cmd"][seen["cmd"].index("no:xdist") - 1] == "-p"
    assert json.loads(seen["env"]["TTREC_GATE_OPTIONS"]) == {"scale": "smoke"}
