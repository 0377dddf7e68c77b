"""The timer the micro-benchmarks share: a warm-up call, then the median of repeated calls."""

from __future__ import annotations

import statistics
import time


def median_seconds(function, repeats: int) -> tuple[float, list[float]]:
    """(median, every run) in seconds of ``repeats`` calls of ``function`` after one warm-up call (tracing,
    allocation)."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times
