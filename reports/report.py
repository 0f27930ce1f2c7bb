"""The paper report: every artifact's figure, and the paper's claims beside this run's values.

    python -m reports.report [--results DIR] [--out DIR]      (``nox -s figures`` runs it)

``--results`` holds one aggregated table per experiment, ``<name>/results_all.csv`` (a paper run,
``outputs/<scale>``) or ``<name>.csv`` (the committed reference run, ``reports/results``). The
report goes to ``--out`` (default: ``reports/`` for the committed run, ``DIR/report`` for any
other ``--results DIR``): ``REPORT.md``, ``figures/`` (PNG + PDF per artifact) and ``results/``
(a copy of the tables it was made from, so the directory stands alone). Both are the report's own:
a report built into a used ``--out`` first removes the figures (``*.png``, ``*.pdf``,
``*_break_even.csv``; subdirectories stay) and tables (``results/*.csv``, unless ``results/`` is
the input itself) an earlier report left there. Nothing here measures:
regenerating a report from stored results takes seconds.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

__all__ = ["ARTIFACTS", "draw", "load_results", "build"]

log = logging.getLogger("ttrec.bench")


@dataclass(frozen=True)
class Artifact:
    title: str
    plot: Callable[[pd.DataFrame, Path], list[Path]]
    setup: str  # what was run, in words (the measured numbers come from the tables)


def _one(fn: Callable, **kw) -> Callable[[pd.DataFrame, Path], list[Path]]:
    return lambda df, out: [fn(df, out, **kw)]


def _artifacts() -> dict[str, Artifact]:
    from reports.cache_figures import plot_cache_figures
    from reports.figures import plot_rank_sweep
    from reports.paper_figures import plot_init_distribution, plot_model_size, plot_rows_sweep, plot_tt_shapes
    from reports.training_figures import plot_fig6, plot_fig7, plot_fig10_training, plot_table1

    titles = {  # the figures drawn by the suite's sweep plots (not paper_figures) take theirs as a first line
        "fig11": "Figure 11: time per lookup against TT rank for pooling 1, 10, 100",
        "fig12": "Figure 12: TT + LFU cache against nn.EmbeddingBag as the hit rate grows",
        "fig10": "Figure 10: cache size and warm-up against hit rate and iteration time",
        "fig9": "Figure 9: stability of the top-0.1% rows over a stream"}

    def cache_figures(df: pd.DataFrame, out: Path) -> list[Path]:
        return plot_cache_figures(df, out, headlines=titles)

    return {
        "table2": Artifact("Table 2: TT shapes and memory reduction of Kaggle's 7 largest tables", _one(plot_tt_shapes),
                           "shapes suggested by the rule that reproduces the paper's (the paper states none); "
                           "parameters counted exactly"),
        "fig5": Artifact("Figure 5: whole-model embedding size with 3, 5, 7 tables in TT format (rank 32)",
                         _one(plot_model_size), "Kaggle (dim 16) and Terabyte (dim 64) table sizes; fp32"),
        "fig3": Artifact("Figure 3: distribution of reconstructed entries per TT initialization",
                         _one(plot_init_distribution),
                         "entries of random rows of Kaggle's largest table reconstructed from freshly initialized cores"),
        "fig8": Artifact("Figure 8: memory and time against the number of rows", _one(plot_rows_sweep),
                         "training step (autograd + SGD), rank 32, pooling 1; peak transient memory measured in a fresh process"),
        "fig11": Artifact(titles["fig11"], _one(plot_rank_sweep, name="fig11_time_vs_rank", mode="train",
                                                headline=titles["fig11"]),
                          "training step: TT with fused SGD vs nn.EmbeddingBag with a sparse gradient + SGD"),
        "fig12": Artifact(titles["fig12"], cache_figures,
                          "hot-set workload with a controlled hit rate, cache of 0.1% of the rows, training steps"),
        "fig10": Artifact(titles["fig10"], cache_figures,
                          "Zipf(1.05) scattered by a permutation; hit ratio measured on held-out batches"),
        "fig9": Artifact(titles["fig9"], cache_figures,
                         "synthetic Zipf streams over Kaggle's largest table (no Criteo files here)"),
        # end-to-end DLRM training (benches.training)
        "table1": Artifact("Table 1: DLRM accuracy by the embedding tables' initialization", _one(plot_table1),
                           "uncompressed MLPerf-DLRM (Kaggle shape), synthetic clicks with a planted model (its "
                           "Bayes-optimal accuracy shown), SGD"),
        "fig7": Artifact("Figure 7: DLRM training time with the largest tables in TT format", _one(plot_fig7),
                         "MLPerf-DLRM (Kaggle shape), TT tables with fused SGD; each point trained beside the "
                         "uncompressed model on the same batches (paired per-iteration time ratio)"),
        "fig6": Artifact("Figure 6: DLRM accuracy against TT tables, rank and init scheme", _one(plot_fig6),
                         "MLPerf-DLRM (Kaggle shape), synthetic clicks with a planted model"),
        "fig10_training": Artifact("Figure 10 (training): LFU cache warm-up and size against training time and "
                                   "accuracy", _one(plot_fig10_training),
                                   "MLPerf-DLRM (Kaggle shape), 7 TT tables behind LFU caches; each point trained "
                                   "beside the same TT model without cache on the same batches"),
    }


ARTIFACTS = ("table2", "fig5", "fig3", "fig8", "fig11", "fig12", "fig10", "fig9",  # report order
             "table1", "fig7", "fig6", "fig10_training")


def draw(experiment: str, df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Draw ``experiment``'s figure(s) from its aggregated table into ``out_dir``; PNG paths."""
    arts = _artifacts()
    if experiment not in arts:
        raise ValueError(f"experiment: got {experiment!r}; figures exist for {list(ARTIFACTS)}")
    return arts[experiment].plot(df, Path(out_dir))


def load_results(results_dir: str | Path) -> dict[str, pd.DataFrame]:
    """The aggregated table of every experiment found in ``results_dir`` (see the module docstring)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--results: {root} is not a directory (run `nox -s bench -- experiment=paper` first)")
    out = {}
    for name in ARTIFACTS:
        for path in (root / name / "results_all.csv", root / f"{name}.csv"):
            if path.exists():
                out[name] = pd.read_csv(path)
                break
    if not out:
        raise FileNotFoundError(f"--results: no experiment tables in {root} (looked for <name>/results_all.csv and "
                                f"<name>.csv, name in {list(ARTIFACTS)})")
    return out


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return ""
    return str(v).replace("|", "/").replace("\n", " ")


def _md_table(df: pd.DataFrame) -> list[str]:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + " --- |" * len(df.columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return lines


def _environment(results: dict[str, pd.DataFrame]) -> list[str]:
    cols = ["cpu_model", "cpu_count", "threads", "gpu_name", "python", "torch", "numpy", "hydra", "git_sha", "git_dirty"]
    frames = [df for df in results.values() if "cpu_model" in df.columns]
    if not frames:
        return ["(no environment columns in the results)"]
    env = pd.concat([f[[c for c in cols if c in f.columns]] for f in frames]).drop_duplicates()
    return _md_table(env.astype(str))


def _caveats(results: dict[str, pd.DataFrame]) -> list[str]:
    """Warnings the reader needs before the numbers: a smoke-scale run (sizes for seconds, not for
    measuring), and timed points that ran while other processes loaded the machine."""
    out = []
    if "smoke" in _scales(results):
        out += ["**Smoke scale.** Its sizes are chosen to run in seconds, not to measure: the timing claims' "
                "verdicts below come from tiny tables and a few calls and say nothing about the paper "
                "(`experiment=paper` at the default scale measures them).", ""]
    from reports.figures import busy as flagged

    busy = {name: df for name, df in results.items() if flagged(df).any()}
    if busy:
        waits = pd.concat([pd.to_numeric(df.get("cpu_wait"), errors="coerce") for df in busy.values()
                           if "cpu_wait" in df.columns])
        most = f" (up to {waits.max():.2f} threads waiting)" if waits.notna().any() else ""
        out += [f"**Busy machine.** Timed points of {', '.join(sorted(busy))} ran while their threads waited for a "
                f"CPU{most}, behind other work or each other: their times are inflated, and verdicts on them are not "
                f"this machine's (`note` and `cpu_wait` in their tables).", ""]
    return out + _repeats_apart(results)


# What makes two timed points the same setting (seeds aside: another draw of the same workload), and how far
# apart their medians may be before the report says so
SETTING = ("impl", "backend", "device", "num_embeddings", "embedding_dim", "tt_rank", "tt_p_shapes", "tt_q_shapes",
           "batch_size", "pooling_factor", "distribution", "zipf_alpha", "permute", "weighted", "hit_rate",
           "hot_fraction", "mode", "optimizer", "fused", "sparse", "cache_enabled", "cache_fraction", "cpu_model",
           "threads")
REPEAT_SPREAD = 1.5


def _setting_text(col: pd.Series) -> pd.Series:
    """A setting column as text that groups equal values of any table alike: numbers as %g (an int column of
    one table, 4096, and a float one of another, 4096.0, read the same), the rest as str (NaN: "nan")."""
    num = pd.to_numeric(col, errors="coerce")
    return num.map(lambda v: f"{v:g}").where(num.notna(), col.astype(str))


def _repeats_apart(results: dict[str, pd.DataFrame]) -> list[str]:
    """Settings timed by two or more experiments (each experiment's median time per lookup of the setting)
    whose medians differ by more than REPEAT_SPREAD times: runs minutes or hours apart on a machine whose
    speed drifts. The reader should compare within an experiment, not across."""
    frames = [df.assign(_experiment=name) for name, df in results.items()
              if "metric" in df.columns and (df["metric"] == "time_per_lookup").any()]
    if len(frames) < 2:
        return []
    t = pd.concat(frames, ignore_index=True)
    t = t[t["metric"] == "time_per_lookup"]
    key = [c for c in SETTING if c in t.columns]
    t = t.assign(**{c: _setting_text(t[c]) for c in key})
    per = t.groupby(key + ["_experiment"], dropna=False)["median"].median().reset_index()
    apart = []
    for setting, g in per.groupby(key, dropna=False):
        if g["_experiment"].nunique() < 2 or g["median"].min() <= 0:
            continue
        spread = g["median"].max() / g["median"].min()
        if spread > REPEAT_SPREAD:
            r = dict(zip(key, setting))

            def n(c: str, r: dict = r) -> str:  # a count as the setting's text holds it ("4096.0")
                return f"{int(float(r[c])):,}" if r.get(c, "nan") != "nan" else "?"
            impl = str(r.get("impl"))
            if impl == "tt" and r.get("tt_rank", "nan") != "nan":
                impl += f"[{r.get('backend')}] rank {n('tt_rank')}"
            g = g.sort_values("_experiment", key=lambda e: e.map(lambda x: ARTIFACTS.index(x) if x in ARTIFACTS else 99))
            times = ", ".join(f"{e} {m:.3g}" for e, m in zip(g["_experiment"], g["median"]))  # (in report order)
            apart.append(f"{impl}, {r.get('mode')}, {n('num_embeddings')} x {n('embedding_dim')}, batch {n('batch_size')}, "
                         f"pooling {n('pooling_factor')}, {r.get('distribution')}: {times} ({spread:.2f}x)")
    if not apart:
        return []
    unit = ", ".join(sorted(t["unit"].dropna().astype(str).unique())) if "unit" in t.columns else "as stored"
    return [f"**The same setting timed apart.** {len(apart)} setting(s) timed by more than one experiment read medians "
            f"more than {REPEAT_SPREAD:g}x apart (time per lookup, {unit}): "
            + "; ".join(apart) + ". The experiments ran minutes to hours apart on a machine whose speed drifts: "
            "compare implementations within one experiment (its figure and claims do), not across experiments.", ""]


def _scales(results: dict[str, pd.DataFrame]) -> set[str]:
    """Every scale the tables were measured at (tables of several runs may sit in one directory)."""
    return {str(s) for df in results.values() if "scale" in df.columns for s in df["scale"].dropna()}


def _scale(results: dict[str, pd.DataFrame]) -> str:
    return ", ".join(sorted(_scales(results))) or "unknown"


def _claims(results: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, dict[str, str]]:
    """The claims of each experiment in ``results`` (:func:`reports.claims.claims`, one experiment at a
    time, in report order), and why an experiment's claims could not be checked (its table lacks rows or
    columns they need, e.g. a sweep some of whose jobs failed): stated in the report, not fatal to it."""
    from reports.claims import CLAIM_COLUMNS, claims

    frames, failed = [], {}
    for name in [n for n in ARTIFACTS if n in results]:
        try:
            frames.append(claims({name: results[name]}))
        except Exception as exc:  # like a figure that cannot be drawn: the report says so and goes on
            log.warning("%s: claims not checked: %s", name, exc)
            failed[name] = str(exc)
    frames = [f for f in frames if not f.empty]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=CLAIM_COLUMNS)
    return table, failed


def build(results_dir: str | Path, out_dir: str | Path, command: str | None = None) -> Path:
    """Figures, tables and REPORT.md for every experiment in ``results_dir``, into ``out_dir``."""
    results = load_results(results_dir)
    out = Path(out_dir)
    figs, tables = out / "figures", out / "results"
    tables.mkdir(parents=True, exist_ok=True)
    # figures/ and results/ are the report's own: what an earlier report left there (another run's
    # tables, wall times or figures of experiments not in this one) goes, unless results/ is the input
    in_place = tables.resolve() == Path(results_dir).resolve()
    stale = [] if in_place else [*tables.glob("*.csv")]
    stale += [*figs.glob("*.png"), *figs.glob("*.pdf"), *figs.glob("*_break_even.csv")] if figs.is_dir() else []
    for path in stale:
        path.unlink()
    for name in results:  # the report's own copy of its inputs
        target = tables / f"{name}.csv"
        source = Path(results_dir) / name / "results_all.csv"
        source = source if source.exists() else Path(results_dir) / f"{name}.csv"
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
    timings = Path(results_dir) / "timings.csv"  # wall time per experiment, written by experiment=paper
    if timings.exists() and timings.resolve() != (tables / "timings.csv").resolve():
        shutil.copyfile(timings, tables / "timings.csv")
    timings = tables / "timings.csv"
    arts = _artifacts()
    table, unchecked = _claims(results)
    missing = [n for n in ARTIFACTS if n not in results]
    lines = [
        "# TT-Rec reproduction report",
        "",
        f"Generated by `{command or 'python -m reports.report'}` from the tables in "
        f"`results/` (scale: {_scale(results)}). Each section: the figure, the paper's claim and this run's value side "
        "by side, and why they differ. The paper measured on an NVIDIA V100 (CUDA kernels, Criteo data); this run "
        "measured on the machine below.",
        "",
        *_caveats(results),
        "## Machine and versions",
        "",
        *_environment(results),
        "",
        "## Claims against this run",
        "",
        "agrees: the verdict of the rule beside it on the measured numbers, yes or no. A rule with a noise band "
        "counts only differences beyond it: not shown at this scale when every difference is within it; partly "
        "when a trend holds from the first value to the last but some step goes the other way. Blank: not "
        "compared (the section's note says why).",
        "",
    ]
    if table.empty:
        lines.append("(no claim could be checked: no experiment tables)")
    else:
        lines += _md_table(table[["artifact", "claim", "paper", "measured", "rule", "agrees"]])
    if unchecked:
        lines += ["", f"Claims not checked (the table lacks what they need; see the section): {', '.join(unchecked)}."]
    if missing:
        lines += ["", f"Not in this run: {', '.join(missing)} (run `nox -s bench -- experiment=NAME`)."]
    if timings.exists():
        t = pd.read_csv(timings)
        resumed = t["status"].astype(str).str.contains("resumed").any()
        lines += ["", "## Wall time of the run", "", *_md_table(t),
                  "", f"Total: {t['seconds'].sum() / 60:.1f} minutes" + (
                      " (of the last run: its resumed experiments skipped the points measured before)." if resumed
                      else ".")]
    for name in ARTIFACTS:
        if name not in results:
            continue
        art = arts[name]
        try:
            pngs = art.plot(results[name], figs)
        except Exception as exc:  # a figure that cannot be drawn is reported, not fatal to the report
            log.warning("%s: figure not drawn: %s", name, exc)
            pngs, failure = [], f"Figure not drawn: {exc}"
        else:
            failure = None
        lines += ["", f"## {art.title}", "", f"Setup: {art.setup}.", ""]
        lines += [f"![{name}](figures/{p.name})" for p in pngs if p.suffix == ".png"]
        if failure:
            lines.append(failure)
        if name in unchecked:
            lines += ["", f"Claims not checked: {unchecked[name]}"]
        part = table[table["experiment"] == name] if not table.empty else table
        if not part.empty:
            lines += ["", *_md_table(part[["claim", "paper", "measured", "rule", "agrees", "note"]])]
    report = out / "REPORT.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = Path(__file__).resolve().parent
    parser.add_argument("--results", type=Path, default=here / "results",
                        help="directory of experiment tables (default: the committed reference run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where REPORT.md, figures/ and results/ go (default: reports/ for the committed run, "
                             "else RESULTS/report: another run's report never replaces the committed one "
                             "unless asked to by --out)")
    args = parser.parse_args(argv)
    # (the command as it names the input: two reports of the same tables built into two places are the same)
    default = args.results.resolve() == (here / "results").resolve()
    out = args.out if args.out is not None else here if default else args.results / "report"
    try:
        path = build(args.results, out,
                     command="python -m reports.report" + ("" if default else f" --results {args.results}"))
    except FileNotFoundError as exc:
        parser.error(str(exc))
    print(f"report: {path}")


if __name__ == "__main__":
    main()
