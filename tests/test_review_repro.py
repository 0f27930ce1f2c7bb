"""Review of reproducibility and determinism: the same seed gives the same workloads, modules and
non-timing results (in this process and in a fresh one, on 1 or 2 threads); a report regenerated
from stored results gives the same files, whatever its output directory held before."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import ttrec
from benches.app import build_point  # (registers the Hydra schema)
from benches.config import to_objects
from reports.report import build
from tests.apprun import run_app
from tests.test_bench_app import _compose
from ttrec.cpu.build import unavailable_reason
from ttrec.workloads import Workload, WorkloadStream, batch_stats

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "reports"

# every workload kind the configs offer (conf/workload/*, distribution=hot_set, bag-size spreads,
# per-sample weights, reuse between batches)
WORKLOADS = {
    "uniform": dict(distribution="uniform"),
    "uniform_weighted": dict(distribution="uniform", weighted=True),
    "normal_bags": dict(distribution="uniform", pooling_factor=5, pooling_distribution="normal", pooling_sigma=2.0),
    "uniform_bags": dict(distribution="uniform", pooling_factor=5, pooling_distribution="uniform", pooling_sigma=2.0),
    "zipf": dict(distribution="zipf"),
    "zipf_unpermuted": dict(distribution="zipf", permute=False),
    "hot_set": dict(distribution="hot_set", hit_rate=0.9, hot_fraction=0.01),
    "reuse": dict(distribution="zipf", pooling_factor=3, reuse_fraction=0.5),
}
_STREAM_SCRIPT = """
import json, sys
from tests.test_review_repro import _stream_digest
kinds, seed = json.loads(sys.argv[1]), int(sys.argv[2])
print(json.dumps({name: _stream_digest(kw, seed) for name, kw in kinds.items()}))
"""


def _streams_in_fresh_process(seed: int) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "random"}
    done = subprocess.run([sys.executable, "-c", _STREAM_SCRIPT, json.dumps(WORKLOADS), str(seed)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


def _stream_digest(kw: dict, seed: int) -> str:
    s = WorkloadStream(Workload(batch_size=64, seed=seed, **kw), 5000)
    m = hashlib.sha256()
    for _ in range(3):
        b = next(s)
        for t in (b.indices, b.offsets, b.per_sample_weights):
            m.update(b"-" if t is None else t.numpy().tobytes())
    return m.hexdigest()


def test_every_workload_kind_is_bitwise_the_same_in_a_fresh_process_and_differs_with_the_seed():
    """Batches 0-2 of each workload kind: a fresh interpreter (another hash seed) draws the same bytes
    as this one for seed 7; seed 8 draws other indices."""
    fresh7, fresh8 = _streams_in_fresh_process(7), _streams_in_fresh_process(8)
    for name, kw in WORKLOADS.items():
        assert fresh7[name] == _stream_digest(kw, 7), name
        assert fresh8[name] != fresh7[name], name


def _cfg(*overrides: str):
    return to_objects(_compose(*overrides))


def _state(module: torch.nn.Module) -> list[torch.Tensor]:
    return [v.detach().clone() for _, v in sorted(module.state_dict().items())]


@pytest.mark.parametrize("overrides", [
    ("impl=tt", "tt.init=uniform"), ("impl=tt", "tt.init=normal"), ("impl=tt", "tt.init=sampled_gaussian"),
    ("impl=tt", "tt.init=calibrated"), ("impl=t3nsor",), ("impl=dense",),
    ("impl=tt", "mode=train"), ("impl=dense", "mode=train"),
    ("impl=tt", "mode=train", "cache=lfu", "cache.fraction=0.05", "cache.warmup_iters=2"),
])
def test_the_seed_reaches_the_module_init_and_the_timed_step(overrides):
    """build_point twice with seed=3: the same initial parameters and the same state after the timed
    step (train) or the same output (forward); seed=4: other initial parameters."""
    base = ("table=tiny", "workload.batch_size=64", "workload.pooling_factor=3", "tt.rank=8", "timing.threads=1")

    def point(seed):
        module, _, step = build_point(_cfg(*base, *overrides, f"seed={seed}"))
        init = _state(module)
        out = step()
        after = _state(module) if out is None else [out.detach()]
        return init, after

    (init_a, after_a), (init_b, after_b), (init_c, _) = point(3), point(3), point(4)
    assert all(torch.equal(x, y) for x, y in zip(init_a, init_b))
    assert all(torch.equal(x, y) for x, y in zip(after_a, after_b))
    assert not all(torch.equal(x, y) for x, y in zip(init_a, init_c) if x.is_floating_point())


@pytest.mark.skipif(unavailable_reason() is not None, reason=f"native kernel: {unavailable_reason()}")
@pytest.mark.parametrize("optimizer,cached", [(None, False), ("sgd", False), ("adagrad", False), ("sgd", True)])
def test_native_results_are_bitwise_the_same_on_1_and_2_threads(optimizer, cached):
    """README: pooling in lookup order and gradients summed in fixed segments, "results do not depend
    on the thread count". A Zipf batch of 40,000 lookups (threaded paths, both sort ways timed) through
    the module: forward output, then two training steps (core gradients, or the cores after two fused
    updates; behind an LFU cache too) equal bitwise on 1 and 2 threads."""
    from ttrec.cache import CachedTTEmbeddingBag

    def run(threads):
        torch.set_num_threads(threads)
        stream = WorkloadStream(Workload(distribution="zipf", batch_size=20_000, pooling_factor=2, seed=1), 200_000)
        batch = next(stream)
        module = ttrec.TTEmbeddingBag(200_000, 16, 16, backend="cpu", seed=2, optimizer=optimizer, learning_rate=0.05)
        if cached:
            module = CachedTTEmbeddingBag(module, cache_fraction=0.01, warmup_iters=1, optimizer=optimizer,
                                          learning_rate=0.05)
            warm = next(stream)
            module(warm.indices, warm.offsets).sum().backward()
            if not module.populated:
                module.populate()
        grad = torch.randn(batch.num_bags, 16, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            out = [module(batch.indices, batch.offsets)]
        for _ in range(2):
            module(batch.indices, batch.offsets).backward(grad)
        grads = [p.grad.to_dense() for p in module.parameters() if p.grad is not None]
        return out + grads + [t for t in _state(module) if t.is_floating_point()]

    one, two = run(1), run(2)
    assert len(one) == len(two) > 1
    assert all(torch.equal(a, b) for a, b in zip(one, two))


TIMING_COLUMNS = {"median", "q1", "q3", "iqr", "n", "note", "cpu_wait"}


def test_two_runs_of_one_point_agree_on_every_non_timing_column_and_record_their_seeds(tmp_path):
    """The same single point (TT training step behind an LFU cache, Zipf workload) run twice in fresh
    processes into two directories: every column but the measurement's timing columns is identical
    (ids, seeds, config, unique-row/-prefix ratios, hit ratios, cache bytes); seed and workload.seed are
    recorded, and the recorded workload columns regenerate the timed batch (its unique-row ratio)."""
    point = ("impl=tt", "mode=train", "table=tiny", "workload=zipf", "workload.batch_size=64",
             "workload.pooling_factor=3", "tt.rank=8", "cache=lfu", "cache.fraction=0.05", "cache.warmup_iters=2",
             "timing.warmup=1", "timing.min_repeats=2", "timing.max_repeats=2", "timing.target_time_s=0",
             "timing.threads=1", "seed=3", "workload.seed=4")
    tables = []
    for run in ("a", "b"):
        done = run_app(*point, f"hydra.run.dir={tmp_path / run}", f"figures_dir={tmp_path / 'fig'}", timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        tables.append(pd.read_csv(tmp_path / run / "results.csv", keep_default_na=False, dtype=str))
    a, b = tables
    assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0
    differing = [c for c in a.columns if c not in TIMING_COLUMNS and not (a[c] == b[c]).all()]
    assert differing == []
    assert set(a["seed"]) == {"3"} and set(a["workload_seed"]) == {"4"}
    r = a.iloc[0]
    w = Workload(distribution=r["distribution"], zipf_alpha=float(r["zipf_alpha"]), permute=r["permute"] == "True",
                 batch_size=int(r["batch_size"]), pooling_factor=int(r["pooling_factor"]),
                 weighted=r["weighted"] == "True", seed=int(r["workload_seed"]))
    batch = next(WorkloadStream(w, int(r["num_embeddings"])))
    assert float(r["unique_row_ratio"]) == batch_stats(batch)["unique_row_ratio"]


def _png_software(path: Path) -> str | None:
    from PIL import Image

    return Image.open(path).info.get("Software")


def test_the_committed_report_regenerates_byte_for_byte(tmp_path):
    """`nox -s figures` (python -m reports.report) from reports/results: REPORT.md, the break-even CSV
    and every table equal the committed files; PNG and PDF too when this matplotlib is the one that
    drew the committed figures (a PNG names it in its Software chunk, the only metadata it carries)."""
    import matplotlib

    out = tmp_path / "out"
    report = build(COMMITTED / "results", out, command="python -m reports.report")
    assert report.read_bytes() == (COMMITTED / "REPORT.md").read_bytes()
    for table in (COMMITTED / "results").glob("*.csv"):
        assert (out / "results" / table.name).read_bytes() == table.read_bytes(), table.name
    committed = sorted(p for p in (COMMITTED / "figures").iterdir() if p.is_file())  # (not latest/: runs' figures)
    assert sorted(p.name for p in (out / "figures").iterdir()) == [p.name for p in committed]
    same_drawer = _png_software(next(p for p in committed if p.suffix == ".png"))
    for fig in committed:
        if fig.suffix == ".csv" or (same_drawer and matplotlib.__version__ in same_drawer):
            assert (out / "figures" / fig.name).read_bytes() == fig.read_bytes(), fig.name


def _results_dir(path: Path, names: tuple[str, ...], timings: bool) -> Path:
    path.mkdir(parents=True)
    for name in names:
        shutil.copyfile(COMMITTED / "results" / f"{name}.csv", path / f"{name}.csv")
    if timings:
        shutil.copyfile(COMMITTED / "results" / "timings.csv", path / "timings.csv")
    return path


def test_a_report_rebuilt_into_a_used_out_dir_equals_one_built_afresh(tmp_path):
    """reports.report --results B --out DIR, where DIR holds an earlier report of other results A (with
    a wall-time table): REPORT.md is the one a fresh DIR gets. (It was not: B has no timings.csv, and
    the report read DIR/results/timings.csv, left by A, as B's wall time.)"""
    a = _results_dir(tmp_path / "a", ("table2", "fig5"), timings=True)
    b = _results_dir(tmp_path / "b", ("table2",), timings=False)
    build(a, tmp_path / "used", command="cmd")
    reused = build(b, tmp_path / "used", command="cmd").read_text()
    fresh = build(b, tmp_path / "fresh", command="cmd").read_text()
    assert "## Wall time of the run" not in fresh
    assert reused == fresh, "REPORT.md depends on what --out held before (a stale wall-time table)"


def test_a_report_results_copy_holds_only_the_tables_it_was_made_from(tmp_path):
    """The report's results/ is 'a copy of the tables it was made from, so the directory stands alone':
    rebuilt into a used out dir it holds none of the earlier report's tables (fig5.csv, timings.csv
    were kept there), so a report regenerated from that copy is this report."""
    a = _results_dir(tmp_path / "a", ("table2", "fig5"), timings=True)
    b = _results_dir(tmp_path / "b", ("table2",), timings=False)
    build(a, tmp_path / "used", command="cmd")
    build(b, tmp_path / "used", command="cmd")
    assert sorted(p.name for p in (tmp_path / "used" / "results").iterdir()) == ["table2.csv"]
    again = build(tmp_path / "used" / "results", tmp_path / "again", command="cmd").read_text()
    assert again == (tmp_path / "used" / "REPORT.md").read_text()


def test_a_rebuilt_report_drops_the_figures_of_experiments_not_in_it_and_keeps_subdirectories(tmp_path):
    """figures/ is the report's own too: fig5's PNG and PDF, drawn by an earlier report of table2 and
    fig5, go when the report is rebuilt from table2 alone; a subdirectory (reports/figures/latest, where
    bench runs draw) and its files stay."""
    a = _results_dir(tmp_path / "a", ("table2", "fig5"), timings=False)
    b = _results_dir(tmp_path / "b", ("table2",), timings=False)
    build(a, tmp_path / "used", command="cmd")
    figs = tmp_path / "used" / "figures"
    assert (figs / "fig5_model_size.png").exists() and (figs / "fig5_model_size.pdf").exists()
    (figs / "latest").mkdir()
    (figs / "latest" / "time_vs_rank.png").write_bytes(b"a run's figure")
    build(b, tmp_path / "used", command="cmd")
    assert sorted(p.name for p in figs.iterdir()) == ["latest", "table2_tt_shapes.pdf", "table2_tt_shapes.png"]
    assert (figs / "latest" / "time_vs_rank.png").read_bytes() == b"a run's figure"


def test_a_report_built_in_place_keeps_its_input_tables(tmp_path):
    """--out DIR with --results DIR/results (how `nox -s figures` rebuilds reports/): the input tables
    are the report's copy already and stay, wall times included."""
    out = tmp_path / "rep"
    _results_dir(out / "results", ("table2", "fig5"), timings=True)
    before = sorted(p.name for p in (out / "results").iterdir())
    text = build(out / "results", out, command="cmd").read_text()
    assert sorted(p.name for p in (out / "results").iterdir()) == before == ["fig5.csv", "table2.csv", "timings.csv"]
    assert "## Wall time of the run" in text


def test_the_report_names_its_input_not_its_output_directory(tmp_path, monkeypatch):
    """The command line in REPORT.md names --results (where the tables came from), not --out: the same
    tables reported into two directories give the same REPORT.md; the default input is not named."""
    from reports.report import main

    tables = _results_dir(tmp_path / "tables", ("table2",), timings=False)
    for out in ("one", "two"):
        main(["--results", str(tables), "--out", str(tmp_path / out)])
    one, two = ((tmp_path / out / "REPORT.md").read_text() for out in ("one", "two"))
    assert one == two and f"Generated by `python -m reports.report --results {tables}` from" in one
    import reports.report

    commands = []  # (the default input is the committed run: its command line only, not a whole report)
    monkeypatch.setattr(reports.report, "build", lambda results, out, command: commands.append(command) or out)
    main(["--out", str(tmp_path / "three")])
    assert commands == ["python -m reports.report"]


def test_a_computed_experiment_records_the_thread_count_it_was_given(tmp_path):
    """Table 2 is computed, not timed, yet its rows carry the environment's `threads` column: with
    timing.threads=1 that column reads 1, as the job's point.yaml does (it read torch's default)."""
    args = ["experiment=table2", "scale=smoke", "timing.threads=1", f"results_root={tmp_path}",
            f"figures_dir={tmp_path / 'figs'}"]
    done = run_app(*args, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    df = pd.read_csv(tmp_path / "smoke" / "table2" / "results_all.csv")
    assert len(df) > 0 and set(df["threads"].astype(str)) == {"1"}


def test_a_report_of_other_results_never_replaces_the_committed_one_by_default(tmp_path, monkeypatch):
    """`nox -s figures -- --results DIR` without --out built into reports/, the committed report: it
    rewrote REPORT.md and removed the committed figures and tables of experiments not in DIR. Now
    its report goes to DIR/report; the committed run's own default and an explicit --out stand."""
    import reports.report
    from reports.report import main

    here = Path(reports.report.__file__).resolve().parent
    tables = _results_dir(tmp_path / "tables", ("table2",), timings=False)
    outs = []
    monkeypatch.setattr(reports.report, "build", lambda results, out, command: outs.append(Path(out)) or out)
    main(["--results", str(tables)])
    main([])
    main(["--results", str(tables), "--out", str(tmp_path / "x")])
    assert outs == [tables / "report", here, tmp_path / "x"]
    monkeypatch.undo()
    main(["--results", str(tables)])  # for real: the report stands in DIR/report
    assert "## Table 2" in (tables / "report" / "REPORT.md").read_text()
