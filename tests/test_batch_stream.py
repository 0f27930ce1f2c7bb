"""timing.stream_lookups: the timed calls take distinct batches of the workload stream in turn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from benches.app import build_module, build_point, measure_point, stream_length
from benches.cache_experiments import workload_stream
from benches.config import TimingConfig, register, to_objects

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
