"""Sessions: tests (then lint), bench (Hydra overrides after --), figures (the report from stored
results), kernel (the CPU-kernel experiment), gate (the performance-regression gate), lint (ruff).

nox creates and reuses its own virtualenvs (.nox/). torch is pinned to TTREC_TORCH (default
torch==2.13.0): on the project's CPU machines pip takes it from a local wheel; elsewhere pip
takes the registry's build of that version (a CUDA build on Linux x86_64).
"""

import os

import nox

nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests"]

TORCH = os.environ.get("TTREC_TORCH", "torch==2.13.0")
RUFF = "ruff==0.16.9"  # pinned: a newer ruff's new rules must not fail CI unannounced


def _install(session: nox.Session, *extras: str) -> None:
    session.install(TORCH)
    spec = ".[" + ",".join(extras) + "]" if extras else "."
    session.install("-e", spec)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (pytest; pass pytest arguments after --), then the lint session.
    Runs on one pytest-xdist worker per core, each test file on one worker (its module fixtures once);
    `nox -s tests -- -n 0` runs it in one process. No test asserts a timing; the tests marked `alone`
    (one: the CPU-wait probe against spinning processes, whose "alone" half another worker would
    load) run after, in one process (exit 5, none selected, is fine there)."""
    _install(session, "test", "peers", "cluster")
    session.run("pytest", "-q", "-n", "auto", "--dist", "loadfile", "-m", "not alone", *session.posargs)
    session.run("pytest", "-q", "-n", "0", "-m", "alone", *session.posargs, success_codes=[0, 5])
    session.notify("lint")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff on the whole tree: likely bugs only (unused and undefined names, bugbear; see pyproject.toml)."""
    session.install(RUFF)
    session.run("ruff", "check", *(session.posargs or ["."]))


@nox.session
def bench(session: nox.Session) -> None:
    """Run the bench app. No arguments: the default sweep (experiment=default).
    With arguments: Hydra overrides, e.g. `nox -s bench -- -m impl=tt,dense tt.rank=8,32`.
    Installs the optional peers (impl=tltorch) and the launcher plugins (hydra/launcher=cpu_pool, local)."""
    _install(session, "peers", "cluster")
    args = session.posargs or ["experiment=default"]
    session.run("python", "-m", "benches.app", *args)


@nox.session
def figures(session: nox.Session) -> None:
    """Regenerate every figure and REPORT.md from stored results, without measuring anything.
    No arguments: the committed reference run (reports/results -> reports/). Else e.g.
    `nox -s figures -- --results outputs/default` (into outputs/default/report; --out DIR elsewhere)."""
    _install(session)
    session.run("python", "-m", "reports.report", *session.posargs)


@nox.session
def kernel(session: nox.Session) -> None:
    """The CPU-kernel experiment: native vs reference, T3nsor-style, tltorch and nn.EmbeddingBag,
    as ratios from one process (arguments after --, e.g. `--scale smoke`)."""
    _install(session, "peers")
    session.run("python", "-m", "benches.cpu_kernel", *session.posargs)


@nox.session
def gate(session: nox.Session) -> None:
    """The performance-regression gate: pytest-benchmark benchmarks of the key paths, normalised by
    calibration kernels and compared with this machine class's committed baseline; exit 1 on a
    regression (README, "Performance-regression gate"). Arguments after --, e.g. `--update-baseline`."""
    _install(session, "test")
    session.run("python", "-m", "benches.gate", *session.posargs)
