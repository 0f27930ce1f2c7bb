"""The one memory protocol: peak transient host memory of a call, measured as the rise of the
process's resident-set high-water mark (Linux /proc), in a fresh child process.

Why a child: allocators keep freed memory mapped, so a second call in a warm process reuses pages
and looks free. In a new process the first call's peak RSS above the RSS just before it is what the
call needed on top of its inputs and parameters. Linux only (``/proc/self/clear_refs``); elsewhere
the probe reports None with the reason.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable

__all__ = ["peak_transient_bytes", "measure_in_child"]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_transient_bytes(fn: Callable[[], object]) -> int:
    """Bytes by which the resident high-water mark rises during ``fn()`` (this process)."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return max(0, peak - before) * 1024


def _child(setup, args, conn) -> None:
    try:
        fn = setup(*args)
        conn.send(("ok", peak_transient_bytes(fn)))
    except Exception as exc:  # report, never hang the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def measure_in_child(setup: Callable[..., Callable[[], object]], *args, timeout_s: float = 600) -> tuple[int | None, str]:
    """Run ``setup(*args)`` in a fresh (spawned) process, then measure its returned callable there.

    ``setup`` must be importable (a module-level function). Returns (bytes or None, note): None
    with the reason when the child raised (its error), died (its exit code) or took longer than
    ``timeout_s`` seconds (it is killed).
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s: got {timeout_s}; must be > 0 (seconds)")
    if not Path("/proc/self/clear_refs").exists():
        return None, "not available: needs Linux /proc/self/clear_refs"
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(setup, args, send))
    proc.start()
    send.close()  # the child's end: with it closed here, the child's exit ends the pipe
    try:
        # the answer is read as soon as it comes, not after the child has ended: a child blocks on an
        # answer larger than the pipe's buffer (a long error message) until it is read
        if not wait([recv, proc.sentinel], timeout_s):
            proc.kill()
            proc.join()
            return None, f"not available: the child did not finish in {timeout_s} s"
        try:
            status, value = recv.recv()
        except EOFError:  # ended without an answer (killed, or a crash the child could not report)
            proc.join()
            return None, f"not available: the child exited with code {proc.exitcode}"
    finally:
        recv.close()
    proc.join(min(timeout_s, 60))
    if proc.is_alive():  # (an answer given, then stuck on its way out: the answer stands)
        proc.kill()
        proc.join()
    return (value, "peak RSS rise in a fresh process") if status == "ok" else (None, f"not available: {value}")
