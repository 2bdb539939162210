"""The one timing rule of the benchmarks: warm up, then the median of repeated calls."""
import statistics
import time


def call_seconds(fn, repeats, warmup=1):
    """The wall times of `repeats` calls of fn() after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_seconds(fn, repeats, warmup=1):
    """Median wall time of `repeats` calls of fn() after `warmup` untimed ones (the median, as
    this machine's timings drift and a single slow call says little)."""
    return statistics.median(call_seconds(fn, repeats, warmup))
