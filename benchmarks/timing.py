"""The timers the micro-benchmarks share: a warm-up call, then the median of repeated calls, or every call
of several functions side by side in rounds."""

from __future__ import annotations

import random
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


def interleaved_seconds(functions: dict, rounds: int, shuffle_seed: int | None = None) -> dict:
    """Every run in seconds of each of ``functions`` (name → function that returns when its work is done), over
    ``rounds`` rounds that call each once, after one warm-up call of each: side by side, so that a shared
    machine's drift falls on all of them alike. With ``shuffle_seed`` each round runs them in a new order."""
    for function in functions.values():
        function()
    times = {name: [] for name in functions}
    order = list(functions)
    shuffler = None if shuffle_seed is None else random.Random(shuffle_seed)
    for _ in range(rounds):
        if shuffler is not None:
            shuffler.shuffle(order)
        for name in order:
            start = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - start)
    return times


def fetched(outputs) -> None:
    """Wait for a TensorFlow call's outputs (any nest of tensors) by reading each back to the host."""
    import tensorflow as tf

    for tensor in tf.nest.flatten(outputs):
        tensor.numpy()
