"""A planted slowdown of the native CPU kernel, for testing the performance-regression gate.

``TTREC_PLANT_SLOWDOWN=f`` (a number >= 1; unset or ``1`` means off) makes every native call
(forward; backward, with or without the fused update) take ``f`` times as long: after a call that took ``t`` seconds of
the calling thread's CPU time, :func:`pad` busy-waits until that thread has burnt another
``(f - 1) * t`` CPU seconds. CPU time, not wall time, so that on a shared machine the padding
costs what a slower kernel would cost, however often a neighbour takes the core away (with one
thread this is exactly the kernel's CPU time; with more, the calling thread's share, about the
call's wall time on an idle machine). Results never change (nothing is recomputed), so a planted
run is a correct run that is slower by the factor asked for, whatever the call. A whole number keeps its old meaning (N times as slow); any other value is a
clear error, never a silent default. Never set in normal use; nothing here runs when it is unset.
"""

from __future__ import annotations

import math
import os
import time

__all__ = ["ENV", "factor", "pad", "call"]

ENV = "TTREC_PLANT_SLOWDOWN"
_parsed: tuple[str, float] = ("1", 1.0)  # (raw value, factor) of the last parse: one parse per change


def factor() -> float:
    """The planted slowdown factor f >= 1 from ``$TTREC_PLANT_SLOWDOWN`` (1.0 when unset)."""
    global _parsed
    raw = os.environ.get(ENV, "1")
    if raw == _parsed[0]:
        return _parsed[1]
    try:
        f = float(raw)
    except ValueError:
        raise ValueError(f"{ENV}: got {raw!r}; expected a number >= 1 (e.g. 1.25, 1.5 or 2; 1 = off)") from None
    if not (math.isfinite(f) and f >= 1):
        raise ValueError(f"{ENV}: got {raw!r}; expected a finite number >= 1 (1 = off)")
    _parsed = (raw, f)
    return f


def pad(seconds: float) -> None:
    """Extend a native call that took ``seconds`` (thread CPU time) to ``factor() * seconds``."""
    f = factor()
    if f == 1.0:
        return
    deadline = time.thread_time() + (f - 1.0) * seconds
    while time.thread_time() < deadline:  # a spin, not a sleep: the core stays busy like a slower kernel's
        pass


def call(fn, *args):
    """``fn(*args)`` (a native call), padded by :func:`pad` when a slowdown is planted."""
    if factor() == 1.0:
        return fn(*args)
    t0 = time.thread_time()
    result = fn(*args)
    pad(time.thread_time() - t0)
    return result
