"""Shared timing helper for the benchmark scripts: median wall time of repeated calls."""

import time

import numpy as np


def median_seconds(function, repeats=5, warmup=1):
    """Median wall-clock seconds of ``function()`` after ``warmup`` untimed calls (tracing, XLA)."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))
