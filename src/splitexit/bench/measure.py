"""Timing helpers shared by the benchmarks: batch-1 latency and batched throughput.

Compare methods only by figures measured in the same run; quote medians.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import statistics
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager

import torch

from ..cost import interleaved_seconds, per_sample_seconds

__all__ = ["latency_batch1", "throughput", "torch_threads", "interleaved_latency",
           "interleaved_throughput", "steady_allocator"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def steady_allocator() -> bool:
    """Keep freed memory in the process, as a long-running server reaches (glibc only).

    By default glibc serves large blocks (a batch-256 activation is megabytes) with fresh
    ``mmap`` pages and gives them back on free, so every batched forward page-faults on its
    activations, and how often depends on the process's allocation history: the same model's
    batched throughput measured 2165 and 4127 samples/s in two processes. With mmap off and
    no trimming, freed blocks are reused and every method is timed in the same steady state.
    Child processes (servers started by a benchmark) inherit it through the environment.
    Returns whether it applied (False off glibc).
    """
    os.environ.setdefault("MALLOC_MMAP_MAX_", "0")
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(2 ** 31 - 1))
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


@contextmanager
def torch_threads(n: int | None):
    """Run a block with ``n`` intra-op threads (unchanged when ``None``)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def latency_batch1(fn: Callable[[torch.Tensor], object], x: torch.Tensor, limit: int | None = None,
                   warmup: int = 10) -> dict:
    """Per-sample latency of ``fn`` called on one sample at a time over ``x[:limit]``.

    Returns:
        ``{"median_ms", "mean_ms", "p95_ms", "total_s", "samples"}``.
    """
    return _latency_summary(per_sample_seconds(fn, x[:limit] if limit else x, warmup))


def _latency_summary(times: list[float]) -> dict:
    times = sorted(times)
    return {"median_ms": 1e3 * statistics.median(times), "mean_ms": 1e3 * statistics.fmean(times),
            "p95_ms": 1e3 * times[int(0.95 * (len(times) - 1))], "total_s": sum(times),
            "samples": len(times)}


def throughput(fn: Callable[[torch.Tensor], object], x: torch.Tensor, batch_size: int = 256,
               repeats: int = 3) -> float:
    """Samples per second of ``fn`` over ``x`` in batches (median of ``repeats`` passes)."""
    return interleaved_throughput({"fn": fn}, x, batch_size, repeats)["fn"]


def interleaved_latency(fns: Mapping[str, Callable], xs: torch.Tensor, warmup: int = 20,
                        chunks: int | None = None, shuffle: bool = True, seed: int = 0
                        ) -> dict[str, dict]:
    """Batch-1 latency of several functions over the same samples, interleaved
    (:func:`splitexit.cost.interleaved_seconds`).

    Returns:
        ``{name: {"median_ms", "mean_ms", "p95_ms", "total_s", "samples"}}``.
    """
    times = interleaved_seconds(fns, xs, warmup=warmup, chunks=chunks, shuffle=shuffle,
                                seed=seed)
    return {name: _latency_summary(ts) for name, ts in times.items()}


def interleaved_throughput(fns: Mapping[str, Callable], x: torch.Tensor, batch: int,
                           repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """Samples per second of several functions over ``x`` in batches: ``repeats`` passes, each
    running every method once in a shuffled order; the median pass per method."""
    import random

    rates: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    order = random.Random(seed)
    with torch.inference_mode():
        for fn in fns.values():
            fn(x[:batch])
        for _ in range(repeats):
            order.shuffle(names)
            for name in names:
                fn = fns[name]
                t0 = time.perf_counter()
                for i in range(0, len(x), batch):
                    fn(x[i: i + batch])
                rates[name].append(len(x) / (time.perf_counter() - t0))
    return {n: statistics.median(r) for n, r in rates.items()}
