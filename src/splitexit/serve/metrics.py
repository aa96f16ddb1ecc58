"""The server's ``/metrics``: thread-safe request counts by status, bounded latency samples
and batch sizes (:class:`ServerMetrics`)."""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

__all__ = ["ServerMetrics"]


class ServerMetrics:
    """Thread-safe counters, bounded latency samples and batch sizes for ``/metrics``."""

    def __init__(self, window: int = 10_000):
        self._lock = threading.Lock()
        self.started = time.time()
        self.status = Counter()
        self.samples = 0
        self.batches = 0
        self.batch_sizes = Counter()
        self.latency_ms: deque[float] = deque(maxlen=window)
        self.queue_ms: deque[float] = deque(maxlen=window)
        self.compute_ms: deque[float] = deque(maxlen=window)

    def request(self, status: int, latency_ms: float, samples: int = 0) -> None:
        with self._lock:
            self.status[status] += 1
            self.samples += samples
            self.latency_ms.append(latency_ms)

    def batch(self, size: int, compute_ms: float, queue_ms: Sequence[float]) -> None:
        with self._lock:
            self.batches += 1
            self.batch_sizes[size] += 1
            self.compute_ms.append(compute_ms)
            self.queue_ms.extend(queue_ms)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            total = sum(self.status.values())
            return {
                "uptime_s": time.time() - self.started,
                "requests": total,
                "requests_ok": self.status.get(200, 0),
                "requests_by_status": {str(k): v for k, v in sorted(self.status.items())},
                "samples": self.samples,
                "batches": self.batches,
                "mean_batch_size": (sum(k * v for k, v in self.batch_sizes.items())
                                    / self.batches if self.batches else 0.0),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "latency_ms": _percentiles(self.latency_ms),
                "queue_ms": _percentiles(self.queue_ms),
                "compute_ms": _percentiles(self.compute_ms),
            }


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"p50": pick(0.5), "p95": pick(0.95), "p99": pick(0.99), "mean": statistics.fmean(s),
            "n": len(s)}
