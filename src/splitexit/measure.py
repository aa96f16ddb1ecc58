"""Measurement a user runs on their own model, and every benchmark runs on its models:
batch-1 latency per sample, interleaved timing of several methods over the same samples,
batched throughput, the steady allocator, thread control. (Reports: :mod:`splitexit.report`;
the paired interval of an accuracy drop: :func:`splitexit.calibration.paired_drop_ci`.)

Timings on a shared machine are noisy: compare methods only by figures measured in the same
run, interleaved, and quote means and medians.
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

__all__ = ["measure_latency", "per_sample_seconds", "interleaved_seconds",
           "measure_exit_latency", "latency_batch1", "throughput", "torch_threads",
           "interleaved_latency", "interleaved_throughput", "steady_allocator"]


def measure_latency(fn: Callable[[], object], repeats: int = 30, warmup: int = 3,
                    min_time_s: float = 0.0) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls (after warm-up)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        start = time.perf_counter()
        while len(times) < repeats or time.perf_counter() - start < min_time_s:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def per_sample_seconds(fn: Callable[[torch.Tensor], object], xs: torch.Tensor,
                       warmup: int = 10) -> list[float]:
    """Wall seconds of ``fn`` on each sample of ``xs``, one sample per call (batch 1), after
    ``warmup`` untimed calls: the primitive every batch-1 latency figure is built on."""
    times = []
    with torch.inference_mode():
        for i in range(min(warmup, len(xs))):
            fn(xs[i: i + 1])
        for i in range(len(xs)):
            t0 = time.perf_counter()
            fn(xs[i: i + 1])
            times.append(time.perf_counter() - t0)
    return times


def interleaved_seconds(fns: Mapping[object, Callable[[torch.Tensor], object]],
                        xs: torch.Tensor, warmup: int = 20, chunks: int | None = None,
                        shuffle: bool = True, seed: int = 0) -> dict[object, list[float]]:
    """Batch-1 seconds of several functions over the same samples, interleaved.

    The samples are cut into ``chunks`` consecutive groups (``None``: one sample per group);
    every function runs a whole group before the next one does, and their order is shuffled
    per group. Slow phases of a shared machine so hit every function alike, no function always
    runs right after the same other one, and within a group a function runs warm, as a
    deployed model serving a stream does. Compare only figures measured together.
    """
    import random

    times: dict[object, list[float]] = {n: [] for n in fns}
    names = list(fns)
    order = random.Random(seed)
    n = len(xs)
    step = 1 if not chunks else max(1, -(-n // chunks))
    with torch.inference_mode():
        for i in range(min(warmup, n)):
            for fn in fns.values():
                fn(xs[i: i + 1])
    for a in range(0, n, step):
        if shuffle:
            order.shuffle(names)
        for name in names:
            times[name] += per_sample_seconds(fns[name], xs[a: a + step], warmup=0)
    return times


def measure_exit_latency(infer: Callable[[torch.Tensor, object], object], x: torch.Tensor,
                         num_exits: int, samples: int = 200, policy=None,
                         reference: Callable[[torch.Tensor], object] | None = None,
                         chunks: int = 10) -> list[float]:
    """Measured batch-1 seconds to leave at each exit, on the runtime that will serve.

    ``infer(x, policy)`` is any early-exit runner (``MultiExitModel.infer``,
    ``TracedMultiExit.infer``, ONNX Runtime); each exit ``e`` is timed over ``samples``
    inputs (median) with ``policy`` forced to leave there
    (:func:`~splitexit.policies.leave_at`: its statistic computed at every exit on the way,
    as in deployment) or, without a policy, with :class:`~splitexit.policies.FixedExit`, so
    every overhead the runner has (heads, decisions, bookkeeping) is in the figure. The last
    figure is what a sample pays when no exit fires. The exits are timed interleaved
    (:func:`interleaved_seconds`, ``chunks`` groups).

    With ``reference`` (e.g. the plain backbone on the same runtime), it is timed interleaved
    with the exits and the figures are ratios to its median: free of the drift between
    measurements made at different times, so costs of different subsets of exits compare.
    """
    from .policies import FixedExit, leave_at

    def runner(e: int):
        p = FixedExit(e) if policy is None else leave_at(policy, e, num_exits)
        return lambda s: infer(s, p)

    fns: dict[object, Callable] = {e: runner(e) for e in range(num_exits)}
    if reference is not None:
        fns["reference"] = reference
    times = interleaved_seconds(fns, x[:samples], warmup=min(10, samples), chunks=chunks)
    unit = statistics.median(times["reference"]) if reference is not None else 1.0
    return [statistics.median(times[e]) / unit for e in range(num_exits)]


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
    (:func:`interleaved_seconds`).

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
