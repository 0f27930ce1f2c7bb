"""timing.stream_lookups: the timed calls take distinct batches of the workload stream in turn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from benches.app import build_module, build_point, measure_point, stream_length
from benches.cache_experiments import workload_stream
from benches.config import TimingConfig, register, to_objects
from ttrec.cpu.build import unavailable_reason

CONF = str(Path(__file__).resolve().parents[1] / "conf")
QUICK = ["timing=quick", "timing.target_time_s=0.01", "timing.min_repeats=2", "timing.max_repeats=2", "timing.warmup=1"]

register()


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return to_objects(compose(config_name="bench", overrides=["table=tiny", "tt.rank=4", *QUICK, *overrides]))


def _recorded(module):
    """Wrap module.forward to record the indices of every call (as lists, so later changes cannot alter them)."""
    seen, forward = [], module.forward

    def recording(*args, **kw):
        seen.append(args[0].tolist())
        return forward(*args, **kw)
    module.forward = recording
    return seen


@pytest.mark.parametrize("lookups,want", [(0, 1), (1, 1), (96, 1), (97, 2), (960, 10)])
def test_stream_length_is_the_batches_holding_the_lookups(lookups, want):
    cfg = _cfg("workload.batch_size=32", "workload.pooling_factor=3", f"timing.stream_lookups={lookups}")
    first = next(workload_stream(cfg))
    assert first.num_lookups == 96
    assert stream_length(cfg, first) == want


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_the_timed_calls_take_the_streams_batches_in_turn(mode):
    """Batches 0..k-1 of the workload stream, drawn independently here, in order, then again from 0."""
    cfg = _cfg(f"mode={mode}", "workload=zipf", "workload.batch_size=16", "timing.stream_lookups=48")
    module, first, step = build_point(cfg)
    seen = _recorded(module)
    for _ in range(7):
        step()
    stream = workload_stream(cfg)
    want = [next(stream).indices.tolist() for _ in range(3)]
    assert first.indices.tolist() == want[0]
    assert len({tuple(b) for b in want}) == 3  # distinct batches
    assert seen == [want[i % 3] for i in range(7)]


def test_a_training_stream_steps_as_a_loop_over_its_batches():
    """nn.EmbeddingBag sparse + SGD on a stream of 4 batches: the parameters after 6 timed-step calls are
    bitwise those of 6 hand-written SGD steps over batches 0, 1, 2, 3, 0, 1 with the step's upstream gradient."""
    cfg = _cfg("impl=dense", "mode=train", "workload.batch_size=8", "workload.pooling_factor=2",
               "timing.stream_lookups=64")
    module, _, step = build_point(cfg)
    twin = build_module(cfg)
    twin.load_state_dict(module.state_dict())
    for _ in range(6):
        step()
    stream = workload_stream(cfg)
    batches = [next(stream) for _ in range(4)]
    grad_out = torch.randn(batches[0].offsets.numel(), cfg.table.embedding_dim,
                           generator=torch.Generator().manual_seed(cfg.seed))
    opt = torch.optim.SGD(twin.parameters(), lr=cfg.mode.lr)
    for i in range(6):
        b = batches[i % 4]
        opt.zero_grad(set_to_none=True)
        twin(b.indices, b.offsets, b.per_sample_weights).backward(grad_out)
        opt.step()
    for a, b in zip(module.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(module.parameters()), build_module(cfg).weight)  # it did train


def test_rows_record_the_stream():
    rows = measure_point(_cfg("workload.batch_size=16", "timing.stream_lookups=40"))
    assert {(r["stream_lookups"], r["timed_batches"]) for r in rows} == {(40, 3)}
    rows = measure_point(_cfg("workload.batch_size=16"))
    assert {(r["stream_lookups"], r["timed_batches"]) for r in rows} == {(0, 1)}


def test_reuse_between_batches_is_accepted_for_a_stream_only():
    with pytest.raises(ValueError, match="workload.reuse_fraction: got 0.5 with cache.enabled=false"):
        _cfg("workload.reuse_fraction=0.5")
    cfg = _cfg("workload.reuse_fraction=0.5", "workload.batch_size=64", "timing.stream_lookups=128")
    module, first, step = build_point(cfg)
    seen = _recorded(module)
    step(), step()
    # the second timed batch repeats about half of the first batch's lookups (ttrec.workloads' reuse)
    repeated = sum(x in set(seen[0]) for x in seen[1]) / len(seen[1])
    assert 0.3 < repeated < 0.8


@pytest.mark.parametrize("value", [-1, (1 << 28) + 1, True, 2.5])
def test_bad_stream_lookups_are_named(value):
    with pytest.raises(ValueError, match=r"timing.stream_lookups: got .*must be an int in \[0, 268,435,456\]"):
        TimingConfig(stream_lookups=value)


@pytest.mark.skipif(unavailable_reason() is not None, reason=f"native kernel: {unavailable_reason()}")
def test_the_fused_native_step_takes_the_stream_and_trains_as_a_loop():
    """The CPU-kernel experiment's fused SGD step on a stream: it takes batches 0..3 in turn, and its cores
    after 6 calls are bitwise those of a twin module stepped by hand over batches 0, 1, 2, 3, 0, 1."""
    cfg = _cfg("impl=tt_cpu", "mode=train", "mode.fused=true", "workload=zipf", "workload.batch_size=32",
               "timing.stream_lookups=128")
    module, _, step = build_point(cfg)
    twin = build_module(cfg)
    twin.load_state_dict(module.state_dict())
    seen = _recorded(module)
    for _ in range(6):
        step()
    stream = workload_stream(cfg)
    batches = [next(stream) for _ in range(4)]
    assert seen == [batches[i % 4].indices.tolist() for i in range(6)]
    grad_out = torch.randn(batches[0].offsets.numel(), cfg.table.embedding_dim,
                           generator=torch.Generator().manual_seed(cfg.seed))
    for i in range(6):
        twin(batches[i % 4].indices, batches[i % 4].offsets).backward(grad_out)
    for a, b in zip(module.tt_cores, twin.tt_cores):
        assert torch.equal(a, b)


def test_the_memory_probe_and_the_timed_point_take_what_they_need():
    """build_point(timed=False) (the memory probe's child: one call) draws batch 0 only; a timed point the stream."""
    cfg = _cfg("workload.batch_size=16", "timing.stream_lookups=64")
    assert len(build_point(cfg, timed=False)[2].batches) == 1
    assert len(build_point(cfg)[2].batches) == 4


def test_per_lookup_metrics_divide_by_the_streams_mean_lookups():
    """With a spread of bag sizes each batch of the stream holds its own count of lookups: time_per_lookup is
    the median call time over their mean, not over batch 0's."""
    cfg = _cfg("workload.batch_size=16", "workload.pooling_factor=10", "workload.pooling_sigma=8",
               "workload.pooling_distribution=uniform", "timing.stream_lookups=800")
    rows = {r["metric"]: r for r in measure_point(cfg)}
    stream = workload_stream(cfg)
    counts = [next(stream).num_lookups for _ in range(rows["time_per_batch"]["timed_batches"])]
    assert len(set(counts)) > 1
    mean = sum(counts) / len(counts)
    assert rows["time_per_lookup"]["median"] == pytest.approx(rows["time_per_batch"]["median"] * 1e6 / mean, rel=1e-9)


@pytest.mark.parametrize("overrides,why", [
    (["timing.stream_lookups=4096", "cache=lfu"], "with cache.enabled=true"),
    (["timing.stream_lookups=4096", "workload.distribution=criteo", "workload.criteo_path=day_0"],
     "with workload.distribution=criteo"),
    (["timing.stream_lookups=4096", "task=topk_stability"], "with task=topk_stability"),
    (["timing.stream_lookups=200000", "workload.batch_size=1"],
     "with workload.batch_size=1 x pooling_factor=1: that is 200,000 batches, more than 131,072"),
])
def test_a_stream_is_refused_where_it_would_not_be_measured_as_it_says(overrides, why):
    with pytest.raises(ValueError, match=r"timing.stream_lookups: got [0-9]+ " + why.replace(".", r"\.")):
        _cfg(*overrides)


def test_a_stream_of_batches_of_different_sizes_is_refused_by_name():
    """One upstream gradient serves the whole stream, so its batches must hold one number of bags."""
    from benches.app import build_step
    from ttrec.workloads import Workload, generate_batch
    cfg = _cfg("mode=train", "impl=dense")
    batches = [generate_batch(Workload(batch_size=n), 1000) for n in (8, 9)]
    with pytest.raises(ValueError, match=r"timing.stream_lookups: the timed batches hold different numbers of bags"):
        build_step(build_module(cfg), batches, cfg)


def test_reuse_needs_two_timed_batches_or_more():
    """A stream that one batch holds (stream_lookups <= batch_size x pooling_factor) times batch 0 alone: reuse
    would change nothing, so it is refused as without a stream."""
    with pytest.raises(ValueError, match=r"workload.reuse_fraction: got 0.5 .*batch_size x pooling_factor = 192"):
        _cfg("workload.reuse_fraction=0.5", "workload.batch_size=64", "workload.pooling_factor=3",
             "timing.stream_lookups=192")
    _cfg("workload.reuse_fraction=0.5", "workload.batch_size=64", "workload.pooling_factor=3", "timing.stream_lookups=193")


def test_a_bad_value_from_the_command_line_names_the_key():
    from benches.config import check_values
    why = check_values(["timing.stream_lookups=-5"])
    assert why is not None and "timing.stream_lookups: got -5; must be an int in [0, 268,435,456]" in why


def test_figures_split_series_by_the_way_of_timing():
    """Rows replayed and on a stream are two series of a figure, never one median."""
    import pandas as pd
    from reports.figures import _series_label
    d = pd.DataFrame({"stream_lookups": [0, 8388608], "tt_rank": [8, 8]})
    assert list(_series_label(d, pd.Series(["nn.EmbeddingBag"] * 2), axes=("tt_rank",))) == [
        "nn.EmbeddingBag, stream_lookups 0", "nn.EmbeddingBag, stream_lookups 8388608"]
