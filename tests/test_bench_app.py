"""The Hydra harness: configs compose, bad configs fail clearly, the app runs end to end."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from benches.app import measure_point
from benches.config import BenchConfig, check_override_keys, register, to_objects
from benches.results import AGGREGATE_FILE, FAILED_FILE, collect

from .apprun import run_app

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
QUICK = ["timing=quick", "timing.target_time_s=0.01", "timing.min_repeats=2", "timing.max_repeats=2", "timing.warmup=1"]

register()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="bench", overrides=list(overrides))


@pytest.mark.parametrize("group,options", [
    ("impl", ["tt", "tt_reference", "tt_cpu", "t3nsor", "dense", "tltorch"]),
    ("table", ["small", "tiny", "kaggle_largest", "terabyte_largest", "scaled"]),
    ("workload", ["uniform", "zipf"]),
    ("timing", ["default", "quick", "scaled"]),
    ("mode", ["forward", "train"]),
])
def test_every_group_option_composes_to_the_schema(group, options):
    for option in options:
        cfg = to_objects(_compose(f"{group}={option}"))
        assert isinstance(cfg, BenchConfig)
    listed = sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
    assert listed == sorted(options), "a config file exists that this test does not compose"


def test_experiment_default_sets_a_sweep():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="bench", overrides=["experiment=default"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert set(cfg.hydra.sweeper.params) == {"impl", "tt.rank", "workload.pooling_factor"}
    assert cfg.workload.batch_size == 4096


def test_table_kaggle_largest_is_the_papers_table():
    cfg = to_objects(_compose("table=kaggle_largest"))
    assert (cfg.table.num_embeddings, cfg.table.embedding_dim) == (10131227, 16)


@pytest.mark.parametrize("override,needle", [
    ("impl.foo=1", "foo"),                       # unknown key
    ("+tt.rankk=3", "rankk"),                    # unknown key added
    ("tt.init=gaussian", "calibrated"),          # enum lists what is allowed
    ("impl.name=faiss", "t3nsor"),
    ("tt.rank=abc", "rank"),                     # wrong type
    ("table=huge", "huge"),                      # unknown group option
])
def test_bad_config_fails_at_composition_naming_key_and_value(override, needle):
    with pytest.raises((ConfigCompositionException, ValidationError, ValueError)) as exc:
        to_objects(_compose(override))
    text = str(exc.value) + str(exc.value.__cause__ or "")
    assert needle in text


@pytest.mark.parametrize("args,needle", [
    (["tt.rnak=16"], "'rnak' is not a key of 'tt' (TTConfig); allowed: d, init, p_shapes, q_shapes, rank; "
                     "did you mean 'tt.rank'?"),
    (["-m", "timing.thread=1,2"], "did you mean 'timing.threads'?"),
    (["seeed=3"], "'seeed' is not a key of the config (BenchConfig)"),
    (["scale.rowz=3"], "did you mean 'scale.rows'?"),
    (["tt.rank=8", "workload.nonsense=1"], "workload.nonsense=1: 'nonsense' is not a key of 'workload'"),
])
def test_misspelt_keys_name_the_allowed_ones(args, needle):
    assert needle in check_override_keys(args)


@pytest.mark.parametrize("args", [["tt.rank=8", "table=small", "hydra/launcher=cpu_pool", "hydra.run.dir=x"],
                                  ["+tt.rnak=1"], ["experiment=fig3", "scale=smoke", "tt.p_shapes=[10,10,10]"],
                                  ["-m", "tt.rank=8,16", "impl=tt,dense"]])
def test_known_keys_groups_and_additions_pass_the_key_check(args):
    assert check_override_keys(args) is None


def test_app_refuses_a_misspelt_key_before_hydra():
    r = run_app("tt.rnak=16", timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: tt.rnak=16: 'rnak' is not a key of 'tt'")
    assert "did you mean 'tt.rank'?" in r.stderr and "+tt.rnak" not in r.stderr


@pytest.mark.parametrize("override,needle", [
    ("tt.rank=0", "tt.rank"), ("tt.d=1", "tt.d"), ("timing.threads=0", "timing.threads"), ("mode.lr=-1", "mode.lr"),
    ("timing.target_time_s=-5", "timing.target_time_s"), ("tt.p_shapes=[10,100]", "tt.p_shapes"),
    ("workload.batch_size=0", "workload.batch_size"), ("timing.max_repeats=1", "timing.max_repeats"),
])
def test_out_of_range_values_fail_with_the_key(override, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        to_objects(_compose(override))


@pytest.mark.parametrize("impl", ["tt", "t3nsor", "dense", "tltorch"])
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_measure_point_rows(impl, mode):
    cfg = to_objects(_compose(f"impl={impl}", f"mode={mode}", "table=tiny", "tt.rank=4",
                              "workload.batch_size=16", "workload.pooling_factor=3", *QUICK))
    rows = measure_point(cfg, experiment="test")
    df = pd.DataFrame(rows)
    expected = {"time_per_batch", "time_per_lookup", "throughput"} | (
        {"gflops"} if impl in ("tt", "tltorch") and mode == "forward" else set())
    assert set(df["metric"]) == expected
    assert (df["median"] > 0).all() and (df["n"] == 2).all()
    r = rows[0]
    assert r["impl"] == impl and r["mode"] == mode and r["pooling_factor"] == 3 and r["threads"] == "2"
    assert r["num_embeddings"] == 1000 and r["experiment"] == "test"
    if impl == "dense":
        assert r["tt_rank"] is None and r["param_bytes"] == 1000 * 16 * 4
    else:
        assert r["tt_rank"] == 4 and r["tt_p_shapes"] == "10x10x10"
        assert r["param_bytes"] == 4 * (1 * 10 * 2 * 4 + 4 * 10 * 2 * 4 + 4 * 10 * 4 * 1)
    # time per lookup is time per batch spread over batch_size * pooling lookups
    per_batch = df.set_index("metric").loc["time_per_batch", "median"]
    per_lookup = df.set_index("metric").loc["time_per_lookup", "median"]
    assert per_lookup == pytest.approx(per_batch * 1e6 / 48, rel=1e-9)


@pytest.mark.parametrize("fused", [False, True])
def test_train_mode_changes_parameters(fused):
    cfg = to_objects(_compose("impl=tt", "mode=train", f"mode.fused={fused}", "table=tiny", "tt.rank=4", *QUICK))
    from benches.app import build_module, build_step
    from ttrec.workloads import Workload, generate_batch

    import ttrec

    module = build_module(cfg)
    before = [p.detach().clone() for p in module.tt_cores]
    batch = generate_batch(Workload(batch_size=8, pooling_factor=3), 1000)
    build_step(module, batch, cfg)()
    assert (module.optimizer is not None) == fused
    # one SGD step: cores - lr * gradient, the gradient by autograd through the reference backend for
    # the upstream gradient the step uses (randn seeded with cfg.seed)
    grad_out = torch.randn(batch.offsets.numel(), 16, generator=torch.Generator().manual_seed(cfg.seed))
    ref = [c.double().requires_grad_() for c in before]
    bags = ttrec.make_bags(batch.indices, batch.offsets, None, num_embeddings=1000, mode="sum")
    grads = torch.autograd.grad(ttrec.tt_embedding_bag(ref, module.spec, bags), ref, grad_out.double())
    for c, c0, g in zip(module.tt_cores, before, grads):
        torch.testing.assert_close(c.detach().double(), c0.double() - cfg.mode.lr * g, rtol=1e-5, atol=1e-7)
    assert any((c.detach() != c0).any() for c, c0 in zip(module.tt_cores, before))


def test_fused_mode_applies_to_tt_only_and_the_rows_say_what_ran():
    rows = {}
    for impl in ("tt", "dense"):
        cfg = to_objects(_compose(f"impl={impl}", "mode=train", "mode.fused=true", "table=tiny", *QUICK))
        rows[impl] = measure_point(cfg)
    assert all(r["fused"] is True for r in rows["tt"])
    assert all(r["fused"] is False and r["optimizer"] == "sgd" for r in rows["dense"])


def _run_app(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_app(*overrides, timeout=300)


@pytest.mark.slow
def test_app_sweep_end_to_end_in_a_subprocess(tmp_path):
    sweep = tmp_path / "sweep"
    figs = tmp_path / "figs"
    done = _run_app(tmp_path, "-m", "impl=tt,t3nsor,dense", "tt.rank=2,4", "workload.pooling_factor=1,5",
                    "table=tiny", "workload.batch_size=8", *QUICK,
                    f"hydra.sweep.dir={sweep}", f"figures_dir={figs}")
    assert done.returncode == 0, done.stderr[-3000:]
    df = pd.read_csv(sweep / AGGREGATE_FILE)
    # 12 jobs; nn.EmbeddingBag reads no tt.* setting, so its tt.rank=4 jobs find the tt.rank=2 ones
    # and are not measured again: 10 jobs x 3 metrics, + gflops for the 4 tt jobs
    assert len(df) == 10 * 3 + 4
    assert len(collect(sweep)) == len(df) and df['job_dir'].nunique() == 10
    assert done.stdout.count("not measured again: impl=dense reads no tt.* setting") == 2
    points = df[df["metric"] == "time_per_lookup"]
    assert sorted(points.groupby(["impl"]).size().items()) == [("dense", 2), ("t3nsor", 4), ("tt", 4)]
    assert set(points["pooling_factor"]) == {1, 5}
    assert set(points.loc[points["impl"] != "dense", "tt_rank"]) == {2, 4}
    for col in ("git_sha", "torch", "cpu_model", "threads", "median", "iqr", "unit"):
        assert col in df.columns
    assert (figs / "time_vs_rank.png").stat().st_size > 10_000
    assert (figs / "time_vs_rank.pdf").exists()
    assert not (figs / "fig11_time_vs_rank.png").exists()  # the fig11 preset's name: a sweep of one's own keeps off it


@pytest.mark.slow
def test_app_bad_override_exits_nonzero_with_message(tmp_path):
    done = _run_app(tmp_path, "tt.rank=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 1
    assert "error: ValueError: tt.rank: got 0" in done.stderr and "Traceback" not in done.stderr
    assert "Traceback" in (tmp_path / "run" / FAILED_FILE).read_text()  # the traceback is kept on disk
    assert not (tmp_path / "run" / "results.csv").exists()


@pytest.mark.slow
def test_a_failed_job_does_not_cost_the_sweep_the_other_jobs_results(tmp_path):
    sweep = tmp_path / "sweep"
    done = _run_app(tmp_path, "-m", "tt.rank=0,2,4", "table=tiny", "workload.batch_size=8", *QUICK,
                    f"hydra.sweep.dir={sweep}", f"figures_dir={tmp_path / 'figs'}")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    df = pd.read_csv(sweep / AGGREGATE_FILE)  # jobs 1 and 2 finished after job 0 failed
    assert sorted(df["job_dir"].astype(str).unique()) == ["1", "2"] and set(df["tt_rank"]) == {2, 4}
    assert "tt.rank: got 0" in (sweep / "0" / FAILED_FILE).read_text()
    assert "1 job(s) of the sweep failed" in done.stdout and "job 0: ValueError: tt.rank: got 0" in done.stdout


@pytest.mark.slow
def test_scale_without_an_experiment_is_a_clear_error(tmp_path):
    done = _run_app(tmp_path, "scale=smoke", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 1
    assert "scale: got 'smoke' without an experiment" in done.stderr
    assert not (tmp_path / "run" / "results.csv").exists()


def test_results_are_collected_in_job_order(tmp_path):
    for job in ("10", "2", "0", "1"):
        (tmp_path / job).mkdir()
        pd.DataFrame([{"job": int(job)}]).to_csv(tmp_path / job / "results.csv", index=False)
    assert list(collect(tmp_path)["job_dir"]) == ["0", "1", "2", "10"]
