"""Edge runtime: local exits on the device, offload of undecided samples, fallback on failure.

:class:`EdgeRuntime` runs a device runtime on each batch (a bundle's ONNX Runtime
:class:`~splitexit.runtime.device.OrtDevice`, or the PyTorch
:class:`~splitexit.serve.device.DevicePart`), answers the samples a local exit decides, sends
the rest to the server half over HTTP (codec payload) and judges the server's logits with the
same exit policy, in numpy. Every call has a deadline that bounds the whole exchange
(connecting, sending and reading the full answer; requests run on an asyncio event loop of
the runtime's own and are cancelled at the deadline); failed requests are retried with
exponential backoff while time remains; a :class:`CircuitBreaker` stops offloading after
repeated failures and probes again later. When the server or the link fails, undecided samples
get the deepest local exit's answer. Every input gets exactly one :class:`Answer`, labelled
with its source; an input that breaks the device half, the wire codec or the server half
(finite but extreme values that overflow) gets its own ``failed`` or ``fallback`` answer and
costs the others nothing.

Requests fit the server: the runtime reads the server's limits (``max_request_samples``,
``max_request_bytes``) from ``GET /health`` with its token, once, and splits the undecided
samples into requests within them (and within its own ``EdgeSettings`` caps); a 413 that
carries new limits re-splits the refused request. Answers larger than
``EdgeSettings.max_response_bytes`` are not read past that size.

This module needs numpy, onnxruntime (for bundles), httpx and zstandard only: no PyTorch, no
FastAPI, so a device installs ``splitexit`` without them.

Example:
    >>> b = load_bundle("bundle/")
    >>> with EdgeRuntime(b.device(), b.policy, "http://127.0.0.1:8000", b.codec) as edge:
    ...     answers = edge.classify(x)          # numpy (or torch) batch
    >>> edge.stats.snapshot()["answers_by_source"]
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import json
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
from splitexit.runtime.loop import check_batch, init_state, payload_select, payload_tensors
from splitexit.split.codec import Codec

from .protocol import CONTENT_TYPE, HEALTH_PATH, INFER_PATH, REQUEST_ID_HEADER

__all__ = ["EdgeSettings", "CircuitBreaker", "Answer", "EdgeStats", "EdgeRuntime"]

EXIT, SERVER, FALLBACK, FAILED = "exit", "server", "fallback", "failed"


@dataclass(frozen=True)
class EdgeSettings:
    """Deadline, retry, circuit-breaker and size settings of the edge runtime.

    Attributes:
        deadline_s: longest time one :meth:`EdgeRuntime.classify` call may take, device pass
            included; it bounds connecting, sending and reading the whole answer. The
            fallback answer is given when the server has not answered by then.
        retries: further attempts after a failed request (connection error, 5xx, 408, 429).
        backoff_s: wait before the first retry; doubles per retry up to ``backoff_max_s``.
        backoff_max_s: longest wait between retries.
        breaker_failures: consecutive failed requests that open the circuit breaker.
        breaker_reset_s: how long the breaker stays open before one probe request.
        token: bearer token the server expects, if any.
        workers: requests (connections) to the server at most at once.
        max_response_bytes: largest answer read from the server; a larger one is a failed
            request (not retried) and is not read further.
        max_request_samples: samples per request at most (``None``: the server's limit).
        max_request_bytes: encoded bytes per request at most (``None``: the server's limit).
    """

    deadline_s: float = 1.0
    retries: int = 2
    backoff_s: float = 0.01
    backoff_max_s: float = 0.2
    breaker_failures: int = 3
    breaker_reset_s: float = 1.0
    token: str | None = None
    workers: int = 8
    max_response_bytes: int = 16 * 1024 * 1024
    max_request_samples: int | None = None
    max_request_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("deadline_s", "backoff_s", "backoff_max_s", "breaker_reset_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"EdgeSettings.{name} must be a finite number >= 0, got "
                                 f"{value!r}")
        if self.deadline_s <= 0:
            raise InputError("EdgeSettings.deadline_s must be > 0 seconds")
        for name, low in (("retries", 0), ("breaker_failures", 1), ("workers", 1),
                          ("max_response_bytes", 1024)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"EdgeSettings.{name} must be an int >= {low}, got {value!r}")
        for name, low in (("max_request_samples", 1), ("max_request_bytes", 64)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < low):
                raise InputError(f"EdgeSettings.{name} must be None or an int >= {low}, got "
                                 f"{value!r}")


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


class _RequestFailed(Exception):
    def __init__(self, reason: str, retryable: bool, breaker: bool | None = None):
        super().__init__(reason)
        self.retryable = retryable
        #: whether it counts against the server in the circuit breaker
        self.breaker = retryable if breaker is None else breaker


class _TooLarge(_RequestFailed):
    """413: the request exceeds the server's limits (which the answer may carry)."""

    def __init__(self, reason: str, limits: dict | None):
        super().__init__(reason, False)
        self.limits = limits


class _BadRows(_RequestFailed):
    """422 naming the request's samples the server half cannot compute (non-finite logits)."""

    def __init__(self, reason: str, rows: list[int]):
        super().__init__(reason, False)
        self.rows = rows


@dataclass
class _Chunk:
    """Samples of one request: ``pos`` are positions in the job's list of samples to send;
    ``payload`` holds their rows, ``body`` their encoded message."""

    job: int
    pos: np.ndarray
    payload: Any
    body: bytes


@dataclass
class _Sent:
    """What became of one sent sample."""

    logits: np.ndarray | None
    request_id: str | None
    error: str | None = None
    bad_input: bool = False


def _finite_rows(arrays, n: int) -> np.ndarray:
    """Bool ``(n,)``: every value of the row is finite in each array (rows first)."""
    ok = np.ones(n, dtype=bool)
    for a in arrays:
        a = np.asarray(a)
        if a.dtype.kind in "fc":
            ok &= np.isfinite(a.reshape(n, -1)).all(axis=1)
    return ok


def _limit(*values: int | None) -> int | None:
    values = tuple(v for v in values if v is not None)
    return min(values) if values else None


class EdgeRuntime:
    """Runs the device part, offloads undecided samples, falls back locally on failure.

    Args:
        device: the device part (stages before the cut and the local exits): any runtime with
            ``run(x, policy) -> DeviceOutput`` and ``num_exits``, e.g. a bundle's
            ``load_bundle(dir).device()`` (ONNX Runtime) or a PyTorch ``DevicePart``.
        policy: exit policy of the local exits; it also judges the server's logits.
        server_url: base URL of the server half (``None``: never offload, answer locally).
        codec: wire codec (a :class:`Codec` or its spelling).
        settings: deadline, retries, breaker, token and sizes.
        client: an ``httpx.AsyncClient`` to use (one is created and owned otherwise); it runs
            on the runtime's own event loop thread.

    Thread-safe: several threads may call :meth:`classify` at once. :meth:`close` (or leaving
    the ``with`` block) takes at most about two seconds, whatever the server does.
    """

    def __init__(self, device, policy: ExitPolicy, server_url: str | None,
                 codec: Codec | str | None = "fp32", settings: EdgeSettings | None = None,
                 client: httpx.AsyncClient | None = None):
        if not callable(getattr(device, "run", None)) or not isinstance(
                getattr(device, "num_exits", None), int):
            raise InputError(f"device must be a device runtime with run(x, policy) and "
                             f"num_exits (a bundle's .device() or a DevicePart), got "
                             f"{type(device).__name__}")
        if not isinstance(policy, ExitPolicy):
            raise InputError(f"policy must be an ExitPolicy, got {type(policy).__name__}")
        if client is not None and not isinstance(client, httpx.AsyncClient):
            raise InputError(f"client must be an httpx.AsyncClient (the runtime bounds every "
                             f"exchange on its own event loop), got {type(client).__name__}")
        self.device = device.eval() if callable(getattr(device, "eval", None)) else device
        self.policy = policy
        self.server_url = server_url.rstrip("/") if server_url else None
        codec = "fp32" if codec is None else codec
        self.codec = Codec.parse(codec) if isinstance(codec, str) else codec
        self.settings = settings or EdgeSettings()
        self.breaker = CircuitBreaker(self.settings.breaker_failures,
                                      self.settings.breaker_reset_s)
        self.stats = EdgeStats()
        self._headers = {"Content-Type": CONTENT_TYPE, "Accept-Encoding": "identity"}
        if self.settings.token:
            self._headers["Authorization"] = f"Bearer {self.settings.token}"
        #: the server's advertised limits (``None``: not known yet)
        self.server_limits: dict[str, int] | None = None
        self._limits_lock = threading.Lock()
        self._closed = False
        self._close_lock = threading.Lock()
        self._own_client = client is None
        self._client = client
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        if self.server_url is not None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                            name="splitexit-edge-io")
            self._thread.start()
            if self._client is None:
                limits = httpx.Limits(max_connections=self.settings.workers,
                                      max_keepalive_connections=self.settings.workers)
                self._client = httpx.AsyncClient(limits=limits)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Cancel what is still in flight, close the connections and stop the I/O thread;
        bounded (about two seconds at most) whatever the server does."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=0.5)
            if self._own_client and self._client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._client.aclose(), 0.5)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=1.5)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(1.0)
        if not self._thread.is_alive():
            loop.close()

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
            ``N`` answers in input order. An input the device half, the codec or the server
            half cannot compute (finite values that overflow) gets its own ``failed`` answer
            (or its local ``fallback``), with the reason in ``error``.

        Raises:
            InputError: wrong type, dtype, shape or non-finite input (the whole batch).
        """
        t0 = time.monotonic()
        deadline = t0 + self.settings.deadline_s
        if self._closed:
            raise InputError("this EdgeRuntime is closed; create a new one")
        check_batch(x, getattr(self.device, "input_shape", None))
        n = int(x.shape[0])
        answers: list[Answer | None] = [None] * n
        groups = self._device_pass(x, np.arange(n), answers, t0)
        t_device = 1e3 * (time.monotonic() - t0)
        bad = sum(a is not None for a in answers)  # inputs that broke the device runtime
        jobs = []  # per group: (group, positions in out.undecided to send, their payload)
        for index, out in groups:
            for r in np.flatnonzero(out.decided).tolist():
                i = int(index[r])
                logits = out.logits[r]
                if np.isfinite(logits).all():
                    answers[i] = Answer(i, int(out.predictions[r]), EXIT,
                                        int(out.exit_index[r]), t_device, logits=logits)
                else:
                    bad += 1
                    answers[i] = Answer(i, -1, FAILED, -1, t_device, error=(
                        f"exit {int(out.exit_index[r])}'s logits are not finite for this input:"
                        " its values overflow the device half"))
            m = len(out.undecided)
            if not m:
                continue
            if self.server_url is None:
                jobs.append((index, out, np.zeros(0, dtype=np.int64), None))
                continue
            ok = _finite_rows(payload_tensors(out.payload), m)
            send = np.flatnonzero(ok)
            payload = out.payload if ok.all() else payload_select(out.payload, send)
            jobs.append((index, out, send, payload))
        sent = self._offload(jobs, deadline) if any(len(j[2]) for j in jobs) else {}
        t_end = 1e3 * (time.monotonic() - t0)
        offloaded = failed = 0
        for k, (index, out, send, _) in enumerate(jobs):
            rows = out.undecided.tolist()
            done = sent.get(k, {})
            results = [_Sent(None, None, "no server configured") for _ in rows]
            late = self._late(None)
            for p, j in enumerate(send.tolist()):
                results[j] = done.get(p) or _Sent(None, None, late)
            not_sent = set(range(len(rows))) - set(send.tolist())
            if self.server_url is not None:
                for j in not_sent:
                    results[j] = _Sent(None, None, "the device half's output at the cut is not "
                                       "finite for this input (its values overflow); it was "
                                       "not sent", bad_input=True)
            offloaded += len(send)
            failed += sum(1 for j in send.tolist() if results[j].logits is None
                          and not results[j].bad_input)
            bad += sum(1 for r in results if r.bad_input)
            got = [j for j, r in enumerate(results) if r.logits is not None]
            decision = None
            if got:
                width = results[got[0]].logits.shape[0]
                logits = np.zeros((len(rows), width), dtype=np.float32)
                for j in got:
                    logits[j] = results[j].logits
                final = self.device.num_exits - 1
                state = out.state or init_state(self.policy, len(rows), width, NUMPY)
                decision = self.policy.final_decision(final, logits, state)
                for j in got:  # e.g. an ensemble over a local exit that overflowed
                    if not np.isfinite(decision[j]).all():
                        results[j] = _Sent(None, results[j].request_id, "the policy's decision "
                                           "on the server's logits is not finite (this "
                                           "input's values overflow the device half)",
                                           bad_input=True)
            fallback = out.fallback_logits
            usable = (_finite_rows([fallback], len(rows)) if fallback is not None
                      else np.zeros(len(rows), dtype=bool))
            for j, i in enumerate(rows):
                i = int(index[i])
                r = results[j]
                if r.logits is not None:
                    answers[i] = Answer(i, int(decision[j].argmax()), SERVER,
                                        self.device.num_exits - 1, t_end, r.request_id,
                                        logits=decision[j])
                elif usable[j]:
                    answers[i] = Answer(i, int(fallback[j].argmax()), FALLBACK,
                                        out.fallback_exit, t_end, r.request_id, r.error,
                                        fallback[j])
                else:
                    reason = r.error if fallback is None else (
                        f"{r.error}; the local fallback exit's logits are not finite either")
                    answers[i] = Answer(i, -1, FAILED, -1, t_end, r.request_id, reason)
        done = [a for a in answers if a is not None]
        assert len(done) == n, "every input gets exactly one answer"
        self.stats.offload(offloaded, failed, bad)
        self.stats.record(done)
        return done

    def _device_pass(self, x, index: np.ndarray, answers: list, t0: float) -> list:
        """``[(input indices, DeviceOutput)]``; a part that fails is halved until the inputs
        that break the device half are alone, and each of those gets a failed answer."""
        try:
            return [(index, self.device.run(x, self.policy).as_numpy())]
        except Exception as exc:  # noqa: BLE001 - the batch passed check_batch: an input's
            if len(index) == 1:   # values break the device half; it alone pays
                i = int(index[0])
                answers[i] = Answer(i, -1, FAILED, -1, 1e3 * (time.monotonic() - t0),
                                    error=f"the device half failed on this input "
                                    f"({type(exc).__name__}: {exc})")
                return []
        half = len(index) // 2
        return (self._device_pass(x[:half], index[:half], answers, t0)
                + self._device_pass(x[half:], index[half:], answers, t0))

    # ------------------------------------------------------------------ requests
    def _late(self, error: str | None) -> str:
        late = f"no answer within the deadline of {self.settings.deadline_s:g} s"
        return f"{late} (last error: {error})" if error else late

    def _failed(self, reason: str) -> None:
        """A request failed for a reason of the server or the link: remember it."""
        self.stats.error(reason)

    def _offload(self, jobs: list, deadline: float) -> dict[int, dict[int, _Sent]]:
        """Send each job's samples (in requests within the limits); ``{job: {position:
        _Sent}}`` for the samples that got an outcome before the deadline."""
        assert self._loop is not None
        self._learn_limits(deadline)
        chunks: list[_Chunk] = []
        unsendable: dict[int, dict[int, _Sent]] = {}
        for k, (_, _, send, payload) in enumerate(jobs):
            if len(send):
                chunks += self._plan(k, np.arange(len(send)), payload, unsendable)
        future = asyncio.run_coroutine_threadsafe(self._send_all(chunks, deadline), self._loop)
        try:
            sent = future.result(timeout=max(0.0, deadline - time.monotonic()) + 0.5)
        except (cf.TimeoutError, cf.CancelledError):
            future.cancel()
            sent = {}
        for k, rows in unsendable.items():
            sent.setdefault(k, {}).update(rows)
        return sent

    def _plan(self, job: int, pos: np.ndarray, payload, unsendable: dict) -> list[_Chunk]:
        """Requests for the samples ``pos`` (rows of ``payload``) within the limits; a sample
        the codec refuses (e.g. beyond float16's range for ``fp16``) is answered locally."""
        limits = self.server_limits or {}
        max_samples = _limit(limits.get("max_request_samples"),
                             self.settings.max_request_samples)
        max_bytes = _limit(limits.get("max_request_bytes"), self.settings.max_request_bytes)
        out: list[_Chunk] = []

        def add(lo: int, hi: int) -> None:
            part = payload_select(payload, slice(lo, hi))
            try:
                body = self.codec.encode(part)
            except InputError as exc:
                if hi - lo == 1:
                    unsendable.setdefault(job, {})[int(pos[lo])] = _Sent(
                        None, None, f"the codec {self.codec.spec()} cannot send this input's "
                        f"payload ({exc})", bad_input=True)
                    return
                body = None
            if body is None:  # find the sample(s) the codec refuses
                mid = (lo + hi) // 2
                add(lo, mid)
                add(mid, hi)
                return
            if max_bytes is not None and len(body) > max_bytes and hi - lo > 1:
                # as many samples per request as the measured size allows (checked again)
                step = max(1, min(hi - lo - 1, (hi - lo) * max_bytes // len(body)))
                for start in range(lo, hi, step):
                    add(start, min(hi, start + step))
                return
            out.append(_Chunk(job, pos[lo:hi], part, body))

        step = max_samples or len(pos)
        for lo in range(0, len(pos), step):
            add(lo, min(len(pos), lo + step))
        return out

    def _learn_limits(self, deadline: float) -> None:
        """Read the server's limits from ``/health`` (with the token) once; a failed read
        (link down) is tried again on a later call."""
        if self.server_limits is not None or self.breaker.state != CircuitBreaker.CLOSED:
            return
        if not self._limits_lock.acquire(blocking=False):
            return  # another call is asking; a 413 would carry the limits anyway
        try:
            if self.server_limits is not None:
                return
            budget = (deadline - time.monotonic()) / 2
            if budget <= 0.005:
                return
            future = asyncio.run_coroutine_threadsafe(
                asyncio.wait_for(self._fetch("GET", HEALTH_PATH, None, self._headers, budget),
                                 budget), self._loop)
            try:
                status, content = future.result(timeout=budget + 0.5)
            except Exception:  # noqa: BLE001 - unknown limits: requests are split on 413s
                future.cancel()
                return
            limits = {}
            if status == 200:
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    doc = json.loads(content).get("limits") or {}
                    limits = {k: int(v) for k, v in doc.items()
                              if k in ("max_request_samples", "max_request_bytes")
                              and isinstance(v, int) and v > 0}
            self.server_limits = limits  # an answer without limits: none advertised
        finally:
            self._limits_lock.release()

    async def _send_all(self, chunks: list[_Chunk], deadline: float
                        ) -> dict[int, dict[int, _Sent]]:
        result: dict[int, dict[int, _Sent]] = {}
        await asyncio.gather(*(self._send(c, deadline, result) for c in chunks))
        return result

    async def _send(self, chunk: _Chunk, deadline: float, result: dict) -> None:
        """One request's samples: retries, re-splits on 413, drops the rows a 422 names."""
        rows = result.setdefault(chunk.job, {})

        def settle(outcome: _Sent, pos=None) -> None:
            for p in (chunk.pos if pos is None else pos).tolist():
                rows[int(p)] = outcome

        error: str | None = None
        attempt = 0
        while True:
            if not self.breaker.allow():
                return settle(_Sent(None, None, "circuit breaker open after repeated failures "
                                    f"(last error: {self.stats.last_error or error})"))
            if deadline - time.monotonic() <= 1e-3:
                return settle(_Sent(None, None, self._late(error)))
            rid = uuid.uuid4().hex
            try:
                logits, received = await self._exchange(chunk, rid, deadline)
            except asyncio.TimeoutError:
                self.breaker.failure()
                self.stats.request(len(chunk.body), 0, False, attempt > 0)
                self._failed(self._late(None))
                return settle(_Sent(None, rid, self._late(error)))
            except _TooLarge as exc:
                self.breaker.success()  # the server works; this request was too large
                self.stats.request(len(chunk.body), 0, False, attempt > 0)
                if exc.limits:
                    self.server_limits = {**(self.server_limits or {}), **exc.limits}
                unsendable: dict = {}
                parts = self._plan(chunk.job, chunk.pos, chunk.payload, unsendable)
                for p, outcome in unsendable.get(chunk.job, {}).items():
                    rows[p] = outcome
                if exc.limits and (len(parts) > 1 or (parts and len(parts[0].pos)
                                                       < len(chunk.pos))):
                    await asyncio.gather(*(self._send(c, deadline, result) for c in parts))
                    return None
                self._failed(str(exc))
                return settle(_Sent(None, rid, str(exc)))
            except _BadRows as exc:
                self.breaker.success()
                self.stats.request(len(chunk.body), 0, False, attempt > 0)
                bad = sorted({r for r in exc.rows if 0 <= r < len(chunk.pos)})
                if not bad:  # rows the request does not have: the answer is wrong
                    self._failed(str(exc))
                    return settle(_Sent(None, rid, str(exc)))
                settle(_Sent(None, rid, f"the server half cannot compute this input: {exc}",
                             bad_input=True), chunk.pos[bad])
                keep = np.setdiff1d(np.arange(len(chunk.pos)), bad)
                if not len(keep):
                    return None
                payload = payload_select(chunk.payload, keep)
                chunk = _Chunk(chunk.job, chunk.pos[keep], payload, self.codec.encode(payload))
                continue  # the rest again, at once: one bad input costs one answer
            except _RequestFailed as exc:
                error = str(exc)
                self._failed(error)
                if exc.breaker:
                    self.breaker.failure()
                else:
                    self.breaker.success()  # the server works; it refused this request
                self.stats.request(len(chunk.body), 0, False, attempt > 0)
                if not exc.retryable:
                    return settle(_Sent(None, rid, error))
                if attempt >= self.settings.retries:
                    return settle(_Sent(None, rid, f"gave up after {attempt + 1} attempts: "
                                        f"{error}"))
                wait = min(self.settings.backoff_s * 2 ** attempt, self.settings.backoff_max_s,
                           max(0.0, deadline - time.monotonic()))
                await asyncio.sleep(wait)
                attempt += 1
                continue
            self.breaker.success()
            self.stats.request(len(chunk.body), received, True, attempt > 0)
            for p, row in zip(chunk.pos.tolist(), logits):
                rows[int(p)] = _Sent(row, rid)
            return None

    async def _fetch(self, method: str, path: str, body: bytes | None, headers: dict,
                     timeout: float) -> tuple[int, bytes]:
        """One exchange, the answer read as a stream and never past ``max_response_bytes``.

        Raises:
            _RequestFailed: connection / protocol errors (retryable), an answer too large.
        """
        assert self._client is not None
        cap = self.settings.max_response_bytes
        request = self._client.build_request(method, self.server_url + path, content=body,
                                             headers=headers, timeout=httpx.Timeout(timeout))
        try:
            response = await self._client.send(request, stream=True)
            try:
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > cap:
                    raise _RequestFailed(f"the server's answer of {declared} bytes exceeds "
                                         f"max_response_bytes={cap}; not read", False, True)
                encoding = response.headers.get("content-encoding", "identity").lower()
                if encoding != "identity":  # a compressed answer could expand past the cap
                    raise _RequestFailed(f"the server's answer is {encoding}-encoded; the edge "
                                         "asks for and reads identity encoding only", False,
                                         True)
                buf = bytearray()
                async for part in response.aiter_raw():
                    buf += part
                    if len(buf) > cap:
                        raise _RequestFailed(f"the server's answer exceeds max_response_bytes="
                                             f"{cap}; stopped reading it", False, True)
                return response.status_code, bytes(buf)
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise _RequestFailed(f"{type(exc).__name__}: {exc or 'connection failed'}",
                                 True) from exc

    async def _exchange(self, chunk: _Chunk, rid: str, deadline: float
                        ) -> tuple[np.ndarray, int]:
        """POST one request; its logits and the answer's size. The deadline bounds it all.

        Raises:
            asyncio.TimeoutError: the deadline passed.
            _RequestFailed: (and subclasses) any other failure.
        """
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise asyncio.TimeoutError
        headers = {**self._headers, REQUEST_ID_HEADER: rid}
        status, content = await asyncio.wait_for(
            self._fetch("POST", INFER_PATH, chunk.body, headers, remaining), remaining)
        m = len(chunk.pos)
        try:
            doc = json.loads(content)
        except ValueError:
            doc = None
        if status != 200:
            reason = doc.get("error") if isinstance(doc, dict) else None
            reason = f"server answered {status}: {reason or content[:200].decode(errors='replace')}"
            if status == 413:
                limits = doc.get("limits") if isinstance(doc, dict) else None
                limits = {k: int(v) for k, v in (limits or {}).items()
                          if k in ("max_request_samples", "max_request_bytes")
                          and isinstance(v, int) and v > 0} if isinstance(limits, dict) else {}
                raise _TooLarge(reason, limits or None)
            if status == 422 and isinstance(doc, dict) and isinstance(doc.get("rows"), list) \
                    and all(isinstance(r, int) for r in doc["rows"]):
                raise _BadRows(reason, doc["rows"])
            raise _RequestFailed(reason, status >= 500 or status in (408, 429))
        try:
            logits = np.asarray(doc["logits"], dtype=np.float32)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise _RequestFailed(f"invalid server answer: {type(exc).__name__}: {exc}",
                                 True) from exc
        if doc.get("request_id") != rid or logits.ndim != 2 or logits.shape[0] != m \
                or logits.shape[1] < 1 or not np.isfinite(logits).all():
            raise _RequestFailed(f"server answer does not match request {rid} ({m} samples)",
                                 True)
        return logits, len(content)
