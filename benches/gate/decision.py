"""The gate's decision: pure functions from measurements to verdicts (no timing, no files).

Method (the README's "Performance-regression gate" section says why):

1. Normalise each round by the machine's speed at that moment: ``r_i = t_i / c_i`` where ``t_i`` is
   the benchmark's round time and ``c_i`` the mean of the calibration samples taken just before and
   just after it (:mod:`benches.gate.calibration`).
2. Summarise a run by the median of the ``r_i`` (robust to the rounds a neighbour's job lands on).
3. ``ratio = current / baseline`` of the summaries; ``ratio > threshold`` is a suspected regression.
4. A suspect is measured again (a fresh process, same protocol) and is a regression only if the
   confirmation's ratio exceeds the confirmation bar, halfway between 1 and the threshold
   (:func:`confirmation_bar`: 1.10 for 1.20). The re-run is there to reject a one-off burst of
   contention, after which the point measures about 1.0 again; a real slowdown that crossed the
   threshold once stays clearly above 1. ``ratio < 1 / threshold`` is reported as faster (a pass,
   with a hint to refresh the baseline).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Collection, Mapping, Sequence

__all__ = ["DEFAULT_THRESHOLD", "Measurement", "Verdict", "decide", "confirm", "exit_code", "PASS", "FASTER",
           "REGRESSION", "NOT_CONFIRMED", "NO_BASELINE", "SLOWER_NOT_GATED", "confirmation_bar"]

DEFAULT_THRESHOLD = 1.2
PASS, FASTER, REGRESSION, NOT_CONFIRMED, NO_BASELINE = "pass", "faster", "REGRESSION", "pass (not confirmed)", "no baseline"
SLOWER_NOT_GATED = "slower (reference point, not gated)"


@dataclass(frozen=True)
class Measurement:
    """One benchmark's rounds (seconds) and the calibration samples around them (one more than rounds:
    sample i was taken just before round i, the last one after the last round)."""

    name: str
    round_seconds: tuple[float, ...]
    calibration_seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        n, c = len(self.round_seconds), len(self.calibration_seconds)
        if n < 1:
            raise ValueError(f"{self.name}: round_seconds is empty; need at least one round")
        if c != n + 1:
            raise ValueError(f"{self.name}: got {c} calibration samples for {n} rounds; expected {n + 1} "
                             "(one before each round and one after the last)")
        for what, xs in (("round_seconds", self.round_seconds), ("calibration_seconds", self.calibration_seconds)):
            bad = [x for x in xs if not (math.isfinite(x) and x > 0)]
            if bad:
                raise ValueError(f"{self.name}: {what} holds {bad[0]!r}; every time must be a finite number > 0")

    def normalised(self) -> list[float]:
        """Per round: round time / mean of the calibration samples either side (dimensionless)."""
        c = self.calibration_seconds
        return [t / (0.5 * (c[i] + c[i + 1])) for i, t in enumerate(self.round_seconds)]

    def summary(self) -> float:
        """The run's normalised time: the median of :meth:`normalised`."""
        return statistics.median(self.normalised())

    def raw_median(self) -> float:
        return statistics.median(self.round_seconds)

    def calibration_median(self) -> float:
        return statistics.median(self.calibration_seconds)


@dataclass(frozen=True)
class Verdict:
    """One row of the gate's table. ``baseline``/``current``: normalised medians (dimensionless);
    ``ratio``: current / baseline (None without a baseline); ``confirmation_ratio``: the re-run's."""

    metric: str
    baseline: float | None
    current: float
    ratio: float | None
    threshold: float
    verdict: str
    confirmation_ratio: float | None = None

    @property
    def failed(self) -> bool:
        return self.verdict == REGRESSION

    def as_dict(self) -> dict:
        return asdict(self)


def _check_threshold(threshold: float) -> None:
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 1):
        raise ValueError(f"threshold: got {threshold!r}; must be a number > 1 (e.g. 1.2: fail when 20% slower)")


def decide(current: Mapping[str, float], baseline: Mapping[str, float] | None, threshold: float = DEFAULT_THRESHOLD,
           thresholds: Mapping[str, float] | None = None, report_only: Collection[str] = ()) -> list[Verdict]:
    """First-pass verdicts of normalised medians against the baseline's (both by benchmark name);
    a benchmark in ``thresholds`` is judged by its entry there instead of ``threshold`` (as called
    by :mod:`benches.gate.run`, an entry only where a point's own threshold is above ``--threshold``,
    so a point's threshold is a floor that ``--threshold`` can raise). A benchmark missing from the baseline (or
    no baseline at all) gets NO_BASELINE, never a failure; one in ``report_only`` above its
    threshold gets SLOWER_NOT_GATED, never a failure."""
    _check_threshold(threshold)
    for t in (thresholds or {}).values():
        _check_threshold(t)
    out = []
    for name, value in current.items():
        threshold_of = (thresholds or {}).get(name, threshold)
        base = None if baseline is None else baseline.get(name)
        if base is None:
            out.append(Verdict(name, None, value, None, threshold_of, NO_BASELINE))
            continue
        ratio = value / base
        verdict = REGRESSION if ratio > threshold_of else FASTER if ratio < 1 / threshold_of else PASS
        if verdict == REGRESSION and name in report_only:
            verdict = SLOWER_NOT_GATED
        out.append(Verdict(name, base, value, ratio, threshold_of, verdict))
    return out


def suspects(verdicts: Sequence[Verdict]) -> list[str]:
    """Names whose first pass failed: the ones to measure again."""
    return [v.metric for v in verdicts if v.failed]


def confirmation_bar(threshold: float) -> float:
    """The bar a re-run must clear to confirm a first-pass regression: halfway from 1 to the threshold."""
    return 1.0 + 0.5 * (threshold - 1.0)


def confirm(verdicts: Sequence[Verdict], confirmation: Mapping[str, float]) -> list[Verdict]:
    """Final verdicts: a first-pass regression stays one only if its re-measured normalised median
    (``confirmation``) over the baseline exceeds :func:`confirmation_bar`; else it passes as
    NOT_CONFIRMED. A suspect with no confirmation measurement stays a regression (fails closed)."""
    out = []
    for v in verdicts:
        if not v.failed or v.metric not in confirmation:
            out.append(v)
            continue
        ratio = confirmation[v.metric] / v.baseline
        out.append(Verdict(v.metric, v.baseline, v.current, v.ratio, v.threshold,
                           REGRESSION if ratio > confirmation_bar(v.threshold) else NOT_CONFIRMED, ratio))
    return out


def exit_code(verdicts: Sequence[Verdict]) -> int:
    """1 if any final verdict is a regression, else 0."""
    return 1 if any(v.failed for v in verdicts) else 0


def table(verdicts: Sequence[Verdict]) -> str:
    """The gate's table (markdown): metric, baseline, current, ratio, threshold, verdict."""
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = ["| metric | baseline | current | ratio | threshold | verdict |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for v in verdicts:
        ratio = num(v.ratio, ".3f") + ("" if v.confirmation_ratio is None else
                                       f" (re-run {v.confirmation_ratio:.3f}, bar {confirmation_bar(v.threshold):.2f})")
        lines.append(f"| {v.metric} | {num(v.baseline, '.4g')} | {v.current:.4g} | {ratio} | {v.threshold:.2f} | "
                     f"{v.verdict} |")
    return "\n".join(lines)
