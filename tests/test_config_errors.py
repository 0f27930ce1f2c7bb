"""Settings that cannot work together, or that the chosen implementation never reads, fail at config
validation naming the key, the value and what is allowed: before anything is built or measured."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from benches.config import register, to_objects

from .apprun import run_app

CONF = str(Path(__file__).resolve().parents[1] / "conf")
SEED_MAX = 2**32 - 1

register()


def _objects(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return to_objects(compose(config_name="bench", overrides=list(overrides)))


@pytest.mark.parametrize("overrides,start,needles", [
    (["seed=99999999999999999999"], "seed: got 99999999999999999999", [f"[0, {SEED_MAX}]"]),
    (["seed=-1"], "seed: got -1", [f"[0, {SEED_MAX}]"]),
    (["workload.weighted=true", "workload.pooling=mean"], "workload.weighted: got true",
     ["workload.pooling=mean", "workload.pooling=sum"]),
    (["workload.weighted=true", "workload.distribution=criteo", "workload.criteo_path=day_0"],
     "workload.weighted: got true", ["workload.distribution=criteo"]),
    (["mode=train", "mode.fused=true", "impl=tt_reference"], "mode.fused: got true",
     ["impl.backend=torch", "auto, cpu or cuda"]),
    (["impl=dense", "impl.backend=cuda"], "impl.backend: got 'cuda'", ["impl.name=dense", "impl.backend=auto"]),
    (["impl=t3nsor", "impl.backend=torch"], "impl.backend: got 'torch'", ["impl.name=t3nsor", "impl.backend=auto"]),
    (["impl=tltorch", "impl.backend=cpu"], "impl.backend: got 'cpu'", ["impl.name=tltorch", "impl.backend=auto"]),
    (["impl=tt", "impl.sparse=false"], "impl.sparse: got false", ["impl.name=tt", "impl.name=dense"]),
    (["impl=t3nsor", "impl.sparse=false"], "impl.sparse: got false", ["impl.name=t3nsor", "impl.name=dense"]),
    (["timing.flush_l2=true"], "timing.flush_l2: got true", ["device=cpu", "device=cuda"]),
    (["workload.zipf_alpha=1.5"], "workload.zipf_alpha: got 1.5 with workload.distribution=uniform",
     ["distribution=zipf", "default 1.05"]),
    (["workload=zipf", "workload.hit_rate=0.5"], "workload.hit_rate: got 0.5 with workload.distribution=zipf",
     ["distribution=hot_set"]),
    (["workload.distribution=hot_set", "workload.permute=false"],
     "workload.permute: got False with workload.distribution=hot_set", ["distribution=zipf"]),
    (["cache=lfu", "impl=dense"], "cache.enabled: true needs impl=tt, got impl=dense", ["cache=none"]),
    (["cache=lfu", "impl=t3nsor"], "cache.enabled: true needs impl=tt, got impl=t3nsor", ["cache=none"]),
])
def test_conflicting_or_unread_settings_fail_at_validation_naming_the_keys(overrides, start, needles):
    with pytest.raises(ValueError) as exc:
        _objects(*overrides)
    message = str(exc.value)
    assert message.startswith(start), message
    assert all(n in message for n in needles), message


@pytest.mark.parametrize("overrides", [
    ["seed=0"], [f"seed={SEED_MAX}"],
    ["workload.weighted=true", "workload.pooling=sum"],
    ["mode=train", "mode.fused=true", "impl=tt_cpu"],            # a native backend: fused runs
    ["mode=forward", "mode.fused=true", "impl=tt_reference"],    # no training step: nothing fused
    ["mode=train", "mode.fused=true", "impl=dense"],             # fig11's sweep: the fused column says False
    ["impl=dense", "impl.sparse=false"], ["impl=tt_cpu"], ["impl=tt_reference"], ["impl=t3nsor"],
    ["workload=zipf", "workload.zipf_alpha=1.5", "workload.permute=false"],
    ["workload.distribution=hot_set", "workload.hit_rate=0.5", "workload.hot_fraction=0.01"],
    ["experiment=fig9", "workload.distribution=criteo", "workload.criteo_path=day_0", "workload.zipf_alpha=1.05"],
    ["cache=lfu", "impl=tt_cpu"], ["cache=lfu", "impl=tt_reference"],
    ["experiment=fig10_training"],                               # train_dlrm caches its own TT tables
])
def test_meaningful_combinations_still_validate(overrides):
    _objects(*overrides)


def test_output_directories_blocked_by_a_file_are_named(tmp_path):
    from benches.config import check_output_dirs

    file = tmp_path / "somefile"
    file.write_text("")
    assert check_output_dirs([f"results_root={file}"]) == (
        f"results_root: got '{file}', which is a file, not a directory; results_root must be a directory or "
        f"a path that does not exist yet (it is created)")
    assert check_output_dirs([f"figures_dir={file}/figs"]).startswith(
        f"figures_dir: got '{file}/figs', but '{file}' is a file")
    assert check_output_dirs(["-m", f"hydra.sweep.dir={tmp_path}/ok,{file}"]).startswith("hydra.sweep.dir: got")
    assert check_output_dirs([f"results_root={file}", f"results_root={tmp_path}"]) is None  # the last one counts
    assert check_output_dirs([f"results_root={tmp_path}/new/deeper", "tt.rank=8"]) is None


@pytest.mark.parametrize("key", ["results_root", "figures_dir", "hydra.run.dir"])
def test_an_empty_output_directory_is_refused(key):
    """``results_root=`` (an empty value) put the run under the filesystem's root (/runs/<time>): refused."""
    from benches.config import check_output_dirs

    assert check_output_dirs([f"{key}="]) == (f"{key}: got ''; {key} must name a directory (relative paths are taken "
                                               "from the current directory, e.g. outputs)")
    assert check_output_dirs([f"{key}=''"]) is not None


@pytest.mark.slow
def test_app_refuses_a_results_root_that_is_a_file_before_hydra(tmp_path):
    file = tmp_path / "somefile"
    file.write_text("")
    r = run_app(f"results_root={file}", "table=tiny", timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: ValueError: results_root: got '{file}'")
    assert "Traceback" not in r.stderr and file.is_file()


_CRITEO_WORKLOAD = ["workload.distribution=criteo", "workload.criteo_path=day_0"]


@pytest.mark.parametrize("override,start,default", [
    ("workload.pooling_factor=8", "workload.pooling_factor: got 8 with workload.distribution=criteo", "default 1"),
    ("workload.reuse_fraction=0.5", "workload.reuse_fraction: got 0.5 with workload.distribution=criteo",
     "default 0.0"),
    ("workload.pooling_sigma=2.0", "workload.pooling_sigma: got 2.0 with workload.distribution=criteo",
     "default 0.0"),
    ("workload.pooling_distribution=normal",
     "workload.pooling_distribution: got normal with workload.distribution=criteo", "default fixed"),
])
def test_synthetic_workload_keys_set_with_criteo_are_errors(override, start, default):
    with pytest.raises(ValueError) as exc:
        _objects(*_CRITEO_WORKLOAD, override)
    assert str(exc.value).startswith(start) and default in str(exc.value), str(exc.value)


def test_synthetic_workload_keys_at_their_defaults_are_fine_with_criteo():
    cfg = _objects(*_CRITEO_WORKLOAD, "workload.pooling_factor=1", "workload.reuse_fraction=0",
                   "workload.pooling_distribution=fixed")
    assert cfg.workload.distribution.value == "criteo"


@pytest.mark.parametrize("cls", ["TTEmbeddingBag", "T3nsorEmbeddingBag", "DenseEmbeddingBag"])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_embedding_bags_on_cuda_without_cuda_name_the_device_argument(cls, device, monkeypatch):
    import torch

    import ttrec.baselines
    import ttrec.tt

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    make = getattr(ttrec.tt if cls == "TTEmbeddingBag" else ttrec.baselines, cls)
    args = (1000, 16) if cls == "DenseEmbeddingBag" else (1000, 16, 4)
    with pytest.raises(ValueError, match=rf"device: got '{device}', but CUDA is not available.*allowed: cpu"):
        make(*args, device=device)
    make(*args, device="cpu")  # and cpu is fine


@pytest.mark.parametrize("distribution", ["uniform", "zipf", "hot_set"])
@pytest.mark.parametrize("key,value,shown", [("criteo_path", "day_0", "day_0"), ("criteo_feature", 5, "5"),
                                             ("criteo_mapping", "dictionary", "dictionary")])
def test_criteo_keys_without_the_criteo_distribution_are_refused_not_ignored(distribution, key, value, shown):
    """workload.criteo_* under a synthetic distribution measured the synthetic stream and left the
    criteo columns empty: a setting silently ignored, as README says no workload key may be."""
    from benches.config import CriteoMapping, Distribution, WorkloadConfig

    if key == "criteo_mapping":
        value = CriteoMapping(value)
    with pytest.raises(ValueError, match=rf"workload\.{key}: got {shown} with workload\.distribution={distribution}; "
                                         r"only distribution=criteo reads it: set workload\.distribution=criteo, or"):
        WorkloadConfig(distribution=Distribution(distribution), **{key: value})
    WorkloadConfig(distribution=Distribution.criteo, **{"criteo_path": "day_0", key: value})  # read there


@pytest.mark.parametrize("key,value,source", [("criteo_path", "day_0", "synthetic"),
                                              ("criteo_eval_path", "day_1", "synthetic"),
                                              ("criteo_mapping", "dictionary", "synthetic"),
                                              ("zipf_alpha", 1.2, "criteo")])
def test_dlrm_keys_of_the_other_click_source_are_refused_not_ignored(key, value, source):
    from benches.config import ClickSource, CriteoMapping, DLRMConfig

    if key == "criteo_mapping":
        value = CriteoMapping(value)
    extra = {"criteo_path": "day_0"} if source == "criteo" else {}
    with pytest.raises(ValueError, match=rf"dlrm\.{key}: got \S+ with dlrm\.source={source}; only source="):
        DLRMConfig(source=ClickSource(source), **extra, **{key: value})
    other = "criteo" if source == "synthetic" else "synthetic"
    DLRMConfig(source=ClickSource(other), **{**({"criteo_path": "day_0"} if other == "criteo" else {}),
                                             key: value})  # read there


def test_a_hot_set_key_under_uniform_names_no_workload_preset_that_does_not_exist():
    from benches.config import Distribution, WorkloadConfig

    with pytest.raises(ValueError) as e:
        WorkloadConfig(distribution=Distribution.uniform, hit_rate=0.5)
    assert "workload=hot_set" not in str(e.value) and "workload.distribution=hot_set" in str(e.value)


def test_a_missing_criteo_file_is_named_by_its_config_key(tmp_path, monkeypatch):
    """The job that reads a Criteo file says which key named a file that is not there (and where a
    relative path was looked for), before reading: the workload's stream and the DLRM's click source."""
    from benches.cache_experiments import workload_stream
    from benches.training import build_data

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"^workload\.criteo_path: got 'day_0'; no such file \(a relative path is "
                                         rf"read from {tmp_path}"):
        workload_stream(_objects(*_CRITEO_WORKLOAD, "table=tiny"))
    with pytest.raises(ValueError, match=r"^dlrm\.criteo_path: got '/nowhere/day_0'; no such file\. It names"):
        build_data(_objects("dlrm.source=criteo", "dlrm.criteo_path=/nowhere/day_0"))
    (tmp_path / "day_0").write_text("")
    with pytest.raises(ValueError, match=r"^dlrm\.criteo_eval_path: got 'day_1'; no such file"):
        build_data(_objects("dlrm.source=criteo", "dlrm.criteo_path=day_0", "dlrm.criteo_eval_path=day_1"))


def test_bad_values_are_found_before_hydra_makes_a_directory():
    """check_values composes what the command line asks for and runs to_objects' checks on it: each
    value of a command-line sweep, the other sweeps at their first value."""
    from benches.config import check_values

    assert check_values(["tt.rank=0"]) == "tt.rank: got 0; must be >= 1"
    assert check_values(["-m", "tt.rank=4,8,0", "workload.pooling_factor=1,10"]) == "tt.rank: got 0; must be >= 1"
    assert check_values(["-m", "tt.rank=4,8", "workload.batch_size=8,-5"]) == "workload.batch_size: got -5; must be >= 1"
    assert check_values(["experiment=fig11", "scale=smoke", "workload.batch_size=-5"]).startswith(
        "workload.batch_size: got -5")
    # what it leaves to Hydra or the job: types, unknown groups, sweeps of quoted text, hydra's own keys
    for args in (["tt.rank=abc"], ["table=nope"], ["-m", "results_root='a b',c"], ["hydra.run.dir=/x"],
                 ["hydra/launcher=cpu_pool"], ["-m", "tt.rank=4,8", "impl=dense,tt"], []):
        assert check_values(args) is None, args


def test_what_a_job_would_refuse_is_found_before_hydra_too(monkeypatch):
    """The job's own checks before it measures (benches.config.check_point) run in the early check as well:
    a scale without an experiment, list values (shapes, an analysis preset's lists), a TT format that cannot
    be made (named by the command line's keys), cores too big for the memory, a backend this machine lacks.
    Each had been one failed job per point, with a directory and failed.txt, and exit 1."""
    import ttrec.init
    from benches.config import check_values
    from ttrec.tt import backend_status

    monkeypatch.setattr(ttrec.init, "_available_bytes", lambda: 64 * 2**30)  # (not this machine's MemAvailable)
    assert check_values(["scale=smoke"]).startswith("scale: got 'smoke' without an experiment")
    assert check_values(["tt.p_shapes=[10,10]"]) == ("tt.p_shapes: got [10, 10] (2 factors) with tt.d=3; give d "
                                                      "factors, or set tt.d=2")
    assert check_values(["tt.q_shapes=[2,2,2]"]).startswith("tt.q_shapes=(2, 2, 2) has prod=8 != embedding_dim=16")
    assert check_values(["tt.p_shapes=[10,10,10]", "tt.q_shapes=[2,2,4]"]).startswith(
        "tt.p_shapes=(10, 10, 10) covers prod=1000 rows < num_embeddings=100000")
    assert check_values(["-m", "tt.rank=4,100000"]).startswith("tt.rank: got [100000, 100000] with tt.p_shapes=")
    assert check_values(["experiment=table2", "analysis.ranks=[0]"]) == "analysis.ranks[0]: got 0; must be >= 1"
    assert check_values(["impl.backend=torch", "tt.d=5"]) is None  # (the reference runs any d)
    if backend_status("cuda") is not None:
        assert check_values(["impl.backend=cuda"]).startswith("impl.backend: got 'cuda', which cannot run here")
    if backend_status("cpu") is None:
        assert check_values(["impl.backend=cpu", "tt.d=5"]).endswith(
            "d=5 cores; the native kernel supports 2..4; impl.backend=auto takes the fastest backend that can")
    assert check_values(["experiment=table1", "dlrm.source=criteo", "dlrm.criteo_path=/nonexistent/day_0"]) == (
        "dlrm.criteo_path: got '/nonexistent/day_0'; no such file. It names a Criteo text file (Kaggle train.txt or "
        "Terabyte day_N)")
    assert check_values(["experiment=table1", "dlrm.source=criteo", "dlrm.criteo_path=/"]).startswith(
        "dlrm.criteo_path: got '/'; not a regular file.")
    assert check_values(["experiment=fig3", "analysis.inits=[uniform,normal]", "tt.rank=0"]) == (
        "tt.rank: got 0; must be >= 1")  # (a list of names read too: it had switched the whole check off)
    for args in (["tt.p_shapes=[50,50,40]", "tt.q_shapes=[2,2,4]"], ["experiment=default", "scale=smoke"],
                 ["impl=dense", "tt.rank=100000"]):  # (nn.EmbeddingBag reads no tt.* setting)
        assert check_values(args) is None, args
    # a launcher that runs the jobs elsewhere (a SLURM login node): what this machine lacks is the job's to
    # find there, where it runs; what the config alone refuses is still found here
    for args in (["impl.backend=cuda"], ["-m", "tt.rank=4,100000"],
                 ["experiment=table1", "dlrm.source=criteo", "dlrm.criteo_path=/nonexistent/day_0"]):
        assert check_values([*args, "hydra/launcher=slurm"]) is None, args
        assert check_values([*args, "hydra/launcher=cpu_pool"]) is not None or args == ["impl.backend=cuda"], args
    assert check_values(["tt.p_shapes=[10,10]", "hydra/launcher=slurm"]).startswith("tt.p_shapes: got [10, 10]")


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment")
                                          .glob("*.yaml")))
def test_every_preset_passes_the_check_before_hydra(preset):
    """No preset at any scale is refused by the early check (it would refuse what the job accepts)."""
    from benches.config import check_values

    for scale in sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "scale").glob("*.yaml")):
        assert check_values([f"experiment={preset}", f"scale={scale}"]) is None


def test_new_run_dirs_are_distinct_within_a_second(tmp_path, monkeypatch):
    """Runs started in the same second (two gates at once) get directories of their own: the stamp has
    microseconds, and a name taken already gets a suffix."""
    import datetime as dt

    from benches import results

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 7, 12, 22, 10, 734935)

    monkeypatch.setattr(results.dt, "datetime", Frozen)
    made = [results.new_run_dir(tmp_path / "gate") for _ in range(3)]
    assert [p.name for p in made] == ["20261207-122210-734935", "20261207-122210-734935-2", "20261207-122210-734935-3"]
    assert all(p.is_dir() for p in made)
