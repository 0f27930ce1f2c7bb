"""The CPU-kernel experiment runs end to end at smoke scale and reports what it measured."""

import statistics
from pathlib import Path

import pandas as pd
import pytest

from benches.cpu_kernel import KERNEL_ALONE, SCALES, round_states, run
from ttrec import TTSpec
from ttrec.baselines import tltorch_unavailable_reason


@pytest.mark.slow
@pytest.mark.skipif(tltorch_unavailable_reason() is not None, reason=str(tltorch_unavailable_reason()))
def test_smoke_run_writes_rows_and_report(tmp_path):
    df = run("smoke", threads=1, out_dir=tmp_path, log=lambda s: None)
    stored = pd.read_csv(tmp_path / "results.csv")
    assert len(stored) == len(df)
    fwd = stored[(stored["metric"] == "throughput") & (stored["pooling_factor"] == 1) & (stored["mode"] == "forward")]
    assert {"native", "reference", "t3nsor", "tltorch", "dense"} <= set(fwd["label"])
    assert (fwd["median"] > 0).all()
    assert (stored.loc[stored["impl"] == "sgemm", "median"] > 0).all()
    # the sgemm limit is the faster of torch's and numpy's BLAS, both measured and both named in the report
    cand = stored[stored["impl"] == "sgemm candidate"]
    assert len(cand) == 2 and cand["label"].str.contains("torch.mm").any() and cand["label"].str.contains("numpy").any()
    assert stored.loc[stored["impl"] == "sgemm", "median"].iloc[0] == cand["median"].max()
    mem = stored[stored["metric"] == "peak_transient_memory"]
    assert set(mem["label"]) == {"native", "reference", "t3nsor", "tltorch", "dense"}
    # T3nsor-style rebuilds the whole 100k x 16 table (6.4 MB) every forward: its peak must show it
    t3 = mem.loc[mem["label"] == "t3nsor", "median"].iloc[0]
    assert t3 >= 100_000 * 16 * 4
    report = (tmp_path / "report.md").read_text()
    assert all(label.removeprefix("sgemm ") in report for label in cand["label"])
    for heading in ("## Forward", "### Where the gap to the sgemm goes", "## Training step", "## Lookups/s by rank",
                    "## Peak transient memory"):
        assert heading in report
    # the headline ratios again, from rounds in which the steps took turns (one time per round each)
    rounds = stored[stored["metric"] == "interleaved_round_time"]
    assert set(rounds["label"]) == {"sgemm", "fma peak", "native", "native fused SGD", "native autograd + SGD",
                                    "nn.EmbeddingBag sparse + SGD", "native fused SGD (batch stream)",
                                    "nn.EmbeddingBag sparse + SGD (batch stream)", KERNEL_ALONE}
    # the fused step's native calls alone, in the training rounds: the Python path is the rounds' differences
    at_b = rounds[rounds["batch_size"] == SCALES["smoke"]["batch"]]
    per = {label: [float(v) for v in note.split(":")[1].split()] for label, note in zip(at_b["label"], at_b["note"])}
    extra = statistics.median(f - a for f, a in zip(per["native fused SGD"], per[KERNEL_ALONE]))
    assert f"the Python path around the calls took **{1e3 * extra:.2f} ms** a step" in report
    alone = rounds[rounds["label"] == KERNEL_ALONE].iloc[0]
    assert (alone["impl"], alone["mode"], bool(alone["fused"]), alone["timed_batches"]) == ("tt", "train", True, 1)
    # the stream's steps took ceil(2,048 stream lookups / lookups per batch) distinct batches, the others one
    streamed = rounds["label"].str.endswith("(batch stream)")
    steps = ~streamed & ~rounds["impl"].isin(["sgemm", "fma peak"])  # (the rates' calibrations have no batches)
    assert (rounds.loc[streamed, "stream_lookups"] == 2048).all() and (rounds.loc[steps, "stream_lookups"] == 0).all()
    assert {(b, k) for b, k in zip(rounds.loc[streamed, "batch_size"], rounds.loc[streamed, "timed_batches"])} == {
        (512, 4), (256, 8), (64, 32)}
    assert (rounds.loc[steps, "timed_batches"] == 1).all()
    # the cores' FMA peak, timed in the forward's rounds: its rate row is its FLOPs per call over the rounds'
    # median time, and the report's peak lines and the training step's hard bound are that rate
    peak = stored[(stored["impl"] == "fma peak") & (stored["metric"] == "gflops")].iloc[0]
    peak_times = [float(x) for x in rounds.loc[rounds["label"] == "fma peak", "note"].iloc[0].split(":")[1].split()]
    flops = float(peak["note"].split("; ")[1].split()[0])
    assert peak["median"] == pytest.approx(flops / statistics.median(peak_times) / 1e9, rel=1e-5)
    assert f"benches.environment.fma_peak): **{peak['median']:.1f} GFLOP/s**" in report
    assert f"At the cores' FMA peak ({peak['median']:.1f} GFLOP/s, in the forward's rounds)" in report
    assert (rounds["n"] == 3).all() and (rounds["median"] > 0).all()
    assert report.count("Interleaved (3 rounds") == 2
    # the gap section's rates come from the kernel's own per-thread timers (d = 3: nonzero)
    gap = report.split("### Where the gap to the sgemm goes")[1].split("## Training step")[0]
    assert "- chain GEMMs:" in gap and "- last core:" in gap and "the kernel ran 1 thread:" in gap
    # where the fused step's time goes: its phases' medians over 30 steps after the rounds, stored, as reported
    prof = stored[stored["metric"] == "step_phase_time"]
    got = dict(zip(prof["note"], prof["median"]))
    assert {"forward sort", "forward chains_and_last_core", "backward i2_buckets", "step total",
            "step outside_phases"} <= set(got)
    assert (prof["n"] == 30).all() and (prof["label"] == "native fused SGD").all()
    assert 0 < got["step outside_phases"] < got["step total"]
    steps = report.split("### Where the fused step's time goes")[1].split("###")[0]
    assert f"the step took **{1e3 * got['step total']:.2f} ms**" in steps
    assert f"outside them **{1e3 * got['step outside_phases']:.2f} ms**" in steps
    assert f"backward i2 buckets {1e3 * got['backward i2_buckets']:.2f}" in steps
    # and per thread, from 30 more steps with the kernel's profile on: stored, and in the report with the
    # FLOPs per thread of each part (the counts of the arithmetic bound, over the 1 thread the kernel ran)
    parts = stored[stored["metric"] == "step_part_time"]
    part = dict(zip(parts["note"].str.split(" [(]").str[0], parts["median"]))
    assert set(part) == {"forward chains", "forward last_core", "backward i2_buckets", "backward buckets_gather",
                         "backward buckets_rows", "backward buckets_gemms", "step"}
    assert (parts["n"] == 30).all() and all(v > 0 for v in part.values())
    # (each part lies within the phase in every call, so its median within the phase's)
    assert all(part[f"backward buckets_{k}"] <= part["backward i2_buckets"] for k in ("gather", "rows", "gemms"))
    smoke = SCALES["smoke"]["table"]
    chain, last = TTSpec.suggest(smoke.num_embeddings, smoke.embedding_dim, 32).chain_flops()
    fused_row = stored[(stored["mode"] == "train") & stored["fused"].astype(bool) & (stored["metric"] == "throughput")
                       & (stored["batch_size"] == 512)].iloc[0]
    prefixes, distinct = 512 * fused_row["unique_prefix_ratio"], 512 * fused_row["unique_row_ratio"]
    assert (f"chain GEMMs {1e3 * part['forward chains']:.2f} ms ({prefixes * chain / 1e6:.0f} MFLOP per thread: "
            f"{prefixes * chain / part['forward chains'] / 1e9:.1f} GFLOP/s") in steps
    assert (f"the chain GEMMs (dG_2 and dP_1) {1e3 * part['backward buckets_gemms']:.2f} ms "
            f"({2 * prefixes * chain / 1e6:.0f} MFLOP per thread") in steps
    assert (f"the per-row products (dP and dG_3) {1e3 * part['backward buckets_rows']:.2f} ms "
            f"({2 * distinct * last / 1e6:.0f} MFLOP per thread") in steps
    # the fastest-round ratio, recomputed from the stored rounds
    per_round = {(r["label"], r["batch_size"]): [float(x) for x in r["note"].split(":")[1].split()]
                 for _, r in rounds.iterrows()}
    want = min(per_round["nn.EmbeddingBag sparse + SGD", 512]) / min(per_round["native fused SGD", 512])
    assert f"native fused SGD: **{want:.2f}x**" in report.split("fastest rounds:")[1]

    def ratio(batch, picked=None, suffix=""):  # median over the rounds (all, or those picked) of dense / fused
        dense = per_round["nn.EmbeddingBag sparse + SGD" + suffix, batch]
        fused = per_round["native fused SGD" + suffix, batch]
        return statistics.median(dense[r] / fused[r] for r in (picked if picked is not None else range(len(dense))))

    stream = " (batch stream)"
    assert f"On the stream: native fused SGD{stream}: **{ratio(512, suffix=stream):.2f}x**" in report
    want = min(per_round["nn.EmbeddingBag sparse + SGD" + stream, 512]) / min(per_round["native fused SGD" + stream, 512])
    assert f"native fused SGD{stream}: **{want:.2f}x**" in report.split("fastest rounds:")[1]

    # the training step at smaller batches: its own rounds per batch size, the ratio's median in the report
    small = rounds[rounds["batch_size"] != 512]
    assert set(zip(small["label"], small["batch_size"])) == {
        (label + suffix, b) for label in ("native fused SGD", "nn.EmbeddingBag sparse + SGD") for b in (64, 256)
        for suffix in ("", stream)}
    table = report.split("### Training step by batch size")[1].split("## Lookups/s")[0]
    for b in (64, 256):  # replayed, then on the stream
        cells = table_row(table, b).split(" | ")
        assert cells[3].startswith(f"**{ratio(b):.2f}x**") and cells[6].startswith(f"**{ratio(b, suffix=stream):.2f}x**")
    # the arithmetic floor, recomputed from the stored reuse ratios and the sgemm's stored rounds: the
    # chain once per distinct prefix and the last core once per distinct row, forward once and backward twice
    smoke_table = SCALES["smoke"]["table"]
    chain, last = TTSpec.suggest(smoke_table.num_embeddings, smoke_table.embedding_dim, 32).chain_flops()
    sgemm_rate = 2 * 512**3 / statistics.median(per_round["sgemm", 512])

    def floor_ms(lookups, reuse):
        return 1e3 * 3 * lookups * (reuse["unique_prefix_ratio"] * chain + reuse["unique_row_ratio"] * last) / sgemm_rate

    fused = stored[(stored["mode"] == "train") & stored["fused"].astype(bool) & (stored["metric"] == "throughput")].iloc[0]
    section = report.split("### The training step's arithmetic against the FMA peak and the sgemm")[1].split("###")[0]
    assert f"**{floor_ms(512, fused):.2f} ms**" in section
    assert 0 < fused["unique_prefix_ratio"] <= fused["unique_row_ratio"] <= 1
    for b in (64, 256):
        reuse = small[(small["batch_size"] == b) & (small["label"] == "native fused SGD")].iloc[0]
        assert 0 < reuse["unique_prefix_ratio"] <= reuse["unique_row_ratio"] <= 1
        assert table_row(table, b).endswith(f"| {floor_ms(b, reuse):.3f} |"), table

    # the rounds' vCPU states from the stored probes, and the training ratio over the near and far rounds
    probes = {r["label"]: [tuple(None if x == "None" else float(x) for x in pair.split("/"))
                           for pair in r["note"].split(":")[1].split()]
              for _, r in stored[stored["metric"] == "thread_round_trip"].iterrows()}
    assert set(probes) == {"forward rounds", "training rounds"} and all(len(v) == 3 for v in probes.values())
    # one thread: where the vCPUs sit moves no step, so no round is probed (each recorded unprobed)
    assert all(pair == (None, None) for v in probes.values() for pair in v)
    assert "(The rounds were not probed for the threads' round trip: one thread" in report
    assert "1 threads" not in report and "batch 512 lookups, 1 thread," in report
    states = round_states(probes["training rounds"])
    line = next(x for x in report.splitlines() if x.startswith("Training step vs nn.EmbeddingBag by the vCPUs' state"))
    for state in ("near", "far"):
        picked = [r for r, s in enumerate(states) if s == state]
        part = line.split(f"{state} ({len(picked)} rounds): ")[1]
        if picked:
            assert part.startswith(f"fused SGD **{ratio(512, picked):.2f}x**"), line
            assert f"on the stream **{ratio(512, picked, stream):.2f}x**" in part.split(";")[0], line
        else:
            assert part.startswith("none"), line


def table_row(text: str, batch: int) -> str:
    """The row of the by-batch table that starts with ``batch``."""
    return next(line for line in text.splitlines() if line.startswith(f"| {batch} | "))


def test_round_states_use_an_absolute_round_trip_bound():
    """Near: both probes at most NEAR_NS; far: both above; mixed or unprobed: None. A run spent wholly
    far apart (every probe about 330 ns, as run 2026-12-04k) has no near rounds, whatever its fastest probe."""
    from benches.cpu_kernel import NEAR_NS
    assert NEAR_NS == 150.0
    assert round_states([(60.0, 70.0), (400.0, 500.0), (60.0, 500.0), (None, 60.0), (150.0, 150.1)]) == [
        "near", "far", None, None, None]
    assert round_states([(329.1, 348.6), (335.4, 338.3)]) == ["far", "far"]


def test_step_parts_are_the_medians_of_the_profiled_steps_and_the_profile_ends_off(monkeypatch):
    """_median_step_parts: per part, the median over the steps of the kernel's own timer, read with the
    profile on; the profile is off again afterwards, also when a step raises."""
    from benches import cpu_kernel
    from ttrec.cpu import ops

    clock = iter(range(100))  # each step takes 1 s
    monkeypatch.setattr(cpu_kernel.time, "perf_counter", lambda: float(next(clock)))
    switched = []
    monkeypatch.setattr(ops, "set_profile", switched.append)
    calls = iter(range(3))
    last = {}

    def stats(which="forward"):
        k = last["k"]
        if which == "forward":
            return {"seconds_chains": 0.1 * (k + 1), "seconds_last_core": 0.05, "seconds_sort": 9.0}
        return {"seconds_i2_buckets": [0.9, 0.5, 0.7][k], "seconds_buckets_gather": 0.01, "seconds_buckets_rows": 0.2,
                "seconds_buckets_gemms": [0.3, 0.1, 0.2][k], "seconds_first_core": 9.0}

    monkeypatch.setattr(ops, "last_stats", stats)
    parts = cpu_kernel._median_step_parts(lambda: last.update(k=next(calls)), 3)
    assert parts == pytest.approx({"forward chains": 0.2, "forward last_core": 0.05, "backward i2_buckets": 0.7,
                                   "backward buckets_gather": 0.01, "backward buckets_rows": 0.2,
                                   "backward buckets_gemms": 0.2, "step": 1.0})
    assert switched == [True, False]

    def failing():
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        cpu_kernel._median_step_parts(failing, 3)
    assert switched == [True, False, True, False]


def test_step_profile_counts_each_top_level_phase_once(monkeypatch):
    """The fused step's time outside the kernel's phases: the step's time less the forward's top-level
    phases (its chains, last_core and sort_radix lie within them) and every backward phase, per step,
    then the median; and the rows the report and results.csv take from it."""
    from benches import cpu_kernel
    from ttrec.cpu import ops

    clock = iter(range(100))  # perf_counter: each step takes 1 s (readings 0, 1; 2, 3; ...)
    monkeypatch.setattr(cpu_kernel.time, "perf_counter", lambda: float(next(clock)))
    fwd = {"lookups": 8, "seconds_sort": 0.1, "seconds_chains_and_last_core": 0.3, "seconds_pool": 0.0,
           "seconds_chains": 0.2, "seconds_last_core": 0.05, "seconds_sort_radix": 0.08}
    # (last_core: a backward phase of its own (d = 2, 4), counted; buckets_rows: a part within i2_buckets, read
    # only with the profile on, not counted)
    bwd = [{"seconds_setup": 0.01, "seconds_sort": 0.0, "seconds_i2_buckets": b, "seconds_first_core": 0.04,
            "seconds_last_core": 0.02, "seconds_buckets_rows": 5.0} for b in (0.2, 0.4, 0.3)]
    calls = iter(bwd)
    last = {}
    monkeypatch.setattr(ops, "last_stats", lambda which="forward": fwd if which == "forward" else last["b"])
    profile = cpu_kernel._median_step_phases(lambda: last.update(b=next(calls)), 3)
    # outside per step: 1 - (0.1 + 0.3 + 0.0) - (0.01 + b + 0.04 + 0.02) = 0.33, 0.13, 0.23 -> median 0.23
    assert profile["step"] == 1.0 and profile["outside"] == pytest.approx(0.23)
    assert "seconds_buckets_rows" not in profile["backward"] and profile["backward"]["seconds_last_core"] == 0.02
    assert "seconds_chains" not in profile["forward"] and profile["forward"]["seconds_sort_radix"] == 0.08
    assert profile["backward"]["seconds_i2_buckets"] == pytest.approx(0.3)
    rows = cpu_kernel._step_profile_rows(profile)
    assert [(c, n) for c, n, _ in rows] == [("forward", "sort"), ("forward", "chains_and_last_core"),
                                            ("backward", "setup"), ("backward", "i2_buckets"),
                                            ("backward", "first_core"), ("backward", "last_core"), ("step", "total"),
                                            ("step", "outside_phases")]
    text = cpu_kernel._step_lines(profile, floor=0.2, dense=0.8, fused=0.9)[2]
    assert "the step took **1000.00 ms** (in the rounds above 900.00 ms" in text
    assert "outside them **230.00 ms** (23% of the step" in text
    assert "backward i2 buckets 300.00" in text and "sort radix" not in text


@pytest.mark.parametrize("out,why", [("file", "an existing file; allowed: a directory"),
                                     ("/proc/ttrec-no-such-dir/x", "which cannot be created")])
def test_an_out_directory_that_cannot_be_made_is_a_usage_error(tmp_path, capsys, out, why):
    """--out is checked before anything is measured: a file in the way, or a directory that cannot be made
    (it had been a FileNotFoundError traceback from pathlib), is argparse's error, exit 2, naming --out."""
    from benches import cpu_kernel

    if out == "file":
        out = tmp_path / "file"
        out.write_text("")
    elif not Path("/proc").is_dir():
        pytest.skip("no /proc")
    with pytest.raises(SystemExit) as exc:
        cpu_kernel.main(["--scale", "smoke", "--threads", "1", "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--out: got '{out}'" in err and why in err
