"""Batch-1 latency measured until it is stable, with its spread and the machine's load.

One call's time on a shared CPU jumps with whatever else runs (a p95 of 0.23 ms, then
62.7 ms, for the same model): a single window of calls says nothing about its own noise.
:func:`stable_latency` times rounds of :data:`ROUND` calls until the medians of the last
:data:`WINDOW` rounds agree within :data:`STABLE` (or :data:`MAX_ROUNDS` are spent),
reports the median and p95 of that window, how far its round medians spread, and the
load average per core while it ran, so that a reader can tell a slow model from a busy
machine. PyTorch (:mod:`kdpipe.check.evaluate`) and ONNX Runtime
(:mod:`kdpipe.check.evaluate_onnx`) are timed by this one function.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

ROUND = 50  # calls per round
WINDOW = 4  # rounds whose medians must agree: 200 calls, the columns' sample
MAX_ROUNDS = 12
STABLE = 0.10  # the last WINDOW round medians within 10 % of their smallest
LOADED = 1.0  # load average per core above which the machine is called loaded


def load_per_core() -> float | None:
    """The 1-minute load average per core (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0] / (os.cpu_count() or 1), 2)
    except OSError:
        return None


def stable_latency(call: Callable[[], object], warmup: int = 5) -> dict:
    """``latency_ms`` (median), ``latency_p95_ms``, ``latency_spread`` (the last window's
    round medians: (max - min) / min), ``latency_calls`` (calls timed) and
    ``cpu_load`` (load average per core) for ``call``, after ``warmup`` calls."""
    for _ in range(warmup):  # the first calls allocate and pick kernels
        call()
    rounds: list[list[float]] = []
    spread = float("inf")
    while len(rounds) < MAX_ROUNDS:
        seconds = []
        for _ in range(ROUND):
            started = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - started)
        rounds.append(seconds)
        if len(rounds) >= WINDOW:
            medians = [statistics.median(r) for r in rounds[-WINDOW:]]
            spread = (max(medians) - min(medians)) / max(min(medians), 1e-12)
            if spread <= STABLE:
                break
    window = [s for r in rounds[-WINDOW:] for s in r]
    return {
        "latency_ms": round(statistics.median(window) * 1000, 4),
        "latency_p95_ms": round(statistics.quantiles(window, n=20)[-1] * 1000, 4),
        "latency_spread": round(spread, 4),
        "latency_calls": ROUND * len(rounds),
        "cpu_load": load_per_core(),
    }


def latency_note(row: dict) -> str:
    """A line for the reader when the latency columns are not to be trusted as they
    stand: not stable within the rounds allowed, or measured on a loaded machine."""
    notes = []
    spread, load = row.get("latency_spread"), row.get("cpu_load")
    if spread is not None and spread > STABLE:
        notes.append(f"latency not stable after {row.get('latency_calls')} calls (round medians "
                     f"{spread:.0%} apart, more than {STABLE:.0%})")  # fmt: skip
    if load is not None and load > LOADED:
        notes.append(f"the machine is loaded (load average {load:g} per core): latency and "
                     "throughput are pessimistic")  # fmt: skip
    return "; ".join(notes)
