"""The benchmarks' timing helpers are the library's: :mod:`splitexit.measure`."""

from ..measure import (  # noqa: F401
    interleaved_latency,
    interleaved_throughput,
    latency_batch1,
    steady_allocator,
    throughput,
    torch_threads,
)
