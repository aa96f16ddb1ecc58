"""What the edge reports: one :class:`Answer` per input, labelled with its source, and the
runtime's counters (:class:`EdgeStats`)."""

from __future__ import annotations

import statistics
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

EXIT, SERVER, FALLBACK, FAILED = "exit", "server", "fallback", "failed"
"""The sources of an answer: a local exit, the server, the local fallback, none."""


@dataclass
class Answer:
    """The one answer an input gets.

    Attributes:
        index: position of the input in the batch passed to :meth:`EdgeRuntime.classify`.
        prediction: predicted class (-1 only when ``source == "failed"``).
        source: ``"exit"`` (a local exit decided), ``"server"``, ``"fallback"`` (the server or
            link failed; the deepest local exit answered) or ``"failed"`` (no server answer
            and no local exit to fall back on).
        exit_index: exit the prediction comes from (the final exit for the server; -1 failed).
        latency_ms: time from the call's start to this answer.
        request_id: id of the server request that carried the sample, if any.
        error: why the server did not answer (fallback / failed answers).
        logits: the decision logits of the prediction, a float32 numpy array (``None`` when
            failed).
    """

    index: int
    prediction: int
    source: str
    exit_index: int
    latency_ms: float
    request_id: str | None = None
    error: str | None = None
    logits: np.ndarray | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """Human-readable source: ``exit 0``, ``server``, ``local fallback (exit 1)``."""
        if self.source == EXIT:
            return f"exit {self.exit_index}"
        if self.source == FALLBACK:
            return f"local fallback (exit {self.exit_index})"
        return self.source

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (logits as a list)."""
        return {"index": self.index, "prediction": self.prediction, "source": self.source,
                "label": self.label, "exit_index": self.exit_index,
                "latency_ms": self.latency_ms, "request_id": self.request_id,
                "error": self.error,
                "logits": None if self.logits is None
                else np.asarray(self.logits, dtype=np.float64).tolist()}


class EdgeStats:
    """Counters of an edge runtime: answers by source and exit, bytes, latency, requests, and
    how offloading went (``offloaded`` samples sent to the server, ``offload_failed`` of them
    without a server answer because of the server or the link, ``bad_inputs`` answered
    locally because their values overflow, ``last_error``)."""

    def __init__(self, window: int = 100_000):
        self._lock = threading.Lock()
        self.sources: Counter = Counter()
        self.exits: Counter = Counter()
        self.inputs = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.requests = 0
        self.retries = 0
        self.request_failures = 0
        self.offloaded = 0
        self.offload_failed = 0
        self.bad_inputs = 0
        self.last_error: str | None = None
        self.latency_ms: deque[float] = deque(maxlen=window)

    def record(self, answers: list[Answer]) -> None:
        with self._lock:
            self.inputs += len(answers)
            for a in answers:
                self.sources[a.source] += 1
                self.exits[a.exit_index] += 1
                self.latency_ms.append(a.latency_ms)

    def request(self, sent: int, received: int, ok: bool, retry: bool) -> None:
        with self._lock:
            self.requests += 1
            self.bytes_sent += sent
            self.bytes_received += received
            self.retries += int(retry)
            self.request_failures += int(not ok)

    def offload(self, sent: int, failed: int, bad: int) -> None:
        with self._lock:
            self.offloaded += sent
            self.offload_failed += failed
            self.bad_inputs += bad

    def error(self, reason: str) -> None:
        with self._lock:
            self.last_error = reason

    def snapshot(self) -> dict[str, Any]:
        """Current figures as a JSON-able dict."""
        with self._lock:
            lat = sorted(self.latency_ms)
            pick = (lambda q: lat[min(len(lat) - 1, int(q * (len(lat) - 1) + 0.5))]) if lat \
                else (lambda q: None)
            return {"inputs": self.inputs,
                    "answers_by_source": dict(self.sources),
                    "answers_by_exit": {str(k): v for k, v in sorted(self.exits.items())},
                    "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                    "bytes_sent_per_input": self.bytes_sent / self.inputs if self.inputs else 0,
                    "requests": self.requests, "retries": self.retries,
                    "request_failures": self.request_failures,
                    "offloaded": self.offloaded, "offload_failed": self.offload_failed,
                    "bad_inputs": self.bad_inputs, "last_error": self.last_error,
                    "latency_ms": {"p50": pick(0.5), "p95": pick(0.95),
                                   "mean": statistics.fmean(lat) if lat else None}}
