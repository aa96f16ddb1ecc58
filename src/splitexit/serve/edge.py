"""Edge runtime: local exits on the device, offload of undecided samples, fallback on failure.

:class:`EdgeRuntime` runs a device runtime on each batch (a bundle's ONNX Runtime
:class:`~splitexit.runtime.device.OrtDevice`, or the PyTorch
:class:`~splitexit.serve.device.DevicePart`), answers the samples a local exit decides, sends
the rest to the server half over HTTP (codec payload) and judges the server's logits with the
same exit policy, in numpy. Every call has a deadline it never
waits past; failed requests are retried with exponential backoff while time remains; a
:class:`CircuitBreaker` stops offloading after repeated failures and probes again later. When
the server or the link fails, undecided samples get the deepest local exit's answer. Every
input gets exactly one :class:`Answer`, labelled with its source.

This module needs numpy, onnxruntime (for bundles), httpx and zstandard only: no PyTorch, no
FastAPI, so a device installs ``splitexit`` without them.

Example:
    >>> b = load_bundle("bundle/")
    >>> with EdgeRuntime(b.device(), b.policy, "http://127.0.0.1:8000", b.codec) as edge:
    ...     answers = edge.classify(x)          # numpy (or torch) batch
    >>> edge.stats.snapshot()["answers_by_source"]
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import statistics
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from splitexit.errors import InputError
from splitexit.policies import ExitPolicy
from splitexit.runtime.arrays import NUMPY
from splitexit.runtime.loop import init_state
from splitexit.split.codec import Codec

from .protocol import CONTENT_TYPE, INFER_PATH, REQUEST_ID_HEADER

__all__ = ["EdgeSettings", "CircuitBreaker", "Answer", "EdgeStats", "EdgeRuntime"]

EXIT, SERVER, FALLBACK, FAILED = "exit", "server", "fallback", "failed"


@dataclass(frozen=True)
class EdgeSettings:
    """Deadline, retry and circuit-breaker settings of the edge runtime.

    Attributes:
        deadline_s: longest time one :meth:`EdgeRuntime.classify` call may take, device pass
            included; the fallback answer is given when the server has not answered by then.
        retries: further attempts after a failed request (connection error, 5xx, 429).
        backoff_s: wait before the first retry; doubles per retry up to ``backoff_max_s``.
        backoff_max_s: longest wait between retries.
        breaker_failures: consecutive failed requests that open the circuit breaker.
        breaker_reset_s: how long the breaker stays open before one probe request.
        token: bearer token the server expects, if any.
        workers: threads carrying requests (requests past the deadline are abandoned to them
            and end at their own timeout).
    """

    deadline_s: float = 1.0
    retries: int = 2
    backoff_s: float = 0.01
    backoff_max_s: float = 0.2
    breaker_failures: int = 3
    breaker_reset_s: float = 1.0
    token: str | None = None
    workers: int = 8

    def __post_init__(self) -> None:
        for name in ("deadline_s", "backoff_s", "backoff_max_s", "breaker_reset_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"EdgeSettings.{name} must be a finite number >= 0, got "
                                 f"{value!r}")
        if self.deadline_s <= 0:
            raise InputError("EdgeSettings.deadline_s must be > 0 seconds")
        for name, low in (("retries", 0), ("breaker_failures", 1), ("workers", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"EdgeSettings.{name} must be an int >= {low}, got {value!r}")


class CircuitBreaker:
    """Closed -> open after ``failures`` consecutive failures -> half-open after ``reset_s``.

    While open, :meth:`allow` refuses requests (the edge answers locally at once). After
    ``reset_s`` one probe request is let through (half-open): success closes the breaker,
    failure opens it again. Thread-safe.
    """

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"

    def __init__(self, failures: int = 3, reset_s: float = 1.0, clock=time.monotonic):
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = self.CLOSED
        self._count = 0
        self._opened_at = 0.0
        self._probing = False
        self.opens = 0

    @property
    def state(self) -> str:
        with self._lock:
            if self._state == self.OPEN and self._clock() - self._opened_at >= self.reset_s:
                return self.HALF_OPEN
            return self._state

    def allow(self) -> bool:
        """Whether a request may go out now (half-open: only one probe at a time)."""
        with self._lock:
            if self._state == self.CLOSED:
                return True
            if self._state == self.OPEN and self._clock() - self._opened_at >= self.reset_s:
                self._state = self.HALF_OPEN
                self._probing = False
            if self._state == self.HALF_OPEN and not self._probing:
                self._probing = True
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self._state, self._count, self._probing = self.CLOSED, 0, False

    def failure(self) -> None:
        with self._lock:
            self._count += 1
            if self._state == self.HALF_OPEN or (self._state == self.CLOSED
                                                  and self._count >= self.failures):
                self._state = self.OPEN
                self._opened_at = self._clock()
                self._probing = False
                self.opens += 1


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
    """Counters of an edge runtime: answers by source and exit, bytes, latency, requests."""

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
                    "latency_ms": {"p50": pick(0.5), "p95": pick(0.95),
                                   "mean": statistics.fmean(lat) if lat else None}}


class _RequestFailed(Exception):
    def __init__(self, reason: str, retryable: bool):
        super().__init__(reason)
        self.retryable = retryable


class EdgeRuntime:
    """Runs the device part, offloads undecided samples, falls back locally on failure.

    Args:
        device: the device part (stages before the cut and the local exits): any runtime with
            ``run(x, policy) -> DeviceOutput`` and ``num_exits``, e.g. a bundle's
            ``load_bundle(dir).device()`` (ONNX Runtime) or a PyTorch ``DevicePart``.
        policy: exit policy of the local exits; it also judges the server's logits.
        server_url: base URL of the server half (``None``: never offload, answer locally).
        codec: wire codec (a :class:`Codec` or its spelling).
        settings: deadline, retries, breaker and token.
        client: an ``httpx.Client`` to use (one is created and owned otherwise).

    Thread-safe: several threads may call :meth:`classify` at once.
    """

    def __init__(self, device, policy: ExitPolicy, server_url: str | None,
                 codec: Codec | str | None = "fp32", settings: EdgeSettings | None = None,
                 client: httpx.Client | None = None):
        if not callable(getattr(device, "run", None)) or not isinstance(
                getattr(device, "num_exits", None), int):
            raise InputError(f"device must be a device runtime with run(x, policy) and "
                             f"num_exits (a bundle's .device() or a DevicePart), got "
                             f"{type(device).__name__}")
        if not isinstance(policy, ExitPolicy):
            raise InputError(f"policy must be an ExitPolicy, got {type(policy).__name__}")
        self.device = device.eval() if callable(getattr(device, "eval", None)) else device
        self.policy = policy
        self.server_url = server_url.rstrip("/") if server_url else None
        codec = "fp32" if codec is None else codec
        self.codec = Codec.parse(codec) if isinstance(codec, str) else codec
        self.settings = settings or EdgeSettings()
        self.breaker = CircuitBreaker(self.settings.breaker_failures,
                                      self.settings.breaker_reset_s)
        self.stats = EdgeStats()
        self._own_client = client is None
        limits = httpx.Limits(max_connections=self.settings.workers,
                              max_keepalive_connections=self.settings.workers)
        self._client = client or httpx.Client(limits=limits)
        self._pool = cf.ThreadPoolExecutor(self.settings.workers,
                                           thread_name_prefix="splitexit-edge")
        self._headers = {"Content-Type": CONTENT_TYPE}
        if self.settings.token:
            self._headers["Authorization"] = f"Bearer {self.settings.token}"

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Release the HTTP client and the request threads (waits for running requests)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._own_client:
            self._client.close()

    def __enter__(self) -> EdgeRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ inference
    def classify(self, x) -> list[Answer]:
        """Answer every sample of a batch exactly once, within the deadline.

        Args:
            x: input batch ``(N, *input_shape)``, float: a numpy array (or a torch tensor).

        Returns:
            ``N`` answers in input order.

        Raises:
            InputError: wrong type, dtype, shape or non-finite input.
        """
        t0 = time.monotonic()
        deadline = t0 + self.settings.deadline_s
        out = self.device.run(x, self.policy).as_numpy()
        t_device = 1e3 * (time.monotonic() - t0)
        n = len(out.decided)
        answers: list[Answer | None] = [None] * n
        for i in np.flatnonzero(out.decided).tolist():
            answers[i] = Answer(i, int(out.predictions[i]), EXIT, int(out.exit_index[i]),
                                t_device, logits=out.logits[i])
        rows = out.undecided.tolist()
        if rows:
            logits, rid, error = self._offload(out.payload, len(rows), deadline)
            t_end = 1e3 * (time.monotonic() - t0)
            if logits is not None:
                final = self.device.num_exits - 1
                state = out.state or init_state(self.policy, len(rows), logits.shape[1], NUMPY)
                decision = self.policy.final_decision(final, logits, state)
                for j, i in enumerate(rows):
                    answers[i] = Answer(i, int(decision[j].argmax()), SERVER, final, t_end,
                                        rid, logits=decision[j])
            elif out.fallback_logits is not None:
                for j, i in enumerate(rows):
                    answers[i] = Answer(i, int(out.fallback_logits[j].argmax()), FALLBACK,
                                        out.fallback_exit, t_end, rid, error,
                                        out.fallback_logits[j])
            else:
                for i in rows:
                    answers[i] = Answer(i, -1, FAILED, -1, t_end, rid, error)
        done = [a for a in answers if a is not None]
        assert len(done) == n, "every input gets exactly one answer"
        self.stats.record(done)
        return done

    def _offload(self, payload, m: int, deadline: float
                 ) -> tuple[np.ndarray | None, str | None, str | None]:
        """Send the undecided samples; return ``(logits | None, request id, error)``."""
        if self.server_url is None:
            return None, None, "no server configured"
        body = self.codec.encode(payload)
        rid = uuid.uuid4().hex
        error = "none"
        late = f"no answer within the deadline of {self.settings.deadline_s} s"
        for attempt in range(self.settings.retries + 1):
            if not self.breaker.allow():
                return None, rid, f"circuit breaker open after repeated failures (last " \
                                  f"error: {error})"
            remaining = deadline - time.monotonic()
            if remaining <= 1e-3:
                return None, rid, f"{late} (last error: {error})"
            future = self._pool.submit(self._post, body, rid, m, remaining)
            try:
                logits, received = future.result(timeout=remaining)
            except cf.TimeoutError:
                future.cancel()
                self.breaker.failure()
                self.stats.request(len(body), 0, False, attempt > 0)
                return None, rid, late
            except Exception as exc:  # noqa: BLE001 - any request failure means: fall back
                error = str(exc)
                retryable = getattr(exc, "retryable", True)
                if retryable:
                    self.breaker.failure()
                else:
                    self.breaker.success()  # the server works; it refused this request
                self.stats.request(len(body), 0, False, attempt > 0)
                if not retryable:
                    return None, rid, error
                wait = min(self.settings.backoff_s * 2 ** attempt, self.settings.backoff_max_s,
                           max(0.0, deadline - time.monotonic()))
                time.sleep(wait)
                continue
            self.breaker.success()
            self.stats.request(len(body), received, True, attempt > 0)
            return logits, rid, None
        return None, rid, f"gave up after {self.settings.retries + 1} attempts: {error}"

    def _post(self, body: bytes, rid: str, m: int, timeout: float) -> tuple[np.ndarray, int]:
        headers = {**self._headers, REQUEST_ID_HEADER: rid}
        try:
            resp = self._client.post(self.server_url + INFER_PATH, content=body, headers=headers,
                                     timeout=httpx.Timeout(timeout))
        except httpx.HTTPError as exc:
            raise _RequestFailed(f"{type(exc).__name__}: {exc or 'connection failed'}",
                                 True) from exc
        if resp.status_code != 200:
            try:
                reason = resp.json().get("error", resp.text[:200])
            except ValueError:
                reason = resp.text[:200]
            retryable = resp.status_code >= 500 or resp.status_code == 429
            raise _RequestFailed(f"server answered {resp.status_code}: {reason}", retryable)
        try:
            doc = resp.json()
            logits = np.asarray(doc["logits"], dtype=np.float32)
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
            raise _RequestFailed(f"invalid server answer: {type(exc).__name__}: {exc}",
                                 True) from exc
        if doc.get("request_id") != rid or logits.ndim != 2 or logits.shape[0] != m \
                or logits.shape[1] < 1 or not np.isfinite(logits).all():
            raise _RequestFailed(f"server answer does not match request {rid} ({m} samples)",
                                 True)
        return logits, len(resp.content)
